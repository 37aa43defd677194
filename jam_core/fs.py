"""Filesystem primitives: the one place that knows how jam touches a file.

* durability: ``fsync_dir``, ``syncfs``;
* walking and opening relative to directory descriptors, never through a symlink
  (``open_dir``, ``DirFds``, ``open_regular``, ``fd_path``), so a directory swapped for a
  symlink mid-walk cannot lead jam out of the root;
* conditional swaps: ``exchange`` (renameat2 RENAME_EXCHANGE) and ``rename_noreplace``, after
  which the caller checks what was exchanged out and puts it back if it was not what it checked;
* read leases (``Leases``): a file someone holds open for writing cannot be leased, and a lease
  is broken the moment anyone opens the file for writing, so such a file is never stashed;
* temporary names: beside a file (``tmp_name``, ``is_jam_tmp``, ``TMP_MARK``) and on remotes
  (``part_name``, ``part_is_stale``).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable

from jam_core.units import LazyRe

_libc = None


def _c():
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _raise_errno(what: str) -> None:
    import ctypes

    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), what)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path_or_fd: str | os.PathLike | int) -> None:
    """Make everything written to the filesystem holding ``path_or_fd`` durable (syncfs(2)).

    One syncfs after a batch replaces an fsync per file and per directory: it flushes the
    data, the inodes and the renames of the whole batch at once.
    """
    if isinstance(path_or_fd, int):
        if _c().syncfs(path_or_fd) != 0:
            _raise_errno(f"fd {path_or_fd}")
        return
    fd = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _c().syncfs(fd) != 0:
            _raise_errno(str(path_or_fd))
    finally:
        os.close(fd)


class Filesystems:
    """Every filesystem a command writes to below a root: the root's own, and each other disk
    mounted inside it (a syncfs of the root's filesystem leaves another disk's writes in its
    cache). ``of(dir_fds)``: a descriptor on the root's filesystem and one on each other
    filesystem that holds a directory of ``dir_fds``, to syncfs each (one per device);
    ``seen()``: one on each filesystem met so far (a descriptor is kept per other device: the
    directories may be closed by then)."""

    def __init__(self, root_fd: int):
        self.root_fd = root_fd
        self.root_dev = os.fstat(root_fd).st_dev
        self._fds: dict[int, int] = {}  # another device -> a descriptor on it (dup'd, ours)

    def of(self, dir_fds) -> list[int]:
        out, done = [self.root_fd], {self.root_dev}
        for fd in set(dir_fds):
            dev = os.fstat(fd).st_dev
            if dev in done:
                continue
            if dev not in self._fds:
                self._fds[dev] = os.dup(fd)
            out.append(self._fds[dev])
            done.add(dev)
        return out

    def seen(self) -> list[int]:
        return [self.root_fd, *self._fds.values()]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# -- directory descriptors ---------------------------------------------------------------------
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ThroughSymlink(OSError):
    """A path component that should be a directory is a symlink (or not a directory)."""


def open_dir(base_fd: int, rel: str) -> int:
    """Open directory ``rel`` below the directory ``base_fd``, one component at a time, never
    following a symlink. Raises ThroughSymlink naming the component that is not a directory."""
    fd = os.dup(base_fd)
    try:
        done = []
        for part in (p for p in rel.split("/") if p and p != "."):
            if part == "..":
                raise ThroughSymlink(errno.EINVAL, "a path with '..'", rel)
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ThroughSymlink(exc.errno, "not a directory (a symlink?)", "/".join(done + [part])) from None
                raise
            os.close(fd)
            fd = nfd
            done.append(part)
        return fd
    except BaseException:
        os.close(fd)
        raise


def same_dir(root_fd: int, rel_dir: str, fd: int) -> bool:
    """Whether ``fd`` is still the directory ``rel_dir`` of the root ``root_fd`` ("" or "." is
    the root itself): opened again from the root by name (no symlink followed), the same inode.
    A kept descriptor follows its directory wherever it is moved or renamed: asked right before
    a swap or a rename through ``fd``, so that nothing lands outside the root (invariant 7)."""
    if rel_dir in ("", "."):
        return True
    try:
        fresh = open_dir(root_fd, rel_dir)
    except OSError:
        return False
    try:
        a, b = os.fstat(fresh), os.fstat(fd)
    finally:
        os.close(fresh)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def raise_fd_limit(want: int = 65536) -> int:
    """Lift the soft RLIMIT_NOFILE towards ``want`` (never past the hard limit): batches in
    flight hold descriptors per file. Returns the soft limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return want
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    return soft


