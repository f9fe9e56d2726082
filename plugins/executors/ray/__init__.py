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

The parts, one module each:

* :mod:`.executor`: :class:`RayExecutor` -- its options, the ``--dry-run`` plan, one run from start to facts;
* :mod:`.connect`: start a private Ray on 127.0.0.1 or join a cluster at ``address`` (and the sentences when not);
* :mod:`.resources`: what a backend asks for, as ``Actor.options`` keywords, and the check that some node has it;
* :mod:`.actor`: the worker side, the actor that owns one backend and streams its events;
* :mod:`.relay`: the driver side of those streams -- deliver each group once, bring a lost actor back and re-issue
  what it had not finished, close the backends when the run stops early.

``ray`` is imported inside functions only, so ``evalhost --help`` and ``evalhost plugins`` never pay for it.
"""
from __future__ import annotations

from evalhost.api import hookimpl

from .actor import actor_name
from .connect import MISSING_RAY, NAMESPACE
from .executor import OPTIONS, RayExecutor
from .relay import CANCEL_GRACE_S, RESTART_WAIT_S
from .resources import actor_options, work_resources

__all__ = ["RayExecutor", "OPTIONS", "MISSING_RAY", "NAMESPACE", "CANCEL_GRACE_S", "RESTART_WAIT_S", "actor_name",
           "actor_options", "work_resources", "register_executors"]


@hookimpl
def register_executors(register):
    register("ray", RayExecutor)
