"""The daemon's worker process: fetches a stub's object, verifies it, fills the stub.

It gets each stub as the descriptor of a fanotify event (``O_RDWR``, opened by the kernel
without notification: reading and writing it raises no event, so no self-deadlock), sent by
the supervisor over a SOCK_SEQPACKET socketpair with SCM_RIGHTS, keyed by (st_dev, st_ino). It
answers the key and 0 (let the reader go on: the stub was filled, or is not a stub to fill) or
an errno (deny the reader with it; the stub stays a stub).

The fetch is checkout's: the object goes into a temporary file (``O_TMPFILE`` in ``.jam/tmp``,
so a killed worker leaves nothing) through the backends' ``fetch``/``fetch_many``, remotes known
to hold it first, and is verified against the id. Only then is the stub filled, through the
event's descriptor: ``user.jam.filling`` is set first (a fill cut short by a kill is finished
by the next worker, not taken for a stub written into), the content copied, fsync'd, the mode,
ACLs and mtime of the original put back, ``user.jam`` and the marker removed, fsync'd again.
The reader is answered, then the catalog is updated (the stub row goes, a use is recorded) by
one thread that owns the catalogs, so a jam command holding the catalog never delays a reader.

A second thread records opens of local files in the roots as use (a notification group, one
mark per directory, batched writes).
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import select
import socket
import stat
import struct
import sys
import termios
import threading
import time

from jam_core.daemon import fanotify as F
from jam_core.daemon.marks import NEW_DIR_MASK, AsOwner, is_jam_pid, mark_dirs, unmark_fd
from jam_core.errors import JamError, RemoteError
from jam_core.fs import ACL_XATTR, _unpack, getxattr, removexattr, setxattr, syncfs
from jam_core.objects import BIG, hash_fd, hasher, object_relpath, split_oid
from jam_core.root import CATALOG, JAM_DIR, Root, check_rel
from jam_core.stub import XATTR, BadStub, read_record, verify_clean

KEY = struct.Struct("=QQi")  # st_dev, st_ino, the event's descriptor number in the supervisor
ANSWER = struct.Struct("=QQiB")  # st_dev, st_ino, 0 or an errno, 1 if the worker answered the kernel itself
IDLE = b"idle"  # supervisor -> worker: answer IDLE_KEY once nothing is in progress
IDLE_KEY = (0, 0)  # no inode has st_ino 0
FILLING = "user.jam.filling"  # on a stub whose content is being written in through its fd
DONE = b"done"  # FILLING's value once the whole content is in, right before the reader is answered
THREADS = 4
MEM_MAX = 64 << 20  # an object up to this size from a dir remote is read into memory, hashed, written in
KEEP_BUF = 8 << 20  # each fill thread keeps a buffer this large, faulted in before the first event
FLUSH_EVERY = 1.0  # seconds between catalog writes of uses
IGNORE_FOR = 600.0  # seconds: a file's use is recorded at most once in this time


class FillError(Exception):
    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


class _Entry:
    def __init__(self, record):
        self.record = record


class _Want:
    """What checkout's ``fetch_from`` needs of a want: the record and the temporary file."""

    def __init__(self, record, fd: int):
        self.entry = _Entry(record)
        self.fd = fd
        self.unreachable = 0


def _log(msg: str) -> None:
    print(f"jam daemon: {msg}", file=sys.stderr, flush=True)


