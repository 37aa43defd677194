"""Policies: ``jam stash --auto`` and ``jam checkout --related``.

One scan of the root builds a plain :class:`FileRecord` per file (``last_used`` is the newest
of atime, mtime and jam's own record of use). Files that must never leave are dropped before
the policies are asked, and dropped again from what they answer (a policy is never trusted to
respect them): pinned (a pin on a directory covers its contents), ignored by
``ROOT/.jamignore`` (gitignore syntax), hard-linked, dirty or unreadable stubs, stubs, empty
files and files smaller than ``core.min_size``. Nominations are merged per file, keeping every
policy's reason.

Configuration (``ROOT/.jam/config.toml`` over the user's defaults):

* ``[policy.NAME]`` tables switch policies on; a policy runs only when its table is present.
* ``[policy] use_atime = false`` ignores atime (when backups or indexers read everything).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from jam_core.errors import UsageError
from jam_core.model import FileRecord, Nomination
from jam_core.pins import add_pins, covered, read_pins, remove_pins  # noqa: F401  (covered: re-exported)
from jam_core.root import CATALOG, Root
from jam_core.units import human as format_size
from jam_core.scan import BAD, DIRTY, LOCAL, STUB, QUICK, classify, scan_dirs

IGNORE_FILE = ".jamignore"
STASH, FETCH = "stash", "fetch"

# -- values written the way people write them ---------------------------------------------

_DURATION_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 7 * 86400, "week": 7 * 86400, "weeks": 7 * 86400,
    "y": 365 * 86400, "year": 365 * 86400, "years": 365 * 86400,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_duration(value: Any, what: str = "duration") -> float:
    """``"90s"``, ``"10m"``, ``"12h"``, ``"30d"``, ``"2w"``, ``"1y"`` -> seconds.

    A bare number is refused: ``30`` could mean seconds or days. Raises UsageError."""
    hint = f"{what}: expected a duration like 10m, 12h, 30d, 2w or 1y, got {value!r}"
    if not isinstance(value, str):
        raise UsageError(hint)
    m = _DURATION_RE.match(value.lower())
    if not m or m.group(2) not in _DURATION_UNITS:
        raise UsageError(hint)
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_percent(value: Any, what: str = "percentage") -> float:
    """``"25%"`` -> 0.25 (0% to 100%). Raises UsageError."""
    m = _PERCENT_RE.match(value) if isinstance(value, str) else None
    share = float(m.group(1)) / 100 if m else -1.0
    if not 0 <= share <= 1:
        raise UsageError(f"{what}: expected a percentage from 0% to 100% like \"25%\", got {value!r}")
    return share


def format_duration(seconds: float) -> str:
    for unit, n in (("y", 365 * 86400), ("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"


def human(n: float) -> str:
    """Bytes for reasons and plans, trimmed so a configured size reads back as written."""
    return format_size(n, trim=True)


def policy_table(config: Mapping[str, Any], name: str, known: Iterable[str]) -> dict | None:
    """The ``[policy.NAME]`` table, or None when absent. Unknown keys are a usage error."""
    policy = config.get("policy")
    if not isinstance(policy, Mapping) or name not in policy:
        return None
    table = policy[name]
    if not isinstance(table, Mapping):
        raise UsageError(f"policy.{name}: expected a table ([policy.{name}]), got {table!r}")
    known = tuple(known)
    for key in table:
        if key not in known:
            raise UsageError(f"policy.{name}: unknown setting {key!r} (known: {', '.join(known)})")
    return dict(table)


def configured_policies(config: Mapping[str, Any]) -> list[str]:
    """Names of the ``[policy.NAME]`` tables (scalars in ``[policy]`` are settings)."""
    policy = config.get("policy")
    if policy is None:
        return []
    if not isinstance(policy, Mapping):
        raise UsageError(f"policy: expected a table of policies ([policy.age], ...), got {policy!r}")
    return sorted(k for k, v in policy.items() if isinstance(v, Mapping))


# -- the records every policy sees ---------------------------------------------------------

@dataclass
class Inventory:
    """One scan of a root, split into what policies may choose and what they may not."""

    candidates: dict[str, FileRecord] = field(default_factory=dict)  # local files policies may stash
    stubs: dict[str, FileRecord] = field(default_factory=dict)  # clean stubs (for fetch)
    kept: dict[str, str] = field(default_factory=dict)  # path -> why policies may not have it
    local_bytes: int = 0  # true size of every file that is not a stub
    problems: list[tuple[str, str]] = field(default_factory=list)

    def kept_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for why in self.kept.values():
            out[why] = out.get(why, 0) + 1
        return out


def pins(root: Root) -> list[str]:
    """The root's pins, sorted."""
    return sorted(read_pins(root))