def fd_budget() -> int:
    """How many files a batch may hold open: two batches are in flight, each file holds up to
    two descriptors and its directory one (``DirFds.hold``), with 64 (half of a smaller limit)
    left for everything else. A low soft RLIMIT_NOFILE (``ulimit -n 64``) makes the batches
    smaller, never fail."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 16
    return max(1, (soft - min(64, soft // 2)) // 6)


class DirFds:
    """Open directory descriptors below a root, by relative path, opened once and kept.

    ``get(rel_dir)`` opens ``rel_dir`` (from its nearest open ancestor, one component at a time,
    never following a symlink) and returns its descriptor, valid until the next call on this
    object; ``hold(rel_dir)`` returns one that stays open until as many ``release(rel_dir)``.
    Directories no one holds stay open for reuse up to ``fd_budget()`` in all, the least
    recently used closed first: a tree of a million files has more directories than a process
    may hold descriptors. ``close()`` closes them all. Not for concurrent use."""

    def __init__(self, root: str | os.PathLike, limit: int | None = None):
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fds: dict[str, int] = {}  # every directory open, held or not
        self._holds: dict[str, int] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # those no one holds, least recently used first
        self.limit = limit

    def get(self, rel_dir: str) -> int:
        rel_dir = rel_dir or "."
        fd = self._fds.get(rel_dir)
        if fd is not None:
            if rel_dir in self._idle:
                self._idle.move_to_end(rel_dir)
            return fd
        if rel_dir == ".":
            return self._keep(".", os.dup(self.root_fd))
        parts = rel_dir.split("/")
        # From the nearest ancestor already open (no recursion: a tree may be deeper than
        # Python's recursion limit) down one level at a time, each level kept for its siblings.
        top = len(parts) - 1
        while top > 0 and "/".join(parts[:top]) not in self._fds:
            top -= 1
        fd = self._fds["/".join(parts[:top])] if top else self.get(".")
        for i in range(top, len(parts)):
            fd = self._keep("/".join(parts[:i + 1]), open_dir(fd, parts[i]))
        return fd

    def still_there(self, rel_dir: str) -> bool:
        """True if ``rel_dir``, opened again from the root by name (no symlink followed), is the
        directory held open for it: not moved out of the root or replaced since it was opened (a
        kept descriptor follows its directory wherever it is moved). Asked right before swaps."""
        fd = self._fds.get(rel_dir or ".")
        return fd is not None and same_dir(self.root_fd, rel_dir, fd)

    def hold(self, rel_dir: str) -> int:
        """``get``, and keep the descriptor open until the matching ``release``."""
        fd = self.get(rel_dir)
        rel_dir = rel_dir or "."
        self._holds[rel_dir] = self._holds.get(rel_dir, 0) + 1
        self._idle.pop(rel_dir, None)
        return fd

    def release(self, rel_dir: str) -> None:
        rel_dir = rel_dir or "."
        left = self._holds.pop(rel_dir, 0) - 1
        if left > 0:
            self._holds[rel_dir] = left
        elif rel_dir in self._fds:
            self._idle[rel_dir] = None
            self._trim(rel_dir)

    def _keep(self, rel_dir: str, fd: int) -> int:
        self._fds[rel_dir] = fd
        self._idle[rel_dir] = None
        self._trim(rel_dir)
        return fd

    def _trim(self, spare: str) -> None:
        """Close the least recently used directories no one holds while more than the budget
        are open, never ``spare`` (the one just handed out)."""
        if self.limit is None:
            self.limit = fd_budget()
        while len(self._fds) > self.limit and self._idle:
            rel = next(iter(self._idle))
            if rel == spare:  # the most recently used: every other idle one is closed
                return
            del self._idle[rel]
            os.close(self._fds.pop(rel))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._holds.clear()
        self._idle.clear()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> "DirFds":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def walk_dirs(top_fd: int):
    """Every directory below the directory ``top_fd`` and itself, depth first: yields
    ``(rel, fd)`` ("" for the top; ``fd`` valid until the next step). Through descriptors, one
    per level and no recursion, never following a symlink: a tree may nest deeper than
    PATH_MAX or Python's stack. A directory removed while walked is passed over; any other
    error is raised."""
    stack: list[list] = [[os.dup(top_fd), "", None]]
    try:
        while stack:
            frame = stack[-1]
            fd, rel, subs = frame
            if subs is None:
                yield rel, fd
                with os.scandir(fd) as it:
                    frame[2] = subs = [e.name for e in it if e.is_dir(follow_symlinks=False)]
            if not subs:
                os.close(stack.pop()[0])
                continue
            name = subs.pop()
            try:
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                continue
            stack.append([child, f"{rel}/{name}" if rel else name, None])
    finally:
        for frame in stack:
            os.close(frame[0])


def remove_tree(name: str, dir_fd: int) -> None:
    """Remove the directory ``name`` in ``dir_fd`` and everything in it, through descriptors,
    never following a symlink (one found inside is removed, not entered) and without recursion
    (``shutil.rmtree`` recurses: a tree deeper than Python's stack stops it)."""
    stack: list[list] = [[dir_fd, name, os.open(name, DIR_FLAGS, dir_fd=dir_fd), None]]
    try:
        while stack:
            frame = stack[-1]
            parent, nm, fd, subs = frame
            if subs is None:
                with os.scandir(fd) as it:
                    entries = list(it)
                frame[3] = subs = []
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        subs.append(e.name)
                    else:
                        os.unlink(e.name, dir_fd=fd)
            if subs:
                sub = subs.pop()
                try:
                    stack.append([fd, sub, os.open(sub, DIR_FLAGS, dir_fd=fd), None])
                except FileNotFoundError:
                    pass
                continue
            os.close(stack.pop()[2])
            try:
                os.rmdir(nm, dir_fd=parent)
            except FileNotFoundError:
                pass
    finally:
        for frame in stack:
            os.close(frame[2])


def fd_path(fd: int) -> str:
    """A path that reopens exactly the file ``fd`` refers to (for hooks that take a path)."""
    return f"/proc/self/fd/{fd}"


class NotTheFile(OSError):
    """The name no longer refers to the regular file that was scanned."""


def open_regular(dir_fd: int | None, name, expect: os.stat_result | None = None,
                 flags: int = os.O_RDONLY) -> int:
    """Open ``name`` in ``dir_fd`` (a path when ``dir_fd`` is None) without following a symlink
    and without blocking on a FIFO; refuse anything that is not a regular file or (with
    ``expect``) not the same inode (NotTheFile)."""
    return open_regular_stat(dir_fd, name, expect, flags)[0]


def open_regular_stat(dir_fd: int | None, name, expect: os.stat_result | None = None,
                      flags: int = os.O_RDONLY) -> tuple[int, os.stat_result]:
    """``open_regular``, and the ``fstat`` of what it opened (one stat per file, not one per
    check: a batch of small files pays each syscall two thousand times)."""
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    replaced = expect is not None and (st.st_ino, st.st_dev) != (expect.st_ino, expect.st_dev)
    if not stat.S_ISREG(st.st_mode) or replaced:
        os.close(fd)
        raise NotTheFile(errno.ESTALE, "replaced by another file since it was scanned", name)
    return fd, st


_OWNER: list[tuple[int, int]] = []
os.register_at_fork(after_in_child=lambda: _forget_at_fork())  # a child may change its ids: it asks again


def owner() -> tuple[int, int]:
    """(euid, egid) of this process, asked once (two syscalls per file otherwise)."""
    if not _OWNER:
        _OWNER.append((os.geteuid(), os.getegid()))
    return _OWNER[0]


def same_file(a: os.stat_result, b: os.stat_result, ctime: bool = True) -> bool:
    return (
        a.st_ino == b.st_ino
        and a.st_dev == b.st_dev
        and a.st_size == b.st_size
        and a.st_mtime_ns == b.st_mtime_ns
        and (not ctime or a.st_ctime_ns == b.st_ctime_ns)
    )


# -- conditional swaps -------------------------------------------------------------------------
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(src_dir: int, src: str, dst_dir: int, dst: str, flags: int) -> None:
    if _c().renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), flags) != 0:
        _raise_errno(dst)


