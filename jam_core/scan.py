"""One walk of a tree that every operation shares: a stat per entry, an xattr read only where
the stat says the file may be a stub. Symlinks are never followed; ``.jam`` is skipped."""

from __future__ import annotations

import errno
import gc
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter

from jam_core.fs import (  # noqa: F401
    DIR_FLAGS,
    TMP_MARK,
    TMP_PREFIX,
    TMP_SUFFIX,
    fd_path,
    getxattr,
    is_jam_tmp,
    listxattr,
    open_dir,
    open_regular,
)
from jam_core.objects import MARKER_NAME, parse_marker
from jam_core.root import JAM_DIR
from jam_core.stub import (
    LOST_XATTRS,
    XATTR,
    BadStub,
    StubRecord,
    is_dirty,
    may_be_stub,
    only_blocks_differ,
    read_record,
    record_from_copy,
    verify_clean_path,
)

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

# The shortest header a stub's first block can hold (the shortest id, size, mode and mtime, no
# remotes, no name): a file with no ``user.jam`` shorter than this cannot be recognised from its
# bytes as a stub's copy, so it is not opened to look.
SHORTEST_HEADER = len(StubRecord("b3:" + "0" * 64, 0, 0, 0).header(""))


def may_be_copy(st: os.stat_result) -> bool:
    """The one rule for "might this file with no ``user.jam`` be a copy of a stub" (worth opening
    to read its first block): read-only (``cp``, ``rsync -a`` keep a stub's mode) or sparse
    (``cp`` keeps holes), and no shorter than the shortest header. A writable file written out
    in full is an ordinary file, even if it began as a stub (status, the policies and doctor
    agree on that; stash still reads every file's first block before it stores it)."""
    return st.st_size >= SHORTEST_HEADER and (not st.st_mode & 0o222 or st.st_blocks * 512 < st.st_size)


# What classify says of a file that vanished since the walk's lstat (removed, or its name given
# to another file: ENOENT, ESTALE on NFS): no finding. It was listed, so it is counted as what
# the walk's stat alone makes it, a local file; operations reopen every file they act on.
GONE = (LOCAL, None, "")
_GONE = (errno.ENOENT, errno.ESTALE)


