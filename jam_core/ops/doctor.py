"""Doctor: prove that every stub can come back, and repair what can be repaired.

Checks each stub's metadata and bytes, that some remote holds its object (``--deep``: fetches
it and verifies the hash), reports stubs that were written into, and with ``--fix``:

* restores ``user.jam`` from an intact header block (a copy that lost its xattrs, or a damaged
  xattr), and a lost header block (zeros) or one damaged below the filesystem (the catalog
  vouches that the stub's inode and ctime are those it was made with) from an intact xattr;
  a stub written into is never touched;
* moves a damaged catalog aside (``catalog.db.damaged-<time>``) and rebuilds the catalog
  from the tree (for the whole root: stubs, and which remotes hold their objects).
"""

from __future__ import annotations

import os
import shlex
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from jam_core.catalog import Catalog, CatalogDamaged
from jam_core.errors import RemoteError, UsageError
from jam_core.model import Remote, Session
from jam_core.root import CATALOG, Root
from jam_core.scan import ALWAYS, BAD, DIRTY, LOCAL, STUB, Entry, walk
from jam_core.stub import (
    HEADER_MAX,
    LOST_XATTRS,
    XATTR,
    BadStub,
    StubRecord,
    open_checked,
    record_from_block,
    rewrite_header,
    verify_clean,
)


@dataclass
class Problem:
    kind: str  # missing, corrupt, dirty, bad-metadata, lost-xattr, bad-header, unreachable, catalog, not-a-stub
    path: str
    detail: str
    fixed: bool = False


@dataclass
class DoctorResult:
    stubs: int = 0
    remotes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def unfixed(self) -> list[Problem]:
        return [p for p in self.problems if not p.fixed]

    def to_json(self) -> dict:
        return {"stubs": self.stubs, "remotes": self.remotes, "ok": not self.unfixed,
                "problems": [p.__dict__ for p in self.problems]}


def keep_both_hint(rel: str) -> str:
    return f"keep both versions with `jam checkout --keep-both {shlex.quote(rel)}`"


def doctor(root: Root, rel: str, pm, session: Session, deep: bool = False, fix: bool = False) -> DoctorResult:
    from jam_core.fs import ThroughSymlink, open_dir

    try:
        os.close(open_dir(os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), rel.rpartition("/")[0]))
    except ThroughSymlink as exc:
        raise UsageError(f"{rel} is reached through the symlink {exc.filename}: jam does not follow symlinks") from None
    except OSError:
        pass  # a missing path is reported by the walk
    res = DoctorResult()
    remotes = sorted(root.remotes(), key=lambda r: (r.tier, r.name))
    res.remotes = [r.name for r in remotes]
    reachable: dict[str, str] = {}
    for r in remotes:
        try:
            pm.hook.check_remote(remote=r, session=session, create=False)
        except RemoteError as exc:
            reachable[r.name] = str(exc)
            res.problems.append(Problem("unreachable", r.name, str(exc)))
    with root.lock():
        cat = _open_catalog(root, fix, res)
        try:
            d = _Doctor(root, pm, session, remotes, reachable, res, deep, fix, cat, rel)
            for e in walk(str(root.path), rel, look=ALWAYS):
                d.check(e)
            if fix and rel == "." and cat is not None:
                cat.replace_stubs(d.rows)
                with cat.transaction():
                    for oid, name, size in d.locations:
                        cat.record_location(oid, name, size)
        finally:
            if cat is not None:
                cat.close()
    return res


def _open_catalog(root: Root, fix: bool, res: DoctorResult) -> Catalog | None:
    """The root's catalog; a damaged one is a problem, and with ``fix`` it is moved aside and
    a new one started (the scan refills it: the catalog only caches what the tree says)."""
    db = root.jam_dir / CATALOG
    shown = f"{root.jam_dir.name}/{CATALOG}"
    try:
        return Catalog(db)
    except CatalogDamaged as exc:
        if not fix:
            res.problems.append(Problem("catalog", shown, str(exc)))
            return None
    aside = _move_aside(db)
    res.problems.append(Problem("catalog", shown, f"damaged: moved aside to {aside.name} and rebuilt from the tree",
                                fixed=True))
    return Catalog(db)


