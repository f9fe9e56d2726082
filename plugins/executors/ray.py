"""``ray`` executor: every ``BackendWork`` of the plan runs in its own Ray actor.

* One actor per (model, backend configuration). The actor owns the backend: it calls
  :func:`evalhost.api.execute_work` and streams each event back to the driver (a Ray streaming generator).
  The driver calls ``on_event`` for every event, in one thread: the driver stays the only writer of the run directory.
* Each actor asks Ray for what its backend declares in :meth:`evalhost.types.Backend.resources`
  (``{"num_gpus": 1}`` -> ``num_gpus=1``; keys other than ``num_cpus``/``num_gpus``/``memory`` become custom
  resources). Actors that do not fit yet wait until an earlier actor finishes and frees its share.
* Faults: an actor whose process dies is restarted by Ray (``max_restarts``, default 3). Ray itself never retries
  the streaming task (``max_task_retries=0``): the driver re-issues it with the keys already received, so the new
  incarnation generates only what is missing -- nothing is delivered twice and nothing is lost.
* Without ``address`` a private Ray instance is started for the run (no dashboard, every server bound to
  127.0.0.1) and shut down at the end; with ``address`` (``evalhost run --executor ray --address HOST:6379``) the
  driver joins an existing cluster and only disconnects at the end.

``ray`` is imported inside methods only, so ``evalhost --help`` and ``evalhost plugins`` never pay for it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from evalhost.api import (Executor, GroupDone, ItemLoader, RunError, UserError, execute_work, hookimpl,
                          plugin_class, worker_context)

MISSING_RAY = ("the ray executor needs Ray; install it with `pip install -e '.[ray]'` (or use --executor local)")
NAMESPACE = "evalhost"
OPTIONS: dict[str, tuple[type, ...]] = {
    "address": (str,),
    "max_restarts": (int,),
    "num_cpus": (int, float),
    "num_gpus": (int, float),
    "object_store_memory": (int,),
}
_RAY_KEYS = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
_ACTOR_CLASS = None
CANCEL_GRACE_S = 60  # how long an interrupted run waits for its actors to close their backends
RESTART_WAIT_S = 900  # how long the driver waits for Ray to bring a lost actor back (it may wait for resources)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(MISSING_RAY) from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on (``ray.init`` would retry for minutes)."""
    import socket

    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto", "ray://..." and friends: leave them to Ray
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise UserError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); check the address printed "
                        f"by `ray start --head` (HOST:6379) or drop --address to start a local Ray") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())) or "nothing"


