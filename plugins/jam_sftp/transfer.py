"""Moving objects over one SFTP connection: pipelined, checked, atomic, durable.

paramiko's own pipelined writes drop the server's status replies when the file is closed, so a
failed write (a full disk) could go unnoticed. Here every request's reply is collected and
checked, with a bounded number in flight (``INFLIGHT`` x ``REQUEST`` bytes).

Upload: ``tmp/<fs.part_name()>`` is written while the bytes sent are hashed, the server's
replies to every write are checked, ``fsync@openssh.com`` makes it durable, the hash of what
was sent must equal the id and the size must match, then ``posix-rename@openssh.com`` moves it
to ``objects/<relpath>`` (fan-out directories made on demand), and the final name is opened and
fsynced again so that the rename itself is on disk before success is reported (SFTP offers no
way to fsync a directory; on journalling file systems the file's fsync commits the rename).
An object already present is never trusted by its size: it is uploaded again through the same
path and renamed over the old copy (one transfer, and a damaged copy is repaired). With
``verify = "read"`` the temporary file is also read back and re-hashed before the rename.

Download: never more than ``size`` bytes are read; an object of another size (by ``fstat`` or
by a read past its end) is damaged. All-zero 4 KiB blocks are not written, so a sparse file
comes back sparse.
"""

from __future__ import annotations

import errno
import os
import socket
import stat as statmod
from collections import deque
from typing import Any, Callable