def _move_aside(db: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = db.with_name(f"{db.name}.damaged-{stamp}")
    n = 1
    while aside.exists():
        aside = db.with_name(f"{db.name}.damaged-{stamp}-{n}")
        n += 1
    os.rename(db, aside)
    for suffix in ("-wal", "-shm", "-journal"):  # SQLite's side files belong to the damaged file
        side = db.with_name(db.name + suffix)
        if os.path.lexists(side):
            os.rename(side, aside.with_name(aside.name + suffix))
    return aside


class _Doctor:
    def __init__(self, root, pm, session, remotes, reachable, res, deep, fix, cat, rel):
        self.root, self.pm, self.session = root, pm, session
        self.remotes, self.reachable, self.res = remotes, reachable, res
        self.deep, self.fix, self.cat, self.rel = deep, fix, cat, rel
        self.rows: list[tuple] = []
        self.locations: list[tuple[str, str, int]] = []
        self.stamps = cat.stub_stamps(rel) if cat is not None else {}

    def problem(self, kind: str, rel: str, detail: str, fixed: bool = False) -> Problem:
        p = Problem(kind, rel, detail, fixed)
        self.res.problems.append(p)
        return p

    def check(self, e: Entry) -> None:
        if e.state == LOCAL:
            if e.rel == self.rel:  # named on the command line: say what it is rather than nothing
                self.problem("not-a-stub", e.rel, "a local file, not a stub: there is nothing to bring back")
            return
        if e.state == BAD:
            self.bad(e)
            return
        rec = e.record
        lost = e.problem == LOST_XATTRS
        if e.state == DIRTY:
            self.res.stubs += 1
            if not lost:
                self.rows.append(self.row(e.rel, rec, e.st))
            what = "a copy of a stub (it lost its xattrs) " if lost else ""
            self.problem("dirty", e.rel, f"{what}written into after it was stashed; jam will not fetch over it: "
                         + keep_both_hint(e.rel))
            return
        assert e.state == STUB
        if lost:
            p = self.problem("lost-xattr", e.rel, "a stub whose xattrs were lost (copied without them?); "
                             "`jam doctor --fix` restores them from its header")
            if self.fix:
                p.fixed = self.restore_xattr(e, rec)
        elif not self.clean(e, rec):
            return
        self.res.stubs += 1
        if not lost or self.fix:
            self.rows.append(self.row(e.rel, rec, _lstat(e.path) or e.st))
        self.check_object(e.rel, rec, e.path)

    # -- repairs ------------------------------------------------------------------------------
    def bad(self, e: Entry) -> None:
        """Unreadable metadata. If the header is intact and the bytes are exactly a stub's,
        ``user.jam`` (damaged or missing) is restored from it; otherwise reported only."""
        rec = None
        try:
            fd = open_checked(e.path, e.st)
        except OSError:
            fd = None
        if fd is not None:
            try:
                rec = record_from_block(os.pread(fd, HEADER_MAX, 0), e.st.st_size)
                if rec is not None and not verify_clean(fd, rec):
                    rec = None
            except (BadStub, OSError):
                rec = None
            finally:
                os.close(fd)
        if rec is None:
            self.problem("bad-metadata", e.rel, f"{e.problem}; left as it is")
            return
        p = self.problem("bad-metadata", e.rel, f"{e.problem}, but its header is intact: "
                         "`jam doctor --fix` restores user.jam from it")
        if self.fix:
            p.fixed = self.restore_xattr(e, rec)
        if p.fixed:  # a stub again: it counts, and its object must be there
            self.res.stubs += 1
            self.rows.append(self.row(e.rel, rec, _lstat(e.path) or e.st))
            self.check_object(e.rel, rec, e.path)

    def restore_xattr(self, e: Entry, rec: StubRecord) -> bool:
        """Give a stub whose bytes are intact its ``user.jam`` back (from its header), read-only
        and with the original's mtime, through one descriptor checked to be that file."""
        fd = open_checked(e.path, e.st)
        if fd is None:
            return False
        try:
            if not verify_clean(fd, rec):  # written into since the scan: leave it
                return False
            os.setxattr(fd, XATTR, rec.pack())
            os.fchmod(fd, rec.mode & ~0o222)
            os.utime(fd, ns=(e.st.st_atime_ns, rec.mtime_ns))
            return True
        finally:
            os.close(fd)

    def clean(self, e: Entry, rec: StubRecord) -> bool:
        """A stub with a good xattr whose stat looks untouched: are its bytes a stub's? If not,
        its header is repairable when it was lost to zeros, or damaged with no write through
        the filesystem (the catalog's inode and ctime still match); else it is dirty."""
        fd = open_checked(e.path, e.st)
        if fd is None:
            return True  # gone or replaced since the scan: not this run's business
        try:
            if verify_clean(fd, rec):
                return True
            st = os.fstat(fd)
            zeros = not os.pread(fd, HEADER_MAX, 0).strip(b"\0")
            stamp = self.stamps.get(os.fsencode(e.rel))
            untouched = stamp is not None and stamp[2:] == (st.st_ino, st.st_ctime_ns)
        finally:
            os.close(fd)
        if not (zeros or untouched) or not _only_header_differs(e.path, rec, e.st):
            self.res.stubs += 1
            self.rows.append(self.row(e.rel, rec, e.st))
            self.problem("dirty", e.rel, "written into after it was stashed (its size and mtime were put back); "
                         "jam will not fetch over it: " + keep_both_hint(e.rel))
            return False
        what = "lost (zeros)" if zeros else "damaged, with no write since the stub was made"
        p = self.problem("bad-header", e.rel, f"its header block is {what}; "
                         "`jam doctor --fix` writes it again from user.jam")
        if self.fix:
            p.fixed = self.rewrite(e, rec)
        return True

    def rewrite(self, e: Entry, rec: StubRecord) -> bool:
        fd = open_checked(e.path, e.st)
        if fd is None:
            return False
        try:
            if os.fstat(fd).st_ctime_ns != e.st.st_ctime_ns:  # changed since the scan
                return False
            oid_remotes = self.cat.remotes_of([rec.oid])[rec.oid] if self.cat is not None else set()
            full = StubRecord(rec.oid, rec.size, rec.mode, rec.mtime_ns, tuple(sorted(oid_remotes)), "")
            os.fchmod(fd, (rec.mode & ~0o222) | 0o200)
            wfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                rewrite_header(wfd, full, os.path.basename(e.path))
            finally:
                os.close(wfd)
                os.fchmod(fd, rec.mode & ~0o222)
            return verify_clean(fd, rec)
        finally:
            os.close(fd)

    @staticmethod
    def row(rel: str, rec: StubRecord, st: os.stat_result) -> tuple:
        return (rel, rec.oid, rec.size, rec.mtime_ns, rec.stashed_at, st.st_ino, st.st_ctime_ns)

    # -- objects ------------------------------------------------------------------------------
    def check_object(self, rel: str, rec: StubRecord, path: str) -> None:
        res = self.res
        held = []
        for r in self.remotes:
            if r.name in self.reachable:
                continue
            try:
                if self.pm.hook.has(remote=r, oid=rec.oid, size=rec.size, session=self.session):
                    held.append(r)
            except RemoteError as exc:
                self.reachable[r.name] = str(exc)
        self.locations.extend((rec.oid, r.name, rec.size) for r in held)
        if not held:
            self.problem("missing", rel, "no reachable remote holds its object " + rec.oid)
            return
        if self.deep:
            _deep_check(self.pm, self.session, held, rel, rec, res, path)


def _only_header_differs(path: str, rec: StubRecord, st: os.stat_result) -> bool:
    """The stat rule holds (size, mtime, blocks) and nothing but zeros follows the first block."""
    from jam_core.stub import _span, _zeros_from, is_dirty

    if is_dirty(st, rec) or not stat.S_ISREG(st.st_mode):
        return False
    fd = open_checked(path, st)
    if fd is None:
        return False
    try:
        return _zeros_from(fd, _span(os.fstat(fd)), rec.size)
    finally:
        os.close(fd)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _deep_check(pm, session, held: list[Remote], rel, rec, res, path) -> None:
    """Read every byte of the object back from the remotes that hold it and hash it. The
    content goes to a nameless file in ROOT/.jam/tmp (O_TMPFILE): nothing is left behind,
    whatever interrupts the check."""
    from jam_core.fs import fd_path
    from jam_core.objects import hash_fd

    tmp_dir = Path(path)
    while tmp_dir.parent != tmp_dir and not (tmp_dir / ".jam").is_dir():
        tmp_dir = tmp_dir.parent
    good = False
    for r in held:
        fd = os.open(tmp_dir / ".jam" / "tmp", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            ok = pm.hook.fetch(remote=r, oid=rec.oid, dest=Path(fd_path(fd)), size=rec.size, session=session)
            if ok and os.fstat(fd).st_size == rec.size and hash_fd(fd, rec.oid.split(":")[0]) == (rec.oid, rec.size):
                good = True
                break
            res.problems.append(Problem("corrupt", rel, f"remote {r.name!r} holds a corrupt copy of {rec.oid}"))
        except RemoteError as exc:
            res.problems.append(Problem("unreachable", rel, str(exc)))
        finally:
            os.close(fd)
    if not good:
        res.problems.append(Problem("missing", rel, f"no remote holds an intact copy of {rec.oid}"))
