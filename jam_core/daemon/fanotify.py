"""ctypes bindings for the fanotify calls the daemon needs (Linux >= 6.14 for pre-content).

Only what jam uses: ``init``, ``mark``, reading events (``parse``) and writing responses
(``respond``). Constants are the kernel's uapi values (include/uapi/linux/fanotify.h).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

# fanotify_init flags
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_CLASS_CONTENT = 0x00000004
FAN_CLASS_PRE_CONTENT = 0x00000008
FAN_UNLIMITED_QUEUE = 0x00000010
FAN_UNLIMITED_MARKS = 0x00000020
FAN_REPORT_FID = 0x00000200
FAN_REPORT_DIR_FID = 0x00000400
FAN_REPORT_NAME = 0x00000800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

# fanotify_mark flags
FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_MARK_DONT_FOLLOW = 0x00000004
FAN_MARK_ONLYDIR = 0x00000008
FAN_MARK_INODE = 0x00000000
FAN_MARK_MOUNT = 0x00000010
FAN_MARK_IGNORED_MASK = 0x00000020
FAN_MARK_IGNORED_SURV_MODIFY = 0x00000040
FAN_MARK_FLUSH = 0x00000080
FAN_MARK_FILESYSTEM = 0x00000100

# events
FAN_ACCESS = 0x00000001
FAN_MODIFY = 0x00000002
FAN_CLOSE_WRITE = 0x00000008
FAN_CLOSE_NOWRITE = 0x00000010
FAN_OPEN = 0x00000020
FAN_MOVED_TO = 0x00000080
FAN_CREATE = 0x00000100
FAN_OPEN_EXEC = 0x00001000
FAN_OPEN_PERM = 0x00010000
FAN_ACCESS_PERM = 0x00020000
FAN_OPEN_EXEC_PERM = 0x00040000
FAN_PRE_ACCESS = 0x00100000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ONDIR = 0x40000000
FAN_Q_OVERFLOW = 0x00004000

PERM_EVENTS = FAN_OPEN_PERM | FAN_ACCESS_PERM | FAN_OPEN_EXEC_PERM | FAN_PRE_ACCESS

# responses
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_ERRNO_BITS = 8
FAN_ERRNO_SHIFT = 32 - FAN_ERRNO_BITS
FAN_ERRNO_MASK = (1 << FAN_ERRNO_BITS) - 1
FAN_NOFD = -1
FANOTIFY_METADATA_VERSION = 3

FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_RANGE = 6

# the errnos a listener may answer with (fs/notify/fanotify/fanotify_user.c)
DENY_ERRNOS = (errno.EIO, errno.EPERM, errno.EBUSY, errno.ETXTBSY, errno.EAGAIN, errno.ENOSPC, errno.EDQUOT)

_META = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_RESPONSE = struct.Struct("=iI")  # fd, response
_INFO_HDR = struct.Struct("=BBH")  # info_type, pad, len
_RANGE = struct.Struct("=BBHIQQ")  # header, pad, offset, count

_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        _libc.fanotify_init.restype = ctypes.c_int
        _libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                        ctypes.c_char_p]
        _libc.fanotify_mark.restype = ctypes.c_int
        _libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        _libc.open_by_handle_at.restype = ctypes.c_int
    return _libc


def deny_errno(err: int) -> int:
    """FAN_DENY_ERRNO(err): deny, and the reader's call fails with ``err``."""
    return FAN_DENY | ((err & FAN_ERRNO_MASK) << FAN_ERRNO_SHIFT)


def init(flags: int, event_f_flags: int) -> int:
    fd = _c().fanotify_init(flags, event_f_flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "fanotify_init")
    return fd


def mark(fan_fd: int, flags: int, mask: int, dirfd: int = -100, path: str | bytes | None = None) -> None:
    """fanotify_mark(2). With ``path`` None, the object ``dirfd`` refers to is marked."""
    p = os.fsencode(path) if path is not None else None
    if _c().fanotify_mark(fan_fd, flags, mask, dirfd, p) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(p) if p else f"fd {dirfd}")


def open_by_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """open_by_handle_at(2) of a ``struct file_handle`` as a fid event carries it
    (CAP_DAC_READ_SEARCH)."""
    fd = _c().open_by_handle_at(mount_fd, handle, flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "open_by_handle_at")
    return fd


class Event:
    __slots__ = ("mask", "fd", "pid", "offset", "count", "handle", "name")

    def __init__(self, mask: int, fd: int, pid: int, offset: int = -1, count: int = -1):
        self.mask, self.fd, self.pid, self.offset, self.count = mask, fd, pid, offset, count
        self.handle: bytes | None = None  # FAN_REPORT_DFID_NAME: the directory's file handle
        self.name: bytes | None = None  # and the entry's name in it

    def __repr__(self) -> str:
        return f"Event(mask={self.mask:#x}, fd={self.fd}, pid={self.pid})"


def parse(buf: bytes) -> list[Event]:
    """The events in one read(2) of a fanotify descriptor."""
    out = []
    i = 0
    while i + _META.size <= len(buf):
        event_len, vers, _r, meta_len, mask, fd, pid = _META.unpack_from(buf, i)
        if vers != FANOTIFY_METADATA_VERSION or event_len < _META.size or i + event_len > len(buf):
            raise OSError(errno.EPROTO, f"fanotify event of version {vers}, length {event_len}: not understood")
        ev = Event(mask, fd, pid)
        j = i + meta_len
        while j + _INFO_HDR.size <= i + event_len:
            itype, _pad, ilen = _INFO_HDR.unpack_from(buf, j)
            if ilen < _INFO_HDR.size:
                break
            if itype == FAN_EVENT_INFO_TYPE_RANGE and ilen >= _RANGE.size:
                _t, _p, _l, _pad2, ev.offset, ev.count = _RANGE.unpack_from(buf, j)
            elif itype == FAN_EVENT_INFO_TYPE_DFID_NAME and ilen >= _INFO_HDR.size + 16:
                # header, fsid (8), struct file_handle (handle_bytes u32, type i32, bytes), name\0
                (hbytes,) = struct.unpack_from("=I", buf, j + 12)
                end = j + 20 + hbytes
                if end <= j + ilen:
                    ev.handle = bytes(buf[j + 12:end])
                    ev.name = bytes(buf[end:j + ilen]).split(b"\0", 1)[0]
            j += ilen
        out.append(ev)
        i += event_len
    return out


def respond(fan_fd: int, event_fd: int, response: int) -> None:
    """Answer a permission event; a reader that went away (ENOENT) is not an error."""
    try:
        os.write(fan_fd, _RESPONSE.pack(event_fd, response))
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def probe() -> str | None:
    """None if this process can listen for pre-content events here, else what is missing
    (one line)."""
    try:
        fd = init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC, os.O_RDWR | os.O_LARGEFILE)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            return "fanotify needs CAP_SYS_ADMIN: run `jam daemon` as root (or with that capability)"
        if exc.errno in (errno.ENOSYS, errno.EINVAL):
            return f"this kernel ({os.uname().release}) has no fanotify pre-content support (Linux >= 6.14 needed)"
        return f"fanotify_init failed: {exc.strerror}"
    os.close(fd)
    return None
