"""The ``dir`` backend: objects in a directory (another disk, a mounted share).

Layout: ``LOCATION/objects/b3/ab/<hex>``, with ``LOCATION/tmp/`` for uploads in progress.
An object is written to a temporary name, hashed in the same pass (each byte is read once,
hashed, and those bytes written: the hash is of what was written), and renamed into place;
the ``sync`` hook then makes the whole batch durable with one syncfs before the core turns
any of its files into stubs.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from jam_core import (
    DEFAULT_ALGORITHM,
    MARKER_NAME,
    IntegrityError,
    JamError,
    RemoteError,
    UsageError,
    fsync_dir,
    hash_fd,
    hasher,
    hookimpl,
    marker_bytes,
    new_remote_id,
    object_relpath,
    parse_marker,
    part_is_stale,
    part_name,
    read_buffer,
    syncfs,
)

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


def _oserror(remote, what: str, exc: OSError, item: bool = True) -> JamError:
    """One line for an OSError on the remote. A full remote disk fails only the object being
    stored (a JamError, not a RemoteError, so the core goes on with the others: what fits is
    stored); anything else fails the remote as a whole."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        if not item:
            return RemoteError(f"remote {remote.name!r} ({remote.location}): cannot {what}: "
                               f"no space left on the remote's disk ({remote.location})")
        return JamError(f"remote {remote.name!r} ({remote.location}): cannot {what}: "
                        f"no space left on the remote's disk ({remote.location})")
    return RemoteError(f"remote {remote.name!r} ({remote.location}): cannot {what}: {reason}")


class _LocalFull(Exception):
    """ENOSPC/EDQUOT while writing the local file of a fetch."""


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
    import uuid  # here, not at the top: uuid pulls in platform (milliseconds on the cd hook's path)

    base = _base(remote)
    try:
        if create:  # private: the objects are the users' files, whatever their own modes were
            (base / "objects").mkdir(mode=0o700, exist_ok=True)
            (base / "tmp").mkdir(mode=0o700, exist_ok=True)
        probe = base / "tmp" / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _oserror(remote, "write", exc, item=False) from None
    import shutil  # its only use: not on the cd hook's path

    usage = shutil.disk_usage(base)
    return f"directory {base}, {usage.free / 1e9:.1f} GB free"


def _read_marker(remote, base: Path) -> str | None:
    """The id in ``base/MARKER_NAME``; None if there is none. Never through a symlink, never
    more than a few KiB; anything but a jam marker raises RemoteError."""
    path = base / MARKER_NAME
    bad = RemoteError(f"remote {remote.name!r} ({remote.location}): {path} is not a jam remote marker; "
                      "nothing was stored or fetched")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.ENOTDIR, errno.EISDIR):
            raise bad from None
        raise _oserror(remote, f"read {path}", exc, item=False) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
            raise bad
        data = os.read(fd, 4097)
    except OSError as exc:
        raise _oserror(remote, f"read {path}", exc, item=False) from None
    finally:
        os.close(fd)
    try:
        return parse_marker(data)
    except ValueError:
        raise bad from None


def _write_marker(base: Path, data: bytes) -> None:
    """Create ``base/MARKER_NAME`` with ``data``, never over an existing marker (another jam's
    marker wins: it is read back by the caller). Written aside and hard-linked into place, so
    no reader sees half a marker; a filesystem without hard links gets an O_EXCL create."""
    final = base / MARKER_NAME
    tmp = base / f".{MARKER_NAME}.{part_name()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, final, follow_symlinks=False)
        except FileExistsError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
            try:  # vfat, exfat...: no hard links
                fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444)
            except FileExistsError:
                return
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    fsync_dir(base)


@hookimpl
def remote_id(remote, session, create):
    if remote.kind != KIND:
        return None
    base = _base(remote)
    rid = _read_marker(remote, base)
    if rid is not None:
        return rid
    if not create:
        return ""
    try:
        _write_marker(base, marker_bytes(new_remote_id()))
    except OSError as exc:
        raise _oserror(remote, "write its identity marker", exc, item=False) from None
    rid = _read_marker(remote, base)
    if rid is None:
        raise RemoteError(f"remote {remote.name!r} ({remote.location}): its identity marker vanished "
                          "as it was written")
    return rid


@hookimpl
def has(remote, oid, size):
    if remote.kind != KIND:
        return None
    try:
        dfd, name = _object_dirfd(_base(remote), oid)
    except FileNotFoundError:  # also a symlinked objects/ or fan-out directory: no copy here
        return False
    except OSError as exc:
        raise _oserror(remote, f"look for {oid}", exc, item=False) from None
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _oserror(remote, f"look for {oid}", exc, item=False) from None
    finally:
        os.close(dfd)
    return stat.S_ISREG(st.st_mode) and st.st_size == size and not _unsealed(st)


def _unsealed(st: os.stat_result) -> bool:
    """An object that still shares its inode with a writable file elsewhere: a file adopted
    (``_adopt``) whose stash has not settled it, or was killed before it could. Never trusted as
    a copy: the file's other name could still write into it. Sealed objects have one name and no
    write permission (a copy made read-only, an adopted file once swapped)."""
    return st.st_nlink > 1 and bool(st.st_mode & 0o222)


