"""The ``lru`` policy: keep the most recently used share local, stash the rest.

    [policy.lru]
    keep = "25%"        # the most recently used share that stays local
    by = "bytes"        # or "count"

Candidates are ordered from the most recently used; they stay local until the kept share
reaches ``keep`` of the candidates' bytes (or count). Files used at the same instant are one
group: they stay or go together, so the kept share may exceed ``keep`` a little, never fall short.
"""

from __future__ import annotations

import itertools
from operator import attrgetter
from typing import Sequence

from jam_core import FileRecord, Nomination, UsageError, hookimpl
from jam_core.policy import STASH, parse_percent, policy_table

NAME = "lru"
KNOWN = ("keep", "by")
BY = ("bytes", "count")
_path, _last_used = attrgetter("path"), attrgetter("last_used")


def select_lru(records: Sequence[FileRecord], keep: float, by: str = "bytes") -> list[Nomination]:
    """Nominate the least recently used records beyond the most recent ``keep`` share."""
    weight = (lambda r: r.size) if by == "bytes" else (lambda r: 1)
    total = sum(weight(r) for r in records)
    if total == 0:
        return []
    goal = keep * total
    ordered = sorted(sorted(records, key=_path), key=_last_used, reverse=True)  # ties: by path
    kept = 0
    out = []
    reason = f"among the least recently used {round((1 - keep) * 100, 2):g}% by {by}"
    for _, group in itertools.groupby(ordered, key=lambda r: r.last_used):
        group = list(group)
        if kept < goal or goal == total:
            kept += sum(weight(r) for r in group)
            continue
        out.extend(Nomination(r.path, NAME, reason) for r in group)
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
    return select_lru(records, *s)
