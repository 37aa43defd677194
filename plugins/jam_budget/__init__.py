"""The ``budget`` policy: keep the bytes on this disk under a size, least recently used out first.

    [policy.budget]
    max_local = "20GB"    # when local bytes exceed this...
    low = "90%"           # ...stash down to this (a share of max_local, or a size); default 90%

Local bytes are the true size of every file in the root that is not a stub (pinned, ignored
and small files count too, though they never leave). Nothing happens at or under
``max_local``; above it, the least recently used candidates are nominated until the rest
fits under ``low``. The gap between the two is what keeps it from stashing a file per run.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Sequence

from jam_core import STASH, FileRecord, Nomination, UsageError, hookimpl, human, parse_percent, parse_size, policy_table

NAME = "budget"
KNOWN = ("max_local", "low")
DEFAULT_LOW = "90%"


def select_budget(records: Sequence[FileRecord], local_bytes: int, max_local: int, low: int) -> list[Nomination]:
    """Least recently used records first, until ``local_bytes`` minus them is at most ``low``."""
    if local_bytes <= max_local:
        return []
    reason = (f"local {human(local_bytes, trim=True)} > {human(max_local, trim=True)}, "
              f"evicting least recently used down to {human(low, trim=True)}")
    columns, sizes = getattr(records, "columns", None), getattr(records, "sizes", None)
    if columns is not None and sizes is not None:  # the core's records as lists: no record made
        paths, lasts = columns
        order = sorted(range(len(paths)), key=paths.__getitem__)
        order.sort(key=sizes.__getitem__, reverse=True)  # (stable: equal sizes stay by path)
        order.sort(key=lasts.__getitem__)
        chosen = ((paths[i], sizes[i]) for i in order)
    else:
        by_path = sorted(records, key=attrgetter("path"))
        by_size = sorted(by_path, key=attrgetter("size"), reverse=True)
        chosen = ((r.path, r.size) for r in sorted(by_size, key=attrgetter("last_used")))
    out = []
    left = local_bytes
    for path, size in chosen:  # least recent, then biggest, then path
        if left <= low:
            break
        out.append(Nomination(path, NAME, reason))
        left -= size
    return out


def settings(config) -> tuple[int, int] | None:
    table = policy_table(config, NAME, KNOWN)
    if table is None:
        return None
    if "max_local" not in table:
        raise UsageError('policy.budget: set max_local, e.g. max_local = "20GB"')
    max_local = parse_size(table["max_local"], "policy.budget.max_local")
    raw = table.get("low", DEFAULT_LOW)
    if isinstance(raw, str) and raw.strip().endswith("%"):
        low = int(parse_percent(raw, "policy.budget.low") * max_local)
    else:
        low = parse_size(raw, "policy.budget.low")
    if low > max_local:
        raise UsageError(f"policy.budget.low ({raw!r}) must not be above max_local ({table['max_local']!r})")
    return max_local, low


@hookimpl
def select(records, purpose, config, local_bytes):
    if purpose != STASH:
        return None
    s = settings(config)
    if s is None:
        return None
    return select_budget(records, local_bytes, *s)
