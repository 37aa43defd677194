"""One SFTP connection: every request's reply collected and checked, and the small requests.

paramiko's own pipelined writes drop the server's status replies when the file is closed, so a
failed write (a full disk) could go unnoticed. Here every request's reply is collected by its
number and checked (``Replies``). ``Ops`` holds the requests jam makes one at a time (stat,
open, mkdir, the identity marker's small reads and writes, directory listings).

The upload and download protocols (temporary name, hashed writes, fsync, posix-rename over the
final name, fsync of the final name; bounded reads, a read past the end) live in one place,
``batch.py``; ``Ops.put``/``Ops.get`` run one object through them (a batch of one).
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import stat as statmod
import struct
from pathlib import Path
from typing import Any, Callable

import paramiko
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_LSTAT,
    CMD_OPEN,
    CMD_READ,
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
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
    int64,
)
from paramiko.sftp_attr import SFTPAttributes

from jam_core import object_relpath, part_name
from jam_sftp.connect import Connection, send_data

REQUEST = 255 * 1024  # OpenSSH's sftp-server serves reads of up to 255 KiB
INFLIGHT = 32  # write requests in flight per object (8 MiB)
READ_INFLIGHT = 8  # read requests in flight: paramiko's channel buffer memmoves what it holds on each read
BLOCK = 4096  # all-zero blocks of this size are left as holes when fetching
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_VIEW = memoryview(_ZERO_BLOCK)


def write_sparse(fd: int, data: bytes, offset: int) -> None:
    """``pwrite`` ``data`` at ``offset``, skipping the all-zero parts of 4 KiB-aligned blocks.

    The file must read as zeros there already (it was truncated to empty): the skipped parts
    stay holes, and the caller's final ``ftruncate`` to the object's size makes the tail one.
    """
    n = len(data)
    if _ZERO_BLOCK not in data:  # no aligned zero block can be inside: one write
        os.pwrite(fd, data, offset)
        return
    mv = memoryview(data)
    pos = 0
    run = -1  # start of the bytes waiting to be written
    while pos < n:
        end = min(n, (offset + pos) // BLOCK * BLOCK + BLOCK - offset)
        if mv[pos:end] == _ZERO_VIEW[: end - pos]:
            if run >= 0:
                os.pwrite(fd, mv[run:pos], offset + run)
                run = -1
        elif run < 0:
            run = pos
        pos = end
    if run >= 0:
        os.pwrite(fd, mv[run:], offset + run)


_STATUS_TEXT = {
    SFTP_NO_SUCH_FILE: "no such file or directory",
    SFTP_PERMISSION_DENIED: "permission denied",
    SFTP_FAILURE: "the server failed",
    SFTP_OP_UNSUPPORTED: "operation not supported by the server",
}


class SftpStatus(OSError):
    """A non-OK SFTP status; ``code`` is the protocol's, ``errno`` a close local equivalent."""

    def __init__(self, code: int, text: str, path: str = ""):
        eno = {SFTP_NO_SUCH_FILE: errno.ENOENT, SFTP_PERMISSION_DENIED: errno.EACCES}.get(code, errno.EIO)
        super().__init__(eno, text or _STATUS_TEXT.get(code, f"status {code}"))
        self.code = code
        self.path = path


class ConnectionLost(Exception):
    """The connection dropped or timed out in the middle of an operation."""

    def __init__(self, what: str, timed_out: bool = False):
        super().__init__(what)
        self.timed_out = timed_out


_WRITE_HEAD = struct.Struct(">IBII")  # an SFTP packet's length and type, request number, handle length
_OFFSET_LEN = struct.Struct(">QI")  # a write's offset and data length


def send_views(chan, data: memoryview) -> None:
    """Send ``data`` on ``chan``: ``connect.send_data`` (sealed in batches under AES-GCM,
    paramiko's ``Channel.send`` a view at a time otherwise). EOFError if the channel takes nothing."""
    send_data(chan, data)