def classify(path: str, st: os.stat_result, look: str = LIKELY, stamp: tuple | None = None,
             verify: bool = False, again: bool = True) -> tuple[str, StubRecord | None, str]:
    """(state, record, problem) of a regular file from its lstat: the one place that decides
    what a file is.

    ``look`` says when the xattr is read. ``likely`` (stash, checkout): when the stat says the
    file may be a stub (read-only, sparse, or smaller than a block). ``quick`` (status,
    policies): not for a writable file that is not sparse, even a small one (only a stub
    someone made writable again could be missed; stash and checkout still look). ``always``
    (doctor): for every file, so a stub overwritten in full is still reported. Whatever the
    look, a file with no ``user.jam`` is opened to read its first block only if ``may_be_copy``
    says it might be a stub's copy (``likely``: whenever it may be a stub).

    ``stamp`` is what the catalog recorded of the stub at this path (size, mtime_ns, ino,
    ctime_ns): when the stat still matches it, nothing touched the inode since jam made it, and
    it is a clean stub without reading anything (its record is then None). Otherwise, with
    ``verify``, a stub whose stat looks clean is judged by its bytes (``stub.verify_clean``):
    a stub edited with its mtime put back is DIRTY. A stub whose stat differs only by its
    block count (``stub.only_blocks_differ``: restored without holes) is judged by its bytes
    whatever ``verify`` says. A file that is no longer the one of ``st`` when its bytes are
    read is classified again from a new lstat; one that vanished is ``GONE``.

    A file with no ``user.jam`` whose first block is a valid jam header (size matching) is a
    stub that lost its xattrs (a plain ``cp``): STUB, or DIRTY if its bytes are not exactly a
    stub's, with the record from its header and ``problem`` set to ``stub.LOST_XATTRS``. A
    file that starts like a header that cannot be trusted is BAD.
    """
    writable = st.st_mode & 0o222
    if look == LIKELY:
        if not may_be_stub(st):
            return LOCAL, None, ""
    elif look == QUICK and writable and st.st_blocks * 512 >= st.st_size:
        return LOCAL, None, ""
    if stamp is not None and not writable and stamp == stamp_of(st):
        # The catalog's stub, untouched since (same inode and ctime). A stamp is recorded only
        # from a stat taken before the stub's bytes were found clean, and any write changes the
        # ctime: whatever its block count (a stub restored without holes owns all its blocks).
        return STUB, None, ""
    try:
        raw = getxattr(path, XATTR, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _GONE:
            return GONE  # removed (or replaced) since the walk's lstat: not there to report
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
            return BAD, None, exc.strerror or str(exc)
        if look != LIKELY and not may_be_copy(st):
            return LOCAL, None, ""  # (quick and always: the rule above; stash and checkout still look)
        return _copy_of_a_stub(path, st)
    try:
        rec = StubRecord.unpack(raw)
    except BadStub as exc:
        return BAD, None, str(exc)
    if is_dirty(st, rec):
        if not only_blocks_differ(st, rec):
            return DIRTY, rec, ""
        verify = True  # only its block count says written into (holes filled with zeros?): its bytes decide
    if verify and not verify_clean_path(path, rec, st):
        # Not a clean stub's bytes, or not the file of ``st`` any more (gone, replaced, written
        # since: a checkout's swap landed meanwhile): only the first is DIRTY. What is there now
        # is classified instead, once (one that changed again meanwhile is being written: DIRTY).
        try:
            now = os.stat(path, follow_symlinks=False)
        except OSError:
            return GONE
        if again and (now.st_ino, now.st_dev, now.st_ctime_ns) != (st.st_ino, st.st_dev, st.st_ctime_ns):
            if not stat.S_ISREG(now.st_mode):
                return GONE
            return classify(path, now, look, stamp, verify, again=False)
        return DIRTY, rec, ""
    return STUB, rec, ""


# What the catalog's stamp of a stub is compared with, ``stamp_of(lstat)``: (size, mtime_ns, ino,
# ctime_ns). A read-only file whose lstat gives the stamp recorded when jam made the stub
# (``classify``) was not touched since. (An attrgetter: the tuple is made in C, once a stub.)
stamp_of = attrgetter("st_size", "st_mtime_ns", "st_ino", "st_ctime_ns")


def untouched(stamps: dict[str, tuple], names: list[str], stats: list[os.stat_result], which) -> set[int]:
    """Of the files ``which`` (indices into ``names`` and their ``stats``, one directory's), the
    ones ``classify`` would call clean stubs from their stamp alone (in ``stamps``, by name),
    found in one pass over the directory."""
    out = set()
    for i in which:
        stamp = stamps.get(names[i])
        if stamp is not None and not stats[i].st_mode & 0o222 and stamp == stamp_of(stats[i]):
            out.add(i)
    return out


def new_stub_stamp(dir_fd: int, name: str, made: StubRecord) -> tuple[int, int | None]:
    """The catalog's stamp ``(inode, ctime)`` of the stub ``made`` that jam just put at ``name``
    in ``dir_fd`` (a stash, a clone, a restore): from its lstat, with the ctime (which lets later
    scans trust the stub unread) only if what is there after that stat is still that stub, clean.
    A write between the stub's rename and this call, or another stub moved over it, is seen by
    that check or changes the ctime; never vouched for (None: the next scan reads it)."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    state, rec, problem = classify(f"{fd_path(dir_fd)}/{name}", st, look=ALWAYS, verify=True)
    clean = state == STUB and not problem and rec is not None and rec.same_content(made)
    return st.st_ino, (st.st_ctime_ns if clean else None)


def _copy_of_a_stub(path: str, st: os.stat_result) -> tuple[str, StubRecord | None, str]:
    """No xattr: a stub copied without it (plain cp) still says what it is in its first block."""
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


def scan_dirs(root_path: str, rel: str = ".", on_error=None, ordered: bool = True, clean: bool = False,
              tidy=None, depth: int | None = None, tidy_tmps: bool = False):
    """Yield ``(dir_rel, [(name, path, lstat), ...])`` for every directory under ``rel`` that
    holds regular files (jam's temporary files left out): ``scan_stats`` with each file's
    ``path`` (``/proc/self/fd/N/name``, valid only until the next item is asked for)."""
    for d, base, names, stats in scan_stats(root_path, rel, on_error, ordered, clean, tidy, depth, tidy_tmps):
        yield d, [(n, base + n, st) for n, st in zip(names, stats, strict=True)]


def scan_stats(root_path: str, rel: str = ".", on_error=None, ordered: bool = True, clean: bool = False,
               tidy=None, depth: int | None = None, tidy_tmps: bool = False, chunk: int | None = None):
    """The one walk. Yield ``(dir_rel, base, names, lstats)`` for every directory under
    ``rel`` that holds regular files (jam's temporary files left out): two parallel lists, no
    object per file but its lstat. A single file yields its directory with that one file.
    One lstat per entry, no other I/O. ``base + name`` names a file through its directory's
    descriptor (``base`` is ``/proc/self/fd/N/``) and is valid only until the next item is
    asked for.

    The walk goes from directory descriptor to directory descriptor, opening each directory
    with O_NOFOLLOW: a directory swapped for a symlink mid-walk is not entered, so nothing
    outside the root is ever listed. Directories that hold another root (``.jam/``) or a
    remote (its identity marker) are skipped: a root and a remote never overlap.

    ``clean=True`` (only while holding the root's lock, when no other jam can be writing)
    first deletes the temporary files a killed jam provably left (``_disposable``).
    ``depth`` limits how many levels below ``rel`` are walked (None: all).
    ``tidy(dir_fd, dir_rel, entries) -> entries`` (doctor) sees each directory's listing
    first and returns what is left of it (it may report and remove jam's temporary files);
    with ``tidy_tmps`` only the directories where a name looks like one of jam's temporary
    files are shown to it (one test per directory on the joined names, not a call per entry).
    ``chunk``: a directory's files come in parts of at most that many (the same directory
    yielded again for each part): a directory of a million files never holds a million stat
    results at once (its listing, a name each, is still held).
    """
    try:
        root_fd = os.open(root_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if on_error:
            on_error(rel, exc)
        return
    try:
        yield from _scan_from(root_fd, rel, on_error, ordered, clean, tidy, depth, tidy_tmps, chunk=chunk)
    finally:
        os.close(root_fd)


@contextmanager
def gc_paused():
    """The cyclic garbage collector off for a scan: a scan allocates a stat result per file
    and keeps them per directory, which makes the collector walk every live object again and
    again (a third of the time of a large scan); none of them can form a cycle."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


_FMT, _REG, _DIR = stat.S_IFMT(0o177777), stat.S_IFREG, stat.S_IFDIR
_name = attrgetter("name")
_FOREIGN_NAMES = frozenset((JAM_DIR, MARKER_NAME))  # what _foreign looks at


def _scan_from(root_fd: int, rel: str, on_error, ordered: bool, clean: bool, tidy=None,
               depth: int | None = None, tidy_tmps: bool = False, skip: set | None = None,
               below: list | None = None, chunk: int | None = None):
    if rel == ".":
        start_fd, prefix = os.dup(root_fd), ""
    else:
        parent, _, name = rel.rpartition("/")
        try:
            pfd = open_dir(root_fd, parent)
        except OSError as exc:
            if on_error:
                on_error(rel, exc)
            return
        try:
            if clean:
                _clean_dir(pfd)  # first: a stale hold-link would make the file look hard-linked
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                yield parent or ".", fd_path(pfd) + "/", [name], [st]
                return
            if not stat.S_ISDIR(st.st_mode):
                return
            start_fd, prefix = os.open(name, DIR_FLAGS, dir_fd=pfd), rel + "/"
        except OSError as exc:
            if on_error:
                on_error(rel, exc)
            return
        finally:
            os.close(pfd)
    top = rel == "."
    if skip is None:
        skip = _remote_dirs(root_fd)
    fmt_mask, REG, DIR = _FMT, _REG, _DIR
    stack: list[list] = [[start_fd, prefix, None, 0]]
    try:
        while stack:
            frame = stack[-1]
            fd, prefix, subdirs, level = frame
            if subdirs is None:
                try:
                    with os.scandir(fd) as it:
                        entries = sorted(it, key=_name) if ordered else list(it)
                except OSError as exc:
                    if on_error:
                        on_error(prefix[:-1] or ".", exc)
                    entries = []
                nested = prefix or not top  # another root or a remote here is never ours
                if tidy is not None and tidy_tmps and TMP_PREFIX not in "/".join(map(_name, entries)):
                    touch = clean  # no name like jam's temporaries here: nothing to tidy
                else:
                    touch = clean or tidy is not None
                if touch and nested and _foreign(fd, entries):
                    entries = []  # decided first: nothing is cleaned or tidied in there
                if clean:
                    entries = _clean_entries(fd, entries)
                if touch and tidy is not None:
                    entries = tidy(fd, prefix[:-1] or ".", entries)
                if nested and _may_be_foreign(entries) and _foreign(fd, entries):
                    entries = []  # another root or a remote: none of it is walked
                names: list[str] = []
                stats: list[os.stat_result] = []
                subdirs = []
                add_name, add_stat = names.append, stats.append
                unsearchable = None
                for e in entries if chunk is None or len(entries) <= chunk else _let_go(entries):
                    try:
                        est = e.stat(follow_symlinks=False)
                    except OSError as exc:
                        if exc.errno != errno.ENOENT and unsearchable is None:
                            unsearchable = exc  # listed but not searchable (r without x): not "vanished"
                        continue  # vanished while we looked
                    kind = est.st_mode & fmt_mask
                    if kind == REG:
                        add_name(e.name)
                        add_stat(est)
                        if chunk is not None and len(names) >= chunk:  # a part of a large directory
                            names, stats = _without_tmps(names, stats)
                            if names:
                                yield prefix[:-1] or ".", fd_path(fd) + "/", names, stats
                            names, stats = [], []
                            add_name, add_stat = names.append, stats.append
                    elif kind == DIR:
                        subdirs.append(e.name)
                        if (not prefix and e.name == JAM_DIR) or (est.st_dev, est.st_ino) in skip:
                            subdirs.pop()
                if unsearchable is not None and on_error:
                    on_error(prefix[:-1] or ".", unsearchable)
                del entries
                names, stats = _without_tmps(names, stats)
                if below is not None and level == 0:  # the directories the walk would enter next
                    below.extend(prefix + n for n in subdirs)
                frame[2] = iter(subdirs if depth is None or level < depth else ())
                if names:
                    yield prefix[:-1] or ".", fd_path(fd) + "/", names, stats
                continue
            name = next(subdirs, None)
            if name is None:
                os.close(fd)
                stack.pop()
                continue
            try:
                nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT) and on_error:
                    on_error(prefix + name, exc)
                continue  # swapped for a symlink (or gone) since it was listed: not followed
            stack.append([nfd, prefix + name + "/", None, level + 1])
    finally:
        for frame in stack:
            os.close(frame[0])


# -- one walk shared with a helper process -------------------------------------------------------

class Share:
    """What a walk shared with a helper process needs of its caller (``scan_shared``). A plain
    class: a dataclass would cost the cd hook, which imports this module, its generated code."""

    __slots__ = ("fresh", "collect", "merge", "enter", "before_fork")

    def __init__(self, fresh: Callable[[], None], collect: Callable[[], object], merge: Callable[[object], None],
                 enter: Callable[[str, bool], None] | None = None, before_fork: Callable[[], None] | None = None):
        self.fresh = fresh  # in the helper, first: forget what this process had found
        self.collect = collect  # in the helper, last: what it found (picklable)
        self.merge = merge  # here: take in what the helper found
        # (unit, whole) in the process about to walk the directory ``unit`` ("." for the root's
        # own files): all of it (``whole``), or only its own files (its directories handed out)
        self.enter = enter
        self.before_fork = before_fork  # closes what a fork must not share (a database connection)


PART = 1_024  # a directory's files handed to ``each`` at most this many at a time (see scan_stats' chunk)
SHARE_AFTER = 2_000  # files walked before the rest of a large tree is shared with a helper (~12 ms)
OPEN_UP = 8  # a lone directory to share is opened up (its subdirectories shared) this deep at most


def scan_shared(root_path: str, rel: str, on_error, each, share: Share | None = None,
                after: int | None = None) -> None:
    """``each(dir_rel, base, names, lstats)`` for every directory ``scan_stats(root_path, rel,
    on_error, ordered=False)`` yields, in no particular order; a directory of more than
    ``PART`` files comes in parts (``each`` adds up what it is given for a directory).

    A large tree is walked by two processes on two cores: once ``after`` files were walked,
    the root's top-level directories not yet walked are shared with one forked helper, each
    process taking the next one from a pipe as it is done. The helper calls ``share.fresh()``
    to forget what this process had found (``each`` adds to the same objects), then sends
    ``share.collect()`` (picklable) back when it is done; this process hands it to
    ``share.merge``. If the helper fails, the directories it took are
    walked again here (its findings are dropped whole). Only the whole root is shared, and
    only from a process with one thread (a fork copies no other thread); the helper runs the
    same walk (directory descriptors, no symlink followed, nested roots and remotes skipped)
    and only reads: it writes nothing but its findings, and leaves with ``os._exit``.
    ``share.enter`` is told of each part of the tree before it is walked, in the process that
    walks it (what it needs of that part can be loaded there, on two cores)."""
    if after is None:
        after = SHARE_AFTER
    enter = share.enter if share is not None else None
    if share is None or rel != "." or not hasattr(os, "fork") or _threads() != 1:
        if enter is not None:
            enter(rel, True)
        for item in scan_stats(root_path, rel, on_error, ordered=False, chunk=PART):
            each(*item)
        return
    try:
        root_fd = os.open(root_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if on_error:
            on_error(rel, exc)
        return
    try:
        skip = _remote_dirs(root_fd)
        seen = 0
        if enter is not None:
            enter(".", False)
        for item in _scan_from(root_fd, ".", on_error, False, False, depth=0, skip=skip, chunk=PART):
            each(*item)  # the root's own files; its directories are the units shared
            seen += len(item[2])
        units = _top_dirs(root_fd, skip)
        i = 0
        while i < len(units) and (seen < after or len(units) - i < 2):
            if len(units) - i < 2 and units[i].count("/") < OPEN_UP:
                # One directory left to share: walk its own files here and share what is in it
                # (a root whose content sits under one directory still takes two cores).
                inside: list[str] = []
                for item in _walk_unit(root_fd, units[i], on_error, skip, inside, enter):
                    each(*item)
                    seen += len(item[2])
                units[i + 1:i + 1] = inside
            else:
                for item in _walk_unit(root_fd, units[i], on_error, skip, enter=enter):
                    each(*item)
                    seen += len(item[2])
            i += 1
        if i < len(units):
            _shared(root_fd, units[i:], on_error, each, share, skip)
    finally:
        os.close(root_fd)


def _walk_unit(root_fd: int, unit: str, on_error, skip: set, inside: list | None = None, enter=None):
    """The walk of one directory of the root, as the whole walk would have gone through it:
    one replaced since it was listed (now a file, a symlink, gone) is passed over quietly.
    With ``inside``, only the directory's own files: the directories the walk would enter next
    are added to ``inside`` instead (as one walk would find them: no nested root, no remote).
    ``enter(unit, whole)`` is called first."""
    def quiet(rel, exc):
        if not (rel == unit and getattr(exc, "errno", None) in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR)):
            on_error(rel, exc)

    if enter is not None:
        enter(unit, inside is None)
    parent = unit.rpartition("/")[0] or "."
    for item in _scan_from(root_fd, unit, quiet if on_error else None, False, False, skip=skip, chunk=PART,
                           depth=None if inside is None else 0, below=inside):
        if item[0] != parent:  # (a file there now: not a directory any more)
            yield item


def _threads() -> int:
    import threading

    return threading.active_count()


def _top_dirs(root_fd: int, skip: set) -> list[str]:
    """The root's directories (not ``.jam``, not a remote): the units a shared walk hands out."""
    out = []
    try:
        with os.scandir(root_fd) as it:
            for e in it:
                if e.name == JAM_DIR or not e.is_dir(follow_symlinks=False):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) not in skip:
                    out.append(e.name)
    except OSError:
        pass  # (the walk of the root's own files said why)
    return out


_UNIT = 4  # bytes per unit number in the pipe: one read is one unit, whole (< PIPE_BUF)


def _shared(root_fd: int, units: list[str], on_error, each, share: Share, skip: set) -> None:
    import pickle
    import signal

    fresh, collect, merge, enter = share.fresh, share.collect, share.merge, share.enter
    if len(units) * _UNIT > 60_000:  # more than a pipe holds at once: the helper takes every other one
        queue = None
    else:
        rq, wq = os.pipe()
        os.write(wq, b"".join(i.to_bytes(_UNIT, "little") for i in range(len(units))))
        os.close(wq)
        queue = rq
    rr, wr = os.pipe()
    if share.before_fork is not None:
        share.before_fork()
    pid = os.fork()
    if pid == 0:  # the helper: walk, send what was found, leave without running anything else
        code = 1
        try:
            os.close(rr)
            fresh()
            done = []
            for i in _take(queue, len(units), 1):
                for item in _walk_unit(root_fd, units[i], on_error, skip, enter=enter):
                    each(*item)
                done.append(i)
            data = memoryview(pickle.dumps((done, collect()), protocol=pickle.HIGHEST_PROTOCOL))
            while data:
                data = data[os.write(wr, data):]
            code = 0
        finally:
            os._exit(code)
    os.close(wr)
    mine: list[int] = []
    try:
        for i in _take(queue, len(units), 0):
            for item in _walk_unit(root_fd, units[i], on_error, skip, enter=enter):
                each(*item)
            mine.append(i)
        chunks = []
        while chunk := os.read(rr, 1 << 20):
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
        pid = 0
        done: list[int] = []
        if status == 0 and chunks:
            try:
                done, found = pickle.loads(b"".join(chunks))
            except Exception:  # noqa: BLE001 (a helper cut short: walked here instead)
                done = []
            else:
                merge(found)
        left = set(range(len(units))) - set(mine) - set(done)
        for i in sorted(left):  # the helper failed: its share is walked here
            for item in _walk_unit(root_fd, units[i], on_error, skip, enter=enter):
                each(*item)
    finally:
        os.close(rr)
        if queue is not None:
            os.close(queue)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            os.waitpid(pid, 0)


def _take(queue, n: int, who: int):
    """The unit numbers one process takes: the next from the pipe as it asks, or (no pipe)
    every other one (``who`` 0 or 1)."""
    if queue is None:
        yield from range(who, n, 2)
        return
    while True:
        b = os.read(queue, _UNIT)
        if len(b) < _UNIT:
            return
        yield int.from_bytes(b, "little")


def _remote_dirs(root_fd: int) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the root's ``dir`` remotes: never walked, even one an older jam let
    inside the root before it had an identity marker. Read from the root's own config file."""
    from jam_core.errors import UsageError
    from jam_core.fs import fd_path
    from jam_core.root import read_toml_fd  # the cached parse: no tomllib on the hook's path

    try:
        fd = open_regular(root_fd, JAM_DIR + "/config.toml")
        try:
            remotes = read_toml_fd(fd, fd_path(root_fd) + "/" + JAM_DIR + "/config.toml").get("remote", {})
        finally:
            os.close(fd)
    except (OSError, ValueError, UsageError):
        return set()
    out = set()
    for table in remotes.values() if isinstance(remotes, dict) else ():
        if isinstance(table, dict) and table.get("kind") == "dir" and isinstance(table.get("location"), str):
            try:
                st = os.stat(table["location"])
            except (OSError, ValueError):
                continue
            out.add((st.st_dev, st.st_ino))
    return out


def _let_go(entries: list):
    """The entries in order, each let go (with the lstat it caches) once the next is asked for."""
    entries.reverse()
    while entries:
        yield entries.pop()


def _may_be_foreign(entries) -> bool:
    """Does the listing name what ``_foreign`` looks at (one test per directory, no Python step per entry)?"""
    return not _FOREIGN_NAMES.isdisjoint(map(_name, entries))


def _without_tmps(names: list[str], stats: list) -> tuple[list[str], list]:
    """The files of a directory but jam's temporary ones (one test on the joined names: "/" is
    in no name)."""
    if names and TMP_PREFIX in "/".join(names):
        keep = [i for i, n in enumerate(names) if not is_jam_tmp(n)]
        if len(keep) != len(names):
            return [names[i] for i in keep], [stats[i] for i in keep]
    return names, stats


def _foreign(fd: int, entries) -> bool:
    """Does this directory hold another root (``.jam/config.toml``) or a remote (a valid
    identity marker)? Decided from the listing; a file is read only when the name is there."""
    for e in entries:
        if e.name == JAM_DIR and e.is_dir(follow_symlinks=False):
            return True
        if e.name == MARKER_NAME and e.is_file(follow_symlinks=False):
            try:
                mfd = open_regular(fd, MARKER_NAME)
                try:
                    parse_marker(os.read(mfd, 4096))
                finally:
                    os.close(mfd)
                return True
            except (OSError, ValueError):
                pass
    return False


def _disposable(fd: int, name: str, st: os.stat_result, siblings: dict[int, int]) -> bool:
    """Is ``name`` (a jam temporary name) a file a killed jam left that nobody needs? Only if
    it provably is jam's: content jam was writing aside (it still carries TMP_MARK), a stub
    jam wrote aside (a valid jam record), or an older jam's hold-link (another name in this
    directory is the same inode). Anything else with such a name is left alone."""
    if not stat.S_ISREG(st.st_mode):
        return False
    if st.st_nlink > 1 and siblings.get(st.st_ino, 0) > 1:
        return True
    path = fd_path(fd) + "/" + name
    try:
        names = listxattr(path, follow_symlinks=False)
    except OSError:
        return False
    if TMP_MARK in names:
        return True
    if XATTR in names:
        try:
            return read_record(path) is not None
        except (BadStub, OSError):
            return False
    return False


def jam_temporaries(fd: int, entries: list):
    """Yield ``(entry, lstat, disposable)`` for each regular file of a directory's listing that
    has a jam temporary name; ``disposable``: provably a leftover of jam (``_disposable``)."""
    tmps = [e for e in entries if is_jam_tmp(e.name)]
    if not tmps:
        return
    siblings: dict[int, int] = {}
    for e in entries:
        try:
            ino = e.inode()
        except OSError:
            continue
        siblings[ino] = siblings.get(ino, 0) + 1
    for e in tmps:
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            yield e, st, _disposable(fd, e.name, st, siblings)


def _clean_entries(fd: int, entries: list) -> list:
    removed = set()
    for e, _st, disposable in list(jam_temporaries(fd, entries)):
        if not disposable:
            continue
        try:
            os.unlink(e.name, dir_fd=fd)
            removed.add(e.name)
        except FileNotFoundError:
            removed.add(e.name)
        except OSError:
            pass
    return [e for e in entries if e.name not in removed] if removed else entries


def _clean_dir(fd: int) -> None:
    try:
        with os.scandir(fd) as it:
            _clean_entries(fd, list(it))
    except OSError:
        pass


def walk(root_path: str, rel: str = ".", on_error=None, look: str = LIKELY, ordered: bool = True,
         clean: bool = False, tidy=None, depth: int | None = None) -> Iterator[Entry]:
    """Every regular file under ``rel`` (a file or directory relative to the root), classified.

    ``ordered`` sorts names within each directory (stable output); ``look`` see classify.
    ``Entry.path`` is the file's absolute path, for messages: operations reopen the file
    relative to its directory's descriptor (jam_core.fs.DirFds), never through this path.
    """
    top = root_path.rstrip("/") + "/"
    for dname, files in scan_dirs(root_path, rel, on_error, ordered, clean, tidy, depth):
        prefix = "" if dname == "." else dname + "/"
        for name, path, st in files:
            state, rec, problem = classify(path, st, look)
            yield Entry(prefix + name, top + prefix + name, st, state, rec, problem, dname)
