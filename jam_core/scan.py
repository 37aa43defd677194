"""One walk of a tree that every operation shares: a stat per entry, an xattr read only where
the stat says the file may be a stub. Symlinks are never followed; ``.jam`` is skipped."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Iterator

from jam_core.root import JAM_DIR
from jam_core.stub import BadStub, StubRecord, is_dirty, may_be_stub, read_record

TMP_PREFIX = ".jam-"  # temporary files jam writes beside the file they replace
TMP_SUFFIX = ".tmp"

LOCAL, STUB, DIRTY, BAD = "local", "stub", "dirty", "bad"


@dataclass(slots=True)
class Entry:
    rel: str  # relative to the root
    path: str  # absolute
    st: os.stat_result
    state: str  # local, stub, dirty (a stub written into), bad (unreadable stub metadata)
    record: StubRecord | None = None
    problem: str = ""
    dir: str = "."  # the directory part of rel ("." at the top)


QUICK, LIKELY, ALWAYS = "quick", "likely", "always"


def classify(path: str, st: os.stat_result, look: str = LIKELY) -> tuple[str, StubRecord | None, str]:
    """(state, record, problem) of a regular file from its lstat.

    ``look`` says when the xattr is read. ``likely`` (stash, checkout): when the stat says the
    file may be a stub (read-only, sparse, or smaller than a block). ``quick`` (status,
    policies): not for a writable file that is not sparse, even a small one (only a stub
    someone made writable again could be missed; stash and checkout still look). ``always``
    (doctor): for every file, so a stub overwritten in full is still reported.

    A file with no ``user.jam`` whose first block is a valid jam header (size matching) is a
    stub that lost its xattrs (a plain ``cp``): STUB, or DIRTY if its bytes are not exactly a
    stub's, with the record from its header and ``problem`` set to ``stub.LOST_XATTRS``. A
    file that starts like a header that cannot be trusted is BAD.
    """
    if look == LIKELY:
        if not may_be_stub(st):
            return LOCAL, None, ""
    elif look == QUICK and (st.st_mode & 0o222) and st.st_blocks * 512 >= st.st_size:
        return LOCAL, None, ""
    try:
        rec = read_record(path)
    except BadStub as exc:
        return BAD, None, str(exc)
    except OSError as exc:
        return BAD, None, exc.strerror or str(exc)
    if rec is None:
        # No xattr: a stub copied without it (plain cp) still says what it is in its first block.
        from jam_core.stub import LOST_XATTRS, record_from_copy

        try:
            copy = record_from_copy(path, st)
        except BadStub as exc:
            return BAD, None, f"starts with a jam stub header that cannot be trusted: {exc}"
        except OSError:
            return LOCAL, None, ""  # unreadable: not known to be a stub
        if copy is None:
            return LOCAL, None, ""
        rec, dirty = copy
        return (DIRTY if dirty else STUB), rec, LOST_XATTRS
    return (DIRTY if is_dirty(st, rec) else STUB), rec, ""


def is_jam_tmp(name: str) -> bool:
    return name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)


def scan_dirs(root_path: str, rel: str = ".", on_error=None, ordered: bool = True, clean: bool = False):
    """Yield ``(dir_rel, [(name, path, lstat), ...])`` for every directory under ``rel`` that
    holds regular files (jam's temporary files left out). A single file yields its directory
    with that one file. One lstat per entry, no other I/O.

    ``clean=True`` (only while holding the root's lock, when no other jam can be writing)
    first deletes the temporary files a killed jam left: a stub or content written aside, or
    the link that held an original across its swap. Each is disposable: the file it belongs
    to is whole without it, and a stale hold-link would make that file look hard-linked.
    """
    start = root_path if rel == "." else os.path.join(root_path, rel)
    try:
        st = os.lstat(start)
    except OSError as exc:
        if on_error:
            on_error(rel, exc)
        return
    if stat.S_ISREG(st.st_mode):
        yield os.path.dirname(rel) or ".", [(os.path.basename(start), start, st)]
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    S_ISREG, S_ISDIR = stat.S_ISREG, stat.S_ISDIR
    stack = [(start, "" if rel == "." else rel + "/")]
    while stack:
        dpath, prefix = stack.pop()
        try:
            with os.scandir(dpath) as it:
                entries = sorted(it, key=lambda e: e.name) if ordered else list(it)
        except OSError as exc:
            if on_error:
                on_error(prefix[:-1] or ".", exc)
            continue
        if clean:
            entries = [e for e in entries if not _remove_stale(e)]
        files, subdirs = [], []
        for e in entries:
            try:
                est = e.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished while we looked
            mode = est.st_mode
            if S_ISREG(mode):
                name = e.name
                if not (name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)):
                    files.append((name, e.path, est))
            elif S_ISDIR(mode):
                if prefix or e.name != JAM_DIR:
                    subdirs.append((e.path, prefix + e.name + "/"))
        stack.extend(reversed(subdirs))
        if files:
            yield prefix[:-1] or ".", files


def _remove_stale(e: os.DirEntry) -> bool:
    if not is_jam_tmp(e.name) or not e.is_file(follow_symlinks=False):
        return False
    try:
        os.unlink(e.path)
    except FileNotFoundError:
        pass
    return True


def remove_stale_in(directory: str) -> None:
    """``clean`` for one directory (a file named alone): same rule, same lock required."""
    try:
        with os.scandir(directory) as it:
            for e in it:
                _remove_stale(e)
    except OSError:
        pass


def walk(root_path: str, rel: str = ".", on_error=None, look: str = LIKELY, ordered: bool = True,
         clean: bool = False) -> Iterator[Entry]:
    """Every regular file under ``rel`` (a file or directory relative to the root), classified.

    ``ordered`` sorts names within each directory (stable output); ``look`` see classify.
    """
    for dname, files in scan_dirs(root_path, rel, on_error, ordered, clean):
        prefix = "" if dname == "." else dname + "/"
        for name, path, st in files:
            state, rec, problem = classify(path, st, look)
            yield Entry(prefix + name, path, st, state, rec, problem, dname)
