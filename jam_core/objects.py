"""Content ids: the hash of a file's bytes, named with its algorithm (``b3:<hex>``)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from jam_core.errors import IntegrityError
from jam_core.units import LazyRe

DEFAULT_ALGORITHM = "b3"
CHUNK = 128 << 10  # reads of 128 KiB: they stay in the CPU's cache between read and hash
# (measured here on 512 MiB from the page cache: 128 KiB reads hashed 0.21-0.27 s, 1 MiB 0.49 s,
# 4 MiB reads hashed with every core 0.52 s: a buffer larger than the cache is written to memory
# by the read and read back from it by the hash)

_OID = LazyRe(r"\A(b3|sha256):([0-9a-f]{64})\Z")


def is_valid_oid(oid: object) -> bool:
    """True for a well-formed id. Ids come from xattrs, headers and remotes: check before use."""
    return isinstance(oid, str) and _OID.match(oid) is not None


def split_oid(oid: str) -> tuple[str, str]:
    """``"b3:ab.."`` -> ``("b3", "ab..")``; raises ValueError for anything malformed."""
    m = _OID.match(oid) if isinstance(oid, str) else None
    if m is None:
        raise ValueError(f"malformed object id {oid!r}")
    return m.group(1), m.group(2)


BIG = 8 << 20  # from this size on, an object held in memory is hashed with every core (hasher(threads=True))


def hasher(algorithm: str = DEFAULT_ALGORITHM, threads: bool = False):
    """A new hash object. ``threads``: blake3 spreads each large ``update`` over every core
    (as ``b3sum`` does); worth it only for updates of several MiB held in memory."""
    if algorithm == "b3":
        import blake3

        return blake3.blake3(max_threads=blake3.blake3.AUTO if threads else 1)
    if algorithm == "sha256":
        import hashlib

        return hashlib.sha256()
    raise ValueError(f"unknown hash algorithm {algorithm!r}")


_BUFFERS = threading.local()


def read_buffer(size: int) -> memoryview:
    """A reusable buffer of ``size`` bytes for this thread (a fresh 1 MiB bytearray per file
    cost more than hashing a small file: zero-filled, then faulted in page by page). The
    caller uses it until its next call in the same thread."""
    have = getattr(_BUFFERS, "bufs", None)
    if have is None:
        have = _BUFFERS.bufs = {}
    view = have.get(size)
    if view is None:
        view = have[size] = memoryview(bytearray(size))
    return view


def hash_fd(fd: int, algorithm: str = DEFAULT_ALGORITHM, progress=None, threads: bool = False,
            limit: int | None = None) -> tuple[str, int]:
    """Hash everything readable from ``fd`` (from its current offset), or at most ``limit``
    bytes. Returns (oid, size).

    ``threads`` is accepted for the plugins that pass it and changes nothing: reads of
    ``CHUNK`` bytes hashed by one thread beat blake3's threads over larger reads (above), and a
    reading thread beside the hash did not help either (0.33-0.39 s for the same 512 MiB:
    the hand-offs cost more than they overlap)."""
    h = hasher(algorithm)
    view = read_buffer(CHUNK)
    total = 0
    while limit is None or total < limit:
        want = view if limit is None or limit - total >= len(view) else view[:limit - total]
        n = os.readv(fd, [want])
        if n == 0:
            break
        h.update(view[:n])
        total += n
        if progress is not None:
            progress(n)
    return f"{algorithm}:{h.hexdigest()}", total


def hash_file(path: str | os.PathLike, algorithm: str = DEFAULT_ALGORITHM, progress=None) -> tuple[str, int]:
    """Hash a file's content. Returns (oid, size)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return hash_fd(fd, algorithm, progress)
    finally:
        os.close(fd)


def verify_file(path: str | os.PathLike, oid: str, size: int | None = None) -> None:
    """Raise IntegrityError unless ``path`` holds exactly the content ``oid`` names."""
    algorithm, _ = split_oid(oid)
    got, got_size = hash_file(path, algorithm)
    if got != oid or (size is not None and got_size != size):
        raise IntegrityError(f"{Path(path).name}: content does not match {oid} (got {got}, {got_size} bytes)")


# A remote's identity: a marker at the top of its location, written when it is added and
# recorded in the root's config (``[remote.NAME] id``). An empty mount point, or another
# directory, has no marker or another id, so jam never mistakes it for the drive.
MARKER_NAME = "jam-remote.json"
_MARKER_ID = LazyRe(r"\A[0-9a-f]{32}\Z")


def new_remote_id() -> str:
    import uuid

    return uuid.uuid4().hex


def marker_bytes(remote_id: str) -> bytes:
    """The content of a remote's identity marker."""
    if not _MARKER_ID.match(remote_id):
        raise ValueError(f"malformed remote id {remote_id!r}")
    return ('{"jam_remote":1,"id":"%s"}\n' % remote_id).encode()


def parse_marker(data: bytes) -> str:
    """The id in a marker's content; raises ValueError if it is not a jam marker."""
    import json

    try:
        meta = json.loads(data[:4096])
    except ValueError:
        raise ValueError("not a jam remote marker") from None
    rid = meta.get("id") if isinstance(meta, dict) and meta.get("jam_remote") == 1 else None
    if not isinstance(rid, str) or not _MARKER_ID.match(rid):
        raise ValueError("not a jam remote marker")
    return rid


def object_relpath(oid: str) -> str:
    """Where a remote keeps an object: ``b3/ab/abcd…``. One level of 256 directories, as git
    does: a million objects make directories of about 4,000, and the first thousands do not
    each create a directory of their own (as a second level would)."""
    algorithm, digest = split_oid(oid)
    return f"{algorithm}/{digest[:2]}/{digest}"
