"""Status: per directory and in total, what is local, what is stubbed, what it all weighs."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from operator import attrgetter

from jam_core.policy.pins import covered
from jam_core.root import Root
from jam_core.scan import (
    ALWAYS,
    BAD,
    DIRTY,
    LOCAL,
    PART,
    QUICK,
    STUB,
    Share,
    classify,
    gc_paused,
    scan_shared,
    untouched,
)
from jam_core.stub import LOST_XATTRS

_size, _blocks, _nlink = attrgetter("st_size"), attrgetter("st_blocks"), attrgetter("st_nlink")


@dataclass
class Tally:
    local: int = 0
    stubs: int = 0
    dirty: int = 0
    bad: int = 0
    bytes: int = 0  # true size of the files
    disk_bytes: int = 0  # what they take on this disk
    local_bytes: int = 0
    stub_bytes: int = 0  # true size of the stubbed files (what lives on remotes)
    pinned: int = 0  # files covered by a pin (policies never stash them)

    def add(self, state: str, size: int, disk: int) -> None:
        self.bytes += size
        self.disk_bytes += disk
        if state == LOCAL:
            self.local += 1
            self.local_bytes += size
        elif state == STUB:
            self.stubs += 1
            self.stub_bytes += size
        elif state == DIRTY:
            self.dirty += 1
        elif state == BAD:
            self.bad += 1

    @property
    def files(self) -> int:
        return self.local + self.stubs + self.dirty + self.bad


@dataclass
class Status:
    root: str
    path: str
    directories: dict[str, Tally] = field(default_factory=dict)
    total: Tally = field(default_factory=Tally)
    problems: list[tuple[str, str]] = field(default_factory=list)
    pins: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "root": self.root,
            "path": self.path,
            "total": asdict(self.total) | {"files": self.total.files},
            "directories": [
                {"path": d} | asdict(t) | {"files": t.files} for d, t in sorted(self.directories.items())
            ],
            "problems": [{"path": p, "problem": why} for p, why in self.problems],
            "pins": self.pins,
        }


def status(root: Root, rel: str = ".") -> Status:
    """One scan of ``rel``: a stat per file, an xattr read only where the stat suggests a stub.

    The catalog is a cache trusted where the stat says nothing changed: a stub whose lstat
    matches the stamp recorded when jam made it (size, mtime, inode, ctime) is counted without
    reading anything. Any other possible stub is read and its bytes checked; one found clean
    whose catalog row names the same content gets its stamp recorded (``_remember``), so the
    next status trusts it without reading it again. A stub no row names by its path (moved
    with ``mv``) is matched to its row by inode."""
    result = Status(root=str(root.path), path=rel)

    def on_error(r, exc):
        result.problems.append((r, exc.strerror or str(exc)))

    pins, stamps = _from_catalog(root, rel)
    result.pins = sorted(pins)
    try:
        with gc_paused():
            checked = _scan(root, rel, result, pins, stamps, on_error)
    finally:
        stamps.close()
    if checked:
        _remember(root, checked)
    return result


def _scan(root: Root, rel: str, result: Status, pins: set[str], stamps: "_Stamps", on_error) -> list:
    """The tallies of one scan into ``result``; returns the stubs read and found clean whose
    catalog row has no matching stamp (what ``_remember`` records). A large root is walked by
    two processes (``scan.scan_shared``), each loading the catalog's stamps of the directories
    it walks: the helper's tallies, problems and stubs to stamp come back to this one."""
    fsencode = os.fsencode
    checked: list[tuple[bytes, str, os.stat_result]] = []  # read and found clean: stamps to record
    linked: list[tuple[str, int, int, int]] = []  # (directory, st_dev, st_ino, bytes) of hard-linked files
    directories = result.directories
    problems = result.problems
    known = stamps.dirs  # {directory: {name: stamp}} of the stubs the catalog knows, loaded as walked

    def each(d, base, names, stats):  # (a large directory comes in parts: each adds to its tally)
        t = directories.get(d)
        if t is None:
            t = directories[d] = Tally()
        size_sum = sum(map(_size, stats))  # sums in C: no Python step per file
        t.bytes += size_sum
        t.disk_bytes += sum(map(_blocks, stats)) * 512
        if stats and max(map(_nlink, stats)) > 1:  # a file's blocks are counted once, not once per name
            for st in stats:
                if st.st_nlink > 1:
                    t.disk_bytes -= st.st_blocks * 512
                    linked.append((d, st.st_dev, st.st_ino, st.st_blocks * 512))
        # the files the stat alone does not settle; the rest are writable and not sparse: local.
        # A name the catalog knows as a stub is read too: a stub smaller than a block fills
        # it (not sparse), and `chmod -R g+w` makes it writable.
        here = stamps.top(names) if d == "." and stamps.at_top else known.get(d)
        if here:
            odd = [i for i, st in enumerate(stats) if not (st.st_mode & 0o222 and st.st_blocks * 512 >= st.st_size)
                   or names[i] in here]
        else:
            odd = [i for i, st in enumerate(stats) if not (st.st_mode & 0o222 and st.st_blocks * 512 >= st.st_size)]
        t.local += len(stats) - len(odd)
        t.local_bytes += size_sum - sum(stats[i].st_size for i in odd) if odd else size_sum
        if pins:
            t.pinned += len(names) if covered(d, pins) else sum(
                covered(n if d == "." else f"{d}/{n}", pins) for n in names)
        if not odd:
            return
        clean = untouched(here, names, stats, odd) if here else ()  # the catalog's stubs, untouched since
        if clean:
            t.stubs += len(clean)
            t.stub_bytes += sum(stats[i].st_size for i in clean)
            if len(clean) == len(odd):
                return
        for i in odd:
            if i in clean:
                continue
            name, st = names[i], stats[i]
            rel_path = name if d == "." else f"{d}/{name}"
            key = stamp = None
            if here:
                stamp = here.get(name)
            if stamp is None and not st.st_mode & 0o222:
                # No row names this path: a stub moved with `mv` (of itself or of a directory
                # above it) keeps its inode, and its row, at the old path, keeps its stamp
                # (ctime included, unless the stub itself was renamed). The stamp vouches for
                # that inode alone, wherever it is now; a stub read and found clean here has
                # its stamp recorded on that row, so the next status trusts it unread.
                key, stamp = stamps.moved(st.st_ino)
            look = ALWAYS if stamp is not None else QUICK  # the catalog's stubs: their xattr, whatever the stat
            state, rec, problem = classify(base + name, st, look, stamp=stamp, verify=True)
            if state == STUB:
                t.stubs += 1
                t.stub_bytes += st.st_size
                if rec is not None and stamp is not None and not problem:
                    checked.append((key or fsencode(rel_path), rec.oid, st))
            elif state == LOCAL:
                t.local += 1
                t.local_bytes += st.st_size
            elif state == DIRTY:
                t.dirty += 1
            else:
                t.bad += 1
            if state in (DIRTY, BAD) or problem:
                if state == DIRTY:
                    problem = "stub written into after stashing" + (f" ({problem})" if problem else "")
                elif problem == LOST_XATTRS:
                    problem = f"a stub that {problem}: `jam doctor --fix` restores them"
                problems.append((rel_path, problem))

    def fresh():  # in the helper: only what it finds goes back
        directories.clear()
        problems.clear()
        checked.clear()
        linked.clear()

    def merge(found):
        dirs, probs, stamps, links = found
        directories.update(dirs)
        problems.extend(probs)
        checked.extend(stamps)
        linked.extend(links)

    scan_shared(str(root.path), rel, on_error, each,
                Share(fresh, lambda: (directories, problems, checked, linked), merge, stamps.enter, stamps.close))
    counted = set()
    for d, dev, ino, n in linked:  # each inode once, in the first directory found holding it (as du)
        if (dev, ino) not in counted:
            counted.add((dev, ino))
            directories[d].disk_bytes += n
    total = result.total
    for t in directories.values():
        for k, v in t.__dict__.items():
            setattr(total, k, getattr(total, k) + v)
    return checked


