"""Crash safety: a real `evalhost run` killed with SIGKILL at 10 seeded-random points, resumed each time with
``--resume RUN_DIR``, ends with exactly the record set of an uninterrupted run (same keys, outputs and labels), no
duplicates, and ``evalhost validate`` passes.

Kill points are drawn from the plan's record count: kill point ``k`` means "SIGKILL as soon as at least ``k`` records
are on disk *and* this process has (re)written the manifest", so a kill point the run already passed kills a resumed
process right after it re-opened the run (before it loads the model), which is a point of its own.

* ``test_toy_*``: the toy entry-point backend (``EVALHOST_TOY_DELAY`` slows each group), fast.
* ``test_hf_*`` (slow): the real ``hf`` backend on the real small model (SmolLM2-135M-Instruct), 8 benign items,
  ``max_tokens = 8``, ``prompt_list`` batch size 4; 12 process starts (one reference run, 10 killed, 1 final).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evalhost.records import read_records
from toy import make_distribution, study_text, write_tasks

N_KILLS = 10


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evalhost.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run_to_end(args: list[str], env: dict[str, str], timeout: float) -> tuple[str, str]:
    proc = _cli(args, env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, f"`evalhost {' '.join(args)}` exited {proc.returncode}:\n{err[-3000:]}"
    return out, err


def _manifest(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _count(run_dir: Path) -> int:
    return len(read_records(run_dir / "records.jsonl"))


def _view(records: list[dict]) -> list[tuple]:
    """What must not depend on interruptions: identity, composition, prompt, output and label of every record."""
    return sorted((r["key"], r["group_id"], r["position"], tuple(r["peers"]), r["prompt_sha256"], r["output_sha256"],
                   tuple(r["output_token_ids"]), r["finish_reason"], r["label"]) for r in records)


def kill_and_resume(study: Path, runs: Path, env: dict[str, str], seed: int, total: int,
                    timeout: float) -> tuple[Path, Path, list[int]]:
    """Run STUDY once to the end (reference), then run it again killed at N_KILLS points and resumed each time.

    Returns (reference run dir, killed/resumed run dir, record count after each kill).
    """
    base = ["run", str(study), "--quiet", "--no-report"]
    out, _ = _run_to_end(base, env, timeout)
    ref_dir = Path(out.split("run directory: ")[1].split()[0])
    assert _count(ref_dir) == total

    rng = random.Random(seed)
    points = sorted(rng.sample(range(total), N_KILLS))
    run_dir: Path | None = None
    counts: list[int] = []
    previous: set[str] = set()
    for k in points:
        resumes_before = None
        args = list(base)
        if run_dir is not None:
            resumes_before = len((_manifest(run_dir) or {}).get("resumes", []))
            args += ["--resume", str(run_dir)]
        proc = _cli(args, env)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                assert time.monotonic() < deadline, f"kill point {k}: the run neither reached it nor ended"
                if run_dir is None:
                    new = [d for d in runs.iterdir() if d != ref_dir and (d / "manifest.json").is_file()]
                    if new:
                        run_dir = new[0]
                if run_dir is not None:
                    manifest = _manifest(run_dir)
                    reopened = manifest is not None and (
                        resumes_before is None or len(manifest.get("resumes", [])) > resumes_before)
                    if reopened and _count(run_dir) >= k:
                        break
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), f"kill point {k}: exited {proc.returncode}:\n{err[-3000:]}"
        assert run_dir is not None
        # after every kill: every complete line is a JSON record, no key twice, nothing recorded before was lost
        records = read_records(run_dir / "records.jsonl", strict=True)
        keys = [r["key"] for r in records]
        assert len(keys) == len(set(keys)), f"kill point {k}: duplicate records"
        assert previous <= set(keys), f"kill point {k}: records written before the kill disappeared"
        assert len(keys) <= total
        previous = set(keys)
        counts.append(len(keys))

    _run_to_end(base + ["--resume", str(run_dir)], env, timeout)
    return ref_dir, run_dir, counts


def check_final(ref_dir: Path, run_dir: Path, env: dict[str, str], total: int) -> None:
    final = read_records(run_dir / "records.jsonl", strict=True)
    keys = [r["key"] for r in final]
    assert len(keys) == len(set(keys)) == total, "the resumed run has missing or duplicate records"
    assert _view(final) == _view(read_records(ref_dir / "records.jsonl"))
    assert {r["run_id"] for r in final} == {run_dir.name}
    manifest = _manifest(run_dir)
    assert manifest["status"] == "complete"
    assert len(manifest["resumes"]) >= 1
    assert len(manifest["fingerprints"]) == 1, "the resumed run recorded more than one backend stack"
    check = subprocess.run([sys.executable, "-m", "evalhost.cli", "validate", str(run_dir)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


# ------------------------------------------------------------------------------------------------------ toy (fast)
@pytest.mark.parametrize("seed", [11, 2024])
def test_toy_run_killed_at_10_points_resumes_to_the_uninterrupted_record_set(tmp_path, seed):
    root = make_distribution(tmp_path / "site")
    tasks = write_tasks(tmp_path / "tasks.jsonl", 16)
    study = tmp_path / "study.toml"
    study.write_text(study_text(tasks, tmp_path / "runs", (2, 4)))
    env = {**os.environ, "PYTHONPATH": str(root), "EVALHOST_TOY_DELAY": "0.05"}
    total = 16 * 3
    ref_dir, run_dir, counts = kill_and_resume(study, tmp_path / "runs", env, seed, total, timeout=120)
    assert ref_dir != run_dir
    assert counts[0] < total, "the first kill came after the run had finished; the test did not interrupt anything"
    assert sum(c < total for c in counts) >= N_KILLS // 2, f"too few kills interrupted the run: {counts}"
    check_final(ref_dir, run_dir, env, total)


# ------------------------------------------------------------------------------------------------------ hf (slow)
def _benign_source(tmp_path: Path) -> str:
    from evalhost.plugins.task_sources.files import builtin_names

    if "benign" in builtin_names():
        return "builtin:benign"
    path = tmp_path / "benign.jsonl"  # the built-in set is not there yet: a small benign set of our own
    asks = ["Name a fruit that is yellow.", "What is two plus three?", "Give a synonym for happy.",
            "Which planet is closest to the sun?", "Write one word that rhymes with cat.",
            "What colour is the sky on a clear day?", "How many legs does a spider have?",
            "Name a musical instrument with strings."]
    with path.open("w") as fh:
        for i, ask in enumerate(asks):
            fh.write(json.dumps({"id": f"benign-{i:02d}", "prompt": ask, "domain": "safety"}) + "\n")
    return f"jsonl:{path}"


@pytest.mark.slow
def test_hf_run_killed_at_10_points_resumes_to_the_uninterrupted_record_set(tmp_path, small_model_path):
    study = tmp_path / "study.toml"
    study.write_text(f"""
[study]
name = "crash-hf"
seed = 5
output_dir = "{tmp_path / 'runs'}"

[sampling]
max_tokens = 8

[[models]]
name = "smollm2"
path = "builtin:smollm2-135m-instruct"

[[backends]]
name = "hf"
options = {{ device = "cpu" }}

[[dispatchers]]
name = "prompt_list"
batch_sizes = [4]

[[tasks]]
name = "benign"
source = "{_benign_source(tmp_path)}"
limit = 8
scorer = "refusal"
""")
    # one thread: the same numerics in every process (and no oversubscription on a small shared machine)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    total = 8 * 2
    ref_dir, run_dir, counts = kill_and_resume(study, tmp_path / "runs", env, seed=8, total=total, timeout=600)
    assert counts[0] < total
    check_final(ref_dir, run_dir, env, total)
