"""The plugin manager factory. Never built at import time: ``jam`` must start fast."""

from __future__ import annotations

import importlib
import os

import pluggy

from jam_core import PROJECT, hookspecs

# Built-in plugins, registered by explicit name (the core never imports them directly).
BUILTIN_PLUGINS = (
    "jam_core.defaults",
    "jam_dir",
    "jam_sftp",
    "jam_age",
    "jam_lru",
    "jam_budget",
    "jam_related",
)

ENV_BLOCK = "JAM_BLOCK_PLUGINS"  # comma-separated plugin names never to load
ENV_LOAD = "JAM_LOAD_PLUGINS"  # if set, only these entry-point plugins load ("" = none)


def _names(value: str | None) -> set[str]:
    return {n.strip() for n in (value or "").split(",") if n.strip()}


def make_plugin_manager(extra: tuple = (), load_entrypoints: bool = True) -> pluggy.PluginManager:
    """Build jam's plugin manager.

    Blocks the plugins named in ``$JAM_BLOCK_PLUGINS``, registers the built-ins by name, loads
    third-party plugins from the ``jam`` entry-point group (limited to ``$JAM_LOAD_PLUGINS``
    when that is set), registers ``extra`` plugin objects (tests), then ``check_pending()``
    catches misspelled hook names.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in _names(os.environ.get(ENV_BLOCK)):
        pm.set_blocked(name)
    for modname in BUILTIN_PLUGINS:
        if pm.is_blocked(modname):
            continue
        pm.register(importlib.import_module(modname), name=modname)
    if load_entrypoints:
        only = os.environ.get(ENV_LOAD)
        if only is None:
            pm.load_setuptools_entrypoints(PROJECT)
        else:
            for name in _names(only):
                pm.load_setuptools_entrypoints(PROJECT, name=name)
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    return pm


def plugin_info(pm: pluggy.PluginManager) -> list[dict]:
    """Each plugin with its hooks and version, for ``jam plugins``."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda np: np[0]):
        if plugin is None:
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or ())
        dist = dists.get(id(plugin))
        out.append(
            {
                "name": name,
                "hooks": hooks,
                "version": dist.version if dist is not None else None,
                "builtin": name in BUILTIN_PLUGINS,
            }
        )
    return out
