"""The types of evalhost's plugin surface: items, sampling, generations, groups, scores, the run context and the
base classes of the plugin kinds (:class:`Backend`, :class:`Dispatcher`, :class:`Scorer`, :class:`TaskSource`).

Plugins import these from :mod:`evalhost.api`, which re-exports them with the errors, ``hookimpl``, the option and
item helpers and the executor contract; a plugin imports nothing else from evalhost. Nothing in this module imports
torch, vllm or transformers.

The flow of one study: TOML -> :mod:`evalhost.study` -> :mod:`evalhost.plan` (cells and :class:`Group`s) ->
a :class:`Dispatcher` sends each group through a :class:`Backend` -> :class:`Generation`s ->
a :class:`Scorer` labels them -> :mod:`evalhost.records` writes one record per target -> analysis -> report.

Options: every plugin kind has a classmethod ``check_options(options)`` that the host calls when it builds the plan
(so ``evalhost run --dry-run`` refuses a bad option before any run directory or server exists). It raises
:class:`evalhost.api.UserError` with one sentence; :func:`evalhost.api.check_keys` writes the usual "has no option
'x' (did you mean 'y'?)" sentence.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DOMAINS = ("safety", "capability")

# Capabilities a backend may declare; a dispatcher lists the ones it needs in ``requires``.
PROMPT_LIST = "prompt_list"  # one call generates a true (padded / co-scheduled) batch of prompts
CONCURRENT = "concurrent"  # many single-prompt requests may be in flight at once (a serving engine)
CONTINUOUS = "continuous"  # requests can join a running continuous batch mid-decode


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TaskItem:
    """One prompt of a task set.

    ``prompt`` is the user text (or ``messages`` a chat, OpenAI style).  For multiple choice, ``choices`` maps
    option letters to texts and ``answer`` is the correct letter; the prompt already shows the options.
    For bias items, ``targets`` maps ``stereotyped`` / ``anti_stereotyped`` / ``unknown`` to option letters.
    """

    id: str
    task: str
    domain: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    choices: dict[str, str] | None = None
    answer: str | None = None
    targets: dict[str, str] | None = None
    scorer: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def chat(self) -> list[dict[str, str]]:
        """The item as chat messages (a bare prompt becomes one user turn)."""
        if self.messages:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def plain_text(self) -> str:
        """The item as one string, for backends that do not apply a chat template."""
        if self.prompt is not None:
            return self.prompt
        return "\n\n".join(m["content"] for m in self.chat())


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int = 42
    logprobs: int | None = None
    top_logprobs: int = 0  # k > 0: keep the k most likely tokens (id, logprob) at every output token; 0 = off


@dataclass
class Generation:
    """What a backend returns for one prompt.

    ``timings`` holds wall-clock stamps (``time.time()``): ``sent``, ``first_token`` (when known), ``finished``.
    ``attempts`` > 1 or ``restarted`` say the request was retried / the server restarted while it was in flight.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)
    attempts: int = 1
    restarted: bool = False
    logprobs: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # with Sampling.top_logprobs = k: per output token, its k most likely tokens as [token, logprob] pairs, most
    # likely first; ``token`` is the token id (an int) or, where the server names tokens only by text, that text
    top_logprobs: list[list[list[Any]]] | None = None


@dataclass(frozen=True)
class Member:
    """One prompt of a dispatch group. ``role`` is ``target`` (recorded) or ``filler`` (sent, not recorded)."""

    item: TaskItem
    prompt: str
    role: str = "target"


@dataclass(frozen=True)
class Group:
    """The prompts that are sent together. A solo group has one member."""

    id: str
    members: tuple[Member, ...]

    @property
    def prompts(self) -> list[str]:
        return [m.prompt for m in self.members]


@dataclass
class GroupResult:
    """A dispatcher's answer: one generation per member, in member order, and evidence of how they ran."""

    generations: list[Generation]
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    label: str
    value: float | None = None
    rationale: str = ""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    dtype: str | None = None
    alignment_type: str | None = None


