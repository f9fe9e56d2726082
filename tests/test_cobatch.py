"""Co-batching verdicts (evalhost.cobatch) on synthetic evidence: each rule and its boundary, how a verdict decides
whether a pair counts as the batch condition, the study option, the report's sentence, and the up-front refusal of
a dispatcher the started backend cannot serve (evalhost.dispatch_needs)."""
from __future__ import annotations

import types

import pytest

from evalhost import analysis
from evalhost import cobatch as cb
from evalhost.dispatch_needs import check_started
from evalhost.errors import UserError
from evalhost.registry import get_registry
from evalhost.report_headline import headline
from evalhost.study import parse_study
from evalhost.types import CONCURRENT, PROMPT_LIST

T0 = 1024.0  # times below are exact binary fractions: the boundaries are tested exactly


def released(finish_after: list[float], tokens: list[int], first_after: list[float] | None = None) -> list[dict]:
    """Intervals of requests released together at T0 that finished ``finish_after`` seconds later."""
    out = []
    for i, (f, t) in enumerate(zip(finish_after, tokens)):
        iv = {"sent": T0, "first_token": None, "finished": T0 + f, "tokens": t, "position": i}
        if first_after is not None:
            iv["first_token"] = T0 + first_after[i]
        out.append(iv)
    return out


# -- verified: engine evidence ----------------------------------------------------------------------------------
def test_synchronized_is_verified_exactly_when_the_engine_saw_the_whole_group_running():
    ivs = released([1.0, 1.0, 1.0, 1.0], [20, 20, 20, 20])
    assert cb.synchronized_verdict(4, 4, ivs)["verdict"] == "verified"
    assert cb.synchronized_verdict(4, 4, ivs)["rule"] == "engine_running"
    assert cb.synchronized_verdict(4, 7, ivs)["verdict"] == "verified"
    three = cb.synchronized_verdict(4, 3, ivs)
    assert three["verdict"] == "unverified" and "at most 3" in three["why"]
    none = cb.synchronized_verdict(4, None, ivs, "the backend reports no engine metrics")
    assert none["verdict"] == "unverified" and "no engine metrics" in none["why"]


def test_overlapping_lifetimes_alone_never_verify():
    """Every request sent before any finished (overlap_all) is what a fleet of one-request servers shows too."""
    ivs = released([1.0, 1.01, 1.02, 1.03], [20, 20, 20, 20])
    assert cb.synchronized_verdict(4, None, ivs)["verdict"] == "unverified"


# -- serialized: finish_queue -------------------------------------------------------------------------------------
def test_the_issues_llamacpp_group_is_serialized():
    # issue 24: four requests released together finished 2.3, 4.0, 5.7 and 7.3 s later
    ivs = released([2.3, 4.0, 5.7, 7.3], [30, 30, 30, 30])
    v = cb.synchronized_verdict(4, None, ivs)
    assert v["verdict"] == "serialized" and v["rule"] == "finish_queue"
    assert "3.45" in v["why"] and "4.60" in v["why"] and "5.75" in v["why"]


def test_a_co_batched_group_is_not_serialized():
    assert cb.finish_queue(released([2.0, 2.02, 2.05, 2.1], [30, 30, 30, 30]))[0] is False
    # a 10-token and a 30-token answer in one batch: F_2 = 31 r, midpoint (31 r + 42 r) / 2 = 36.5 r
    r = 0.1
    assert cb.finish_queue(released([11 * r, 31 * r], [10, 30]))[0] is False
    assert cb.synchronized_verdict(2, None, released([11 * r, 31 * r], [10, 30]))["verdict"] == "unverified"


def test_finish_queue_boundary_is_the_midpoint():
    # first finisher: 7 tokens in 1 s (r = 1/8 s per unit); the second (7 tokens): own 1 s, queue 2 s, midpoint 1.5 s
    assert cb.finish_queue(released([1.0, 1.5], [7, 7]))[0] is True
    assert cb.finish_queue(released([1.0, 1.4375], [7, 7]))[0] is False
    # one later request short of its midpoint makes the whole group not serialized (third: midpoint 2 s)
    assert cb.finish_queue(released([1.0, 1.5, 1.9375], [7, 7, 7]))[0] is False
    assert cb.finish_queue(released([1.0, 1.5, 2.0], [7, 7, 7]))[0] is True
    assert cb.finish_queue(released([1.0, 2.0, 3.0], [7, 7, 7]))[0] is True
    # F is measured from the release, the LAST request sent: 0.75 and 1.1875 s, midpoint 1.125 s
    late = released([1.0, 1.4375], [7, 7])
    late[1]["sent"] = T0 + 0.25
    assert cb.finish_queue(late)[0] is True


def test_finish_queue_needs_tokens_two_requests_and_a_positive_first_finish():
    assert cb.finish_queue(released([1.0], [10])) is None
    ivs = released([1.0, 2.0], [10, 10])
    ivs[1]["tokens"] = None
    assert cb.finish_queue(ivs) is None
    assert cb.synchronized_verdict(2, None, ivs)["verdict"] == "unverified"
    assert cb.finish_queue(released([0.0, 2.0], [10, 10])) is None


