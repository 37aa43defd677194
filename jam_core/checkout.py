"""Checkout: bring stubs back. Content is written aside, verified against its id, and renamed
over the stub only if the stub is still that stub. A failed or interrupted fetch leaves the
stub as it was; a stub that was written into is never fetched over."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from jam_core.catalog import Catalog
from jam_core.errors import IntegrityError, JamError, RemoteError
from jam_core.model import Remote, Session
from jam_core.objects import split_oid, hash_file
from jam_core.root import CATALOG, Root
from jam_core.scan import BAD, DIRTY, LOCAL, Entry
from jam_core.stash import Result, collect, same_file, tmp_name, user_xattrs


def checkout(root: Root, rels: Iterable[str], pm, session: Session | None = None) -> Result:
    """Check out files and directories (relative to the root). Holds the root's lock."""
    result = Result()
    session = session or Session()
    remotes = sorted(root.remotes(), key=lambda r: (r.tier, r.name))
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat:
        for entry, _named in collect(root, rels, result):
            if entry.state == LOCAL:
                result.unchanged += 1
                continue
            if entry.state == DIRTY:
                result.skipped.append((entry.rel, "this stub was written into after it was stashed; "
                                       "jam will not overwrite it (see `jam doctor`)"))
                continue
            if entry.state == BAD:
                result.failed.append((entry.rel, f"unreadable stub metadata: {entry.problem}"))
                continue
            try:
                fetch_file(entry, _order(remotes, cat.remotes_of(entry.record.oid)), pm, session)
            except RemoteError as exc:
                result.failed.append((entry.rel, str(exc)))
                if _is_fatal(exc):
                    result.aborted = str(exc)
                    break
                continue
            except JamError as exc:
                result.failed.append((entry.rel, str(exc)))
                continue
            except OSError as exc:
                result.failed.append((entry.rel, exc.strerror or str(exc)))
                continue
            cat.remove_stub(entry.rel)
            cat.record_use([entry.rel])
            result.done.append((entry.rel, entry.record.size))
    return result


def _is_fatal(exc: RemoteError) -> bool:
    return getattr(exc, "fatal", False)


def _order(remotes: list[Remote], known: list[str]) -> list[Remote]:
    """Remotes known to hold the object first, each group nearest tier first."""
    return sorted(remotes, key=lambda r: (r.name not in known, r.tier, r.name))


def fetch_file(entry: Entry, remotes: list[Remote], pm, session: Session) -> None:
    """Fetch one stub's content and swap it in. Raises on failure; the stub is left as it was."""
    rec = entry.record
    algorithm, _ = split_oid(rec.oid)
    directory = os.path.dirname(entry.path)
    problems = []
    for remote in remotes:
        tmp = tmp_name(directory)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
        try:
            try:
                ok = pm.hook.fetch(remote=remote, oid=rec.oid, dest=Path(tmp), size=rec.size, session=session)
            except RemoteError as exc:
                problems.append(str(exc))
                continue
            if ok is None:
                problems.append(f"remote {remote.name!r}: no installed plugin handles kind {remote.kind!r}")
                continue
            if not ok:
                problems.append(f"remote {remote.name!r} does not have {rec.oid}")
                continue
            got, got_size = hash_file(tmp, algorithm)
            if got != rec.oid or got_size != rec.size:
                problems.append(f"remote {remote.name!r} returned corrupt content for {rec.oid} "
                                f"(hash {got[:15]}…, {got_size} bytes); stub left as it was")
                continue
            _finish(tmp, entry)
            tmp = None
            return
        finally:
            if tmp is not None and os.path.lexists(tmp):
                os.unlink(tmp)
    if not remotes:
        raise RemoteError("no remote is configured to fetch from")
    if any("corrupt" in p for p in problems):
        raise IntegrityError("; ".join(problems))
    raise RemoteError("; ".join(problems))


def _finish(tmp: str, entry: Entry) -> None:
    rec = entry.record
    st = entry.st
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for k, v in user_xattrs(entry.path).items():
            os.setxattr(fd, k, v)
        if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, rec.mode)
        os.utime(fd, ns=(st.st_atime_ns, rec.mtime_ns))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        now = os.lstat(entry.path)
    except FileNotFoundError:
        raise JamError("the stub disappeared while its content was being fetched") from None
    if not same_file(now, st):
        raise JamError("the stub changed while its content was being fetched; left as it is")
    os.rename(tmp, entry.path)