_ALGOS = ("b3", "sha256")
_HEX2 = re.compile(r"\A[0-9a-f]{2}\Z")
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_DIRFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _subdirs(fd: int, pattern) -> list[str]:
    with os.scandir(fd) as it:
        return sorted(e.name for e in it if pattern(e.name) and e.is_dir(follow_symlinks=False))


def _list(remote, base: Path, sweep: bool):
    """Objects by one scandir per fan-out directory (dir fds, never through a symlink), then
    the stale parts of ``tmp/``."""
    try:
        top = os.open(base / "objects", _DIRFLAGS)
    except OSError as exc:
        raise _oserror(remote, "list its objects", exc, item=False) from None
    try:
        for algo in _subdirs(top, lambda n: n in _ALGOS):
            afd = os.open(algo, _DIRFLAGS, dir_fd=top)
            try:
                for fan in _subdirs(afd, _HEX2.match):
                    ffd = os.open(fan, _DIRFLAGS, dir_fd=afd)
                    try:
                        with os.scandir(ffd) as it:
                            for e in it:
                                if _HEX64.match(e.name) and e.name.startswith(fan) and e.is_file(follow_symlinks=False):
                                    yield f"{algo}:{e.name}", e.stat(follow_symlinks=False).st_size
                    finally:
                        os.close(ffd)
            finally:
                os.close(afd)
    except OSError as exc:
        raise _oserror(remote, "list its objects", exc, item=False) from None
    finally:
        os.close(top)
    try:
        tfd = os.open(base / "tmp", _DIRFLAGS)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _oserror(remote, "list its tmp/", exc, item=False) from None
    try:
        now = time.time()
        with os.scandir(tfd) as it:
            entries = list(it)
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if not (stat.S_ISREG(st.st_mode) and _PART.match(e.name) and part_is_stale(e.name, st.st_mtime, now)):
                continue
            if sweep:
                try:
                    os.unlink(e.name, dir_fd=tfd)
                except OSError:
                    continue  # gone meanwhile, or not removable: not listed as removed
            yield f"tmp/{e.name}", st.st_size
    finally:
        os.close(tfd)


@hookimpl
def list_objects(remote, session, sweep):
    if remote.kind != KIND:
        return None
    return _list(remote, _base(remote), sweep)


def _copy(src_fd: int, dst_fd: int, size: int, progress) -> None:
    """Copy the first ``size`` bytes of ``src_fd`` to ``dst_fd``, never reading past ``size``.

    Only data extents are copied (SEEK_DATA/SEEK_HOLE) and the destination is truncated to
    ``size``, so a sparse file stays sparse; each extent is copied in the kernel
    (copy_file_range reflinks or copies without crossing to Python). Raises IntegrityError
    if the source ends before ``size``; an OSError writing ``dst_fd`` propagates.
    """
    off = 0
    while off < size:
        try:
            data = os.lseek(src_fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no data after ``off`` (a hole up to the end)
                raise
            break
        if data >= size:
            break
        hole = min(os.lseek(src_fd, data, os.SEEK_HOLE), size)
        if hole <= data:  # the file shrank under us
            break
        _copy_range(src_fd, dst_fd, data, hole - data, progress)
        off = hole
    if off == size:  # copied up to the end (``_copy_range`` fails a source that ends early)
        return
    os.ftruncate(dst_fd, size)  # a hole at the end
    if os.fstat(src_fd).st_size < size:
        raise IntegrityError(f"the source is shorter than the {size} bytes expected (it changed while copied)")


_WRITEBACK_STEP = 32 << 20  # start writing to the disk every 32 MiB written (see _start_writeback)
_libc = []


def _start_writeback(fd: int, off: int, count: int) -> None:
    """Ask the kernel to start writing ``count`` bytes at ``off`` to the disk now
    (sync_file_range SYNC_FILE_RANGE_WRITE: no wait, no durability promise). The syncfs before
    any swap still makes everything durable; this only lets the disk work while jam copies and
    hashes, instead of all at the end. Best effort: any failure is ignored."""
    try:
        if not _libc:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.sync_file_range
            fn.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
            _libc.append(fn)
        _libc[0](fd, off, count, 2)  # SYNC_FILE_RANGE_WRITE
    except (OSError, AttributeError):
        _libc.append(lambda *a: 0)


_COPY_CHUNK = 1 << 20
_BIG = 8 << 20  # from this size on, hashing runs in a second thread beside the writes
_BIG_CHUNK = 4 << 20


def _copy_hashing(src_fd: int, dst_fd: int, size: int, algorithm: str, progress) -> tuple[str, int]:
    """Copy the first ``size`` bytes of ``src_fd`` to ``dst_fd`` and hash them in the same
    pass: every byte is read once into memory, hashed, and those very bytes are written. The
    hash is of what was written, so it verifies the copy without reading it back. Returns
    (oid, bytes).

    Holes of the source (SEEK_DATA/SEEK_HOLE) are hashed as the zeros they read as and not
    written, so a sparse file stays sparse. A large file is hashed in a second thread while
    its chunk is written (both let go of the GIL), and its writeback to the disk is started as
    it goes. Raises IntegrityError if the source ends before ``size``."""
    big = size >= _BIG
    h = hasher(algorithm)
    view = read_buffer(_BIG_CHUNK if big else _COPY_CHUNK)  # used until this function returns
    zeros = None
    pool = None
    if big:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="jam-dir-hash")
    try:
        off = written = 0
        flushed = 0
        extent_end = 0 if big else size  # end of the data being read; a small file is read through
        while off < size:
            if off >= extent_end:  # the next data extent, and the hole before it
                try:
                    data = min(os.lseek(src_fd, off, os.SEEK_DATA), size)
                    extent_end = min(os.lseek(src_fd, data, os.SEEK_HOLE), size) if data < size else size
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: only a hole after ``off``
                        raise
                    data = extent_end = size
                if extent_end <= data:  # the file shrank under us: read on, and fail below
                    extent_end = size
                while off < data:  # a hole reads as zeros, and so it is hashed
                    if zeros is None:
                        zeros = bytes(len(view))
                    n = min(len(zeros), data - off)
                    h.update(zeros[:n] if n < len(zeros) else zeros)
                    off += n
                    progress(n)
                if off >= size:
                    break
            n = os.preadv(src_fd, [view[:min(len(view), extent_end - off)]], off)
            if n == 0:
                raise IntegrityError(f"the source is shorter than the {size} bytes expected (it changed while copied)")
            chunk = view[:n]
            hashing = pool.submit(h.update, chunk) if pool is not None else None
            if hashing is None:
                h.update(chunk)
            done = 0
            try:
                while done < n:
                    done += os.pwrite(dst_fd, chunk[done:], off + done)
            finally:
                if hashing is not None:
                    hashing.result()
            off += n
            written = off
            progress(n)
            if big and off - flushed >= _WRITEBACK_STEP:
                _start_writeback(dst_fd, flushed, off - flushed)
                flushed = off
        if written != size:  # a hole at the end (the new file is as long as what was written)
            os.ftruncate(dst_fd, size)
        if big and off > flushed:
            _start_writeback(dst_fd, flushed, off - flushed)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return f"{algorithm}:{h.hexdigest()}", off