@dataclass
class RunContext:
    """What the host hands a backend or dispatcher (``self.context``): where to write, how to log, and the services
    a plugin may use instead of reaching into evalhost's modules.

    * ``run_dir``: the run directory (a backend writes its server logs here, nothing else); ``cache_dir``: a cache
      shared between runs (converted checkpoints, the solo cache).
    * ``log(message)``: one line of progress for the user (shown above the progress bar).
    * ``load_items(spec)``: the items of a task source spec such as ``"builtin:benign"`` or ``"jsonl:fillers.jsonl"``
      (a relative path is read next to the study file), validated like a study's own tasks.
    * :meth:`resolve_model_path`: a study's model ``path`` (``builtin:NAME``, a local directory, a GGUF file) as a
      local checkpoint directory.
    * :meth:`run_async`: run a coroutine on the process's one shared event loop and wait for it.
    * ``start_gate`` and ``work_label`` are the host's: a lock held while a backend starts when several run at once
      (local ``--parallel``), and the ``model/backend label`` of the work this backend serves (names log files).
    """

    run_dir: Path
    cache_dir: Path
    log: Callable[[str], None] = print
    load_items: Callable[[str], list[TaskItem]] | None = None  # resolve a task source spec, e.g. "builtin:benign"
    start_gate: Any = None  # a lock held while a backend starts, when several run at once (local --parallel)
    work_label: str | None = None  # "model/backend label" of the work this backend serves (names its log files)

    def resolve_model_path(self, path: str) -> str:
        """A model ``path`` as a local checkpoint directory (a shipped ``builtin:NAME`` is converted once into
        ``cache_dir``); raises :class:`~evalhost.errors.UserError` when there is none."""
        from .models import resolve_model_path

        return resolve_model_path(path, log=self.log)

    def run_async(self, factory: Callable[[], Any]) -> Any:
        """Run ``factory()`` (a coroutine) on the process's one shared event loop and return its result. Every
        async dispatcher and backend uses this loop, so an ``httpx.AsyncClient`` kept between calls stays valid."""
        from .loop import run_async

        return run_async(factory)


