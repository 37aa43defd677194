"""jam: keep a directory tree whole while most of its bytes live on remotes.

A plugin writes ``from jam_core import hookimpl`` and imports nothing else of jam than the
names listed in ``_LAZY`` below (the public API; tests/test_layers.py checks it). Everything the command line does is a
function of this package; the CLI only wraps it. Names are loaded on first use (PEP 562):
``jam`` runs from a shell hook, and pluggy or dataclasses cost milliseconds it need not pay
for ``jam --version``.
"""

from __future__ import annotations

__version__ = "0.1.0"

PROJECT = "jam"

_LAZY = {
    # errors a plugin raises
    "JamError": "jam_core.errors",
    "RemoteError": "jam_core.errors",
    "UsageError": "jam_core.errors",
    "IntegrityError": "jam_core.errors",
    # records passed through the hooks
    "FileRecord": "jam_core.model",
    "Nomination": "jam_core.model",
    "Remote": "jam_core.model",
    "Session": "jam_core.model",
    "STASH": "jam_core.model",
    "FETCH": "jam_core.model",
    "policy_table": "jam_core.model",
    # values as people write them
    "parse_size": "jam_core.units",
    "human": "jam_core.units",
    "parse_duration": "jam_core.units",
    "parse_percent": "jam_core.units",
    "format_duration": "jam_core.units",
    # content ids, hashing, where a remote keeps an object, a remote's identity marker
    "DEFAULT_ALGORITHM": "jam_core.objects",
    "split_oid": "jam_core.objects",
    "is_valid_oid": "jam_core.objects",
    "hasher": "jam_core.objects",
    "hash_fd": "jam_core.objects",
    "hash_file": "jam_core.objects",
    "read_buffer": "jam_core.objects",
    "object_relpath": "jam_core.objects",
    "MARKER_NAME": "jam_core.objects",
    "marker_bytes": "jam_core.objects",
    "parse_marker": "jam_core.objects",
    "new_remote_id": "jam_core.objects",
    # durability and temporary names for backends
    "syncfs": "jam_core.fs",
    "fsync_dir": "jam_core.fs",
    "part_name": "jam_core.fs",
    "part_is_stale": "jam_core.fs",
}

__all__ = ["PROJECT", "__version__", "hookimpl", *_LAZY]


def __getattr__(name: str):
    if name == "hookimpl":
        import pluggy

        value = pluggy.HookimplMarker(PROJECT)
    elif name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'jam_core' has no attribute {name!r}")
    globals()[name] = value
    return value