def exchange(dir_fd: int, a: str, b: str) -> None:
    """Atomically swap the names ``a`` and ``b`` in ``dir_fd`` (both must exist)."""
    renameat2(dir_fd, a, dir_fd, b, RENAME_EXCHANGE)


def rename_noreplace(dir_fd: int, src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError then)."""
    renameat2(dir_fd, src, dir_fd, dst, RENAME_NOREPLACE)


# -- temporary names beside files ---------------------------------------------------------------
TMP_PREFIX = ".jam-"
TMP_SUFFIX = ".tmp"
TMP_MARK = "user.jam.part"  # on content jam is writing aside; removed just before the swap


_RANDOM: list[bytes] = []  # random bytes not yet used in a name (read 4 KiB at a time)
_RANDOM_LOCK = threading.Lock()
_PID: list[int] = []


def _forget_at_fork() -> None:
    """A forked child draws its own names (never the parent's next ones), asks its pid and ids
    again, and gets a lock no thread of the parent can have held at the fork."""
    global _RANDOM_LOCK
    _RANDOM_LOCK = threading.Lock()
    _RANDOM.clear()
    _PID.clear()
    _OWNER.clear()


def random_hex(n: int = 8) -> str:
    """``n`` random bytes as hex, for a temporary name: from a pool read from the kernel 4 KiB
    at a time (a syscall per name was one of the few a small file's stash or checkout
    pays more than once); as unpredictable as ``os.urandom(n)``, never handed out twice."""
    with _RANDOM_LOCK:
        if not _RANDOM or len(_RANDOM[0]) < n:
            _RANDOM[:] = [os.urandom(4096)]
        pool = _RANDOM[0]
        _RANDOM[0] = pool[n:]
    return pool[:n].hex()


def _pid() -> int:
    if not _PID:
        _PID.append(os.getpid())
    return _PID[0]


def tmp_name() -> str:
    """A fresh temporary name to create beside a file: ``.jam-<16 hex>.tmp``."""
    return f"{TMP_PREFIX}{random_hex(8)}{TMP_SUFFIX}"


def is_jam_tmp(name: str) -> bool:
    """A name jam makes for its temporary files (jam alone makes it, and never lists it)."""
    return (len(name) == len(TMP_PREFIX) + 16 + len(TMP_SUFFIX) and name.startswith(TMP_PREFIX)
            and name.endswith(TMP_SUFFIX) and all(c in "0123456789abcdef" for c in name[5:21]))


# -- read leases ---------------------------------------------------------------------------------
F_SETLEASE, F_GETLEASE, F_SETSIG, F_SETOWN_EX = 1024, 1025, 10, 15
F_OWNER_TID = 0
F_RDLCK, F_UNLCK = 0, 2


class FileBusy(OSError):
    """The file is open for writing by some program: it cannot be leased."""


class Leases:
    """Read leases on files being stashed (fcntl F_SETLEASE), held from hashing to the swap.

    A lease cannot be taken while any process has the file open for writing, and the kernel
    breaks it the moment one opens it for writing or truncates it. The kernel's notice of a
    break is a signal: SIGURG (ignored by default, so a stray one never kills jam), sent to
    one small thread of jam's (F_SETOWN_EX, F_OWNER_TID) that blocks it and waits for it
    (sigtimedwait). When it comes, the thread looks at every held lease and releases the
    broken ones at once: the writer waits only for that, and its file is not swapped. Without
    a notice the thread looks every ``IDLE`` seconds anyway; where a descriptor's notice cannot
    be directed to the thread, it looks every ``POLL`` seconds (the old way: a fcntl per held
    lease, which cost more than the stash itself for batches of small files).

    A backend whose remote shares the file's filesystem may make the leased file itself its
    object, a hard link instead of a copy (``adopt``, linked by ``link`` just before the swap).
    The lease is what makes that safe: no program can write into the file while it is held,
    and before any lease is let go (broken by a writer, released because the file was not
    swapped) the backend's ``settle(False)`` gives its object an inode of its own again, while
    the writer still waits.
    """

    POLL = 0.02
    IDLE = 10.0

    def __init__(self):
        self._held: set[int] = set()
        self._broken: set[int] = set()
        self._undirected: set[int] = set()  # held leases whose notice does not reach the thread
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tid = 0  # the thread's id once it blocks SIGURG; -1: it cannot wait for signals
        self._ready = threading.Event()
        self.notices = 0  # how many break notices woke the thread (tests read it)
        # leased files a backend adopted (``adopt``): fd -> (its stat once linked, settle)
        self._adopted: dict[int, tuple[os.stat_result, Callable[[bool], None]]] = {}
        self._refused: set[int] = set()  # fds no backend may adopt (``refuse``)
        self._pending: dict[int, tuple[Callable[[], bool], Callable[[bool], None]]] = {}  # adopted, not linked yet

    def take(self, fd: int) -> bool:
        """Lease ``fd`` (opened read-only). False where leases are not supported at all (then
        only the stat checks guard the file); raises FileBusy if it is open for writing."""
        import fcntl
        import signal

        self._start()
        directed = self._direct(fd)
        try:
            fcntl.fcntl(fd, F_SETSIG, signal.SIGURG)
            fcntl.fcntl(fd, F_SETLEASE, F_RDLCK)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EBUSY):
                raise FileBusy(exc.errno, "open for writing by another program") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise FileBusy(exc.errno, "cannot take a lease: the file belongs to another user") from None
            return False  # EINVAL and the like: this filesystem has no leases
        with self._lock:
            self._held.add(fd)
            if not directed:
                self._undirected.add(fd)
        # A writer may have broken it before it was held: its notice found nothing to release,
        # and the writer would wait for the next look (IDLE seconds). Look now.
        try:
            broken = fcntl.fcntl(fd, F_GETLEASE) != F_RDLCK
        except OSError:
            broken = True
        if broken:
            self._check()
        return True

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="jam-leases", daemon=True)
                self._thread.start()
        self._ready.wait()

    def _direct(self, fd: int) -> bool:
        """Send the break notice of ``fd`` to the watching thread alone (F_SETOWN_EX)."""
        import fcntl
        import struct

        if self._tid <= 0:
            return False
        try:
            fcntl.fcntl(fd, F_SETOWN_EX, struct.pack("ii", F_OWNER_TID, self._tid))
        except OSError:
            return False
        return True

    def intact(self, fd: int) -> bool:
        """True unless the lease on ``fd`` was broken (someone opened the file for writing)."""
        import fcntl

        with self._lock:
            if fd in self._broken:
                return False
            if fd not in self._held:
                return True  # never leased (no support): the caller's stat checks decide
        try:
            return fcntl.fcntl(fd, F_GETLEASE) == F_RDLCK
        except OSError:
            return False

    def adopt(self, source: str, link: Callable[[], bool], settle: Callable[[bool], None]) -> bool:
        """Let a backend make the leased file at ``source`` (``fd_path(fd)``) its object by a
        hard link, later: the core calls ``link()`` (``link``) only once the batch's stubs are
        durable, just before the swaps, so a stash that fails before them leaves the file as it
        was (a link moves its ctime). True if the file is leased, has no other name and is the
        caller's own (so no other name can write into the object); False (the backend copies
        it as usual) otherwise. ``settle(kept)`` is called once a link was made, before the
        lease is let go: ``kept`` only if the file was swapped for its stub and the object is
        its one name left."""
        import fcntl

        prefix = "/proc/self/fd/"
        text = str(source)
        if not (text.startswith(prefix) and text[len(prefix):].isdigit()):
            return False
        fd = int(text[len(prefix):])
        with self._lock:
            if fd not in self._held or fd in self._adopted or fd in self._pending or fd in self._refused:
                return False
            try:
                st = os.fstat(fd)
                if (fcntl.fcntl(fd, F_GETLEASE) != F_RDLCK or st.st_nlink != 1 or st.st_uid != os.geteuid()
                        or not stat.S_ISREG(st.st_mode)):
                    return False
            except OSError:
                return False
            self._pending[fd] = (link, settle)
        return True

    def link(self, fd: int) -> bool | None:
        """Make the link a backend's ``adopt`` asked for ``fd``: None if none did; True once
        linked (or the object was already there, verified: no link); False if the file is no
        longer the one hashed (its lease broken, another name), then there is no object for it.
        Raises what ``link()`` raised (no object either)."""
        import fcntl

        with self._lock:
            got = self._pending.pop(fd, None)
            if got is None:
                return None
            link, settle = got
            try:
                intact = fcntl.fcntl(fd, F_GETLEASE) == F_RDLCK and fd in self._held and os.fstat(fd).st_nlink == 1
            except OSError:
                intact = False
            if not intact:
                return False
            if link():  # under this lock: a break seen meanwhile waits for its settle
                self._adopted[fd] = (os.fstat(fd), settle)  # the link moved its ctime and link count
        return True

    def pending(self) -> bool:
        """Whether a backend adopted a file not linked yet (``link``)."""
        with self._lock:
            return bool(self._pending)

    def refuse(self, fd: int) -> None:
        """No backend may adopt ``fd`` (equal files share what is stored for it)."""
        with self._lock:
            self._refused.add(fd)

    def adopted(self, fd: int) -> os.stat_result | None:
        """The stat of ``fd`` once a backend adopted it (``adopt``), None if none did."""
        with self._lock:
            got = self._adopted.get(fd)
        return None if got is None else got[0]

    def _settle(self, fd: int, kept: bool) -> None:
        got = self._adopted.pop(fd, None)
        if got is not None:
            try:
                got[1](kept)
            except Exception:  # the backend's own recovery (its next command) takes it from here
                pass

    def release(self, fd: int, kept: bool = False) -> None:
        """Let the lease on ``fd`` go; first, if a backend adopted the file, ``settle(kept)``."""
        import fcntl

        with self._lock:
            held = fd in self._held
            self._held.discard(fd)
            self._broken.discard(fd)
            self._undirected.discard(fd)
            self._refused.discard(fd)  # the number may be reused by the next file opened
            self._pending.pop(fd, None)  # never linked: nothing to undo
            self._settle(fd, kept)  # under the lock: a break seen meanwhile waits for it
        if held:
            try:
                fcntl.fcntl(fd, F_SETLEASE, F_UNLCK)
            except OSError:
                pass

    def _watch(self) -> None:
        import signal

        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGURG})
            self._tid = threading.get_native_id()
            wait = signal.sigtimedwait
        except (AttributeError, OSError, ValueError):
            self._tid, wait = -1, None
        self._ready.set()
        while not self._stop.is_set():
            with self._lock:
                fast = bool(self._undirected) or wait is None
            if wait is None:
                self._stop.wait(self.POLL)
            elif wait({signal.SIGURG}, self.POLL if fast else self.IDLE) is not None:
                self.notices += 1
            if not self._stop.is_set():
                self._check()

    def _check(self) -> None:
        """Release every held lease the kernel is breaking (let the writer go on at once)."""
        import fcntl

        with self._lock:
            for fd in list(self._held):
                try:
                    if fcntl.fcntl(fd, F_GETLEASE) == F_RDLCK:
                        continue
                except OSError:
                    pass
                self._held.discard(fd)
                self._undirected.discard(fd)
                self._broken.add(fd)
                self._pending.pop(fd, None)  # not linked yet: never will be
                self._settle(fd, False)  # an adopted file's object gets its own inode before the writer goes on
                try:
                    fcntl.fcntl(fd, F_SETLEASE, F_UNLCK)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            if self._tid > 0:
                import signal

                try:
                    signal.pthread_kill(self._thread.ident, signal.SIGURG)  # wake it now
                except (OSError, ValueError):
                    pass
            self._thread.join()
            self._thread = None
        for fd in list(self._held):
            self.release(fd)


# -- closing removed files in the background ------------------------------------------------

class Closer:
    """Closes descriptors of files that were just removed, several at a time, off the caller's
    thread; ``wait()`` (and ``stop()``, and leaving the ``with``) returns once every one is closed.

    The last close of an unlinked file frees its blocks, and on a disk mounted with discard
    (most VMs and SSDs) that waits on the device: 0.5-3 ms per file here, seconds for a large
    file or a thousand small ones, while the CPU idles. Those waits overlap when several
    closes are in flight, and overlap with the caller's next batch. Only what is already gone
    from the tree goes here (a stashed original, an old stub): nothing is lost if the process
    dies before it is closed (the kernel closes it). A batch's descriptors are handed over at
    once (``close_all``) and split between at most ``THREADS`` threads, started as needed (no
    thread for a caller that closes nothing); each thread closes its share in one job, so the
    caller's thread is interrupted once per share, not once per file.

    ``hold`` keeps descriptors open until ``flush`` (or ``stop``) hands them over, and ``flush``
    hands them over only once more than ``most`` files or ``most_bytes`` bytes are held: a stash
    or a checkout frees what it removed when it ends, not batch by batch, because on ext4
    without a journal every new inode of a block group is searched for past the inodes freed
    there in the last minutes (a thousand frees made each of the next thousand creations scan
    a thousand inodes). The caps keep the descriptors within the process's limit and the space
    held back to about one batch's."""

    THREADS = 4
    _close = staticmethod(os.close)  # what is done to each descriptor (tests hold it at the instant they need)

    def __init__(self, most: int = 0, most_bytes: int = 0) -> None:
        import queue

        self.most, self.most_bytes = most, most_bytes
        self._held_bytes = 0
        self._jobs: "queue.SimpleQueue[list[int] | None]" = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pending = 0  # jobs handed over and not finished
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._held: list[int] = []

    def hold(self, fds: list[int], nbytes: int = 0) -> None:
        """Close every descriptor of ``fds`` (files of ``nbytes`` in all) after a ``flush`` that
        finds more held than the caps, at the latest at ``stop``."""
        self._held.extend(fds)
        self._held_bytes += nbytes

    def flush(self, at_once: bool = False) -> None:
        """Hand over every descriptor held so far (``close_all``) if more than the caps are
        held (or ``at_once``)."""
        if at_once or len(self._held) > self.most or self._held_bytes > self.most_bytes:
            fds, self._held, self._held_bytes = self._held, [], 0
            self.close_all(fds)

    def close(self, fd: int) -> None:
        """Close ``fd`` soon; the caller must not use (or close) it again."""
        self.close_all([fd])

    def close_all(self, fds: list[int]) -> None:
        """Close every descriptor of ``fds`` soon, several threads sharing them."""
        if not fds:
            return
        shares = min(self.THREADS, len(fds))
        jobs = [fds[i::shares] for i in range(shares)]
        with self._lock:
            self._pending += len(jobs)
            start = max(0, min(self.THREADS, self._pending) - len(self._threads))
        for _ in range(start):
            t = threading.Thread(target=self._run, name="jam-close", daemon=True)
            self._threads.append(t)
            t.start()
        for job in jobs:
            self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            for fd in job:
                try:
                    self._close(fd)
                except OSError:
                    pass  # a descriptor opened read-only: nothing is lost by a failed close
            with self._lock:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.notify_all()

    def wait(self) -> None:
        """Return once every descriptor handed over so far is closed."""
        with self._lock:
            while self._pending:
                self._idle.wait()

    def stop(self) -> None:
        """Close what is held, wait for every close, then end the threads (the Closer may be
        used again)."""
        self.flush(at_once=True)
        self.wait()
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads.clear()

    def __enter__(self) -> "Closer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# -- temporary names on remotes ------------------------------------------------------------