class Backend:
    """Base class of backend plugins. One instance per (model, backend configuration) in a run.

    Subclasses set ``capabilities`` and implement :meth:`start`, :meth:`generate`, :meth:`fingerprint`.
    Heavy imports (torch, transformers, vllm) belong inside methods, never at module level.
    """

    capabilities: frozenset[str] = frozenset()

    def __init__(self, model: ModelSpec, options: dict[str, Any], context: RunContext) -> None:
        self.model = model
        self.options = dict(options)
        self.context = context

    # -- preflight and lifecycle ------------------------------------------------------------
    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Raise :class:`evalhost.errors.UserError` for an unknown or ill-typed option (plan time)."""

    @classmethod
    def check_model(cls, model: ModelSpec, options: dict[str, Any]) -> None:
        """Raise :class:`evalhost.errors.UserError` for a model this backend can never load (plan time, so
        ``--dry-run`` says it before a run directory exists): no side effects, nothing converted or downloaded.
        The default accepts every model; a backend that loads a local checkpoint calls
        :func:`evalhost.api.check_model_path`."""

    def preflight(self) -> None:
        """Fail with one clear sentence if this backend cannot work on this machine (before any generation)."""

    def start(self) -> None:
        """Load the model or start the server. Called once before the first group; may be called again."""

    def close(self) -> None:
        """Release everything (stop servers). Must be safe to call twice."""

    def starts_alongside_others(self) -> bool:
        """Whether :meth:`start` may overlap another backend's start on the same machine. False (the default):
        when backends run at the same time, the host starts them one at a time."""
        return False

    def resources(self) -> dict[str, float]:
        """What one instance needs from a scheduler such as Ray, e.g. ``{"num_gpus": 1}``."""
        return {"num_cpus": 1}

    # -- generation -------------------------------------------------------------------------
    def render(self, item: TaskItem) -> str:
        """The exact prompt string sent to the engine (chat template applied client-side when configured)."""
        return item.plain_text()

    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]:
        """Generate for ``prompts`` as one true batch (one call / one request). One prompt = solo."""
        raise NotImplementedError

    async def agenerate(self, prompt: str, sampling: Sampling) -> Generation:
        """One single-prompt request that may run concurrently with others (backends with CONCURRENT)."""
        raise NotImplementedError

    def solo_parallelism(self) -> int:
        """How many solo prompts :meth:`generate_solo_many` runs at once, each strictly alone on its own engine
        replica (a *solo fleet*). 1 = no fleet: solo prompts run one after another."""
        return 1

    def generate_solo_many(self, prompts: list[str], sampling: Sampling) -> list[Generation]:
        """Run each prompt *solo* (batch size 1 on its engine), up to :meth:`solo_parallelism` at a time on
        separate replicas. Outputs must be what ``generate([p])`` gives; the default is exactly that, sequentially."""
        return [self.generate([p], sampling)[0] for p in prompts]

    def fleet(self) -> list["Backend"]:
        """The engines that may run *batched* groups side by side (a *batched fleet*), called once after
        :meth:`start`: one backend object per engine replica, this object first; the default ``[self]`` is no fleet.

        The host runs each batch group on ONE of them and never gives an engine a second group (nor a solo prompt)
        while one is in flight there, so every group is still alone in its engine, as the batch condition needs;
        the groups of a work are spread over the free engines and their results yielded in plan order. Each
        element must answer the dispatchers' calls (``generate``, ``agenerate``, ``engine_metrics``) for its own
        engine only (``engine_metrics`` of replica i reads replica i's engine), render prompts as this object
        does, and serve the same stack (the fingerprint is this object's). A dispatcher object is built per
        replica, so ``run_group`` calls on different replicas run at the same time in different threads. The
        group's ``dispatch_evidence`` then carries ``fleet`` (:func:`evalhost.api.fleet_evidence`)."""
        return [self]

    # -- provenance -------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """Stack fingerprint: package versions, device, server args, env flags that change numerics."""
        return {}

    def evidence(self) -> dict[str, Any]:
        """Extra facts for the manifest (e.g. batch-invariant activation evidence)."""
        return {}

    # -- engine state -----------------------------------------------------------------------
    async def engine_metrics(self) -> dict[str, Any] | None:
        """The serving engine's state right now, e.g. ``{"requests_running": 3}`` (how many requests the engine
        is executing), or None when this backend cannot tell. Dispatchers sample it while a group runs as evidence
        of co-batching; a failure may raise (the dispatcher records the error, never fails the group)."""
        return None


class Dispatcher:
    """Base class of dispatcher plugins: decides how a group's prompts reach the backend.

    ``requires`` lists the backend capabilities it needs (the plan refuses a backend without them). A dispatcher
    reaches the engine only through the :class:`Backend` methods (``generate``, ``agenerate``, ``engine_metrics``).
    """

    requires: frozenset[str] = frozenset()

    def __init__(self, options: dict[str, Any], context: RunContext) -> None:
        self.options = dict(options)
        self.context = context

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Raise :class:`evalhost.errors.UserError` for an unknown or ill-typed option (plan time)."""

    def run_group(self, backend: Backend, group: Group, sampling: Sampling) -> GroupResult:
        """Send ``group``'s prompts through ``backend``; return one :class:`Generation` per member, in member
        order, and evidence of how they ran (recorded as ``dispatch_evidence``)."""
        raise NotImplementedError


class Scorer:
    """Base class of scorer plugins: turns one output text into a discrete label.

    A scorer is built once per (name, options) in a run, as ``cls(options)`` with the task's ``scorer_options``,
    and must be cheap to build and safe to call from one thread at a time.
    """

    #: the keys ``scorer_options`` may hold; None (the default) leaves the check to ``__init__``
    options_known: tuple[str, ...] | None = None

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Raise :class:`evalhost.errors.UserError` for an unknown or ill-typed option (plan time). The default
        refuses a key outside :attr:`options_known` (unless that is None), then builds the scorer once
        (``cls(options)``) and drops it, so checks written in ``__init__`` run at plan time too; override it when
        building is expensive."""
        if cls.options_known is not None:
            from .options import check_keys

            name = getattr(cls, "name", None)
            check_keys(options, cls.options_known, f"scorer '{name}'" if isinstance(name, str) else "the scorer")
        cls(options)

    def score(self, item: TaskItem, text: str) -> Score:
        """Label ``text``, the output for ``item``. A raise becomes this record's ``scorer_error``."""
        raise NotImplementedError


class TaskSource:
    """Base class of task-source plugins, picked by a task's ``source = "scheme:location"``.

    ``load`` resolves the part of ``source`` after the scheme. ``options`` holds the study's ``[[tasks]] options``
    plus the host's keys ``task`` (the task's name), and ``domain`` / ``scorer`` when the study sets them.
    """

    #: the keys a study's ``[[tasks]] options`` may hold for this source; None (the default) checks none here
    options_known: tuple[str, ...] | None = None
    #: True: ``location`` is a file path, and a relative one is read next to the study file (as ``jsonl:`` is)
    location_is_path: bool = False

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Raise :class:`evalhost.errors.UserError` for an option the study's ``[[tasks]] options`` should not
        have (plan time). ``options`` is the study's table only (not the host's ``task``/``domain``/``scorer``);
        the default refuses a key outside :attr:`options_known` unless that is None."""
        if cls.options_known is not None:
            from .options import check_keys

            check_keys(options, cls.options_known, "the task source")

    def load(self, location: str, options: dict[str, Any]) -> list[TaskItem]:
        """The items at ``location``, validated (see :func:`evalhost.api.item_from_dict`)."""
        raise NotImplementedError
