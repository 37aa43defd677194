"""Moving objects over one SFTP connection: the upload and download protocols, written once.

Each object is a small state machine whose next requests are sent as soon as the replies of
its previous step are in, while other objects' requests keep the server busy (up to ``WINDOW``
objects in flight, their requests sent together). Every reply is read and checked. One object
is a batch of one: ``Ops.put``/``Ops.get`` run these same steps for a single object, and an
object of any size streams through a bounded window (``INFLIGHT`` writes, ``READ_INFLIGHT``
reads), so nothing is ever held whole in memory.

Upload of one object (``Uploads``):
  1. the source is opened (a local error fails that object, nothing is sent), then
     ``open tmp/<fs.part_name()>`` (create, exclusive, read-only);
  2. the writes, each chunk hashed as it is read (the exact bytes sent), never more than the
     size (one byte past it is read to notice growth): content that does not hash to the id,
     or of another size, is an IntegrityError and is never renamed into place;
     ``fsync@openssh.com``, ``close``: every status must be OK; an object larger than
     ``PIPELINED_MAX`` (streamed, or written in ranges over several connections) is also
     ``fstat``-ed before its close and the size the server reports must be the size sent (a
     small one is one or a few writes of this connection, each status checked, on a file it
     created empty: the request would only cost the server a round of work per object);
  3. with ``verify = "read"``: the temporary file is read back and re-hashed;
  4. ``mkdir`` of the fan-out directories not yet known, then ``posix-rename`` into place (the
     server handles requests in order, so the directories exist by then), over an object of
     that name if there is one: an existing object is never trusted by its size (one transfer,
     and a damaged copy is repaired). Without posix-rename, a plain rename that fails removes
     the old object and renames again (a brief gap, never a half object); a missing fan-out
     directory is made again and the rename retried once;
  5. the rename made durable, once per directory for all the objects of a run (``sync_dirs``):
     once every object of the run is renamed, each fan-out directory renamed into (and the
     parent of each directory this run made) is opened read-only and ``fsync@openssh.com``-ed:
     OpenSSH's sftp-server opens a directory as a file handle, so this is the directory fsync
     POSIX asks for, one per directory instead of one per object. In a batch (``keep_dirs``)
     the connection keeps the handle open for its next runs (one request per directory then,
     not three); a batch is sharded by directory over the connections (parallel.py), so each
     directory is renamed into and fsynced by one connection, the same one batch after batch.
     A server that refuses to open or fsync a directory gets the per-object way for that run
     instead (``open`` of the final name, ``fsync@openssh.com``, ``close``: on journalling file
     systems the file's fsync commits the rename). Only then (every reply OK) does the object
     count as stored; without the fsync extension (or with ``fsync = false``) it counts once
     renamed.
An object that fails before the rename has its temporary file closed and removed; nothing is
ever renamed into place unless every earlier reply of that object was OK.

Download of one object (``Downloads``): ``open``, then ``fstat``, the reads and one read past
the end (which must answer end-of-file), then ``close``. Never more than ``size`` bytes are
read; an object of another size (by ``fstat`` or by the reads) is damaged (IntegrityError).
The core hashes the result before using it. All-zero 4 KiB blocks are left as holes.

Objects larger than ``PIPELINED_MAX`` are started only when nothing else is in flight.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import paramiko
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_MKDIR,
    CMD_OPEN,
    CMD_READ,
    CMD_REMOVE,
    CMD_RENAME,
    CMD_STATUS,
    CMD_WRITE,
    SFTP_EOF,
    SFTP_FAILURE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_READ,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
    int64,
)
from paramiko.sftp_attr import SFTPAttributes

from jam_core import IntegrityError, hasher, object_relpath, split_oid
from jam_sftp.pipeline import PIPELINED_MAX, WINDOW, WINDOW_BYTES, Pipeline, _File
from jam_sftp.transfer import INFLIGHT, REQUEST, Ops, SftpStatus, write_sparse, wrong_size

DIR_HANDLES = 300  # directory handles a connection keeps open (256 fan-out directories, their parents)
DIR_HANDLES_UNKNOWN = 128  # ...on a server that does not say how many handles it allows
HANDLES_SPARE = 32  # handles left free beside a full window of objects (listing, meta, a verify)

__all__ = ["DIR_HANDLES", "PIPELINED_MAX", "WINDOW", "WINDOW_BYTES", "Downloads", "Pipeline", "Uploads", "get_many",
           "put_many"]

# -- upload -----------------------------------------------------------------------------------


def dir_handles_cap(ops: Ops) -> int:
    """How many directory handles this connection may keep open: ``DIR_HANDLES``, or fewer so
    that a full window of objects and ``HANDLES_SPARE`` more still fit in what the server allows
    (``limits@openssh.com``'s open handles: its descriptor limit; asked once per connection,
    before a batch, never with requests in flight); ``DIR_HANDLES_UNKNOWN`` if it does not say."""
    conn = ops.conn
    if conn.dir_cap is not None:
        return conn.dir_cap
    cap = DIR_HANDLES_UNKNOWN
    if "limits@openssh.com" in ops.sftp.extensions:
        try:
            t, msg = ops.r.call(CMD_EXTENDED, "limits@openssh.com")
            if t == CMD_EXTENDED_REPLY:
                for _ in range(3):  # packet, read and write lengths
                    msg.get_int64()
                handles = msg.get_int64()
                cap = DIR_HANDLES if handles == 0 else max(0, min(DIR_HANDLES, handles - WINDOW - HANDLES_SPARE))
        except SftpStatus:
            pass
    conn.dir_cap = cap
    return cap



class Uploads(Pipeline):
    """``put`` for many objects; each ends with ``outcome`` True or ``error`` set.

    ``keep_dirs``: the directories renamed into are fsynced through handles the connection
    keeps open (``Connection.dir_handles``, at most ``DIR_HANDLES``): one request per directory
    per run instead of three (open, fsync, close), for batches (spread over connections by
    fan-out directory, so each connection meets the same directories batch after batch). An
    fsync through a handle opened before the rename is the same fsync of the same directory;
    a directory this command had to make again (it went away: ``Ops.remade_dirs``) is never
    fsynced through a handle of the one that is gone: it is opened afresh and not kept."""

    def __init__(self, ops: Ops, progress: Callable[[int], None], keep_dirs: bool = False):
        super().__init__(ops, progress)
        self.keep_dirs = keep_dirs
        self.requested_dirs: set[str] = set()  # mkdirs already sent on this connection
        self.unsynced: dict[str, list[_File]] = {}  # directory -> objects renamed into it, not yet durable
        self.made_in: set[str] = set()  # parents of the directories this run made: fsynced too

    def run(self, files, start: Callable[[_File], None], shard: int = 0) -> None:
        """Every object through the protocol, then the directories renamed into fsynced once."""
        super().run(files, start, shard)
        self.sync_dirs()

    def sync_dirs(self) -> None:
        """Make the renames of this run durable: ``fsync@openssh.com`` of every directory an
        object was renamed into (and of the parents of the directories made), each opened
        read-only (or through the handle kept open: ``keep_dirs``); then the objects waiting
        for them count as stored. If the server cannot open or fsync a directory, each waiting
        object's final name is fsynced instead."""
        if not self.unsynced:
            return
        waiting = [f for files in self.unsynced.values() for f in files]
        dirs = []
        for name in [*self.unsynced, *sorted(self.made_in - set(self.unsynced))]:
            job = _File("", Path(), 0)  # one directory's fsync, through the same pipeline
            job.final = name
            dirs.append(job)
        self.unsynced, self.made_in = {}, set()
        super().run(dirs, self._sync_dir)
        if all(job.outcome is True for job in dirs):
            for f in waiting:
                f.outcome = True
            return
        for f in waiting:  # the way of a server that cannot fsync a directory: each final name
            f.done = False
        super().run(waiting, self._sync_final)

    def _sync_dir(self, d: _File) -> None:
        kept = self.ops.conn.dir_handles
        if d.final in self.ops.remade_dirs:  # made again by this command: never an old handle
            self._drop_dir(d)
        elif self.keep_dirs and d.final in kept:
            d.handle = kept.pop(d.final)
            kept[d.final] = d.handle  # the most recently used last
            d.kept = True
            return self._fsync_dir(d)
        d.step = self._dir_opened
        self.send(d, self.handle(d, d.final), CMD_OPEN, d.final, SFTP_FLAG_READ, SFTPAttributes())

    def _dir_opened(self, d: _File) -> None:
        if d.error is not None or d.handle is None:
            return self.finish(d)
        kept = self.ops.conn.dir_handles
        cap = dir_handles_cap(self.ops)
        if self.keep_dirs and cap and d.final not in self.ops.remade_dirs:
            kept[d.final] = d.handle  # kept open for the next runs on this connection
            d.kept = True
            while len(kept) > cap:  # the least recently used one is closed
                self.send(d, self.ignore, CMD_CLOSE, kept.pop(next(iter(kept))))
        self._fsync_dir(d)

    def _fsync_dir(self, d: _File) -> None:
        def synced(t: int, msg: paramiko.Message) -> None:
            self.status(d.final)(t, msg)
            d.outcome = True

        self.send(d, synced, CMD_EXTENDED, "fsync@openssh.com", d.handle)
        if d.kept:
            d.step = self._dir_synced
        else:
            d.step = self.finish
            self.send(d, self.ignore, CMD_CLOSE, d.handle)  # a read-only handle: its close cannot lose data
        d.handle = None

    def _dir_synced(self, d: _File) -> None:
        if d.error is not None:  # the fsync through a kept handle failed: that handle is not used again
            d.step = self.finish
            self._drop_dir(d)
            return self.settle(d)
        self.finish(d)

    def _drop_dir(self, d: _File) -> None:
        """Close the handle kept open for ``d.final`` (if any): it is not used again."""
        handle = self.ops.conn.dir_handles.pop(d.final, None)
        if handle is not None:
            self.send(d, self.ignore, CMD_CLOSE, handle)

    def start(self, f: _File) -> None:
        try:
            f.fd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            f.fail(exc)
            return self.finish(f)
        ops = self.ops
        f.final = ops.object_path(f.oid)
        f.tmp = ops.tmp_path()
        f.hash = hasher(split_oid(f.oid)[0])
        attrs = SFTPAttributes()
        attrs.st_mode = 0o444
        f.step = self._opened
        self.send(f, self.handle(f, f.tmp), CMD_OPEN, f.tmp, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL, attrs)

    def _opened(self, f: _File) -> None:
        if f.error is not None:
            return self._clean(f)
        f.step = self._written
        self._send_writes(f)
        self.settle(f)

    def _send_writes(self, f: _File) -> None:
        """Read, hash and send the next chunks while the window allows; after the last one,
        check what was sent against the id, then ``fsync``, (``fstat``), ``close``."""
        handle = f.handle
        while not f.eof and f.error is None and f.writes < INFLIGHT:
            try:  # never more than the size (plus one byte to notice growth)
                data = os.read(f.fd, min(REQUEST, f.size + 1 - f.sent))
            except OSError as exc:
                f.fail(exc)
                break
            if not data or f.sent + len(data) > f.size:
                f.eof = True
                self.close_local(f)
                got = f"{split_oid(f.oid)[0]}:{f.hash.hexdigest()}"
                if data or f.sent != f.size or got != f.oid:
                    total = f.sent + len(data)
                    f.fail(IntegrityError(
                        f"{f.path}: content changed while it was being stored ({total} bytes, {got}); left local"))
                break
            f.hash.update(data)
            n = len(data)

            def written(t: int, msg: paramiko.Message, n: int = n) -> None:
                f.writes -= 1
                self.status(f.tmp)(t, msg)
                self.progress(n)
                self._send_writes(f)

            self.send(f, written, CMD_WRITE, handle, int64(f.sent), data)
            f.sent += n
            f.writes += 1
        if not f.eof or f.error is not None or f.handle is None:
            return
        if self.ops.fsync:
            self.send(f, self.status(f.tmp), CMD_EXTENDED, "fsync@openssh.com", handle)

        if f.size > PIPELINED_MAX:
            def size(st: SFTPAttributes | None) -> None:
                f.fstat = st

            self.send(f, self.attrs(f.tmp, size), CMD_FSTAT, handle)

        def closed(t: int, msg: paramiko.Message) -> None:
            f.handle = None
            self.status(f.tmp)(t, msg)

        self.send(f, closed, CMD_CLOSE, handle)
        f.handle = None  # its close is on its way

    def _written(self, f: _File) -> None:
        if f.error is None and f.size > PIPELINED_MAX and (f.fstat is None or f.fstat.st_size != f.size):
            held = f.fstat.st_size if f.fstat else "no"
            f.fail(IntegrityError(f"{f.oid}: the server holds {held} bytes of {f.size} after upload"))
        if f.error is not None:
            return self._clean(f)
        if self.ops.verify == "read":
            return self._verify(f)
        self._rename(f, mkdirs=f.final.rsplit("/", 1)[0] not in self.ops.known_dirs)

    def _verify(self, f: _File) -> None:
        """``verify = "read"``: read the temporary file back and hash it before the rename."""
        f.hash = hasher(split_oid(f.oid)[0])
        f.step = self._verify_opened
        self.send(f, self.handle(f, f.tmp), CMD_OPEN, f.tmp, SFTP_FLAG_READ, SFTPAttributes())

    def _verify_opened(self, f: _File) -> None:
        if f.error is not None or f.handle is None:
            return self._clean(f)

        def in_order(data: bytes, offset: int) -> None:
            f.ahead[offset] = data
            while f.hashed in f.ahead:
                chunk = f.ahead.pop(f.hashed)
                f.hash.update(chunk)
                f.hashed += len(chunk)

        f.step = self._verified
        f.next_read = f.reads = f.hashed = 0
        self.read_window(f, f.tmp, in_order, count=False)
        self.settle(f)

    def _verified(self, f: _File) -> None:
        got = f"{split_oid(f.oid)[0]}:{f.hash.hexdigest()}"
        if f.error is None and (f.hashed != f.size or got != f.oid):
            f.fail(IntegrityError(f"{f.oid}: the copy read back from the server does not match"))
        if f.error is not None:
            return self._clean(f)
        handle, f.handle = f.handle, None
        self.send(f, self.ignore, CMD_CLOSE, handle)  # a read-only handle: its close cannot lose data
        self._rename(f, mkdirs=f.final.rsplit("/", 1)[0] not in self.ops.known_dirs)

    def _rename(self, f: _File, mkdirs: bool) -> None:
        ops = self.ops
        if mkdirs:
            rel = object_relpath(f.oid).split("/")[:-1]
            for depth in range(1, len(rel) + 1):
                d = ops.path("objects", *rel[:depth])
                if d not in ops.known_dirs and (d not in self.requested_dirs or f.retried):
                    self.requested_dirs.add(d)
                    self.made_in.add(d.rsplit("/", 1)[0])  # its new entry is made durable too
                    self.send(f, self.ignore, CMD_MKDIR, d, SFTPAttributes())  # "exists" is fine

        def renamed(t: int, msg: paramiko.Message) -> None:
            self.status(f.final)(t, msg)
            f.placed = True

        f.step = self._renamed
        if ops.posix_rename:
            self.send(f, renamed, CMD_EXTENDED, "posix-rename@openssh.com", f.tmp, f.final)
        else:
            self.send(f, renamed, CMD_RENAME, f.tmp, f.final)

    def _renamed(self, f: _File) -> None:
        if f.placed:
            f.tmp = ""  # it is the object now: never removed
            rel = object_relpath(f.oid).split("/")[:-1]
            for depth in range(1, len(rel) + 1):
                self.ops.known_dirs.add(self.ops.path("objects", *rel[:depth]))
            folder = f.final.rsplit("/", 1)[0]
            self.ops.known_dirs.add(folder)
            if not self.ops.fsync:
                f.outcome = True
            else:  # stored once its directory is fsynced, with the others of this run (sync_dirs)
                self.unsynced.setdefault(folder, []).append(f)
            return self.finish(f)
        err = f.error
        if isinstance(err, SftpStatus) and err.code == SFTP_NO_SUCH_FILE and not f.retried:
            f.retried = True  # a fan-out directory went away: make every level, then again
            f.error = None
            rel = object_relpath(f.oid).split("/")[:-1]
            levels = {self.ops.path("objects", *rel[:depth]) for depth in range(1, len(rel) + 1)}
            self.ops.known_dirs.difference_update(levels)  # not known any more: made again
            self.ops.remade_dirs.update(levels)  # and never fsynced through a handle of the old one
            return self._rename(f, mkdirs=True)
        if isinstance(err, SftpStatus) and err.code == SFTP_FAILURE and not self.ops.posix_rename and not f.retried:
            # plain SFTP rename does not replace: an object of that name is there (never trusted
            # by its size); remove it and rename again (a brief gap, never a half object)
            f.retried = True
            f.error = None
            self.send(f, self.ignore, CMD_REMOVE, f.final)
            return self._rename(f, mkdirs=False)
        self._clean(f)

    def _sync_final(self, f: _File) -> None:
        """Open the final name and fsync it: the rename is durable before the object counts (a
        server that cannot fsync a directory; see ``sync_dirs``)."""
        if not self.ops.fsync:
            f.outcome = True
            return self.finish(f)
        f.step = self._sync_open
        self.send(f, self.handle(f, f.final), CMD_OPEN, f.final, SFTP_FLAG_READ, SFTPAttributes())

    def _sync_open(self, f: _File) -> None:
        if f.error is not None or f.handle is None:
            return self._clean(f)

        def synced(t: int, msg: paramiko.Message) -> None:
            self.status(f.final)(t, msg)
            f.outcome = True

        def closed(t: int, msg: paramiko.Message) -> None:
            f.handle = None  # a read-only handle: its close cannot lose data

        f.step = self._synced
        self.send(f, synced, CMD_EXTENDED, "fsync@openssh.com", f.handle)
        self.send(f, closed, CMD_CLOSE, f.handle)

    def _synced(self, f: _File) -> None:
        if f.error is not None:
            f.outcome = None
            return self._clean(f)
        self.finish(f)

    def _clean(self, f: _File) -> None:
        """Close and remove the temporary file (best effort), then the object is done."""
        if f.handle is None and not f.tmp:
            return self.finish(f)
        f.step = self.finish
        if f.handle is not None:
            self.send(f, self.ignore, CMD_CLOSE, f.handle)
            f.handle = None
        if f.tmp:
            self.send(f, self.ignore, CMD_REMOVE, f.tmp)
            f.tmp = ""


