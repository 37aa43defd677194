"""The ``lru`` policy: keep the most recently used share local, stash the rest.

    [policy.lru]
    keep = "25%"        # the most recently used share that stays local
    by = "bytes"        # or "count"

The share is of the files policies may move: the local candidates *and the stubs* (pinned,
ignored, hard-linked, dirty and small files are outside it). Stubs count in the total but are
never kept, so the total does not change when files are stashed and a second run right after
the first nominates nothing: with 12 files of equal size and ``keep = "25%"`` the 3 most
recently used stay local, run after run. Candidates are ordered from the most recently used;
they stay local until the kept share reaches ``keep`` of that total (bytes or count). Files
used at the same instant are one group: they stay or go together, so the kept share may
exceed ``keep`` a little, never fall short. When fewer candidates are left than the share
(files were stashed by hand or by another policy), all of them stay.
"""

from __future__ import annotations

import itertools
from operator import attrgetter
from typing import Sequence

from jam_core import STASH, FileRecord, Nomination, UsageError, hookimpl, parse_percent, policy_table

NAME = "lru"
KNOWN = ("keep", "by")
BY = ("bytes", "count")
_path, _last_used = attrgetter("path"), attrgetter("last_used")


def select_lru(records: Sequence[FileRecord], keep: float, by: str = "bytes",
               stubs: Sequence[FileRecord] = ()) -> list[Nomination]:
    """Nominate the least recently used ``records`` beyond the most recent ``keep`` share of
    ``records`` plus ``stubs`` (the tree's stubs count in the total, never as kept)."""
    columns, sizes = getattr(records, "columns", None), getattr(records, "sizes", None)
    if columns is not None and sizes is not None:  # the core's records as lists: no record made
        paths, lasts = columns
        n = len(paths)
        weights = sizes if by == "bytes" else None
        total = (sum(sizes) if weights is not None else n) + sum(r.size if weights is not None else 1 for r in stubs)
        if total == 0 or keep >= 1:
            return []
        order = sorted(range(n), key=paths.__getitem__)
        order.sort(key=lasts.__getitem__, reverse=True)  # most recent first; ties: by path
        groups = ((last, [(paths[i], weights[i] if weights is not None else 1) for i in group])
                  for last, group in itertools.groupby(order, key=lasts.__getitem__))
    else:
        weight = (lambda r: r.size) if by == "bytes" else (lambda r: 1)
        total = sum(weight(r) for r in records) + sum(weight(r) for r in stubs)
        if total == 0 or keep >= 1:
            return []
        ordered = sorted(sorted(records, key=_path), key=_last_used, reverse=True)  # ties: by path
        groups = ((last, [(r.path, weight(r)) for r in group])
                  for last, group in itertools.groupby(ordered, key=_last_used))
    goal = keep * total
    kept = 0
    out = []
    reason = f"among the least recently used {round((1 - keep) * 100, 2):g}% by {by}"
    for _, group in groups:  # files used at the same instant stay or go together
        if kept < goal:
            kept += sum(w for _, w in group)
            continue
        out.extend(Nomination(path, NAME, reason) for path, _ in group)
    return out


def settings(config) -> tuple[float, str] | None:
    table = policy_table(config, NAME, KNOWN)
    if table is None:
        return None
    if "keep" not in table:
        raise UsageError('policy.lru: set keep, the most recently used share that stays local, e.g. keep = "25%"')
    keep = parse_percent(table["keep"], "policy.lru.keep")
    by = table.get("by", "bytes")
    if by not in BY:
        raise UsageError(f'policy.lru.by: expected "bytes" or "count", got {by!r}')
    return keep, by


@hookimpl
def select(records, purpose, config):
    if purpose != STASH:
        return None
    s = settings(config)
    if s is None:
        return None
    # jam_core.policy.plan passes the candidates as a tuple that also carries the tree's stubs
    return select_lru(records, *s, stubs=getattr(records, "stubs", ()))
