"""The ``dir`` backend: objects in a directory (another disk, a mounted share).

Layout: ``LOCATION/objects/b3/ab/<hex>``, with ``LOCATION/tmp/`` for uploads in progress.
An object is written to a temporary name, verified by re-hashing what was written, and
renamed into place; the ``sync`` hook then makes the whole batch durable with one syncfs
before the core turns any of its files into stubs.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

from jam_core import hookimpl
from jam_core.errors import IntegrityError, RemoteError, UsageError
from jam_core.fs import syncfs
from jam_core.objects import hash_fd, hash_file, object_relpath

KIND = "dir"
_PENDING = "jam_dir.pending"  # session.cache key: remotes written to since the last sync


def _base(remote) -> Path:
    base = Path(remote.location)
    if not base.is_dir():
        raise RemoteError(
            f"remote {remote.name!r}: directory {base} is missing (unplugged drive?); "
            "jam will not re-create it"
        )
    return base


def _object_path(remote, oid: str) -> Path:
    return _base(remote) / "objects" / object_relpath(oid)


def _oserror(remote, what: str, exc: OSError) -> RemoteError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on the remote's disk"
    return RemoteError(f"remote {remote.name!r} ({remote.location}): cannot {what}: {reason}")


@hookimpl
def parse_url(url):
    if "://" in url:
        parts = urlsplit(url)
        if parts.scheme != "file":
            return None
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"file URL {url!r} names host {parts.netloc!r}; use file:///path")
        path = unquote(parts.path)
    else:
        path = url
    return {"kind": KIND, "location": os.path.abspath(os.path.expanduser(path))}


@hookimpl
def check_remote(remote, create):
    if remote.kind != KIND:
        return None
    base = _base(remote)
    try:
        if create:
            (base / "objects").mkdir(exist_ok=True)
            (base / "tmp").mkdir(exist_ok=True)
        probe = base / "tmp" / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _oserror(remote, "write", exc) from None
    usage = shutil.disk_usage(base)
    return f"directory {base}, {usage.free / 1e9:.1f} GB free"


@hookimpl
def has(remote, oid, size):
    if remote.kind != KIND:
        return None
    try:
        return _object_path(remote, oid).stat().st_size == size
    except FileNotFoundError:
        return False


def _copy(src_fd: int, dst_fd: int, size: int, progress) -> None:
    """Copy in the kernel (copy_file_range reflinks or copies without crossing to Python)."""
    left = size
    while left > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(left, 64 << 20))
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                n = os.sendfile(dst_fd, src_fd, None, min(left, 64 << 20))
            else:
                raise
        if n == 0:
            break
        left -= n
        progress(n)
    if left != 0:
        raise IntegrityError(f"source changed size while being copied ({left} bytes short)")


def _session_base(remote, session) -> Path:
    """The remote's directory, checked once per command (a stat per object adds up)."""
    key = ("jam_dir.base", remote.name)
    base = session.cache.get(key)
    if base is None:
        base = session.cache[key] = _base(remote)
    return base


def _mkdirs_below(base: Path, directory: Path) -> None:
    """Create the fan-out directories between ``base`` and ``directory``, never ``base`` itself
    (a remote that vanished mid-command must not be re-created)."""
    missing = []
    d = directory
    while d != base and not d.is_dir():
        missing.append(d)
        d = d.parent
    if not base.is_dir():
        raise FileNotFoundError(2, "the remote's directory disappeared", str(base))
    for d in reversed(missing):
        d.mkdir(exist_ok=True)


@hookimpl
def stash(remote, oid, source, size, session):
    if remote.kind != KIND:
        return None
    algorithm = oid.split(":")[0]
    try:
        base = _session_base(remote, session)
        final = base / "objects" / object_relpath(oid)
        if final.exists():
            # Already stored (equal content elsewhere in the tree): keep it if it still verifies.
            got, got_size = hash_file(final, algorithm)
            if got == oid and got_size == size:
                session.cache.setdefault(_PENDING, {})[remote.name] = remote
                return True
        tmp = base / "tmp" / f"{uuid.uuid4().hex}.part"
        try:
            src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            try:
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                try:
                    dst = os.open(tmp, flags, 0o444)
                except FileNotFoundError:
                    _mkdirs_below(base, tmp.parent)
                    dst = os.open(tmp, flags, 0o444)
                try:
                    _copy(src, dst, size, session.progress)
                    os.lseek(dst, 0, os.SEEK_SET)
                    got, got_size = hash_fd(dst, algorithm)  # verify what was written
                finally:
                    os.close(dst)
            finally:
                os.close(src)
            if got != oid or got_size != size:
                raise IntegrityError(
                    f"{source}: content changed while it was stored on {remote.name!r}; left local"
                )
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                _mkdirs_below(base, final.parent)
                os.rename(tmp, final)
            session.cache.setdefault(_PENDING, {})[remote.name] = remote
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise _oserror(remote, f"store {oid}", exc) from None
    return True


@hookimpl
def sync(remote, session):
    if remote.kind != KIND:
        return None
    if session.cache.get(_PENDING, {}).pop(remote.name, None) is not None:
        try:
            syncfs(_base(remote))
        except OSError as exc:
            raise _oserror(remote, "flush its disk", exc) from None
    return True


@hookimpl
def fetch(remote, oid, dest, size, session):
    if remote.kind != KIND:
        return None
    path = _object_path(remote, oid)
    try:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _oserror(remote, f"read {oid}", exc) from None
    try:
        dst = os.open(dest, os.O_WRONLY | os.O_CLOEXEC)
        try:
            _copy(src, dst, os.fstat(src).st_size, session.progress)
        finally:
            os.close(dst)
    except OSError as exc:
        raise _oserror(remote, f"read {oid}", exc) from None
    finally:
        os.close(src)
    return True