def pin(root: Root, rels: Sequence[str]) -> None:
    """Pin files or directories (relative to the root): policies never stash them. The caller
    checks pinned stubs out (``jam pin`` does, like "always keep on this device"). Pins live
    in ``ROOT/.jam/pins`` (jam_core.pins), so a rebuilt catalog keeps them."""
    for rel in rels:
        if not os.path.lexists(root.abs(rel)):
            raise UsageError(f"{rel}: no such file or directory")
    with root.lock():
        add_pins(root, rels)


def unpin(root: Root, rels: Sequence[str]) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Unpin; returns (unpinned, not pinned, [(still covered, by which pin)])."""
    with root.lock():
        before, left = remove_pins(root, rels)
    held = []
    for rel in rels:
        if covered(rel, left):
            held.append((rel, next(p for p in sorted(left, key=len, reverse=True) if covered(rel, {p}))))
    return [r for r in rels if r in before], [r for r in rels if r not in before], held


def load_ignore(root: Root):
    """The ``ROOT/.jamignore`` matcher (gitignore syntax), or None if there is no such file."""
    path = root.path / IGNORE_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return None
    import pathspec

    try:
        return pathspec.GitIgnoreSpec.from_lines(text.splitlines())
    except Exception as exc:  # pathspec raises several kinds for a bad pattern
        raise UsageError(f"{path}: bad pattern: {exc}") from None


def use_atime(config: Mapping[str, Any]) -> bool:
    policy = config.get("policy")
    value = policy.get("use_atime", True) if isinstance(policy, Mapping) else True
    if not isinstance(value, bool):
        raise UsageError(f"policy.use_atime: expected true or false, got {value!r}")
    return value


def inventory(root: Root) -> Inventory:
    """One scan of the root plus the catalog's uses and pins: the records policies see."""
    from jam_core.catalog import Catalog
    from jam_core.visitmarks import fold

    fold(root)  # the cd hooks' visits become uses first
    config = root.config
    min_size = root.min_size
    atime_ok = use_atime(config)
    ignore = load_ignore(root)
    pins = read_pins(root)
    with Catalog(root.jam_dir / CATALOG) as cat:
        uses = cat.uses()
    inv = Inventory()

    def on_error(rel, exc):
        inv.problems.append((rel, exc.strerror or str(exc)))

    # One pass of lstat()s; an xattr is read only where the stat suggests a stub (a writable,
    # non-sparse file is taken as local). ``stash`` re-classifies every file it is handed
    # thoroughly before touching it, so a stub made writable again is still never stashed.
    for d, files in scan_dirs(str(root.path), ".", on_error, ordered=False):
        prefix = "" if d == "." else d + "/"
        dir_pinned = covered(d, pins)
        for name, path, st in files:
            rel = prefix + name
            state, srec, _ = classify(path, st, QUICK)
            mtime = st.st_mtime
            atime = st.st_atime
            last = max(mtime, atime if atime_ok else mtime, uses.get(rel, 0.0))
            pinned = dir_pinned or (pins and rel in pins)
            ignored = ignore is not None and ignore.match_file(rel)
            if state == STUB:
                if not pinned and not ignored:
                    inv.stubs[rel] = FileRecord(rel, srec.size, mtime, atime, last, STUB, False, st.st_nlink)
                continue
            size = st.st_size
            inv.local_bytes += size
            if pinned or ignored or state != LOCAL or st.st_nlink != 1 or size < min_size or size == 0:
                inv.kept[rel] = _kept(state, st, pinned, ignored, min_size)
                continue
            inv.candidates[rel] = FileRecord(rel, size, mtime, atime, last, LOCAL, False, 1)
    return inv


def _kept(state: str, st: os.stat_result, pinned: bool, ignored: bool, min_size: int) -> str:
    """Why a non-stub file may not be chosen by a policy ("" if it may)."""
    if pinned:
        return "pinned"
    if state == DIRTY:
        return "modified stub"
    if state == BAD:
        return "unreadable stub"
    if state != LOCAL:
        return state
    if ignored:
        return "ignored (.jamignore)"
    if st.st_nlink > 1:
        return "hard-linked"
    if st.st_size == 0 or st.st_size < min_size:
        return "smaller than core.min_size"
    return ""


# -- asking the policies and merging -------------------------------------------------------

@dataclass
class PlanItem:
    path: str
    size: int
    last_used: float
    reasons: list[tuple[str, str]]  # (policy, reason), one per nominating policy