def write_request(handle: bytes, fd: int, offset: int, n: int) -> tuple[bytearray, memoryview]:
    """An ``SSH_FXP_WRITE`` of up to ``n`` bytes of ``fd`` at ``offset``, read (``preadv``)
    straight into the request's own buffer behind its header; returns the request (for
    ``Replies.send_request``) and a view of the bytes read (fewer than ``n`` if the file is
    shorter: the caller checks). paramiko's request path copies a write's data four times and
    then once more per channel packet for all that is left (``_write_all``): 2 MiB of copies
    per 255 KiB request, most of the client's CPU of a big upload."""
    head = _WRITE_HEAD.size + len(handle) + _OFFSET_LEN.size
    buf = bytearray(head + n)
    view = memoryview(buf)
    got = os.preadv(fd, [view[head:]], offset)
    _WRITE_HEAD.pack_into(buf, 0, head - 4 + got, CMD_WRITE, 0, len(handle))
    buf[_WRITE_HEAD.size : _WRITE_HEAD.size + len(handle)] = handle
    _OFFSET_LEN.pack_into(buf, _WRITE_HEAD.size + len(handle), offset, got)
    return buf, view[head : head + got]


class Replies:
    """Send requests on a paramiko SFTPClient and collect their replies by number."""

    def __init__(self, sftp: paramiko.SFTPClient, conn: Connection | None = None):
        self.sftp = sftp
        self.conn = conn
        self.got: dict[int, tuple[int, paramiko.Message]] = {}

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:  # paramiko calls this
        self.got[num] = (t, msg)

    def send(self, t: int, *args: Any) -> int:
        try:
            return self.sftp._async_request(self, t, *args)
        except (EOFError, socket.error, paramiko.SSHException) as exc:
            raise self._lost(exc) from None

    def send_request(self, buf: bytearray) -> int:
        """Send a request packed whole (``write_request``: its number's place left 0) as views
        of its buffer, a channel packet at a time; its number is returned."""
        sftp = self.sftp
        with sftp._lock:
            num = sftp.request_number
            sftp._expecting[num] = self
            sftp.request_number += 1
        struct.pack_into(">I", buf, 5, num)
        try:
            send_views(sftp.sock, memoryview(buf)[: 4 + struct.unpack_from(">I", buf)[0]])
        except (EOFError, socket.error, paramiko.SSHException) as exc:
            raise self._lost(exc) from None
        return num

    def wait(self, num: int) -> tuple[int, paramiko.Message]:
        try:
            while num not in self.got:
                self.sftp._read_response()
        except (EOFError, socket.error, paramiko.SSHException) as exc:
            raise self._lost(exc) from None
        return self.got.pop(num)

    def status(self, num: int, path: str = "") -> None:
        """Wait for a status reply and raise SftpStatus unless it is OK."""
        t, msg = self.wait(num)
        if t != CMD_STATUS:
            raise SftpStatus(SFTP_FAILURE, f"unexpected reply {t}", path)
        code = msg.get_int()
        if code != SFTP_OK:
            raise SftpStatus(code, msg.get_text(), path)

    def call(self, t: int, *args: Any, path: str = "") -> tuple[int, paramiko.Message]:
        """One request and its reply; a status other than OK raises SftpStatus."""
        rt, msg = self.wait(self.send(t, *args))
        if rt == CMD_STATUS:
            code = msg.get_int()
            if code != SFTP_OK:
                raise SftpStatus(code, msg.get_text(), path)
        return rt, msg

    def _lost(self, exc: BaseException) -> ConnectionLost:
        if self.conn is not None:
            self.conn.broken = True  # replies may still be in flight: never reuse it
        return _lost(exc)


def _lost(exc: BaseException) -> ConnectionLost:
    if isinstance(exc, socket.timeout):
        return ConnectionLost("no answer from the server (read timeout)", timed_out=True)
    return ConnectionLost(f"connection lost ({exc or type(exc).__name__})")


def wrong_size(oid: str, where: str, got: int | str, size: int) -> str:
    return f"object {oid} on {where} has {got} bytes, expected {size}: corrupt (wrong size); not fetched"



def names_in(msg) -> list[tuple[str, SFTPAttributes]]:
    """The entries of one SSH_FXP_NAME reply to a readdir: names that are not UTF-8, ``.``,
    ``..`` and anything with a ``/`` are left out (jam never makes such names)."""
    out = []
    for _ in range(msg.get_int()):
        raw = msg.get_string()
        msg.get_string()  # ls -l style line
        attrs = SFTPAttributes._from_msg(msg)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if name not in (".", "..") and "/" not in name:
            out.append((name, attrs))
    return out

