"""The stub format.

A stub is a regular file with the original's size, mtime and owner, its write bits cleared,
and two records of the same metadata:

* ``user.jam``: one packed 54-byte xattr (small enough to stay in an ext4 inode, so a scan
  reads it without touching a block): version, hash algorithm, digest, size, mode, mtime_ns.
* the header block: the first bytes of the file are a readable notice and the same metadata
  as JSON (plus the remotes that hold it and when it was stashed), so ``cat`` never shows
  silent zeros and a copy that lost its xattrs can be recognised and repaired. The rest of the
  file is a hole.

Everything read back from either record is validated before use: ids must be well formed,
sizes and modes sane.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass, field

from jam_core.objects import split_oid

XATTR = "user.jam"
VERSION = 1
MAGIC = b"# jam stub v1\n"
HEADER_MAX = 4096  # the header never exceeds one block
MAX_SIZE = 1 << 50  # 1 PiB: anything larger in metadata is hostile or corrupt

_PACK = struct.Struct("<BB32sQIq")  # version, algorithm, digest, size, mode, mtime_ns
_ALGO_CODE = {"b3": 1, "sha256": 2}
_CODE_ALGO = {v: k for k, v in _ALGO_CODE.items()}


class BadStub(ValueError):
    """Stub metadata that cannot be trusted (malformed, hostile or from a newer jam)."""


@dataclass(frozen=True)
class StubRecord:
    oid: str
    size: int
    mode: int  # permission bits of the original (0o7777 mask)
    mtime_ns: int
    remotes: tuple[str, ...] = field(default=())
    stashed_at: str = ""

    def pack(self) -> bytes:
        algorithm, digest = split_oid(self.oid)
        return _PACK.pack(VERSION, _ALGO_CODE[algorithm], bytes.fromhex(digest), self.size,
                          self.mode, self.mtime_ns)

    @classmethod
    def unpack(cls, raw: bytes) -> "StubRecord":
        if len(raw) != _PACK.size:
            raise BadStub(f"user.jam has {len(raw)} bytes, expected {_PACK.size}")
        version, code, digest, size, mode, mtime_ns = _PACK.unpack(raw)
        if version != VERSION:
            raise BadStub(f"stub format version {version} is not supported by this jam")
        if code not in _CODE_ALGO:
            raise BadStub(f"unknown hash algorithm code {code}")
        return cls._checked(f"{_CODE_ALGO[code]}:{digest.hex()}", size, mode, mtime_ns)

    @classmethod
    def _checked(cls, oid, size, mode, mtime_ns, remotes=(), stashed_at="") -> "StubRecord":
        try:
            split_oid(oid)
        except ValueError:
            raise BadStub(f"malformed object id {str(oid)[:80]!r}") from None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_SIZE:
            raise BadStub(f"impossible size {str(size)[:40]!r}")
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            raise BadStub(f"impossible mode {str(mode)[:40]!r}")
        if not isinstance(mtime_ns, int) or isinstance(mtime_ns, bool) or abs(mtime_ns) >= 1 << 63:
            raise BadStub(f"impossible mtime {str(mtime_ns)[:40]!r}")
        if not isinstance(remotes, (list, tuple)) or not all(isinstance(r, str) and len(r) < 256 for r in remotes):
            raise BadStub("remotes must be a list of names")
        if not isinstance(stashed_at, str) or len(stashed_at) > 64:
            raise BadStub("stashed_at must be a short timestamp")
        return cls(oid, size, mode, mtime_ns, tuple(remotes), stashed_at)

    # -- header block ---------------------------------------------------------------------
    def header(self, name: str) -> bytes:
        meta = {
            "jam": VERSION,
            "id": self.oid,
            "size": self.size,
            "mode": f"{self.mode:04o}",
            "mtime_ns": self.mtime_ns,
            "remotes": list(self.remotes),
            "stashed_at": self.stashed_at,
            "name": name,
        }
        text = (
            "This file is stored by jam: its content is on a remote, not on this disk.\n"
            "Bring it back with:  jam checkout <this file>   (or cd into its directory with\n"
            "the jam shell hook). Do not edit this placeholder.\n"
            f"{json.dumps(meta, ensure_ascii=True, separators=(',', ':'))}\n"
        ).encode("ascii")
        data = MAGIC + text
        if len(data) > HEADER_MAX:  # a pathological name: drop it rather than spill a block
            meta["name"] = ""
            return self.header("")
        return data

    @classmethod
    def from_header(cls, data: bytes) -> "StubRecord":
        """Parse the metadata back out of a header block (``doctor --fix`` uses this)."""
        if not data.startswith(MAGIC):
            raise BadStub("no jam stub header")
        for line in data[len(MAGIC):HEADER_MAX].split(b"\n"):
            if line.startswith(b'{"jam":'):
                try:
                    meta = json.loads(line)
                except ValueError:
                    raise BadStub("stub header metadata is not valid JSON") from None
                if not isinstance(meta, dict) or meta.get("jam") != VERSION:
                    raise BadStub("stub header has an unsupported version")
                try:
                    mode = int(meta.get("mode", ""), 8)
                except (TypeError, ValueError):
                    raise BadStub("stub header has a bad mode") from None
                return cls._checked(meta.get("id"), meta.get("size"), mode, meta.get("mtime_ns"),
                                    meta.get("remotes", ()), meta.get("stashed_at", ""))
        raise BadStub("stub header has no metadata line")


def read_record(path_or_fd) -> StubRecord | None:
    """The stub record of a file, ``None`` if it is not a stub. Raises BadStub if corrupt."""
    try:
        raw = os.getxattr(path_or_fd, XATTR, follow_symlinks=False) if not isinstance(path_or_fd, int) \
            else os.getxattr(path_or_fd, XATTR)
    except OSError as exc:
        if exc.errno in (61, 95):  # ENODATA, ENOTSUP
            return None
        raise
    return StubRecord.unpack(raw)


_FAST = struct.Struct("<QIq")  # size, mode, mtime_ns: the tail of _PACK, at offset 34


def quick_dirty(raw: bytes, st: os.stat_result) -> bool | None:
    """For scans: is the stub with ``user.jam`` value ``raw`` dirty? ``None`` if ``raw`` needs
    the full validation of :meth:`StubRecord.unpack` (which explains what is wrong).

    A well-formed record cannot hold a bad id (its digest is 32 raw bytes), so checking the
    length, version, algorithm and ranges is the whole validation.
    """
    if len(raw) != _PACK.size or raw[0] != VERSION or raw[1] not in _CODE_ALGO:
        return None
    size, mode, mtime_ns = _FAST.unpack_from(raw, 34)
    if size > MAX_SIZE or mode > 0o7777:
        return None
    return (st.st_size != size or st.st_mtime_ns != mtime_ns
            or st.st_blocks * 512 > 2 * max(HEADER_MAX, st.st_blksize))


def read_header(path) -> StubRecord:
    """The full metadata from a stub's header block (remotes, stashed_at included)."""
    with open(path, "rb") as f:
        return StubRecord.from_header(f.read(HEADER_MAX))


