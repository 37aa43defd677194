"""A thread-safe pool of SFTP connections to one remote, living for one command.

The first connection is opened alone (host-key question, login, path checks happen once);
more are opened only when several threads want one at the same time, up to ``connections``
(default 4). A connection that failed mid-request is closed, never reused.
"""

from __future__ import annotations

import stat as statmod
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from paramiko.sftp import (
    SFTP_FAILURE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
    SFTP_PERMISSION_DENIED,
)

from jam_core import (
    MARKER_NAME,
    JamError,
    Remote,
    RemoteError,
    UsageError,
    marker_bytes,
    new_remote_id,
    parse_marker,
    part_is_stale,
    part_name,
)
from jam_sftp.connect import Connection, Endpoint, open_connection, resolve
from jam_sftp.transfer import ConnectionLost, Ops, SftpStatus
from jam_sftp.url import Target

MARKER_MAX = 4096  # a marker is one short JSON line; anything longer is not ours
DEFAULTS: dict[str, Any] = {"connections": 4, "io_timeout": 60.0, "verify": "sent", "fsync": True}


def read_options(remote: Remote) -> dict[str, Any]:
    """Validate the remote's options (``timeout``, ``io_timeout``, ``connections``, ``verify``, ``fsync``)."""
    opts = dict(DEFAULTS)
    raw: Mapping[str, Any] = remote.options or {}
    checks: dict[str, tuple[Any, str]] = {
        "timeout": (lambda v: float(v) if float(v) > 0 else None, "seconds > 0"),
        "io_timeout": (lambda v: float(v) if float(v) > 0 else None, "seconds > 0"),
        "connections": (lambda v: int(v) if 1 <= int(v) <= 16 and int(v) == float(v) else None, "a whole number 1..16"),
        "verify": (lambda v: v if v in ("sent", "read") else None, "'sent' or 'read'"),
        "fsync": (lambda v: v if isinstance(v, bool) else None, "true or false"),
    }
    for key, (convert, expected) in checks.items():
        if key not in raw:
            continue
        try:
            value = convert(raw[key])
        except (TypeError, ValueError):
            value = None
        if value is None:
            raise UsageError(f"remote {remote.name!r}: option {key} = {raw[key]!r} should be {expected}")
        opts[key] = value
    return opts


