"""Start a private Ray instance for the run (127.0.0.1 only) or join a cluster at ``address``; refuse with one
sentence when Ray is missing or nobody answers."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

from evalhost.api import UserError

from .relay import first_line

MISSING_RAY = ("the ray executor needs Ray; install it with `pip install -e '.[ray]'` (or use --executor local)")
NAMESPACE = "evalhost"


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(MISSING_RAY) from None
    return ray


def check_reachable(address: str) -> None:
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


@contextlib.contextmanager
def loopback_only(ray):
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


def connect(ray, options: dict[str, Any]) -> bool:
    """Start or join Ray. Returns True when this call did (so the run shuts it down / disconnects)."""
    if ray.is_initialized():
        return False
    address = options.get("address")
    common = {"include_dashboard": False, "log_to_driver": False, "namespace": NAMESPACE,
              "logging_level": logging.WARNING if address else logging.ERROR}
    try:
        if address:
            check_reachable(address)
            host = address.rpartition(":")[0].strip("[]")
            if host in ("localhost", "::1") or host.startswith("127."):
                # a cluster started on this machine with --node-ip-address=127.0.0.1: Ray would otherwise
                # rewrite 127.0.0.1 to the machine's routable IP, where that cluster does not listen
                with loopback_only(ray):
                    ray.init(address=address, _node_ip_address="127.0.0.1", **common)
            else:
                ray.init(address=address, **common)
            return True
        local = {k: options[k] for k in ("num_cpus", "num_gpus", "object_store_memory")
                 if options.get(k) is not None}
        # a private instance sees exactly the driver's modules (plugins installed on sys.path included)
        path = os.pathsep.join(p for p in sys.path if p)
        with loopback_only(ray):
            # address="local": a new instance even where `ray start` left a cluster (ray.init() would join it)
            ray.init(address="local", _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": {"PYTHONPATH": path}}, **local, **common)
    except ConnectionError as exc:
        raise UserError(f"could not connect to the Ray cluster at {address} ({first_line(exc)}); check the "
                        f"address printed by `ray start --head` and that this machine has the cluster's auth "
                        f"token (RAY_AUTH_TOKEN), or drop --address to start a local Ray") from None
    return True