# A backend uploads to ``tmp/<part_name()>`` and renames into ``objects/``. A part is provably
# stale, and may be removed by any jam, when the jam that wrote it is dead on this machine, or
# when it is older than any transfer could take (another machine's jam, which we cannot ask).

PART_SUFFIX = ".part"
_HEX32 = LazyRe(r"[0-9a-f]{32}")
_HEX16 = LazyRe(r"[0-9a-f]{16}")
PART_MAX_AGE = 7 * 24 * 3600  # seconds: no single object upload takes a week


_HOST: list[str] = []


def _host() -> str:
    """This machine's name as parts carry it (asked once: a store per object asked each time)."""
    if not _HOST:  # os.uname's node name is gethostname's, without importing socket (~8 ms)
        _HOST.append("".join(c for c in os.uname().nodename if c.isalnum() or c in "-_")[:64] or "host")
    return _HOST[0]


def part_name(suffix: str = PART_SUFFIX) -> str:
    """A temporary object name that says who wrote it: ``<host>.<pid>.<random>.part`` (or
    another ``suffix`` for a backend's other temporary files)."""
    return f"{_host()}.{_pid()}.{random_hex(8)}{suffix}"


def part_is_stale(name: str, mtime: float, now: float, suffix: str = PART_SUFFIX) -> bool:
    """True if ``tmp/name`` on a remote is an upload no living jam is still writing.

    Only names jam makes qualify (``part_name()``, or the bare ``<hex>.part`` of older
    versions). Ours from a dead process on this host: stale at once; anything else: when
    older than PART_MAX_AGE.
    """
    if not name.endswith(suffix):
        return False
    fields = name[: -len(suffix)].split(".")
    if len(fields) == 3 and fields[1].isdigit() and fields[0] == _host():
        pid = int(fields[1])
        if pid != os.getpid() and not _alive(pid):
            return True
    elif not ((len(fields) == 1 and _HEX32.fullmatch(fields[0]))  # an older jam's uuid4().hex
              or (len(fields) == 3 and fields[0] and fields[1].isdigit() and _HEX16.fullmatch(fields[2])
                  and all(c.isalnum() or c in "-_" for c in fields[0]))):
        return False
    return now - mtime > PART_MAX_AGE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- extended attributes ----------------------------------------------------------------------------
