"""The daemon's supervisor: holds the fanotify descriptor and does nothing else.

The kernel lets blocked readers go on (onto a stub's bytes) when the group's descriptor is
closed, so the process holding it must not die with a fetch. This one reads events, answers
jam's own opens at once (``marks.is_jam_pid``), groups the others by inode (one fetch per stub
however many readers wait), passes one event descriptor per inode to the worker process and
answers every waiting reader when the worker reports: FAN_ALLOW (the stub was filled; its mark
is removed) or FAN_DENY with the worker's errno (the stub stays a stub). If the worker dies, a
new one is started and what was in flight is sent again; a fetch that outlives ``timeout`` is
answered EAGAIN and its worker replaced. A planned stop (SIGTERM, SIGINT) removes the marks and
answers every pending event EAGAIN.

It also serves ``ROOT/.jam/daemon.sock`` (client.py): a stub made while it runs is sent here,
as a descriptor, before it is renamed into place, and marked before the answer.

And it commits each root whose config sets ``[history] auto`` when that is due
(jam_core/history/auto.py): a timer per root starts ``jam commit --auto`` as a child process, as
the root's owner when the daemon runs as root (setgid, initgroups, setuid in the child: never
as root for a user's root), one at a time per root (the commit also holds the automatic-commit
lock, so one the cd hook or cron started is never overlapped); a failure is logged in one line
and tried again one interval later.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from jam_core.daemon import fanotify as F
from jam_core.daemon.client import PID_FILE, SOCK_NAME
from jam_core.daemon.marks import AsOwner, is_jam_pid, mark_fd, mark_stubs, unmark_fd
from jam_core.daemon.worker import ANSWER, IDLE, IDLE_KEY, KEY
from jam_core.errors import JamError, UsageError
from jam_core.root import JAM_DIR

CLIENT_DEADLINE = 5.0  # seconds a client of daemon.sock has to send its descriptor
AUTO_RECHECK = 60.0  # seconds between looks at a root whose [history] auto is not set (or unreadable)
AUTO_REAP = 10.0  # seconds between checks that a running commit has not ended with its output still open
RESPAWNS = 5  # worker deaths within RESPAWN_WINDOW before waiting readers are answered EIO
RESPAWN_WINDOW = 10.0


def _log(msg: str) -> None:
    print(f"jam daemon: {msg}", file=sys.stderr, flush=True)


class Supervisor:
    def __init__(self, roots: list[Path], timeout: float = 120.0, out=None):
        self.roots = roots
        self.timeout = timeout
        self.out = out or sys.stdout
        self.fan = -1
        self.pending: dict[tuple[int, int], list[int]] = {}  # inode -> event fds waiting
        self.inflight: dict[tuple[int, int], float] = {}  # inode -> when sent to the worker
        self.worker: subprocess.Popen | None = None
        self.wsock: socket.socket | None = None
        self.deaths: list[float] = []
        self.listeners: list[socket.socket] = []
        self.clients: dict[socket.socket, float] = {}
        self.locks: list[tuple[Path, int]] = []  # (root, fd of its locked pid file)
        self.stopping = False
        self.marked = 0
        self.idle_clients: list[socket.socket] = []  # waiting for "idle" (client.wait_idle)
        self.idle_asked = False
        self.owners: dict[socket.socket, tuple[Path, int]] = {}  # listener -> (root, its owner's uid)
        self.client_root: dict[socket.socket, Path] = {}
        self.auto_next: dict[Path, float] = {}  # root -> when to look at its [history] auto (monotonic)
        self.auto_runs: dict[int, tuple[Path, subprocess.Popen, bytearray]] = {}  # output fd -> its commit
        self.auto_said: dict[Path, str] = {}  # root -> the last config problem logged (said once)

    # -- set-up ------------------------------------------------------------------------------
    def claim(self) -> None:
        """One daemon per root: an flock on ``.jam/daemon.pid`` (doctor reads it), then the socket."""
        for root in self.roots:
            # in the user's .jam, as the user (a root of a normal user: the socket is theirs,
            # 0600, and nothing planted there leads root anywhere the user could not write)
            with AsOwner(root):
                self.claim_one(root)

    def claim_one(self, root: Path) -> None:
        jd = root / JAM_DIR
        fd = os.open(jd / PID_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UsageError(f"another jam daemon (pid {other or '?'}) already serves {root}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.locks.append((root, fd))
        sp = jd / SOCK_NAME
        try:
            os.unlink(sp)  # we hold the lock: a socket there is a dead daemon's
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            s.bind(str(sp))
        finally:
            os.umask(old)
        s.listen(64)
        s.setblocking(False)
        self.listeners.append(s)
        # only the root's owner (and root) are served: SO_PEERCRED, checked per connection
        self.owners[s] = (root, os.stat(root, follow_symlinks=False).st_uid)

    def start_worker(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent.set_inheritable(False)
        child.set_inheritable(True)
        # the worker answers the readers of what it filled itself; the group lives on in this
        # process whatever happens to the worker (its death never releases a reader)
        fan = os.dup(self.fan)
        try:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "jam_core.daemon.worker", str(child.fileno()), str(fan),
                 *map(str, self.roots)],
                pass_fds=[child.fileno(), fan], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finally:
            os.close(fan)
        child.close()
        parent.setblocking(False)
        self.wsock = parent
        for key in list(self.inflight):
            self.send(key)
        self.idle_asked = False
        if self.idle_clients:
            self.ask_idle()

    def send(self, key: tuple[int, int]) -> None:
        self.inflight[key] = time.monotonic()
        try:
            fd = self.pending[key][0]
            socket.send_fds(self.wsock, [KEY.pack(*key, fd)], [fd])
        except OSError:
            pass  # the worker is dying: it is restarted and this is sent again

    # -- the loop ----------------------------------------------------------------------------
    def run(self, ready=None) -> int:
        self.fan = F.init(F.FAN_CLASS_PRE_CONTENT | F.FAN_CLOEXEC | F.FAN_NONBLOCK | F.FAN_UNLIMITED_QUEUE
                          | F.FAN_UNLIMITED_MARKS, os.O_RDWR | os.O_LARGEFILE)
        rpipe, wpipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wpipe)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        try:
            self.claim()
            self.start_worker()
            for root in self.roots:
                self.marked += mark_stubs(self.fan, str(root),
                                          on_error=lambda rel, exc: _log(f"{rel}: not walked ({exc})"))
            where = ", ".join(map(str, self.roots))
            print(f"jam daemon: serving {self.marked} stubs in {where} (pid {os.getpid()})", file=self.out,
                  flush=True)
            self.auto_next = {root: time.monotonic() for root in self.roots}
            if ready is not None:
                ready()
            import gc

            gc.collect()
            gc.freeze()  # the loop's garbage is young: never walk what start-up made
            while not self.stopping:
                self.step(rpipe)
        finally:
            self.shutdown()
            signal.set_wakeup_fd(-1)
            os.close(rpipe)
            os.close(wpipe)
        return 0

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def step(self, rpipe: int) -> None:
        wait = None
        if self.inflight:
            wait = max(0.0, min(self.inflight.values()) + self.timeout - time.monotonic())
        rlist = [self.fan, rpipe, self.wsock, *self.listeners, *self.clients, *self.auto_runs]
        if self.clients:
            cw = max(0.0, min(self.clients.values()) - time.monotonic())
            wait = cw if wait is None else min(wait, cw)
        aw = self.auto_wait()
        if aw is not None:
            wait = aw if wait is None else min(wait, aw)
        try:
            ready, _, _ = select.select(rlist, [], [], wait)
        except InterruptedError:
            return
        if rpipe in ready:
            try:
                os.read(rpipe, 512)
            except BlockingIOError:
                pass
        if self.fan in ready:
            self.read_events()
        if self.wsock in ready:
            self.read_answers()
        for s in self.listeners:
            if s in ready:
                self.accept(s)
        for fd in list(self.auto_runs):
            if fd in ready:
                self.auto_read(fd)
        now = time.monotonic()
        self.auto_tick(now)
        for c, deadline in list(self.clients.items()):
            if c in ready:
                self.serve_client(c)
            elif now > deadline:
                self.drop_client(c)
        for key, sent in list(self.inflight.items()):
            if now - sent > self.timeout:
                _log(f"a fetch took longer than {self.timeout:g} s: its readers get EAGAIN, the worker is replaced")
                self.kill_worker()
                if self.worker is not None:
                    self.worker.wait()  # it can no longer answer: the descriptors may be closed
                self.answer(key, errno.EAGAIN)

    def read_events(self) -> None:
        while True:
            try:
                buf = os.read(self.fan, 65536)
            except BlockingIOError:
                return
            if not buf:
                return
            for ev in F.parse(buf):
                self.event(ev)

    def event(self, ev: F.Event) -> None:
        if ev.mask & F.FAN_Q_OVERFLOW:
            _log("event queue overflow")
        if ev.fd < 0:
            return
        if not ev.mask & F.PERM_EVENTS:
            os.close(ev.fd)
            return
        if self.stopping:
            self.reply(ev.fd, errno.EAGAIN)
            return
        if is_jam_pid(ev.pid):  # jam looks at a stub's header: no fetch
            self.reply(ev.fd, 0)
            return
        try:
            st = os.fstat(ev.fd)
        except OSError:
            self.reply(ev.fd, errno.EIO)
            return
        key = (st.st_dev, st.st_ino)
        fds = self.pending.setdefault(key, [])
        fds.append(ev.fd)
        if len(fds) == 1:
            self.send(key)

    def reply(self, fd: int, code: int) -> None:
        if code and code not in F.DENY_ERRNOS:
            code = errno.EIO
        try:
            F.respond(self.fan, fd, F.FAN_ALLOW if code == 0 else F.deny_errno(code))
        finally:
            os.close(fd)

    def answer(self, key: tuple[int, int], code: int, answered: bool = False) -> None:
        """Answer every reader waiting on ``key``. ``answered``: the worker answered the first
        (the one it was sent) and removed the mark itself; that descriptor is only closed.
        Called only once the worker's answer is in or the worker is dead (or no event will be
        read any more): a descriptor sent to the worker is never closed, and its number never
        reused, while the worker may still answer it."""
        self.inflight.pop(key, None)
        fds = self.pending.pop(key, [])
        if answered and fds:
            os.close(fds.pop(0))
        elif code == 0 and fds:
            try:
                unmark_fd(self.fan, fds[0])  # filled: no more events for it
            except OSError as exc:
                _log(f"mark not removed: {exc}")
        for fd in fds:
            self.reply(fd, code)

    def read_answers(self) -> None:
        while True:
            try:
                msg = self.wsock.recv(64)
            except BlockingIOError:
                return
            except OSError:
                msg = b""
            if not msg:
                self.worker_died()
                return
            if len(msg) != ANSWER.size:
                continue
            dev, ino, code, answered = ANSWER.unpack(msg)
            if (dev, ino) == IDLE_KEY:
                self.idle_asked = False
                self.worker_idle()
            elif (dev, ino) in self.pending:
                self.answer((dev, ino), code, bool(answered))

    # -- idle: nothing in progress (bench and tests wait for it before they look) -------------
    def ask_idle(self) -> None:
        if self.idle_asked or self.wsock is None:
            return
        try:
            self.wsock.send(IDLE)
            self.idle_asked = True
        except OSError:
            pass  # the worker is dying: asked again when the next one starts

    def worker_idle(self) -> None:
        """The worker had nothing queued or in progress: the waiting clients are answered if
        no reader waits here either, else the worker is asked again."""
        if self.pending or self.inflight:
            self.ask_idle()
            return
        for c in self.idle_clients:
            try:
                c.send(b"idle")
            except OSError:
                pass
            c.close()
        self.idle_clients.clear()

    def kill_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.kill()

    def worker_died(self) -> None:
        self.kill_worker()
        code = self.worker.wait() if self.worker is not None else None
        self.wsock.close()
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < RESPAWN_WINDOW] + [now]
        _log(f"the worker ended (status {code}); starting another, {len(self.inflight)} fetch(es) sent again")
        if len(self.deaths) > RESPAWNS:
            _log("the worker keeps dying: waiting readers get EIO")
            for key in list(self.pending):
                self.answer(key, errno.EIO)
            self.deaths.clear()
        self.start_worker()

    # -- daemon.sock: new stubs ----------------------------------------------------------------
    def accept(self, s: socket.socket) -> None:
        while True:
            try:
                c, _ = s.accept()
            except BlockingIOError:
                return
            except OSError:
                return
            c.setblocking(False)
            root, owner = self.owners[s]
            uid = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid not in (0, os.geteuid(), owner):
                c.close()  # only the root's owner (and root) may ask
                continue
            self.clients[c] = time.monotonic() + CLIENT_DEADLINE
            self.client_root[c] = root

    def drop_client(self, c: socket.socket) -> None:
        self.clients.pop(c, None)
        self.client_root.pop(c, None)
        c.close()

    def serve_client(self, c: socket.socket) -> None:
        from jam_core.stub import BadStub, read_record

        try:
            msg, fds, _f, _a = socket.recv_fds(c, 16, 2)
        except BlockingIOError:
            return
        except OSError:
            self.drop_client(c)
            return
        if msg == IDLE and not fds:
            self.clients.pop(c, None)  # no deadline: answered when the daemon is idle
            self.client_root.pop(c, None)
            self.idle_clients.append(c)
            self.ask_idle()
            return
        answer = b"no"
        root = self.client_root.get(c)
        try:
            if msg == b"mark" and len(fds) == 1 and root is not None:
                fd = fds[0]
                try:
                    import stat

                    # only a stub of the root whose socket was used (a regular file under it)
                    inside = os.readlink(f"/proc/self/fd/{fd}").startswith(str(root).rstrip("/") + "/")
                    if inside and stat.S_ISREG(os.fstat(fd).st_mode) and read_record(fd) is not None:
                        mark_fd(self.fan, fd)
                        self.marked += 1
                        answer = b"ok"
                except (OSError, BadStub, JamError) as exc:
                    answer = f"no: {exc}".encode()[:200]
        finally:
            for fd in fds:
                os.close(fd)
        try:
            c.send(answer)
        except OSError:
            pass
        self.drop_client(c)

    # -- [history] auto: automatic commits ------------------------------------------------------
    def auto_wait(self) -> float | None:
        """Seconds until the next root is due for a look (None: no root to look at)."""
        running = {root for root, _p, _b in self.auto_runs.values()}
        due = [t for root, t in self.auto_next.items() if root not in running]
        if running:
            due.append(time.monotonic() + AUTO_REAP)
        return max(0.0, min(due) - time.monotonic()) if due else None

    def auto_tick(self, now: float) -> None:
        for fd, (_root, proc, _tail) in list(self.auto_runs.items()):
            if proc.poll() is not None:  # ended, while something it started keeps its output open
                self.auto_read(fd, ended=True)
        running = {root for root, _p, _b in self.auto_runs.values()}
        for root, due in list(self.auto_next.items()):
            if due <= now and root not in running and not self.stopping:
                self.auto_next[root] = time.monotonic() + self.auto_check(root)

    def auto_check(self, root: Path) -> float:
        """Start the root's automatic commit if it is due; returns the seconds until the next look."""
        from jam_core.history import auto
        from jam_core.root import Root

        try:
            with AsOwner(root) as owner:  # the user's config, read with the user's rights alone
                r = Root(root)
                every = auto.interval(r, r.own_config() if owner.switch else None)
                left = auto.wait_left(root / JAM_DIR, every) if every is not None else None
        except (JamError, OSError) as exc:
            said = f"{root}: [history] auto not read: {exc}"
            if self.auto_said.get(root) != said:
                _log(_one_line(said))
                self.auto_said[root] = said
            return AUTO_RECHECK
        self.auto_said.pop(root, None)
        if every is None:
            return AUTO_RECHECK
        if left:
            return left
        self.auto_start(root)
        return max(every, 1.0)

    def auto_start(self, root: Path) -> None:
        from jam_core.history import auto

        try:
            with AsOwner(root):
                auto.stamp(root / JAM_DIR)  # started now: the cd hook does not start another
            proc = subprocess.Popen(auto.command(), cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, **owner_identity(root))
        except (OSError, ValueError, subprocess.SubprocessError, JamError) as exc:
            _log(_one_line(f"{root}: automatic commit not started: {exc}; tried again in one interval"))
            return
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        self.auto_runs[fd] = (root, proc, bytearray())

    def auto_read(self, fd: int, ended: bool = False) -> None:
        """Read a running commit's output; at its end (EOF, or ``ended``) report a failure."""
        root, proc, tail = self.auto_runs[fd]
        for _ in range(64):  # a bounded share of the loop: readers of stubs come first
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data:
                tail += data
                del tail[:-4096]  # only the end is reported
                continue
            if data is None and not ended:
                return
            break
        else:
            return  # more to read: the next turn of the loop
        del self.auto_runs[fd]
        proc.stdout.close()
        code = proc.wait()
        if code != 0:
            lines = [ln for ln in bytes(tail).decode(errors="replace").splitlines() if ln.strip()]
            why = lines[-1] if lines else "no output"
            _log(_one_line(f"{root}: automatic commit failed (exit {code}): {why}; tried again in one interval"))

    def auto_stop(self) -> None:
        """A planned stop: the running commits are ended (a commit killed at any instant loses
        nothing; the next one completes)."""
        for fd, (_root, proc, _tail) in list(self.auto_runs.items()):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            del self.auto_runs[fd]

    # -- stopping ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        self.auto_stop()
        if self.fan >= 0:
            try:
                F.mark(self.fan, F.FAN_MARK_FLUSH, 0)  # no new events: readers see the stubs' headers
            except OSError:
                pass
            self.stopping = True
            try:
                self.read_events()  # what was already queued
            except OSError:
                pass
            for key in list(self.pending):
                self.answer(key, errno.EAGAIN)
        if self.wsock is not None:
            self.wsock.close()
        if self.worker is not None:
            try:
                self.worker.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        for c in list(self.clients):
            self.drop_client(c)
        for c in self.idle_clients:
            c.close()
        self.idle_clients.clear()
        for s in self.listeners:
            try:
                os.unlink(s.getsockname())
            except OSError:
                pass
            s.close()
        for root, fd in self.locks:
            try:
                os.unlink(root / JAM_DIR / PID_FILE)
            except OSError:
                pass
            os.close(fd)
        self.locks.clear()
        if self.fan >= 0:
            os.close(self.fan)
            self.fan = -1