def _copy_verifying(src_fd: int, dst_fd: int, size: int, algorithm: str, progress) -> tuple[str, int]:
    """A large object: copied in the kernel (``_copy``: copy_file_range over the data extents,
    holes kept, writeback started as it goes; a reflink where the filesystem shares extents),
    then what the destination now holds is hashed (read back from the page cache just
    written). The hash is of the object's own bytes, so it verifies the copy itself; it starts
    only once the copy is over, so a write into the part by anyone else during the copy is in
    what it hashes (a hash of each chunk while the next was copied missed a write behind it:
    tests/test_attack13.py).
    Half the CPU of reading, hashing and writing each byte in Python (``_copy_hashing``), and a
    third of its time. Returns (oid, bytes hashed); raises IntegrityError if the source ends
    before ``size``."""
    _copy(src_fd, dst_fd, size, progress)
    os.lseek(dst_fd, 0, os.SEEK_SET)
    return hash_fd(dst_fd, algorithm, limit=size)


def _copy_range(src_fd: int, dst_fd: int, off: int, count: int, progress) -> None:
    """Copy ``count`` bytes at ``off`` from src to the same offset in dst."""
    end = off + count
    while off < end:
        want = min(end - off, _WRITEBACK_STEP)
        try:
            n = os.copy_file_range(src_fd, dst_fd, want, off, off)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            chunk = os.pread(src_fd, min(want, 1 << 20), off)
            n = len(chunk)
            view = memoryview(chunk)
            done = 0
            while done < n:
                done += os.pwrite(dst_fd, view[done:], off + done)
        if n == 0:
            raise IntegrityError(f"the source ended {end - off} bytes early (it changed while copied)")
        if count >= _BIG:  # let the disk write while the rest is copied and the core verifies
            _start_writeback(dst_fd, off, n)
        off += n
        progress(n)


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
        d.mkdir(mode=0o700, exist_ok=True)  # private, as check_remote makes objects/ and tmp/


class _SymlinkedDir(FileNotFoundError):
    """``objects/``, the algorithm's or the fan-out directory of an object is a symlink (or not
    a directory): whatever lies beyond it is another place's, never a copy on this remote."""