# On Linux the os module's own calls (measured 2.4x faster than the xattr package); elsewhere
# (macOS, where the seed's Dropbox laptops live) the xattr package, behind the same signatures.
if hasattr(os, "getxattr"):
    getxattr, setxattr, listxattr, removexattr = os.getxattr, os.setxattr, os.listxattr, os.removexattr
else:  # pragma: no cover - exercised on macOS only
    import xattr as _xattr

    def _opts(follow_symlinks: bool) -> int:
        return 0 if follow_symlinks else _xattr.XATTR_NOFOLLOW

    def getxattr(path, attribute, *, follow_symlinks=True):
        return _xattr.getxattr(path, attribute, _opts(follow_symlinks))

    def setxattr(path, attribute, value, flags=0, *, follow_symlinks=True):
        _xattr.setxattr(path, attribute, value, _opts(follow_symlinks) | flags)

    def listxattr(path=None, *, follow_symlinks=True):
        return list(_xattr.listxattr(path, _opts(follow_symlinks)))

    def removexattr(path, attribute, *, follow_symlinks=True):
        _xattr.removexattr(path, attribute, _opts(follow_symlinks))


# -- extended attributes that travel with a file's content -----------------------------------------
# A stub carries the file's own ``user.*`` xattrs as they are, and its POSIX ACLs packed into one
# ``user.jam.acl`` (an ACL set on the read-only stub itself would give write bits back). Nothing
# else travels: ``security.*`` and ``trusted.*`` are not the user's to restore (a capability set
# from a stub's metadata would be a privilege escalation), and names under ``user.jam`` are jam's.
# A file with its own capabilities or ``trusted.*`` xattrs is therefore never stashed
# (``NotCarried``): its stub could not bring them back.
JAM_XATTRS = "user.jam"
ACL_XATTR = "user.jam.acl"
_ACLS = ("system.posix_acl_access",)
_MAX_XATTR = 64 * 1024