# -- serialized: first_token_chain --------------------------------------------------------------------------------
def test_first_token_chain_rule_and_its_tolerance():
    chain = released([1.0, 2.0, 3.0], [5, 5, 5], first_after=[0.2, 1.0 + cb.CHAIN_TOLERANCE_S / 2, 2.1])
    v = cb.synchronized_verdict(3, None, chain)
    assert v["verdict"] == "serialized" and v["rule"] == "first_token_chain"
    overlap = released([1.0, 2.0, 3.0], [5, 5, 5], first_after=[0.2, 0.9, 2.1])
    assert cb.first_token_chain(overlap)[0] is False
    # first-token times decide when present: an overlap is not serialized even if the finishes look queued
    assert cb.synchronized_verdict(3, None, overlap)["verdict"] == "unverified"
    assert cb.first_token_chain(released([1.0, 2.0], [5, 5])) is None  # no first tokens: the rule does not apply


# -- continuous -------------------------------------------------------------------------------------------------
def _continuous(max_running, in_flight=2, occupancy=3, first=None, filler_finish=(1.5, 1.8)):
    fillers = [{"sent": T0 - 1, "first_token": T0 - 0.9, "finished": T0 + f, "tokens": 10} for f in filler_finish]
    return {"mode": "continuous", "occupancy": occupancy, "fillers_in_flight_at_admit": in_flight,
            "target_sent": T0, "max_running": max_running, "filler_intervals": fillers,
            "target_intervals": [{"sent": T0, "first_token": None if first is None else T0 + first,
                                  "finished": T0 + 3, "position": 0, "role": "target"}]}


def test_continuous_verified_needs_a_filler_in_flight_and_the_whole_batch_running():
    assert cb.continuous_verdict(_continuous(4))["verdict"] == "verified"  # occupancy 3 + 1 target
    assert cb.continuous_verdict(_continuous(3))["verdict"] == "unverified"
    assert cb.continuous_verdict(_continuous(4, in_flight=0))["verdict"] == "unverified"
    assert cb.continuous_verdict(_continuous(None))["verdict"] == "unverified"


def test_continuous_serialized_when_the_target_started_after_the_fillers_finished():
    v = cb.continuous_verdict(_continuous(None, first=1.9))
    assert v["verdict"] == "serialized" and v["rule"] == "first_token_chain"
    assert cb.continuous_verdict(_continuous(None, first=1.0))["verdict"] == "unverified"


# -- prompt_list --------------------------------------------------------------------------------------------------
def test_prompt_list_is_verified_by_construction_only_where_the_backend_runs_a_list_as_one_batch():
    assert cb.prompt_list_verdict(types.SimpleNamespace(plugin_name="hf"), 4)["verdict"] == "verified"
    assert cb.prompt_list_verdict(types.SimpleNamespace(plugin_name="vllm"), 4)["rule"] == "by_construction"
    other = types.SimpleNamespace(plugin_name="openai", probed_capabilities={"engine": None})
    assert cb.prompt_list_verdict(other, 4)["verdict"] == "unverified"
    vllm_behind_openai = types.SimpleNamespace(plugin_name="openai", probed_capabilities={"engine": "vllm"})
    assert cb.prompt_list_verdict(vllm_behind_openai, 4)["verdict"] == "verified"
    declared = types.SimpleNamespace(plugin_name="mine", prompt_list_one_batch="one padded forward pass")
    assert "one padded forward pass" in cb.prompt_list_verdict(declared, 4)["why"]


# -- counting -----------------------------------------------------------------------------------------------------
def test_finalize_adds_the_policy_to_batch_groups_and_leaves_solo_alone():
    solo = {"mode": "solo"}
    assert cb.finalize(solo, "solo", False) is solo
    ser = {"mode": "synchronized", "cobatch": cb.verdict("serialized", "finish_queue", "x")}
    unv = {"mode": "synchronized", "cobatch": cb.verdict("unverified", "none", "x")}
    ver = {"mode": "synchronized", "cobatch": cb.verdict("verified", "engine_running", "x")}
    assert cb.finalize(ver, "batch", False)["cobatch"]["counted"] is True
    assert cb.finalize(ser, "batch", True)["cobatch"]["counted"] is False  # serialized never counts
    assert cb.finalize(unv, "batch", False)["cobatch"]["counted"] is False
    assert cb.finalize(unv, "batch", True)["cobatch"]["counted"] is True
    assert "counted" not in ver["cobatch"]  # the dispatcher's dict is not changed
    # a third-party dispatcher that recorded no verdict: the same rules on what it left, else unverified
    assert cb.finalize({"mode": "mine"}, "batch", False)["cobatch"]["verdict"] == "unverified"
    left = {"intervals": released([2.3, 4.0, 5.7, 7.3], [30] * 4), "max_running": None}
    assert cb.finalize(left, "batch", False, 4)["cobatch"]["verdict"] == "serialized"
    assert cb.finalize({"intervals": [], "max_running": 4}, "batch", False, 4)["cobatch"]["verdict"] == "unverified"