def may_be_stub(st: os.stat_result) -> bool:
    """Cheap pre-filter from a stat: only these files need their xattr read during a scan.

    Stubs are read-only, sparse (or smaller than a block); an ordinary local file is neither.
    """
    if not stat.S_ISREG(st.st_mode):
        return False
    return (st.st_mode & 0o222) == 0 or st.st_blocks * 512 < st.st_size or st.st_size <= HEADER_MAX


def is_dirty(st: os.stat_result, rec: StubRecord) -> bool:
    """A stub that was written into: its size, mtime or allocated blocks no longer match.

    A write moves the mtime; the block count also catches one whose mtime was set back. A stub
    may own two blocks: its header, and an xattr block if the file had xattrs of its own.
    """
    return (
        st.st_size != rec.size
        or st.st_mtime_ns != rec.mtime_ns
        or st.st_blocks * 512 > 2 * max(HEADER_MAX, st.st_blksize)
    )


def write_stub(fd: int, rec: StubRecord, name: str, atime_ns: int, extra_xattrs: dict[str, bytes] | None = None,
               durable: bool = True) -> None:
    """Fill the new, empty file ``fd`` as the stub of ``rec``; fsync it unless the caller makes
    a whole batch durable at once (``durable=False``)."""
    header = rec.header(name)[: rec.size]
    if header:
        os.write(fd, header)
    os.ftruncate(fd, rec.size)
    for k, v in (extra_xattrs or {}).items():
        os.setxattr(fd, k, v)
    os.setxattr(fd, XATTR, rec.pack())
    os.fchmod(fd, rec.mode & ~0o222)
    os.utime(fd, ns=(atime_ns, rec.mtime_ns))
    if durable:
        os.fsync(fd)