def _object_dirfd(base: Path, oid: str) -> tuple[int, str]:
    """The fan-out directory of ``oid`` opened (objects/, then the algorithm's directory, then
    the fan-out directory, each relative to the one before with O_DIRECTORY|O_NOFOLLOW: never
    through a symlink), and the object's name in it. A symlink or non-directory on the way
    raises _SymlinkedDir (a FileNotFoundError: "not held"); a missing one FileNotFoundError."""
    algo, fan, name = object_relpath(oid).split("/")
    where = base / "objects"
    try:
        fd = os.open(where, _DIRFLAGS)
        try:
            for part in (algo, fan):
                where = where / part
                nfd = os.open(part, _DIRFLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _SymlinkedDir(errno.ENOENT, "a symlink or not a directory", str(where)) from None
        raise
    return fd, name


def _open_object(base: Path, oid: str) -> tuple[int, os.stat_result]:
    """Open an object for reading: never through a symlink (neither the file nor a directory
    on its way: ``_object_dirfd``), never a FIFO or device. Returns the descriptor and its
    ``fstat``."""
    dfd, name = _object_dirfd(base, oid)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(base / "objects" / object_relpath(oid)))
    return fd, st


# Names jam's uploads have: part_name() (<host>.<pid>.<16 hex>.part) or older jams' <32 hex>.part.
# A user's "notes.part" is neither, however old (fs.part_is_stale alone would take it).
_PART = re.compile(r"\A(?:[0-9a-f]{32}|[A-Za-z0-9_-]{1,64}\.[0-9]{1,10}\.[0-9a-f]{16})\.part\Z")


