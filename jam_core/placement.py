"""The core's own hook implementations: they answer last."""

from __future__ import annotations

from jam_core import hookimpl


@hookimpl(trylast=True)
def place(remotes):
    """Default placement: the nearest tier (lowest number), ties broken by name."""
    if not remotes:
        return None
    nearest = min(r.tier for r in remotes)
    return [sorted((r for r in remotes if r.tier == nearest), key=lambda r: r.name)[0]]
