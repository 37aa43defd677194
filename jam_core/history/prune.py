"""``jam gc --keep "daily 7, weekly 4, monthly 12"``: which snapshots to keep, borg prune's way.

Rules, in borg's order: ``last N`` (the N newest), ``hourly``, ``daily``, ``weekly`` (ISO
weeks), ``monthly``, ``yearly``. For each rule, going from the newest snapshot back, a snapshot
is kept when it is the newest of its period (local time) and not already kept by an earlier
rule, until N periods are kept; if the snapshots run out before N, the oldest one is kept too
(``[oldest]``). The newest snapshot (HEAD) is always kept. Every snapshot gets its reason.
"""

from __future__ import annotations

import re
import time

from jam_core.errors import UsageError

ORDER = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_FMT = {"hourly": "%Y-%m-%d %H", "daily": "%Y-%m-%d", "weekly": "%G-W%V", "monthly": "%Y-%m", "yearly": "%Y"}
_RULE = re.compile(r"\A\s*([a-z]+)\s*[ =:]\s*([0-9]{1,6})\s*\Z")


def parse_rules(text: str) -> dict[str, int]:
    """``"daily 7, weekly 4, monthly 12"`` -> {"daily": 7, "weekly": 4, "monthly": 12}."""
    rules: dict[str, int] = {}
    hint = f"--keep {text[:60]!r}: expected rules like \"daily 7, weekly 4, monthly 12\" (last, hourly, daily, " \
           "weekly, monthly, yearly)"
    for part in text.split(","):
        m = _RULE.match(part.lower())
        if not m or m.group(1) not in ORDER or m.group(1) in rules:
            raise UsageError(hint)
        rules[m.group(1)] = int(m.group(2))
    if not rules or not any(rules.values()):
        raise UsageError(hint + "; at least one rule must keep something")
    return rules


def _period(rule: str, time_ns: int, index: int) -> str:
    if rule == "last":
        return str(index)
    return time.strftime(_FMT[rule], time.localtime(time_ns / 1e9))


def plan(snapshots: list[tuple[str, int]], rules: dict[str, int],
         head: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """``snapshots``: (id, time_ns). Returns ({id: why kept}, {id: why forgotten})."""
    ordered = sorted(snapshots, key=lambda s: (s[1], s[0]), reverse=True)
    kept: dict[str, str] = {}
    for rule in ORDER:
        n = rules.get(rule, 0)
        if not n:
            continue
        last = None
        count = 0
        sid = None
        for i, (sid, t) in enumerate(ordered):
            p = _period(rule, t, i)
            if p == last:
                continue
            last = p
            if sid in kept:  # kept by an earlier rule: its period is taken, it is not counted again
                continue
            count += 1
            kept[sid] = f"{rule} #{count}"
            if count >= n:
                break
        else:
            if sid is not None and count < n and sid not in kept:
                count += 1
                kept[sid] = f"{rule} #{count} [oldest]"
    if head is not None and any(s == head for s, _t in ordered):
        kept[head] = "the newest snapshot (HEAD)" + (f", {kept[head]}" if head in kept else "")
    forgotten = {}
    for sid, t in ordered:
        if sid not in kept:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(t / 1e9))
            forgotten[sid] = f"from {when}: not the newest of a period any rule keeps"
    return kept, forgotten
