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
import os
import queue
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from jam_core.daemon import fanotify as F
from jam_core.daemon.marks import is_jam_pid, mark_dirs
from jam_core.errors import JamError, RemoteError
from jam_core.fs import ACL_XATTR, _unpack, getxattr, removexattr, setxattr
from jam_core.root import CATALOG, Root, check_rel
from jam_core.stub import XATTR, BadStub, read_record, verify_clean

KEY = struct.Struct("=QQ")  # st_dev, st_ino
ANSWER = struct.Struct("=QQi")  # st_dev, st_ino, 0 or an errno
FILLING = "user.jam.filling"  # on a stub whose content is being written in through its fd
THREADS = 4
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
        self.catalogs = threading.local()

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
                getxattr(fd, FILLING)
                filling = True
            except OSError:
                filling = False
            if not filling and not verify_clean(fd, rec):
                return 0  # written into since it was stashed: its bytes are the user's, never fetched over
            tmp = self.fetch(root, rec)
            try:
                fill(fd, tmp, rec)
            except BaseException:
                os.close(tmp)
                raise
            # durable in the background (and the temporary file freed there: closing 5 MiB costs
            # tens of ms): the reader goes on now
            self.finishing.put((os.dup(fd), tmp))
            if rel is not None:
                self.updates.put(("filled", root, rel))
            return 0
        except FillError as exc:
            _log(str(exc))
            return exc.errno
        except OSError as exc:
            _log(f"fill failed: {exc}")
            return errno.ENOSPC if exc.errno == errno.ENOSPC else errno.EIO

    def fetch(self, root: Root, rec) -> int:
        """A descriptor of an anonymous file holding exactly the object of ``rec``, verified."""
        from jam_core.catalog import Catalog
        from jam_core.ops.checkout import _order, fetch_from

        try:
            remotes = root.remotes()
            cats = self.catalogs.__dict__
            cat = cats.get(root.path)
            if cat is None:
                cat = cats[root.path] = Catalog(root.jam_dir / CATALOG)
            known = cat.remotes_of([rec.oid])[rec.oid]
        except JamError as exc:
            raise FillError(errno.EIO, f"{root.path}: {exc}") from None
        tmpdir = root.jam_dir / "tmp"
        try:
            fd = os.open(tmpdir if tmpdir.is_dir() else root.jam_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise FillError(errno.EIO, f"{root.path}: cannot make a temporary file: {exc.strerror}") from None
        self.fetches += 1
        problems, unreachable = [], 0
        try:
            for remote in _order(remotes, known):
                os.ftruncate(fd, 0)
                want = _Want(rec, fd)
                for _w, problem in fetch_from(root, remote, [want], self.pm, self.session()):
                    if problem is None:
                        return fd
                    problems.append(problem)
                unreachable += want.unreachable
        except RemoteError as exc:
            problems.append(str(exc))
            unreachable += 1
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if not problems:
            problems.append("no remote is configured")
        raise FillError(errno.EIO, f"{rec.oid}: " + "; ".join(problems))

    # -- the catalog and uses (one thread owns the catalogs) ---------------------------------
    def updater(self, stop: threading.Event) -> None:
        from jam_core.catalog import Catalog

        while True:
            try:
                items = [self.updates.get(timeout=FLUSH_EVERY)]
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            deadline = time.monotonic() + 0.05
            while time.monotonic() < deadline:
                try:
                    items.append(self.updates.get_nowait())
                except queue.Empty:
                    break
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
                    with Catalog(root.jam_dir / CATALOG) as cat, cat.transaction():
                        for rel in filled:
                            cat.remove_stub(rel)
                        cat.record_use(list(used) + filled, now)
                except (JamError, OSError) as exc:
                    _log(f"{root.path}: catalog not updated ({exc}); the next scan corrects it")

    def record_uses(self, stop: threading.Event) -> None:
        """Opens of files in the roots (a notification group) become uses, batched."""
        try:
            fan = F.init(F.FAN_CLASS_NOTIF | F.FAN_CLOEXEC | F.FAN_UNLIMITED_MARKS,
                         os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            _log(f"opens are not recorded as use: {exc.strerror}")
            return
        for root in self.roots:
            mark_dirs(fan, str(root.path))
        jam_pids: dict[int, bool] = {}
        last_clear = time.monotonic()
        import select

        while True:
            done = stop.is_set()  # one more read after the stop: opens made before it count
            r, _, _ = select.select([fan], [], [], 0 if done else 0.5)
            if time.monotonic() - last_clear > IGNORE_FOR:
                jam_pids.clear()
                last_clear = time.monotonic()
                try:  # forget the ignore marks (and the directories' marks, made again)
                    F.mark(fan, F.FAN_MARK_FLUSH, 0)
                    for root in self.roots:
                        mark_dirs(fan, str(root.path))
                except OSError:
                    pass
            if not r:
                if done:
                    break
                continue
            try:
                buf = os.read(fan, 65536)
            except BlockingIOError:
                continue
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
        os.close(fan)


def _p(r):
    from pathlib import Path

    return Path(os.path.realpath(r))


def fill(fd: int, tmp: int, rec) -> None:
    """Write the verified content at ``tmp`` into the stub open at ``fd`` and give it the
    original's mode, ACLs and mtime. It stays marked ``user.jam`` + ``user.jam.filling`` until
    ``finish`` has made the content durable: a crash before that leaves a stub that the next
    daemon fills again, never a file that reads as zeros."""
    from jam_core.ops.checkout import _copy_fd

    st = os.fstat(fd)
    setxattr(fd, FILLING, b"1")
    _copy_fd(tmp, fd, rec.size)
    os.fchmod(fd, rec.mode)
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


def finish(fd: int) -> None:
    """Make a filled stub's content durable, then let it be a file again (xattrs removed)."""
    os.fsync(fd)
    removexattr(fd, XATTR)
    removexattr(fd, FILLING)


def finisher(q: queue.Queue) -> None:
    while True:
        item = q.get()
        if item is None:
            return
        fd, tmp = item
        try:
            finish(fd)
        except OSError as exc:
            _log(f"a filled stub was not finished ({exc}); it fills again on its next open")
        finally:
            os.close(fd)
            os.close(tmp)


def serve(sock: socket.socket, worker: Worker) -> None:
    stop, uses_stop = threading.Event(), threading.Event()
    updater = threading.Thread(target=worker.updater, args=(stop,), daemon=True, name="catalog")
    uses = threading.Thread(target=worker.record_uses, args=(uses_stop,), daemon=True, name="uses")
    finishing = threading.Thread(target=finisher, args=(worker.finishing,), daemon=True, name="finish")
    updater.start()
    uses.start()
    finishing.start()
    send_lock = threading.Lock()

    def one(key: bytes, fd: int) -> None:
        try:
            code = worker.handle(fd)
        except Exception as exc:  # never leave the supervisor waiting on a key
            _log(f"internal error: {exc!r}")
            code = errno.EIO
        finally:
            os.close(fd)
        with send_lock:
            sock.send(key + struct.pack("=i", code))

    with ThreadPoolExecutor(THREADS) as pool:
        while True:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 64, 4)
            if not msg:
                break
            if len(msg) != KEY.size or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            pool.submit(one, msg, fds[0])
    worker.finishing.put(None)  # a planned stop: fills are made durable, uses written, then the end
    finishing.join()
    uses_stop.set()
    uses.join()
    stop.set()
    updater.join()


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    worker = Worker(argv[1:])
    try:
        serve(sock, worker)
    except (ConnectionResetError, BrokenPipeError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