def _clean_parts(remote, base: Path, session) -> None:
    """Once per command and remote, before the first upload: remove the uploads in ``tmp/``
    that are provably stale (``fs.part_is_stale``); nothing else, never through a symlink."""
    key = ("jam_dir.cleaned", remote.name)
    if session.cache.get(key):
        return
    session.cache[key] = True
    try:
        fd = os.open(base / "tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # no tmp/ (or a symlink): the upload itself will say what is wrong
    try:
        now = time.time()
        with os.scandir(fd) as it:
            entries = list(it)
        for e in entries:
            try:
                st = os.stat(e.name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if _PART.match(e.name) and part_is_stale(e.name, st.st_mtime, now):
                    os.unlink(e.name, dir_fd=fd)
                elif _ADOPTS.match(e.name) and part_is_stale(e.name, st.st_mtime, now, suffix=_ADOPT_SUFFIX):
                    _recover_adoptions(base, fd, e.name)
            except OSError:
                continue  # gone meanwhile, or not ours to remove
    finally:
        os.close(fd)


@hookimpl
def recover(remote, session):
    if remote.kind != KIND:
        return None
    try:
        base = _session_base(remote, session)
        recorded = remote.options.get("id")
        if not recorded or _read_marker(remote, base) != recorded:
            return False  # not the remote that was added (another drive, an empty mount point): untouched
        _clean_parts(remote, base, session)
    except (OSError, JamError):
        return False
    return True


# -- adoption: the file itself as the object, where the remote shares its filesystem -----------
# A file stashed to a remote on its own filesystem is hard-linked into objects/, not copied
# (git-annex moves it): no byte is written, no block freed. The core's lease keeps every writer
# out from its hash until the swap; ``settle`` then seals the object (read-only, its one name
# left), or, if the file stays (changed, or a writer came), gives the object an inode of its own
# while the writer waits. Each command lists the objects it adopted in ``tmp/<host>.<pid>.<hex>
# .adopt``: the list of a killed command is undone by the next (``_recover_adoptions``).
_ADOPT_SUFFIX = ".adopt"
_ADOPTS = re.compile(r"\A[A-Za-z0-9_-]{1,64}\.[0-9]{1,10}\.[0-9a-f]{16}\.adopt\Z")
_ADOPT_LOG = "jam_dir.adopt_log"  # session.cache key: (remote name) -> this command's list
_ADOPTED = "jam_dir.adopted"  # session.cache key (with the remote's name): {(dev, ino): settled (Event)}
_SETTLE_WAIT = 120.0  # at most, for an equal file's adoption to settle (then copied over it)


def _settling(remote, st: os.stat_result, session) -> bool:
    """Whether the object of ``st`` is a file this command adopted and has not settled (an
    equal file of an earlier batch, not yet swapped): if so, wait until it is (sealed as a stub's
    object, or made a copy of its own) and True: look at the object again. An equal file never
    keeps an object that is still another file's inode; the batch that adopted it is swapped
    by the main thread while this one is stored."""
    settled = session.cache.get((_ADOPTED, remote.name), {}).get((st.st_dev, st.st_ino))
    if settled is None:
        return False
    settled.wait(_SETTLE_WAIT)
    return True


def _may_adopt(remote, base: Path, st: os.stat_result, session) -> bool:
    """Whether ``_adopt`` may link the file of ``st``: the stash offers it, the remote is on the
    file's filesystem, and the file has no other name and is the caller's own."""
    if getattr(session, "adoption", None) is None or st.st_nlink != 1 or st.st_uid != os.geteuid():
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    key = ("jam_dir.dev", remote.name)
    dev = session.cache.get(key)
    if dev is None:
        dev = session.cache[key] = os.stat(base / "objects").st_dev
    return dev == st.st_dev


def _adopt_log(remote, base: Path, session) -> int:
    """This command's list of adopted objects on ``remote`` (created on first use; removed
    when the session closes, after every adoption of the command was settled)."""
    logs = session.cache.setdefault(_ADOPT_LOG, {})
    fd = logs.get(remote.name)
    if fd is None:
        path = base / "tmp" / part_name(_ADOPT_SUFFIX)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            _mkdirs_below(base, path.parent)
            fd = os.open(path, flags, 0o600)
        logs[remote.name] = fd

        def done(fd=fd, path=path):
            os.close(fd)
            try:
                path.unlink()
            except OSError:
                pass
        session.on_close(done)
    return fd


def _adopt(remote, base: Path, oid: str, source, size: int, session) -> bool:
    """Store ``source`` as ``oid`` by linking it into place (``Session.adopt``), not copying it.
    False where that cannot be (another filesystem, another name, a writer, a link refused):
    the caller copies it."""
    try:
        st = os.stat(source)
        if st.st_size != size or not _may_adopt(remote, base, st, session):
            return False
        log = _adopt_log(remote, base, session)
    except OSError:
        return False
    ident = (st.st_dev, st.st_ino)
    # An equal file of a later batch waits for this one to settle (``_settling``).
    import threading

    in_flight = session.cache.setdefault((_ADOPTED, remote.name), {})

    def link() -> bool:  # by the core, just before the swap (Leases.link)
        os.write(log, f"{oid}\n".encode())  # before the link: a killed command's is undone
        try:
            dfd, name = _object_dirfd(base, oid)
        except FileNotFoundError as exc:
            if isinstance(exc, _SymlinkedDir):
                raise OSError(errno.ELOOP, f"{exc.filename} is a symlink or not a directory") from None
            _mkdirs_below(base, base / "objects" / object_relpath(oid).rpartition("/")[0])
            dfd, name = _object_dirfd(base, oid)
        in_flight[ident] = threading.Event()  # before the object appears: an equal file waits for it
        try:
            os.link(source, name, dst_dir_fd=dfd, follow_symlinks=True)  # never over an object there
        except BaseException as exc:
            in_flight.pop(ident).set()
            if not isinstance(exc, OSError):
                raise
        else:
            return True
        finally:
            os.close(dfd)
        # Stored meanwhile (kept if it verifies), or the link refused: a copy, as anywhere else
        try:
            _store_copy_unless_held(remote, base, oid, source, size)
        except OSError as exc:
            raise _oserror(remote, f"store {oid}", exc) from None
        return False

    def settle(kept: bool) -> None:
        try:
            if kept:  # a stub now: the object is its one name, sealed as a copy would be
                _drop_own_xattrs(source)
                os.chmod(source, 0o444)
            else:
                _unshare(base, oid, ident)
        finally:
            done = in_flight.pop(ident, None)
            if done is not None:
                done.set()

    return session.adopt(source, link, settle)


def _drop_own_xattrs(path: str | int) -> None:
    """An adopted object holds content only, as a copy does: the file's own ``user.*`` xattrs
    (a download's origin URL, a tag) went with its stub, which carries them back. Removed
    before it is made read-only (a ``user.*`` xattr needs write permission to be removed);
    one that cannot be removed stays (the object's bytes are what counts)."""
    if not hasattr(os, "listxattr"):  # (no xattr calls in the os module: not Linux)
        return
    try:
        names = os.listxattr(path)
    except OSError:
        return
    for name in names:
        if name.startswith("user."):
            try:
                os.removexattr(path, name)
            except OSError:
                pass


def _store_copy_unless_held(remote, base: Path, oid: str, source, size: int) -> None:
    """Keep the object ``oid`` if it is sealed and verifies, else copy ``source`` over it."""
    try:
        fd, st = _open_object(base, oid)
    except FileNotFoundError:
        fd, st = -1, None
    try:
        if st is not None and not _unsealed(st) and hash_fd(fd, oid.split(":")[0]) == (oid, size):
            return
    finally:
        if fd >= 0:
            os.close(fd)
    _store_copy(remote, base, oid, source, size, lambda n: None)


def _unshare(base: Path, oid: str, ident: tuple[int, int]) -> None:
    """If the object ``oid`` is the inode ``ident`` (an adopted file that keeps its name), give
    it an inode of its own: a copy, verified against ``oid``, renamed over it. Content that no
    longer hashes to ``oid`` (written since) is removed instead: no stub can name it."""
    try:
        fd, st = _open_object(base, oid)
    except OSError:
        return
    tmp = None
    try:
        if (st.st_dev, st.st_ino) != ident:
            return  # another inode is there now (a copy made meanwhile): nothing of ours
        tmp = base / "tmp" / part_name()
        dst = _new_part(base, tmp)
        try:
            got = _copy_hashing(fd, dst, st.st_size, oid.split(":")[0], lambda n: None)
        finally:
            os.close(dst)
        if got == (oid, st.st_size):
            os.rename(tmp, base / "objects" / object_relpath(oid))
            tmp = None
        else:
            _remove_if(base, oid, ident)
    finally:
        os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _remove_if(base: Path, oid: str, ident: tuple[int, int]) -> None:
    """Remove the object ``oid`` only if it is the inode ``ident``: moved aside first, so that a
    copy another command renamed into place meanwhile is put back, never removed."""
    dfd, name = _object_dirfd(base, oid)
    aside = base / "tmp" / part_name()
    try:
        os.rename(name, aside, src_dir_fd=dfd)
        st = os.stat(aside, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != ident:
            try:
                os.link(aside, name, dst_dir_fd=dfd)
            except FileExistsError:
                pass
        aside.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(dfd)


def _recover_adoptions(base: Path, tmp_fd: int, log: str) -> None:
    """Undo the adoptions a killed command listed in ``tmp/LOG``: each object it names that is
    not sealed gets an inode of its own (``_unshare``) or, alone but writable (killed between
    its swap and its seal), is sealed once it verifies. Then the list goes."""
    with open(os.open(log, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=tmp_fd), "rb") as f:
        oids = f.read(1 << 24).split()
    for raw in dict.fromkeys(oids):
        oid = raw.decode("ascii", "replace")
        algo, _, hexpart = oid.partition(":")
        if algo not in _ALGOS or not _HEX64.match(hexpart):
            continue
        try:
            fd, st = _open_object(base, oid)
        except OSError:
            continue
        try:
            if not st.st_mode & 0o222 and st.st_nlink == 1:
                continue  # sealed
            if st.st_nlink > 1:
                os.close(fd)
                fd = -1
                _unshare(base, oid, (st.st_dev, st.st_ino))
            elif hash_fd(fd, algo) == (oid, st.st_size):
                _drop_own_xattrs(fd)
                os.fchmod(fd, 0o444)
            else:
                _remove_if(base, oid, (st.st_dev, st.st_ino))
        except OSError:
            continue
        finally:
            if fd >= 0:
                os.close(fd)
    os.unlink(log, dir_fd=tmp_fd)


def _new_part(base: Path, tmp: Path) -> int:
    """Create the part ``tmp`` (read-only, never through a symlink, its directory made if
    missing) and return it open for reading and writing."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(tmp, flags, 0o444)
    except FileNotFoundError:
        _mkdirs_below(base, tmp.parent)
        return os.open(tmp, flags, 0o444)


_AHEAD = "jam_dir.ahead"  # session.cache key: copies started by stash_ahead, by (remote, dev, ino)


class _Cancelled(Exception):
    pass


class _Ahead:
    """A copy of a file to ``tmp`` started before its id is known (``stash_ahead``), then hashed
    (``_copy_verifying``); ``stash`` moves it into place only if that hash is the id."""

    def __init__(self, src: int, dst: int, tmp: Path, size: int, session) -> None:
        import threading

        self.src, self.dst, self.tmp, self.size = src, dst, tmp, size
        self.got: tuple[str, int] | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._session = session
        self._thread = threading.Thread(target=self._run, name="jam-dir-ahead", daemon=True)
        self._thread.start()

    def _progress(self, n: int) -> None:
        if self.cancelled:
            raise _Cancelled()
        self._session.progress(n)

    def _run(self) -> None:
        try:
            self.got = _copy_verifying(self.src, self.dst, self.size, DEFAULT_ALGORITHM, self._progress)
        except BaseException as exc:
            self.error = exc
        finally:
            os.close(self.dst)
            os.close(self.src)

    def result(self) -> tuple[str, int] | None:
        """The (oid, size) of what the copy holds once it is over; None if it failed."""
        self._thread.join()
        return self.got if self.error is None else None

    def drop(self) -> None:
        """Stop the copy if it runs and remove its temporary file (unless ``stash`` took it)."""
        self.cancelled = True
        self._thread.join()
        if self.tmp is not None:
            try:
                self.tmp.unlink(missing_ok=True)
            except OSError:
                pass
            self.tmp = None


def _source_key(remote, st: os.stat_result) -> tuple:
    return (remote.name, st.st_dev, st.st_ino)


@hookimpl
def stash_ahead(remote, source, size, session):
    """Start copying ``source`` to ``tmp/`` (and hashing the copy) in a thread of its own
    while the core hashes the file; ``stash`` takes it if its hash is the id."""
    if remote.kind != KIND:
        return None
    if size < _BIG:
        return False
    try:
        base = _session_base(remote, session)
        _clean_parts(remote, base, session)
        src = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # /proc/self/fd/N: follow it
    except (OSError, JamError):
        return False
    try:
        st = os.fstat(src)
        if _may_adopt(remote, base, st, session):  # linked, not copied: nothing to start
            os.close(src)
            return False
        tmp = base / "tmp" / part_name()
        dst = _new_part(base, tmp)
    except OSError:
        os.close(src)
        return False
    ahead = _Ahead(src, dst, tmp, size, session)
    started = session.cache.setdefault(_AHEAD, {})
    if not started:
        session.on_close(lambda: [a.drop() for a in started.values()] and started.clear())
    old = started.pop(_source_key(remote, st), None)
    if old is not None:
        old.drop()
    started[_source_key(remote, st)] = ahead
    return True


def _take_ahead(remote, oid: str, source, size: int, final: Path, session) -> bool:
    """Move the copy ``stash_ahead`` made of ``source`` into place as ``final``, if its bytes
    hash to ``oid``; True if it did. Any other outcome removes it (the caller copies anew)."""
    started = session.cache.get(_AHEAD)
    if not started:
        return False
    try:
        st = os.stat(source)
    except OSError:
        return False
    ahead = started.pop(_source_key(remote, st), None)
    if ahead is None:
        return False
    try:
        if ahead.result() != (oid, size):  # changed meanwhile, or the copy failed
            return False
        try:
            os.rename(ahead.tmp, final)
        except FileNotFoundError:
            _mkdirs_below(_session_base(remote, session), final.parent)
            os.rename(ahead.tmp, final)
        ahead.tmp = None
        return True
    finally:
        ahead.drop()


@hookimpl
def stash(remote, oid, source, size, session):
    if remote.kind != KIND:
        return None
    algorithm = oid.split(":")[0]
    try:
        base = _session_base(remote, session)
        _clean_parts(remote, base, session)
        final = base / "objects" / object_relpath(oid)
        if _take_ahead(remote, oid, source, size, final, session):
            session.cache.setdefault(_PENDING, {})[remote.name] = remote
            return True
        try:
            fd, _st = _open_object(base, oid)
            if _settling(remote, _st, session):  # an equal file's adoption by this command: once settled
                os.close(fd)
                fd, _st = _open_object(base, oid)
        except _SymlinkedDir as exc:  # what is stored beyond it would be another place's copy
            raise RemoteError(f"remote {remote.name!r} ({remote.location}): {exc.filename} is a symlink "
                              f"or not a directory; {oid} not stored there") from None
        except FileNotFoundError:
            pass
        else:
            # Already stored (equal content elsewhere in the tree): keep it if it still verifies
            # and is no other file's inode (then a copy is renamed over it, below).
            try:
                got, got_size = ("", -1) if _unsealed(_st) else hash_fd(fd, algorithm)
            finally:
                os.close(fd)
            if got == oid and got_size == size:
                session.cache.setdefault(_PENDING, {})[remote.name] = remote
                return True
        if not _adopt(remote, base, oid, source, size, session):
            _store_copy(remote, base, oid, source, size, session.progress)
        session.cache.setdefault(_PENDING, {})[remote.name] = remote
    except OSError as exc:
        raise _oserror(remote, f"store {oid}", exc) from None
    return True


def _store_copy(remote, base: Path, oid: str, source, size: int, progress) -> None:
    """Copy ``source`` to a part, verify it hashes to ``oid``, rename it into place (over
    whatever is there: an object that did not verify)."""
    algorithm = oid.split(":")[0]
    final = base / "objects" / object_relpath(oid)
    tmp = base / "tmp" / part_name()
    try:
        src = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # may be /proc/self/fd/N: follow it
        try:
            dst = _new_part(base, tmp)
            try:
                if size >= _BIG:
                    got, got_size = _copy_verifying(src, dst, size, algorithm, progress)
                else:
                    got, got_size = _copy_hashing(src, dst, size, algorithm, progress)
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
        tmp = None  # renamed: nothing left to remove (a failed unlink per object saved)
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


@hookimpl
def sync(remote, session):
    if remote.kind != KIND:
        return None
    if session.cache.get(_PENDING, {}).pop(remote.name, None) is not None:
        try:
            syncfs(_base(remote))
        except OSError as exc:
            raise _oserror(remote, "flush its disk", exc, item=False) from None
    return True


def _open_sized(remote, oid: str, size: int, session, after: str = ""):
    """The object's descriptor (never through a symlink, never a FIFO or device), False when
    the object is not there; a copy of another size than the stub says is an IntegrityError
    (nothing is read of it), a remote unplugged since the command began a RemoteError."""
    try:
        src, st = _open_object(_session_base(remote, session), oid)
    except FileNotFoundError:
        if not os.path.isdir(remote.location):  # unplugged since the command began: not "absent"
            raise RemoteError(f"remote {remote.name!r}: directory {remote.location} is missing "
                              "(unplugged drive?); jam will not re-create it") from None
        return False
    except OSError as exc:
        raise _oserror(remote, f"read {oid}", exc, item=False) from None
    have = st.st_size
    if have != size:  # never read more (or less) than the stub says: a wrong object
        os.close(src)
        raise IntegrityError(f"remote {remote.name!r} holds a corrupt {oid}: {have} bytes, not the "
                             f"{size} the stub says{after}")
    return src


@hookimpl
def hash_object(remote, oid, size, session):
    """doctor --deep: hash the object where it lies (one read, no copy; large ones with every
    core)."""
    if remote.kind != KIND:
        return None
    src = _open_sized(remote, oid, size, session)
    if src is False:
        return False
    try:
        got, n = hash_fd(src, oid.split(":")[0], session.progress)
        return got if n == size else f"{got} ({n} bytes)"
    except OSError as exc:
        raise _oserror(remote, f"read {oid}", exc, item=False) from None
    finally:
        os.close(src)


@hookimpl
def fetch(remote, oid, dest, size, session):
    if remote.kind != KIND:
        return None
    src = _open_sized(remote, oid, size, session, "; not fetched, stub left as it was")
    if src is False:
        return False
    try:
        dst = os.open(dest, os.O_WRONLY | os.O_CLOEXEC)  # may be /proc/self/fd/N: follow it
        try:
            _copy(src, dst, size, session.progress)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # only writes fail so: the local file
                raise _LocalFull() from exc
            raise
        finally:
            os.close(dst)
    except _LocalFull:
        where = os.readlink(dest) if str(dest).startswith("/proc/self/fd/") else os.path.abspath(dest)
        raise JamError(f"cannot fetch {oid}: no space left on the local disk "
                       f"({os.path.dirname(where)})") from None
    except OSError as exc:
        raise _oserror(remote, f"read {oid}", exc, item=False) from None
    finally:
        os.close(src)
    return True


# -- removal, metadata files, free space (copies, drop, gc) ---------------------------------

_META_NAME = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,127}(?:/[a-z0-9][a-z0-9._-]{0,127}){0,3}\Z")
META_MAX = 256 << 20  # refs of ~3.8 million objects (a million-file root writes ~68 MB)


def _meta_path(remote, name: str) -> Path:
    """``LOCATION/meta/NAME``, for a name of ``[a-z0-9._-]`` segments (no ``..``, no ``/`` at
    either end): anything else is refused before a path is made of it."""
    if not isinstance(name, str) or not _META_NAME.match(name) or ".." in name:
        raise RemoteError(f"remote {remote.name!r}: refused metadata name {str(name)[:80]!r}")
    return _base(remote) / "meta" / name


def _no_symlink_below(base: Path, path: Path) -> None:
    """Refuse a path whose directories between ``base`` and ``path`` include a symlink."""
    d = path.parent
    while d != base:
        if d.is_symlink():
            raise OSError(errno.ELOOP, "a symlink in the remote's meta/ tree", str(d))
        d = d.parent


@hookimpl
def remove(remote, oid, session):
    if remote.kind != KIND:
        return None
    try:
        base = _session_base(remote, session)
        try:
            dfd, name = _object_dirfd(base, oid)  # never through a symlinked objects/ or fan-out dir
        except _SymlinkedDir as exc:
            raise RemoteError(f"remote {remote.name!r} ({remote.location}): {exc.filename} is a symlink "
                              f"or not a directory; {oid} not removed") from None
        except FileNotFoundError:
            if not base.is_dir():
                raise RemoteError(f"remote {remote.name!r}: directory {base} is missing (unplugged drive?)") from None
            return False
        try:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if not stat.S_ISREG(st.st_mode):  # a symlink or anything else in its place: not an object of ours
                return False
            os.unlink(name, dir_fd=dfd)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise _oserror(remote, f"remove {oid}", exc, item=False) from None
    return True


@hookimpl
def write_meta(remote, name, data, session):
    if remote.kind != KIND:
        return None
    path = _meta_path(remote, name)
    base = _base(remote)
    tmp = base / "tmp" / part_name()
    try:
        _mkdirs_below(base, path.parent)
        _no_symlink_below(base, path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise _oserror(remote, f"write meta/{name}", exc, item=False) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return True


@hookimpl
def read_meta(remote, name, session):
    if remote.kind != KIND:
        return None
    path = _meta_path(remote, name)
    base = _base(remote)
    try:
        _no_symlink_below(base, path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _oserror(remote, f"read meta/{name}", exc, item=False) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > META_MAX:
            raise RemoteError(f"remote {remote.name!r}: meta/{name} is not a jam metadata file")
        chunks, total = [], 0
        while total <= META_MAX:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > META_MAX:
            raise RemoteError(f"remote {remote.name!r}: meta/{name} is larger than 64 MiB")
        return b"".join(chunks)
    except OSError as exc:
        raise _oserror(remote, f"read meta/{name}", exc, item=False) from None
    finally:
        os.close(fd)


@hookimpl
def list_meta(remote, prefix, session):
    if remote.kind != KIND:
        return None
    prefix = prefix.strip("/")
    base = _base(remote)
    top = base / "meta" / prefix if prefix else base / "meta"
    if prefix:
        _meta_path(remote, prefix)  # validate
    try:
        fd = os.open(top, _DIRFLAGS)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _oserror(remote, f"list meta/{prefix}", exc, item=False) from None
    try:
        with os.scandir(fd) as it:
            # Every entry of a jam name, not only regular files: a symlink, directory or FIFO
            # listed is refused by read_meta, so a root's refs that cannot be read stop gc and
            # drop on this remote instead of counting as "no refs" (tests/test_attack_r8.py).
            return sorted(f"{prefix}/{e.name}" if prefix else e.name for e in it
                          if _META_NAME.match(e.name))
    except OSError as exc:
        raise _oserror(remote, f"list meta/{prefix}", exc, item=False) from None
    finally:
        os.close(fd)


@hookimpl
def free_space(remote, session):
    if remote.kind != KIND:
        return None
    try:
        st = os.statvfs(_base(remote))
    except OSError as exc:
        raise _oserror(remote, "read its free space", exc, item=False) from None
    return st.f_bavail * st.f_frsize
