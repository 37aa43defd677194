"""Browse: what a viewer of one directory needs, read from one listing, one status scan and
the catalog. The TUI shows these; it decides nothing about files itself.

* :func:`entries`: one row per entry of a directory (one scandir by directory descriptor,
  never through a symlink), each file classified by ``scan.classify`` with the catalog's stamp
  of the stubs of that directory (one query), so an untouched stub costs no xattr read; stubs
  carry the remotes the catalog knows hold their object, every file its last use.
* :func:`catalog_totals`: per child directory, the stubs below it and their bytes, from one
  GROUP BY of the catalog (no walk): what directory rows show before a scan's totals arrive.
* :func:`dir_totals`: per child directory, the totals of everything below it (true bytes,
  local bytes, disk bytes, files, stubs), folded from one :func:`jam_core.ops.status.status`.
* :func:`summary`: local bytes, stashed bytes and free space of the root's disk.
* :func:`details`: the info of one path: its stub metadata, pins covering it, remotes.
* :func:`holdings`: objects and bytes each remote holds for this root (catalog).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from jam_core.fs import fd_path, is_jam_tmp, open_dir, open_regular
from jam_core.ops.status import Status, Tally, status
from jam_core.policy.pins import covered, read_pins
from jam_core.root import CATALOG, JAM_DIR, Root
from jam_core.scan import BAD, DIRTY, LIKELY, LOCAL, STUB, classify
from jam_core.stub import HEADER_MAX, BadStub, StubRecord

FILE, DIR, LINK, OTHER = "file", "dir", "link", "other"
ALL_LOCAL, PARTLY, ALL_STUBS, EMPTY = "local", "partly", "stubs", "empty"


@dataclass
class Row:
    """One entry of a directory. ``size`` is the true size (a directory: of everything below
    it, once its totals are known), ``local`` the bytes of content held on this disk, ``disk``
    what the entry takes on this disk (blocks)."""

    name: str
    rel: str
    kind: str  # file, dir, link, other
    state: str  # files: local/stub/dirty/bad; dirs: local/partly/stubs/empty ("" until totals)
    size: int = 0
    local: int = 0
    disk: int = 0
    last_used: float = 0.0
    remotes: tuple[str, ...] = ()
    pinned: bool = False
    files: int = 0  # directories: files below
    stubs: int = 0  # directories: stubs below
    problem: str = ""
    oid: str = ""
    totals: bool = False  # directories: totals filled in
    stub_bytes: int = 0  # directories: true bytes of the stubs below (from the catalog)
    stubs_known: bool = False  # directories: stubs (and stub_bytes) known from the catalog

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR


def join(rel: str, name: str) -> str:
    return name if rel in ("", ".") else f"{rel}/{name}"


def parent(rel: str) -> str:
    return rel.rpartition("/")[0] or "."


def _catalog(root: Root):
    from jam_core.catalog import Catalog

    db = root.jam_dir / CATALOG
    return Catalog(db) if db.exists() else None


def entries(root: Root, rel: str = ".") -> list[Row]:
    """The entries of directory ``rel``: one scandir through directory descriptors (a
    component that is a symlink raises ``fs.ThroughSymlink``), files classified, directories
    without totals (:func:`dir_totals` fills them in). ``.jam`` at the top and jam's own
    temporary files are left out. A stub whose lstat still matches the catalog's stamp (size,
    mtime, inode, ctime: nothing touched it since jam made it) is trusted without reading its
    xattr, as ``scan.classify`` does with ``stamp=``; its id comes from the catalog."""
    rows: list[Row] = []
    pins = read_pins(root)
    try:
        cat = _catalog(root)
    except Exception:  # a damaged catalog is only a cache: show what the files say
        cat = None
    try:
        known = _stubs_here(cat, rel) if cat is not None else {}
    except Exception:  # noqa: BLE001  same: the files decide
        known = {}
    root_fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = open_dir(root_fd, rel) if rel not in ("", ".") else os.dup(root_fd)
    except BaseException:
        if cat is not None:
            cat.close()
        raise
    finally:
        os.close(root_fd)
    try:
        base = fd_path(fd) + "/"
        with os.scandir(fd) as it:
            listed = list(it)
        for e in listed:
            name = e.name
            if (rel in ("", ".") and name == JAM_DIR) or is_jam_tmp(name):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished while we looked
            r = join(rel, name)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                rows.append(Row(name, r, DIR, "", last_used=st.st_mtime))
            elif stat.S_ISREG(mode):
                stamp, oid = known.get(os.fsencode(name), (None, ""))
                state, rec, problem = classify(base + name, st, LIKELY, stamp=stamp)
                local = st.st_size if state == LOCAL else 0
                row = Row(name, r, FILE, state, st.st_size, local, st.st_blocks * 512,
                          max(st.st_atime, st.st_mtime), problem=problem)
                if rec is not None:
                    row.size, row.oid, row.remotes = rec.size, rec.oid, tuple(rec.remotes)
                elif state == STUB and oid:
                    row.oid = oid  # trusted by its stamp: the catalog's record of this very inode
                rows.append(row)
            else:
                rows.append(Row(name, r, LINK if stat.S_ISLNK(mode) else OTHER, "", disk=st.st_blocks * 512,
                                last_used=st.st_mtime))
    finally:
        os.close(fd)
        if cat is not None:
            cat.close()
    _annotate(root, rows, pins)
    return rows


_SLASH = b"/"


def _stubs_here(cat, rel: str) -> dict[bytes, tuple[tuple, str]]:
    """``{name (bytes): ((size, mtime_ns, ino, ctime_ns), oid)}`` of the stubs the catalog
    records directly in ``rel`` (one query; names only compared with what scandir found)."""
    sql = "SELECT path, size, mtime_ns, ino, ctime_ns, oid FROM stubs WHERE "
    if rel in ("", "."):
        rows, cut = cat.db.execute(sql + "instr(path, ?) = 0", (_SLASH,)), 0
    else:
        prefix = os.fsencode(rel) + _SLASH
        cut = len(prefix)
        rows = cat.db.execute(sql + "path >= ? AND path < ? AND instr(substr(path, ?), ?) = 0",
                              (prefix, prefix[:-1] + b"0", cut + 1, _SLASH))
    out = {}
    for p, size, mtime, ino, ctime, oid in rows:
        if isinstance(p, bytes) and ino is not None and ctime is not None:
            out[p[cut:]] = ((size, mtime, ino, ctime), oid)
    return out


def catalog_totals(root: Root, rel: str = ".") -> dict[str, tuple[int, int]]:
    """``{child directory name: (stubs, their true bytes)}`` below each child directory of
    ``rel``, as the catalog records them: one GROUP BY, no walk (local bytes need the walk of
    :func:`dir_totals`). Empty when there is no readable catalog."""
    try:
        cat = _catalog(root)
    except Exception:
        return {}
    if cat is None:
        return {}
    prefix = b"" if rel in ("", ".") else os.fsencode(rel) + _SLASH
    cut = len(prefix) + 1
    sql = ("SELECT substr(path, ?, instr(substr(path, ?), ?) - 1) AS child, COUNT(*), COALESCE(SUM(size), 0) "
           "FROM stubs WHERE instr(substr(path, ?), ?) > 0")
    args: tuple = (cut, cut, _SLASH, cut, _SLASH)
    if prefix:
        sql += " AND path >= ? AND path < ?"
        args += (prefix, prefix[:-1] + b"0")
    try:
        with cat:
            rows = cat.db.execute(sql + " GROUP BY child", args)
    except Exception:  # noqa: BLE001  only a cache
        return {}
    out = {}
    for child, n, nbytes in rows:
        if isinstance(child, bytes) and child:
            out[os.fsdecode(child)] = (int(n), int(nbytes))
    return out


def apply_catalog_totals(rows: list[Row], known: dict[str, tuple[int, int]]) -> None:
    """The stubs below each directory row, from :func:`catalog_totals` (rows whose full
    totals already arrived are left alone)."""
    for row in rows:
        if row.kind == DIR and not row.totals:
            row.stubs, row.stub_bytes = known.get(row.name, (0, 0))
            row.stubs_known = True


def _annotate(root: Root, rows: list[Row], pins=None) -> None:
    """Pins, last uses and the remotes holding each stub's object, from one catalog query each."""
    if pins is None:
        pins = read_pins(root)
    for row in rows:
        row.pinned = bool(pins) and covered(row.rel, pins)
    try:
        cat = _catalog(root)
    except Exception:  # a damaged catalog is only a cache: show what the files say
        return
    if cat is None:
        return
    with cat:
        oids = [r.oid for r in rows if r.oid]
        held = cat.remotes_of(oids) if oids else {}
        uses = _uses(cat, [r.rel for r in rows if r.kind == FILE])
    for row in rows:
        if row.oid:
            row.remotes = tuple(sorted(set(row.remotes) | held.get(row.oid, set())))
        used = uses.get(row.rel)
        if used and used > row.last_used:
            row.last_used = used