def _remember(root: Root, checked: list[tuple[bytes, str, os.stat_result]]) -> None:
    """Record the stamps (inode, ctime) of stubs this scan read and found clean, on the catalog
    rows that name the same content (id, size, mtime): the next scan trusts them from their
    stat. Only when no other jam holds the root (never waits), and only as a cache: a root
    that cannot be written, or a catalog that is busy or damaged, is simply not updated. A
    stamp that went stale meanwhile (the file changed again) matches no later stat: it costs a
    read, never a wrong answer."""
    from jam_core.catalog import Catalog
    from jam_core.errors import JamError
    from jam_core.root import CATALOG

    try:
        with root.lock(wait=False), Catalog(root.jam_dir / CATALOG) as cat:
            cat.record_stamps([(key, oid, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
                               for key, oid, st in checked])
    except (JamError, OSError):
        pass


def _from_catalog(root: Root, rel: str) -> tuple[set[str], "_Stamps"]:
    """The pins, and what loads the stamps of the stubs the catalog knows (``_Stamps``)."""
    from jam_core.policy.pins import read_pins
    from jam_core.root import CATALOG

    pins = read_pins(root)  # ROOT/.jam/pins: pins survive a rebuilt catalog
    db = root.jam_dir / CATALOG
    return pins, _Stamps(db if db.exists() else None)


class _Stamps:
    """The stamps (size, mtime, inode, ctime) of the stubs the catalog knows, loaded a part of
    the tree at a time (``enter``) by the process about to walk it: a shared walk's helper
    opens a connection of its own (``close`` runs before the fork: no connection crosses it).
    The catalog is a cache: one that cannot be opened (a root the user may read but not write,
    another jam holding it) leaves status to read every possible stub; a damaged one is said
    (`jam doctor --fix`)."""

    def __init__(self, db):
        self.db = db  # None: no catalog (or none that can be read): every possible stub is read
        self.cat = None
        self.dirs: dict[str, dict[str, tuple]] = {}
        self.by_ino: dict[int, tuple[bytes, tuple]] | None = None
        self.at_top = False  # the root's own files are walked here: their stamps come from ``top``

    def _read(self, query):
        """``query(catalog)``, or None if there is no catalog that can be read."""
        from jam_core.catalog import Catalog, CatalogDamaged, CatalogError

        if self.db is None:
            return None
        try:
            if self.cat is None:
                self.cat = Catalog(self.db)
            return query(self.cat)
        except CatalogDamaged:
            raise
        except CatalogError:
            self.close()
            self.db = None
            return None

    def enter(self, part: str, whole: bool) -> None:
        if part == "." and not whole:  # the root's own files: looked up by name as they come (``top``)
            self.at_top = True
            return
        found = self._read(lambda cat: cat.stamps_by_dir(part, children=not whole))
        if found:
            self.dirs.update(found)

    def top(self, names: list[str]) -> dict[str, tuple]:
        """The stamps of the files ``names`` directly in the root (a part of its listing), by
        name: the rows of a root's own files lie all over the catalog's order. A part as large
        as a walk hands out (a root of many files) loads every one of the root's own at once."""
        here = self.dirs.setdefault(".", {})
        if len(names) < PART:
            here.update(self._read(lambda cat: cat.stamps_of(names)) or ())
        else:
            here.update((self._read(lambda cat: cat.stamps_by_dir(".", children=True)) or {}).get(".", ()))
            self.at_top = False  # all of them are in self.dirs now
        return here

    def moved(self, ino: int) -> tuple[bytes | None, tuple | None]:
        """(the row's path, its stamp) of the stub the catalog knows by inode ``ino`` (the
        whole catalog's, loaded once when first asked), or (None, None)."""
        if self.by_ino is None:
            rows = self._read(lambda cat: cat.stub_stamps())
            self.by_ino = {v[2]: (k, v) for k, v in rows.items() if v[2] is not None} if rows else {}
        return self.by_ino.get(ino, (None, None))

    def close(self) -> None:
        cat, self.cat = self.cat, None
        if cat is not None:
            try:
                cat.close()
            except Exception:  # noqa: BLE001 (only read from: nothing to lose)
                pass
