"""The core's own hook implementations (they answer last), and what placement reads of a
root's config: ``[place] copies`` and which remotes are edge caches (``cache = "7d"``)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from jam_core import hookimpl
from jam_core.errors import UsageError
from jam_core.model import Remote
from jam_core.units import parse_duration

MAX_COPIES = 16


class Candidates(list):
    """The remotes offered to ``place``, carrying the call's ``copies`` and ``free`` too, so the
    core's default reads them even from a caller that passes only ``remotes``."""

    def __init__(self, remotes: Sequence[Remote], copies: int = 1, free: Mapping[str, int | None] | None = None):
        super().__init__(remotes)
        self.copies = copies
        self.free = dict(free or {})


def copies_of(config: Mapping[str, Any]) -> int:
    """``[place] copies`` (default 1): how many distinct remotes, caches not counted, must hold
    every object before its file becomes a stub, and how many must remain after a removal."""
    table = config.get("place", {})
    if not isinstance(table, Mapping):
        raise UsageError("place: expected a table ([place])")
    n = table.get("copies", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_COPIES:
        raise UsageError(f"place.copies: expected a whole number from 1 to {MAX_COPIES}, got {n!r}")
    return n


def cache_age(remote: Remote) -> float | None:
    """Seconds an edge cache keeps objects whose files were not used (``cache = "7d"``), or None
    when ``remote`` is not a cache. A bad value is a usage error naming the remote."""
    value = remote.options.get("cache")
    if value is None or value is False:
        return None
    try:
        return float(parse_duration(value, f"remote.{remote.name}.cache"))
    except UsageError:
        raise
    except (TypeError, ValueError):
        raise UsageError(f"remote.{remote.name}.cache: expected a duration such as \"7d\", got {value!r}") from None


def is_cache(remote: Remote) -> bool:
    return cache_age(remote) is not None


def durable(remotes: Sequence[Remote]) -> list[Remote]:
    """The remotes whose copies count (every remote but the edge caches)."""
    return [r for r in remotes if not is_cache(r)]


def choose(remotes: Sequence[Remote], copies: int, free: Mapping[str, int | None]) -> list[Remote]:
    """``copies`` distinct non-cache remotes (distinct stores: two names of one identity are one),
    nearest tier first; within a tier (a pool) the one
    with the most free space first (unknown last), ties by name; then every cache remote."""
    def key(r: Remote):
        space = free.get(r.name)
        return (r.tier, space is None, -(space or 0), r.name)

    chosen: list[Remote] = []
    stores: set[str] = set()
    for r in sorted(durable(remotes), key=key):
        store = r.options.get("id") or r.name
        if store not in stores and len(chosen) < copies:  # one store under two names is one copy
            stores.add(store)
            chosen.append(r)
    caches = sorted((r for r in remotes if is_cache(r)), key=lambda r: (r.tier, r.name))
    return chosen + caches


@hookimpl(trylast=True)
def place(remotes):
    """Default placement: :func:`choose` with the call's ``copies`` and ``free`` (carried by
    :class:`Candidates`; a plain list means one copy, the nearest tier)."""
    if not remotes:
        return None
    copies = getattr(remotes, "copies", 1)
    free = getattr(remotes, "free", {})
    return choose(remotes, copies, free) or None
