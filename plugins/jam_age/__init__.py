"""The ``age`` policy: stash what was last used longer ago than a duration.

    [policy.age]
    older_than = "30d"      # 90s, 10m, 12h, 30d, 2w, 1y

A file is nominated when ``now - last_used > older_than`` (strictly: a file exactly that old
stays). ``last_used`` is the newest of atime, mtime and jam's own record of use.
"""

from __future__ import annotations

import functools
import time
from itertools import compress, repeat
from operator import lt
from typing import Sequence

from jam_core import STASH, FileRecord, Nomination, UsageError, format_duration, hookimpl, parse_duration, policy_table

NAME = "age"
KNOWN = ("older_than",)


@functools.lru_cache(maxsize=4096)
def _when(minute: int, precise: bool) -> str:
    return time.strftime("%Y-%m-%d %H:%M" if precise else "%Y-%m-%d", time.localtime(minute * 60))


def when(t: float, precise: bool) -> str:
    return _when(int(t // 60), precise)


def select_older(records: Sequence[FileRecord], older_than: float, now: float) -> list[Nomination]:
    """Every record last used more than ``older_than`` seconds before ``now``."""
    limit = now - older_than
    columns = getattr(records, "columns", None)  # the core's records as two lists: no record read
    if columns is not None:
        paths, lasts = columns
        old = compress(zip(paths, lasts, strict=True), map(lt, lasts, repeat(limit)))
    else:
        old = ((r.path, r.last_used) for r in records if r.last_used < limit)
    return _nominate(old, older_than)


def _nominate(old, older_than: float) -> list[Nomination]:
    """A nomination per ``(path, last_used)``, one reason string per minute of last use."""
    precise = older_than < 2 * 86400  # "last used 2026-09-01" says little about a 10m threshold
    text = format_duration(older_than)
    reasons: dict[int, str] = {}  # one reason per minute of last use, not one string per file
    out = []
    for path, last in old:
        minute = int(last // 60)
        reason = reasons.get(minute)
        if reason is None:
            reason = reasons[minute] = f"last used {_when(minute, precise)}, older than {text}"
        out.append(Nomination(path, NAME, reason))
    return out


def settings(config) -> float | None:
    table = policy_table(config, NAME, KNOWN)
    if table is None:
        return None
    if "older_than" not in table:
        raise UsageError('policy.age: set older_than, e.g. older_than = "30d"')
    return parse_duration(table["older_than"], "policy.age.older_than")


@hookimpl
def select(records, purpose, config):
    if purpose != STASH:
        return None
    older_than = settings(config)
    if older_than is None:
        return None
    return select_older(records, older_than, time.time())
