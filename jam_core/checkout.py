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
from jam_core.fsutil import syncfs
from jam_core.stash import Result, _why, collect, same_file, tmp_name, user_xattrs
from jam_core.stubdirs import refresh as refresh_stubdirs


BATCH_FILES = 256
BATCH_BYTES = 256 << 20


def checkout(root: Root, rels: Iterable[str], pm, session: Session | None = None) -> Result:
    """Check out files and directories (relative to the root). Holds the root's lock.

    Files go in batches: each is fetched aside and verified, the batch is made durable with
    one syncfs, then each is renamed over its stub if the stub is unchanged.
    """
    result = Result()
    session = session or Session()
    remotes = sorted(root.remotes(), key=lambda r: (r.tier, r.name))
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat:
        batch: list[tuple[Entry, str]] = []
        batch_bytes = 0
        todo = []
        for entry, _named in collect(root, rels, result):
            if entry.state == LOCAL:
                result.unchanged += 1
            elif entry.state == DIRTY:
                result.skipped.append((entry.rel, "this stub was written into after it was stashed; "
                                       "jam will not overwrite it (see `jam doctor`)"))
            elif entry.state == BAD:
                result.failed.append((entry.rel, f"unreadable stub metadata: {entry.problem}"))
            else:
                todo.append(entry)
        session.begin(2 * sum(e.record.size for e in todo))  # fetch, then verify
        for entry in todo:
            try:
                tmp = fetch_aside(entry, _order(remotes, cat.remotes_of(entry.record.oid)), pm, session)
                session.file_done(2 * entry.record.size)
            except Unreachable as exc:
                result.aborted = str(exc)
                break
            except (JamError, OSError) as exc:
                result.failed.append((entry.rel, _why(exc)))
                continue
            batch.append((entry, tmp))
            batch_bytes += entry.record.size
            if len(batch) >= BATCH_FILES or batch_bytes >= BATCH_BYTES:
                _swap_batch(root, batch, cat, result)
                batch, batch_bytes = [], 0
        if batch:
            _swap_batch(root, batch, cat, result)
        refresh_stubdirs(root, cat)  # the index the cd hooks read
    return result


class Unreachable(RemoteError):
    """No remote could be reached at all: stop rather than fail every file the same way."""


def _swap_batch(root: Root, batch: list[tuple[Entry, str]], cat: Catalog, result: Result) -> None:
    try:
        syncfs(root.path)
        for entry, tmp in batch:
            try:
                swap_in(tmp, entry)
            except (JamError, OSError) as exc:
                result.failed.append((entry.rel, _why(exc)))
                continue
            cat.remove_stub(entry.rel)
            cat.record_use([entry.rel])
            result.done.append((entry.rel, entry.record.size))
    finally:
        for _, tmp in batch:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def _order(remotes: list[Remote], known: list[str]) -> list[Remote]:
    """Remotes known to hold the object first, each group nearest tier first."""
    return sorted(remotes, key=lambda r: (r.name not in known, r.tier, r.name))


def fetch_aside(entry: Entry, remotes: list[Remote], pm, session: Session) -> str:
    """Fetch one stub's content to a verified temporary file beside it, with the original's
    mode, mtime and xattrs. Raises on failure, leaving nothing behind."""
    rec = entry.record
    algorithm, _ = split_oid(rec.oid)
    directory = os.path.dirname(entry.path)
    problems = []
    unreachable = 0
    for remote in remotes:
        tmp = tmp_name(directory)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        try:
            try:
                ok = pm.hook.fetch(remote=remote, oid=rec.oid, dest=Path(tmp), size=rec.size, session=session)
            except RemoteError as exc:
                problems.append(str(exc))
                unreachable += 1
                continue
            if ok is None:
                problems.append(f"remote {remote.name!r}: no installed plugin handles kind {remote.kind!r}")
                unreachable += 1
                continue
            if not ok:
                problems.append(f"remote {remote.name!r} does not have {rec.oid}")
                continue
            got, got_size = hash_file(tmp, algorithm, session.progress)
            if got != rec.oid or got_size != rec.size:
                problems.append(f"remote {remote.name!r} returned corrupt content for {rec.oid} "
                                f"(hash {got[:15]}…, {got_size} bytes); stub left as it was")
                continue
            _restore_metadata(tmp, entry)
            done, tmp = tmp, None
            return done
        finally:
            if tmp is not None and os.path.lexists(tmp):
                os.unlink(tmp)
    if not remotes:
        raise Unreachable("no remote is configured to fetch from")
    if unreachable == len(remotes):
        raise Unreachable("; ".join(problems))
    if any("corrupt" in p for p in problems):
        raise IntegrityError("; ".join(problems))
    raise RemoteError("; ".join(problems))


def _restore_metadata(tmp: str, entry: Entry) -> None:
    rec, st = entry.record, entry.st
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for k, v in user_xattrs(entry.path).items():
            os.setxattr(fd, k, v)
        if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, rec.mode)
        os.utime(fd, ns=(st.st_atime_ns, rec.mtime_ns))
    finally:
        os.close(fd)


def swap_in(tmp: str, entry: Entry) -> None:
    """Rename the verified content over the stub, only if the stub is still that stub."""
    try:
        now = os.lstat(entry.path)
    except FileNotFoundError:
        raise JamError("the stub disappeared while its content was being fetched") from None
    if not same_file(now, entry.st):
        raise JamError("the stub changed while its content was being fetched; left as it is")
    os.rename(tmp, entry.path)