class Ops:
    """The remote operations jam needs, on one connection and one remote location."""

    def __init__(
        self, conn: Connection, base: str, verify: str = "sent", fsync: bool = True, known_dirs: set[str] | None = None,
        remade_dirs: set[str] | None = None,
    ):
        self.conn = conn
        self.known_dirs = known_dirs if known_dirs is not None else set()  # fan-out dirs seen to exist
        # fan-out dirs this command had to make again (they went away): no handle kept open of them
        self.remade_dirs = remade_dirs if remade_dirs is not None else set()
        self.sftp = conn.sftp
        self.base = base.rstrip("/") or "/"
        self.verify = verify
        self.fsync = fsync and "fsync@openssh.com" in conn.sftp.extensions
        self.posix_rename = "posix-rename@openssh.com" in conn.sftp.extensions
        self.r = Replies(conn.sftp, conn)

    # -- small requests ------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return "/".join([self.base if self.base != "/" else "", *parts])

    def stat(self, path: str) -> SFTPAttributes | None:
        from paramiko.sftp import CMD_ATTRS, CMD_STAT

        try:
            t, msg = self.r.call(CMD_STAT, path, path=path)
        except SftpStatus as exc:
            if exc.code == SFTP_NO_SUCH_FILE:
                return None
            raise
        if t != CMD_ATTRS:
            raise SftpStatus(SFTP_FAILURE, "unexpected reply to stat", path)
        return SFTPAttributes._from_msg(msg)

    def open(self, path: str, flags: int, mode: int = 0o444) -> bytes:
        attrs = SFTPAttributes()
        if flags & SFTP_FLAG_CREATE:
            attrs.st_mode = mode
        t, msg = self.r.call(CMD_OPEN, path, flags, attrs, path=path)
        if t != CMD_HANDLE:
            raise SftpStatus(SFTP_FAILURE, "unexpected reply to open", path)
        return msg.get_binary()

    def close(self, handle: bytes, path: str = "") -> None:
        self.r.call(CMD_CLOSE, handle, path=path)

    def mkdir(self, path: str) -> None:
        from paramiko.sftp import CMD_MKDIR

        self.r.call(CMD_MKDIR, path, SFTPAttributes(), path=path)

    def remove(self, path: str) -> None:
        from paramiko.sftp import CMD_REMOVE

        self.r.call(CMD_REMOVE, path, path=path)

    def realpath(self, path: str) -> str:
        from paramiko.sftp import CMD_NAME, CMD_REALPATH

        t, msg = self.r.call(CMD_REALPATH, path, path=path)
        if t != CMD_NAME or msg.get_int() != 1:
            raise SftpStatus(SFTP_FAILURE, "unexpected reply to realpath", path)
        return msg.get_text()

    def statvfs_free(self, path: str) -> int | None:
        """Free bytes for an unprivileged user, where the server offers statvfs@openssh.com."""
        if "statvfs@openssh.com" not in self.sftp.extensions:
            return None
        t, msg = self.r.call(CMD_EXTENDED, "statvfs@openssh.com", path, path=path)
        if t != CMD_EXTENDED_REPLY:
            return None
        msg.get_int64()  # bsize
        frsize = msg.get_int64()
        msg.get_int64()  # blocks
        msg.get_int64()  # bfree
        bavail = msg.get_int64()
        return frsize * bavail

    # -- objects -------------------------------------------------------------------------

    def object_path(self, oid: str) -> str:
        return self.path("objects", object_relpath(oid))

    def has(self, oid: str, size: int) -> bool:
        """A regular file of ``size`` bytes in the object's place (lstat: a symlink there, to
        whatever file of that size, is not jam's object)."""
        st = self.lstat(self.object_path(oid))
        return st is not None and statmod.S_ISREG(st.st_mode or 0) and st.st_size == size

    def hash_object(self, oid: str, size: int, progress: Callable[[int], None]) -> str | bool:
        """The id the object's bytes hash to, read once through this connection and copied
        nowhere (``doctor --deep``, a removal's count of the other copies); False if there is no
        regular file in its place (nothing, a symlink, a FIFO: never followed nor opened), or if
        ``objects/`` or a fan-out directory on the way is not a directory (a symlink to another
        store's: not this remote's copy). IntegrityError if it has another size than ``size``
        (by lstat, fstat or the reads: one byte past the size is asked for and must be end-of-file)."""
        from jam_core import IntegrityError, hasher, split_oid

        path = self.object_path(oid)
        label = self.conn.endpoint.label()
        parts = object_relpath(oid).split("/")
        dirs = [self.path("objects", *parts[:i]) for i in range(len(parts))]  # objects/, its fan-out dirs
        asked = [(self.r.send(CMD_LSTAT, p), p) for p in [*dirs, path]]  # one round trip for all
        sts = [self._attrs(self.r.wait(num), p) for num, p in asked]
        obj = sts.pop()
        if any(st is None or not statmod.S_ISDIR(st.st_mode or 0) for st in sts) \
                or obj is None or not statmod.S_ISREG(obj.st_mode or 0):
            return False
        if obj.st_size is not None and obj.st_size != size:
            raise IntegrityError(wrong_size(oid, label, obj.st_size, size))
        try:
            handle = self.open(path, SFTP_FLAG_READ)
        except SftpStatus as exc:
            if exc.code == SFTP_NO_SUCH_FILE:
                return False
            raise
        try:
            t, msg = self.r.call(CMD_FSTAT, handle, path=path)
            if t != CMD_ATTRS:
                raise SftpStatus(SFTP_FAILURE, "unexpected reply to fstat", path)
            st = SFTPAttributes._from_msg(msg)
            if not statmod.S_ISREG(st.st_mode or 0):  # replaced since the lstat
                return False
            if st.st_size is not None and st.st_size != size:
                raise IntegrityError(wrong_size(oid, label, st.st_size, size))
            algorithm = split_oid(oid)[0]
            h = hasher(algorithm)
            hashed = 0
            ahead: dict[int, bytes] = {}  # replies that came before the bytes in front of them
            inflight: collections.deque[tuple[int, int, int]] = collections.deque()  # (number, offset, length)
            todo: collections.deque[tuple[int, int]] = collections.deque(
                (off, min(REQUEST, size - off)) for off in range(0, size, REQUEST))
            todo.append((size, 1))  # one byte past the size: must be end-of-file
            while todo or inflight:
                while todo and len(inflight) < READ_INFLIGHT:
                    off, n = todo.popleft()
                    inflight.append((self.r.send(CMD_READ, handle, int64(off), n), off, n))
                num, off, n = inflight.popleft()
                t, msg = self.r.wait(num)
                if t == CMD_STATUS:
                    code = msg.get_int()
                    if code == SFTP_EOF and off == size:
                        continue
                    if code == SFTP_EOF:
                        raise IntegrityError(wrong_size(oid, label, f"fewer than {size} (end at byte {off})", size))
                    raise SftpStatus(code, msg.get_text(), path)
                if t != CMD_DATA:
                    raise SftpStatus(SFTP_FAILURE, "unexpected reply to read", path)
                data = msg.get_binary()
                if off == size:
                    raise IntegrityError(wrong_size(oid, label, f"more than {size}", size))
                if not data or len(data) > n:
                    raise SftpStatus(SFTP_FAILURE, "the server sent more (or less) than was asked", path)
                if len(data) < n:  # a short read: ask for the rest
                    todo.appendleft((off + len(data), n - len(data)))
                ahead[off] = data
                while hashed in ahead:
                    chunk = ahead.pop(hashed)
                    h.update(chunk)
                    hashed += len(chunk)
                    progress(len(chunk))
            return f"{algorithm}:{h.hexdigest()}"
        finally:
            if self.conn.alive:
                try:
                    self.r.wait(self.r.send(CMD_CLOSE, handle))  # a read-only handle: its close cannot lose data
                except Exception:
                    pass

    @staticmethod
    def _attrs(reply: tuple[int, paramiko.Message], path: str) -> SFTPAttributes | None:
        """An lstat's reply: its attributes, None for "no such file"; another status raises."""
        t, msg = reply
        if t == CMD_STATUS:
            code = msg.get_int()
            if code == SFTP_NO_SUCH_FILE:
                return None
            raise SftpStatus(code, msg.get_text(), path)
        if t != CMD_ATTRS:
            raise SftpStatus(SFTP_FAILURE, "unexpected reply to lstat", path)
        return SFTPAttributes._from_msg(msg)

    def put(self, oid: str, source: os.PathLike | str, size: int, progress: Callable[[int], None]) -> None:
        """Store ``source`` as ``oid``: a batch of one through ``batch.Uploads`` (the protocol)."""
        from jam_sftp.batch import put_many

        [f] = put_many(self, [(oid, Path(source), size)], progress)
        if f.error is not None:
            raise f.error
        if f.outcome is not True:
            raise SftpStatus(SFTP_FAILURE, "not stored", f.final)

    def get(self, oid: str, dest: os.PathLike | str, size: int, progress: Callable[[int], None]) -> bool:
        """Write object ``oid`` into ``dest`` (emptied first); False if the remote has no such
        object. A batch of one through ``batch.Downloads`` (the protocol)."""
        from jam_sftp.batch import get_many

        [f] = get_many(self, [(oid, Path(dest), size)], progress)
        if f.error is not None:
            raise f.error
        return f.outcome is True

    def tmp_path(self) -> str:
        """A new temporary name under ``tmp/`` that says which jam wrote it (``fs.part_name``)."""
        return self.path("tmp", part_name())

    def sync_path(self, path: str) -> None:
        """Make ``path`` (just renamed into place) durable: open it and ``fsync@openssh.com`` it.

        SFTP cannot fsync a directory; the file's fsync is the best a server offers (ext4 and
        XFS commit the rename with it). Nothing to do without the extension or with fsync off.
        """
        if not self.fsync:
            return
        handle = self.open(path, SFTP_FLAG_READ)
        try:
            self.r.call(CMD_EXTENDED, "fsync@openssh.com", handle, path=path)
        finally:
            self.close(handle, path)

    def listdir_attr(self, path: str, limit: int = 100_000) -> list[tuple[str, SFTPAttributes]]:
        """Names in a remote directory with the server's ``lstat`` of each (symlinks not followed).

        Names that are not UTF-8 are left out (jam never makes such names); at most ``limit``.
        """
        from paramiko.sftp import CMD_NAME, CMD_OPENDIR, CMD_READDIR

        t, msg = self.r.call(CMD_OPENDIR, path, path=path)
        if t != CMD_HANDLE:
            raise SftpStatus(SFTP_FAILURE, "unexpected reply to opendir", path)
        handle = msg.get_binary()
        out: list[tuple[str, SFTPAttributes]] = []
        try:
            while len(out) < limit:
                t, msg = self.r.wait(self.r.send(CMD_READDIR, handle))
                if t == CMD_STATUS:
                    code = msg.get_int()
                    if code == SFTP_EOF:
                        break
                    raise SftpStatus(code, msg.get_text(), path)
                if t != CMD_NAME:
                    raise SftpStatus(SFTP_FAILURE, "unexpected reply to readdir", path)
                out.extend(names_in(msg))
        finally:
            self.close(handle, path)
        return out

    def lstat(self, path: str) -> SFTPAttributes | None:
        from paramiko.sftp import CMD_ATTRS, CMD_LSTAT

        try:
            t, msg = self.r.call(CMD_LSTAT, path, path=path)
        except SftpStatus as exc:
            if exc.code == SFTP_NO_SUCH_FILE:
                return None
            raise
        if t != CMD_ATTRS:
            raise SftpStatus(SFTP_FAILURE, "unexpected reply to lstat", path)
        return SFTPAttributes._from_msg(msg)

    def read_small(self, path: str, limit: int) -> bytes:
        """At most ``limit + 1`` bytes of a remote file (so that a longer one can be told)."""
        handle = self.open(path, SFTP_FLAG_READ)
        parts: list[bytes] = []
        got = 0
        try:
            while got <= limit:
                t, msg = self.r.wait(self.r.send(CMD_READ, handle, int64(got), limit + 1 - got))
                if t == CMD_STATUS:
                    code = msg.get_int()
                    if code == SFTP_EOF:
                        break
                    raise SftpStatus(code, msg.get_text(), path)
                if t != CMD_DATA:
                    raise SftpStatus(SFTP_FAILURE, "unexpected reply to read", path)
                data = msg.get_binary()
                if not data:
                    break
                parts.append(data[: limit + 1 - got])
                got += len(parts[-1])
        finally:
            self.close(handle, path)
        return b"".join(parts)

    def write_small(self, path: str, data: bytes) -> None:
        """Create ``path`` (exclusively, read-only) holding ``data``, fsynced where offered."""
        handle = self.open(path, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL, 0o444)
        try:
            self.r.call(CMD_WRITE, handle, int64(0), data, path=path)
            if self.fsync:
                self.r.call(CMD_EXTENDED, "fsync@openssh.com", handle, path=path)
        finally:
            self.close(handle, path)

    def link_new(self, src: str, dst: str) -> None:
        """Give ``src`` the name ``dst`` only if ``dst`` does not exist (never replaces it).

        ``hardlink@openssh.com`` where offered (``src`` stays; the caller removes it), else a
        plain SFTP rename, which the protocol defines as failing when ``dst`` exists.
        """
        from paramiko.sftp import CMD_RENAME

        if "hardlink@openssh.com" in self.sftp.extensions:
            self.r.call(CMD_EXTENDED, "hardlink@openssh.com", src, dst, path=dst)
        else:
            self.r.call(CMD_RENAME, src, dst, path=dst)