def _records(verdict: str | None, count_unverified: bool, n: int = 4) -> list[dict]:
    recs = []
    for i in range(n):
        base = {"model": "m", "backend": "b", "task": "t", "item_id": f"i{i}", "domain": "safety",
                "scorer": "refusal", "prompt_sha256": f"p{i}", "finish_reason": "stop", "repeat": 0}
        recs.append({**base, "key": f"solo#{i}", "cell": "m/b/t/solo/bs1", "condition": "solo", "dispatcher": "solo",
                     "batch_size": 1, "label": "refuse", "output_text": "no", "dispatch_evidence": {"mode": "solo"}})
        ev = {"mode": "synchronized"}
        if verdict is not None:
            ev = cb.finalize({**ev, "cobatch": cb.verdict(verdict, "r", "why")}, "batch", count_unverified)
        recs.append({**base, "key": f"batch#{i}", "cell": "m/b/t/synchronized/bs4", "condition": "batch",
                     "dispatcher": "synchronized", "batch_size": 4, "label": "comply" if i == 0 else "refuse",
                     "output_text": "yes" if i == 0 else "no", "dispatch_evidence": ev})
    return recs


@pytest.mark.parametrize("verdict,count_unverified,comparable,reason", [
    ("verified", False, 4, None), ("serialized", False, 0, "serialized"), ("serialized", True, 0, "serialized"),
    ("unverified", False, 0, "unverified"), ("unverified", True, 4, None), (None, False, 4, None)])
def test_only_counted_groups_are_the_batch_condition(verdict, count_unverified, comparable, reason):
    s = analysis.summarize(_records(verdict, count_unverified))
    assert s["counts"]["pairs"] == 4 and s["overall"]["pairs"] == comparable
    nc = s["counts"]["not_comparable"]
    assert (nc.get(reason) == 4) if reason else not any(nc.get(k) for k in ("serialized", "unverified"))
    assert s["overall"]["label_flips"]["k"] == (1 if comparable else 0)
    if verdict is None:  # records from before verdicts existed: the summary keeps its old shape
        assert "cobatch" not in s["overall"]
        assert "Co-batching" not in headline(s)
    else:
        assert s["overall"]["cobatch"][verdict] == 4 and s["overall"]["cobatch"]["count_unverified"] is count_unverified


def test_headline_says_how_many_pairs_were_verified_and_which_rule_counted():
    text = headline(analysis.summarize(_records("serialized", False)))
    assert "Co-batching: 0 of 4 batch pairs come from groups with verified co-batching" in text
    assert "4 from groups the server ran one after another" in text
    assert "`[study] count_unverified = false`" in text and "4 (4 serialized)" in text
    text = headline(analysis.summarize(_records("unverified", True)))
    assert "Verified and unverified groups count as the batch condition (`[study] count_unverified = true`)" in text


# -- the study option ---------------------------------------------------------------------------------------------
STUDY = """
[study]
name = "s"
{extra}
[[models]]
name = "m"
path = "builtin:smollm2-135m-instruct"
[[backends]]
name = "hf"
[[dispatchers]]
name = "prompt_list"
batch_sizes = [2]
[[tasks]]
name = "t"
source = "builtin:benign"
"""


def test_count_unverified_option():
    assert parse_study(STUDY.format(extra="")).count_unverified is False
    assert parse_study(STUDY.format(extra="count_unverified = true")).count_unverified is True
    with pytest.raises(UserError, match="'study.count_unverified' must be true or false, got int 1"):
        parse_study(STUDY.format(extra="count_unverified = 1"))


# -- refusal up front ---------------------------------------------------------------------------------------------
def test_a_dispatcher_the_started_backend_cannot_serve_is_refused_naming_one_that_can():
    d = types.SimpleNamespace
    backend = d(capabilities=frozenset({CONCURRENT}), base_url="http://127.0.0.1:1",
                probed_capabilities={"why": {PROMPT_LIST: "it answers a list of prompts with HTTP 500 and an empty "
                                                          "message"}})
    dispatchers = [d(label="solo", plugin="solo"), d(label="sync", plugin="synchronized"),
                   d(label="pl", plugin="prompt_list")]
    with pytest.raises(UserError) as err:
        check_started(backend, dispatchers, get_registry(), "openai")
    msg = str(err.value)
    assert msg == ("dispatcher 'pl' needs a list of prompts in one request, which http://127.0.0.1:1 does not accept "
                   "(it answers a list of prompts with HTTP 500 and an empty message); use dispatcher 'synchronized' "
                   "instead in the study file")
    assert "\n" not in msg
    check_started(backend, dispatchers[:2], get_registry(), "openai")  # what it can serve passes
    bare = d(capabilities=frozenset(), base_url=None)
    with pytest.raises(UserError, match="which backend 'x' does not accept; drop this dispatcher"):
        check_started(bare, dispatchers[1:2], get_registry(), "x")
