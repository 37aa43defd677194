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

import errno
import json
import os
import stat
import struct
from dataclasses import dataclass, field

from jam_core.fs import getxattr, setxattr
from jam_core.objects import split_oid

XATTR = "user.jam"
VERSION = 1
MAGIC = b"# jam stub v1\n"
HEADER_MAX = 4096  # the header never exceeds one block
MAX_SIZE = 1 << 50  # 1 PiB: anything larger in metadata is hostile or corrupt

_PACK = struct.Struct("<BB32sQIq")  # version, algorithm, digest, size, mode, mtime_ns
_ALGO_CODE = {"b3": 1, "sha256": 2}
_CODE_ALGO = {v: k for k, v in _ALGO_CODE.items()}


_NOTICE = (
    MAGIC.decode("ascii")
    + "This file is stored by jam: its content is on a remote, not on this disk.\n"
    "Bring it back with:  jam checkout <this file>   (or cd into its directory with\n"
    "the jam shell hook). Do not edit this placeholder.\n"
)
_json_str = json.encoder.encode_basestring_ascii  # json.dumps(s, ensure_ascii=True) of a str


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
        """The header block: the notice, then the metadata as one line of JSON (ASCII, no
        spaces). Built from a template with the JSON encoder's own string escaping: byte for
        byte what ``json.dumps`` of the same dict made (a test compares them), at a fraction
        of its cost per stub."""
        enc = _json_str
        rem = ",".join([enc(r) for r in self.remotes])
        data = (f'{_NOTICE}{{"jam":{VERSION},"id":{enc(self.oid)},"size":{int(self.size)},'
                f'"mode":"{self.mode:04o}","mtime_ns":{int(self.mtime_ns)},"remotes":[{rem}],'
                f'"stashed_at":{enc(self.stashed_at)},"name":{enc(name)}}}\n').encode("ascii")
        if len(data) > HEADER_MAX:  # a pathological name: drop it rather than spill a block
            return self.header("") if name else data
        return data

    @classmethod
    def from_header(cls, data: bytes) -> "StubRecord":
        """Parse the metadata back out of a header block (``doctor --fix`` uses this)."""
        return cls._parse_header(data)[0]

    @classmethod
    def _parse_header(cls, data: bytes) -> tuple["StubRecord", str]:
        """(record, name recorded in it) from a header block; BadStub if it is not one."""
        if not data.startswith(MAGIC):
            raise BadStub("no jam stub header")
        lines = data[len(MAGIC):HEADER_MAX].split(b"\n")
        for line in lines[:-1]:  # the metadata line is complete only if its newline is there
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
                name = meta.get("name", "")
                if not isinstance(name, str):
                    raise BadStub("stub header has a bad name")
                rec = cls._checked(meta.get("id"), meta.get("size"), mode, meta.get("mtime_ns"),
                                   meta.get("remotes", ()), meta.get("stashed_at", ""))
                return rec, name
        raise BadStub("stub header has no metadata line")

    def same_content(self, other: "StubRecord") -> bool:
        """Both records describe the same original (id, size, mode, mtime)."""
        return (self.oid, self.size, self.mode, self.mtime_ns) == (other.oid, other.size, other.mode, other.mtime_ns)


def read_record(path_or_fd) -> StubRecord | None:
    """The stub record of a file, ``None`` if it is not a stub. Raises BadStub if corrupt."""
    try:
        raw = getxattr(path_or_fd, XATTR, follow_symlinks=False) if not isinstance(path_or_fd, int) \
            else getxattr(path_or_fd, XATTR)
    except OSError as exc:
        if exc.errno in (61, 95):  # ENODATA, ENOTSUP
            return None
        raise
    return StubRecord.unpack(raw)


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
    return _stat_dirty(st, rec.size, rec.mtime_ns)


def _stat_dirty(st: os.stat_result, size: int, mtime_ns: int) -> bool:
    """The stat rule, in one place: another size or mtime, or more blocks than a stub owns."""
    return st.st_size != size or st.st_mtime_ns != mtime_ns or _more_blocks(st)


