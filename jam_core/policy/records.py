"""The records every policy sees: one scan of a root into a plain :class:`FileRecord` per file.

``last_used`` is the newest of atime (unless ``[policy] use_atime = false``), mtime and jam's
own record of use (the catalog's uses, and the cd hooks' visits folded into them). Files that
must never leave are set aside with the reason: pinned, ignored by ``ROOT/.jamignore``
(gitignore syntax), hard-linked, dirty or unreadable stubs, empty or smaller than
``core.min_size``.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jam_core.errors import UsageError
from jam_core.model import FileRecord
from jam_core.policy.pins import covered, read_pins
from jam_core.root import CATALOG, Root
from jam_core.scan import BAD, DIRTY, LOCAL, QUICK, STUB, Share, classify, gc_paused, scan_shared

IGNORE_FILE = ".jamignore"
IGNORE_MAX = 16 << 20  # as the pins file's cap


class _Columns(Mapping):
    """``{path: FileRecord}`` to read, held as parallel lists whose first is ``paths``: a record
    is made only for a path asked for (``record(i)``, by the subclass)."""

    __slots__ = ()

    def index(self) -> dict[str, int]:
        """``{path: position in the lists}`` (built once, until a file is added)."""
        if self._index is None:
            self._index = dict(zip(self.paths, range(len(self.paths)), strict=True))
        return self._index

    def record(self, i: int) -> FileRecord:
        raise NotImplementedError

    def __getitem__(self, path: str) -> FileRecord:
        return self.record(self.index()[path])

    def __contains__(self, path: object) -> bool:
        return path in self.index()

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.paths)} files)"


class Candidates(_Columns):
    """The local files policies may choose, held as parallel lists (path, size, mtime, atime,
    last_used, inode): a dry-run over 100,000 files makes a record only for a path asked for
    (``Records.columns`` lets a policy choose on the lists). The inode is what the stash of a
    plan checks: the file at a chosen path is still the one judged."""

    __slots__ = ("paths", "sizes", "mtimes", "atimes", "lasts", "inos", "_index")

    def __init__(self, records: Iterable[FileRecord] = ()):
        self.paths: list[str] = []
        self.sizes: list[int] = []
        self.mtimes: list[float] = []
        self.atimes: list[float] = []
        self.lasts: list[float] = []
        self.inos: list[int] = []
        self._index: dict[str, int] | None = None
        for r in records:
            self.add(r.path, r.size, r.mtime, r.atime, r.last_used)

    def add(self, path: str, size: int, mtime: float, atime: float, last_used: float, ino: int = 0) -> None:
        self.paths.append(path)
        self.sizes.append(size)
        self.mtimes.append(mtime)
        self.atimes.append(atime)
        self.lasts.append(last_used)
        self.inos.append(ino)
        self._index = None

    def inodes_of(self, paths: Iterable[str]) -> dict[str, int]:
        """``{path: inode}`` of the candidates among ``paths`` (0: not known)."""
        wanted = set(paths)
        return {p: ino for p, ino in zip(self.paths, self.inos, strict=True) if p in wanted}

    def size_and_last(self, path: str) -> tuple[int, float] | None:
        """``(size, last_used)`` of a candidate, None if ``path`` is not one (no record made)."""
        i = self.index().get(path)
        return None if i is None else (self.sizes[i], self.lasts[i])

    def record(self, i: int) -> FileRecord:
        return FileRecord(self.paths[i], self.sizes[i], self.mtimes[i], self.atimes[i], self.lasts[i], LOCAL, False, 1)


class Stubs(_Columns):
    """The clean stubs of a scan, held as parallel lists (path, size, mtime, atime, last_used,
    nlink): a FileRecord is made only for a stub asked for (the age policy asks for none)."""

    __slots__ = ("paths", "sizes", "mtimes", "atimes", "lasts", "nlinks", "_index")

    def __init__(self):
        self.paths: list[str] = []
        self.sizes: list[int] = []
        self.mtimes: list[float] = []
        self.atimes: list[float] = []
        self.lasts: list[float] = []
        self.nlinks: list[int] = []
        self._index: dict[str, int] | None = None

    def columns(self) -> tuple[list, ...]:
        return self.paths, self.sizes, self.mtimes, self.atimes, self.lasts, self.nlinks

    def add(self, path: str, size: int, mtime: float, atime: float, last_used: float, nlink: int) -> None:
        for column, value in zip(self.columns(), (path, size, mtime, atime, last_used, nlink), strict=True):
            column.append(value)
        self._index = None

    def record(self, i: int) -> FileRecord:
        return FileRecord(self.paths[i], self.sizes[i], self.mtimes[i], self.atimes[i], self.lasts[i], STUB, False,
                          self.nlinks[i])

    def sorted_records(self) -> list[FileRecord]:
        """Every stub's record, by path."""
        return [self.record(i) for i in sorted(range(len(self.paths)), key=self.paths.__getitem__)]