class Pool:
    """Connections to one sftp remote; ``with pool.ops() as ops:`` lends one to a thread."""

    def __init__(self, remote: Remote, target: Target):
        self.remote = remote
        self.target = target
        self.options = read_options(remote)
        self.size: int = self.options["connections"]
        self.endpoint: Endpoint | None = None
        self.base: str | None = None  # absolute path on the server
        self.layout_checked = False
        self.swept = False  # tmp/ checked for stale uploads in this command
        self.known_dirs: set[str] = set()  # fan-out directories known to exist (shared by threads)
        self.remade_dirs: set[str] = set()  # fan-out directories made again: no kept handle (batch.Uploads)
        self.real_dirs: set[str] = set()  # directories lstat-ed as real ones (not symlinks) by a removal
        self._cond = threading.Condition()
        self._first = threading.Lock()
        self._idle: list[Connection] = []
        self._count = 0
        self._closed = False

    # -- naming ------------------------------------------------------------------------------

    @property
    def where(self) -> str:
        label = self.endpoint.label() if self.endpoint else self.target.display()
        return f"remote {self.remote.name!r} at {label}"

    # -- connections -------------------------------------------------------------------------

    def _open(self) -> Connection:
        try:
            if self.endpoint is None:
                self.endpoint = resolve(self.target.host, self.target.user, self.target.port,
                                        self.options.get("timeout"))
            conn = open_connection(self.endpoint, self.options["io_timeout"])
        except JamError as exc:  # one line that names the remote, then the host
            raise self.error("connect", exc) from None
        if self.base is None:
            try:
                self.base = self._resolve_base(conn)
            except BaseException:
                conn.close()
                raise
        return conn

    def _resolve_base(self, conn: Connection) -> str:
        ops = Ops(conn, "/")
        path = self.target.path
        try:
            st = ops.stat(path)
            if st is None:
                raise RemoteError(
                    f"{self.where}: {path} does not exist on the server (wrong path? jam creates only "
                    "objects/ and tmp/ inside an existing directory)"
                )
            if not statmod.S_ISDIR(st.st_mode or 0):
                raise RemoteError(f"{self.where}: {path} is not a directory")
            return ops.realpath(path)
        except (SftpStatus, ConnectionLost) as exc:
            raise self.error(f"open {path}", exc) from None

    def _acquire(self) -> Connection:
        with self._cond:
            while True:
                if self._closed:
                    raise RemoteError(f"{self.where}: used after the command ended")
                if self._idle:
                    return self._idle.pop()
                if self._count < self.size and (self._count == 0 or self.base is not None):
                    self._count += 1
                    break
                self._cond.wait()
        try:
            if self.base is None:
                with self._first:  # the first login happens once, alone
                    return self._open()
            return self._open()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, conn: Connection) -> None:
        with self._cond:
            if conn.alive and not self._closed:
                self._idle.append(conn)
            else:
                self._count -= 1
                conn.close()
            self._cond.notify()

    @contextmanager
    def ops(self) -> Iterator[Ops]:
        """Lend a connection to this thread; translate failures into one-line RemoteErrors."""
        with self._lend(self._acquire()) as ops:
            yield ops

    @contextmanager
    def _lend(self, conn: Connection) -> Iterator[Ops]:
        """``conn``'s Ops for this thread; a failure other than a status marks it broken; it
        goes back to the pool in any case."""
        try:
            assert self.base is not None
            yield Ops(conn, self.base, self.options["verify"], self.options["fsync"], self.known_dirs, self.remade_dirs)
        except BaseException as exc:
            if not isinstance(exc, (SftpStatus, JamError)):
                conn.broken = True
            raise
        finally:
            self._release(conn)

    def _try_acquire(self) -> Connection | None:
        """An idle connection, or a new one if the pool has room; None rather than wait (a
        helper connection must never wait for one the caller itself holds) or if it fails
        to open (the transfer goes on with the connections it has)."""
        with self._cond:
            if self._closed or self.base is None:
                return None
            if self._idle:
                return self._idle.pop()
            if self._count >= self.size:
                return None
            self._count += 1
        try:
            return self._open()
        except Exception:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            return None

    @contextmanager
    def extra_ops(self) -> Iterator[Ops | None]:
        """Like ``ops()`` for a helper thread of a transfer: None when no connection is free."""
        conn = self._try_acquire()
        if conn is None:
            yield None
            return
        with self._lend(conn) as ops:
            yield ops

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    # -- errors ------------------------------------------------------------------------------

    def error(self, what: str, exc: BaseException, ops: Ops | None = None, size: int = 0) -> JamError:
        """One line naming the remote and its host for a failed operation."""
        if isinstance(exc, JamError):
            if f"remote {self.remote.name!r}" in str(exc):
                return exc
            return type(exc)(f"remote {self.remote.name!r}: {exc}")
        if isinstance(exc, ConnectionLost):
            if exc.timed_out:
                return RemoteError(
                    f"{self.where}: no answer for {self.options['io_timeout']:g}s while trying to {what} "
                    "(raise io_timeout in the remote's options if the server is just slow)"
                )
            host = self.endpoint.label() if self.endpoint else self.target.display()
            return RemoteError(
                f"remote {self.remote.name!r}: connection to {host} lost during transfer (trying to {what}); "
                "nothing was lost, try again"
            )
        if isinstance(exc, SftpStatus):
            if exc.code == SFTP_PERMISSION_DENIED:
                return RemoteError(f"{self.where}: permission denied: cannot {what} ({exc.path})")
            if exc.code == SFTP_NO_SUCH_FILE:
                return RemoteError(f"{self.where}: cannot {what}: {exc.path} does not exist")
            if exc.code == SFTP_FAILURE and ops is not None:
                free = None
                try:
                    free = ops.statvfs_free(self.base or "/")
                except Exception:
                    pass
                if free is not None and free < max(size, 1) + (1 << 20):
                    return RemoteError(
                        f"{self.where}: no space left on the server's disk ({free} bytes free): cannot {what}"
                    )
                return RemoteError(f"{self.where}: the server failed to {what} ({exc.strerror}; disk full or quota?)")
            return RemoteError(f"{self.where}: cannot {what}: {exc.strerror}")
        if isinstance(exc, OSError):  # local: the source or the destination file
            return RemoteError(f"{self.where}: cannot {what}: local file: {exc.strerror or exc}")
        return RemoteError(f"{self.where}: cannot {what}: {type(exc).__name__}: {exc}")

    def object_error(self, what: str, exc: BaseException, ops: Ops | None = None, size: int = 0) -> JamError:
        """Like ``error``, for one object: a failure the server reports for it alone (a full disk,
        a quota: SFTP's generic "failure") is that object's JamError, not the remote's RemoteError,
        so the core goes on with the others and what fits is stored."""
        err = self.error(what, exc, ops, size)
        if isinstance(exc, SftpStatus) and exc.code == SFTP_FAILURE:
            return JamError(str(err))
        return err

    # -- stale uploads -----------------------------------------------------------------------

    def sweep_tmp(self, ops: Ops) -> int:
        """Once per command, before the first store: remove ``tmp/`` entries that are provably
        stale uploads of a jam (``fs.part_is_stale`` on the name and the server's lstat mtime).
        Only regular files qualify (never a symlink, a directory or anything it points to)."""
        with self._cond:
            if self.swept:
                return 0
            self.swept = True
        tmp = ops.path("tmp")
        try:
            entries = ops.listdir_attr(tmp)
        except SftpStatus:
            return 0  # unreadable: nothing is removed
        now = time.time()
        removed = 0
        for name, st in entries:
            if st.st_mode is None or not statmod.S_ISREG(st.st_mode) or st.st_mtime is None:
                continue
            if part_is_stale(name, float(st.st_mtime), now):
                try:
                    ops.remove(f"{tmp}/{name}")
                    removed += 1
                except SftpStatus:
                    pass
        return removed

    # -- identity ----------------------------------------------------------------------------

    def remote_id(self, create: bool) -> str:
        """The id in ``LOCATION/jam-remote.json``; ``""`` when absent (and not ``create``)."""
        with self.ops() as ops:
            try:
                rid = self._read_marker(ops)
                if rid or not create:
                    return rid
                return self._write_marker(ops)
            except (SftpStatus, ConnectionLost) as exc:
                what = f"{'write' if create else 'read'} the identity marker {MARKER_NAME}"
                raise self.error(what, exc, ops) from None

    def _read_marker(self, ops: Ops) -> str:
        path = ops.path(MARKER_NAME)
        st = ops.lstat(path)
        if st is None:
            return ""
        if st.st_mode is None or not statmod.S_ISREG(st.st_mode):
            raise RemoteError(f"{self.where}: {path} is not a regular file, so not a jam remote marker")
        if st.st_size is not None and st.st_size > MARKER_MAX:
            raise RemoteError(f"{self.where}: {path} ({st.st_size} bytes) is not a jam remote marker")
        data = ops.read_small(path, MARKER_MAX)
        if len(data) > MARKER_MAX:
            raise RemoteError(f"{self.where}: {path} is not a jam remote marker (too long)")
        try:
            return parse_marker(data)
        except ValueError:
            raise RemoteError(f"{self.where}: {path} is not a jam remote marker") from None

    def _write_marker(self, ops: Ops) -> str:
        """A new marker, written aside and linked into place only if none exists meanwhile."""
        rid = new_remote_id()
        marker = ops.path(MARKER_NAME)
        tmp = ops.path("tmp")
        st = ops.lstat(tmp)
        folder = tmp if st is not None and statmod.S_ISDIR(st.st_mode or 0) else ops.base
        part = f"{folder.rstrip('/')}/{part_name()}"
        ops.write_small(part, marker_bytes(rid))
        try:
            try:
                ops.link_new(part, marker)
            except SftpStatus:
                other = self._read_marker(ops)  # another jam made one meanwhile: it stands
                if other:
                    return other
                raise
            ops.sync_path(marker)
        finally:
            try:
                ops.remove(part)
            except SftpStatus:
                pass  # renamed into place (no hardlink extension): nothing left
        return rid

    # -- check -------------------------------------------------------------------------------

    def check(self, create: bool) -> str:
        """Connect, check (and with ``create`` make) the layout, prove it writable, describe it."""
        with self.ops() as ops:
            base = ops.base
            try:
                for sub in ("objects", "tmp"):
                    path = ops.path(sub)
                    st = ops.stat(path)
                    if st is None:
                        if not create:
                            raise RemoteError(f"{self.where}: {path} is missing (not a jam remote?)")
                        ops.mkdir(path)
                    elif not statmod.S_ISDIR(st.st_mode or 0):
                        raise RemoteError(f"{self.where}: {path} is not a directory")
                probe = ops.tmp_path()  # a part name: provably stale if this process dies now
                handle = ops.open(probe, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL, 0o600)
                ops.close(handle, probe)
                ops.remove(probe)
                self.layout_checked = True
                free = ops.statvfs_free(base)
            except (SftpStatus, ConnectionLost) as exc:
                raise self.error(f"write in {base}", exc, ops) from None
            ep = ops.conn.endpoint
            space = f", {free / 1e9:.1f} GB free" if free is not None else ""
            return f"sftp {ep.label()}:{base}, {ops.conn.server_version}, writable{space}"

    def ensure_layout(self, ops: Ops) -> None:
        """Before the first upload: objects/ and tmp/ must exist (never re-created silently)."""
        if self.layout_checked:
            return
        for sub in ("objects", "tmp"):
            if ops.stat(ops.path(sub)) is None:
                raise RemoteError(
                    f"{self.where}: {ops.path(sub)} is missing (not a jam remote, or a disk not mounted?); "
                    "jam will not re-create it"
                )
        self.layout_checked = True

