"""jam: keep a directory tree whole while most of its bytes live on remotes.

A plugin writes ``from jam_core import hookimpl``. Everything the command line does is a
function of this package; the CLI only wraps it. Names are loaded on first use (PEP 562):
``jam`` runs from a shell hook, and pluggy or dataclasses cost milliseconds it need not pay
for ``jam --version``.
"""

from __future__ import annotations

__version__ = "0.1.0"

PROJECT = "jam"

_LAZY = {
    "JamError": "jam_core.errors",
    "RemoteError": "jam_core.errors",
    "UsageError": "jam_core.errors",
    "IntegrityError": "jam_core.errors",
    "FileRecord": "jam_core.model",
    "Nomination": "jam_core.model",
    "Remote": "jam_core.model",
    "Session": "jam_core.model",
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
