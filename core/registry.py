"""Plugin loading: built-ins first (the same way as third-party plugins), then the ``evalhost`` entry points.

A plugin that fails to import or implements a misspelled hook is recorded as a *problem* (naming the plugin and its
distribution) and left out; the rest keep working. ``evalhost plugins`` lists every plugin with the hooks it
implements, and the problems.

**One collision rule for every kind.** When two plugins register the same name for the same kind (two scorers
``refusal``, two backends ``vllm``), neither owns the bare name: a study that uses it is refused with one sentence
that says how to pick one, ``distribution:name`` (e.g. ``scorer = "evalhost-dup:refusal"``; the plugin's entry-point
name works too). A contested name the study does not use is only a warning. Every registered name can always be
written qualified.

``EVALHOST_LOAD_PLUGINS=a,b`` loads only those third-party plugins (entry-point or distribution names; empty: none);
the built-ins always load. ``EVALHOST_PLUGINS=default`` is the older spelling of ``EVALHOST_LOAD_PLUGINS=``.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, UserError
from .options import did_you_mean

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
    entries: dict[tuple[str, str], Entry] = field(default_factory=dict)  # names registered once
    contested: dict[tuple[str, str], list[Entry]] = field(default_factory=dict)  # names two plugins registered
    problems: list[str] = field(default_factory=list)
    plugins: list[dict[str, Any]] = field(default_factory=list)  # name, distribution, version, hooks

    def names(self, kind: str) -> list[str]:
        return sorted({name for (k, name) in [*self.entries, *self.contested] if k == kind})

    def find(self, kind: str, name: str) -> Entry | None:
        """The entry ``name`` (bare, or qualified ``distribution:name`` / ``plugin:name``) picks, or None when it
        picks none or a contested one."""
        if (kind, name) in self.entries:
            return self.entries[(kind, name)]
        qualifier, sep, bare = name.partition(":")
        if not sep:
            return None
        found = [e for e in self._all(kind, bare) if qualifier in (e.distribution, e.plugin)]
        return found[0] if len(found) == 1 else None

    def _all(self, kind: str, name: str) -> list[Entry]:
        if (kind, name) in self.contested:
            return self.contested[(kind, name)]
        return [self.entries[(kind, name)]] if (kind, name) in self.entries else []

    def get(self, kind: str, name: str) -> type:
        """The class ``name`` picks for ``kind``; an unknown or contested name is one sentence (UserError)."""
        entry = self.find(kind, name)
        if entry is not None:
            return entry.cls
        what = kind.replace("_", " ")
        if (kind, name) in self.contested:
            raise PluginError(contested_sentence(kind, name, self.contested[(kind, name)]))
        known = self.names(kind)
        msg = f"unknown {what} '{name}'{did_you_mean(name, known)}; known: {', '.join(known) or 'none'}"
        why = next((p for p in self.problems if f"'{name}'" in p), None)
        if why:
            msg += f"; note: {why}"
        raise UserError(msg)

    def entry(self, kind: str, name: str) -> Entry:
        self.get(kind, name)
        return self.find(kind, name)  # type: ignore[return-value]

    def is_qualifier(self, word: str) -> bool:
        """Whether ``word`` names a distribution or plugin, as in ``distribution:name``."""
        return any(word in (p["name"], p["distribution"]) for p in self.plugins)


def _qualifier(entry: Entry, rivals: list[Entry]) -> str:
    same_dist = sum(e.distribution == entry.distribution for e in rivals) > 1
    return entry.plugin if same_dist else entry.distribution


def contested_sentence(kind: str, name: str, rivals: list[Entry]) -> str:
    what = kind.replace("_", " ")
    who = " and ".join(f"plugin '{e.plugin}' (distribution {e.distribution})" for e in rivals)
    picks = " or ".join(f"'{_qualifier(e, rivals)}:{name}'" for e in rivals)
    return (f"{what} '{name}' is registered by {who}; name the one you mean as {picks} in the study (or "
            f"uninstall one of them)")


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
                new = Entry(_kind, name, cls, plugin_name, dist, version)
                if key in registry.entries or key in registry.contested:
                    rivals = registry.contested.setdefault(key, [])
                    if key in registry.entries:
                        rivals.append(registry.entries.pop(key))
                    first = rivals[0]
                    rivals.append(new)
                    registry.problems.append(
                        f"{_kind.replace('_', ' ')} '{name}' from plugin '{plugin_name}' (distribution {dist}) is "
                        f"also registered by plugin '{first.plugin}' (distribution {first.distribution}); a study "
                        f"that uses '{name}' must name one: " + " or ".join(
                            f"'{_qualifier(e, rivals)}:{name}'" for e in rivals))
                    return
                registry.entries[key] = new

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
    except ValueError as exc:  # the same module or plugin name twice (two entry points of one module)
        registry.problems.append(f"plugin '{name}' (distribution {dist}) was not loaded: {exc}")
        return
    _collect(registry, pm, plugin, name, dist)
    hooks = sorted(h.name for h in (pm.get_hookcallers(plugin) or []))
    registry.plugins.append({"name": name, "distribution": dist, "version": _version(dist), "hooks": hooks})


def load_filter() -> set[str] | None:
    """The third-party plugins to load: the names in ``EVALHOST_LOAD_PLUGINS`` (comma-separated entry-point or
    distribution names; set but empty = none), an empty set for ``EVALHOST_PLUGINS=default``, None = all."""
    raw = os.environ.get("EVALHOST_LOAD_PLUGINS")
    if raw is not None:
        return {n.strip() for n in raw.split(",") if n.strip()}
    if os.environ.get("EVALHOST_PLUGINS", "") == "default":
        return set()
    return None


def build_registry(entry_points: bool = True) -> Registry:
    """Load the built-in plugins, then (unless ``entry_points`` is False) the entry points of group ``evalhost``
    that :func:`load_filter` lets through."""
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
    wanted = load_filter()
    if entry_points and wanted != set():
        seen: set[str] = set()
        for ep in md.entry_points(group="evalhost"):
            dist = ep.dist.name if ep.dist is not None else "unknown"
            if wanted is not None and ep.name not in wanted and dist not in wanted:
                continue
            seen |= {ep.name, dist}
            try:
                plugin = ep.load()
            except Exception as exc:
                registry.problems.append(
                    f"plugin '{ep.name}' (distribution {dist}) failed to import: {type(exc).__name__}: {exc}; "
                    f"reinstall it or `pip uninstall {dist}`"
                )
                continue
            _register(registry, pm, plugin, ep.name, dist)
        for name in sorted((wanted or set()) - seen):
            registry.problems.append(f"EVALHOST_LOAD_PLUGINS names '{name}', which no installed plugin is; list "
                                     f"entry-point or distribution names from `evalhost plugins`")
    registry.pm = pm  # type: ignore[attr-defined]
    return registry


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY


def require_clean(registry: Registry, names: dict[str, set[str]]) -> None:
    """Stop with one sentence if a (kind, name) the study uses is unknown or contested (the collision rule);
    problems with names the study does not use are left as warnings."""
    for kind, used in names.items():
        for name in sorted(used):
            registry.get(kind, name)
