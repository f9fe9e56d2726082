"""Built-in plugins (backends, dispatchers, scorers, task sources, executors).

The registry lives in :mod:`evalhost.registry`; its two entry functions are re-exported here for convenience.
"""
from evalhost.registry import DEFAULT_PLUGINS, build_registry, get_registry  # noqa: F401