class NotCarried(Exception):
    """The file has xattrs a stub cannot carry safely (``names``): it must stay local."""

    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


def _not_carried(name: str) -> bool:
    return name == "security.capability" or name.startswith("trusted.")


def carried_xattrs(fd: int) -> dict[str, bytes]:
    """The xattrs of the open file ``fd`` that its stub must carry, by name. Raises NotCarried
    for a file with capabilities (``security.capability``) or ``trusted.*`` xattrs."""
    out: dict[str, bytes] = {}
    acls: dict[str, bytes] = {}
    try:
        names = listxattr(fd)
    except OSError:
        return out
    refused = [n for n in names if _not_carried(n)]
    if refused:
        raise NotCarried(refused)
    for name in names:
        try:
            if name.startswith("user.") and not (name == JAM_XATTRS or name.startswith(JAM_XATTRS + ".")):
                out[name] = getxattr(fd, name)
            elif name in _ACLS:
                acls[name] = getxattr(fd, name)
        except OSError:
            pass
    if acls:
        out[ACL_XATTR] = _pack(acls)
    return out


def drop_inherited_acl(fd: int) -> None:
    """Remove the access ACL a new file ``fd`` inherited from its directory's default ACL: the
    file jam makes in place of another gets exactly the ACL that one had (``restore_xattrs``)
    or none, never one that lets in whom the original did not. Call before its fchmod."""
    try:
        removexattr(fd, _ACLS[0])
    except OSError:
        pass  # none (ENODATA), or no ACLs on this filesystem


