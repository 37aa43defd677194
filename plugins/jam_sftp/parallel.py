"""Several connections for one transfer: batches spread over them, one big object split in ranges.

Where the time went (bench/bench_sftp.py, strace -c of sftp-server): a small upload costs the
server an fsync of its part and a share of its directory's fsync after the rename (one per
directory per run, batch.Uploads.sync_dirs; it was a second open + fsync + close per object),
one sftp-server process serves one connection, one request at a time, and an fsync waits for
the disk (here 12 ms per object from one writer, under 1 ms each from eight: fsyncs of several
processes share a journal commit); a big object is bound by one connection's crypto and packet
handling in Python. So:

- ``spread``: a batch's objects go to the caller's connection and up to ``connections - 1``
  helper connections (each its own thread and sftp-server process), all taking the next object
  from one shared ``Feed``; every object runs the same protocol (batch.py), on one connection.
- ``put_ranges``/``get_ranges``: an object of at least ``RANGE_MIN`` bytes is cut in ``CHUNK``
  ranges handed out in order to the connections. Upload: the caller creates the part
  (``tmp/<part>``, exclusive), helpers open that same part for writing; each range is read from
  the source with ``pread``, handed to one in-order hash (the exact bytes sent; a helper never
  runs more than ``LEAD`` bytes ahead of it) and written with pipelined writes whose every
  status is checked. Once every range is written and the hash equals the id, the caller's
  handle takes the protocol's usual end (fsync, fstat, close, rename, fsync of the final name:
  batch.Uploads). Download: each connection opens the object, checks its size with fstat and
  reads its ranges (a short read asks again for the rest; end-of-file early is corruption) into
  the destination with ``pwrite``; the caller also checks that nothing follows the size.
  A failure anywhere stops every connection; an upload's part is removed (or left as a jam
  temporary, swept later), a download's destination is the core's temporary file, verified by
  its hash before any swap.

Helper connections are taken only when free (``Pool.extra_ops``): a transfer never waits for a
connection another thread of the same command holds.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_FSETSTAT,
    CMD_FSTAT,
    CMD_READ,
    CMD_REMOVE,
    CMD_STATUS,
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
from jam_sftp.batch import Downloads, Uploads, dir_handles_cap
from jam_sftp.pipeline import Feed, _File
from jam_sftp.transfer import (
    INFLIGHT,
    READ_INFLIGHT,
    REQUEST,
    Ops,
    SftpStatus,
    write_request,
    write_sparse,
    wrong_size,
)

RANGE_MIN = 64 << 20  # objects at least this big are split over several connections
CHUNK = 16 << 20  # one range: what a connection takes at a time
LEAD = 64 << 20  # an upload's range never starts this far ahead of the in-order hash
SYNC_EVERY = 64 << 20  # an upload in ranges asks for an fsync of the part each time it reaches this many bytes
SPREAD_FILES = 48  # a batch gets one more connection per this many objects...
SPREAD_BYTES = 8 << 20  # ...or per this many bytes (a new connection costs a handshake)
SPREAD_SYNCED = 16  # uploads that fsync: one more connection per this many objects, whatever
#                     their bytes (the fsyncs of several sftp-servers share the disk's commits)


def on_connections(pool, ops: Ops, work: Callable[[Ops], None], want: int) -> None:
    """``work(ops)`` here and ``work(helper)`` in up to ``want - 1`` threads, each on a free
    connection of the pool; waits for all; the first failure is raised (the others' too are
    finished or stopped by then)."""
    errors: list[BaseException] = []
    threads = []

    def helper() -> None:
        try:
            with pool.extra_ops() as extra:
                if extra is not None:
                    work(extra)
        except BaseException as exc:  # noqa: B036 - handed to the caller's thread
            errors.append(exc)

    for _ in range(max(0, want - 1)):
        t = threading.Thread(target=helper, name="jam-sftp", daemon=True)
        t.start()
        threads.append(t)
    try:
        work(ops)
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def helpers_for(pool, files: Sequence[_File], synced: bool = False) -> int:
    """How many connections a batch is spread over; ``synced``: uploads that fsync each object
    (bound by the disk's fsyncs, which overlap across connections, more than by bytes)."""
    if synced:
        return max(1, min(pool.size, len(files) // SPREAD_SYNCED + 1))
    total = sum(f.size for f in files)
    return max(1, min(pool.size, len(files) // SPREAD_FILES + 1, total // SPREAD_BYTES + 1))


def put_spread(pool, ops: Ops, items, progress: Callable[[int], None]) -> list[_File]:
    """``batch.put_many`` over the caller's connection and free helpers, one shared feed."""
    return _spread(pool, ops, items, progress, Uploads)


def get_spread(pool, ops: Ops, items, progress: Callable[[int], None]) -> list[_File]:
    """``batch.get_many`` over the caller's connection and free helpers, one shared feed."""
    return _spread(pool, ops, items, progress, Downloads)


def _spread(pool, ops: Ops, items, progress: Callable[[int], None], transfers) -> list[_File]:
    files = [_File(oid, Path(path), size) for oid, path, size in items]
    if not files:
        return files
    synced = transfers is Uploads and ops.fsync
    want = helpers_for(pool, files, synced)
    if not synced:
        feed = Feed(files)

        def work(o: Ops) -> None:
            t = transfers(o, progress)
            t.run(feed, t.start)

        on_connections(pool, ops, work, want)
        return files
    # uploads that fsync: sharded by fan-out directory, one shard per connection (the one it
    # had in the last batch when it can): each directory renamed into and fsynced by one
    # connection, through the handle it keeps open (batch.Uploads keep_dirs)
    feed = Feed(files, want, lambda f: zlib.crc32(object_relpath(f.oid).rsplit("/", 1)[0].encode()))

    def sharded(o: Ops) -> None:
        dir_handles_cap(o)  # asked before the run: nothing of it in flight yet
        shards, last = o.conn.shard
        shard = feed.claim(last if shards == want else -1)
        o.conn.shard = (want, shard)
        t = Uploads(o, progress, keep_dirs=True)
        t.run(feed, t.start, shard)

    on_connections(pool, ops, sharded, want)
    return files


# -- one object in ranges ---------------------------------------------------------------------


def range_width(pool, size: int) -> int:
    """Connections one object's ranges go over: one per two ``CHUNK``s, at most the pool's, and
    at most this machine's cores (at least 2). Each connection is a paramiko transport thread
    and a worker here (one interpreter lock for all) and an sshd beside them on a loopback
    server: on 2 cores (bench_sftp.py, 512 MiB, medians of 4 while loaded) 4 connections took
    the wall time of 2 (up 4.09 s / 4.11 s, down 3.43 s / 3.51 s) for 0.75 s more CPU up
    (5.76 s client + sshd against 5.01 s) and 0.25 s more down."""
    return max(1, min(pool.size, size // (2 * CHUNK) + 1, max(2, os.cpu_count() or 2)))


class Ranges:
    """The ranges of one object, handed out in order; with ``ordered``, the bytes of the
    ranges are hashed in order (``deliver``) and a range starts at most ``LEAD`` bytes ahead."""

    def __init__(self, size: int, algo: str | None = None):
        self.size = size
        self.next = 0
        self.cond = threading.Condition()
        self.stopped = False
        self.hash = hasher(algo) if algo else None
        self.hashed = 0
        self.ahead: dict[int, bytes] = {}

    def take(self) -> tuple[int, int] | None:
        with self.cond:
            while self.hash is not None and not self.stopped and self.next - self.hashed >= LEAD:
                self.cond.wait()
            if self.stopped or self.next >= self.size:
                return None
            start = self.next
            self.next = min(self.size, start + CHUNK)
            return start, self.next

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def deliver(self, offset: int, data: bytes) -> None:
        """Hash ``data`` (the bytes sent at ``offset``) in the object's order."""
        with self.cond:
            self.ahead[offset] = data
            while self.hashed in self.ahead:
                chunk = self.ahead.pop(self.hashed)
                self.hash.update(chunk)
                self.hashed += len(chunk)
            self.cond.notify_all()


def _data(msg) -> bytes:
    """The bytes of a DATA reply (one place, so a test can make a server answer short)."""
    return msg.get_binary()


def _fstat_size(ops: Ops, handle: bytes, path: str) -> int | None:
    t, msg = ops.r.call(CMD_FSTAT, handle, path=path)
    if t != CMD_ATTRS:
        raise SftpStatus(SFTP_FAILURE, "unexpected reply to fstat", path)
    return SFTPAttributes._from_msg(msg).st_size


def _read_ranges(ops: Ops, path: str, handle: bytes, fd: int, ranges: Ranges, oid: str,
                 progress: Callable[[int], None]) -> None:
    """Read the ranges this connection takes into ``fd`` (pwrite, zero blocks left as holes)."""
    r = ops.r
    inflight: deque[tuple[int, int, int]] = deque()  # (request number, offset, length)
    todo: deque[tuple[int, int]] = deque()  # pieces to ask for
    while True:
        while len(inflight) < READ_INFLIGHT and not ranges.stopped:
            if not todo:
                got = ranges.take()
                if got is None:
                    break
                for off in range(got[0], got[1], REQUEST):
                    todo.append((off, min(REQUEST, got[1] - off)))
            off, n = todo.popleft()
            inflight.append((r.send(CMD_READ, handle, int64(off), n), off, n))
        if not inflight:
            return
        num, off, n = inflight.popleft()
        t, msg = r.wait(num)
        if ranges.stopped:
            continue  # drain what is in flight: the connection stays usable
        if t == CMD_STATUS:
            code = msg.get_int()
            if code == SFTP_EOF:
                raise IntegrityError(f"object at {path} is shorter than its size (ended at byte {off}): "
                                     "corrupt; not fetched")
            raise SftpStatus(code, msg.get_text(), path)
        if t != CMD_DATA:
            raise SftpStatus(SFTP_FAILURE, "unexpected reply to read", path)
        data = _data(msg)
        if not data or len(data) > n:
            raise SftpStatus(SFTP_FAILURE, "the server sent more (or less) than was asked", path)
        write_sparse(fd, data, off)
        progress(len(data))
        if len(data) < n:  # a short read: ask for the rest
            todo.appendleft((off + len(data), n - len(data)))


def get_ranges(pool, ops: Ops, oid: str, dest: Path, size: int, progress: Callable[[int], None]) -> bool:
    """Fetch one big object over several connections into ``dest`` (emptied first); False if
    the server has no such object. Raises on any failure (``dest`` then holds garbage: the
    caller's temporary file, never swapped in unverified)."""
    path = ops.object_path(oid)
    try:
        handle = ops.open(path, SFTP_FLAG_READ)
    except SftpStatus as exc:
        if exc.code == SFTP_NO_SUCH_FILE:
            return False
        raise
    ranges = Ranges(size)
    label = ops.conn.endpoint.label()
    fd = -1
    try:
        got = _fstat_size(ops, handle, path)
        if got is not None and got != size:
            raise IntegrityError(wrong_size(oid, label, got, size))
        t, msg = ops.r.wait(ops.r.send(CMD_READ, handle, int64(size), 1))  # never more than the size
        if t == CMD_DATA:
            raise IntegrityError(wrong_size(oid, label, f"more than {size}", size))
        if t != CMD_STATUS:
            raise SftpStatus(SFTP_FAILURE, "unexpected reply to read", path)
        code = msg.get_int()
        if code != SFTP_EOF:
            raise SftpStatus(code, msg.get_text(), path)
        fd = os.open(dest, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)

        def work(o: Ops) -> None:
            try:
                if o is ops:
                    _read_ranges(o, path, handle, fd, ranges, oid, progress)
                    return
                h = o.open(path, SFTP_FLAG_READ)
                try:
                    n = _fstat_size(o, h, path)
                    if n is not None and n != size:
                        raise IntegrityError(wrong_size(oid, label, n, size))
                    _read_ranges(o, path, h, fd, ranges, oid, progress)
                finally:
                    if o.conn.alive:
                        o.r.send(CMD_CLOSE, h)  # a read-only handle: its close cannot lose data
            except BaseException:
                ranges.stop()
                raise

        on_connections(pool, ops, work, range_width(pool, size))
        if ranges.next < size:
            raise SftpStatus(SFTP_FAILURE, "not every range was read", path)
        os.ftruncate(fd, size)  # the tail's zero blocks: a hole of the right size
        return True
    finally:
        if fd >= 0:
            os.close(fd)
        if ops.conn.alive:
            try:
                ops.r.send(CMD_CLOSE, handle)  # a read-only handle: its close cannot lose data
            except Exception:
                pass


def _write_ranges(ops: Ops, tmp: str, handle: bytes, src: int, ranges: Ranges,
                  progress: Callable[[int], None]) -> None:
    """Write the ranges this connection takes: each piece read, hashed in order, sent; every
    write's status checked."""
    r = ops.r
    inflight: deque[tuple[int, int]] = deque()  # (request number, length)
    piece: list[tuple[int, int]] = []
    while True:
        while len(inflight) < INFLIGHT and not ranges.stopped:
            if not piece:
                got = ranges.take()
                if got is None:
                    break
                piece = [(off, min(REQUEST, got[1] - off)) for off in range(got[0], got[1], REQUEST)][::-1]
                if ops.fsync and got[0] and got[0] % SYNC_EVERY == 0:
                    # what is written so far starts to go to the disk now, not all in the final
                    # fsync (a GiB stays dirty in a large page cache: seconds of waiting at the end)
                    inflight.append((r.send(CMD_EXTENDED, "fsync@openssh.com", handle), 0))
            off, n = piece.pop()
            request, data = write_request(handle, src, off, n)  # read into the request: no copies
            if len(data) != n:
                raise IntegrityError(f"content changed while it was being stored (shorter than {ranges.size} bytes)")
            ranges.deliver(off, data)
            inflight.append((r.send_request(request), n))
        if not inflight:
            return
        num, n = inflight.popleft()
        r.status(num, tmp)
        progress(n)


def put_ranges(pool, ops: Ops, oid: str, source: Path, size: int, progress: Callable[[int], None]) -> _File:
    """Store one big object over several connections; the result as ``batch.put_many``'s."""
    f = _File(oid, Path(source), size)
    f.final = ops.object_path(oid)
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        f.fail(exc)
        return f
    tmp = ops.tmp_path()
    ranges = Ranges(size, split_oid(oid)[0])
    handle: bytes | None = None
    try:
        # 0600: helpers open it again for writing; made 0444 once every range is in
        handle = ops.open(tmp, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL, 0o600)
        f.tmp = tmp

        def work(o: Ops) -> None:
            try:
                if o is ops:
                    _write_ranges(o, tmp, handle, src, ranges, progress)
                    return
                h = o.open(tmp, SFTP_FLAG_WRITE)
                try:
                    _write_ranges(o, tmp, h, src, ranges, progress)
                finally:
                    if o.conn.alive:
                        o.close(h, tmp)  # a write handle: its close is checked
            except BaseException:
                ranges.stop()
                raise

        on_connections(pool, ops, work, range_width(pool, size))
        got = f"{split_oid(oid)[0]}:{ranges.hash.hexdigest()}"
        if ranges.hashed != size or got != oid or os.pread(src, 1, size):
            raise IntegrityError(f"{source}: content changed while it was being stored ({got}); left local")
        ro = SFTPAttributes()
        ro.st_mode = 0o444
        ops.r.call(CMD_FSETSTAT, handle, ro, path=tmp)
    except BaseException as exc:
        if handle is not None and ops.conn.alive:
            try:
                ops.r.send(CMD_CLOSE, handle)
                if f.tmp:
                    ops.r.call(CMD_REMOVE, f.tmp, path=f.tmp)
            except Exception:
                pass  # a jam temporary: swept as stale later
        if isinstance(exc, (IntegrityError, OSError)) and not isinstance(exc, SftpStatus) or (
                isinstance(exc, SftpStatus) and exc.code == SFTP_FAILURE):
            f.fail(exc)  # this object's failure (changed source, full disk): the others stand
            return f
        raise
    finally:
        os.close(src)
    # the protocol's end, as for any upload: fsync, fstat, close, rename, fsync of the final name
    up = Uploads(ops, progress)
    f.handle = handle
    f.eof = True
    f.sent = size

    def start(g: _File) -> None:
        g.step = up._written
        up._send_writes(g)

    up.run([f], start)
    return f


__all__ = ["CHUNK", "RANGE_MIN", "Ranges", "range_width", "get_ranges", "get_spread", "put_ranges", "put_spread"]
