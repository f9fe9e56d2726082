"""A started backend's capabilities against the dispatchers it is about to serve.

:func:`evalhost.plan.check_plugins` compares a dispatcher's ``requires`` with the backend *class*'s
``capabilities`` before anything starts. Some backends only learn what their endpoint can do once it answers: the
``openai`` backend probes it at start (``plugins/backends/capabilities.py``) and drops ``prompt_list`` when the
server refuses a list of prompts (llama-cpp-python's server answers HTTP 500). :func:`check_started` runs right
after the backend started and before its first group, and refuses a study whose dispatcher needs what the endpoint
lacks with one sentence that names a dispatcher that would work there.
"""
from __future__ import annotations

from typing import Any, Iterable

from .errors import UserError
from .types import CONCURRENT, CONTINUOUS, PROMPT_LIST

# what each capability lets a dispatcher do, in words
WORDS = {PROMPT_LIST: "a list of prompts in one request", CONCURRENT: "concurrent single-prompt requests",
         CONTINUOUS: "requests joining a running batch"}
# the built-in dispatcher to suggest, in order of preference, and what it needs
ALTERNATIVES = (("synchronized", frozenset({CONCURRENT})), ("prompt_list", frozenset({PROMPT_LIST})))


def alternative(capabilities: Iterable[str], exclude: str) -> str | None:
    caps = set(capabilities)
    for name, needs in ALTERNATIVES:
        if name != exclude and needs <= caps:
            return name
    return None


def check_started(backend: Any, dispatchers: Iterable[Any], registry: Any, backend_label: str) -> None:
    """UserError when a dispatcher (a :class:`~evalhost.study.DispatcherConfig`: ``label``, ``plugin``) needs a
    capability the started ``backend`` does not have (its instance ``capabilities``, narrowed by a probe)."""
    caps = set(getattr(backend, "capabilities", ()) or ())
    why = ((getattr(backend, "probed_capabilities", None) or {}).get("why") or {})
    seen = set()
    for d in dispatchers:
        if d.plugin in seen or d.plugin == "solo":
            continue
        seen.add(d.plugin)
        need = set(getattr(registry.get("dispatcher", d.plugin), "requires", ()) or ()) - caps
        if not need:
            continue
        missing = sorted(need)[0]
        where = getattr(backend, "base_url", None) or f"backend '{backend_label}'"
        reason = f" ({why[missing]})" if isinstance(why.get(missing), str) else ""
        alt = alternative(caps, d.plugin)
        fix = (f"use dispatcher '{alt}' instead" if alt else "drop this dispatcher") + " in the study file"
        raise UserError(f"dispatcher '{d.label}' needs {WORDS.get(missing, missing)}, which {where} does not "
                        f"accept{reason}; {fix}")