def _one_line(text: str) -> str:
    """A log line: no control characters (a config or a commit's output is the user's), at most 400."""
    clean = "".join(ch if ch.isprintable() else " " for ch in text)
    return clean if len(clean) <= 400 else clean[:399] + "…"


def owner_identity(root: Path) -> dict:
    """``subprocess.Popen`` arguments that run a child as the root's owner when this process is
    root and the root is not root's: that user's uid, primary gid and groups (initgroups), and
    an environment with that user's HOME, USER and LOGNAME (root's XDG directories dropped).
    Empty when nothing changes."""
    import pwd

    st = os.stat(root, follow_symlinks=False)
    if os.geteuid() != 0 or st.st_uid == 0:
        return {}
    try:
        pw = pwd.getpwuid(st.st_uid)
        gid, groups, home, name = pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid), pw.pw_dir, pw.pw_name
    except KeyError:  # a uid with no passwd entry: its own uid and the root's group, no others
        gid, groups, home, name = st.st_gid, [], "/", str(st.st_uid)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XDG_", "SUDO_")) and k not in ("HOME", "USER", "LOGNAME", "MAIL")}
    env.update(HOME=home, USER=name, LOGNAME=name)
    return {"user": st.st_uid, "group": gid, "extra_groups": groups, "env": env}