class Worker:
    def __init__(self, roots: list[str], pm=None):
        from jam_core.manager import make_plugin_manager

        self.roots = [Root(_p(r)) for r in roots]
        self.pm = pm if pm is not None else make_plugin_manager()
        self.local = threading.local()
        self.updates: queue.Queue = queue.Queue()
        self.fetches = 0
        self.finishing: queue.Queue = queue.Queue()
        self.filled: set[tuple[int, int]] = set()  # (dev, ino) filled and answered, not yet finished
        self.catalogs = threading.local()
        self.lock = threading.Lock()
        self.busy = 0  # events taken and not yet answered
        self.stale: dict[str, Root] = {}  # roots whose cd-hook index lists directories filled since
        self.uses_ready = threading.Event()
        self.uses_busy = False
        self.uses_fans: list[int] = []
        self._remotes: dict[str, list] = {}
        # the dir backend's objects are read straight from their files (no temporary copy)
        self.dir_backend = self.pm.get_plugin("jam_dir") is not None
        # what a fill needs, imported now rather than on the first event
        import jam_core.catalog  # noqa: F401
        import jam_core.hook.index  # noqa: F401
        import jam_core.ops.checkout  # noqa: F401
        import jam_core.ops.remotes  # noqa: F401

        hasher("b3")

    # -- which root ------------------------------------------------------------------------
    def locate(self, path: str) -> tuple[Root, str | None] | None:
        """(root, rel) of an absolute path; rel None for a name that is gone (deleted)."""
        deleted = path.endswith(" (deleted)")
        if deleted:
            path = path[:-len(" (deleted)")]
        for root in self.roots:
            top = str(root.path).rstrip("/") + "/"
            if path.startswith(top):
                rel = path[len(top):]
                try:
                    check_rel(rel)
                except ValueError:
                    return root, None
                return root, None if deleted else rel
        return None

    def session(self):
        s = getattr(self.local, "session", None)
        if s is None:
            from jam_core.model import Session

            s = self.local.session = Session()
        return s

    def catalog(self, root: Root):
        cats = self.catalogs.__dict__
        cat = cats.get(root.path)
        if cat is None:
            with AsOwner(root.path):
                cat = cats[root.path] = open_catalog(root)
        return cat

    def remotes(self, root: Root) -> list:
        have = self._remotes.get(str(root.path))
        if have is None:
            have = self._remotes[str(root.path)] = root.remotes()
        return have

    def buffer(self, size: int) -> memoryview:
        """This thread's buffer for an object of ``size`` bytes (kept, already faulted in, up
        to KEEP_BUF; a larger one is made for this fill alone)."""
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = memoryview(bytearray(KEEP_BUF))
            buf[:] = bytes(KEEP_BUF)  # fault it in now, not during a reader's wait
        if size <= len(buf):
            return buf[:size]
        return memoryview(bytearray(size))

    def warm(self) -> None:
        """Before the first event: this thread's buffer, session and catalog connections."""
        self.buffer(0)
        self.session()
        for root in self.roots:
            try:
                self.remotes(root)
            except (JamError, OSError):
                pass  # said when a fill needs it

    # -- one stub ----------------------------------------------------------------------------
    def handle(self, fd: int) -> int:
        """Fill the stub open at ``fd`` if it needs it. 0, or the errno to deny the reader with."""
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
            try:
                rec = read_record(fd)
            except BadStub as exc:
                _log(f"{path}: unreadable stub metadata ({exc}); readers get EIO")
                return errno.EIO
            if rec is None:
                return 0  # filled already (another way), or never a stub
            where = self.locate(path)
            if where is None:
                _log(f"{path}: a stub outside the daemon's roots; readers get EIO")
                return errno.EIO
            root, rel = where
            try:
                state = getxattr(fd, FILLING)
            except OSError:
                state = None
            if state == DONE:
                # Filled and its readers answered: they may have written since. Never filled
                # again (an open queued before the mark went, or a worker that died before
                # finishing): finished if its content is still the object, else kept as the
                # user's bytes (a stub written into: doctor reports it, checkout keeps it).
                st = os.fstat(fd)
                with self.lock:
                    mine = (st.st_dev, st.st_ino) in self.filled
                if not mine:
                    os.lseek(fd, 0, os.SEEK_SET)
                    if hash_fd(fd, split_oid(rec.oid)[0], limit=rec.size + 1) == (rec.oid, rec.size):
                        self.finishing.put((os.dup(fd), -1))
                    else:
                        _log(f"{path}: written into after an unfinished fill; kept as it is")
                return 0
            if state is None and not verify_clean(fd, rec):
                return 0  # written into since it was stashed: its bytes are the user's, never fetched over
            content = self.fetch(root, rec)
            try:
                fill(fd, content, rec)
            except BaseException:
                if isinstance(content, int):
                    os.close(content)
                raise
            # durable in the background (and a temporary file freed there: closing 5 MiB costs
            # tens of ms): the reader goes on now
            st = os.fstat(fd)
            with self.lock:
                self.filled.add((st.st_dev, st.st_ino))
            self.finishing.put((os.dup(fd), content if isinstance(content, int) else -1))
            if rel is not None:
                self.updates.put(("filled", root, rel))
            return 0
        except FillError as exc:
            _log(str(exc))
            return exc.errno
        except OSError as exc:
            _log(f"fill failed: {exc}")
            return errno.ENOSPC if exc.errno == errno.ENOSPC else errno.EIO

    def fetch(self, root: Root, rec) -> memoryview | int:
        """Exactly the object of ``rec``, verified: in memory (an object of a dir remote up to
        MEM_MAX, read once, hashed, no temporary file), or else the descriptor of an anonymous
        file the backends fetched into."""
        from jam_core.ops.checkout import _order

        try:
            remotes = self.remotes(root)
            known = set()
            if len(remotes) > 1:
                cat = self.catalog(root)
                with AsOwner(root.path):
                    known = cat.remotes_of([rec.oid])[rec.oid]
        except (JamError, OSError) as exc:
            raise FillError(errno.EIO, f"{root.path}: {exc}") from None
        self.fetches += 1
        problems: list[str] = []
        tmp = -1
        try:
            for remote in _order(remotes, known):
                try:
                    got = None
                    if self.dir_backend and remote.kind == "dir" and rec.size <= MEM_MAX:
                        with AsOwner(root.path):  # the user's remote, read (and its marker checked) as the user
                            got = self.fetch_dir(root, remote, rec)
                    if got is None:  # not a dir remote, or no whole object there (its chunks may be)
                        # As the user too: a backend may record a remote's identity in the
                        # root's config.toml, which must stay the user's file.
                        with AsOwner(root.path):
                            if tmp < 0:
                                tmp = self.tmpfile(root)
                            got = self.fetch_hooks(root, remote, rec, tmp)
                except RemoteError as exc:
                    problems.append(str(exc))
                    continue
                if isinstance(got, str):
                    problems.append(got)
                    continue
                if isinstance(got, int):
                    tmp = -1  # the caller's now
                return got
        finally:
            if tmp >= 0:
                os.close(tmp)
        if not problems:
            problems.append("no remote is configured")
        raise FillError(errno.EIO, f"{rec.oid}: " + "; ".join(problems))

    def tmpfile(self, root: Root) -> int:
        tmpdir = root.jam_dir / "tmp"
        try:
            return os.open(tmpdir if tmpdir.is_dir() else root.jam_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC,
                           0o600)
        except OSError as exc:
            raise FillError(errno.EIO, f"{root.path}: cannot make a temporary file: {exc.strerror}") from None

    def fetch_hooks(self, root: Root, remote, rec, tmp: int) -> int | str:
        """Through the backends' fetch hooks into ``tmp``, verified (checkout's fetch_from)."""
        from jam_core.ops.checkout import fetch_from

        os.ftruncate(tmp, 0)
        want = _Want(rec, tmp)
        for _w, problem in fetch_from(root, remote, [want], self.pm, self.session()):
            if problem is None:
                return tmp
            if want.unreachable:
                raise RemoteError(problem)
            return problem
        return f"remote {remote.name!r}: no answer for {rec.oid}"

    def fetch_dir(self, root: Root, remote, rec) -> memoryview | str | None:
        """The object of ``rec`` from a dir remote, straight from its file: read once into
        memory, hashed there, and those very bytes are what ``fill`` writes (nothing can change
        them between the check and the write). A problem with this object is a string; the
        remote unreachable as a whole is a RemoteError."""
        from jam_core.ops.remotes import ensure_identity

        ensure_identity(root, remote, self.pm, self.session())
        where = f"remote {remote.name!r} ({remote.location})"
        try:
            src = os.open(os.path.join(remote.location, "objects", object_relpath(rec.oid)),
                          os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            if not os.path.isdir(remote.location):
                raise RemoteError(f"{where}: the directory is missing (unplugged drive?)") from None
            return None  # the fetch hooks then try it as chunks (history/chunks.py), or say it is absent
        except OSError as exc:
            raise RemoteError(f"{where}: cannot read {rec.oid}: {exc.strerror}") from None
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                return f"{where}: {rec.oid} is not a regular file"
            if st.st_size != rec.size:
                return f"{where} holds a corrupt {rec.oid}: {st.st_size} bytes, not the {rec.size} the stub says"
            view = self.buffer(rec.size)
            n = 0
            while n < rec.size:
                got = os.preadv(src, [view[n:]], n)
                if got == 0:
                    break
                n += got
        except OSError as exc:
            raise RemoteError(f"{where}: cannot read {rec.oid}: {exc.strerror}") from None
        finally:
            os.close(src)
        if n != rec.size:
            return f"{where}: {rec.oid} ended after {n} of {rec.size} bytes"
        algorithm, _ = split_oid(rec.oid)
        h = hasher(algorithm, threads=rec.size >= BIG)
        h.update(view)
        if f"{algorithm}:{h.hexdigest()}" != rec.oid:
            return f"{where} returned corrupt content for {rec.oid}; stub left as it was"
        return view

    # -- idle: nothing queued, nothing in progress (bench and tests wait for it) -------------
    def idle(self) -> bool:
        """Nothing to do: checked upstream first (an item that moves on between two checks
        is seen by the later one)."""
        if not self.uses_ready.is_set():
            return False
        for fd in self.uses_fans:
            if _queued(fd):
                return False
        return not (self.uses_busy or self.busy or self.updates.unfinished_tasks or self.stale
                    or self.finishing.unfinished_tasks)

    def wait_idle(self, sock: socket.socket, send_lock: threading.Lock) -> None:
        while not self.idle():
            time.sleep(0.005)
        try:
            with send_lock:
                sock.send(ANSWER.pack(*IDLE_KEY, 0, 0))
        except OSError:
            pass

    # -- the catalog and uses (one thread owns the catalogs) ---------------------------------
    def updater(self, stop: threading.Event) -> None:
        while True:
            try:
                # the cd hook's index is brought up to date once a burst of fills is over
                items = [self.updates.get(timeout=0.2 if self.stale else FLUSH_EVERY)]
            except queue.Empty:
                self.refresh_indexes()
                if stop.is_set():
                    return
                continue
            deadline = time.monotonic() + 0.05  # one transaction for what comes meanwhile
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    items.append(self.updates.get(timeout=left))
                except queue.Empty:
                    break
            try:
                by_root: dict[str, tuple[Root, list, set]] = {}
                for kind, root, rel in items:
                    slot = by_root.setdefault(str(root.path), (root, [], set()))
                    if kind == "filled":
                        slot[1].append(rel)
                    else:
                        slot[2].add(rel)
                now = time.time()
                for root, filled, used in by_root.values():
                    try:
                        with AsOwner(root.path), open_catalog(root) as cat, cat.transaction():
                            for rel in filled:
                                cat.remove_stub(rel)
                            cat.record_use(list(used) + filled, now)
                    except (JamError, OSError) as exc:
                        _log(f"{root.path}: catalog not updated ({exc}); the next scan corrects it")
                        continue
                    if filled:
                        self.stale[str(root.path)] = root
            finally:
                for _ in items:
                    self.updates.task_done()

    def refresh_indexes(self) -> None:
        """The cd hook's index no longer marks a directory whose stubs were all filled (under
        the root's lock; a jam command holding it is waited for on the next pass)."""
        from jam_core.errors import UsageError
        from jam_core.hook.index import clear_filled
        from jam_core.root import LOCK

        for key, root in list(self.stale.items()):
            try:
                with AsOwner(root.path):
                    if os.path.exists(root.jam_dir / LOCK):
                        with root.lock(wait=False), open_catalog(root) as cat:
                            clear_filled(root, cat)
                    else:
                        with open_catalog(root) as cat:
                            clear_filled(root, cat)
            except UsageError:
                continue  # a jam command holds the root: again on the next pass
            except (JamError, OSError) as exc:
                _log(f"{root.path}: the cd hook's index was not updated ({exc})")
            self.stale.pop(key, None)

    def record_uses(self, stop: threading.Event) -> None:
        """Opens of files in the roots (a notification group) become uses, batched; directories
        made while the daemon runs are marked too (a second group, reporting names)."""
        try:
            fan = F.init(F.FAN_CLASS_NOTIF | F.FAN_CLOEXEC | F.FAN_NONBLOCK | F.FAN_UNLIMITED_MARKS,
                         os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            _log(f"opens are not recorded as use: {exc.strerror}")
            self.uses_ready.set()
            return
        try:
            dirs = F.init(F.FAN_CLASS_NOTIF | F.FAN_CLOEXEC | F.FAN_NONBLOCK | F.FAN_UNLIMITED_MARKS
                          | F.FAN_REPORT_DFID_NAME, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            _log(f"directories made while the daemon runs record no use until a restart: {exc.strerror}")
            dirs = -1
        mounts = []
        for root in self.roots:
            try:
                # not O_PATH: open_by_handle_at refuses it as the mount's descriptor
                mounts.append(os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError:
                pass

        def mark_all() -> None:
            for root in self.roots:
                if dirs >= 0:
                    mark_dirs(dirs, str(root.path), NEW_DIR_MASK)
                mark_dirs(fan, str(root.path))

        mark_all()
        self.uses_fans = [fan] + ([dirs] if dirs >= 0 else [])
        self.uses_ready.set()
        jam_pids: dict[int, bool] = {}
        last_clear = time.monotonic()
        try:
            while True:
                done = stop.is_set()  # one more read after the stop: opens made before it count
                r, _, _ = select.select(self.uses_fans, [], [], 0 if done else 0.5)
                self.uses_busy = bool(r)
                if time.monotonic() - last_clear > IGNORE_FOR:
                    jam_pids.clear()
                    last_clear = time.monotonic()
                    try:  # forget the ignore marks (and the directories' marks, made again)
                        F.mark(fan, F.FAN_MARK_FLUSH, 0)
                        mark_all()
                    except OSError:
                        pass
                if not r:
                    if done:
                        break
                    continue
                if dirs in r:
                    self.new_dirs(fan, dirs, mounts)
                if fan in r:
                    self.opens(fan, jam_pids)
                self.uses_busy = False
        finally:
            self.uses_busy = False
            for fd in mounts:
                os.close(fd)
            if dirs >= 0:
                os.close(dirs)
            os.close(fan)

    def opens(self, fan: int, jam_pids: dict[int, bool]) -> None:
        try:
            buf = os.read(fan, 65536)
        except BlockingIOError:
            return
        for ev in F.parse(buf):
            if ev.fd < 0:
                continue
            try:
                path = os.readlink(f"/proc/self/fd/{ev.fd}")
                # one use per file per IGNORE_FOR: its next opens cost nothing (no event)
                F.mark(fan, F.FAN_MARK_ADD | F.FAN_MARK_IGNORED_MASK | F.FAN_MARK_IGNORED_SURV_MODIFY,
                       F.FAN_OPEN, ev.fd, None)
            except OSError:
                path = ""
            finally:
                os.close(ev.fd)
            if ev.pid not in jam_pids:
                jam_pids[ev.pid] = ev.pid == os.getpid() or is_jam_pid(ev.pid)
            if jam_pids[ev.pid]:
                continue
            where = self.locate(path) if path else None
            if where is not None and where[1] is not None:
                self.updates.put(("used", where[0], where[1]))

    def new_dirs(self, fan: int, dirs: int, mounts: list[int]) -> None:
        """Directories made in (or moved into) a root: marked for use, with what is already in
        them (``mkdir -p``, a tree moved in), and watched for directories made in them."""
        try:
            buf = os.read(dirs, 65536)
        except BlockingIOError:
            return
        for ev in F.parse(buf):
            if not ev.mask & F.FAN_ONDIR or ev.handle is None or not ev.name or b"/" in ev.name:
                continue
            parent = None
            for m in mounts:
                try:
                    pfd = F.open_by_handle(m, ev.handle, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    parent = os.readlink(f"/proc/self/fd/{pfd}")
                except OSError:
                    pass
                finally:
                    os.close(pfd)
                break
            if parent is None:
                continue
            path = os.path.join(parent, os.fsdecode(ev.name))
            where = self.locate(path)
            if where is None or where[1] is None or where[1].split("/", 1)[0] == JAM_DIR:
                continue
            mark_dirs(dirs, path, NEW_DIR_MASK, is_root=False)
            mark_dirs(fan, path, is_root=False)


def open_catalog(root: Root):
    """The root's catalog. Callers hold ``AsOwner(root.path)`` while they use it: the database
    and SQLite's journal files are then made and reached as the root's owner, never as root."""
    from jam_core.catalog import Catalog

    return Catalog(root.jam_dir / CATALOG)


def _queued(fd: int) -> int:
    """Bytes of events waiting in a fanotify queue (FIONREAD)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _p(r):
    from pathlib import Path

    return Path(os.path.realpath(r))


def fill(fd: int, content: memoryview | int, rec) -> None:
    """Write the verified ``content`` (in memory, or at a temporary file's descriptor) into the
    stub open at ``fd`` and give it the original's mode, ACLs and mtime. It stays marked
    ``user.jam`` + ``user.jam.filling`` until ``finish`` has made the content durable. A crash
    mid-fill (``filling`` = 1: no reader was let in yet) leaves a stub that the next daemon fills
    again, never a file that reads as zeros; once the content is in (``filling`` = done) it is
    never filled over again, since answered readers may have written (see ``handle``)."""
    from jam_core.ops.checkout import _allowed_mode, _copy_fd

    st = os.fstat(fd)
    setxattr(fd, FILLING, b"1")
    if isinstance(content, int):
        _copy_fd(content, fd, rec.size)
    else:
        off = 0
        while off < rec.size:
            n = os.pwrite(fd, content[off:], off)
            if n <= 0:
                raise OSError(errno.EIO, "short write into the stub")
            off += n
    os.fchmod(fd, _allowed_mode(rec.mode, st.st_uid, st.st_gid))  # as checkout: no setgid the owner could not set
    try:
        acls = _unpack(getxattr(fd, ACL_XATTR))
    except OSError:
        acls = {}
    except ValueError as exc:
        _log(f"hostile ACL metadata ignored: {exc}")
        acls = {}
    for name, value in acls.items():
        setxattr(fd, name, value)
    for name in (ACL_XATTR,):
        try:
            removexattr(fd, name)
        except OSError:
            pass
    os.utime(fd, ns=(st.st_atime_ns, rec.mtime_ns))
    setxattr(fd, FILLING, DONE)  # from here on readers may write: never filled over again


def finish(fds: list[int]) -> None:
    """Make filled stubs' content durable (one syncfs for a batch, as checkout does), then let
    them be files again (xattrs removed)."""
    if len(fds) == 1:
        os.fsync(fds[0])
    else:
        syncfs(fds[0])
    for fd in fds:
        try:
            removexattr(fd, XATTR)
            removexattr(fd, FILLING)
        except OSError as exc:
            _log(f"a filled stub was not finished ({exc}); it fills again on its next open")


def finisher(q: queue.Queue, worker: "Worker | None" = None) -> None:
    while True:
        items = [q.get()]
        while True:  # what was filled meanwhile is made durable together
            try:
                items.append(q.get_nowait())
            except queue.Empty:
                break
        end = None in items
        batch = [item for item in items if item is not None]
        try:
            if batch:
                finish([fd for fd, _tmp in batch])
        except OSError as exc:
            _log(f"filled stubs were not made durable ({exc}); they fill again on their next open")
        finally:
            for fd, tmp in batch:
                if worker is not None:
                    st = os.fstat(fd)
                    with worker.lock:
                        worker.filled.discard((st.st_dev, st.st_ino))
                os.close(fd)
                if tmp >= 0:
                    os.close(tmp)
            for _ in items:
                q.task_done()
        if end:
            return


def serve(sock: socket.socket, worker: Worker, fan: int = -1) -> None:
    stop, uses_stop = threading.Event(), threading.Event()
    updater = threading.Thread(target=worker.updater, args=(stop,), daemon=True, name="catalog")
    uses = threading.Thread(target=worker.record_uses, args=(uses_stop,), daemon=True, name="uses")
    finishing = threading.Thread(target=finisher, args=(worker.finishing, worker), daemon=True, name="finish")
    updater.start()
    uses.start()
    finishing.start()
    send_lock = threading.Lock()

    def filler() -> None:
        """Each fill thread takes its next event from the socket itself (no hand-over to
        another thread while a reader waits)."""
        worker.warm()  # ready before the first event: buffer faulted in, catalog open
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(sock, 64, 4)
            except OSError:
                return
            if not msg:
                for fd in fds:
                    os.close(fd)
                return
            if msg == IDLE and not fds:
                threading.Thread(target=worker.wait_idle, args=(sock, send_lock), daemon=True, name="idle").start()
                continue
            if len(msg) != KEY.size or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            dev, ino, event_fd = KEY.unpack(msg)
            with worker.lock:
                worker.busy += 1
            try:
                code = worker.handle(fds[0])
            except Exception as exc:  # never leave the supervisor waiting on a key
                _log(f"internal error: {exc!r}")
                code = errno.EIO
            if code and code not in F.DENY_ERRNOS:
                code = errno.EIO
            answered = 0
            if fan >= 0 and code == 0:
                # filled: the reader goes on now, without a round trip through the supervisor
                # (which closes the event's descriptor only once this answer is in, so its
                # number is never another event's when this is written). A failure goes through
                # the supervisor: every reader that waited on this attempt gets its errno.
                try:
                    unmark_fd(fan, fds[0])  # no more events for it
                    F.respond(fan, event_fd, F.FAN_ALLOW)
                    answered = 1
                except OSError as exc:
                    _log(f"the reader is answered by the supervisor ({exc})")
            os.close(fds[0])
            try:
                with send_lock:
                    sock.send(ANSWER.pack(dev, ino, code, answered))
            except OSError:
                pass  # the supervisor is gone: its readers were answered by the kernel or a new worker
            with worker.lock:
                worker.busy -= 1

    fillers = [threading.Thread(target=filler, daemon=True, name=f"fill-{i}") for i in range(THREADS)]
    for t in fillers:
        t.start()
    for t in fillers:
        t.join()
    worker.finishing.put(None)  # a planned stop: fills are made durable, uses written, then the end
    finishing.join()
    uses_stop.set()
    uses.join()
    stop.set()
    updater.join()


def main(argv: list[str]) -> int:
    import gc

    sock = socket.socket(fileno=int(argv[0]))
    fan = int(argv[1])  # the supervisor's fanotify group (a duplicate), to answer readers; -1: none
    worker = Worker(argv[2:])
    # what start-up made (modules, plugins) is never collected: the cyclic GC otherwise walks
    # it over and over while readers wait (a tenth of a fill's time in a profile)
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    try:
        serve(sock, worker, fan)
    except (ConnectionResetError, BrokenPipeError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
