"""The hf backend on the real small model (transformers on CPU)."""
from __future__ import annotations

import pytest

from evalhost.errors import UserError
from evalhost.plugins import build_registry
from evalhost.plugins.backends.hf import HFBackend
from evalhost.types import PROMPT_LIST, ModelSpec, RunContext, Sampling, TaskItem

QUESTIONS = ["What is 2+2?", "Name a color.", "Say hi.", "What is the capital of France?"]


@pytest.fixture(scope="module")
def hf(small_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hf")
    backend = HFBackend(small_model, {}, RunContext(run_dir=run_dir, cache_dir=run_dir, log=lambda m: None))
    backend.start()
    yield backend
    backend.close()


def items():
    return [TaskItem(id=f"q{i}", task="t", domain="capability", prompt=q) for i, q in enumerate(QUESTIONS)]


def test_registered_with_capabilities():
    registry = build_registry(entry_points=False)
    assert registry.get("backend", "hf") is HFBackend
    assert HFBackend.capabilities == {PROMPT_LIST}


def test_render_applies_chat_template(hf):
    text = hf.render(items()[0])
    assert "What is 2+2?" in text and text != "What is 2+2?"
    assert text.rstrip().endswith("assistant")  # generation prompt added
    plain = HFBackend(hf.model, {"chat_template": False}, hf.context)
    assert plain.render(items()[0]) == "What is 2+2?"


def test_solo_and_batch_of_four(hf):
    prompts = [hf.render(it) for it in items()]
    sampling = Sampling(temperature=0.0, max_tokens=16)
    solo = [hf.generate([p], sampling)[0] for p in prompts]
    batch = hf.generate(prompts, sampling)
    assert len(batch) == 4
    eos = hf.tok.eos_token_id
    for g in solo + batch:
        assert g.text.strip() and g.token_ids
        assert g.finish_reason in ("stop", "length")
        assert (g.finish_reason == "stop") == (g.token_ids[-1] == eos)
        assert eos not in g.token_ids[:-1]  # nothing after the first eos (no padding)
        assert len(g.token_ids) <= 16
        assert g.timings["finished"] >= g.timings["sent"]
        assert hf.tok.decode(g.token_ids, skip_special_tokens=True) == g.text
    # the first answer is right on this model
    assert "4" in solo[0].text
    # solo vs batch: record, do not assert equality (that is what the studies measure)
    same = [a.token_ids == b.token_ids for a, b in zip(solo, batch)]
    print("hf solo == batch token ids:", same)


def test_length_finish_and_seeded_sampling(hf):
    prompt = hf.render(items()[1])
    short = hf.generate([prompt], Sampling(max_tokens=3))[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 3
    hot = Sampling(temperature=1.0, top_p=0.95, max_tokens=8, seed=7)
    a = hf.generate([prompt], hot)[0]
    b = hf.generate([prompt], hot)[0]
    assert a.token_ids == b.token_ids  # same seed, same sample


def test_fingerprint_names_versions(hf):
    import torch
    import transformers

    fp = hf.fingerprint()
    assert fp["torch"] == torch.__version__
    assert fp["transformers"] == transformers.__version__
    assert fp["dtype"] == "float32" and fp["device"] == "cpu"
    assert "python" in fp and "cuda" in fp and "env" in fp


def test_unknown_option_did_you_mean():
    with pytest.raises(UserError, match=r"no option 'chat_templat' \(did you mean 'chat_template'\?\)"):
        HFBackend.check_options({"chat_templat": True})
    with pytest.raises(UserError, match="dtype must be one of"):
        HFBackend.check_options({"dtype": "fp8"})


def test_model_dtype_from_spec(small_model, tmp_path):
    spec = ModelSpec(name=small_model.name, path=small_model.path, dtype="bfloat16")
    backend = HFBackend(spec, {}, RunContext(run_dir=tmp_path, cache_dir=tmp_path, log=lambda m: None))
    assert backend.fingerprint()["dtype"] == "bfloat16"