@dataclass
class Inventory:
    """One scan of a root, split into what policies may choose and what they may not."""

    candidates: Candidates = field(default_factory=Candidates)  # local files policies may stash
    stubs: Stubs = field(default_factory=Stubs)  # clean stubs (for fetch)
    # why policies may not have a file, a group per directory and reason: (why, "dir/", names)
    kept_groups: list[tuple[str, str, list[str]]] = field(default_factory=list)
    local_bytes: int = 0  # the bytes on this disk of every file that is not a stub (see on_disk)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def kept(self) -> dict[str, str]:
        """``{path: why}`` of the files policies may not have (made from the groups)."""
        return {prefix + name: why for why, prefix, names in self.kept_groups for name in names}

    def kept_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for why, _, names in self.kept_groups:
            counts[why] = counts.get(why, 0) + len(names)
        return counts


def load_ignore(root: Root):
    """The ``ROOT/.jamignore`` matcher (gitignore syntax), or None if there is no such file."""
    from jam_core.root import read_capped

    path = root.path / IGNORE_FILE
    try:  # it sits in the tree (a tar unpacked there): a FIFO is never waited on, a device never read
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        text = read_capped(fd, os.fstat(fd), path, IGNORE_MAX, "an ignore file").decode(
            "utf-8", errors="surrogateescape")
    finally:
        os.close(fd)
    import pathspec

    try:
        return pathspec.GitIgnoreSpec.from_lines(text.splitlines())
    except Exception as exc:  # pathspec raises several kinds for a bad pattern
        raise UsageError(f"{path}: bad pattern: {exc}") from None


