"""What a remote holds, in one pipelined pass (the ``list_objects`` hook): every fan-out
directory of ``objects/`` opened and read at once, so 256 directories cost a few round trips,
not a request per object. Then the stale uploads of ``tmp/`` (removed with ``sweep``)."""

from __future__ import annotations

import re
import stat as statmod
import time

from paramiko.sftp import (
    CMD_CLOSE,
    CMD_HANDLE,
    CMD_NAME,
    CMD_OPENDIR,
    CMD_READDIR,
    CMD_STATUS,
    SFTP_EOF,
    SFTP_FAILURE,
    SFTP_NO_SUCH_FILE,
)
from paramiko.sftp_attr import SFTPAttributes

from jam_core import part_is_stale
from jam_sftp.transfer import Ops, SftpStatus, names_in

ALGOS = ("b3", "sha256")
_HEX2 = re.compile(r"\A[0-9a-f]{2}\Z")
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
# Names jam's uploads have (as jam_dir): part_name() or an older jam's <32 hex>.part.
_PART = re.compile(r"\A(?:[0-9a-f]{32}|[A-Za-z0-9_-]{1,64}\.[0-9]{1,10}\.[0-9a-f]{16})\.part\Z")
WINDOW = 64  # directories read at once


def read_dirs(ops: Ops, dirs: list[str]) -> dict[str, list[tuple[str, SFTPAttributes]]]:
    """The listing (name, lstat) of each of ``dirs``, up to WINDOW directories in flight:
    their opens sent together, then one read of each per round. A directory that does not
    exist is left out; any other refusal raises SftpStatus."""
    out: dict[str, list[tuple[str, SFTPAttributes]]] = {}
    for i in range(0, len(dirs), WINDOW):
        chunk = dirs[i:i + WINDOW]
        opens = [(d, ops.r.send(CMD_OPENDIR, d)) for d in chunk]
        handles: dict[str, bytes] = {}
        error: SftpStatus | None = None
        for d, num in opens:
            t, msg = ops.r.wait(num)
            if t == CMD_STATUS:
                code = msg.get_int()
                if code != SFTP_NO_SUCH_FILE and error is None:
                    error = SftpStatus(code, msg.get_text(), d)
                continue
            if t != CMD_HANDLE:
                error = error or SftpStatus(SFTP_FAILURE, "unexpected reply to opendir", d)
                continue
            handles[d] = msg.get_binary()
            out[d] = []
        try:
            pending = {} if error else {d: ops.r.send(CMD_READDIR, h) for d, h in handles.items()}
            while pending:
                again = {}
                for d, num in pending.items():
                    t, msg = ops.r.wait(num)
                    if t == CMD_STATUS:
                        code = msg.get_int()
                        if code != SFTP_EOF:
                            error = error or SftpStatus(code, msg.get_text(), d)
                        continue
                    if t != CMD_NAME:
                        error = error or SftpStatus(SFTP_FAILURE, "unexpected reply to readdir", d)
                        continue
                    out[d].extend(names_in(msg))
                    if error is None:
                        again[d] = ops.r.send(CMD_READDIR, handles[d])
                pending = again
        finally:
            closes = [ops.r.send(CMD_CLOSE, h) for h in handles.values()]
            for num in closes:
                ops.r.wait(num)
        if error is not None:
            raise error
    return out


def list_objects(ops: Ops, sweep: bool) -> list[tuple[str, int]]:
    """``(oid, size)`` of every object, ``("tmp/NAME", size)`` of every stale upload (removed
    first with ``sweep``). Only regular files count (the server's lstat: symlinks are not
    followed)."""
    objects = ops.path("objects")
    found: list[tuple[str, int]] = []
    top = read_dirs(ops, [objects])
    if objects not in top:
        raise SftpStatus(SFTP_NO_SUCH_FILE, "no such directory", objects)
    algos = [n for n, a in top[objects] if n in ALGOS and statmod.S_ISDIR(a.st_mode or 0)]
    fans = []
    for algo, listing in read_dirs(ops, [f"{objects}/{a}" for a in algos]).items():
        name = algo.rsplit("/", 1)[1]
        fans += [(name, n) for n, a in listing if _HEX2.match(n) and statmod.S_ISDIR(a.st_mode or 0)]
    listed = read_dirs(ops, [f"{objects}/{a}/{f}" for a, f in fans])
    for a, f in fans:
        for n, attrs in listed.get(f"{objects}/{a}/{f}", ()):
            regular = statmod.S_ISREG(attrs.st_mode or 0) and attrs.st_size is not None
            if regular and _HEX64.match(n) and n.startswith(f):
                found.append((f"{a}:{n}", int(attrs.st_size)))
    tmp = ops.path("tmp")
    now = time.time()
    for n, attrs in read_dirs(ops, [tmp]).get(tmp, ()):
        if not (statmod.S_ISREG(attrs.st_mode or 0) and attrs.st_mtime is not None and _PART.match(n)
                and part_is_stale(n, float(attrs.st_mtime), now)):
            continue
        if sweep:
            try:
                ops.remove(f"{tmp}/{n}")
            except SftpStatus:
                continue  # not removed: not listed as removed
        found.append((f"tmp/{n}", int(attrs.st_size or 0)))
    return found
