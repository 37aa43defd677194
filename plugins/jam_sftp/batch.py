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
     ``fsync@openssh.com``, ``fstat``, ``close``: every status must be OK and the size the
     server reports must be the size sent;
  3. with ``verify = "read"``: the temporary file is read back and re-hashed;
  4. ``mkdir`` of the fan-out directories not yet known, then ``posix-rename`` into place (the
     server handles requests in order, so the directories exist by then), over an object of
     that name if there is one: an existing object is never trusted by its size (one transfer,
     and a damaged copy is repaired). Without posix-rename, a plain rename that fails removes
     the old object and renames again (a brief gap, never a half object); a missing fan-out
     directory is made again and the rename retried once;
  5. ``open`` of the final name, ``fsync@openssh.com``, ``close``: the rename is durable (SFTP
     cannot fsync a directory; on journalling file systems the file's fsync commits the rename);
     only then (every reply OK) does the object count as stored.
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
import socket
import struct
from pathlib import Path
from typing import Any, Callable, Sequence

import paramiko
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
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
    SFTP_OK,
    int64,
)
from paramiko.sftp_attr import SFTPAttributes

from jam_core import IntegrityError, hasher, object_relpath, split_oid

from jam_sftp.transfer import (
    INFLIGHT,
    READ_INFLIGHT,
    REQUEST,
    ConnectionLost,
    Ops,
    SftpStatus,
    _lost,
    wrong_size,
    write_sparse,
)

WINDOW = 64  # objects in flight on one connection
WINDOW_BYTES = 16 << 20  # and at most this many bytes of theirs
PIPELINED_MAX = 4 << 20  # larger objects start only when nothing else is in flight
FLUSH_BYTES = 1 << 20  # send queued requests once this many bytes wait
SEND_CHUNK = 1 << 15  # OpenSSH's largest channel packet

Reply = Callable[[int, paramiko.Message], None]


class _File:
    """One object on its way through the pipeline."""

    __slots__ = ("oid", "path", "size", "tmp", "final", "handle", "pending", "step", "error", "outcome",
                 "placed", "fstat", "retried", "fd", "done", "sent", "eof", "writes", "hash", "reads",
                 "next_read", "ahead", "hashed")

    def __init__(self, oid: str, path: Path, size: int):
        self.oid, self.path, self.size = oid, path, size
        self.tmp = self.final = ""
        self.handle: bytes | None = None
        self.pending = 0  # replies still expected for the current step
        self.step: Callable[["_File"], None] | None = None  # what to do once they are all in
        self.error: BaseException | None = None
        self.outcome: Any = None
        self.placed = False  # renamed into place (then never removed)
        self.fstat: SFTPAttributes | None = None
        self.retried = False
        self.fd = -1  # the local file: the upload's source or the download's destination
        self.done = False
        self.sent = 0  # upload: bytes read from the source and sent
        self.eof = False  # upload: the source was read to its end (or failed)
        self.writes = 0  # upload: writes in flight
        self.hash: Any = None  # hash of the bytes sent (upload), read back (verify)
        self.reads = 0  # reads in flight
        self.next_read = 0  # offset of the next read to send
        self.ahead: dict[int, bytes] = {}  # verify: replies that came before the bytes in front of them
        self.hashed = 0  # verify: bytes hashed in order

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc


