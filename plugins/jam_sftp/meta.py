"""Removal, jam's metadata files and free space on an sftp remote (the ``remove``,
``write_meta``, ``read_meta``, ``list_meta`` and ``free_space`` hooks: copies, drop, move, gc).

Layout on the server: ``PATH/meta/<name>`` (``refs/<root id>``, ``removing/<root id>``...),
written under a temporary name in ``PATH/tmp/`` (``fs.part_name``, so a killed writer's part
is swept like a killed upload's), fsynced, then ``posix-rename@openssh.com`` over the old file
(a reader sees the old or the new content, never a mix); the directory that holds the new name
is fsynced where the server lets a directory be opened (OpenSSH does).

SFTP (v3) has no ``O_NOFOLLOW``: every component below ``PATH`` is ``lstat``-ed first and a
symlink, a FIFO, a device or a directory where a file is expected is refused (never followed,
never opened: opening a FIFO would hang the server's process).

"Unknown" is never answered as "absent": a name that is not there is reported absent only
after ``PATH/objects`` is seen to be a directory (a location that vanished, an unmounted disk,
is a RemoteError).
"""

from __future__ import annotations

import re
import stat as statmod

from paramiko.sftp import (
    CMD_DATA,
    CMD_EXTENDED,
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
    int64,
)

from jam_core import RemoteError
from jam_sftp.transfer import REQUEST, Ops, SftpStatus

# As the dir backend: up to four segments of [a-z0-9._-], none starting with a dot or a dash.
META_NAME = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,127}(?:/[a-z0-9][a-z0-9._-]{0,127}){0,3}\Z")
META_MAX = 256 << 20  # refs of ~3.8 million objects (a million-file root writes ~68 MB)
WINDOW = 16  # requests in flight while writing or reading a metadata file


def check_name(remote_name: str, name: object, prefix: bool = False) -> str:
    """``name`` if it is a metadata name jam makes (``prefix``: ``""`` is allowed too), else
    RemoteError: nothing is made of a hostile name (``..``, absolute, odd characters)."""
    if prefix and name == "":
        return ""
    if not isinstance(name, str) or not META_NAME.match(name) or ".." in name:
        raise RemoteError(f"remote {remote_name!r}: refused metadata name {str(name)[:80]!r}")
    return name


