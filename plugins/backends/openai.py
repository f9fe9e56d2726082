"""The ``openai`` backend: any OpenAI-compatible ``/v1/completions`` endpoint (vLLM, SGLang, TGI, a hosted API).

Options: ``base_url`` (required, e.g. ``http://127.0.0.1:8000`` or ``.../v1``), ``model`` (the served model name,
required), ``api_key_env`` (the NAME of the environment variable holding the key — the key itself is read at start,
kept only in the HTTP client's Authorization header, and never written to records, manifests, logs or errors),
``chat_template`` / ``tokenizer`` (render with a local tokenizer: the option ``tokenizer`` or the ModelSpec path),
``request_timeout_s`` (the deadline of one request, the whole answer included; unset: 120 s + 1 s per
``max_tokens`` token, see :mod:`.completions`), ``max_retries``, ``backoff_s``, ``return_token_ids`` (``auto`` probes
the endpoint).

``generate(prompts)`` is one request with the prompt list; ``agenerate`` one async single-prompt request.
At start a capability probe (:mod:`.capabilities`) asks the endpoint whether it accepts prompt lists, returns token
ids, exposes engine metrics and streams; the findings go into the fingerprint (``capabilities``) and the evidence,
and an endpoint that refuses prompt lists loses the capability ``prompt_list`` (the study is refused up front).
Nothing is restarted here: failures are retried with bounded backoff, then a :class:`RunError`.
"""
from __future__ import annotations

import os
import platform
from typing import Any

from evalhost.api import CONCURRENT, PROMPT_LIST, hookimpl, UserError

from .capabilities import stable
from .completions import CompletionsBackend, check_option_keys
from .completions_client import CompletionsClient


class OpenAIBackend(CompletionsBackend):
    plugin_name = "openai"
    capabilities = frozenset({PROMPT_LIST, CONCURRENT})  # narrowed at start by the capability probe
    probed_capabilities: dict[str, Any] | None = None
    OPTIONS: dict[str, Any] = {
        **CompletionsBackend.COMMON_OPTIONS,
        "base_url": str,
        "model": str,
        "api_key_env": str,
    }

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        check_option_keys(cls.plugin_name, options, cls.OPTIONS)
        for required in ("base_url", "model"):
            if not options.get(required):
                example = "http://127.0.0.1:8000" if required == "base_url" else "the served model name"
                raise UserError(f"backend 'openai' needs the option {required} (e.g. {example}); add it to the "
                                f"backend's options in the study file")
        url = str(options["base_url"])
        if not url.startswith(("http://", "https://")):
            raise UserError(f"backend 'openai' option base_url must start with http:// or https://, not {url!r}")
        env = options.get("api_key_env")
        if env is not None and (not env or not env.replace("_", "").isalnum()):
            raise UserError("backend 'openai' option api_key_env must be the NAME of an environment variable "
                            "(e.g. OPENAI_API_KEY), never the key itself")

    def _tokenizer_path(self) -> str | None:
        if self.options.get("tokenizer"):
            return str(self.options["tokenizer"])
        if not self.model.path:
            return None
        try:
            return super()._tokenizer_path()
        except UserError:
            if self.options.get("chat_template"):
                raise
            return None  # a remote-only model: render plain text unless a template is asked for

    def preflight(self) -> None:
        self.check_options(self.options)
        env = self.options.get("api_key_env")
        if env and not os.environ.get(env):
            raise UserError(f"backend 'openai': the environment variable {env} (option api_key_env) is not set; "
                            f"export it before running")

    def start(self) -> None:
        if self.client is not None:
            return
        self.preflight()
        env = self.options.get("api_key_env")
        self.client = CompletionsClient(
            str(self.options["base_url"]),
            api_key=os.environ.get(env) if env else None,
            request_timeout_s=self.options.get("request_timeout_s"),  # None: sized for max_tokens
            max_retries=int(self.options.get("max_retries", 4)),
            backoff_s=float(self.options.get("backoff_s", 0.5)),
            log=self.context.log,
        )
        self.base_url = self.client.base_url
        self.served_model = str(self.options["model"])
        self.probe_token_ids()
        from .capabilities import probe  # what the endpoint can do: prompt lists, metrics, streaming

        self.probed_capabilities = probe(self.client, self.served_model, bool(self._server_token_ids))
        if not self.probed_capabilities["prompt_list"]:
            self.capabilities = frozenset(type(self).capabilities - {PROMPT_LIST})

    def close(self) -> None:
        super().close()
        self.client = None

    def fingerprint(self) -> dict[str, Any]:
        version = None
        if self.client is not None:
            try:
                response = self.client.get("/version", timeout=5)
                if response.status_code == 200:
                    version = response.json().get("version")
            except Exception:
                version = None
        return {
            "backend": self.plugin_name,
            "python": platform.python_version(),
            "base_url": self.base_url or self.options.get("base_url"),
            "served_model": self.options.get("model"),
            "server_version": version,
            "api_key_env": self.options.get("api_key_env"),  # the variable's name only, never its value
            "token_ids_source": self.token_ids_source,
            "chat_template": self.uses_chat_template(),  # resolved: were prompts rendered with the template?
            **({"capabilities": stable(self.probed_capabilities)} if self.probed_capabilities else {}),
        }

    def evidence(self) -> dict[str, Any]:
        """The capability probe's findings with their reasons (plugins/backends/capabilities.py)."""
        return {"capabilities": self.probed_capabilities} if self.probed_capabilities else {}


@hookimpl
def register_backends(register):
    register("openai", OpenAIBackend)