def _more_blocks(st: os.stat_result) -> bool:
    return st.st_blocks * 512 > 2 * max(HEADER_MAX, st.st_blksize)


def only_blocks_differ(st: os.stat_result, rec: StubRecord) -> bool:
    """``is_dirty`` says so by the block count alone: the size and mtime are the record's and
    the write bits still cleared. A stub whose holes were filled with zeros (restored by
    ``rsync -aX`` without ``-S``, ``cp --sparse=never``, ``tar --xattrs``) looks so and is
    clean; one written into with its mtime put back looks the same: only its bytes
    (``verify_clean``) tell them apart."""
    return st.st_size == rec.size and st.st_mtime_ns == rec.mtime_ns and not st.st_mode & 0o222 and _more_blocks(st)


def write_stub(fd: int, rec: StubRecord, name: str, atime_ns: int, extra_xattrs: dict[str, bytes] | None = None,
               durable: bool = True) -> None:
    """Fill the new, empty file ``fd`` as the stub of ``rec``; fsync it unless the caller makes
    a whole batch durable at once (``durable=False``)."""
    header = rec.header(name)[: rec.size]
    if header:
        os.write(fd, header)
    os.ftruncate(fd, rec.size)
    for k, v in (extra_xattrs or {}).items():
        setxattr(fd, k, v)
    setxattr(fd, XATTR, rec.pack())
    os.fchmod(fd, rec.mode & ~0o222)
    os.utime(fd, ns=(atime_ns, rec.mtime_ns))
    if durable:
        os.fsync(fd)


# -- a stub is what its bytes say ------------------------------------------------------------
LOST_XATTRS = "lost its xattrs (a copy?)"  # Entry.problem of a stub recognised by its header alone


def record_from_block(data: bytes, file_size: int) -> StubRecord | None:
    """The record in a file's first block, if that block is a jam stub header.

    ``None`` if ``data`` does not start like a header (an ordinary file). BadStub if it does
    but the header is damaged, hostile, or claims a size other than the file's ``file_size``:
    validated as strictly as ``user.jam``. Stash uses this to refuse a file whose content is a
    placeholder (a stub that lost its xattrs), which would otherwise be stored as content.
    """
    if not data.startswith(MAGIC):
        return None
    rec = StubRecord.from_header(data)
    if rec.size != file_size:
        raise BadStub(f"its header says {rec.size} bytes, the file has {file_size}")
    return rec


def _span(st: os.stat_result) -> int:
    """How much of the file the header block covers (one filesystem block, or the file)."""
    return min(st.st_size, max(HEADER_MAX, st.st_blksize or 0))


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n > 0:
        chunk = os.pread(fd, min(n, 1 << 20), offset)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


_PRINTABLE = bytes(range(0x20, 0x7F))


def _header_matches(block: bytes, rec: StubRecord) -> bool:
    """``block`` (the file's first block) is the header ``write_stub`` writes for ``rec``,
    followed by zeros."""
    try:
        hrec, name = StubRecord._parse_header(block)
    except BadStub:
        hrec = None
    if hrec is not None:
        if not hrec.same_content(rec):
            return False
        expected = hrec.header(name)
        return block[:len(expected)] == expected and not block[len(expected):].strip(b"\0")
    # A stub smaller than its header holds only the header's first rec.size bytes: what can be
    # known of them must match, the rest (remotes, stashing time, name) be one unfinished
    # line of printable text.
    if len(block) != rec.size or rec.size > HEADER_MAX:
        return False
    known = rec.header("")
    known = known[:known.index(b',"remotes":')]
    n = min(len(block), len(known))
    return block[:n] == known[:n] and not block[n:].translate(None, _PRINTABLE)


