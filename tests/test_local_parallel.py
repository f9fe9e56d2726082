"""``evalhost run --parallel N`` (local executor): backend configurations run at the same time in threads, starts
one at a time unless the backend allows overlap, the records equal a sequential run's, and a failing configuration
stops the run with the others' records kept and resumable. Toy backend (a real entry-point plugin)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from evalhost.cli import cli, main
from evalhost.errors import UserError
from evalhost.records import read_records
from evalhost.runner import run_file
from evalhost.validate import validate_run
from toy import study_text, write_tasks

FLAVOURS = ["a", "b", "c"]


def _study(tmp_path: Path, parallel_start: bool = False) -> Path:
    tasks = write_tasks(tmp_path / "tasks.jsonl", 8)
    events = tmp_path / "events.jsonl"
    text = study_text(tasks, tmp_path / "runs", (2, 4)).replace(
        '[[backends]]\nname = "toy"\n',
        f'[[backends]]\nname = "toy"\noptions = {{ delay = 0.1, start_s = 0.2, events = "{events}", '
        f'parallel_start = {str(parallel_start).lower()} }}\n[backends.matrix]\nflavour = {json.dumps(FLAVOURS)}\n')
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def _events(tmp_path: Path, what: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for line in (tmp_path / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["what"] == what:
            out.setdefault(e["flavour"], []).append((e["t0"], e["t1"]))
    return out


def _outputs(run_dir: Path):
    return sorted((r["key"], r["output_sha256"], r["label"]) for r in read_records(run_dir / "records.jsonl"))


def _run(study: Path, **kw) -> Path:
    return run_file(study, progress=False, report=False, out=lambda s: None, **kw)


def test_parallel_configurations_overlap_with_starts_one_at_a_time(tmp_path, toy_env, monkeypatch):
    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    study = _study(tmp_path)
    sequential = _run(study)
    (tmp_path / "events.jsonl").unlink()
    parallel = _run(study, executor_options={"parallel": 3})
    assert _outputs(parallel) == _outputs(sequential)  # same keys, same outputs, same labels
    assert len(_outputs(parallel)) == 3 * 8 * 3
    starts = sorted(iv for ivs in _events(tmp_path, "start").values() for iv in ivs)
    assert len(starts) == 3
    assert all(a[1] <= b[0] for a, b in zip(starts, starts[1:]))  # serialized: no start overlaps another
    gens = _events(tmp_path, "generate")
    first_end = min(max(t1 for _, t1 in ivs) for ivs in gens.values())
    last_begin = max(min(t0 for t0, _ in ivs) for ivs in gens.values())
    assert last_begin < first_end  # every configuration was generating while the others were
    manifest = json.loads((parallel / "manifest.json").read_text())
    assert manifest["executor"]["parallel"] == 3 and manifest["status"] == "complete"
    assert len(manifest["backend_fingerprints"]) == 3
    assert validate_run(parallel)["errors"] == []
    from evalhost.report import write_report

    text = write_report(parallel, plots=False).read_text()
    assert "ran up to 3 at a time on one machine (`--parallel 3`): tok/s describe the shared machine" in text
    assert "at a time on one machine" not in write_report(sequential, plots=False).read_text()


def test_backends_that_allow_it_start_together(tmp_path, toy_env, monkeypatch):
    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    _run(_study(tmp_path, parallel_start=True), executor_options={"parallel": 3})
    starts = [iv for ivs in _events(tmp_path, "start").values() for iv in ivs]
    assert max(t0 for t0, _ in starts) < min(t1 for _, t1 in starts)  # all three were starting at once


def test_a_failing_configuration_stops_the_run_and_resume_finishes_it(tmp_path, toy_env, monkeypatch):
    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    study = _study(tmp_path)
    monkeypatch.setenv("EVALHOST_TOY_FAIL", "b")
    with pytest.raises(RuntimeError, match="toy backend b failed on purpose"):
        _run(study, executor_options={"parallel": 3})
    run_dir = next((tmp_path / "runs").iterdir())
    kept = read_records(run_dir / "records.jsonl")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"].startswith("stopped: toy backend b failed")
    assert kept and len({r["key"] for r in kept}) == len(kept) < 3 * 8 * 3
    # the other configurations finished the group they were generating, and those groups were recorded too
    # (the toy backend logs one generate event per group: solo groups and prompt_list groups alike)
    gens = _events(tmp_path, "generate")
    for flavour in ("a", "c"):
        groups = {(r["cell"], r["group_id"]) for r in kept if r["backend"].endswith(f"[flavour={flavour}]")}
        assert len(groups) == len(gens.get(flavour, [])), flavour
    monkeypatch.delenv("EVALHOST_TOY_FAIL")
    _run(study, resume=run_dir, executor_options={"parallel": 3})
    done = read_records(run_dir / "records.jsonl")
    assert len(done) == len({r["key"] for r in done}) == 3 * 8 * 3
    assert validate_run(run_dir)["errors"] == []


def test_parallel_option_is_checked(tmp_path, toy_env, capsys):
    study = _study(tmp_path)
    with pytest.raises(UserError, match="option parallel must be an integer >= 1"):
        _run(study, executor_options={"parallel": 0})
    with pytest.raises(SystemExit) as stop:
        main(["run", str(study), "--executor", "ray", "--parallel", "2"])
    assert stop.value.code == 2 and "--parallel is an option of the local executor" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["run", str(study), "--address", "ray://head:10001"])
    assert stop.value.code == 2 and "--address is the Ray cluster to run on; add --executor ray" in \
        capsys.readouterr().err
    result = CliRunner().invoke(cli, ["run", str(study), "--parallel", "2", "--dry-run"])
    assert result.exit_code == 0 and "up to 2 at a time" in result.output


def test_validate_flags_prompts_that_differ_between_paired_records_and_between_backends(tmp_path, toy_env,
                                                                                      monkeypatch):
    """The 246-target H100 run had three of four backends send raw prompts; validate now says so."""
    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    run_dir = _run(_study(tmp_path), executor_options={"parallel": 3})
    assert validate_run(run_dir)["warnings"] == []
    path = run_dir / "records.jsonl"
    records = read_records(path)
    for r in records:  # backend b "rendered" every prompt differently, consistently solo and batch
        if r["backend"].endswith("[flavour=b]"):
            r["prompt_sha256"] = "0" * 64
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = validate_run(run_dir)
    assert result["errors"] == []
    assert len(result["warnings"]) == 1 and result["warnings"][0].startswith("8 of 8 items were sent as different "
                                                                            "prompts by different backends")
    from evalhost.report import write_report

    assert "**Warning:** 8 of 8 items were sent as different prompts" in write_report(run_dir, plots=False).read_text()
    batch = next(r for r in records if r["condition"] == "batch" and r["backend"].endswith("[flavour=a]"))
    batch["prompt_sha256"] = "1" * 64
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    errors = validate_run(run_dir)["errors"]
    assert errors == [f"batch record {batch['key']} was sent a different prompt than its solo record"]