# -- download ---------------------------------------------------------------------------------


class Downloads(Pipeline):
    """``get`` for many objects; each ends with ``outcome`` True/False or ``error`` set."""

    def start(self, f: _File) -> None:
        f.final = self.ops.object_path(f.oid)

        def opened(t: int, msg: paramiko.Message) -> None:
            if t == CMD_STATUS:
                code = msg.get_int()
                if code == SFTP_NO_SUCH_FILE:
                    f.outcome = False
                    return
                raise SftpStatus(code, msg.get_text(), f.final)
            if t != CMD_HANDLE:
                raise SftpStatus(SFTP_FAILURE, "unexpected reply to open", f.final)
            f.handle = msg.get_binary()

        f.step = self._opened
        self.send(f, opened, CMD_OPEN, f.final, SFTP_FLAG_READ, SFTPAttributes())

    def _opened(self, f: _File) -> None:
        if f.handle is None:
            return self.finish(f)
        if f.error is not None:
            return self._close(f)
        try:  # may be /proc/self/fd/N: follow it
            f.fd = os.open(f.path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        except OSError as exc:
            f.fail(exc)
            return self._close(f)

        def size(st: SFTPAttributes | None) -> None:
            if st is not None and st.st_size is not None and st.st_size != f.size:
                raise IntegrityError(wrong_size(f.oid, self.ops.conn.endpoint.label(), st.st_size, f.size))

        def past_end(t: int, msg: paramiko.Message) -> None:  # never more than the size
            if f.error is not None:
                return
            if t == CMD_DATA:
                raise IntegrityError(wrong_size(f.oid, self.ops.conn.endpoint.label(), f"more than {f.size}", f.size))
            if t != CMD_STATUS:
                raise SftpStatus(SFTP_FAILURE, "unexpected reply to read", f.final)
            code = msg.get_int()
            if code != SFTP_EOF:
                raise SftpStatus(code, msg.get_text(), f.final)

        f.step = self._close
        self.send(f, self.attrs(f.final, size), CMD_FSTAT, f.handle)
        self.read_window(f, f.final, lambda data, off: write_sparse(f.fd, data, off),
                         lambda: self.send(f, past_end, CMD_READ, f.handle, int64(f.size), 1))

    def _close(self, f: _File) -> None:
        if f.fd >= 0:
            if f.error is None:
                try:
                    os.ftruncate(f.fd, f.size)  # the tail's zero blocks: a hole of the right size
                except OSError as exc:
                    f.fail(exc)
            self.close_local(f)
        if f.error is None:
            f.outcome = True
        f.step = self.finish
        self.send(f, self.ignore, CMD_CLOSE, f.handle)  # a read-only handle: its close cannot lose data
        f.handle = None


def put_many(ops: Ops, items: Sequence[tuple[str, Path, int]], progress: Callable[[int], None]) -> list[_File]:
    """Upload ``items``; every returned object has ``outcome`` True or ``error``."""
    files = [_File(oid, Path(path), size) for oid, path, size in items]
    if files:
        up = Uploads(ops, progress)
        up.run(files, up.start)
    return files


def get_many(ops: Ops, items: Sequence[tuple[str, Path, int]], progress: Callable[[int], None]) -> list[_File]:
    """Download ``items``; every returned object has ``outcome`` True/False or ``error``."""
    files = [_File(oid, Path(path), size) for oid, path, size in items]
    if files:
        down = Downloads(ops, progress)
        down.run(files, down.start)
    return files