def on_disk(st: os.stat_result) -> int:
    """What a file that is not a stub holds on this disk, for the budget: its size, or less
    when sparse (its allocated blocks), shared among its hard links (each name counts its part,
    so a file with ten names counts once)."""
    return min(st.st_size, st.st_blocks * 512) // max(st.st_nlink, 1)


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
    stubs, groups = inv.stubs, inv.kept_groups
    add_stub = stubs.add
    add_group = groups.append
    cands = inv.candidates
    add_path, add_size, add_mtime, add_atime, add_last, add_ino = (
        cands.paths.append, cands.sizes.append, cands.mtimes.append, cands.atimes.append, cands.lasts.append,
        cands.inos.append)
    uses_get = uses.get if uses else None
    match = ignore.match_file if ignore is not None else None
    fsencode, stamp_of = os.fsencode, stamps.get
    fs_encoding, fs_errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsencode's
    local = [0]  # local bytes (a list: each adds to it)

    lo = max(min_size, 1)  # an empty file is never a candidate
    pin_dirs = {p.rpartition("/")[0] or "." for p in pins}  # directories holding a pin

    def each(d, base, names, stats):
        if match is not None or (pins and (d in pin_dirs or covered(d, pins))):
            return each_pinned(d, base, names, stats)
        local_bytes = 0  # a directory with no pin and no .jamignore: no test per file for them
        prefix = "" if d == "." else d + "/"
        small = []  # the directory's files too small to choose: one group, no path made
        for name, st in zip(names, stats, strict=True):
            size = st.st_size
            if st.st_mode & 0o222 and st.st_blocks * 512 >= size:  # writable, not sparse: local
                local_bytes += size if st.st_nlink == 1 else size // st.st_nlink  # once per inode
                if size >= lo and st.st_nlink == 1:
                    rel = prefix + name  # the common case: a candidate
                    mtime = st.st_mtime
                    atime = st.st_atime
                    last = atime if atime_ok and atime > mtime else mtime
                    if uses_get is not None:
                        used = uses_get(rel)
                        if used is not None and used > last:
                            last = used
                    add_path(rel)  # no record made: Candidates holds the lists
                    add_size(size)
                    add_mtime(mtime)
                    add_atime(atime)
                    add_last(last)
                    add_ino(st.st_ino)
                elif st.st_nlink == 1:  # (not pinned, not ignored, local: a single link means too small)
                    small.append(name)
                else:
                    add_group((_kept(LOCAL, st, False, False, min_size), prefix, [name]))
                continue
            rel = prefix + name  # the catalog's stamps are keyed by os.fsencode(rel)
            state = classify(base + name, st, QUICK, stamp=stamp_of(rel.encode(fs_encoding, fs_errors)))[0]
            if state == STUB:  # a clean stub's size is its original's (else it is dirty)
                add_stub(rel, size, st.st_mtime, st.st_atime, _last_used(st, rel, atime_ok, uses_get), st.st_nlink)
                continue
            local_bytes += on_disk(st)
            if state != LOCAL or st.st_nlink != 1 or size < lo:
                add_group((_kept(state, st, False, False, min_size), prefix, [name]))
                continue
            cands.add(rel, size, st.st_mtime, st.st_atime, _last_used(st, rel, atime_ok, uses_get), st.st_ino)
        if small:
            add_group((SMALL, prefix, small))
        local[0] += local_bytes

    def each_pinned(d, base, names, stats):
        local_bytes = 0
        prefix = "" if d == "." else d + "/"
        dprefix = None
        dir_pinned = covered(d, pins)
        for name, st in zip(names, stats, strict=True):
            size = st.st_size
            if st.st_mode & 0o222 and st.st_blocks * 512 >= size:  # writable, not sparse: local
                local_bytes += size if st.st_nlink == 1 else size // st.st_nlink  # once per inode
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
                    add_path(rel)  # no record made: Candidates holds the lists
                    add_size(size)
                    add_mtime(mtime)
                    add_atime(atime)
                    add_last(last)
                    add_ino(st.st_ino)
                    continue
                state = LOCAL
            else:
                if dprefix is None:
                    dprefix = b"" if d == "." else fsencode(d) + b"/"
                state = classify(base + name, st, QUICK, stamp=stamp_of(dprefix + fsencode(name)))[0]
                if state != STUB:
                    local_bytes += on_disk(st)
            rel = prefix + name
            pinned = dir_pinned or (pins and rel in pins)
            ignored = match is not None and match(rel)
            if state == STUB:  # a clean stub's size is its original's (else it is dirty)
                if not pinned and not ignored:
                    add_stub(rel, size, st.st_mtime, st.st_atime, _last_used(st, rel, atime_ok, uses_get), st.st_nlink)
                continue
            if pinned or ignored or state != LOCAL or st.st_nlink != 1 or size < min_size or size == 0:
                add_group((_kept(state, st, pinned, ignored, min_size), prefix, [name]))
                continue
            cands.add(rel, size, st.st_mtime, st.st_atime, _last_used(st, rel, atime_ok, uses_get), st.st_ino)
        local[0] += local_bytes

    columns = (cands.paths, cands.sizes, cands.mtimes, cands.atimes, cands.lasts, cands.inos)
    stub_columns = stubs.columns()

    def fresh():  # in the helper process: only what it finds goes back
        for column in columns + stub_columns:
            column.clear()
        groups.clear()
        inv.problems.clear()
        local[0] = 0

    def collect():  # in the helper: blobs, not objects (pickled and unpickled by one copy each)
        return (_pack(columns, "qdddq"), _pack(stub_columns, "qdddq"),
                [(why, prefix, _SEP.join(names)) for why, prefix, names in groups], inv.problems, local[0])

    def merge(found):
        cols, more_stubs, more_kept, problems, more_local = found
        for column, more in zip(columns, _unpack(cols, "qdddq"), strict=True):
            column.extend(more)
        cands._index = None
        for column, more in zip(stub_columns, _unpack(more_stubs, "qdddq"), strict=True):
            column.extend(more)
        stubs._index = None
        groups.extend((why, prefix, names.split(_SEP)) for why, prefix, names in more_kept)
        inv.problems.extend(problems)
        local[0] += more_local

    scan_shared(str(root.path), ".", on_error, each, Share(fresh, collect, merge))
    inv.local_bytes += local[0]