def work_resources(work, registry=None) -> dict[str, float]:
    """What the work's backend declares (instantiated, not started, with a throw-away context)."""
    cls = registry.get("backend", work.backend.plugin) if registry else plugin_class("backend", work.backend.plugin)
    backend = cls(work.model, work.backend.options, worker_context(Path("."), log=lambda msg: None))
    out = {}
    for key, value in dict(backend.resources() or {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise UserError(f"backend '{work.backend.plugin}' declares resource {key}={value!r}; a resource must "
                            f"be a non-negative number (fix the plugin's resources())")
        if value:
            out[key] = value
    return out


def actor_options(resources: dict[str, float]) -> dict[str, Any]:
    """Backend resources -> ``Actor.options(...)`` keywords."""
    opts: dict[str, Any] = {}
    custom = {}
    for key, value in resources.items():
        if key in _RAY_KEYS:
            opts[key] = value
        else:
            custom[key] = value
    if custom:
        opts["resources"] = custom
    return opts


# ------------------------------------------------------------------------------------------------ worker side
class _WorkActorImpl:
    """The body of the Ray actor (wrapped by :func:`_actor_class`): owns one backend, streams its events."""

    def __init__(self, work, sampling, run_dir: str, study_file: str | None) -> None:
        self.work, self.sampling = work, sampling
        self.run_dir, self.study_file = run_dir, study_file
        self.lines: list[str] = []

    def _log(self, msg: str) -> None:
        self.lines.append(str(msg))
        print(f"[{self.work.label}] {msg}", file=sys.stderr, flush=True)  # stays in the node's Ray worker log

    def _drain(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    def info(self) -> dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "hostname": platform.node(), "pid": os.getpid()}

    def run(self, skip: list[str]):
        yield {"node": self.info()}
        run_dir = Path(self.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)  # on another node: backend logs (server-*.log) land here
        base = Path(self.study_file).parent if self.study_file else None
        context = worker_context(run_dir, log=self._log, load_items=ItemLoader(base))
        for event in execute_work(self.work, self.sampling, context, set(skip)):
            yield {"logs": self._drain(), "event": event}
        lines = self._drain()
        if lines:
            yield {"logs": lines}


def _actor_class(ray):
    """The Ray actor class (built once, at run time, so this module never imports ray at import time)."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        @ray.remote(concurrency_groups={"control": 1})
        class EvalhostWork(_WorkActorImpl):
            @ray.method(concurrency_group="control")
            def info(self):  # answers while run() is streaming (tests use the pid to kill the actor)
                return _WorkActorImpl.info(self)

            def run(self, skip):
                yield from _WorkActorImpl.run(self, skip)

        _ACTOR_CLASS = EvalhostWork
    return _ACTOR_CLASS


def actor_name(run_dir: Path | str, label: str) -> str:
    """The name of the actor that runs work ``label`` of ``run_dir`` (namespace ``evalhost``)."""
    return f"{Path(run_dir).name}:{label}"


# ------------------------------------------------------------------------------------------------ driver side
class _State:
    def __init__(self, work, actor, base: set[str], keys: set[str]) -> None:
        self.work, self.actor, self.base, self.keys = work, actor, base, keys
        self.received: set[str] = set()
        self.reissues = 0
        self.gen = None  # the actor's event stream (an ObjectRefGenerator)
        self.probe = None  # while the actor is being brought back: a pending info() call
        self.lost: Exception | None = None
        self.deadline = 0.0
        self.node: dict[str, Any] | None = None
        self.incarnations: list[tuple[str, int]] = []  # (node id, pid) of every process that ran the actor

    @property
    def restarts(self) -> int:
        return max(0, len(self.incarnations) - 1)

    @property
    def label(self) -> str:
        return self.work.label

    def skip(self) -> list[str]:
        return sorted(self.base | self.received)


@contextlib.contextmanager
def _loopback_only(ray):
    """Make a locally started Ray advertise and bind 127.0.0.1.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is turned into the machine's routable IP by Ray (and then its
    gRPC servers listen on every interface). Ray keeps loopback when it believes clustering is off
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read at import into ``ray_constants.ENABLE_RAY_CLUSTER``): set both
    for the duration of ``ray.init`` (the raylet, GCS and agents inherit the environment), then restore.
    """
    consts = getattr(getattr(ray, "_private", None), "ray_constants", None)
    had_const = consts is not None and hasattr(consts, "ENABLE_RAY_CLUSTER")
    old_const = getattr(consts, "ENABLE_RAY_CLUSTER", None)
    old_env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if had_const:
        consts.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if had_const:
            consts.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = old_env


class RayExecutor(Executor):
    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        for key, value in self.options.items():
            if key not in OPTIONS:
                raise UserError(f"unknown ray executor option '{key}'; known: {', '.join(sorted(OPTIONS))}")
            if value is not None and (not isinstance(value, OPTIONS[key]) or isinstance(value, bool)):
                raise UserError(f"ray executor option '{key}' must be {OPTIONS[key][0].__name__}, not {value!r}")
        self.max_restarts = int(self.options.get("max_restarts") if self.options.get("max_restarts") is not None
                                else 3)
        if self.max_restarts < 0:
            raise UserError(f"ray executor option max_restarts must be 0 or more, not {self.max_restarts}")
        self.ray = _import_ray()  # fail before a run directory is created, with one sentence

    # -- dry run --------------------------------------------------------------------------------
    def describe(self, plan) -> str:
        where = f"Ray cluster at {self.options['address']}" if self.options.get("address") else \
            "a local Ray instance started for this run (127.0.0.1 only)"
        lines = [f"ray: {len(plan.works)} actor(s) on {where}; max_restarts={self.max_restarts}"]
        total: dict[str, float] = {}
        for work in plan.works:
            res = work_resources(work)
            for k, v in res.items():
                total[k] = total.get(k, 0) + v
            n = sum(len(j.keys()) for j in work.jobs)
            lines.append(f"ray: actor {work.label}: {len(work.jobs)} groups, {n} generations, asks {_fmt(res)}")
        lines.append(f"ray: all actors at once would ask {_fmt(total)}; actors that do not fit wait for a "
                     f"finished actor's resources")
        return "\n".join(lines)

    # -- connection -----------------------------------------------------------------------------
    def _connect(self) -> bool:
        """Start or join Ray. Returns True when this call did (so the run shuts it down / disconnects)."""
        ray = self.ray
        if ray.is_initialized():
            return False
        address = self.options.get("address")
        common = {"include_dashboard": False, "log_to_driver": False, "namespace": NAMESPACE,
                  "logging_level": logging.WARNING if address else logging.ERROR}
        try:
            if address:
                _check_reachable(address)
                host = address.rpartition(":")[0].strip("[]")
                if host in ("localhost", "::1") or host.startswith("127."):
                    # a cluster started on this machine with --node-ip-address=127.0.0.1: Ray would otherwise
                    # rewrite 127.0.0.1 to the machine's routable IP, where that cluster does not listen
                    with _loopback_only(ray):
                        ray.init(address=address, _node_ip_address="127.0.0.1", **common)
                else:
                    ray.init(address=address, **common)
                return True
            local = {k: self.options[k] for k in ("num_cpus", "num_gpus", "object_store_memory")
                     if self.options.get(k) is not None}
            # a private instance sees exactly the driver's modules (plugins installed on sys.path included)
            path = os.pathsep.join(p for p in sys.path if p)
            with _loopback_only(ray):
                # address="local": a new instance even where `ray start` left a cluster (ray.init() would join it)
                ray.init(address="local", _node_ip_address="127.0.0.1",
                         runtime_env={"env_vars": {"PYTHONPATH": path}}, **local, **common)
        except ConnectionError as exc:
            raise UserError(f"could not connect to the Ray cluster at {address} ({_first_line(exc)}); check the "
                            f"address printed by `ray start --head` and that this machine has the cluster's auth "
                            f"token (RAY_AUTH_TOKEN), or drop --address to start a local Ray") from None
        return True

    def _check_fits(self, requests: dict[str, dict[str, float]]) -> None:
        """Refuse, instead of waiting forever, an actor that no node of the cluster could ever hold."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        for label, req in requests.items():
            need = {_RAY_KEYS.get(k, k): v for k, v in req.items()}
            if not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
                have = "; ".join(_fmt({k: v for k, v in node.items() if k in ("CPU", "GPU")}) for node in nodes)
                raise UserError(f"backend work '{label}' asks Ray for {_fmt(req)}, which no node of the cluster "
                                f"has (nodes: {have or 'none'}); add a node that has it or run with --executor local")

    # -- run ------------------------------------------------------------------------------------
    def run(self, works, sampling, context, skip, on_event):
        ray = self.ray
        from ray.exceptions import (ObjectLostError, OutOfMemoryError, RayActorError, RayError, RayTaskError,
                                    WorkerCrashedError)

        lost = (RayActorError, WorkerCrashedError, ObjectLostError, OutOfMemoryError)  # the process is gone
        study_file = self._study_file(context)
        todo = []
        for work in works:
            keys = {k for job in work.jobs for k in job.keys()}
            base = keys & set(skip)
            if keys - base:
                todo.append((work, keys, base))
        requests = {w.label: work_resources(w) for w, _, _ in todo}
        started = self._connect()
        states: list[_State] = []
        live: list[_State] = []
        finished = False
        try:
            self._check_fits(requests)
            actor_cls = _actor_class(ray)
            for work, keys, base in todo:
                actor = actor_cls.options(
                    name=actor_name(context.run_dir, work.label), namespace=NAMESPACE,
                    max_restarts=self.max_restarts,
                    max_task_retries=0,  # never replayed by Ray with a stale skip set: re-issued below
                    **actor_options(requests[work.label]),
                ).remote(work, sampling, str(context.run_dir), study_file)
                states.append(_State(work, actor, base, keys))
            for st in states:
                st.gen = st.actor.run.options(num_returns="streaming").remote(st.skip())
            live[:] = states
            while live:
                # a stream (st.gen) or, for an actor being brought back, a probe of its info() (st.probe)
                waiting = {id(st.probe if st.probe is not None else st.gen): st for st in live}
                refs = [st.probe if st.probe is not None else st.gen for st in live]
                ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
                for ref in ready:
                    st = waiting[id(ref)]
                    if st.probe is not None:
                        self._probe_answered(st, context)
                        continue
                    try:
                        item = ray.get(next(st.gen))
                    except StopIteration:
                        live.remove(st)
                        missing = st.keys - st.base - st.received
                        if missing:  # execute_work skips nothing it was asked for; this would be a bug
                            raise RunError(f"the Ray actor of '{st.label}' finished without {len(missing)} "
                                           f"generations (e.g. {sorted(missing)[0]}); resume with --resume")
                        ray.kill(st.actor, no_restart=True)  # free its resources for the actors still waiting
                        continue
                    except lost as exc:
                        self._lost(st, exc)
                        continue
                    except RayTaskError as exc:
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, (UserError, RunError)):
                            raise cause from None
                        raise RunError(f"backend work '{st.label}' failed in its Ray actor: "
                                       f"{type(cause or exc).__name__}: {_first_line(cause or exc)}") from None
                    except RayError as exc:  # Ray itself failed (e.g. the cluster went away)
                        raise RunError(f"Ray failed while running '{st.label}': {type(exc).__name__}: "
                                       f"{_first_line(exc)}") from None
                    if "node" in item:
                        st.node = item["node"]
                        who = (st.node.get("node_id"), st.node.get("pid"))
                        if who not in st.incarnations:
                            st.incarnations.append(who)
                    for line in item.get("logs", ()):
                        context.log(line)
                    event = item.get("event")
                    if event is None:
                        continue
                    if isinstance(event, GroupDone):
                        keys = event.job.keys()
                        if all(k in st.received or k in st.base for k in keys):
                            continue  # already delivered by an earlier incarnation of the actor
                        st.received.update(keys)
                    on_event(event)
            finished = True
        finally:
            if not finished:
                self._cancel(live, context)
            for st in states:
                with contextlib.suppress(Exception):
                    ray.kill(st.actor, no_restart=True)
            if started:
                ray.shutdown()
        facts: dict[str, Any] = {
            "executor": "ray", "ray_version": ray.__version__,
            "address": self.options.get("address") or "local",
            "max_restarts": self.max_restarts,
            "nodes": {st.label: {k: v for k, v in (st.node or {}).items() if k != "pid"} for st in states},
            "resources": requests,
        }
        restarts = {st.label: st.restarts for st in states if st.restarts}
        if restarts:
            facts["restarts"] = restarts
        return facts

    def _cancel(self, live: list[_State], context) -> None:
        """Stopping early (an error, Ctrl-C, SIGTERM): cancel the streams so that each actor leaves execute_work
        through its ``finally`` (the backend closes: a managed server is stopped, not orphaned), then return;
        the caller kills the actors. Bounded by CANCEL_GRACE_S."""
        ray = self.ray
        streams = [st for st in live if st.gen is not None]
        if not streams:
            return
        context.log(f"ray: stopping {len(streams)} actor(s); their backends are closed first")
        for st in streams:
            with contextlib.suppress(Exception):
                ray.cancel(st.gen)
        deadline = time.monotonic() + CANCEL_GRACE_S
        for st in streams:
            while time.monotonic() < deadline:
                ready, _ = ray.wait([st.gen], num_returns=1, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                if not ready:
                    continue
                try:
                    ray.get(next(st.gen))
                except Exception:  # StopIteration, TaskCancelledError, a dead actor: this stream is over
                    break

    def _lost(self, st: _State, exc: Exception) -> None:
        """The actor's stream broke (its process died, or it is unreachable): probe until Ray has it back.

        Never blocks: the other actors' streams keep flowing (and finished actors keep being released, which may
        be what frees the resources the restarted actor waits for)."""
        st.reissues += 1
        st.lost = exc
        if st.reissues > 2 * self.max_restarts + 1:  # bounded even when the stream fails with the actor alive
            raise RunError(f"the Ray actor of '{st.label}' failed {st.reissues} times (max_restarts="
                           f"{self.max_restarts}; last: {type(exc).__name__}: {_first_line(exc)}); "
                           f"resume with --resume")
        st.deadline = time.monotonic() + RESTART_WAIT_S
        st.gen, st.probe = None, st.actor.info.remote()

    def _probe_answered(self, st: _State, context) -> None:
        from ray.exceptions import ActorDiedError, RayError

        ray = self.ray
        try:
            ray.get(st.probe)
        except ActorDiedError as died:  # no restart left (or its node is gone for good)
            raise RunError(f"the Ray actor of '{st.label}' died and Ray will not restart it (max_restarts="
                           f"{self.max_restarts}; {type(died).__name__}: {_first_line(died)}); "
                           f"resume with --resume") from None
        except RayError:  # still restarting (ActorUnavailableError), or the probe itself was lost: ask again
            if time.monotonic() > st.deadline:
                raise RunError(f"the Ray actor of '{st.label}' did not come back within {RESTART_WAIT_S} s after "
                               f"{type(st.lost).__name__}; resume with --resume") from None
            time.sleep(0.05)
            st.probe = st.actor.info.remote()
            return
        remaining = len(st.keys - st.base - st.received)
        context.log(f"ray: the actor of {st.label} was lost ({type(st.lost).__name__}) and is back; its "
                    f"{remaining} unfinished generations are re-issued")
        st.probe = None
        st.gen = st.actor.run.options(num_returns="streaming").remote(st.skip())

    @staticmethod
    def _study_file(context) -> str | None:
        """The study file's path (relative task paths resolve against it), from the run's manifest."""
        try:
            manifest = json.loads((Path(context.run_dir) / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        return manifest.get("study_file")


@hookimpl
def register_executors(register):
    register("ray", RayExecutor)
