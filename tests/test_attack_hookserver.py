"""R7: an attacker's review of the cd hook's warm server (jam_core/cli/hook_server.py).

Real processes only: the server is started as spawn() starts it, the client is the hook's
bootstrap (``python -I -S -c ... v.start(KEY)``), faults are real process attributes, signals,
descriptors and files. Which side answered a fetch is read from $JAM_DEBUG_MODULES (the server's
child carries the server's ``socket`` module, a cold fetch never imports it). Every server a test
starts is killed at its end (the ones the tests start themselves, and any holder of a key's lock).

Holes found (each test failed before its fix; fixed in 03e7018, d42ef72, 9eb9d99, d8b4ecf): the child
inherited the first shell's rlimits (ulimit -f: every later fetch EFBIG), LD_PRELOAD (eatmydata:
every later fetch undurable), nice value, capabilities (a confined root shell got a fetch written
with all of them); JAM_DEBUG=1's traceback was lost; Ctrl-C outside the fetch's handler exited 1
(the hook turned itself off); the client's connect() had no timeout (a stopped server with a full
backlog hung the cd for ever); the shell's descriptors travelled before the server took the
request (a stopped server held the shell's stdout after the hook exited); a stale server dropped a
newer protocol's request before its staleness check and lived on; a shared library replaced under
the server was not noticed; a socket path over 107 bytes killed every server in bind(); a
client's claimed hard limits and nice value were believed; an upgrade during the server's imports
was served for ever; a stopped server cost ANSWER seconds on every cd; an upgrade between the
server's first imports (the spawn code's own) and serve() was served for ever (fixed since: a
server's start is its process's, read from /proc/self/stat).
"""

from __future__ import annotations