def _zeros_from(fd: int, offset: int, size: int) -> bool:
    """No byte but zero from ``offset`` to ``size``: holes are skipped (SEEK_DATA), data that
    is there (written, or a filesystem without holes) is read."""
    while offset < size:
        try:
            offset = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == 6:  # ENXIO: only a hole is left
                return True
            raise
        if offset >= size:
            return True
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            return True  # the file shrank meanwhile; the caller's stat checks catch that
        if chunk.strip(b"\0"):
            return False
        offset += len(chunk)
    return True


def verify_clean(fd: int, rec: StubRecord, st: os.stat_result | None = None) -> bool:
    """The file open at ``fd`` holds exactly the bytes of ``rec``'s stub: its first block is the
    header that ``write_stub`` writes (for the name recorded in the header), padded with zeros,
    and nothing but zeros (a hole) after it. False for a stub written into, even one whose
    size, mtime and block count were put back (``rsync --inplace -t``, ``touch -r``).

    Reads one block and seeks over the hole: cheap, but not free; ``is_dirty`` is the stat
    rule for scans, this is for decisions (checkout before its swap, doctor, status when the
    catalog cannot vouch for the stub's inode and ctime).

    ``st``: the ``fstat`` of ``fd`` the caller just made (not asked again).
    """
    if st is None:
        st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != rec.size:
        return False
    span = _span(st)
    block = _pread_all(fd, span, 0)
    if len(block) != span or not _header_matches(block, rec):
        return False
    return _zeros_from(fd, span, rec.size)


_NOATIME = getattr(os, "O_NOATIME", 0)


def open_checked(path, st: os.stat_result | None = None) -> int | None:
    """A read-only descriptor of the regular file at ``path`` (never through a symlink, never
    blocking on a FIFO), or None if it is not one or, given ``st``, not that same file."""
    from jam_core.fs import open_regular

    try:
        try:
            # Looking is not using: the age and lru policies read atime as the last use, and a
            # doctor or status that read every file's first block would make all of them recent.
            return open_regular(None, path, expect=st, flags=os.O_RDONLY | _NOATIME)
        except PermissionError:  # O_NOATIME is for the file's owner (or CAP_FOWNER) only
            if not _NOATIME:
                raise
            return open_regular(None, path, expect=st)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ELOOP, errno.ESTALE):  # ESTALE: NotTheFile
            return None
        raise


def verify_clean_path(path, rec: StubRecord, st: os.stat_result | None = None) -> bool:
    """``verify_clean`` of the file at ``path`` (False if it is gone or, given ``st``, replaced)."""
    fd = open_checked(path, st)
    if fd is None:
        return False
    try:
        return verify_clean(fd, rec)
    finally:
        os.close(fd)


def record_from_copy(path, st: os.stat_result) -> tuple[StubRecord, bool] | None:
    """For a regular file with no ``user.jam``: ``(record, dirty)`` if its first block is a jam
    header (a stub that lost its xattrs, e.g. through a plain ``cp``), None if it is not.

    Raises BadStub if it starts like a header that cannot be trusted. Such a copy's mtime is
    the copy's own, so ``dirty`` is decided by its bytes (``verify_clean``), not by its stat.
    """
    if st.st_size < len(MAGIC):
        return None
    fd = open_checked(path, st)
    if fd is None:
        return None
    try:
        rec = record_from_block(os.pread(fd, HEADER_MAX, 0), st.st_size)
        if rec is None:
            return None
        return rec, not verify_clean(fd, rec)
    finally:
        os.close(fd)


def rewrite_header(fd: int, rec: StubRecord, name: str) -> None:
    """Write ``rec``'s header block again into the stub open for writing at ``fd`` (its first
    block was lost to zeros or damage): header, zeros to the end of the block, mtime kept."""
    st = os.fstat(fd)
    span = _span(st)
    data = rec.header(name)[:rec.size]
    os.pwrite(fd, data + b"\0" * (span - len(data)), 0)
    os.utime(fd, ns=(st.st_atime_ns, rec.mtime_ns))
    os.fsync(fd)