@dataclass
class Plan:
    """What ``jam stash --auto`` would stash and why."""

    items: list[PlanItem] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)  # the configured ones
    kept: dict[str, int] = field(default_factory=dict)  # why -> how many files policies may not have
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path, policy) dropped by the core
    local_bytes: int = 0
    candidates: int = 0

    @property
    def bytes(self) -> int:
        return sum(i.size for i in self.items)

    def to_json(self) -> dict:
        return {
            "policies": self.policies,
            "files": [{"path": i.path, "size": i.size, "last_used": i.last_used,
                       "reasons": [{"policy": p, "reason": r} for p, r in i.reasons]} for i in self.items],
            "bytes": self.bytes,
            "local_bytes": self.local_bytes,
            "candidates": self.candidates,
            "kept": self.kept,
        }


class Records(tuple):
    """The records a policy is offered (a plain tuple to any plugin), carrying the rest of the
    tree a share needs: ``stubs``, the clean stubs policies could have chosen had they been
    local (pinned and ignored ones excluded). A share of "the tree" must count them, or it
    shrinks with every run (``jam_lru``)."""

    stubs: tuple[FileRecord, ...] = ()


def ask(pm, root: Root, records: Sequence[FileRecord], purpose: str, anchors: Sequence[str],
        local_bytes: int, stubs: Sequence[FileRecord] = ()) -> list[Nomination]:
    offered = Records(records)
    offered.stubs = tuple(stubs)
    answers = pm.hook.select(root=root.path, records=offered, purpose=purpose,
                             anchors=tuple(anchors), config=root.config, local_bytes=local_bytes)
    out = []
    for answer in answers:
        for n in answer or ():
            if isinstance(n, Nomination):
                out.append(n)
    return out


def merge(nominations: Iterable[Nomination], allowed: Mapping[str, FileRecord],
          refused: list[tuple[str, str]] | None = None) -> list[PlanItem]:
    """One item per allowed file, with every policy's reason; anything else is dropped."""
    items: dict[str, PlanItem] = {}
    for n in nominations:
        rec = allowed.get(n.path)
        if rec is None:
            if refused is not None:
                refused.append((n.path, n.policy))
            continue
        item = items.get(n.path)
        if item is None:
            item = items[n.path] = PlanItem(n.path, rec.size, rec.last_used, [])
        if (n.policy, n.reason) not in item.reasons:
            item.reasons.append((n.policy, n.reason))
    for item in items.values():
        item.reasons.sort()
    return sorted(items.values(), key=lambda i: i.path)


def plan_auto(root: Root, pm) -> Plan:
    """What the configured policies would stash, with their reasons. Reads no file content."""
    config = root.config
    names = configured_policies(config)
    if not names:
        raise UsageError(
            f"no policy is configured for {root.path}: add a [policy.age], [policy.lru] or "
            f"[policy.budget] table to {root.config_path} (see the README, Policies)"
        )
    inv = inventory(root)
    plan = Plan(policies=names, kept=inv.kept_counts(), local_bytes=inv.local_bytes,
                candidates=len(inv.candidates))
    records = sorted(inv.candidates.values(), key=lambda r: r.path)
    stubs = sorted(inv.stubs.values(), key=lambda r: r.path)
    nominations = ask(pm, root, records, STASH, (), inv.local_bytes, stubs) if records else []
    plan.items = merge(nominations, inv.candidates, plan.refused)
    return plan


def stash_auto(root: Root, pm, session=None, dry_run: bool = False):
    """Run the policies; unless ``dry_run``, stash what they chose. Returns (plan, result|None)."""
    plan = plan_auto(root, pm)
    if dry_run or not plan.items:
        return plan, None
    return plan, carry_out(root, plan, pm, session)


def carry_out(root: Root, plan: Plan, pm, session=None):
    """Stash what a plan chose, as policies do: minimum size applies, pins are re-checked."""
    from jam_core.stash import stash

    return stash(root, [i.path for i in plan.items], pm, session, explicit=False)


def related(root: Root, pm, anchors: Sequence[str]) -> list[PlanItem]:
    """Stubs the select hook (purpose ``fetch``) nominates to come along with ``anchors``."""
    anchors = [a for a in anchors if root.abs(a).is_file()]  # a directory comes whole anyway
    inv = inventory(root)
    records = sorted(inv.stubs.values(), key=lambda r: r.path)
    nominations = ask(pm, root, records, FETCH, list(anchors), inv.local_bytes)
    anchor_set = set(anchors)
    return [i for i in merge(nominations, inv.stubs) if i.path not in anchor_set]

