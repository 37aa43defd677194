"""Checkout: bring stubs back. Content is written aside (in the stub's directory, opened by
descriptor), verified against its id, and exchanged with the stub in one atomic
``renameat2(RENAME_EXCHANGE)`` only if the stub is still that stub; what was exchanged out is
checked, and exchanged back if it was not the stub (a file saved over it in the last instant).
A failed or interrupted fetch leaves the stub as it was; a stub that was written into is never
fetched over (``keep_both`` fetches its stashed version beside it instead)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable, Iterator

from jam_core.catalog import Catalog
from jam_core.errors import JamError, RemoteError, describe
from jam_core.fs import (
    TMP_MARK,
    Closer,
    DirFds,
    Filesystems,
    drop_inherited_acl,
    exchange,
    fd_path,
    open_regular,
    open_regular_stat,
    raise_fd_limit,
    removexattr,
    rename_noreplace,
    restore_xattrs,
    same_file,
    setxattr,
    syncfs,
    tmp_name,
)
from jam_core.hook.index import begin as begin_index
from jam_core.hook.index import refresh as refresh_stubdirs
from jam_core.model import Remote, Session
from jam_core.objects import hash_fd, split_oid
from jam_core.ops import pipeline
from jam_core.ops.common import Result, collect, ends_as_interrupt
from jam_core.ops.pipeline import batches
from jam_core.root import CATALOG, Root
from jam_core.scan import BAD, DIRTY, LOCAL, Entry
from jam_core.stub import verify_clean

KEEP_BOTH_LABEL = "stashed version"


def checkout(root: Root, rels: Iterable[str], pm, session: Session | None = None,
             keep_both: bool = False, wait: bool = True, index: bool = True) -> Result:
    """Check out files and directories (relative to the root). Holds the root's lock (with
    ``wait=False``, the cd hook's: RootBusy at once if another jam holds it). ``index=False``:
    the cd hooks' index is not rebuilt at the end (a caller checking out in groups does it once).

    Files go in batches: each batch is fetched aside (``fetch_many`` where a backend offers
    it, else ``fetch`` per file; the next remote for what one remote could not give) and
    verified, made durable with one syncfs, then each file is exchanged with its stub if the
    stub is unchanged. An interruption leaves stubs and no temporary files.

    ``keep_both``: a stub that was written into keeps its bytes, and its stashed version is
    fetched beside it as ``NAME (stashed version)``.
    """
    with ends_as_interrupt():  # a SIGTERM in the middle of a swap puts it back, as a Ctrl-C does
        return _checkout(root, rels, pm, session, keep_both, wait, index)


def _checkout(root: Root, rels: Iterable[str], pm, session: Session | None, keep_both: bool,
              wait: bool = True, index: bool = True) -> Result:
    result = Result()
    session = session or Session()
    remotes = sorted(root.remotes(), key=lambda r: (r.tier, r.name))
    raise_fd_limit()  # batches hold descriptors per file and directory: as many as allowed
    with root.lock(wait=wait), Catalog(root.jam_dir / CATALOG) as cat, DirFds(root.path) as dirs:
        behind = begin_index(root) if index else False  # a killed run left the index behind: all of it, at the end
        todo = []
        for entry, _named in collect(root, dirs, rels, result):
            if entry.state == LOCAL:
                result.unchanged += 1
            elif entry.state == DIRTY:
                if keep_both:
                    todo.append(entry)
                else:
                    result.skipped.append((entry.rel, "this stub was written into after it was stashed; jam will "
                                           "not overwrite it (`jam checkout --keep-both` fetches the stashed "
                                           "version beside it)"))
                    result.partly = True
            elif entry.state == BAD:
                result.failed.append((entry.rel, f"unreadable stub metadata: {entry.problem}"))
            else:
                todo.append(entry)
        session.begin(2 * sum(e.record.size for e in todo))  # fetch, then verify
        from jam_core.ops.refs import Recorder
        from jam_core.placement import is_cache

        caches = [r for r in remotes if is_cache(r)]
        recorder = Recorder(root, pm, session) if todo and caches else None
        # the old stubs' last closes free them (waits on the disk, overlapped), most of them once
        # the checkout's last file is created (see Closer)
        closer = Closer(most=pipeline.closes_held(), most_bytes=pipeline.BATCH_BYTES)
        disks = Filesystems(dirs.root_fd)  # the root's, and any other disk mounted inside it
        try:
            # While a worker fetches and verifies batch N, swap batch N-1 in.
            pipeline.run(
                batches(todo, lambda e: e.record.size),
                prepare=lambda batch: _wants(batch, remotes, cat, dirs, result, session),
                move=lambda wants: _warm(root, _fetch_all(root, wants, pm, session, result), caches, pm,
                                         session, recorder),
                finish=lambda wants, fetching: _swap_batch(fetching.result(), cat, result, dirs, disks),
                stop=lambda: bool(result.aborted),
                session=session,
                cleanup=lambda wants: _drop_tmps(wants, dirs, closer),
            )
        finally:
            closer.stop()  # every old stub closed (its blocks free) before the checkout returns
            try:
                if result.done:  # the last swaps, durable before the checkout says it is done (every disk)
                    for fd in disks.seen():
                        syncfs(fd)
            except OSError as exc:
                result.aborted = result.aborted or f"the files may not be on the disk yet: {describe(exc)}"
            finally:
                disks.close()
            if index:
                # the index the cd hooks read: the marks this run can have moved (all if behind)
                refresh_stubdirs(root, cat, changed=None if behind else [rel for rel, _ in result.done])
            if recorder is not None and recorder.pending:  # what landed on a cache is referenced there
                by_name = {r.name: r for r in remotes}
                from jam_core.ops.refs import referenced

                recorder.publish(referenced(root, cat), [by_name[n] for n in list(recorder.pending)])
    return result


def _warm(root: Root, ready: list["_Want"], caches: list[Remote], pm, session: Session, recorder) -> list["_Want"]:
    """In the worker: put each verified object fetched from a farther tier on the edge caches
    nearer than it (best effort: a cache that fails is skipped; the fetch stands)."""
    from jam_core.ops.remotes import ensure_identity

    for cache in caches:
        items = [w for w in ready if w.source is not None and w.source.tier > cache.tier
                 and w.source.name != cache.name]
        if not items:
            continue
        try:
            ensure_identity(root, cache, pm, session)
            recorder.before_store(cache, (w.entry.record.oid for w in items))
            for w in items:
                try:
                    ok = pm.hook.stash(remote=cache, oid=w.entry.record.oid, source=Path(fd_path(w.fd)),
                                       size=w.entry.record.size, session=session)
                except RemoteError:
                    raise
                except (JamError, OSError):
                    continue
                if ok is True:
                    w.cached.append(cache.name)
            pm.hook.sync(remote=cache, session=session)
        except (JamError, OSError):
            for w in items:
                if cache.name in w.cached:
                    w.cached.remove(cache.name)
            continue
    return ready


class _Want:
    """One stub being fetched: the temporary file its content goes to (created and held
    open in the stub's directory), and the remotes left to try."""

    def __init__(self, entry: Entry, remotes: list[Remote], dir_fd: int):
        self.entry = entry
        self.remotes = remotes
        self.dir_fd = dir_fd
        self.tmp = ""
        self.fd = -1
        self.problems: list[str] = []
        self.unreachable = 0
        self.source: Remote | None = None  # the remote it came from, once fetched
        self.cached: list[str] = []  # the edge caches it was put on
        self.old = -1  # the stub it replaced, removed but still open: its last close frees its blocks

    @property
    def name(self) -> str:
        return self.entry.rel.rpartition("/")[2]

    def new_tmp(self) -> None:
        """Create the empty temporary file, marked as jam's (``TMP_MARK``) until the swap."""
        name = tmp_name()
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.dir_fd)
        self.tmp, self.fd = name, fd
        setxattr(fd, TMP_MARK, b"1")

    def reset(self) -> None:
        """Empty the temporary file for another remote's attempt (and read it from its start
        again: the verification of the last attempt moved its offset)."""
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)

    def drop_tmp(self) -> None:
        if self.old >= 0:
            os.close(self.old)
            self.old = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp:
            try:
                os.unlink(self.tmp, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
            self.tmp = ""


def _drop_tmps(wants: list[_Want], dirs: DirFds, closer: Closer | None = None) -> None:
    """Close and remove each want's temporary file and let its directory go (``_wants`` held it)."""
    gone = []
    try:
        for w in wants:
            if closer is not None and w.old >= 0:
                gone.append(w.old)
                w.old = -1
            w.drop_tmp()
            if w.dir_fd >= 0:
                dirs.release(w.entry.dir)
                w.dir_fd = -1  # may be closed from now on: never used again
    finally:
        if closer is not None:
            closer.hold(gone)
            closer.flush()


def _wants(batch: list[Entry], remotes: list[Remote], cat: Catalog, dirs: DirFds, result: Result,
           session: Session) -> list[_Want]:
    """Here (not in the worker): open (and hold) each stub's directory and create its temporary
    file. A directory that cannot be opened (swapped for a symlink, removed) or written fails its
    files alone."""
    known = cat.remotes_of(e.record.oid for e in batch)
    wants = []
    try:
        for e in batch:
            try:
                dir_fd = dirs.hold(e.dir)
            except OSError as exc:
                result.failed.append((e.rel, describe(exc)))
                session.file_done(2 * e.record.size)
                continue
            w = _Want(e, _order(remotes, known[e.record.oid]), dir_fd)
            wants.append(w)
            try:
                w.new_tmp()
            except OSError as exc:
                result.failed.append((e.rel, describe(exc)))
                session.file_done(2 * e.record.size)
                wants.pop()
                _drop_tmps([w], dirs)
    except BaseException:
        _drop_tmps(wants, dirs)
        raise
    return wants


def _fetch_all(root: Root, wants: list[_Want], pm, session: Session, result: Result) -> list[_Want]:
    """Fetch and verify every want, trying its remotes in order. Returns the verified ones."""
    ready, pending = [], list(wants)
    while pending:
        by_remote: dict[str, list[_Want]] = {}
        for w in pending:
            by_remote.setdefault(w.remotes[0].name, []).append(w)
        pending = []
        for group in by_remote.values():
            remote = group[0].remotes[0]
            for w, problem in fetch_from(root, remote, group, pm, session):
                if problem is None:
                    w.source = remote
                    ready.append(w)
                    session.file_done(2 * w.entry.record.size)
                    continue
                w.problems.append(problem)
                w.remotes = w.remotes[1:]
                if w.remotes:
                    w.reset()
                    pending.append(w)
                    continue
                w.drop_tmp()
                session.file_done(2 * w.entry.record.size)
                if w.unreachable == len(w.problems):  # no remote answered at all: stop
                    result.aborted = "; ".join(w.problems)
                else:
                    result.failed.append((w.entry.rel, "; ".join(w.problems)))
        if result.aborted:
            break
    return ready


def fetch_from(root: Root, remote: Remote, wants: list[_Want], pm, session: Session
               ) -> Iterator[tuple[_Want, str | None]]:
    """Fetch ``wants`` from one remote into their (empty) temporary files and verify each.

    Yields each want with None (its temporary file holds exactly the content of its id) or a
    one-line problem. A remote that fails as a whole yields every want as unreachable.
    """
    from jam_core.ops.remotes import ensure_identity

    by_oid: dict[str, list[_Want]] = {}
    for w in wants:
        by_oid.setdefault(w.entry.record.oid, []).append(w)
    items = [(oid, Path(fd_path(group[0].fd)), group[0].entry.record.size) for oid, group in by_oid.items()]
    outcomes: dict[str, object] = {}
    try:
        ensure_identity(root, remote, pm, session)
        many = pm.hook.fetch_many(remote=remote, items=items, session=session)
        if many is not None:
            outcomes.update(many)
        else:
            for oid, dest, size in items:
                try:
                    outcomes[oid] = pm.hook.fetch(remote=remote, oid=oid, dest=dest, size=size, session=session)
                except RemoteError:
                    raise
                except (JamError, OSError) as exc:
                    outcomes[oid] = exc
        if any(outcomes.get(oid, False) is False for oid, _dest, _size in items):
            from jam_core.history.chunks import assemble_absent  # only then: the hook's path stays light

            assemble_absent(remote, items, outcomes, pm, session)  # no whole object there: from its chunks
    except RemoteError as exc:
        for w in wants:
            w.unreachable += 1
            yield w, str(exc)
        return
    for oid, group in by_oid.items():
        first = group[0]
        outcome = outcomes.get(oid, False)
        if outcome is None:
            for w in group:
                w.unreachable += 1
                yield w, f"remote {remote.name!r}: no installed plugin handles kind {remote.kind!r}"
            continue
        problem = _problem(remote, first, outcome, session)
        for w in group:
            if problem is None and w is not first:  # equal content wanted twice: copy the verified file
                try:
                    _copy_fd(first.fd, w.fd, first.entry.record.size)
                except OSError as exc:
                    yield w, describe(exc)
                    continue
            yield w, problem


def _copy_fd(src: int, dst: int, size: int) -> None:
    off = 0
    while off < size:
        n = os.copy_file_range(src, dst, size - off, off, off)
        if n == 0:
            raise OSError(errno.EIO, "short copy of fetched content")
        off += n


def _problem(remote: Remote, w: _Want, outcome, session: Session) -> str | None:
    """None if ``w``'s temporary file now holds exactly the content of its id, else what went
    wrong. Never reads more than the stub's size: a longer object is corrupt as it stands."""
    rec = w.entry.record
    if isinstance(outcome, Exception):
        return describe(outcome)
    if outcome is not True:
        return f"remote {remote.name!r} does not have {rec.oid}"
    got_size = os.fstat(w.fd).st_size
    if got_size != rec.size:
        return (f"remote {remote.name!r} returned {got_size} bytes for {rec.oid}, not {rec.size}; "
                "stub left as it was")
    algorithm, _ = split_oid(rec.oid)
    # ``w.fd`` is at offset 0: created empty, written only through its own reopened path or
    # at explicit offsets, and put back at 0 by ``reset`` after a failed attempt.
    # A large file is hashed while the disk writes it back (the dir backend started that as
    # it copied).
    got, off = hash_fd(w.fd, algorithm, session.progress, limit=rec.size)
    if got != rec.oid or off != rec.size:
        return (f"remote {remote.name!r} returned corrupt content for {rec.oid} "
                f"(hash {got[:15]}…, {off} bytes); stub left as it was")
    return None


def _swap_batch(ready: list[_Want], cat: Catalog, result: Result, dirs: DirFds, disks: Filesystems) -> None:
    if not ready:
        return
    try:  # the batch's content durable before any stub is swapped out: on every disk it went to
        for fd in disks.of(w.dir_fd for w in ready):
            syncfs(fd)
    except OSError as exc:
        result.aborted = result.aborted or f"cannot make the fetched files durable: {describe(exc)}"
        return  # the temporary files are removed by _drop_tmps
    used: list[str] = []
    moved = {d for d in {w.entry.dir for w in ready} if not dirs.still_there(d)}
    with cat.transaction(keep_on_error=True):  # one commit per batch, not per file
        try:
            for w in ready:
                if w.entry.dir in moved:  # its directory left the root (or was replaced) since it was opened
                    result.failed.append((w.entry.rel, "its directory was moved or replaced while its content "
                                          "was being fetched; left as it is"))
                    continue
                try:
                    if w.entry.state == DIRTY:
                        beside = keep_beside(w)
                        result.done.append((beside, w.entry.record.size))
                        result.skipped.append((w.entry.rel, f"written into since it was stashed: kept as it is; "
                                               f"the stashed version is {beside}"))
                        continue
                    swap_in(w)
                except (JamError, OSError) as exc:
                    result.failed.append((w.entry.rel, describe(exc)))
                    continue
                for name in w.cached:
                    cat.record_location(w.entry.record.oid, name, w.entry.record.size)
                used.append(w.entry.rel)
                result.done.append((w.entry.rel, w.entry.record.size))
        finally:  # the rows of what was swapped in go, even if the batch was interrupted
            if used:
                cat.remove_stubs(used)  # one statement each for the batch, not one per file
                cat.record_use(used)


def _order(remotes: list[Remote], known: set[str]) -> list[Remote]:
    """Remotes known to hold the object first, each group nearest tier first."""
    return sorted(remotes, key=lambda r: (r.name not in known, r.tier, r.name))


def _restore_metadata(w: _Want, stub_fd: int) -> None:
    """The original's owner, mode, xattrs (ACLs after the mode) and times, on the content."""
    rec, st = w.entry.record, w.entry.st
    new = os.fstat(w.fd)
    if (new.st_uid, new.st_gid) != (st.st_uid, st.st_gid):  # a setgid directory gave it its group
        os.fchown(w.fd, st.st_uid, st.st_gid)
    drop_inherited_acl(w.fd)  # from the directory's default ACL: the original's own comes back below
    os.fchmod(w.fd, _allowed_mode(rec.mode, st.st_uid, st.st_gid))
    try:
        restore_xattrs(stub_fd, w.fd)
    except ValueError as exc:
        raise JamError(f"hostile stub metadata: {exc}") from None
    removexattr(w.fd, TMP_MARK)
    os.utime(w.fd, ns=(st.st_atime_ns, rec.mtime_ns))


def _allowed_mode(mode: int, uid: int, gid: int) -> int:
    """The record's mode, less a setgid bit its owner could never have set. A stub's record is
    its owner's to write; the kernel lets a user make a file setgid only in a group they are
    in, but root's fchmod (a checkout as root: a root shell's cd hook, a cron job) would apply
    it for them: a program of their choosing running with a group they are not in."""
    if not mode & 0o2000 or uid == 0 or os.geteuid() != 0:  # not root: the kernel's own rule applies
        return mode
    import pwd

    try:
        pw = pwd.getpwuid(uid)
        if gid == pw.pw_gid or gid in os.getgrouplist(pw.pw_name, pw.pw_gid):
            return mode
    except (KeyError, OSError):
        pass  # no such user: in no group
    return mode & ~0o2000


def swap_in(w: _Want) -> None:
    """Exchange the verified content with the stub, only if the stub is still that stub,
    untouched; if what went out was not the stub, exchange back and say so."""
    entry = w.entry
    try:
        stub_fd, now = open_regular_stat(w.dir_fd, w.name, expect=entry.st)
    except FileNotFoundError:
        raise JamError("the stub disappeared while its content was being fetched") from None
    except OSError:
        raise JamError("the stub was replaced while its content was being fetched; left as it is") from None
    try:
        if not same_file(now, entry.st):
            raise JamError("the stub changed while its content was being fetched; left as it is")
        if not verify_clean(stub_fd, entry.record, now):
            raise JamError("this stub was written into after it was stashed (its bytes are not jam's); "
                           "jam will not overwrite it (`jam checkout --keep-both` fetches the stashed "
                           "version beside it)")
        _restore_metadata(w, stub_fd)
        content = os.fstat(w.fd).st_ino
        try:
            exchange(w.dir_fd, w.tmp, w.name)
            out = os.stat(w.tmp, dir_fd=w.dir_fd, follow_symlinks=False)
            if (out.st_ino, out.st_dev, out.st_size, out.st_mtime_ns, out.st_blocks) != \
                    (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns, now.st_blocks):
                exchange(w.dir_fd, w.tmp, w.name)  # put back what was there; the content goes
                raise JamError("the stub was replaced while its content was being fetched; left as it is")
        except BaseException:
            _put_back(w, content)  # interrupted (Ctrl-C) in the middle: what was at the name returns to it
            raise
        os.close(w.fd)
        w.fd = -1
        os.unlink(w.tmp, dir_fd=w.dir_fd)  # the old stub: a name only while stub_fd holds it
        w.tmp = ""
    except BaseException:
        os.close(stub_fd)
        raise
    w.old = stub_fd  # closed (its blocks freed) in the background: _drop_tmps


def _put_back(w: _Want, content: int) -> None:
    """After an exchange interrupted before its check ended (a Ctrl-C as it returned): if the
    temporary name no longer holds the fetched content (inode ``content``), the exchange was
    made and what was at the name (the stub, or a file saved over it in the last instant) is
    there: exchange it back, so that ``drop_tmp``, which unlinks the temporary name, removes
    only the fetched content."""
    try:
        at_tmp = os.stat(w.tmp, dir_fd=w.dir_fd, follow_symlinks=False)
    except OSError:
        return
    if at_tmp.st_ino != content:
        try:
            exchange(w.dir_fd, w.tmp, w.name)
        except OSError:
            w.tmp = ""  # it cannot go back: left where it is (never unlinked), for `jam doctor` to show
            raise


def _name_max(dir_fd: int) -> int:
    try:
        return os.fpathconf(dir_fd, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def beside_name(name: str, label: str, name_max: int = 255) -> str:
    """``STEM (LABEL).EXT``, its stem shortened (whole characters) to fit ``name_max`` bytes:
    a name of up to NAME_MAX bytes still gets its stashed version beside it. An extension too
    long to keep is dropped with the stem's end."""
    stem, dot, ext = name.rpartition(".")
    if not stem:  # no extension (or a dotfile)
        stem, dot, ext = name, "", ""
    tail = f" ({label}){dot}{ext}"
    size = len(os.fsencode(tail))
    if size > name_max // 2:
        stem, tail = name, f" ({label})"
        size = len(os.fsencode(tail))
    encoded = os.fsencode(stem)
    while len(encoded) + size > name_max:
        stem = stem[:-1]
        encoded = os.fsencode(stem)
    return stem + tail


def keep_beside(w: _Want) -> str:
    """Put the verified stashed version of a written-into stub beside it, under a new name
    (``NAME (stashed version)``, numbered if taken); the stub keeps its bytes. Returns the
    new path relative to the root."""
    stub_fd = open_regular(w.dir_fd, w.name)
    try:
        _restore_metadata(w, stub_fd)
    finally:
        os.close(stub_fd)
    for n in range(1, 1000):
        label = KEEP_BOTH_LABEL if n == 1 else f"{KEEP_BOTH_LABEL} {n}"
        new = beside_name(w.name, label, _name_max(w.dir_fd))
        try:
            rename_noreplace(w.dir_fd, w.tmp, new)
        except FileExistsError:
            continue
        os.close(w.fd)
        w.fd, w.tmp = -1, ""
        d = w.entry.rel.rpartition("/")[0]
        return f"{d}/{new}" if d else new
    raise JamError("too many stashed versions beside it already")
