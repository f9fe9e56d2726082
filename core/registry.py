"""Plugin loading: built-ins first (the same way as third-party plugins), then the ``evalhost`` entry points.

A plugin that fails to import, implements a misspelled hook, or registers a name another plugin already has is
recorded as a *problem* (naming the plugin and its distribution) and left out; the rest keep working.
``evalhost plugins`` lists problems; ``evalhost run`` prints them and stops only if the study needs the name.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, UserError

KINDS = ("backend", "dispatcher", "scorer", "task_source", "executor")

DEFAULT_PLUGINS = (
    "evalhost.plugins.backends.hf",
    "evalhost.plugins.backends.vllm",
    "evalhost.plugins.backends.openai",
    "evalhost.plugins.dispatchers.solo",
    "evalhost.plugins.dispatchers.synchronized",
    "evalhost.plugins.dispatchers.prompt_list",
    "evalhost.plugins.dispatchers.continuous",
    "evalhost.plugins.scorers.refusal",
    "evalhost.plugins.scorers.mcq",
    "evalhost.plugins.scorers.bbq",
    "evalhost.plugins.scorers.truthfulqa",
    "evalhost.plugins.task_sources.files",
    "evalhost.plugins.task_sources.hf_datasets",
    "evalhost.plugins.task_sources.candidates",
    "evalhost.plugins.executors.local",
    "evalhost.plugins.executors.ray",
)

BUILTIN_DIST = "evalhost"


@dataclass
class Entry:
    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str
    version: str


@dataclass
class Registry:
    entries: dict[tuple[str, str], Entry] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    plugins: list[dict[str, Any]] = field(default_factory=list)

    def names(self, kind: str) -> list[str]:
        return sorted(name for (k, name) in self.entries if k == kind)

    def get(self, kind: str, name: str) -> type:
        entry = self.entries.get((kind, name))
        if entry is None:
            known = self.names(kind)
            hint = difflib.get_close_matches(name, known, n=1)
            why = next((p for p in self.problems if f"'{name}'" in p), None)
            msg = f"unknown {kind.replace('_', ' ')} '{name}'"
            if hint:
                msg += f" (did you mean '{hint[0]}'?)"
            msg += f"; known: {', '.join(known) or 'none'}"
            if why:
                msg += f"; note: {why}"
            raise UserError(msg)
        return entry.cls

    def entry(self, kind: str, name: str) -> Entry:
        self.get(kind, name)
        return self.entries[(kind, name)]


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        from . import __version__

        return __version__ if dist == BUILTIN_DIST else "unknown"


def _collect(registry: Registry, pm: pluggy.PluginManager, plugin: object, plugin_name: str, dist: str) -> None:
    version = _version(dist)
    hooks = {
        "backend": pm.hook.register_backends,
        "dispatcher": pm.hook.register_dispatchers,
        "scorer": pm.hook.register_scorers,
        "task_source": pm.hook.register_task_sources,
        "executor": pm.hook.register_executors,
    }
    for kind, hook in hooks.items():
        impls = [i for i in hook.get_hookimpls() if i.plugin is plugin]
        for impl in impls:
            def register(name: str, cls: type, _kind: str = kind) -> None:
                key = (_kind, name)
                if key in registry.entries:
                    other = registry.entries[key]
                    registry.problems.append(
                        f"{_kind.replace('_', ' ')} '{name}' from plugin '{plugin_name}' (distribution {dist}) "
                        f"is already registered by plugin '{other.plugin}' (distribution {other.distribution}); "
                        f"uninstall one of them or rename the plugin's {_kind.replace('_', ' ')}"
                    )
                    return
                registry.entries[key] = Entry(_kind, name, cls, plugin_name, dist, version)

            impl.function(register=register)


def _register(registry: Registry, pm: pluggy.PluginManager, plugin: object, name: str, dist: str) -> None:
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        try:
            pm.unregister(plugin)
        except ValueError:
            pass
        registry.problems.append(
            f"plugin '{name}' (distribution {dist}) implements a hook evalhost does not define ({exc}); "
            f"check the hook's spelling against evalhost.hookspecs"
        )
        return
    _collect(registry, pm, plugin, name, dist)
    registry.plugins.append({"name": name, "distribution": dist, "version": _version(dist)})


def build_registry(entry_points: bool = True) -> Registry:
    """Load the built-in plugins, then (unless disabled) every entry point in the ``evalhost`` group.

    ``EVALHOST_PLUGINS=default`` loads only the built-ins (useful to rule out a broken third-party plugin).
    """
    pm = pluggy.PluginManager("evalhost")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    for module_name in DEFAULT_PLUGINS:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # a built-in that cannot import is listed, the rest keep working
            registry.problems.append(
                f"plugin '{module_name}' (distribution {BUILTIN_DIST}) failed to import: {type(exc).__name__}: {exc}"
            )
            continue
        _register(registry, pm, module, module_name, BUILTIN_DIST)
    if entry_points and os.environ.get("EVALHOST_PLUGINS", "") != "default":
        for ep in md.entry_points(group="evalhost"):
            dist = ep.dist.name if ep.dist is not None else "unknown"
            try:
                plugin = ep.load()
            except Exception as exc:
                registry.problems.append(
                    f"plugin '{ep.name}' (distribution {dist}) failed to import: {type(exc).__name__}: {exc}; "
                    f"reinstall it or `pip uninstall {dist}`"
                )
                continue
            _register(registry, pm, plugin, ep.name, dist)
    registry.pm = pm  # type: ignore[attr-defined]
    return registry


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY


def require_clean(registry: Registry, names: dict[str, set[str]]) -> None:
    """Stop with a PluginError if a problem concerns a (kind, name) the study uses."""
    for kind, used in names.items():
        for name in used:
            if (kind, name) not in registry.entries:
                registry.get(kind, name)  # raises UserError with did-you-mean
    for problem in registry.problems:
        for kind, used in names.items():
            for name in used:
                if f"'{name}' from plugin" in problem:
                    raise PluginError(problem)