_SEP = "\0"  # in no path
SMALL = "smaller than core.min_size"


def _pack(columns: Sequence[list], kinds: str) -> tuple:
    """Parallel lists as one string of paths (joined by NUL) and one array of machine numbers
    per other list (``kinds``: an array typecode each): what the shared walk's helper sends
    back, pickled in a few large copies rather than an object per value."""
    paths, *rest = columns
    return (_SEP.join(paths), len(paths), *(array(k, col).tobytes() for k, col in zip(kinds, rest, strict=True)))


def _unpack(packed: tuple, kinds: str) -> list[list]:
    """The lists :func:`_pack` made."""
    joined, n, *blobs = packed
    out = [joined.split(_SEP) if n else []]
    for kind, blob in zip(kinds, blobs, strict=True):
        a = array(kind)
        a.frombytes(blob)
        out.append(a.tolist())
    return out


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
        return SMALL
    return ""


class Records(Sequence):
    """The records a policy is offered (a sequence of FileRecords, sorted by path), carrying
    the rest of the tree a share needs: ``stubs``, the clean stubs policies could have chosen
    had they been local (pinned and ignored ones excluded). A share of "the tree" must count
    them, or it shrinks with every run (``jam_lru``).

    Made from ``Candidates``, the records are built on first use: a policy that reads only
    ``columns`` (``(paths, last_used)``, two parallel lists in no particular order; None when
    the records were given one by one) makes none (``jam_age``); ``sizes`` is the list of
    sizes parallel to them (``jam_lru``, ``jam_budget``)."""

    def __init__(self, records: Iterable[FileRecord] = (), candidates: Candidates | None = None):
        self._candidates = candidates
        self._items: tuple[FileRecord, ...] | None = None if candidates is not None else tuple(records)
        self._stubs: tuple[FileRecord, ...] | Callable[[], Iterable[FileRecord]] = ()

    @property
    def stubs(self) -> tuple[FileRecord, ...]:
        """The tree's clean stubs (a tuple of FileRecords, by path), made on first read when
        the core handed a function that makes them."""
        stubs = self._stubs
        if callable(stubs):
            stubs = self._stubs = tuple(stubs())
        return stubs

    @stubs.setter
    def stubs(self, value) -> None:
        self._stubs = value if callable(value) else tuple(value)

    @property
    def columns(self) -> tuple[list[str], list[float]] | None:
        c = self._candidates
        return None if c is None else (c.paths, c.lasts)

    @property
    def sizes(self) -> list[int] | None:
        """The sizes, parallel to ``columns`` (None when they are)."""
        c = self._candidates
        return None if c is None else c.sizes

    def _all(self) -> tuple[FileRecord, ...]:
        if self._items is None:
            c = self._candidates
            self._items = tuple(map(c.record, sorted(range(len(c.paths)), key=c.paths.__getitem__)))
        return self._items

    def __len__(self) -> int:
        return len(self._candidates) if self._items is None else len(self._items)

    def __getitem__(self, i):
        return self._all()[i]

    def __iter__(self) -> Iterator[FileRecord]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Records):
            other = other._all()
        return isinstance(other, tuple) and self._all() == other

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other):
        return self._all() + tuple(other)

    def __repr__(self) -> str:
        return f"Records({len(self)} files, {len(self.stubs)} stubs)"
