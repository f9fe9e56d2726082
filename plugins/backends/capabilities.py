"""The capability probe of an OpenAI-compatible endpoint, run once when a backend starts.

An ``openai`` backend can point at any server: vLLM, SGLang, llama-cpp-python's server, a hosted API. What the
server can do decides which dispatchers can run there and what their evidence means, so the backend asks it once,
with requests of one or two tokens, before the first group:

* ``prompt_list``: does ``/v1/completions`` answer a list of two prompts with one complete choice per prompt
  (indices 0 and 1)? llama-cpp-python's server answers HTTP 500 with an empty message.
* ``token_ids``: does it return the generated token ids (vLLM's ``return_token_ids``; probed by
  :meth:`CompletionsBackend.probe_token_ids`)?
* ``engine_metrics``: does ``/metrics`` carry a running-requests gauge (``vllm:num_requests_running``)? Only then
  can a ``synchronized`` group be *verified* as one batch (:mod:`evalhost.cobatch`); ``engine`` names the engine
  the gauge belongs to (``vllm``), else null.
* ``stream``: does a ``"stream": true`` request come back as server-sent events (first-token times are possible)?

The result is the backend's ``probed_capabilities``; the booleans and ``engine`` go into its fingerprint (they
describe the stack and are stable from one start to the next), the reasons into its evidence. A capability the
endpoint lacks is removed from the backend's ``capabilities``, so a study whose dispatcher needs it is refused
before the first group (:func:`evalhost.plan.check_started`).

A failure is an answer ("no"), with two exceptions: an endpoint that refuses the credentials (HTTP 401/403) stops
the run at start with one sentence (it would refuse every request; the key is never shown), and an HTTP 5xx to the
prompt-list request is asked again twice (0.5 s apart) before it counts as "no", so one transient server error does
not turn a capable endpoint into one whose prompt-list studies are refused (llama-cpp-python's server answers every
list with HTTP 500, so it is still a "no").
"""
from __future__ import annotations

import time
from typing import Any

from evalhost.api import RunError

AUTH_REFUSED = (401, 403)
RETRIES_ON_5XX = 2

RUNNING_GAUGES = {"vllm:num_requests_running": "vllm"}
PROBE_PROMPTS = ["Hi", "Hello"]


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _message(client: Any, response: Any) -> str:
    """An error answer's message: ``error.message`` of a JSON body (llama-cpp-python: ``""``), else the body."""
    try:
        error = response.json().get("error")
        text = error.get("message") if isinstance(error, dict) else error
    except Exception:  # noqa: BLE001 - not JSON: the body itself
        text = response.text
    text = _short(client.redact(str(text if text is not None else "")))
    return f"the message {text!r}" if text else "an empty message"


def probe_prompt_list(client: Any, model: str) -> tuple[bool, str]:
    """(accepted, why): one request carrying two prompts, max_tokens 1."""
    payload = {"model": model, "prompt": list(PROBE_PROMPTS), "max_tokens": 1, "temperature": 0.0}
    for attempt in range(RETRIES_ON_5XX + 1):
        try:
            response = client.client().post(client.base_url + "/v1/completions", json=payload,
                                            timeout=client.deadline_for(payload))
        except Exception as exc:  # noqa: BLE001 - any transport failure is a "no"
            return False, f"a request carrying two prompts failed ({type(exc).__name__})"
        if response.status_code < 500 or attempt == RETRIES_ON_5XX:
            break
        time.sleep(0.5)
    if response.status_code in AUTH_REFUSED:
        raise RunError(f"{client.base_url} refused the request with HTTP {response.status_code} and "
                       f"{_message(client, response)}; check the API key in the environment variable the backend "
                       f"option api_key_env names")
    if response.status_code != 200:
        return False, f"it answers a list of prompts with HTTP {response.status_code} and {_message(client, response)}"
    try:
        choices = response.json()["choices"]
        indices = sorted(c["index"] for c in choices if isinstance(c.get("text"), str))
    except Exception:  # noqa: BLE001
        return False, "its answer to a list of prompts is not a completions object with indexed choices"
    if indices != [0, 1]:
        return False, f"it answers a list of two prompts with choice indices {indices}, not [0, 1]"
    return True, "it answered a list of two prompts with one choice each"


def probe_metrics(client: Any) -> tuple[bool, str | None, str]:
    """(has a running-requests gauge, engine, why) from ``GET /metrics``."""
    try:
        response = client.get("/metrics", timeout=10)
    except Exception as exc:  # noqa: BLE001
        return False, None, f"GET /metrics failed ({type(exc).__name__})"
    if response.status_code != 200:
        return False, None, f"GET /metrics answers HTTP {response.status_code}"
    for line in response.text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in RUNNING_GAUGES:
            return True, RUNNING_GAUGES[name], f"/metrics has {name}"
    return False, None, "/metrics has no running-requests gauge"


def probe_stream(client: Any, model: str) -> tuple[bool, str]:
    """(streams, why): one ``"stream": true`` request of two tokens."""
    payload = {"model": model, "prompt": PROBE_PROMPTS[0], "max_tokens": 2, "temperature": 0.0, "stream": True}
    try:
        response = client.client().post(client.base_url + "/v1/completions", json=payload,
                                        timeout=client.deadline_for(payload))
    except Exception as exc:  # noqa: BLE001
        return False, f"a streaming request failed ({type(exc).__name__})"
    if response.status_code == 200 and any(line.startswith("data:") for line in response.text.splitlines()):
        return True, "it answers stream = true with server-sent events"
    return False, f"it answers stream = true with HTTP {response.status_code} and no server-sent events"


def probe(client: Any, model: str, token_ids: bool) -> dict[str, Any]:
    """The probe's findings: ``prompt_list``, ``token_ids``, ``engine_metrics``, ``engine``, ``stream`` and a
    ``why`` per finding."""
    lists, lists_why = probe_prompt_list(client, model)
    metrics, engine, metrics_why = probe_metrics(client)
    stream, stream_why = probe_stream(client, model)
    return {"prompt_list": lists, "token_ids": bool(token_ids), "engine_metrics": metrics, "engine": engine,
            "stream": stream,
            "why": {"prompt_list": lists_why, "engine_metrics": metrics_why, "stream": stream_why,
                    "token_ids": "it returns token_ids" if token_ids else "it returns no token ids (evalhost "
                                                                          "re-tokenizes the text)"}}


def stable(found: dict[str, Any]) -> dict[str, Any]:
    """The findings that describe the stack (for the fingerprint): no free text."""
    return {k: found.get(k) for k in ("prompt_list", "token_ids", "engine_metrics", "engine", "stream")}
