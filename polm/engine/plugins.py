"""The plugin manager: built-in paradigms first, then third-party distributions.

Third-party plugins are distributions that declare an entry point in the
group ``polm``::

    [project.entry-points.polm]
    my_plugin = "my_package.plugin"

Set ``POLM_DISABLE_PLUGIN_AUTOLOAD=1`` to skip them. A plugin that fails to
import or raises inside a hook is reported by name (:func:`plugin_problems`)
and the others keep working.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy

from polm.engine import hookspecs
from polm.engine.errors import PluginError
from polm.engine.registry import COMPONENT_KINDS, Registry

DEFAULT_PLUGINS: tuple[str, ...] = (
    "polm.modalities",
    "polm.adapters",
    "polm.plugins.finetuning",
    "polm.plugins.alignment",
    "polm.plugins.reasoning",
    "polm.plugins.efficiency",
    "polm.plugins.integration",
    "polm.apps",
)
ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
AUTOLOAD_SWITCH = "POLM_DISABLE_PLUGIN_AUTOLOAD"


@dataclass
class PluginInfo:
    """What ``polm plugins`` shows for one plugin."""

    name: str
    source: str  # "built-in", "entry point <dist>==<version>", or "registered at runtime"
    contributes: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class PluginState:
    """The manager, where its plugins came from, and what they contributed."""

    manager: pluggy.PluginManager
    sources: dict[str, str]
    import_problems: list[str]
    registries: dict[str, Registry[Any]] = field(default_factory=dict)
    hook_problems: list[str] = field(default_factory=list)
    collected_for: list[object] = field(default_factory=list)

    def describe(self) -> list[PluginInfo]:
        """Every plugin with its source and the components it registered."""
        infos = {
            name: PluginInfo(name, self.sources.get(name, "registered at runtime"))
            for name, _ in self.manager.list_name_plugin()
        }
        for kind, registry in self.registries.items():
            for entry in registry.entries():
                info = infos.setdefault(entry.plugin, PluginInfo(entry.plugin, "registered at runtime"))
                info.contributes.setdefault(kind, []).append(entry.name)
        return list(infos.values())


_state: PluginState | None = None
_lock = threading.RLock()


def _new_state() -> PluginState:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    sources: dict[str, str] = {}
    problems: list[str] = []
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)  # a broken built-in is a bug, not user input
        manager.register(module, name=module_name)
        sources[module_name] = "built-in"
    if os.environ.get(AUTOLOAD_SWITCH, "") not in ("1", "true", "True", "yes"):
        _load_entry_points(manager, sources, problems)
    manager.check_pending()
    return PluginState(manager, sources, problems)


def _load_entry_points(manager: pluggy.PluginManager, sources: dict[str, str], problems: list[str]) -> None:
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if manager.get_plugin(entry_point.name) is not None:
            continue
        dist = entry_point.dist
        where = f"entry point {dist.name}=={dist.version}" if dist is not None else "entry point"
        try:
            plugin = entry_point.load()
        except Exception as error:  # an import-time failure must not take the other plugins down
            problems.append(f'Error importing plugin "{entry_point.name}": {type(error).__name__}: {error}')
            continue
        manager.register(plugin, name=entry_point.name)
        sources[entry_point.name] = where


def _collect(manager: pluggy.PluginManager) -> tuple[dict[str, Registry[Any]], list[str]]:
    """Call every ``polm_register_*`` hook of every plugin and fill the registries.

    Hooks are called one plugin at a time so that an exception is attributed
    to the plugin that raised it and the other plugins still register.
    """
    registries: dict[str, Registry[Any]] = {kind: Registry(kind) for kind in COMPONENT_KINDS}
    problems: list[str] = []
    for kind in COMPONENT_KINDS:
        hook_name = f"polm_register_{kind}"
        # get_hookimpls() is in registration order: built-ins register first and keep their names.
        for impl in getattr(manager.hook, hook_name).get_hookimpls():

            def register(name: str, obj: Any, _plugin: str = impl.plugin_name, _kind: str = kind, **meta: Any):
                registries[_kind].add(name, obj, _plugin, **meta)

            try:
                impl.function(register=register)
            except Exception as error:
                problems.append(f'Error in plugin "{impl.plugin_name}" ({hook_name}): {type(error).__name__}: {error}')
    return registries, problems


def state() -> PluginState:
    """The process-wide plugin state with up-to-date registries.

    Plugins registered or unregistered at runtime (``plugin_manager().register(obj,
    name=...)``) are picked up on the next call.
    """
    global _state
    with _lock:
        if _state is None:
            _state = _new_state()
        # Compare the plugin objects themselves: holding them keeps a new plugin from reusing an old id().
        plugins = list(_state.manager.get_plugins())
        if len(plugins) != len(_state.collected_for) or any(
            not any(plugin is seen for seen in _state.collected_for) for plugin in plugins
        ):
            _state.registries, _state.hook_problems = _collect(_state.manager)
            _state.collected_for = plugins
        return _state


def registry(kind: str) -> Registry[Any]:
    """The registry for one component kind (see ``COMPONENT_KINDS``)."""
    registries = state().registries
    if kind not in registries:
        raise PluginError(f"unknown component kind '{kind}'; choose one of: {', '.join(COMPONENT_KINDS)}")
    return registries[kind]


def plugin_manager() -> pluggy.PluginManager:
    """The pluggy manager that hosts every polm plugin."""
    return state().manager


def plugin_problems() -> list[str]:
    """One line per plugin that failed to import or raised inside a hook."""
    current = state()
    return current.import_problems + current.hook_problems


def components(kind: str) -> dict[str, Any]:
    """Registered components of ``kind`` by name, e.g. ``components("rewards")``."""
    return registry(kind).as_dict()


def plugins_report() -> dict[str, Any]:
    """What ``polm plugins --json`` prints and the app's Plugins tab shows.

    Returns:
        ``{"plugins": [{name, source, contributes: {kind: [names]}}], "domains": [{name, plugin, description,
        datasets, recipe, metrics, tokenizer}], "problems": [lines]}`` (:func:`polm.engine.domains.describe_domains`).
    """
    from polm.engine.domains import describe_domains  # domains reads the registries of this module

    domains, domain_problems = describe_domains()
    return {"plugins": [dict(info.__dict__) for info in state().describe()], "domains": domains,
            "problems": plugin_problems() + domain_problems}
