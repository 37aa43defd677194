"""Doctor: prove that every stub can come back, and repair what can be repaired.

Checks each stub's metadata, that some remote holds its object (``--deep``: fetches it and
verifies the hash), reports stubs that were written into, and with ``--fix`` restores lost
xattrs from a stub's header block and rebuilds the catalog from the scan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from jam_core.catalog import Catalog
from jam_core.errors import RemoteError, UsageError
from jam_core.model import Remote, Session
from jam_core.objects import hash_file
from jam_core.root import CATALOG, Root
from jam_core.scan import ALWAYS, BAD, DIRTY, LOCAL, STUB, walk
from jam_core.stash import through_symlink, tmp_name
from jam_core.stub import HEADER_MAX, MAGIC, XATTR, BadStub, StubRecord


@dataclass
class Problem:
    kind: str  # missing, corrupt, dirty, bad-metadata, lost-xattr, unreachable
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


def _lost_xattr(path: str, st: os.stat_result) -> StubRecord | None:
    """A file that looks like a stub copied without its xattrs: the header says so.

    Raises BadStub for a file that starts like a stub header but whose metadata cannot be
    trusted (hostile or damaged): it is reported, never repaired from.
    """
    if st.st_size < len(MAGIC) or (st.st_blocks * 512 > max(HEADER_MAX, st.st_blksize)):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_MAX)
    except OSError:
        return None
    if not head.startswith(MAGIC):
        return None
    rec = StubRecord.from_header(head)
    if rec.size != st.st_size:
        raise BadStub(f"its header says {rec.size} bytes, the file has {st.st_size}")
    return rec


def doctor(root: Root, rel: str, pm, session: Session, deep: bool = False, fix: bool = False) -> DoctorResult:
    link = through_symlink(str(root.path), rel)
    if link is not None:
        raise UsageError(f"{rel} is reached through the symlink {link}: jam does not follow symlinks")
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
    rows = []
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat:
        for e in walk(str(root.path), rel, look=ALWAYS):
            if e.state == LOCAL:
                if e.st.st_mode & 0o222 == 0 or e.st.st_blocks * 512 < e.st.st_size:
                    try:
                        rec = _lost_xattr(e.path, e.st)
                    except BadStub as exc:
                        res.problems.append(Problem("bad-metadata", e.rel, "starts like a stub copied without its "
                                                    f"xattrs, but its header cannot be trusted: {exc}; left as it is"))
                        continue
                    if rec is not None:
                        p = Problem("lost-xattr", e.rel, "a stub whose xattrs were lost (copied without them?)")
                        if fix:  # it is the stub's own content: give it back its metadata
                            os.setxattr(e.path, XATTR, rec.pack())
                            os.chmod(e.path, rec.mode & ~0o222)
                            os.utime(e.path, ns=(e.st.st_atime_ns, rec.mtime_ns))
                            p.fixed = True
                            rows.append((e.rel, rec.oid, rec.size, rec.mtime_ns, rec.stashed_at))
                            res.stubs += 1
                            _check_object(pm, session, remotes, reachable, e.rel, rec, deep, res, e.path)
                        res.problems.append(p)
                continue
            if e.state == BAD:
                res.problems.append(Problem("bad-metadata", e.rel, e.problem))
                continue
            rec = e.record
            res.stubs += 1
            rows.append((e.rel, rec.oid, rec.size, rec.mtime_ns, ""))
            if e.state == DIRTY:
                res.problems.append(Problem("dirty", e.rel, "written into after it was stashed; jam will not "
                                            "fetch over it. Keep it (remove user.jam with `setfattr -x user.jam`) "
                                            "or delete it and run `jam checkout` on a copy of the stub"))
                continue
            assert e.state == STUB
            _check_object(pm, session, remotes, reachable, e.rel, rec, deep, res, e.path)
        if fix and rel == ".":
            cat.replace_stubs(rows)
    return res


def _check_object(pm, session, remotes: list[Remote], reachable, rel, rec, deep, res, path) -> None:
    held = []
    for r in remotes:
        if r.name in reachable:
            continue
        try:
            if pm.hook.has(remote=r, oid=rec.oid, size=rec.size, session=session):
                held.append(r)
        except RemoteError as exc:
            reachable[r.name] = str(exc)
    if not held:
        why = "no reachable remote holds its object " + rec.oid
        res.problems.append(Problem("missing", rel, why))
        return
    if not deep:
        return
    good = False
    for r in held:
        tmp = tmp_name(os.path.join(str(Path(path).parent)))
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            ok = pm.hook.fetch(remote=r, oid=rec.oid, dest=Path(tmp), size=rec.size, session=session)
            if ok and hash_file(tmp, rec.oid.split(":")[0]) == (rec.oid, rec.size):
                good = True
                break
            res.problems.append(Problem("corrupt", rel, f"remote {r.name!r} holds a corrupt copy of {rec.oid}"))
        except RemoteError as exc:
            res.problems.append(Problem("unreachable", rel, str(exc)))
        finally:
            os.unlink(tmp)
    if not good:
        res.problems.append(Problem("missing", rel, f"no remote holds an intact copy of {rec.oid}"))
