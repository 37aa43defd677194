"""Stash: turn local files into stubs, only after their content is safe on the chosen remotes.

For each file: read and hash it, let ``place`` choose remotes, let each remote's backend store
and verify the object; once a batch is stored, make the remotes durable (``sync``), write the
stubs beside their files, make them durable (one syncfs), and swap each in with one rename,
only if its file did not change meanwhile (size, mtime, inode, ctime). A hard link to the
original is held across the rename, so a write that lands in the last instant is seen and the
original is put back.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from jam_core import pipeline
from jam_core.catalog import Catalog
from jam_core.fs import fsync_dir, syncfs
from jam_core.errors import IntegrityError, JamError, RemoteError, UsageError
from jam_core.model import Remote, Session
from jam_core.objects import DEFAULT_ALGORITHM, hash_fd
from jam_core.pipeline import batches
from jam_core.root import CATALOG, Root
from jam_core.scan import BAD, DIRTY, LOCAL, STUB, TMP_PREFIX, TMP_SUFFIX, Entry, remove_stale_in, walk
from jam_core.stub import HEADER_MAX, XATTR, StubRecord, write_stub
from jam_core.stubdirs import refresh as refresh_stubdirs


@dataclass
class Result:
    """What an operation did, file by file. ``done`` holds (path, bytes) pairs."""

    done: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    unchanged: int = 0  # already in the wanted state
    aborted: str = ""  # why the run stopped early (e.g. a remote is gone)

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.done)

    @property
    def exit_code(self) -> int:
        return 1 if (self.failed or self.aborted) else 0


def through_symlink(root_path: str, rel: str) -> str | None:
    """The first directory on the way from the root to ``rel`` that is a symlink, or None.

    jam never follows symlinks: one in the middle of a path could lead out of the root.
    """
    p = root_path
    for part in rel.split(os.sep)[:-1]:
        p = os.path.join(p, part)
        if os.path.islink(p):
            return os.path.relpath(p, root_path)
    return None


def tmp_name(directory: str) -> str:
    return os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex[:16]}{TMP_SUFFIX}")


def same_file(a: os.stat_result, b: os.stat_result, ctime: bool = True) -> bool:
    return (
        a.st_ino == b.st_ino
        and a.st_dev == b.st_dev
        and a.st_size == b.st_size
        and a.st_mtime_ns == b.st_mtime_ns
        and (not ctime or a.st_ctime_ns == b.st_ctime_ns)
    )


def user_xattrs(fd_or_path) -> dict[str, bytes]:
    """The file's own ``user.*`` xattrs (not jam's), carried across stash and checkout."""
    out = {}
    try:
        names = os.listxattr(fd_or_path)
    except OSError:
        return out
    for name in names:
        if name.startswith("user.") and name != XATTR:
            try:
                out[name] = os.getxattr(fd_or_path, name)
            except OSError:
                pass
    return out


def collect(root: Root, rels: Iterable[str], result: Result) -> list[tuple[Entry, bool]]:
    """Walk the named paths; returns (entry, named_explicitly) pairs, each file once.

    The caller holds the root's lock, so temporary files a killed jam left are removed on
    the way (see ``scan.scan_dirs``)."""
    seen: set[str] = set()
    out = []
    for rel in rels:
        path = root.abs(rel)
        if not os.path.lexists(path):
            result.failed.append((rel, "no such file or directory"))
            continue
        if os.path.islink(path):
            result.skipped.append((rel, "a symlink: jam does not stash or follow symlinks"))
            continue
        link = through_symlink(str(root.path), rel)
        if link is not None:
            result.skipped.append((rel, f"reached through the symlink {link}: jam does not follow symlinks"))
            continue

        def on_error(r, exc):
            result.failed.append((r, exc.strerror or str(exc)))

        if not os.path.isdir(path):
            remove_stale_in(os.path.dirname(path))
        for e in walk(str(root.path), rel, on_error, clean=True):
            if e.rel not in seen:
                seen.add(e.rel)
                out.append((e, e.rel == rel))
    return out




@dataclass
class Stored:
    """A hashed file on its way: stored on ``targets``, then swapped for its stub."""

    entry: Entry
    st0: os.stat_result
    record: StubRecord
    xattrs: dict[str, bytes]
    targets: list[Remote]
    tmp: str = ""


def stash(root: Root, rels: Iterable[str], pm, session: Session | None = None,
          explicit: bool = True) -> Result:
    """Stash files and directories (relative to the root). Holds the root's lock throughout.

    ``explicit=False`` (policies chose) applies the minimum size to named files too and, under
    the lock, leaves pinned files alone (a pin may land between planning and stashing). Files go
    in batches: hash each, store the batch on its remotes (``stash_many`` where a backend
    offers it, else ``stash`` per file), make the remotes durable (``sync``), write the stubs
    aside, make them durable (one syncfs), then swap each file that did not change.
    """
    result = Result()
    session = session or Session()
    remotes = root.remotes()
    if not remotes:
        raise UsageError(f"{root.path} has no remote (add one with `jam remote add NAME URL`)")
    min_size = root.min_size
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat:
        from jam_core.pins import read_pins

        pins = set() if explicit else read_pins(root)
        todo = []
        for entry, named in collect(root, rels, result):
            why = _skip_reason(entry, named and explicit, min_size)
            if why is None and pins:
                from jam_core.pins import covered

                if covered(entry.rel, pins):
                    why = "pinned"
            if why == "":
                result.unchanged += 1
            elif why:
                result.skipped.append((entry.rel, why))
            else:
                todo.append(entry)
        session.begin(2 * sum(e.st.st_size for e in todo))  # read and hash, then store
        try:
            _run_batches(root, todo, remotes, pm, session, cat, result)
        finally:
            refresh_stubdirs(root, cat)  # the index the cd hooks read
    return result


def _run_batches(root: Root, todo: list[Entry], remotes: list[Remote], pm, session: Session,
                 cat: Catalog, result: Result) -> None:
    """While a worker stores batch N on the remotes, hash batch N+1 and swap batch N-1."""
    pipeline.run(
        batches(todo, lambda e: e.st.st_size),
        prepare=lambda batch: _hash_batch(root, batch, remotes, pm, session, result),
        move=lambda hashed: _store_batch(hashed, remotes, pm, session),
        finish=lambda hashed, storing: _finish_batch(root, hashed, storing, pm, session, cat, result),
        stop=lambda: bool(result.aborted),
        session=session,
    )


def _hash_batch(root: Root, entries: list[Entry], remotes: list[Remote], pm, session: Session,
                result: Result) -> list[Stored]:
    hashed: list[Stored] = []
    for entry in entries:
        try:
            s = hash_and_place(root, entry, remotes, pm, session)
        except (JamError, OSError) as exc:
            result.failed.append((entry.rel, _why(exc)))
            session.file_done(2 * entry.st.st_size)
            continue
        if s is None:
            result.skipped.append((entry.rel, "changed while it was being stashed; left local"))
            session.file_done(2 * entry.st.st_size)
            continue
        hashed.append(s)
    return hashed


def _store_batch(hashed: list[Stored], remotes: list[Remote], pm, session: Session):
    """In the worker: store a hashed batch on each remote. Returns (errors by item, remotes
    used); raises RemoteError when a remote fails as a whole."""
    errors: dict[int, Exception] = {}
    used: dict[str, Remote] = {}
    for remote in remotes:
        items = [s for s in hashed if remote in s.targets and id(s) not in errors]
        if not items:
            continue
        used[remote.name] = remote
        for s, err in store_on(remote, items, pm, session):
            if err is not None:
                errors[id(s)] = err
    return errors, used


def _finish_batch(root: Root, hashed: list[Stored], storing, pm, session: Session, cat: Catalog,
                  result: Result) -> None:
    """Wait for a batch's store, then swap every file that was stored for its stub."""
    try:
        errors, used = storing.result()
    except RemoteError as exc:
        result.aborted = result.aborted or str(exc)  # the first cause is the one to tell
        return
    stored = []
    for s in hashed:
        session.file_done(2 * s.record.size)
        err = errors.get(id(s))
        if err is None:
            stored.append(s)
        elif isinstance(err, IntegrityError):
            result.skipped.append((s.entry.rel, str(err)))
        else:
            result.failed.append((s.entry.rel, _why(err)))
    if stored:
        _swap_batch(root, stored, used.values(), pm, session, cat, result)


