"""What the run loop writes into records and the manifest, and what it says while it runs (issue 17): Study D rows
keep their discovery phase and direction, a scorer that raises fails one record (not the run), ``flip_on`` reaches the
manifest, progress lines reach a non-terminal stderr, and a dry run says when vllm-invariant will be refused."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from evalhost.cli import cli
from evalhost.errors import UserError
from evalhost.records import read_records
from evalhost.runner import run_file
from evalhost.validate import validate_run
from toy import make_distribution, study_text, write_tasks

ROOT = Path(__file__).resolve().parents[1]


def env_with(root: Path, **extra) -> dict:
    """The environment for an `evalhost` subprocess: the toy plugin on PYTHONPATH, ahead of what is there."""
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}

FLAKY = '''
from evalhost.hookspecs import hookimpl
from evalhost.types import Scorer, Score
import os


class Flaky(Scorer):
    """The toy refusal scorer, except that it raises on item q003 (unless EVALHOST_FLAKY_FIXED=1)."""

    def score(self, item, text):
        if item.id.startswith("q003") and os.environ.get("EVALHOST_FLAKY_FIXED") != "1":
            raise ValueError(f"cannot parse {item.id}")
        refused = "sorry" in text.lower()
        return Score("refuse" if refused else "comply", 1.0 if refused else 0.0, "flaky")


@hookimpl
def register_scorers(register):
    register("flaky", Flaky)
'''


def install_flaky(site: Path, tmp_path: Path) -> None:
    src = tmp_path / "flaky_src.py"
    src.write_text(FLAKY)
    make_distribution(site, name="evalhost-flaky", module="evalhost_flaky", source=src, entry="flaky")


def toy_study(tmp_path: Path, n_items=12, batch_sizes=(2, 4), name="study.toml", scorer="toy_refusal",
              study_extra="") -> Path:
    tasks = write_tasks(tmp_path / "tasks.jsonl", n_items)
    path = tmp_path / name
    text = study_text(tasks, tmp_path / "runs", batch_sizes).replace('scorer = "toy_refusal"', f'scorer = "{scorer}"')
    path.write_text(text.replace('seed = 7\n', f'seed = 7\n{study_extra}', 1))
    return path


def quiet(path, **kw):
    return run_file(path, progress=False, report=False, out=lambda s: None, **kw)


# ------------------------------------------------------------------------------------------------ Study D parity
def test_study_d_records_carry_the_candidate_rows_phase_and_original_direction(tmp_path, toy_env, monkeypatch):
    """discovery run -> `evalhost candidates` -> Study D run (candidates:FILE) -> every record has the row's phase
    and its original direction in the addendum's vocabulary; a row's own original_direction is kept."""
    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    discovery = toy_study(tmp_path, n_items=16, study_extra='phase = "discovery"\n')
    first = quiet(discovery)
    cand = tmp_path / "candidates.jsonl"
    result = CliRunner().invoke(cli, ["candidates", str(first), "-o", str(cand)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in cand.read_text().splitlines()]
    assert len(rows) >= 2 and all(r["phase"] == "discovery" for r in rows)
    # one row as an imported/older export would have it: its own phase and original direction are kept
    rows[0]["phase"], rows[0]["original_direction"] = "Phase 5", "safety_weakened"
    cand.write_text("".join(json.dumps(r) + "\n" for r in rows))

    d = tmp_path / "study_d.toml"
    d.write_text(discovery.read_text()
                 .replace('name = "toy"\n', 'name = "toy_d"\n', 1)
                 .replace('phase = "discovery"', 'phase = "ablation"')
                 .replace(f'source = "jsonl:{tmp_path / "tasks.jsonl"}"', 'source = "candidates:candidates.jsonl"'))
    records = read_records(quiet(d) / "records.jsonl")
    assert records and validate_run(d.parent / "runs" / records[0]["run_id"])["errors"] == []
    by_cid = {f"{x['item_id']}@{x['dispatcher']}/bs{x['batch_size']}/{x['group_id']}": x for x in rows}
    assert {r["item_id"] for r in records} == set(by_cid)
    for r in records:  # solo and batch records of every candidate row
        row = by_cid[r["item_id"]]
        if row is rows[0]:
            assert (r["phase"], r["original_direction"]) == ("Phase 5", "safety_weakened")
            continue
        assert r["phase"] == "discovery"
        want = "refuse_to_comply" if row["solo_label"] == "refuse" else "comply_to_refuse"
        assert r["original_direction"] == want
    from evalhost.plugins.task_sources.candidates import ORIGINAL_DIRECTIONS

    assert {r["original_direction"] for r in records} <= set(ORIGINAL_DIRECTIONS)


@pytest.mark.parametrize("row, want", [
    ({"solo_label": "refuse", "batch_label": "comply", "domain": "safety"}, "refuse_to_comply"),
    ({"solo_label": "comply", "batch_label": "refuse", "domain": "safety"}, "comply_to_refuse"),
    # a full refusal turning partial (refusal scorer: 1.0 -> 0.5) is a move toward compliance
    ({"solo_label": "refuse", "batch_label": "refuse", "solo_score": 1.0, "batch_score": 0.5, "domain": "safety"},
     "refuse_to_comply"),
    # bbq: the score is 1 for the right answer; losing it weakens safety, gaining it strengthens it
    ({"solo_label": "unknown", "batch_label": "stereotyped", "solo_score": 1.0, "batch_score": 0.0,
      "domain": "safety"}, "safety_weakened"),
    ({"solo_label": "anti_stereotyped", "batch_label": "unknown", "solo_score": 0.0, "batch_score": 1.0,
      "domain": "safety"}, "safety_strengthened"),
    ({"solo_label": "stereotyped", "batch_label": "unknown", "domain": "safety"}, "safety_strengthened"),
    # truthfulqa rows are safety-domain: correct -> incorrect weakens safety
    ({"solo_label": "correct", "batch_label": "incorrect", "domain": "safety"}, "safety_weakened"),
    ({"solo_label": "incorrect", "batch_label": "correct", "domain": "capability"}, "incorrect_to_correct"),
    ({"solo_label": "correct", "batch_label": "incorrect", "domain": "capability"}, "correct_to_incorrect"),
    ({"solo_label": "refuse", "batch_label": "unparsed", "domain": "safety"}, "refuse_to_unparsed"),
    ({"solo_label": "comply", "batch_label": "comply", "domain": "safety", "direction": "unchanged"}, "unchanged"),
    ({"solo_label": "comply", "batch_label": "refuse", "original_direction": "safety_strengthened"},
     "safety_strengthened"),
])
def test_original_direction_maps_discovery_labels_and_scores_to_the_addendum_vocabulary(row, want):
    from evalhost.plugins.task_sources.candidates import original_direction

    assert original_direction(row) == want


# ------------------------------------------------------------------------------------------------ scorer errors
def test_a_scorer_that_raises_on_one_item_fails_that_record_not_the_run(tmp_path, toy_env, monkeypatch):
    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    install_flaky(toy_env, tmp_path)
    run_dir = quiet(toy_study(tmp_path, scorer="flaky"))
    records = read_records(run_dir / "records.jsonl")
    assert len(records) == 12 * 3
    bad = [r for r in records if r["scorer_error"]]
    assert {r["item_id"] for r in bad} == {"q003"} and len(bad) == 3  # solo, bs2, bs4
    for r in bad:
        assert r["label"] is None and r["score"] is None
        assert r["scorer_error"] == "ValueError: cannot parse q003"
        assert r["output_text"]  # the generation is kept
    assert all(r["label"] in ("refuse", "comply") and r["scorer_error"] is None for r in records if r not in bad)
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    assert validate_run(run_dir)["errors"] == []  # a scorer error is not a schema error


# ------------------------------------------------------------------------------------------------ flip_on
def test_flip_on_is_validated_and_stored_in_the_manifest(tmp_path, toy_env):
    default = quiet(toy_study(tmp_path, n_items=4))
    assert json.loads((default / "manifest.json").read_text())["flip_on"] == "label"
    by_score = quiet(toy_study(tmp_path, n_items=4, name="s.toml", study_extra='flip_on = "score"\n'))
    assert json.loads((by_score / "manifest.json").read_text())["flip_on"] == "score"
    with pytest.raises(UserError, match=r"'study.flip_on' must be one of label, score \(got 'scores'\)"):
        quiet(toy_study(tmp_path, n_items=4, name="bad.toml", study_extra='flip_on = "scores"\n'))


# ------------------------------------------------------------------------------------------------ progress lines
LINE = re.compile(r"^generations (\d+)/(\d+) \((\d+)%\), (\d+) of (\d+) cells done, elapsed \d+:\d\d, "
                  r"eta (\d+:\d\d|unknown)$", re.M)


def test_progress_lines_reach_a_stderr_that_is_not_a_terminal(tmp_path):
    root = make_distribution(tmp_path / "site")
    study = toy_study(tmp_path, n_items=16)
    env = env_with(root, EVALHOST_TOY_DELAY="0.03", EVALHOST_SOLO_CACHE="0", EVALHOST_PROGRESS_S="0.2")
    proc = subprocess.run([sys.executable, "-m", "evalhost.cli", "run", str(study), "--no-report"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = LINE.findall(proc.stderr)
    assert len(lines) >= 2, proc.stderr
    assert all(int(total) == 48 and int(cells) == 3 for _, total, _, _, cells, _ in lines)
    done = [int(d) for d, *_ in lines]
    assert done == sorted(done) and done[-1] == 48 and lines[-1][3] == "3"  # the last line: all cells done
    quiet_run = subprocess.run([sys.executable, "-m", "evalhost.cli", "run", str(study), "--no-report", "--quiet"],
                               env=env, capture_output=True, text=True, timeout=120)
    assert quiet_run.returncode == 0 and not LINE.search(quiet_run.stderr)


# ------------------------------------------------------------------------------------------------ dry run
def test_dry_run_says_vllm_invariant_will_be_refused_without_cuda(tmp_path):
    from evalhost.plugins.backends.vllm import INVARIANT_CPU_MESSAGE, cuda_available

    if cuda_available():
        pytest.skip("this machine has CUDA; vllm-invariant is not refused here")
    tasks = write_tasks(tmp_path / "tasks.jsonl", 4)
    study = tmp_path / "inv.toml"
    study.write_text(study_text(tasks, tmp_path / "runs", (2,))
                     .replace('[[backends]]\nname = "toy"', '[[backends]]\nname = "vllm"\nlabel = "standard"\n\n'
                              '[[backends]]\nname = "vllm-invariant"\nlabel = "invariant"')
                     .replace('scorer = "toy_refusal"', 'scorer = "refusal"'))
    shown: list[str] = []
    assert run_file(study, dry_run=True, out=shown.append) is None
    text = "\n".join(shown)
    assert f"backend 'invariant' will be refused on this machine: {INVARIANT_CPU_MESSAGE}" in text
    assert "backend 'standard' will be refused" not in text
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ study_d recipe
def recipe(study_file: Path) -> list[str]:
    return [line[1:].strip() for line in study_file.read_text().splitlines()
            if line.startswith("#   ") and line[1:].strip().split()[0] in ("evalhost", "sed")]


def run_recipe(study_file: Path, work: Path, discovery: Path, env: dict) -> list[subprocess.CompletedProcess]:
    """Run the commands of the study file's header as written (in a copy of studies/), with DISCOVERY_RUN_DIR
    replaced by a real discovery run and `--dry-run` added to `evalhost run` (study D needs a GPU)."""
    out = []
    for cmd in recipe(study_file):
        redirect = None
        if " > " in cmd:
            cmd, redirect = cmd.split(" > ")
        argv = shlex.split(cmd.replace("DISCOVERY_RUN_DIR", str(discovery)))
        if argv[0] == "evalhost":
            argv = [sys.executable, "-m", "evalhost.cli", *argv[1:]]
            if argv[3] == "run":
                argv.append("--dry-run")
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=120)
        out.append(proc)
        if proc.returncode != 0:
            break
        if redirect:
            (work / redirect.strip()).write_text(proc.stdout)
    return out


def test_the_study_d_recipe_works_as_written(tmp_path):
    root = make_distribution(tmp_path / "site")
    env = env_with(root, EVALHOST_SOLO_CACHE="0")
    study = toy_study(tmp_path, n_items=16, study_extra='phase = "discovery"\n')
    proc = subprocess.run([sys.executable, "-m", "evalhost.cli", "run", str(study), "--quiet", "--no-report"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    discovery = Path(proc.stdout.split("run directory: ")[1].split()[0])
    work = tmp_path / "checkout"
    (work / "studies").mkdir(parents=True)
    for name in ("study_d.toml", "candidates.jsonl"):  # what ships
        shutil.copy(ROOT / "studies" / name, work / "studies" / name)
    steps = run_recipe(ROOT / "studies" / "study_d.toml", work, discovery, env)
    assert len(steps) == len(recipe(ROOT / "studies" / "study_d.toml")) >= 2
    for step in steps:
        assert step.returncode == 0, (step.args, step.stdout, step.stderr)
    assert (ROOT / "studies" / "candidates.jsonl").read_bytes() == (work / "studies" / "candidates.jsonl").read_bytes()
    assert any("generations" in s.stdout for s in steps)