import paramiko
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_OPEN,
    CMD_READ,
    CMD_STATUS,
    CMD_WRITE,
)
from paramiko.sftp import (
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

from jam_core.errors import IntegrityError
from jam_core.fs import part_name
from jam_core.objects import hasher, object_relpath, split_oid

from jam_sftp.connect import Connection

REQUEST = 255 * 1024  # OpenSSH's sftp-server serves reads of up to 255 KiB
INFLIGHT = 32  # write requests in flight per file (8 MiB)
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


class Ops:
    """The remote operations jam needs, on one connection and one remote location."""

    def __init__(
        self, conn: Connection, base: str, verify: str = "sent", fsync: bool = True, known_dirs: set[str] | None = None
    ):
        self.conn = conn
        self.known_dirs = known_dirs if known_dirs is not None else set()  # fan-out dirs seen to exist
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

    def makedirs(self, path: str) -> None:
        """``mkdir -p`` below the base (which must exist)."""
        rel = path[len(self.base) :].strip("/").split("/") if path.startswith(self.base) else path.split("/")
        current = self.base
        for part in rel:
            current = f"{current.rstrip('/')}/{part}"
            try:
                self.mkdir(current)
            except SftpStatus:
                st = self.stat(current)
                if st is None or not statmod.S_ISDIR(st.st_mode or 0):
                    raise

    def remove(self, path: str) -> None:
        from paramiko.sftp import CMD_REMOVE

        self.r.call(CMD_REMOVE, path, path=path)

    def rename_over(self, src: str, dst: str) -> None:
        """Atomic rename that replaces ``dst`` (posix-rename where offered)."""
        from paramiko.sftp import CMD_RENAME

        if self.posix_rename:
            self.r.call(CMD_EXTENDED, "posix-rename@openssh.com", src, dst, path=dst)
            return
        try:
            self.r.call(CMD_RENAME, src, dst, path=dst)
        except SftpStatus:
            if self.stat(dst) is None:
                raise
            self.remove(dst)  # plain SFTP rename will not replace; a brief gap, never a half file
            self.r.call(CMD_RENAME, src, dst, path=dst)

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
        st = self.stat(self.object_path(oid))
        return st is not None and st.st_size == size

    def _reply_status(self, num: int) -> int:
        """Wait for a status reply; return its code (no exception)."""
        t, msg = self.r.wait(num)
        return msg.get_int() if t == CMD_STATUS else SFTP_FAILURE

    def _handle(self, num: int, path: str) -> bytes:
        t, msg = self.r.wait(num)
        if t == CMD_STATUS:
            code = msg.get_int()
            raise SftpStatus(code, msg.get_text(), path)
        if t != CMD_HANDLE:
            raise SftpStatus(SFTP_FAILURE, "unexpected reply to open", path)
        return msg.get_binary()

    def _attrs(self, num: int, path: str) -> SFTPAttributes | None:
        from paramiko.sftp import CMD_ATTRS

        t, msg = self.r.wait(num)
        if t == CMD_STATUS:
            code = msg.get_int()
            if code == SFTP_NO_SUCH_FILE:
                return None
            raise SftpStatus(code, msg.get_text(), path)
        if t != CMD_ATTRS:
            raise SftpStatus(SFTP_FAILURE, "unexpected reply to stat", path)
        return SFTPAttributes._from_msg(msg)

    def tmp_path(self) -> str:
        """A new temporary name under ``tmp/`` that says which jam wrote it (``fs.part_name``)."""
        return self.path("tmp", part_name())

    def put(self, oid: str, source: os.PathLike | str, size: int, progress: Callable[[int], None]) -> None:
        """Store ``source`` as ``oid``; see the module's docstring for the guarantees.

        Round trips for a small file: (open a temporary file), (writes, fsync, fstat, close),
        (mkdir the fan-out directories if not seen yet, rename), (open the final name), (fsync,
        close). An object already there is replaced by the verified upload, never trusted.
        """
        from paramiko.sftp import CMD_MKDIR

        final = self.object_path(oid)
        algorithm, _ = split_oid(oid)
        tmp = self.tmp_path()
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        handle = None
        placed = False
        try:
            attrs = SFTPAttributes()
            attrs.st_mode = 0o444
            n_open = self.r.send(CMD_OPEN, tmp, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL, attrs)
            handle = self._handle(n_open, tmp)
            h = hasher(algorithm)
            pending: deque[tuple[int, int]] = deque()
            offset = 0
            while offset <= size:  # never send more than the size (plus one byte to notice growth)
                data = os.read(fd, min(REQUEST, size + 1 - offset))
                if not data:
                    break
                h.update(data)
                pending.append((self.r.send(CMD_WRITE, handle, int64(offset), data), len(data)))
                offset += len(data)
                if len(pending) >= INFLIGHT:
                    num, n = pending.popleft()
                    self.r.status(num, tmp)
                    progress(n)
            n_sync = self.r.send(CMD_EXTENDED, "fsync@openssh.com", handle) if self.fsync else None
            n_fstat = self.r.send(CMD_FSTAT, handle)
            h_, handle = handle, None
            n_close = self.r.send(CMD_CLOSE, h_)
            while pending:
                num, n = pending.popleft()
                self.r.status(num, tmp)
                progress(n)
            if n_sync is not None:
                self.r.status(n_sync, tmp)
            st = self._attrs(n_fstat, tmp)
            self.r.status(n_close, tmp)
            got = f"{algorithm}:{h.hexdigest()}"
            if got != oid or offset != size:
                raise IntegrityError(
                    f"{source}: content changed while it was being stored ({offset} bytes, {got}); left local"
                )
            if st is None or st.st_size != size:
                raise IntegrityError(f"{oid}: the server holds {st.st_size if st else 'no'} bytes of {size} after upload")
            if self.verify == "read" and self.hash_remote(tmp, size, algorithm) != oid:
                raise IntegrityError(f"{oid}: the copy read back from the server does not match")
            parent = final.rsplit("/", 1)[0]
            if parent not in self.known_dirs:  # ask for every level; "exists" answers are fine
                rel = object_relpath(oid).split("/")[:-1]
                for depth in range(1, len(rel) + 1):
                    self.r.send(CMD_MKDIR, self.path("objects", *rel[:depth]), SFTPAttributes())
            try:
                self.rename_over(tmp, final)
            except SftpStatus as exc:
                if exc.code != SFTP_NO_SUCH_FILE:
                    raise
                self.makedirs(parent)
                self.rename_over(tmp, final)
            placed = True  # the temporary file is the object now: never remove it
            self.known_dirs.add(parent)
            self.sync_path(final)
        except BaseException as exc:
            if not isinstance(exc, (SftpStatus, IntegrityError)):
                self.conn.broken = True  # cut, timed out or interrupted mid-request: unusable
            raise
        finally:
            os.close(fd)
            if not placed and not self.conn.broken:
                self._cleanup(handle, tmp)

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

    def _cleanup(self, handle: bytes | None, tmp: str) -> None:
        """Best effort: close and remove the temporary file of a failed upload."""
        try:
            if handle is not None:
                self.close(handle, tmp)
            self.remove(tmp)
        except (SftpStatus, ConnectionLost):
            pass

    def get(self, oid: str, dest: os.PathLike | str, size: int, progress: Callable[[int], None]) -> bool:
        """Write object ``oid`` into ``dest`` (emptied first); False if the remote has no such object.

        Never more than ``size`` bytes are read: the size from ``fstat`` must match, and a read
        at ``size`` must answer end-of-file, or the object is damaged (IntegrityError). Zero
        blocks become holes. Two round trips for a small file: (open), (fstat, reads, close).
        """
        path = self.object_path(oid)
        try:
            handle = self.open(path, SFTP_FLAG_READ)
        except SftpStatus as exc:
            if exc.code == SFTP_NO_SUCH_FILE:
                return False
            raise
        closed = False
        try:
            n_fstat = self.r.send(CMD_FSTAT, handle)
            out = os.open(dest, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)  # may be /proc/self/fd/N: follow it
            try:

                def check_size() -> None:
                    st = self._attrs(n_fstat, path)
                    if st is not None and st.st_size is not None and st.st_size != size:
                        raise IntegrityError(wrong_size(oid, self.conn.endpoint.label(), st.st_size, size))

                self._read_into(
                    handle, lambda data, off: write_sparse(out, data, off), size, path, progress, first=check_size
                )
                self._expect_eof(handle, oid, size, path)
                os.ftruncate(out, size)
            finally:
                os.close(out)
            closed = True
            self.close(handle, path)
        except BaseException as exc:
            if not isinstance(exc, (SftpStatus, IntegrityError)):
                self.conn.broken = True
            raise
        finally:
            if not closed and not self.conn.broken:
                try:
                    self.close(handle, path)
                except (SftpStatus, ConnectionLost):
                    pass
        return True

    def _expect_eof(self, handle: bytes, oid: str, size: int, path: str) -> None:
        """A read at ``size`` must answer end-of-file: the object is not longer than its id says."""
        t, msg = self.r.wait(self.r.send(CMD_READ, handle, int64(size), 1))
        if t == CMD_DATA:
            raise IntegrityError(wrong_size(oid, self.conn.endpoint.label(), f"more than {size}", size))
        if t != CMD_STATUS:
            raise SftpStatus(SFTP_FAILURE, "unexpected reply to read", path)
        code = msg.get_int()
        if code != SFTP_EOF:
            raise SftpStatus(code, msg.get_text(), path)

    def _read_into(
        self,
        handle: bytes,
        sink: Callable[[bytes, int], Any],
        size: int,
        path: str,
        progress: Callable[[int], None],
        first: Callable[[], None] | None = None,
    ) -> None:
        """Pipelined reads of exactly ``size`` bytes; ``sink(data, offset)`` gets them in order.

        ``first`` runs once the reads are on their way (to check a reply sent before them).
        A reply longer than asked is refused; one that ends early is an IntegrityError.
        """
        pending: deque[tuple[int, int, int]] = deque()
        offset = 0

        def refill() -> None:
            nonlocal offset
            while offset < size and len(pending) < READ_INFLIGHT:
                n = min(REQUEST, size - offset)
                pending.append((self.r.send(CMD_READ, handle, int64(offset), n), offset, n))
                offset += n

        refill()
        if first is not None:
            first()
        while pending:
            num, off, n = pending.popleft()
            t, msg = self.r.wait(num)
            while True:
                if t == CMD_STATUS:
                    code = msg.get_int()
                    text = msg.get_text()
                    if code == SFTP_EOF:
                        raise IntegrityError(
                            f"object at {path} is shorter than its size (ended at byte {off} of {size}): "
                            "corrupt; not fetched"
                        )
                    raise SftpStatus(code, text, path)
                if t != CMD_DATA:
                    raise SftpStatus(SFTP_FAILURE, "unexpected reply to read", path)
                data = msg.get_binary()
                if len(data) > n or not data:
                    raise SftpStatus(SFTP_FAILURE, "the server sent more (or less) than was asked", path)
                sink(data, off)
                progress(len(data))
                if len(data) >= n:
                    break
                off, n = off + len(data), n - len(data)  # short read: ask for the rest now
                t, msg = self.r.wait(self.r.send(CMD_READ, handle, int64(off), n))
            refill()

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

    def hash_remote(self, path: str, size: int, algorithm: str) -> str:
        """Read a remote file back and hash it (``verify = "read"``)."""
        h = hasher(algorithm)
        handle = self.open(path, SFTP_FLAG_READ)
        try:
            self._read_into(handle, lambda data, off: h.update(data), size, path, lambda n: None)
        finally:
            self.close(handle, path)
        return f"{algorithm}:{h.hexdigest()}"