class Pipeline:
    """Replies on one connection routed to per-request callbacks (paramiko's ``fileobj`` hook)."""

    def __init__(self, ops: Ops, progress: Callable[[int], None]):
        self.ops = ops
        self.sftp = ops.sftp
        self.progress = progress
        self.callbacks: dict[int, tuple[_File, Reply]] = {}
        self.active = 0
        self.active_bytes = 0
        self.out: list[bytes] = []  # requests queued, not yet sent
        self.out_bytes = 0

    # -- paramiko's side -------------------------------------------------------------------

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:  # paramiko calls this
        f, on_reply = self.callbacks.pop(num)
        f.pending -= 1
        try:
            on_reply(t, msg)
        except (SftpStatus, IntegrityError, OSError) as exc:
            f.fail(exc)
        self.settle(f)

    @staticmethod
    def settle(f: _File) -> None:
        """Once every reply of the current step is in, take the next step."""
        if f.pending == 0 and f.step is not None:
            step, f.step = f.step, None
            step(f)

    def send(self, f: _File, on_reply: Reply, t: int, *args: Any) -> None:
        """Queue a request (numbered and registered as paramiko's ``_async_request`` does).

        Queued requests leave together on ``flush``: one channel write carries dozens of small
        requests, where one write each would cost a syscall, an SSH packet and a wake-up of
        sshd per request.
        """
        sftp = self.sftp
        msg = paramiko.Message()
        with sftp._lock:
            num = sftp.request_number
            msg.add_int(num)
            for item in args:
                if isinstance(item, int64):
                    msg.add_int64(item)
                elif isinstance(item, int):
                    msg.add_int(item)
                elif isinstance(item, SFTPAttributes):
                    item._pack(msg)
                else:
                    msg.add_string(item)
            sftp._expecting[num] = self
            sftp.request_number += 1
        body = msg.asbytes()
        self.out.append(struct.pack(">IB", len(body) + 1, t))
        self.out.append(body)
        self.out_bytes += len(body) + 5
        self.callbacks[num] = (f, on_reply)
        f.pending += 1
        if self.out_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.out:
            return
        data, self.out, self.out_bytes = b"".join(self.out), [], 0
        chan = self.sftp.sock
        try:
            off = 0
            while off < len(data):  # a packet's worth at a time (paramiko's _write_all re-copies the rest)
                n = chan.send(data[off : off + SEND_CHUNK])
                if n <= 0:
                    raise EOFError()
                off += n
        except (EOFError, socket.error, paramiko.SSHException) as exc:
            raise self._lost(exc) from None

    def pump(self) -> None:
        """Read one reply and run its callback (which may queue more requests).

        Queued requests are sent only when no reply is waiting: the reactions to a burst of
        replies leave together.
        """
        if self.out and not self.sftp.reply_ready():
            self.flush()
        try:
            self.sftp._read_response()
        except (EOFError, socket.error, paramiko.SSHException, paramiko.SFTPError) as exc:  # garbage too
            raise self._lost(exc) from None

    def _lost(self, exc: BaseException) -> ConnectionLost:
        self.ops.conn.broken = True  # replies may still be in flight: never reuse it
        return _lost(exc)

    def run(self, files: Sequence[_File], start: Callable[[_File], None]) -> None:
        """Start objects while the window allows; pump replies until every one is done."""
        queue = list(reversed(files))
        try:
            while queue or self.active:
                while queue and (self.active == 0 or (
                        queue[-1].size <= PIPELINED_MAX and self.active < WINDOW and self.active_bytes < WINDOW_BYTES)):
                    f = queue.pop()
                    self.active += 1
                    self.active_bytes += f.size
                    start(f)
                if self.active:
                    self.pump()
        except BaseException:
            self.ops.conn.broken = True  # requests of ours are unanswered: the connection is spent
            raise
        finally:
            for f in files:
                self.close_local(f)

    @staticmethod
    def close_local(f: _File) -> None:
        if f.fd >= 0:
            fd, f.fd = f.fd, -1
            os.close(fd)

    def finish(self, f: _File) -> None:
        if not f.done:
            f.done = True
            self.close_local(f)
            self.active -= 1
            self.active_bytes -= f.size

    # -- replies ---------------------------------------------------------------------------

    @staticmethod
    def status(path: str) -> Reply:
        def check(t: int, msg: paramiko.Message) -> None:
            if t != CMD_STATUS:
                raise SftpStatus(SFTP_FAILURE, f"unexpected reply {t}", path)
            code = msg.get_int()
            if code != SFTP_OK:
                raise SftpStatus(code, msg.get_text(), path)

        return check

    @staticmethod
    def ignore(t: int, msg: paramiko.Message) -> None:
        pass

    @staticmethod
    def attrs(path: str, into: Callable[[SFTPAttributes | None], None]) -> Reply:
        def check(t: int, msg: paramiko.Message) -> None:
            if t == CMD_STATUS:
                code = msg.get_int()
                if code == SFTP_NO_SUCH_FILE:
                    return into(None)
                raise SftpStatus(code, msg.get_text(), path)
            if t != CMD_ATTRS:
                raise SftpStatus(SFTP_FAILURE, "unexpected reply to stat", path)
            into(SFTPAttributes._from_msg(msg))

        return check

    @staticmethod
    def handle(f: _File, path: str) -> Reply:
        def check(t: int, msg: paramiko.Message) -> None:
            if t == CMD_STATUS:
                raise SftpStatus(msg.get_int(), msg.get_text(), path)
            if t != CMD_HANDLE:
                raise SftpStatus(SFTP_FAILURE, "unexpected reply to open", path)
            f.handle = msg.get_binary()

        return check

    # -- reading a remote file: a window of reads ---------------------------------------------

    def read_window(self, f: _File, path: str, sink: Callable[[bytes, int], None],
                    done: Callable[[], None] | None = None, count: bool = True) -> None:
        """Keep up to ``READ_INFLIGHT`` reads of ``f.handle`` in flight until ``f.size`` bytes
        are asked for; ``sink(data, offset)`` gets each reply (not necessarily in order), then
        ``done()`` runs once the last read is sent; ``count``: report the bytes as progress. A reply longer than asked is refused; one
        that ends early is an IntegrityError (the object is shorter than its size)."""
        while f.error is None and f.next_read < f.size and f.reads < READ_INFLIGHT:
            n = min(REQUEST, f.size - f.next_read)
            self._read(f, path, f.next_read, n, sink, done, count)
            f.next_read += n
            f.reads += 1
        if f.next_read == f.size and done is not None and f.error is None:
            f.next_read += 1  # past the size: done() runs once
            done()

    def _read(self, f: _File, path: str, offset: int, n: int, sink: Callable[[bytes, int], None],
              done: Callable[[], None] | None, count: bool) -> None:
        def got(t: int, msg: paramiko.Message) -> None:
            if f.error is not None:
                return
            if t == CMD_STATUS:
                code = msg.get_int()
                text = msg.get_text()
                if code == SFTP_EOF:
                    raise IntegrityError(
                        f"object at {path} is shorter than its size (ended at byte {offset} of {f.size}): "
                        "corrupt; not fetched"
                    )
                raise SftpStatus(code, text, path)
            if t != CMD_DATA:
                raise SftpStatus(SFTP_FAILURE, "unexpected reply to read", path)
            data = msg.get_binary()
            if len(data) > n or not data:
                raise SftpStatus(SFTP_FAILURE, "the server sent more (or less) than was asked", path)
            sink(data, offset)
            if count:
                self.progress(len(data))
            if len(data) < n:  # short read: ask for the rest now (the same read, still in flight)
                return self._read(f, path, offset + len(data), n - len(data), sink, done, count)
            f.reads -= 1
            self.read_window(f, path, sink, done, count)

        self.send(f, got, CMD_READ, f.handle, int64(offset), n)