def restore_xattrs(src, dst_fd: int) -> None:
    """Put the xattrs a stub carries (``src``: its path or descriptor) back on the file
    ``dst_fd`` that replaces it: user xattrs as they are, ACLs unpacked. Call after fchmod
    (an ACL sets the mode's group bits). Hostile values are refused with ValueError."""
    try:
        names = listxattr(src) if isinstance(src, int) else listxattr(src, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if name == JAM_XATTRS or not name.startswith("user."):
            continue
        value = getxattr(src, name) if isinstance(src, int) else getxattr(src, name, follow_symlinks=False)
        if name == ACL_XATTR:
            for acl_name, acl in _unpack(value).items():
                setxattr(dst_fd, acl_name, acl)
        elif not name.startswith(JAM_XATTRS + "."):
            setxattr(dst_fd, name, value)


def _pack(values: dict[str, bytes]) -> bytes:
    out = bytearray()
    for name, value in values.items():
        n = name.encode()
        out += len(n).to_bytes(1, "little") + n + len(value).to_bytes(4, "little") + value
    return bytes(out)


def _unpack(raw: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    i = 0
    if len(raw) > _MAX_XATTR:
        raise ValueError("packed ACLs too large")
    while i < len(raw):
        n = raw[i]
        name = raw[i + 1:i + 1 + n].decode("ascii", "replace")
        i += 1 + n
        size = int.from_bytes(raw[i:i + 4], "little")
        i += 4
        if name not in _ACLS or i + size > len(raw):
            raise ValueError(f"packed ACLs hold {name!r}: not an ACL jam restores")
        out[name] = raw[i:i + size]
        i += size
    return out