import hashlib
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import make_file
from tests.safety_support import held_fds
from tests.test_hook_server import hook_server_file, settled


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stash(root, names: list[str], size: int = 70_000) -> dict:
    """(Re)make ``names`` as files of ``size`` bytes and stash them; their digests."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash

    out = {}
    for i, rel in enumerate(sorted(names)):
        path = root.path / rel
        if not path.exists() or path.read_bytes()[:13] != b"# jam stub v1":
            make_file(path, size + i, seed=i)
        out[rel] = _digest(path.read_bytes())
    assert len(stash(root, sorted(out), make_plugin_manager()).done) == len(out)
    return out


def _back(root, content: dict) -> bool:
    return all(_digest((root.path / rel).read_bytes()) == d for rel, d in content.items())


def _stubs(root, content: dict) -> bool:
    return all((root.path / rel).read_bytes()[:13] == b"# jam stub v1" for rel in content)


# The code the servers and clients run (None: this checkout's, from boot_paths()); a runner may
# point it at a copy of jam_core and jam_dir to check that each test fails without its guard.
CODE_PATHS: list[str] | None = None

def _control(warm, root, **kw) -> None:
    """A client the server must answer (its own conditions): a small stub in ctl/ comes back
    through the server's child. Keeps a test of what goes cold from passing on a server that
    answers nobody."""
    ctl = _stash(root, ["ctl/c"], size=1000)
    res = warm.fetch(root.path / "ctl", **kw)
    assert res.returncode == 0 and "fetched 1 file" in res.stderr and _back(root, ctl), res.stderr
    assert warm.served(), "the server answered not even a client like itself"


SERVER = (
    "import sys\nsys.path[:]=sys.argv[3:]\nimport jam_core.cli.hook_server as v\n"
    "if v.__file__==sys.argv[2]:v.serve(sys.argv[1])\n"
)


class Warm:
    """One test's key, private run directory and code paths; starts servers, runs clients, and
    kills every server of its run directory at the end."""

    def __init__(self, tmp_path: Path):
        import tempfile

        from jam_core.cli.hook import boot_paths

        self.tmp = tmp_path
        self.key = uuid.uuid4().hex[:20]  # what the bootstrap holds (start() may add its tag)
        self.run = Path(tempfile.mkdtemp(prefix="r7", dir="/tmp"))  # short: a socket's path has 107 bytes
        self.paths = CODE_PATHS or boot_paths()
        self.env = dict(
            os.environ, XDG_RUNTIME_DIR=str(self.run), JAM_DEBUG_MODULES=str(tmp_path / "modules"), JAM_BACKGROUND="0"
        )
        for name in ("PYTHONPATH", "JAM_HOOK_SERVER", "LD_PRELOAD", "LD_LIBRARY_PATH"):
            self.env.pop(name, None)
        self.procs: list[subprocess.Popen] = []

    @property
    def full(self) -> str:
        """The server's key: start() adds the tag of the client's powers (the test's own) when the
        code in use has one."""
        if getattr(self, "_full", None) is None:
            self._full = self.key
            if "def _tag(" in Path(self.file).read_text():
                code = f"import sys\nsys.path[:]={self.paths!r}\nimport jam_core.cli.hook_server as v\nprint(v._tag())"
                tag = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
                self._full = f"{self.key}-{tag.stdout.strip()}"
        return self._full

    @property
    def file(self) -> str:
        return hook_server_file(self.paths)

    @property
    def dir(self) -> Path:
        return self.run / f"jam-{os.geteuid()}"

    def socket(self) -> Path:
        """The key's socket (its name may carry a tag after the key)."""
        found = sorted(self.dir.glob(f"hook-{self.key}*.sock")) if self.dir.is_dir() else []
        return found[0] if found else self.dir / f"hook-{self.key}.sock"

    def serve(self, preexec_fn=None, ready: bool = True, **env) -> subprocess.Popen:
        """A server, as spawn() starts it, once it listens (``ready`` False: or has left)."""
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", SERVER, self.full, self.file, *self.paths],
            env=dict(self.env, **env),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=preexec_fn,
        )
        self.procs.append(proc)
        said = proc.stdout.readline()
        assert said == b"ready\n" or not ready and not said, "the server did not start"
        return proc

    def boot(self, before: str = "") -> str:
        """The hook's bootstrap (``before``: lines run first, e.g. a shorter ANSWER)."""
        return (
            f"import sys\nsys.path+={self.paths!r}\nimport jam_core.cli.hook_server as v\n"
            f"assert v.__file__=={self.file!r}\n{before}v.start({self.key!r})\n"
        )

    def command(self, directory: Path, before: str = "") -> list[str]:
        return [sys.executable, "-I", "-S", "-c", self.boot(before), "hook-fetch", "--", str(directory)]

    def fetch(self, directory: Path, cwd=None, preexec_fn=None, before: str = "", **env):
        (self.tmp / "modules").unlink(missing_ok=True)
        return subprocess.run(
            self.command(directory, before),
            env=dict(self.env, **env),
            cwd=cwd or directory,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=preexec_fn,
            stdin=subprocess.DEVNULL,
        )

    def runs(self) -> list[bool]:
        """For each hook-fetch since the last fetch(): True if a server's child ran it."""
        text = (self.tmp / "modules").read_text() if (self.tmp / "modules").exists() else ""
        # each run appends its sorted module list: a run ends where the names stop ascending
        out, names, prev = [], [], ""
        for name in text.split():
            if names and name < prev:
                out.append("socket" in names)
                names = []
            names.append(name)
            prev = name
        if names:
            out.append("socket" in names)
        return out

    def served(self) -> bool:
        return self.runs() == [True]

    def holder(self) -> int | None:
        """The pid holding this key's lock (from /proc/locks), if any."""
        locks = sorted(self.dir.glob(f"hook-{self.key}*.sock.lock")) if self.dir.is_dir() else []
        inos = set()
        for lock in locks:
            try:
                inos.add(lock.stat().st_ino)
            except OSError:
                pass
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and int(parts[5].rsplit(":", 1)[1]) in inos:
                return int(parts[4])
        return None

    def wait_holder(self) -> int:
        for _ in range(3000):
            pid = self.holder()
            if pid:
                return pid
            select.select([], [], [], 0.01)  # a deadline of 30 s, not a synchronisation
        raise AssertionError("no server took the lock")

    def wait_listening(self) -> None:
        for _ in range(3000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(str(self.socket()))  # asked again each time: its name is known once it exists
                return
            except OSError:
                pass
            finally:
                s.close()
            select.select([], [], [], 0.01)  # a deadline of 30 s, not a synchronisation
        raise AssertionError("the server never listened")

    def holders(self) -> list[int]:
        """Every pid holding a lock of this key, here or in /tmp/jam-UID (a fallback)."""
        inos = set()
        for d in (self.dir, Path(f"/tmp/jam-{os.geteuid()}")):
            for lock in sorted(d.glob(f"hook-{self.key}*.sock.lock")) if d.is_dir() else []:
                try:
                    inos.add(lock.stat().st_ino)
                except OSError:
                    pass
        out = []
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and int(parts[5].rsplit(":", 1)[1]) in inos:
                out.append(int(parts[4]))
        return out

    def close(self) -> None:
        # A server a cold fetch spawned may start only now: a run directory others could reach
        # makes it leave at once (it falls back to /tmp only when $XDG_RUNTIME_DIR itself is unfit).
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.dir.chmod(0o755)
        for pid in self.holders():
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait(timeout=30)
            if proc.stdout:
                proc.stdout.close()
        for f in self.dir.iterdir():  # the directories stay (see above), their files go
            try:
                f.unlink()
            except OSError:
                pass


@pytest.fixture
def warm(tmp_path):
    w = Warm(tmp_path)
    yield w
    w.close()


@pytest.fixture
def tree(jam_root):
    """A root with 3 stubs of ~70 KB in data/ (and the digests of their content)."""
    return jam_root, _stash(jam_root, [f"data/f{i}" for i in range(3)])


# 1. The child is not a cold start: what a process inherits from its parent is the server's.


def test_a_file_size_limit_of_the_first_shell_is_not_every_later_fetch_s(tree, warm):
    """The server was spawned by a fetch in a shell that had run ``ulimit -f 60`` (60 KB);
    rlimits are inherited by fork, not sent with the request: for as long as the server lives,
    every fetch of a file over 60 KB, from any shell (here: no limit), fails (EFBIG) and the
    files stay stubs, where a cold start fetches them."""
    root, content = tree

    def small():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    warm.serve(preexec_fn=small)
    _control(warm, root, preexec_fn=small)
    res = warm.fetch(root.path / "data")
    assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr


EATMYDATA = r"""
#include <fcntl.h>
#include <unistd.h>
static void mark(void) {
    int fd = open(MARK, O_WRONLY | O_APPEND | O_CREAT, 0600);
    if (fd >= 0) { write(fd, "x", 1); close(fd); }
}
int fsync(int fd) { mark(); return 0; }
int fdatasync(int fd) { mark(); return 0; }
int syncfs(int fd) { mark(); return 0; }
void sync(void) { mark(); }
"""


def _eatmydata(tmp_path: Path, note: str = "x", name: str = "libeat.so") -> tuple[str, Path]:
    """A preload library that turns every sync into a no-op (as eatmydata does) and writes
    ``note`` in a file at each call; (the library, the file)."""
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    mark = tmp_path / "synced"
    src = tmp_path / "eat.c"
    src.write_text(EATMYDATA.replace('"x", 1', f'"{note}", 1'))
    lib = tmp_path / name
    subprocess.run([cc, "-shared", "-fPIC", f'-DMARK="{mark}"', "-o", str(lib), str(src)], check=True)
    return str(lib), mark


@pytest.fixture
def eatmydata(tmp_path):
    """The preload library, built before the tree (a server does not serve while a file it maps
    is younger than its own start: the library must be older than the server)."""
    return _eatmydata(tmp_path)


def test_the_first_shell_s_preload_does_not_make_every_later_fetch_undurable(eatmydata, tree, warm):
    """The first cd happened under ``eatmydata`` (LD_PRELOAD: fsync and syncfs do nothing); the
    server it spawned keeps that library for its whole life, so a later fetch from a shell
    without it swaps the stubs out with content never made durable (a crash then leaves empty
    files where the stubs were: the silent zeros of invariant 4). A cold start syncs."""
    root, content = tree
    lib, mark = eatmydata
    warm.serve(LD_PRELOAD=lib)
    _control(warm, root, LD_PRELOAD=lib)
    mark.unlink()
    res = warm.fetch(root.path / "data")
    assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
    assert not mark.exists(), "the fetch's syncs went to the first shell's preload library (no-ops)"


def test_jam_debug_shows_the_traceback_through_the_server_too(tree, warm):
    """JAM_DEBUG=1 is how a user shows where jam broke (here: ROOT/.jam/lock is a directory, an
    OSError the fetch re-raises under JAM_DEBUG): a cold start prints the traceback. The server's
    child said nothing: the exception left _child, and _serve_one's ``finally: os._exit(1)`` ended
    the child without the interpreter's report."""
    root, content = tree
    lock = root.path / ".jam" / "lock"
    lock.unlink()
    lock.mkdir()
    cold = warm.fetch(root.path / "data", JAM_DEBUG="1", JAM_HOOK_SERVER="0")
    assert cold.returncode == 1 and "Traceback" in cold.stderr and "IsADirectoryError" in cold.stderr, cold.stderr
    warm.serve()
    res = warm.fetch(root.path / "data", JAM_DEBUG="1")
    assert warm.served()
    assert res.returncode == 1 and "IsADirectoryError" in res.stderr, res.stderr
    assert _stubs(root, content)



# 3. The socket: a server that does not answer.


def _reap(client: subprocess.Popen) -> None:
    """End a client a test started (killed if it still runs) and close its stderr pipe."""
    if client.poll() is None:
        client.kill()
    client.wait(timeout=30)
    client.stderr.close()


def _state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    for _ in range(3000):
        if _state(pid) in "tT":
            return
        select.select([], [], [], 0.01)  # a deadline of 30 s, not a synchronisation
    raise AssertionError("the server did not stop")


def _in_connect(pid: int) -> bool:
    """The process sleeps in connect(2) (x86_64: syscall 42)."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == "42" and _state(pid) == "S"
    except (OSError, IndexError):
        return False


def test_a_stopped_server_with_a_full_backlog_does_not_hang_the_hook(tree, warm):
    """The server is stopped (SIGSTOP, a debugger, a frozen cgroup) and 64 connections wait in
    its backlog (earlier cds: each client gave up after ANSWER seconds, but a connection nobody
    accepted stays queued). The next client's blocking connect() then waits for ever: the cd
    never returns. ask() sets its timeout only after connect(): with it set before, connect()
    fails at once (EAGAIN) and the fetch runs cold."""
    if os.uname().machine != "x86_64":
        pytest.skip("reads the syscall number of x86_64")
    root, content = tree
    server = warm.serve()
    _stop(server.pid)
    queued = []
    try:
        for _ in range(1000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.setblocking(False)
            queued.append(s)
            try:
                s.connect(str(warm.socket()))
            except BlockingIOError:
                break
        else:
            raise AssertionError("the backlog never filled")
        client = subprocess.Popen(
            warm.command(root.path / "data"), env=warm.env, cwd=root.path / "data",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            hung = False
            for _ in range(6000):  # 60 s at most, a deadline
                if client.poll() is not None:
                    break
                if _in_connect(client.pid):
                    hung = True
                    break
                select.select([], [], [], 0.01)
            assert not hung, "the hook waits for ever in connect()"
            assert client.wait(timeout=60) == 0
            err = client.stderr.read().decode()
            assert "fetched 3 files" in err and _back(root, content), err
        finally:
            if client.poll() is None:
                client.kill()
            client.wait(timeout=30)
            client.stderr.close()
    finally:
        for s in queued:
            s.close()



def _wait_for(pid: int, syscalls: set[str]) -> str:
    """Wait (60 s at most) until ``pid`` has exited ("exited") or sleeps in one of ``syscalls``
    (x86_64 numbers); which."""
    for _ in range(6000):
        try:
            state = _state(pid)
            call = Path(f"/proc/{pid}/syscall").read_text().split()[0]
        except (OSError, IndexError):
            return "exited"
        if state in "ZX":
            return "exited"
        if state == "S" and call in syscalls:
            return call
        select.select([], [], [], 0.01)  # a deadline, not a synchronisation
    raise AssertionError(f"process {pid} neither exited nor waited")


POLL, RECVFROM, ACCEPT4 = "7", "45", "288"




def _fetch_to_file(warm, directory: Path, before: str = "") -> tuple[int, str]:
    """A fetch whose output goes to a file, not a pipe (a request a stopped server never took
    may hold its descriptors: test_a_request_the_stopped_server_never_took...); (code, output)."""
    log = warm.tmp / "output"
    (warm.tmp / "modules").unlink(missing_ok=True)
    with open(log, "wb") as f:
        code = subprocess.run(warm.command(directory, before), env=warm.env, cwd=directory,
                              stdin=subprocess.DEVNULL, stdout=f, stderr=f, timeout=120).returncode
    return code, log.read_text()

def test_a_stopped_server_costs_one_slow_cd_not_every_cd(tree, warm):
    """The server is stopped (SIGSTOP, a frozen cgroup): the first cd waits ANSWER seconds (10)
    for it, then fetches cold, and its spawn() cannot replace it (the stopped server holds the
    key's lock). Every later cd waits the same 10 s again, silently, for as long as the server
    stays stopped. A client that gave up on the server should get it out of the way (it is the
    user's own process, its pid is in the lock file: kill it, or unlink its socket) so that the
    next cd goes cold at once or to a new server. Seen without timing: the second client is
    caught waiting for the stopped server's answer. (Failed before d8b4ecf; guard, mutation-checked:
    ask()'s _give_up, which unlinks the socket of a server that did not answer.)"""
    if os.uname().machine != "x86_64":
        pytest.skip("reads the syscall number of x86_64")
    root, content = tree
    server = warm.serve()
    _stop(server.pid)
    code, err = _fetch_to_file(warm, root.path / "data", before="v.ANSWER=0.5\n")  # the first cd, shortened
    assert code == 0 and "fetched 3 files" in err and _back(root, content), err
    content = _stash(root, list(content))
    client = subprocess.Popen(
        warm.command(root.path / "data", before="v.ANSWER=600.0\n"), env=warm.env, cwd=root.path / "data",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        waits = _wait_for(client.pid, {POLL, RECVFROM})
        assert waits == "exited", "the next cd waits for the stopped server again"
        assert client.wait(timeout=60) == 0 and _back(root, content)
    finally:
        _reap(client)


def test_a_server_killed_with_the_request_queued_lets_the_fetch_run_cold_at_once(tree, warm):
    """The server dies (SIGKILL: the OOM killer, a logout) while a request waits in its backlog:
    the client sees the connection end before any child began, runs the fetch cold at once (not
    after ANSWER seconds), and exits 0 (any other code turns the hook off in that shell).
    Guard (mutation-checked): ask()'s ``return None if not child[0] else 1`` on an empty reply."""
    if os.uname().machine != "x86_64":
        pytest.skip("reads the syscall number of x86_64")
    root, content = tree
    server = warm.serve()
    _stop(server.pid)
    client = subprocess.Popen(
        warm.command(root.path / "data", before="v.ANSWER=600.0\n"), env=warm.env, cwd=root.path / "data",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        assert _wait_for(client.pid, {POLL, RECVFROM}) != "exited"  # the request is sent, the client waits
        server.kill()
        server.wait(timeout=30)
        assert client.wait(timeout=60) == 0
        err = client.stderr.read().decode()
        assert "fetched 3 files" in err and _back(root, content), err
    finally:
        _reap(client)


def test_a_client_that_never_sends_does_not_take_the_server(tree, warm):
    """A connection that sends nothing (a client stopped by Ctrl-Z between its connect and its
    send, a stray tool): the server gives it a second and answers the next client, which is
    served warm. Guard (mutation-checked): _serve_one's ``conn.settimeout(1.0)`` (without it the
    server waits for ever and every later fetch runs cold after ANSWER seconds)."""
    root, content = tree
    warm.serve()
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        mute.connect(str(warm.socket()))
        res = warm.fetch(root.path / "data")
        assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
        assert warm.served(), "a silent connection kept the server from answering"
    finally:
        mute.close()


def test_a_huge_environment_runs_cold_and_fetches(tree, warm):
    """An environment of 300 KB does not fit in one message of the socket (EMSGSIZE): the fetch
    runs cold and works, with no traceback. Guard (mutation-checked): ask()'s ``except OSError:
    return None`` around sendmsg."""
    root, content = tree
    warm.serve()
    big = {f"JAM_R7_BIG{i}": "x" * 100_000 for i in range(3)}
    res = warm.fetch(root.path / "data", **big)
    assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
    assert "Traceback" not in res.stderr
    assert warm.runs() == [False]




def test_a_fifo_left_at_the_socket_s_name_is_replaced_by_the_next_server(tree, warm):
    """A dead server's name (SIGKILL leaves its socket) with a FIFO put in its place: the next
    fetch does not hang on it (connect() is refused), runs cold, and the server it spawns takes
    the name back, so the fetch after is warm. Guard (mutation-checked): serve()'s unlink of
    whatever is at the socket's name once it holds the key's lock."""
    root, content = tree
    res = warm.fetch(root.path / "data")
    assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
    pid = warm.wait_holder()
    warm.wait_listening()
    name = warm.socket()
    os.kill(pid, signal.SIGKILL)
    for _ in range(3000):  # its lock released (30 s at most)
        if warm.holder() is None:
            break
        select.select([], [], [], 0.01)  # a deadline, not a synchronisation
    name.unlink()
    os.mkfifo(name)
    content = _stash(root, list(content))
    res = warm.fetch(root.path / "data")
    assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
    assert warm.runs() == [False]
    warm.wait_holder()
    warm.wait_listening()
    content = _stash(root, list(content))
    res = warm.fetch(root.path / "data")
    assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
    assert warm.served(), "the FIFO kept every later fetch cold"


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_request_the_stopped_server_never_took_does_not_hold_the_shell_s_stderr(tree, warm):
    """The server is stopped; the client gives up after ANSWER seconds and fetches cold. But its
    stdin, stdout and stderr went with the request, which waits in the server's backlog: the
    kernel holds them there, so a reader of the hook's output (``x=$(zsh -ic 'cd DIR' 2>&1)``,
    a CI log, a terminal multiplexer's pipe) waits for an end that comes only when the server
    wakes or dies, though the hook has exited. The descriptors should go only to a server that
    accepted the connection (it says so first)."""
    root, content = tree
    server = warm.serve()
    _stop(server.pid)
    r, w = os.pipe()
    try:
        client = subprocess.Popen(
            warm.command(root.path / "data", before="v.ANSWER=0.5\n"), env=warm.env, cwd=root.path / "data",
            stdin=subprocess.DEVNULL, stdout=w, stderr=w,
        )
        os.close(w)
        w = -1
        assert client.wait(timeout=60) == 0
        out = b""
        while _readable(r):
            part = os.read(r, 65536)
            if not part:
                break
            out += part
        else:
            raise AssertionError(f"the hook exited, its output has no end yet (held by the stopped server): {out!r}")
        assert b"fetched 3 files" in out and _back(root, content), out
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_a_request_whose_client_left_is_not_run_when_the_server_wakes(tree, warm):
    """The server was stopped (or too slow: a loaded machine) and the client gave up after
    ANSWER seconds and fetched cold. When the server wakes, it takes the request from its backlog
    and forks a child for a client long gone; that child must not fetch (a second fetch, its lines
    on the terminal after the prompt, and here the files the user stashed meanwhile back again).
    Guards: the server's ``R`` comes before the client sends its request (since d42ef72: a client
    that left never sent one); before that, the child's ``conn.send(b"P...")`` before the fetch,
    which fails (EPIPE) when the client has left (mutation-checked then)."""
    root, content = tree
    server = warm.serve(JAM_HOOK_SERVER_IDLE="2")
    _stop(server.pid)
    code, err = _fetch_to_file(warm, root.path / "data", before="v.ANSWER=0.5\n")
    assert code == 0 and "fetched 3 files" in err and _back(root, content), err
    assert warm.runs() == [False]
    content = _stash(root, list(content))  # the user stashes them again meanwhile
    os.kill(server.pid, signal.SIGCONT)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:  # answered in turn, after the old request (if the client left the socket in place)
        probe.connect(str(warm.socket()))
        probe.settimeout(60)
        probe.recv(64)
    except OSError:  # the client that gave up took the socket away: the server leaves once it sees that
        assert server.wait(timeout=60) == 0
    finally:
        probe.close()
    for _ in range(6000):  # a child it forked for the old request: its end (60 s at most)
        try:
            if not Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split():
                break
        except OSError:  # the server has left
            break
        select.select([], [], [], 0.01)  # a deadline, not a synchronisation
    assert warm.runs() == [False], "the server ran a request whose client had left"
    assert _stubs(root, content), "files the user stashed after that cd came back"


# 2. Staleness.


def _copy_code(warm: Warm) -> Path:
    """A copy of the jam_core and jam_dir ``warm`` runs (an installation the test may upgrade);
    ``warm`` now runs the copy. The copy's top directory."""
    import shutil

    code = warm.tmp / "code"
    ignore = shutil.ignore_patterns("__pycache__")
    core = Path(warm.file).parent.parent.parent
    for p in warm.paths:
        if (Path(p) / "jam_dir" / "__init__.py").is_file():
            shutil.copytree(Path(p) / "jam_dir", code / "jam_dir", ignore=ignore)
            break
    shutil.copytree(core / "jam_core", code / "jam_core", ignore=ignore)
    keep = [p for p in warm.paths if not (Path(p) / "jam_core").is_dir() and not (Path(p) / "jam_dir").is_dir()]
    warm.paths = keep + [str(code)]
    return settled(code)


def _upgrade(path: Path) -> None:
    """An upgrade of one module: the same text, a new file (pip writes each file anew)."""
    data = path.read_bytes()
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    st = path.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.replace(tmp, path)


def _raw_request(warm: Warm, magic: bytes) -> bytes:
    """Send the server a request of another protocol (``magic``), as a newer jam's hook would;
    what it answers before it closes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    null = os.open(os.devnull, os.O_RDWR)
    try:
        s.settimeout(60)
        s.connect(str(warm.socket()))
        socket.send_fds(s, [b"\0".join([magic, b"utf-8", b"/", b"18", b"1", b"hook-fetch"])], [null] * 3)
        out = b""
        while True:
            try:
                part = s.recv(64)
            except ConnectionResetError:  # it closed with our request unread
                return out
            if not part:
                return out
            out += part
    finally:
        os.close(null)
        s.close()


def test_a_stale_server_that_cannot_read_a_newer_hook_s_request_leaves(tree, warm):
    """jam upgraded in place (same interpreter and paths: the same key), its hook speaking a new
    protocol (MAGIC ``jam-hook-2``). The old server drops such a request before it looks at its
    own code (the magic is checked before the stamps), and each request resets its idle time: it
    lives on as long as cds come, holds the key's lock so the new jam's server never starts, and
    every fetch runs cold. A server whose code changed must leave whatever the request."""
    if os.uname().machine != "x86_64":
        pytest.skip("reads the syscall number of x86_64")
    code = _copy_code(warm)
    server = warm.serve()
    _upgrade(code / "jam_core" / "units.py")
    assert _raw_request(warm, b"jam-hook-2") in (b"", b"S")
    assert _wait_for(server.pid, {POLL, ACCEPT4}) == "exited", "the stale server waits for the next request"


@pytest.fixture
def eatmydata_1(tmp_path):
    """A preload library that notes "1", built before the tree (see ``eatmydata``)."""
    return _eatmydata(tmp_path, note="1")


def test_a_shared_library_upgraded_under_the_server_makes_it_stale(eatmydata_1, tree, warm, tmp_path):
    """A shared library the server has mapped is upgraded on disk (apt replacing libsqlite3,
    libssl or libc with a security fix; here a library every shell of the user preloads, in the
    same environment for server and client): the server's stamps cover the interpreter and each
    module's file, not the libraries, so its children keep running the old one for as long as
    cds keep the server alive, where a cold start loads the new one. (Failed before d42ef72;
    guard, mutation-checked: _stamps() reads /proc/self/maps.)"""
    root, content = tree
    lib, mark = eatmydata_1
    warm.serve(LD_PRELOAD=lib)
    _control(warm, root, LD_PRELOAD=lib)
    mark.unlink()
    new, _ = _eatmydata(tmp_path, note="2", name="libeat.new.so")
    os.replace(new, lib)  # as a package manager installs a file: a new inode under the old name
    res = warm.fetch(root.path / "data", LD_PRELOAD=lib)
    assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
    assert "1" not in mark.read_text(), "the fetch ran the library the upgrade replaced"
    assert "2" in mark.read_text()


OPENAT = "257"


def test_ctrl_c_outside_the_fetch_s_own_handler_does_not_turn_the_hook_off(tree, warm, tmp_path):
    """Ctrl-C that reaches the child where run_hook_fetch does not catch it (here: while it
    appends to $JAM_DEBUG_MODULES, a FIFO nobody reads, the instant made to last; in life the
    moments around the fetch). A cold start dies of the SIGINT, which the shell sees as 130, a
    code the hook takes calmly; the child reports 1, and on any code but 0, 121 and 130 the hook
    says "hook-fetch failed" and turns itself off in that shell. (Failed before d42ef72; guard,
    mutation-checked: _child's ``except KeyboardInterrupt: code = 130``.)"""
    if os.uname().machine != "x86_64":
        pytest.skip("reads the syscall number of x86_64")
    root, content = tree
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    server = warm.serve()
    client = subprocess.Popen(
        warm.command(root.path / "data"), env=dict(warm.env, JAM_DEBUG_MODULES=str(fifo)), cwd=root.path / "data",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        child = None
        for _ in range(6000):  # the server's child, once it waits to open the FIFO (60 s at most)
            kids = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
            if kids and _wait_for(int(kids[0]), {OPENAT, POLL, RECVFROM}) == OPENAT:
                child = int(kids[0])
                break
            select.select([], [], [], 0.01)  # a deadline, not a synchronisation
        assert child, "the child never reached the FIFO"
        client.send_signal(signal.SIGINT)  # the shell's Ctrl-C: the client forwards it
        code = client.wait(timeout=60)
        err = client.stderr.read().decode()
        assert _back(root, content), err  # fetched before
        assert code in (130, -signal.SIGINT), (code, err)
    finally:
        _reap(client)


def test_a_client_without_capabilities_gets_no_fetch_with_them(tree, warm):
    """A root shell confined by its capability bounding set (here: no CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH, CAP_FOWNER, as a systemd unit's CapabilityBoundingSet= or a container
    leaves it) cds into a directory it may not write (mode 555). A cold start cannot fetch
    there (EACCES) and says so; the server's child, forked from a process with every
    capability, writes there for it: the peer's uid is checked, not what the peer may do
    (the same holds for supplementary groups, no_new_privs, seccomp, namespaces, cgroups).
    (Failed before d42ef72; guards, mutation-checked together: the socket name's _tag() of the
    client's powers, and _serve_one's ``_powers(pid) != _POWERS[0]``; either one suffices.)"""
    import shutil

    if os.geteuid() != 0:
        pytest.skip("needs root")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("no setpriv")
    root, content = tree
    data = root.path / "data"
    confine = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    data.chmod(0o555)
    try:
        cold = subprocess.run(confine + warm.command(data), env=dict(warm.env, JAM_HOOK_SERVER="0"), cwd=data,
                              capture_output=True, text=True, timeout=120)
        assert "fetched" not in cold.stderr and _stubs(root, content), cold.stderr
        warm.serve()
        _control(warm, root)
        res = subprocess.run(confine + warm.command(data), env=warm.env, cwd=data,
                             capture_output=True, text=True, timeout=120)
        assert "fetched" not in res.stderr and _stubs(root, content), "the server fetched where its client may not write"
    finally:
        data.chmod(0o755)


def test_a_client_cannot_shed_its_hard_limits_by_claiming_others(tree, warm):
    """A process under a hard file-size limit it cannot raise (an admin's pam_limits or a unit's
    LimitFSIZE=) is its own client: it sends a request that claims no limits (here it replaces
    resource.getrlimit in itself). The child sets the claimed limits, which the server's own hard
    limits allow, and writes the 70 KB files the process could not. What the peer may do must be
    read from the kernel (resource.prlimit(peer pid), /proc/PID/status), not from the request.
    (Failed before d8b4ecf; guard, mutation-checked: _take_process's ``resource.prlimit(pid, n)``.)"""
    root, content = tree

    def confined():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    warm.serve()
    _control(warm, root)
    lie = ("import resource\nresource.getrlimit=lambda n,real=resource.getrlimit:"
           "(resource.RLIM_INFINITY,)*2 if n==resource.RLIMIT_FSIZE else real(n)\n")
    res = warm.fetch(root.path / "data", preexec_fn=confined, before=lie)
    assert "fetched" not in res.stderr and _stubs(root, content), "the child wrote past its client's hard limit"



def _upgrade_code(up: int, target: str, old: str, new: str) -> str:
    """Code that, put at the end of a module of the copy, upgrades ``target`` (a path below the
    copy's top, ``up`` directories above that module) once, in the first process that imports the
    module (the server): ``old`` replaced by ``new``, written aside and renamed in as pip does."""
    return f"""
import os as _os
_top = _os.path.abspath(__file__)
for _ in range({up}):
    _top = _os.path.dirname(_top)
_mark = _os.path.join(_top, "upgraded")
if not _os.path.exists(_mark):  # once: the first importer is the server (started first)
    open(_mark, "w").close()
    _file = _os.path.join(_top, {target!r})
    with open(_file, encoding="utf-8") as _f:
        _text = _f.read().replace({old!r}, {new!r})
    with open(_file + ".new", "w", encoding="utf-8") as _f:
        _f.write(_text)
    _os.replace(_file + ".new", _file)
"""


UPGRADE_AT_IMPORT = _upgrade_code(2, "jam_core/cli/hook.py", 'f"fetched {n} file', 'f"FETCHED {n} file')


def test_an_upgrade_during_the_server_s_imports_is_not_served_for_ever(tree, warm):
    """jam is upgraded while the server it just spawned is importing (pip replaces files one by
    one): a module the server had already imported (jam_core.cli.hook) is replaced before
    serve() takes its stamps (after every import), so the stamps describe the new file while
    the server runs the old code, and it serves the old code for as long as cds keep it
    alive. The instant is made exact: the copy's jam_dir, which the server imports after
    jam_core.cli.hook, does the upgrade when the server imports it. A file whose change time is
    not before the server began importing must make it stale (or the stamps be taken first).
    (Failed before d8b4ecf; guard, mutation-checked: serve()'s ``st[3] >= began``.)"""
    code = _copy_code(warm)
    with open(code / "jam_dir" / "__init__.py", "a", encoding="utf-8") as f:
        f.write(UPGRADE_AT_IMPORT)
    root, content = tree
    warm.serve(ready=False)  # it may leave at once (stale from its start)
    assert (code / "upgraded").exists()
    res = warm.fetch(root.path / "data")
    assert res.returncode == 0 and _back(root, content), res.stderr
    assert "FETCHED 3 files" in res.stderr, f"the old code answered: {res.stderr!r} (served: {warm.runs()})"


def test_a_long_runtime_directory_still_gets_a_server(tree, warm, tmp_path):
    """$XDG_RUNTIME_DIR private and ours, but deep (a home on a long mount path, a test's temp
    directory): the socket's path is longer than sockaddr_un allows (108 bytes). The server
    dies in bind() with a traceback nobody sees; each cold fetch spawns another that dies the
    same way, and no fetch is ever warm. Either the run directory falls back to /tmp/jam-UID
    when the path would not fit, or the server leaves quietly. (Failed before d42ef72; guards,
    mutation-checked together: run_dir's ``len(base) > 50`` fallback and serve()'s quiet return
    when bind() fails.)"""
    root, content = tree
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True, mode=0o700)
    deep.parent.chmod(0o700)
    env = dict(warm.env, XDG_RUNTIME_DIR=str(deep))
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", SERVER, warm.full, warm.file, *warm.paths], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    warm.procs.append(proc)
    ready = proc.stdout.readline()
    if ready != b"ready\n":
        proc.wait(timeout=60)
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.returncode == 0 and "Traceback" not in err, f"the server died: {err[-300:]}"
        return
    proc.stderr.close()
    res = warm.fetch(root.path / "data", XDG_RUNTIME_DIR=str(deep))
    assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
    assert warm.served(), "a server listens, the client does not find it"


# 4. Leftovers.


def test_the_spawned_server_holds_nothing_of_the_root(tree, warm):
    """The first cold fetch, run from inside the root, spawns the server: the server must not keep
    its working directory (nor any descriptor) in the root, or the user's ``umount`` of the
    root's disk says "target is busy" for as long as the server lives. Guard (mutation-checked):
    serve()'s ``os.chdir("/")``."""
    root, content = tree
    res = warm.fetch(root.path / "data")
    assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
    pid = warm.wait_holder()
    warm.wait_listening()
    top = str(root.path)
    assert not os.readlink(f"/proc/{pid}/cwd").startswith(top), "the server's working directory is in the root"
    held = held_fds(pid)
    assert not [h for h in held if h.startswith(top)], held


def test_the_server_leaves_no_zombies(tree, warm):
    """Each request forks a child that exits when its fetch is done; the server never waits for
    them, so they must not stay as zombies (one per cd for up to the server's life). Guard
    (mutation-checked): serve()'s ``signal.signal(signal.SIGCHLD, signal.SIG_IGN)``."""
    root, content = tree
    server = warm.serve()
    res = warm.fetch(root.path / "data")
    assert res.returncode == 0 and warm.served() and _back(root, content), res.stderr
    for _ in range(6000):  # every child gone or a zombie (60 s at most)
        kids = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        states = []
        for k in kids:
            try:
                states.append(_state(int(k)))
            except OSError:
                pass
        if all(s == "Z" for s in states):
            break
        select.select([], [], [], 0.01)  # a deadline, not a synchronisation
    assert "Z" not in states, "the server's children stay as zombies"


def test_a_directory_named_in_another_encoding_is_fetched_through_the_server(tree, warm):
    """A directory whose name is not UTF-8 (Latin-1 ``caf\\xe9``): its path goes to the child
    as bytes and back as the same name (os.fsencode / os.fsdecode with surrogateescape), the
    child fetches there and says "here". Guard (mutation-checked): _child's ``os.fsdecode``."""
    root, _ = tree
    name = os.fsdecode(b"caf\xe9")
    content = _stash(root, [f"{name}/g0", f"{name}/g1"])
    warm.serve()
    res = warm.fetch(root.path / name)
    assert res.returncode == 0 and "fetched 2 files" in res.stderr and "here" in res.stderr, res.stderr
    assert warm.served() and _back(root, content), res.stderr


def _of_fetch(warm, root, server, tmp_path, read, preexec_fn=None, before: str = ""):
    """``(pid, read(pid))`` of whatever fetches root/data (the server's child or the client
    itself), at an instant made to last: it opens $JAM_DEBUG_MODULES, a FIFO, once the fetch is
    done."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    client = subprocess.Popen(
        warm.command(root.path / "data", before), env=dict(warm.env, JAM_DEBUG_MODULES=str(fifo)),
        cwd=root.path / "data", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=preexec_fn,
    )
    try:
        where, value = None, None
        for _ in range(6000):  # 60 s at most, a deadline
            kids = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
            for pid in [int(k) for k in kids] + [client.pid]:
                try:
                    if _state(pid) == "S" and Path(f"/proc/{pid}/syscall").read_text().split()[0] == OPENAT:
                        where, value = pid, read(pid)
                except (OSError, IndexError):
                    pass
            if where or client.poll() is not None:
                break
            select.select([], [], [], 0.01)
        assert where, "nobody reached the FIFO"
        with open(fifo, "rb") as f:  # let it finish
            f.read()
        assert client.wait(timeout=60) == 0, client.stderr.read()
        return where, value
    finally:
        _reap(client)


def _nice_of_fetch(warm, root, server, tmp_path, preexec_fn=None, before: str = "") -> int:
    """The nice value of whatever fetches root/data (``_of_fetch``)."""
    return _of_fetch(warm, root, server, tmp_path, _nice, preexec_fn, before)[1]


def _nice(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2 :].split()[16])  # field 19 of stat: nice


def test_the_first_shell_s_nice_is_not_every_later_fetch_s(tree, warm, tmp_path):
    """The first cd happened in a shell under ``nice -n 19`` (a build's shell, a batch job): the
    server keeps that priority and so does every child it forks, so each later fetch, from any
    shell, runs at the lowest CPU priority (on a busy machine the cd waits behind everything).
    A cold start runs at the shell's own priority. (The same for ionice's class, the CPU
    affinity, the OOM score.) Seen at an instant of the child made to last: it opens
    $JAM_DEBUG_MODULES, a FIFO, once the fetch is done."""
    if os.uname().machine != "x86_64":
        pytest.skip("reads the syscall number of x86_64")
    root, content = tree
    server = warm.serve(preexec_fn=lambda: os.nice(19))
    _control(warm, root, preexec_fn=lambda: os.nice(19))
    nice = _nice_of_fetch(warm, root, server, tmp_path)
    assert _back(root, content)
    assert nice == _nice(os.getpid()), f"the fetch ran at nice {nice}, its shell at {_nice(os.getpid())}"


def test_a_client_cannot_shed_its_nice_value_by_claiming_another(tree, warm, tmp_path):
    """A process put at nice 19 (a batch job; an unprivileged process cannot lower its nice value
    again) is its own client and claims nice 0 in its request (it replaces os.getpriority in
    itself): the child, forked from a server at 0, takes the claim and the fetch runs at full
    priority. The peer's nice value must be read from the kernel (os.getpriority(PRIO_PROCESS,
    peer pid)), as its affinity (os.sched_getaffinity(pid)) and OOM score (/proc/PID/oom_score_adj).
    (Failed before d8b4ecf; guard, mutation-checked: _take_process's ``os.getpriority(PRIO_PROCESS, pid)``.)"""
    if os.uname().machine != "x86_64":
        pytest.skip("reads the syscall number of x86_64")
    root, content = tree
    server = warm.serve()
    _control(warm, root)
    lie = "import os\nos.getpriority=lambda *a:0\n"
    nice = _nice_of_fetch(warm, root, server, tmp_path, preexec_fn=lambda: os.nice(19), before=lie)
    assert _back(root, content)
    assert nice == 19, f"the fetch of a process at nice 19 ran at {nice}"


UPGRADE_BEFORE_SERVE = _upgrade_code(3, "jam_core/cli/__init__.py", "for name in sorted(sys.modules)))",
                                     'for name in sorted(sys.modules)) + "~new-code~\\n")')


def test_an_upgrade_just_before_serve_is_not_served_for_ever(tree, warm):
    """The server's first imports (jam_core, jam_core.cli, hook_server itself: the spawn code's
    ``import jam_core.cli.hook_server``) happen before serve() notes when it began: a module
    replaced between those imports and that instant (the upgrade under way as the server
    starts) has a change time before ``began``, so the server serves its old code for as long as
    cds keep it alive. The instant is made exact: the copy's hook_server.py, when the server
    imports it, replaces jam_core/cli/__init__.py (whose new _show_modules also writes
    ``~new-code~``). ``began`` should be the process's start (or noted before any import)."""
    code = _copy_code(warm)
    assert warm.full  # the tag, asked before the copy does its upgrade (the server must import it first)
    with open(code / "jam_core" / "cli" / "hook_server.py", "a", encoding="utf-8") as f:
        f.write(UPGRADE_BEFORE_SERVE)
    root, content = tree
    warm.serve(ready=False)
    assert (code / "upgraded").exists()
    res = warm.fetch(root.path / "data")
    assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
    assert "~new-code~" in (warm.tmp / "modules").read_text(), f"the old code answered (served: {warm.runs()})"