# -- upload -----------------------------------------------------------------------------------


class Uploads(Pipeline):
    """``put`` for many objects; each ends with ``outcome`` True or ``error`` set."""

    def __init__(self, ops: Ops, progress: Callable[[int], None]):
        super().__init__(ops, progress)
        self.requested_dirs: set[str] = set()  # mkdirs already sent on this connection

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
        check what was sent against the id, then ``fsync``, ``fstat``, ``close``."""
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

        def size(st: SFTPAttributes | None) -> None:
            f.fstat = st

        self.send(f, self.attrs(f.tmp, size), CMD_FSTAT, handle)

        def closed(t: int, msg: paramiko.Message) -> None:
            f.handle = None
            self.status(f.tmp)(t, msg)

        self.send(f, closed, CMD_CLOSE, handle)
        f.handle = None  # its close is on its way

    def _written(self, f: _File) -> None:
        if f.error is None and (f.fstat is None or f.fstat.st_size != f.size):
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
            self.ops.known_dirs.add(f.final.rsplit("/", 1)[0])
            return self._sync_final(f)
        err = f.error
        if isinstance(err, SftpStatus) and err.code == SFTP_NO_SUCH_FILE and not f.retried:
            f.retried = True  # a fan-out directory went away: make every level, then again
            f.error = None
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
        """Open the final name and fsync it: the rename is durable before the object counts."""
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
