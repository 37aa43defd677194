"""Moving objects over one SFTP connection: pipelined, checked, atomic.

paramiko's own pipelined writes drop the server's status replies when the file is closed, so a
failed write (a full disk) could go unnoticed. Here every request's reply is collected and
checked, with a bounded number in flight (``INFLIGHT`` x ``REQUEST`` bytes).

Upload: ``tmp/<random>.part`` is written while the bytes sent are hashed, the server's replies
to every write are checked, ``fsync@openssh.com`` makes it durable, the hash of what was sent
must equal the id and the size must match, then ``posix-rename@openssh.com`` moves it to
``objects/<relpath>`` (fan-out directories made on demand) and a final ``stat`` confirms its
size. With ``verify = "read"`` the temporary file is also read back and re-hashed before the
rename, and an object already present is re-hashed before it is trusted.
"""

from __future__ import annotations

import errno
import os
import socket
import stat as statmod
import uuid
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
from jam_core.objects import hasher, object_relpath, split_oid

from jam_sftp.connect import Connection

REQUEST = 255 * 1024  # OpenSSH's sftp-server serves reads of up to 255 KiB
INFLIGHT = 32  # write requests in flight per file (8 MiB)
READ_INFLIGHT = 8  # read requests in flight: paramiko's channel buffer memmoves what it holds on each read

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

    def put(self, oid: str, source: os.PathLike | str, size: int, progress: Callable[[int], None]) -> None:
        """Store ``source`` as ``oid``; see the module's docstring for the guarantees.

        Three round trips for a small file: (stat the object, open a temporary file), (writes,
        fsync, fstat, close), (mkdir the fan-out directories if not seen yet, rename).
        """
        from paramiko.sftp import CMD_MKDIR, CMD_STAT

        final = self.object_path(oid)
        algorithm, _ = split_oid(oid)
        tmp = self.path("tmp", f"{uuid.uuid4().hex}.part")
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        handle = None
        placed = False
        try:
            attrs = SFTPAttributes()
            attrs.st_mode = 0o444
            n_stat = self.r.send(CMD_STAT, final)
            n_open = self.r.send(CMD_OPEN, tmp, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL, attrs)
            st = self._attrs(n_stat, final)
            handle = self._handle(n_open, tmp)
            if st is not None and st.st_size == size:
                if self.verify != "read" or self.hash_remote(final, size, algorithm) == oid:
                    progress(size)
                    return  # already stored (equal content elsewhere); finally removes tmp
            h = hasher(algorithm)
            pending: deque[tuple[int, int]] = deque()
            offset = 0
            while True:
                data = os.read(fd, REQUEST)
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
            self.known_dirs.add(parent)
            placed = True
        except BaseException as exc:
            if not isinstance(exc, (SftpStatus, IntegrityError)):
                self.conn.broken = True  # cut, timed out or interrupted mid-request: unusable
            raise
        finally:
            os.close(fd)
            if not placed and not self.conn.broken:
                self._cleanup(handle, tmp)

    def _cleanup(self, handle: bytes | None, tmp: str) -> None:
        """Best effort: close and remove the temporary file of a failed upload."""
        try:
            if handle is not None:
                self.close(handle, tmp)
            self.remove(tmp)
        except (SftpStatus, ConnectionLost):
            pass

    def get(self, oid: str, dest: os.PathLike | str, size: int, progress: Callable[[int], None]) -> bool:
        """Write object ``oid`` into ``dest``; False if the remote has no such object.

        Two round trips for a small file: (open), (fstat, the reads, close).
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
            out = os.open(dest, os.O_WRONLY | os.O_CLOEXEC)
            try:

                def check_size() -> None:
                    st = self._attrs(n_fstat, path)
                    if st is not None and st.st_size != size:
                        raise IntegrityError(
                            f"object {oid} on {self.conn.endpoint.label()} has {st.st_size} bytes, expected {size}: "
                            "damaged; not fetched"
                        )

                self._read_into(
                    handle, lambda data, off: os.pwrite(out, data, off), size, path, progress, first=check_size
                )
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

    def _read_into(
        self,
        handle: bytes,
        sink: Callable[[bytes, int], Any],
        size: int,
        path: str,
        progress: Callable[[int], None],
        first: Callable[[], None] | None = None,
    ) -> None:
        """Pipelined reads of ``size`` bytes; ``sink(data, offset)`` gets them in order.

        ``first`` runs once the reads are on their way (to check a reply sent before them).
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
                        raise IntegrityError(f"object at {path} ended early (at byte {off} of {size})")
                    raise SftpStatus(code, text, path)
                if t != CMD_DATA:
                    raise SftpStatus(SFTP_FAILURE, "unexpected reply to read", path)
                data = msg.get_binary()
                sink(data, off)
                progress(len(data))
                if len(data) >= n:
                    break
                off, n = off + len(data), n - len(data)  # short read: ask for the rest now
                t, msg = self.r.call(CMD_READ, handle, int64(off), n, path=path)
            refill()

    def hash_remote(self, path: str, size: int, algorithm: str) -> str:
        """Read a remote file back and hash it (``verify = "read"``)."""
        h = hasher(algorithm)
        handle = self.open(path, SFTP_FLAG_READ)
        try:
            self._read_into(handle, lambda data, off: h.update(data), size, path, lambda n: None)
        finally:
            self.close(handle, path)
        return f"{algorithm}:{h.hexdigest()}"