def store_on(remote: Remote, items: list[Stored], pm, session: Session) -> Iterator[tuple[Stored, Exception | None]]:
    """Store ``items`` on ``remote``; yields each with None (stored and verified) or its error.

    Raises RemoteError when the remote as a whole fails (unreachable, gone, no backend).
    """
    by_oid: dict[str, list[Stored]] = {}
    for s in items:
        by_oid.setdefault(s.record.oid, []).append(s)  # equal content is stored once
    unique = [(oid, Path(group[0].entry.path), group[0].record.size) for oid, group in by_oid.items()]
    many = pm.hook.stash_many(remote=remote, items=unique, session=session)
    if many is not None:
        for oid, err in many:
            for s in by_oid.pop(oid, ()):
                yield s, err
        for group in by_oid.values():  # a backend that forgot some: never trust them as stored
            for s in group:
                yield s, RemoteError(f"remote {remote.name!r} did not report storing {s.record.oid}")
        return
    for oid, source, size in unique:
        try:
            ok = pm.hook.stash(remote=remote, oid=oid, source=source, size=size, session=session)
        except RemoteError:
            raise
        except (JamError, OSError) as exc:  # this file's problem: the others go on
            ok = exc
        if ok is None:
            raise RemoteError(f"remote {remote.name!r}: no installed plugin handles kind {remote.kind!r}")
        err = None if ok is True else ok if isinstance(ok, Exception) else \
            RemoteError(f"remote {remote.name!r} did not store {oid}")
        for s in by_oid[oid]:
            yield s, err


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, JamError):
        return exc.strerror or str(exc)
    return str(exc)


