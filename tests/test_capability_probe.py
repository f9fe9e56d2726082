"""The openai backend's start-up probe (plugins/backends/capabilities.py) against the fake server: one transient
HTTP 500 does not make a capable endpoint's prompt lists "unsupported", a server that keeps answering 500 is a "no",
and refused credentials stop the run at start instead of being read as a missing capability."""
from __future__ import annotations

import pytest

from evalhost.errors import RunError
from evalhost.plugins.backends.capabilities import probe_prompt_list
from evalhost.plugins.backends.completions_client import CompletionsClient
from evalhost.testing import FakeServer


def _client(url: str, key: str | None = None) -> CompletionsClient:
    return CompletionsClient(url, api_key=key, max_retries=0, log=lambda m: None)


def test_one_transient_500_is_asked_again_and_the_list_is_accepted(tmp_path):
    with FakeServer(tmp_path, fail_500_on=[1]) as server:
        ok, why = probe_prompt_list(_client(server.url), "fake-model")
        assert ok, why
        assert server.requests == 2  # the 500, then the answer


def test_a_server_that_keeps_answering_500_has_no_prompt_lists(tmp_path):
    with FakeServer(tmp_path, fail_500_on=[1, 2, 3]) as server:
        ok, why = probe_prompt_list(_client(server.url), "fake-model")
        assert not ok and "HTTP 500" in why
        assert server.requests == 3


def test_refused_credentials_stop_the_run_without_showing_the_key(tmp_path):
    with FakeServer(tmp_path, require_key="sk-right") as server:
        with pytest.raises(RunError) as exc:
            probe_prompt_list(_client(server.url, key="sk-wrong-secret"), "fake-model")
    text = str(exc.value)
    assert "HTTP 401" in text and "api_key_env" in text and "sk-wrong-secret" not in text
