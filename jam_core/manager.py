"""The plugin manager factory. Never built at import time: ``jam`` must start fast."""

from __future__ import annotations

import importlib
import os
import re
import stat
import types

import pluggy

from jam_core import PROJECT, hookspecs

# Built-in plugins, registered by explicit name (the core never imports them directly).
BUILTIN_PLUGINS = (
    "jam_core.placement",
    "jam_dir",
    "jam_sftp",
    "jam_rclone",
    "jam_age",
    "jam_lru",
    "jam_budget",
    "jam_related",
)

# Enough to fetch in a root whose remotes are all built-in ``dir`` ones (the cd hook's fetch).
DIR_ONLY = ("jam_core.placement", "jam_dir")
DIR_KIND = "dir"
BUILTIN_POLICIES = frozenset({"age", "lru", "budget", "related"})  # [policy.NAME] of the built-ins

ENV_BLOCK = "JAM_BLOCK_PLUGINS"  # comma-separated plugin names never to load
ENV_LOAD = "JAM_LOAD_PLUGINS"  # if set, only these entry-point plugins load ("" = none)


def _names(value: str | None) -> set[str]:
    return {n.strip() for n in (value or "").split(",") if n.strip()}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no message"
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}"


def _unknown_hooks(pm: pluggy.PluginManager, plugin) -> list[str]:
    """Hooks ``plugin`` implements that no spec declares (a misspelled name), unless optional."""
    out = []
    for caller in pm.get_hookcallers(plugin) or ():
        if caller.has_spec():
            continue
        if any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()):
            out.append(caller.name)
    return sorted(out)


def _check_one(pm: pluggy.PluginManager, plugin, name: str) -> None:
    """Raise PluginValidationError if ``plugin`` (just registered) has a misspelled hook."""
    unknown = _unknown_hooks(pm, plugin)
    if unknown:
        raise pluggy.PluginValidationError(
            plugin, f"unknown hook {unknown[0]!r} in plugin {name!r} (known hooks: see jam_core.hookspecs)")


ENTRY_POINTS = "entry_points.txt"
_EP_CAP = 1 << 20  # an entry_points.txt larger than this is handed to importlib.metadata unread


def _names_jam(data: bytes) -> bool:
    """True if an ``entry_points.txt`` may declare the ``jam`` group: a line that is, once
    stripped, ``[...]`` naming it, as importlib.metadata reads a section (``value.strip('[]')``);
    spaces and case are let through too (one loaded for nothing costs only time)."""
    if b"jam" not in data.lower():
        return False
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]") and line.strip("[] \t").lower() == PROJECT:
            return True
    return False