def _swap_batch(root: Root, batch: list[Stored], remotes, pm, session, cat: Catalog, result: Result) -> None:
    """Make a batch's objects durable, then its stubs, then swap them in one by one."""
    try:
        for remote in remotes:
            pm.hook.sync(remote=remote, session=session)
    except (RemoteError, OSError) as exc:
        result.aborted = _why(exc)
        return
    try:
        for s in batch:
            s.tmp = write_stub_aside(s)
        syncfs(root.path)
        dirs = set()
        with cat.transaction(keep_on_error=True):  # one commit per batch, not per file
            _swap_all(batch, cat, result, dirs)
        for d in dirs:
            fsync_dir(d)
    finally:
        for s in batch:
            if s.tmp and os.path.lexists(s.tmp):
                os.unlink(s.tmp)


def _swap_all(batch: list[Stored], cat: Catalog, result: Result, dirs: set[str]) -> None:
    for s in batch:
        e = s.entry
        try:
            if not _swap(e.path, s.tmp, s.st0):
                result.skipped.append((e.rel, "changed while it was being stashed; left local"))
                continue
        except OSError as exc:
            result.failed.append((e.rel, _why(exc)))
            continue
        rec = s.record
        cat.add_stub(e.rel, rec.oid, rec.size, rec.mtime_ns, rec.stashed_at, rec.remotes)
        dirs.add(os.path.dirname(e.path))
        result.done.append((e.rel, max(0, e.st.st_blocks * 512 - HEADER_MAX)))


def _skip_reason(entry: Entry, explicit: bool, min_size: int) -> str | None:
    """None: stash it. "": already a stub (nothing to do). Otherwise the reason it stays."""
    if entry.state == STUB:
        return ""
    if entry.state == DIRTY:
        return "a stub that was written into; jam keeps it as it is (see `jam doctor`)"
    if entry.state == BAD:
        return f"unreadable stub metadata: {entry.problem}"
    assert entry.state == LOCAL
    st = entry.st
    if st.st_nlink > 1:
        return f"hard-linked ({st.st_nlink} links); stashing would break the links"
    if st.st_size == 0:
        return "empty"
    if not explicit and st.st_size < min_size:
        return f"smaller than core.min_size ({st.st_size} bytes)"
    return None


def choose_remotes(root: Root, pm, oid: str, size: int, remotes: list[Remote]) -> list[Remote]:
    chosen = pm.hook.place(root=root.path, oid=oid, size=size, remotes=remotes)
    names = {r.name for r in remotes}
    if not chosen or any(r.name not in names for r in chosen):
        raise UsageError("the place hook chose no configured remote")
    return list(chosen)


def hash_and_place(root: Root, entry: Entry, remotes: list[Remote], pm, session: Session) -> Stored | None:
    """Hash a file and let ``place`` choose its remotes. None if it changed since the scan."""
    fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st0 = os.fstat(fd)
        if not same_file(st0, entry.st):
            return None
        oid, size = hash_fd(fd, DEFAULT_ALGORITHM, session.progress)
        if size != st0.st_size or not same_file(os.fstat(fd), st0):
            return None
        xattrs = user_xattrs(fd)
    finally:
        os.close(fd)
    targets = choose_remotes(root, pm, oid, size, remotes)
    rec = StubRecord(oid=oid, size=size, mode=st0.st_mode & 0o7777, mtime_ns=st0.st_mtime_ns,
                     remotes=tuple(r.name for r in targets),
                     stashed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return Stored(entry, st0, rec, xattrs, targets)


def write_stub_aside(s: Stored) -> str:
    """Write the stub of ``s`` to a temporary name beside its file (not yet durable)."""
    path, st0 = s.entry.path, s.st0
    tmp = tmp_name(os.path.dirname(path))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if (st0.st_uid, st0.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, st0.st_uid, st0.st_gid)
        write_stub(fd, s.record, os.path.basename(path), st0.st_atime_ns, s.xattrs, durable=False)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _swap(path: str, stub_tmp: str, st0: os.stat_result) -> bool:
    """Rename the stub over ``path`` if ``path`` is still the file we stored; True if done."""
    try:
        if not same_file(os.lstat(path), st0):
            return False
    except FileNotFoundError:
        return False
    keep = tmp_name(os.path.dirname(path))
    try:
        os.link(path, keep)  # hold the original across the rename
    except OSError:
        keep = None
    try:
        os.rename(stub_tmp, path)
        if keep is not None:
            after = os.lstat(keep)
            if after.st_size != st0.st_size or after.st_mtime_ns != st0.st_mtime_ns:
                os.rename(keep, path)  # written to in the last instant: put it back
                keep = None
                return False
        return True
    finally:
        if keep is not None:
            os.unlink(keep)