def _uses(cat, rels: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for i in range(0, len(rels), 500):
        chunk = [os.fsencode(r) for r in rels[i:i + 500]]
        q = f"SELECT path, last_used FROM uses WHERE path IN ({','.join('?' * len(chunk))})"
        for p, t in cat.db.execute(q, chunk):
            out[os.fsdecode(p)] = t
    return out


def dir_state(t: Tally) -> str:
    stubbed = t.stubs + t.dirty
    if t.files == 0:
        return EMPTY
    if stubbed == 0:
        return ALL_LOCAL
    if t.local == 0 and t.bad == 0:
        return ALL_STUBS
    return PARTLY


@dataclass
class Totals:
    """Per child directory of ``rel``, the totals below it; ``here`` the files of ``rel``
    itself; ``total`` all of it. ``problems`` as status reports them."""

    children: dict[str, Tally] = field(default_factory=dict)
    here: Tally = field(default_factory=Tally)
    total: Tally = field(default_factory=Tally)
    problems: list[tuple[str, str]] = field(default_factory=list)


def _add(into: Tally, t: Tally) -> None:
    for k, v in t.__dict__.items():
        setattr(into, k, getattr(into, k) + v)


def dir_totals(root: Root, rel: str = ".", tree: Status | None = None) -> Totals:
    """Totals of every child directory of ``rel``, folded from one status scan: ``tree`` (a
    status of the whole root, or of any directory at or above ``rel``, kept by a caller that
    moves around the tree) or a new scan of ``rel``."""
    st = tree if tree is not None else status(root, rel)
    top = "" if rel in ("", ".") else rel + "/"
    out = Totals(problems=[p for p in st.problems if not top or p[0] == rel or p[0].startswith(top)])
    for d, t in st.directories.items():
        if d == rel or (d == "." and not top):
            _add(out.here, t)
            _add(out.total, t)
            continue
        if top and not d.startswith(top):
            continue
        child = d[len(top):].split("/", 1)[0]
        _add(out.children.setdefault(child, Tally()), t)
        _add(out.total, t)
    return out


def apply_totals(rows: list[Row], totals: Totals) -> None:
    """Fill in the directory rows of :func:`entries` from :func:`dir_totals`."""
    for row in rows:
        if row.kind != DIR:
            continue
        t = totals.children.get(row.name, Tally())
        row.size, row.local, row.disk = t.bytes, t.local_bytes, t.disk_bytes
        row.files, row.stubs = t.files, t.stubs + t.dirty
        row.state = dir_state(t)
        row.totals = True


@dataclass
class Summary:
    local_bytes: int
    stashed_bytes: int
    free: int
    files: int
    stubs: int


def summary(root: Root, tree: Status | None = None) -> Summary:
    """The whole root: content held here, content stashed away, free space on this disk
    (``tree``: a status of the whole root already made, else one is made)."""
    t = (tree if tree is not None else status(root, ".")).total
    v = os.statvfs(root.path)
    return Summary(t.local_bytes, t.stub_bytes, v.f_bavail * v.f_frsize, t.files, t.stubs)


@dataclass
class Details:
    rel: str
    kind: str
    state: str = ""
    size: int = 0
    mode: int = 0
    mtime_ns: int = 0
    oid: str = ""
    stashed_at: str = ""
    remotes: tuple[str, ...] = ()
    pins: tuple[str, ...] = ()  # the pins covering it
    problem: str = ""


def details(root: Root, rel: str) -> Details:
    """What the info pane shows of one path: for a stub its id, size, mode, when it was
    stashed and the remotes holding it (header block, xattr and catalog), and the pins that
    cover it. Read through directory descriptors; a symlink is never followed."""
    pins = read_pins(root)
    holding = tuple(sorted(p for p in pins if covered(rel, {p})))
    root_fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        dfd = open_dir(root_fd, parent(rel))
    finally:
        os.close(root_fd)
    try:
        name = rel.rpartition("/")[2]
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            kind = DIR if stat.S_ISDIR(st.st_mode) else LINK if stat.S_ISLNK(st.st_mode) else OTHER
            return Details(rel, kind, mode=stat.S_IMODE(st.st_mode), mtime_ns=st.st_mtime_ns, pins=holding)
        path = fd_path(dfd) + "/" + name
        state, rec, problem = classify(path, st, LIKELY)
        d = Details(rel, FILE, state, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, pins=holding,
                    problem=problem)
        if rec is None:
            return d
        d.size, d.mode, d.mtime_ns, d.oid = rec.size, rec.mode, rec.mtime_ns, rec.oid
        remotes, stashed = set(rec.remotes), rec.stashed_at
        if state in (STUB, DIRTY) and not stashed:
            try:
                full = _header(dfd, name, st, rec)
                remotes |= set(full.remotes)
                stashed = full.stashed_at
            except (OSError, BadStub):
                pass
    finally:
        os.close(dfd)
    try:
        cat = _catalog(root)
    except Exception:
        cat = None
    if cat is not None:
        with cat:
            remotes |= cat.remotes_of([d.oid]).get(d.oid, set())
            row = cat.db.execute("SELECT stashed_at FROM stubs WHERE path = ?", (os.fsencode(rel),)).fetchone()
            if row and not stashed:
                stashed = row[0]
    d.remotes, d.stashed_at = tuple(sorted(remotes)), stashed
    return d


def _header(dfd: int, name: str, st: os.stat_result, rec: StubRecord) -> StubRecord:
    """The full record from the stub's header block, read by descriptor (never a symlink,
    never a FIFO, only the inode that was classified)."""
    fd = open_regular(dfd, name, expect=st)
    try:
        full = StubRecord.from_header(os.pread(fd, HEADER_MAX, 0))
    finally:
        os.close(fd)
    if full.oid != rec.oid:
        raise BadStub("header names another object")
    return full


@dataclass
class Holding:
    objects: int = 0
    bytes: int = 0


def holdings(root: Root) -> dict[str, Holding]:
    """Per remote: the objects of this root's stubs the catalog knows it holds, and their bytes."""
    try:
        cat = _catalog(root)
    except Exception:
        return {}
    if cat is None:
        return {}
    with cat:
        rows = cat.db.execute("SELECT remote, COUNT(*), COALESCE(SUM(size), 0) FROM locations "
                              "WHERE oid IN (SELECT oid FROM stubs) GROUP BY remote")
        return {r: Holding(n, b) for r, n, b in rows}


__all__ = ["Row", "entries", "catalog_totals", "apply_catalog_totals",
           "dir_totals", "apply_totals", "summary", "details", "holdings", "Totals",
           "Summary", "Details", "Holding", "BAD", "DIRTY", "LOCAL", "STUB"]
