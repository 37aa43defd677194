"""The records every policy sees: one scan of a root into a plain :class:`FileRecord` per file.

``last_used`` is the newest of atime (unless ``[policy] use_atime = false``), mtime and jam's
own record of use (the catalog's uses, and the cd hooks' visits folded into them). Files that
must never leave are set aside with the reason: pinned, ignored by ``ROOT/.jamignore``
(gitignore syntax), hard-linked, dirty or unreadable stubs, empty or smaller than
``core.min_size``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from jam_core.errors import UsageError
from jam_core.model import FileRecord
from jam_core.policy.pins import covered, read_pins
from jam_core.root import CATALOG, Root
from jam_core.scan import BAD, DIRTY, LOCAL, QUICK, STUB, classify, gc_paused, scan_stats

IGNORE_FILE = ".jamignore"


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
    from jam_core.hook.marks import fold

    fold(root)  # the cd hooks' visits become uses first
    config = root.config
    min_size = root.min_size
    atime_ok = use_atime(config)
    ignore = load_ignore(root)
    pins = read_pins(root)
    with Catalog(root.jam_dir / CATALOG) as cat:
        uses = cat.uses()
        stamps = cat.stub_stamps()
    inv = Inventory()

    def on_error(rel, exc):
        inv.problems.append((rel, exc.strerror or str(exc)))

    with gc_paused():
        _scan(root, inv, uses, pins, ignore, stamps, atime_ok, min_size, on_error)
    return inv


def _scan(root: Root, inv: Inventory, uses: dict[str, float], pins: set[str], ignore, stamps: dict[bytes, tuple],
          atime_ok: bool, min_size: int, on_error) -> None:
    """One pass of lstat()s. A writable, non-sparse file is taken as local from its stat; a
    stub the catalog's stamp vouches for (size, mtime, inode, ctime unchanged since jam made
    it) as a clean stub; only the rest have their xattr read. ``stash`` re-classifies every
    file it is handed thoroughly before touching it, so a stub made writable again is still
    never stashed."""
    candidates, stubs, kept = inv.candidates, inv.stubs, inv.kept
    uses_get = uses.get if uses else None
    match = ignore.match_file if ignore is not None else None
    fsencode, stamp_of = os.fsencode, stamps.get
    record = FileRecord
    local_bytes = 0
    for d, base, names, stats in scan_stats(str(root.path), ".", on_error, ordered=False):
        prefix = "" if d == "." else d + "/"
        dprefix = None
        dir_pinned = covered(d, pins)
        for name, st in zip(names, stats, strict=True):
            size = st.st_size
            if st.st_mode & 0o222 and st.st_blocks * 512 >= size:  # writable, not sparse: local
                local_bytes += size
                if (not dir_pinned and size >= min_size and size and st.st_nlink == 1
                        and not (pins and prefix + name in pins) and (match is None or not match(prefix + name))):
                    rel = prefix + name  # the common case: a candidate
                    mtime = st.st_mtime
                    atime = st.st_atime
                    last = atime if atime_ok and atime > mtime else mtime
                    if uses_get is not None:
                        used = uses_get(rel)
                        if used is not None and used > last:
                            last = used
                    candidates[rel] = record(rel, size, mtime, atime, last, LOCAL, False, 1)
                    continue
                state = LOCAL
            else:
                if dprefix is None:
                    dprefix = b"" if d == "." else fsencode(d) + b"/"
                state = classify(base + name, st, QUICK, stamp=stamp_of(dprefix + fsencode(name)))[0]
                if state != STUB:
                    local_bytes += size
            rel = prefix + name
            pinned = dir_pinned or (pins and rel in pins)
            ignored = match is not None and match(rel)
            if state == STUB:  # a clean stub's size is its original's (else it is dirty)
                if not pinned and not ignored:
                    mtime = st.st_mtime
                    atime = st.st_atime
                    stubs[rel] = record(rel, size, mtime, atime, _last_used(st, rel, atime_ok, uses_get),
                                        STUB, False, st.st_nlink)
                continue
            if pinned or ignored or state != LOCAL or st.st_nlink != 1 or size < min_size or size == 0:
                kept[rel] = _kept(state, st, pinned, ignored, min_size)
                continue
            candidates[rel] = record(rel, size, st.st_mtime, st.st_atime, _last_used(st, rel, atime_ok, uses_get),
                                     LOCAL, False, 1)
    inv.local_bytes += local_bytes


def _last_used(st: os.stat_result, rel: str, atime_ok: bool, uses_get) -> float:
    """The newest of mtime, atime (unless ``use_atime = false``) and jam's own record of use."""
    last = st.st_mtime
    if atime_ok and st.st_atime > last:
        last = st.st_atime
    if uses_get is not None:
        used = uses_get(rel)
        if used is not None and used > last:
            last = used
    return last


# FileRecord itself is built by slot (jam_core.model._set_by_slot): one way to build records,
# for the core and for plugins. (The name stays for callers that knew it.)
_record = FileRecord


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


class Records(tuple):
    """The records a policy is offered (a plain tuple to any plugin), carrying the rest of the
    tree a share needs: ``stubs``, the clean stubs policies could have chosen had they been
    local (pinned and ignored ones excluded). A share of "the tree" must count them, or it
    shrinks with every run (``jam_lru``)."""

    stubs: tuple[FileRecord, ...] = ()