class Meta:
    """The five hooks' work on one borrowed connection (``ops``) of ``pool``."""

    def __init__(self, pool, ops: Ops):
        self.pool = pool
        self.ops = ops
        self.where = pool.where

    # -- absent or unknown -------------------------------------------------------------------

    def location_present(self) -> None:
        """Raise RemoteError unless ``PATH/objects`` is a directory (asked before any "absent")."""
        st = self.ops.lstat(self.ops.path("objects"))
        if st is None or not statmod.S_ISDIR(st.st_mode or 0):
            raise RemoteError(
                f"{self.where}: {self.ops.path('objects')} is missing (a disk not mounted, a directory "
                "renamed?): cannot tell what it holds"
            )

    def _dirs(self, segments: list[str], create: bool) -> str | None:
        """``PATH/meta/<segments>``, each component a real directory (never a symlink).
        A missing one is made with ``create``, else None (after checking the location)."""
        path = self.ops.path("meta")
        for seg in ["", *segments]:
            if seg:
                path = f"{path}/{seg}"
            st = self.ops.lstat(path)
            if st is None:
                if not create:
                    self.location_present()
                    return None
                self.location_present()  # never a layout inside a location that vanished
                try:
                    self.ops.mkdir(path)
                except SftpStatus:
                    st = self.ops.lstat(path)  # made meanwhile by another jam?
                    if st is None:
                        raise
                else:
                    continue
            if not statmod.S_ISDIR(st.st_mode or 0):
                raise RemoteError(f"{self.where}: {path} is not a directory (a symlink?); jam will not use it")
        return path

    # -- durability --------------------------------------------------------------------------

    def sync_dir(self, path: str) -> None:
        """fsync the directory ``path`` (a removal or rename in it made durable): OpenSSH lets a
        directory be opened for reading and ``fsync@openssh.com``-ed. A server that refuses is
        accepted (SFTP offers nothing better); a lost connection is not."""
        if not self.ops.fsync:
            return
        try:
            handle = self.ops.open(path, SFTP_FLAG_READ)
        except SftpStatus:
            return
        try:
            self.ops.r.call(CMD_EXTENDED, "fsync@openssh.com", handle, path=path)
        except SftpStatus:
            pass
        finally:
            self.ops.close(handle, path)

    # -- remove ------------------------------------------------------------------------------

    def _real_dir(self, path: str) -> bool | None:
        """True if ``path`` is a directory (not a symlink to one), None if absent, else RemoteError.
        A directory seen once is trusted for the rest of the command."""
        seen = self.pool.real_dirs
        if path in seen:
            return True
        st = self.ops.lstat(path)
        if st is None:
            return None
        if not statmod.S_ISDIR(st.st_mode or 0):
            raise RemoteError(f"{self.where}: {path} is not a directory (a symlink?); jam removes nothing through it")
        seen.add(path)
        return True

    def remove(self, oid: str) -> bool:
        path = self.ops.object_path(oid)
        algo_dir, fan_dir = path.rsplit("/", 2)[0], path.rsplit("/", 1)[0]
        for d in (algo_dir, fan_dir):  # never through a symlinked fan-out directory
            if self._real_dir(d) is None:
                self.location_present()
                return False
        st = self.ops.lstat(path)
        if st is None:
            self.location_present()
            return False
        if not statmod.S_ISREG(st.st_mode or 0):
            return False  # a symlink or anything else in its place: not an object of ours
        try:
            self.ops.remove(path)
        except SftpStatus as exc:
            if exc.code != SFTP_NO_SUCH_FILE:
                raise
            return False  # removed meanwhile by another jam
        self.sync_dir(path.rpartition("/")[0])
        return True

    # -- write -------------------------------------------------------------------------------

    def write(self, name: str, data: bytes) -> None:
        if len(data) > META_MAX:
            raise RemoteError(f"{self.where}: meta/{name} would be larger than 64 MiB; not written")
        if not self.ops.posix_rename:
            raise RemoteError(
                f"{self.where}: the server lacks posix-rename@openssh.com, so jam cannot replace its "
                f"metadata atomically (meta/{name} not written; jam removes nothing from it)"
            )
        segments = name.split("/")
        folder = self._dirs(segments[:-1], create=True)
        assert folder is not None
        final = f"{folder}/{segments[-1]}"
        st = self.ops.lstat(final)
        if st is not None and not statmod.S_ISREG(st.st_mode or 0):
            raise RemoteError(f"{self.where}: {final} is not a regular file; jam will not replace it")
        tmp = self.ops.tmp_path()
        handle = self.ops.open(tmp, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL, 0o644)
        renamed = False
        try:
            try:
                self._write_all(handle, tmp, data)
                if self.ops.fsync:
                    self.ops.r.call(CMD_EXTENDED, "fsync@openssh.com", handle, path=tmp)
            finally:
                self.ops.close(handle, tmp)
            self.ops.r.call(CMD_EXTENDED, "posix-rename@openssh.com", tmp, final, path=final)
            renamed = True
            self.sync_dir(folder)
        finally:
            if not renamed:
                try:
                    self.ops.remove(tmp)
                except SftpStatus:
                    pass

    def _write_all(self, handle: bytes, path: str, data: bytes) -> None:
        """Every byte of ``data`` written, up to WINDOW requests in flight, each reply checked."""
        view = memoryview(data)
        pending: list[int] = []
        error: SftpStatus | None = None
        for off in range(0, len(view), REQUEST):
            if len(pending) >= WINDOW:
                error = self._status(pending.pop(0), path, error)
            if error is not None:
                break
            pending.append(self.ops.r.send(CMD_WRITE, handle, int64(off), bytes(view[off:off + REQUEST])))
        for num in pending:
            error = self._status(num, path, error)
        if error is not None:
            raise error

    def _status(self, num: int, path: str, error: SftpStatus | None) -> SftpStatus | None:
        try:
            self.ops.r.status(num, path)
        except SftpStatus as exc:
            return error or exc
        return error

    # -- read --------------------------------------------------------------------------------

    def read(self, name: str) -> bytes | bool:
        segments = name.split("/")
        folder = self._dirs(segments[:-1], create=False)
        if folder is None:
            return False
        path = f"{folder}/{segments[-1]}"
        st = self.ops.lstat(path)
        if st is None:
            self.location_present()
            return False
        if not statmod.S_ISREG(st.st_mode or 0):
            raise RemoteError(f"{self.where}: meta/{name} is not a regular file (a symlink?); not a jam metadata file")
        if (st.st_size or 0) > META_MAX:
            raise RemoteError(f"{self.where}: meta/{name} is larger than 64 MiB; not a jam metadata file")
        handle = self.ops.open(path, SFTP_FLAG_READ)
        try:
            data = self._read_all(handle, path)
        finally:
            self.ops.close(handle, path)
        if len(data) > META_MAX:
            raise RemoteError(f"{self.where}: meta/{name} is larger than 64 MiB; not a jam metadata file")
        return data

    def _read_all(self, handle: bytes, path: str) -> bytes:
        """The file's bytes, at most META_MAX + 1: reads pipelined in order; a short reply
        (allowed by the protocol) makes the next ones start again from where it ended."""
        parts: list[bytes] = []
        got = 0
        eof = False
        while not eof and got <= META_MAX:
            pending = []
            off = got
            for _ in range(WINDOW):
                if off > META_MAX:
                    break
                n = min(REQUEST, META_MAX + 1 - off)
                pending.append((off, n, self.ops.r.send(CMD_READ, handle, int64(off), n)))
                off += n
            in_order = True
            error: SftpStatus | None = None
            for _off, n, num in pending:
                t, msg = self.ops.r.wait(num)
                if error is not None or not in_order or eof:
                    continue  # drain the replies still in flight
                if t == CMD_STATUS:
                    code = msg.get_int()
                    if code == SFTP_EOF:
                        eof = True
                    else:
                        error = SftpStatus(code, msg.get_text(), path)
                    continue
                if t != CMD_DATA:
                    error = SftpStatus(SFTP_FAILURE, "unexpected reply to read", path)
                    continue
                chunk = msg.get_binary()[:n]
                if not chunk:
                    eof = True
                    continue
                parts.append(chunk)
                got += len(chunk)
                if len(chunk) < n:
                    in_order = False  # a short read: the next batch starts at `got`
            if error is not None:
                raise error
        return b"".join(parts)

    # -- list --------------------------------------------------------------------------------

    def list(self, prefix: str) -> list[str]:
        folder = self._dirs(prefix.split("/") if prefix else [], create=False)
        if folder is None:
            return []
        names = []
        for name, _st in self.ops.listdir_attr(folder):
            if META_NAME.match(name):  # not only regular files: read refuses the others (gc stops)
                names.append(f"{prefix}/{name}" if prefix else name)
        return sorted(names)

    # -- free space --------------------------------------------------------------------------

    def free(self) -> int | None:
        return self.ops.statvfs_free(self.ops.base)


__all__ = ["META_MAX", "META_NAME", "Meta", "check_name"]