def _declares_jam(path: str) -> bool:
    """Whether the ``entry_points.txt`` in the dist-info directory ``path`` may declare the
    ``jam`` group. Opened without blocking and read only if it is a regular file (a FIFO planted
    there is passed over, not waited on); one too large to read is taken as declaring it."""
    try:
        fd = os.open(os.path.join(path, ENTRY_POINTS), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # none (most distributions), or the egg-info is a file
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        if st.st_size > _EP_CAP:
            return True
        return _names_jam(os.read(fd, _EP_CAP + 1))
    except OSError:
        return False
    finally:
        os.close(fd)


def _normalized(low: str) -> str:
    """A distribution's name from its ``*.dist-info`` directory name (importlib.metadata's
    grouping key: ``Prepared.normalize`` of the part before the version)."""
    return re.sub(r"[-_.]+", "-", low.rpartition(".")[0].partition("-")[0]).replace("-", "_")


def jam_distribution_paths() -> list[str] | None:
    """The ``*.dist-info`` / ``*.egg-info`` directories on ``sys.path`` whose
    ``entry_points.txt`` may name the ``jam`` group, in the order importlib.metadata's
    ``distributions()`` yields them (path by path; within one, grouped by name in listing
    order). Reading those small files alone spares importing importlib.metadata (email,
    socket, zipfile: 40-70 ms) when no third-party plugin is installed, the common case.

    None when this look cannot see everything importlib.metadata would: a finder on
    ``sys.meta_path`` other than the standard PathFinder lists distributions of its own, or a
    ``sys.path`` entry is a zip file, an egg or not a path; the caller then asks
    importlib.metadata itself."""
    import sys
    from importlib.machinery import PathFinder

    for finder in sys.meta_path:
        if finder is not PathFinder and getattr(finder, "find_distributions", None) is not None:
            return None
    out = []
    for entry in sys.path:
        if not isinstance(entry, str):
            return None
        base = entry or "."
        try:
            names = os.listdir(base)
        except OSError:
            if os.path.isfile(base):  # a zip on sys.path: importlib.metadata reads inside it
                return None
            continue  # missing, or a path hook's name
        if os.path.basename(base).lower().endswith(".egg"):
            return None
        groups: dict[str, list[str]] = {}
        for name in names:
            low = name.lower()
            if low.endswith((".dist-info", ".egg-info")):
                groups.setdefault(_normalized(low), []).append(name)
        for group in groups.values():
            for name in group:
                path = os.path.join(entry, name) if entry else name
                if _declares_jam(path):
                    out.append(path)
    return out


def _distributions(only: set[str] | None):
    """The installed distributions that may hold a ``jam`` entry point (all of them when the
    quick look cannot tell); none when ``$JAM_LOAD_PLUGINS`` names nothing to load."""
    if only is not None and not only:
        return []
    paths = jam_distribution_paths()
    if paths == []:
        return []
    import importlib.metadata

    if paths is None:
        return list(importlib.metadata.distributions())
    import pathlib

    return [importlib.metadata.PathDistribution(pathlib.Path(p)) for p in paths]


def _load_entrypoints(pm: pluggy.PluginManager, only: set[str] | None) -> None:
    """Load the ``jam`` entry points one by one: one that fails to import or to validate is
    recorded in ``pm.jam_broken`` and skipped, so a bad third-party plugin never stops jam."""
    for dist in _distributions(only):
        try:
            eps = [ep for ep in dist.entry_points if ep.group == PROJECT]
        except Exception:  # a damaged dist-info: not a plugin we can name
            continue
        for ep in eps:
            name = ep.name
            if (only is not None and name not in only) or pm.has_plugin(name) or pm.is_blocked(name):
                continue
            if any(b["name"] == name for b in pm.jam_broken):
                continue
            version = None
            try:
                version = dist.version
            except Exception:
                pass
            try:
                plugin = ep.load()
            except (Exception, SystemExit) as exc:
                pm.jam_broken.append({"name": name, "version": version,
                                      "reason": f"failed to import {ep.value}: {_one_line(exc)}"})
                continue
            try:
                pm.register(plugin, name=name)
            except (Exception, SystemExit) as exc:
                pm.jam_broken.append({"name": name, "version": version, "reason": _one_line(exc)})
                continue
            try:
                _check_one(pm, plugin, name)
            except pluggy.PluginValidationError as exc:
                pm.unregister(plugin, name=name)
                pm.jam_broken.append({"name": name, "version": version, "reason": _one_line(exc)})
                continue
            pm.jam_versions[name] = version


def _marked(mod: types.ModuleType, kind: str) -> types.ModuleType:
    """A module object of the same name holding only ``mod``'s functions marked as hook
    ``kind`` ("impl" or "spec"): what pluggy would pick out of ``mod`` itself, without it
    inspecting every other name (each import, constant and helper) statically: ~3 ms of
    the cd hook's fetch. The functions are ``mod``'s own (their globals are ``mod``'s)."""
    marker = f"{PROJECT}_{kind}"
    out = types.ModuleType(mod.__name__, mod.__doc__)
    for name, value in list(vars(mod).items()):
        if isinstance(value, types.FunctionType) and marker in value.__dict__:
            setattr(out, name, value)
    return out


def make_plugin_manager(extra: tuple = (), load_entrypoints: bool = True,
                        builtins: tuple[str, ...] = BUILTIN_PLUGINS) -> pluggy.PluginManager:
    """Build jam's plugin manager.

    Blocks the plugins named in ``$JAM_BLOCK_PLUGINS``, registers the built-ins by name, loads
    third-party plugins from the ``jam`` entry-point group (limited to ``$JAM_LOAD_PLUGINS``
    when that is set), registers ``extra`` plugin objects (tests), then ``check_pending()``
    catches misspelled hook names.

    A third-party plugin that fails to import, or whose hooks do not validate (an unknown
    argument, a misspelled hook name), is skipped and listed in ``pm.jam_broken`` as
    ``{"name", "version", "reason"}`` (the CLI warns once per command). ``extra`` plugins and
    the built-ins are the program's own: a fault in them still raises.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.jam_broken = []  # third-party plugins skipped, with why
    pm.jam_versions = {}  # entry-point plugin name -> its distribution's version
    pm.add_hookspecs(_marked(hookspecs, "spec"))
    for name in _names(os.environ.get(ENV_BLOCK)):
        pm.set_blocked(name)
    for modname in builtins:
        if pm.is_blocked(modname):
            continue
        pm.register(_marked(importlib.import_module(modname), "impl"), name=modname)
    if load_entrypoints:
        only = os.environ.get(ENV_LOAD)
        _load_entrypoints(pm, None if only is None else _names(only))
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    return pm


def dir_suffices(config) -> bool:
    """True when fetching in a root with this (merged) config needs no plugin but the built-in
    dir backend: every remote is of kind ``dir``, every ``[policy.NAME]`` is a built-in policy,
    ``jam_dir`` is not blocked and ``$JAM_LOAD_PLUGINS`` names no entry point to load. Anything
    else, a config jam cannot read included, is False: the full manager then loads (and
    reports what is wrong)."""
    if _names(os.environ.get(ENV_LOAD)) or "jam_dir" in _names(os.environ.get(ENV_BLOCK)):
        return False
    try:
        remotes = config.get("remote", {})
        policies = config.get("policy", {})
        if not isinstance(remotes, dict) or not isinstance(policies, dict):
            return False
        if any(not isinstance(t, dict) or t.get("kind") != DIR_KIND for t in remotes.values()):
            return False
        return all(name in BUILTIN_POLICIES for name in policies)
    except AttributeError:  # not a mapping at all
        return False


def fetch_plugin_manager(config) -> pluggy.PluginManager:
    """The plugin manager a fetch in a root with this config needs: the core's placement and
    the dir backend alone when :func:`dir_suffices` (no entry-point scan, no sftp or rclone
    import: the cd hook's path to its first byte), else the full one."""
    if dir_suffices(config):
        pm = make_plugin_manager(load_entrypoints=False, builtins=DIR_ONLY)
        pm.jam_scope = DIR_KIND
        return pm
    return make_plugin_manager()


def broken_plugins(pm: pluggy.PluginManager) -> list[dict]:
    """The third-party plugins that were skipped, each ``{"name", "version", "reason"}``."""
    return list(getattr(pm, "jam_broken", ()))


def plugin_of(pm: pluggy.PluginManager, tb) -> tuple[str, str] | None:
    """(plugin name, function) of the innermost frame of traceback ``tb`` that runs a
    plugin's code, or None: the CLI names the plugin whose hook raised."""
    modules: dict[str, str] = {}
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        mod = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
        if mod:
            modules[mod] = name
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        modname = frame.f_globals.get("__name__", "")
        for mod, name in modules.items():
            if modname == mod or modname.startswith(mod + "."):
                return name, frame.f_code.co_name
    return None


def plugin_info(pm: pluggy.PluginManager) -> list[dict]:
    """Each plugin with its hooks and version, for ``jam plugins``. A skipped third-party
    plugin is listed too, with ``broken`` holding the reason (``None`` for a loaded one)."""
    versions = getattr(pm, "jam_versions", {})
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda np: np[0]):
        if plugin is None:
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or ())
        out.append(
            {
                "name": name,
                "hooks": hooks,
                "version": versions.get(name),
                "builtin": name in BUILTIN_PLUGINS,
                "broken": None,
            }
        )
    for b in broken_plugins(pm):
        out.append({"name": b["name"], "hooks": [], "version": b["version"], "builtin": False,
                    "broken": b["reason"]})
    return sorted(out, key=lambda p: p["name"])
