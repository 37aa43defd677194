"""Many requests in flight on one SFTP connection, every reply routed to its object's callback.

``Ops`` (transfer.py) waits for each reply; waiting is the whole cost of thousands of small
objects. Here each object is a small state machine (``_File`` and a ``step`` to take once the
replies of its current step are all in); up to ``WINDOW`` objects are in flight, their requests
queued and sent together. ``batch.py`` drives the upload and download protocols on it.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import paramiko
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_DATA,
    CMD_HANDLE,
    CMD_READ,
    CMD_STATUS,
    SFTP_EOF,
    SFTP_FAILURE,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    int64,
)
from paramiko.sftp_attr import SFTPAttributes

from jam_core import IntegrityError
from jam_sftp.transfer import READ_INFLIGHT, REQUEST, ConnectionLost, Ops, SftpStatus, _lost, send_views

WINDOW = 64  # objects in flight on one connection
WINDOW_BYTES = 16 << 20  # and at most this many bytes of theirs
PIPELINED_MAX = 4 << 20  # larger objects start only when nothing else is in flight
FLUSH_BYTES = 1 << 20  # send queued requests once this many bytes wait

Reply = Callable[[int, paramiko.Message], None]
_HEAD = struct.Struct(">IB").pack  # an SFTP packet's length and type
_U32 = struct.Struct(">I").pack
_U64 = struct.Struct(">Q").pack


class _File:
    """One object on its way through the pipeline."""

    __slots__ = ("oid", "path", "size", "tmp", "final", "handle", "pending", "step", "error", "outcome",
                 "placed", "fstat", "retried", "fd", "done", "sent", "eof", "writes", "hash", "reads",
                 "next_read", "ahead", "hashed", "kept")

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
        self.kept = False  # a directory's fsync: through a handle its connection keeps open

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc


class Feed:
    """Objects waiting to start, shared by the pipelines of several connections (thread-safe).

    With ``shards`` > 1 the objects are dealt into that many queues by ``shard_of(object)``;
    each pipeline ``claim``s one and takes from it first, then from the others once it is empty
    (nobody waits while work is left). Uploads shard by fan-out directory: a directory is then
    renamed into, and fsynced, by one connection per batch instead of by each of them, and the
    same connection keeps it from batch to batch (its handle stays open: ``batch.Uploads``)."""

    def __init__(self, files: Sequence[_File], shards: int = 1, shard_of: Callable[[_File], int] | None = None):
        self._queues: list[list[_File]] = [[] for _ in range(max(1, shards))]
        for f in reversed(files):
            self._queues[shard_of(f) % len(self._queues) if shard_of else 0].append(f)
        self._claimed: set[int] = set()
        self._lock = threading.Lock()
        self.stopped = False

    @property
    def shards(self) -> int:
        return len(self._queues)

    def claim(self, prefer: int = -1) -> int:
        """A shard for one pipeline: ``prefer`` if nobody has it, else the first free one; -1
        when every shard is taken (that pipeline only helps with what is left)."""
        with self._lock:
            free = [i for i in range(len(self._queues)) if i not in self._claimed]
            if not free:
                return -1
            got = prefer if prefer in free else free[0]
            self._claimed.add(got)
            return got

    def empty(self) -> bool:
        with self._lock:
            return not any(self._queues)

    def take(self, fits: Callable[[_File], bool], shard: int = 0) -> _File | None:
        """The next object of ``shard`` (or, once it is empty, of the fullest other queue) if
        ``fits(it)``; None when it does not, when every queue is empty or the feed stopped."""
        with self._lock:
            if self.stopped:
                return None
            queue = self._queues[shard] if 0 <= shard < len(self._queues) else []
            if not queue:
                queue = max(self._queues, key=len)
            if not queue or not fits(queue[-1]):
                return None
            return queue.pop()

    def stop(self) -> None:
        """No object starts any more (one pipeline failed: the batch fails)."""
        with self._lock:
            self.stopped = True


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
        sshd per request. The request is packed here (SFTP's encoding: uint32, uint64, string
        with its length; paramiko's Message only for attributes): a write's data is queued as
        it is, not copied into a Message and out again (~0.2 s of 2,000 x 64 KiB).
        """
        sftp = self.sftp
        with sftp._lock:
            num = sftp.request_number
            sftp._expecting[num] = self
            sftp.request_number += 1
        parts: list[bytes] = [b"", _U32(num)]
        for item in args:
            if isinstance(item, int64):
                parts.append(_U64(item))
            elif isinstance(item, int):
                parts.append(_U32(item))
            elif isinstance(item, SFTPAttributes):
                m = paramiko.Message()
                item._pack(m)
                parts.append(m.asbytes())
            else:
                if isinstance(item, str):
                    item = item.encode("utf8")
                parts.append(_U32(len(item)))
                parts.append(item)
        n = sum(map(len, parts))
        parts[0] = _HEAD(n + 1, t)
        self.out.extend(parts)
        self.out_bytes += n + 5
        self.callbacks[num] = (f, on_reply)
        f.pending += 1
        if self.out_bytes >= FLUSH_BYTES or f.size > PIPELINED_MAX:
            self.flush()  # a large object streams alone: a refill waiting for replies to drain starves it

    def flush(self) -> None:
        if not self.out:
            return
        data, self.out, self.out_bytes = memoryview(b"".join(self.out)), [], 0
        try:
            send_views(self.sftp.sock, data)
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

    def run(self, files: "Sequence[_File] | Feed", start: Callable[[_File], None], shard: int = 0) -> None:
        """Start objects while the window allows; pump replies until every one is done.

        ``files`` may be a ``Feed`` shared with pipelines on other connections (each takes the
        next object, of its ``shard`` first, when its window has room); a failure here stops
        the feed for all."""
        feed = files if isinstance(files, Feed) else Feed(files)
        mine: list[_File] = []
        try:
            while True:
                while True:
                    f = feed.take(lambda g: self.active == 0 or (
                        g.size <= PIPELINED_MAX and self.active < WINDOW and self.active_bytes < WINDOW_BYTES), shard)
                    if f is None:
                        break
                    mine.append(f)
                    self.active += 1
                    self.active_bytes += f.size
                    start(f)
                if not self.active:
                    break
                self.pump()
        except BaseException:
            feed.stop()
            self.ops.conn.broken = True  # requests of ours are unanswered: the connection is spent
            raise
        finally:
            for f in mine:
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
        ``done()`` runs once the last read is sent; ``count``: report the bytes as progress. A
        reply longer than asked is refused; one that ends early is an IntegrityError (the object
        is shorter than its size)."""
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
