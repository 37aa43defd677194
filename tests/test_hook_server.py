"""The cd hook's warm server (jam_core/cli/hook_server.py): a per-user process with the fetch's
imports done that forks a child for each hook-fetch. Real processes: the server is started as the
hook's bootstrap starts it, the client is the bootstrap itself (``python -I -S -c``), real shells
run the printed hook. Which side answered is read from $JAM_DEBUG_MODULES: the server's child
carries the server's own ``socket`` module, which a cold fetch never imports."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from tests.conftest import make_file, require_tool
from tests.safety_support import held_fds

FLAGS = {"bash": ["--norc", "--noprofile", "-c"], "zsh": ["-f", "-c"], "fish": ["--no-config", "-c"]}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tree(jam_root):
    """A root with 3 stubs in data/ (and the digests of their content)."""
    return jam_root, _stash_again(jam_root, {f"data/f{i}": None for i in range(3)})


def _stash_again(root, content: dict) -> dict:
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash

    out = {}
    for i, rel in enumerate(sorted(content)):
        path = root.path / rel
        if not path.exists() or content[rel] is None:
            make_file(path, 70_000 + i, seed=i)
        out[rel] = _digest(path.read_bytes())
    assert len(stash(root, sorted(out), make_plugin_manager()).done) == len(out)
    return out


def _back(root, content) -> bool:
    return all(_digest((root.path / rel).read_bytes()) == d for rel, d in content.items())


def hook_server_file(paths: list[str]) -> str:
    """The hook_server.py these ``sys.path`` entries import."""
    for p in paths:
        f = os.path.join(p, "jam_core/cli/hook_server.py")
        if os.path.isfile(f):
            return f
    raise AssertionError("no jam_core on the paths")


class Warm:
    """One test's server key, run directory and code paths; starts servers and runs clients."""

    def __init__(self, tmp_path: Path, paths: list[str] | None = None):
        from jam_core.cli.hook import boot_paths

        self.tmp = tmp_path
        from jam_core.cli.hook_server import _tag

        self.key = uuid.uuid4().hex[:20]  # what the bootstrap holds; start() adds this process's tag
        self.full = f"{self.key}-{_tag()}"  # the server's key (its children's powers: the test's)
        self.run = Path(tempfile.mkdtemp(prefix="jr", dir="/tmp"))  # short: a socket's path has 107 bytes
        self.paths = paths or boot_paths()
        self.env = dict(
            os.environ, XDG_RUNTIME_DIR=str(self.run), JAM_DEBUG_MODULES=str(tmp_path / "modules"), JAM_BACKGROUND="0"
        )
        self.env.pop("PYTHONPATH", None)
        self.env.pop("JAM_HOOK_SERVER", None)
        self.servers: list[subprocess.Popen] = []

    @property
    def file(self) -> str:
        return hook_server_file(self.paths)

    def socket(self) -> Path:
        return self.run / f"jam-{os.geteuid()}" / f"hook-{self.full}.sock"

    def serve(self, **env) -> subprocess.Popen:
        """A server, as spawn() starts it, once it listens."""
        proc = subprocess.Popen(
            self.server_command(), env=dict(self.env, **env), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        self.servers.append(proc)
        assert proc.stdout.readline() == b"ready\n", "the server did not start"
        return proc

    def server_command(self) -> list[str]:
        """What :func:`jam_core.cli.hook_server.spawn` runs."""
        code = (
            "import sys\nsys.path[:]=sys.argv[3:]\nimport jam_core.cli.hook_server as v\n"
            "if v.__file__==sys.argv[2]:v.serve(sys.argv[1])\n"
        )
        return [sys.executable, "-I", "-S", "-c", code, self.full, self.file, *self.paths]

    def fetch(self, directory: Path, cwd: Path | None = None, **env) -> subprocess.CompletedProcess:
        """The hook's bootstrap answering ``hook-fetch -- DIRECTORY``."""
        boot = (
            f"import sys\nsys.path+={self.paths!r}\nimport jam_core.cli.hook_server as v\n"
            f"assert v.__file__=={self.file!r}\nv.start({self.key!r})\n"
        )
        try:
            os.unlink(self.tmp / "modules")
        except FileNotFoundError:
            pass
        return subprocess.run(
            [sys.executable, "-I", "-S", "-c", boot, "hook-fetch", "--", str(directory)],
            env=dict(self.env, **env),
            cwd=cwd or directory,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def served(self) -> bool:
        """The last fetch ran in a server's child."""
        return "socket" in set((self.tmp / "modules").read_text().split())

    def close(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            proc.stdout.close()
        shutil.rmtree(self.run, ignore_errors=True)


@pytest.fixture
def warm(tmp_path):
    w = Warm(tmp_path)
    yield w
    w.close()


def test_a_fetch_goes_through_the_warm_server(tree, warm):
    root, content = tree
    warm.serve()
    res = warm.fetch(root.path / "data")
    assert res.returncode == 0 and "fetched 3 files (" in res.stderr and "here" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert _back(root, content), "differs"
    assert warm.served()
    warm_modules = set((warm.tmp / "modules").read_text().split())
    # The same fetch cold: it imports nothing the server had not imported first (WARM is complete).
    _stash_again(root, content)
    res = warm.fetch(root.path / "data", JAM_HOOK_SERVER="0")
    assert res.returncode == 0 and "fetched 3 files (" in res.stderr, res.stderr
    assert not warm.served()
    cold = set((warm.tmp / "modules").read_text().split())
    assert cold - warm_modules <= {"_socket"}, sorted(cold - warm_modules)


def test_the_child_takes_the_client_s_environment_and_directory(tree, warm, tmp_path):
    """The server was started with one environment; each request's own is the one that counts:
    $JAM_BLOCK_PLUGINS=jam_dir in the client's alone makes the child answer 121 (the full jam
    must run), and the client's working directory decides "here"."""
    root, content = tree
    warm.serve()
    res = warm.fetch(root.path / "data", JAM_BLOCK_PLUGINS="jam_dir")
    assert res.returncode == 121, res.stderr
    assert warm.served()
    assert not any((root.path / rel).read_bytes()[:13] != b"# jam stub v1" for rel in content)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = warm.fetch(root.path / "data", cwd=elsewhere)
    assert res.returncode == 0 and f"in {root.path / 'data'}" in res.stderr, res.stderr
    assert warm.served() and _back(root, content), "differs"


def settled(code: Path) -> Path:
    """``code`` (a copy of jam's modules) once it is older than a server's upgrade window: a
    server takes a module changed less than 20 ms before it started for one changed while it
    imported it (hook_server._began_ns) and leaves. Waited for on the clock, not for a fixed
    time."""
    import select
    import time

    newest = max(os.lstat(p).st_ctime_ns for p in code.rglob("*"))
    while time.time_ns() < newest + 30_000_000:
        select.select([], [], [], 0.005)
    return code


@pytest.fixture
def code(tmp_path) -> Path:
    """A copy of jam_core and jam_dir (an installation a test may upgrade), ``settled``."""
    code = tmp_path / "code"
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo / "jam_core", code / "jam_core", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "plugins/jam_dir", code / "jam_dir", ignore=shutil.ignore_patterns("__pycache__"))
    return settled(code)


def test_a_server_whose_code_changed_answers_nothing_and_exits(code, tree, tmp_path):
    """An upgrade or an edit of any module the server loaded: it refuses, exits, and the fetch
    runs cold (with the new code)."""
    from jam_core.cli.hook import boot_paths

    root, content = tree
    repo = Path(__file__).resolve().parent.parent
    paths = [p for p in boot_paths() if p not in (str(repo), str(repo / "plugins"))] + [str(code)]
    w = Warm(tmp_path, paths)
    try:
        server = w.serve()
        res = w.fetch(root.path / "data")
        assert res.returncode == 0 and w.served() and _back(root, content), res.stderr
        _stash_again(root, content)
        units = code / "jam_core/units.py"
        st = units.stat()
        os.utime(units, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        res = w.fetch(root.path / "data")
        assert res.returncode == 0 and "fetched 3 files (" in res.stderr, res.stderr
        assert not w.served(), "a server whose code changed answered"
        assert _back(root, content), "differs"
        assert server.wait(timeout=60) == 0  # it left on its own
        assert not w.socket().exists()
    finally:
        w.close()


def test_a_run_directory_others_can_reach_is_not_used(tree, warm):
    root, content = tree
    warm.serve()
    d = warm.socket().parent
    d.chmod(0o755)
    res = warm.fetch(root.path / "data")
    assert res.returncode == 0 and "fetched 3 files (" in res.stderr and _back(root, content), res.stderr
    assert not warm.served(), "the hook used a socket in a directory others can reach"


def test_a_socket_served_by_another_user_is_not_trusted(tree, warm):
    """A listener of another uid at the socket's name (it answers "done" at once, without doing
    anything): the client checks the peer's uid, so the fetch runs cold and the files come back."""
    root, content = tree
    d = warm.socket().parent
    d.mkdir(mode=0o700)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # bind as us, listen as nobody: the peer credentials are nobody's
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.bind(str(warm.socket()))
            os.setgid(65534)
            os.setuid(65534)
            s.listen(4)
            os.write(ready_w, b"1")
            while True:
                conn, _ = s.accept()
                try:
                    conn.send(b"R")
                    socket.recv_fds(conn, 1 << 20, 3)
                    conn.send(b"C0")
                finally:
                    conn.close()
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        res = warm.fetch(root.path / "data")
        assert res.returncode == 0 and "fetched 3 files (" in res.stderr, res.stderr
        assert _back(root, content), "a stranger's socket answered for jam"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)


def test_ctrl_c_reaches_the_child(tmp_path, warm):
    """SIGINT to the client (the shell's Ctrl-C) goes to the child the server started; the
    client's exit code is the child's. The "server" here is the test: it hands the client the pid
    of a process that waits for SIGINT, then answers 130 once that process got it."""
    d = warm.socket().parent
    d.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(warm.socket()))
    listener.listen(1)
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal,sys\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK,[signal.SIGINT])\nprint('ready',flush=True)\n"
            "signal.sigwait([signal.SIGINT])\nsys.exit(7)",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    assert waiter.stdout.readline() == b"ready\n"
    client = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            f"import sys\nsys.path+={warm.paths!r}\nimport jam_core.cli.hook_server as v\nv.start({warm.key!r})\n",
            "hook-fetch",
            "--",
            str(tmp_path),
        ],
        env=warm.env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    got: dict = {}

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.send(b"R")
            got["request"] = socket.recv_fds(conn, 1 << 20, 3)
            for fd in got["request"][1]:
                os.close(fd)
            conn.send(b"P%d" % waiter.pid)
            got["ready"].set()
            got["waiter"] = waiter.wait(timeout=60)
            conn.send(b"C130")

    got["ready"] = threading.Event()
    t = threading.Thread(target=serve)
    t.start()
    try:
        assert got["ready"].wait(timeout=60)
        client.send_signal(signal.SIGINT)
        t.join(timeout=60)
        assert got.get("waiter") == 7, "the child never got the Ctrl-C"
        assert client.wait(timeout=60) == 130
    finally:
        for p in (waiter, client):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        listener.close()
        t.join(timeout=5)
        waiter.stdout.close()
    assert b"Traceback" not in client.stderr.read()
    client.stderr.close()


def test_an_idle_server_exits(warm):
    """It leaves nothing behind: neither its socket nor its lock file."""
    server = warm.serve(JAM_HOOK_SERVER_IDLE="0.2")
    assert server.wait(timeout=60) == 0
    assert list(warm.socket().parent.iterdir()) == []


def test_a_second_server_for_the_same_key_leaves_at_once(warm):
    first = warm.serve()
    second = subprocess.run(warm.server_command(), env=warm.env, capture_output=True, timeout=60)
    assert second.returncode == 0 and second.stdout == b""  # it never listened
    assert first.poll() is None and warm.socket().exists()


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_hook_starts_a_server_and_the_next_cd_uses_it(shell, tree, jam_bin, tmp_path):
    """A real shell with the printed hook: the first cd fetches cold and starts a server in the
    background; once it listens, the next cd's fetch is its child's. The server is stopped at the end."""
    root, content = tree
    exe = require_tool(shell)
    run = Path(tempfile.mkdtemp(prefix="jr", dir="/tmp"))  # short: a socket's path has 107 bytes
    env = dict(
        os.environ,
        JAM_DISABLE="",
        JAM_BACKGROUND="0",
        XDG_RUNTIME_DIR=str(run),
        JAM_DEBUG_MODULES=str(tmp_path / "modules"),
    )
    env.pop("PROMPT_COMMAND", None)
    env.pop("PYTHONPATH", None)
    env.pop("JAM_HOOK_SERVER", None)
    text = subprocess.run([jam_bin, "hook", shell], env=env, capture_output=True, text=True, check=True).stdout
    hook = tmp_path / f"hook.{shell}"
    hook.write_text(text)
    after = "; _jam_hook" if shell == "bash" else ""
    script = f"source {str(hook)!r}; cd {str(root.path / 'data')!r}{after}"
    sock_dir = run / f"jam-{os.geteuid()}"

    def cd() -> subprocess.CompletedProcess:
        (tmp_path / "modules").unlink(missing_ok=True)
        return subprocess.run([exe, *FLAGS[shell], script], env=env, capture_output=True, text=True, timeout=120)

    res = cd()
    assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
    assert "socket" not in (tmp_path / "modules").read_text().split()
    pid = _lock_holder(sock_dir)  # the server the hook spawned, once it holds its key's lock
    try:
        _wait_listening(sock_dir)
        content = _stash_again(root, content)
        res = cd()
        assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
        assert "socket" in (tmp_path / "modules").read_text().split(), "the second cd did not use the server"
    finally:
        os.kill(pid, signal.SIGTERM)
        shutil.rmtree(run, ignore_errors=True)


def _lock_holder(sock_dir: Path) -> int:
    """The pid holding the flock of a server's lock in ``sock_dir`` (from /proc/locks), waiting
    (30 s at most) for a server to take one."""
    import select

    for _ in range(3000):
        locks = list(sock_dir.glob("hook-*.sock.lock")) if sock_dir.is_dir() else []
        ino = locks[0].stat().st_ino if locks else -1
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].endswith(f":{ino}"):
                return int(parts[4])
        select.select([], [], [], 0.01)  # a deadline of 30 s, not a synchronisation
    raise AssertionError("no server took the lock")


def _wait_listening(sock_dir: Path) -> None:
    """Wait (30 s at most) until the server in ``sock_dir`` accepts connections."""
    import select

    for _ in range(3000):
        found = list(sock_dir.glob("hook-*.sock"))
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if found:
                s.connect(str(found[0]))
                return
        except OSError:
            pass
        finally:
            s.close()
        select.select([], [], [], 0.01)  # a deadline of 30 s, not a synchronisation
    raise AssertionError("the server never listened")


def test_the_spawned_server_keeps_nothing_the_shell_left_open(tree, warm):
    """The first (cold) fetch starts the server in the background; a descriptor the shell had
    open (here a pipe, as a terminal or a coprocess leaves one) is not held by it: whoever waits
    for the pipe's end does not wait for the server."""
    root, content = tree
    r, w = os.pipe()
    try:
        boot = (f"import sys\nsys.path+={warm.paths!r}\nimport jam_core.cli.hook_server as v\n"
                f"v.start({warm.key!r})\n")
        res = subprocess.run([sys.executable, "-I", "-S", "-c", boot, "hook-fetch", "--", str(root.path / "data")],
                             env=warm.env, cwd=root.path / "data", capture_output=True, text=True, timeout=120,
                             pass_fds=(w,))
        assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
        sock_dir = warm.socket().parent
        pid = _lock_holder(sock_dir)
        try:
            _wait_listening(sock_dir)
            pipe = os.fstat(w).st_ino
            held = held_fds(pid)
            assert f"pipe:[{pipe}]" not in held, held
        finally:
            os.kill(pid, signal.SIGTERM)
    finally:
        os.close(r)
        os.close(w)


def test_ctrl_c_before_the_server_started_a_child_fetches_nothing(warm, tmp_path):
    """A Ctrl-C that came while the server had not yet started the child, which then never came
    (the server died): the hook's fetch stops there (130), it does not go on to fetch cold. Run
    in a process of its own: the "server" is a thread that receives the request, sends SIGINT to
    its own process, waits for the client's handler to have run, and hangs up."""
    script = f"""
import os, signal, socket, sys, threading
sys.path += {warm.paths!r}
import _signal
import jam_core.cli.hook_server as v
handled = threading.Event()
real = _signal.signal
def spy(signum, handler):
    if signum == signal.SIGINT and callable(handler):
        def wrapped(*a):
            handler(*a)
            handled.set()
        return real(signum, wrapped)
    return real(signum, handler)
_signal.signal = spy
d = v.run_dir(create=True)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
listener.bind(v.socket_path(d, {warm.full!r}))
listener.listen(1)
def server():
    conn, _ = listener.accept()
    conn.send(b"R")
    socket.recv_fds(conn, 1 << 20, 3)
    os.kill(os.getpid(), signal.SIGINT)
    assert handled.wait(60)
    conn.close()
threading.Thread(target=server, daemon=True).start()
sys.argv = ["-c", "hook-fetch", "--", {str(tmp_path)!r}]
print(v.ask({warm.full!r}))
"""
    res = subprocess.run([sys.executable, "-I", "-S", "-c", script], env=warm.env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "130", (res.stdout, res.stderr)


def test_a_server_of_other_powers_does_not_answer(tree, warm):
    """A server whose process may do less (or more) than its client, here one started without
    CAP_DAC_OVERRIDE under the client's own key: it refuses (its child would fetch with its
    powers, not the client's), and the fetch runs cold, as the client may."""
    if os.geteuid() != 0:
        pytest.skip("needs root (capabilities)")
    setpriv = require_tool("setpriv")
    root, content = tree
    data = root.path / "data"
    data.chmod(0o555)  # root writes here only with CAP_DAC_OVERRIDE
    try:
        proc = subprocess.Popen([setpriv, "--bounding-set=-dac_override,-dac_read_search", "--",
                                 *warm.server_command()], env=warm.env, stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        warm.servers.append(proc)
        assert proc.stdout.readline() == b"ready\n", "the server did not start"
        res = warm.fetch(data)
        assert res.returncode == 0 and "fetched 3 files" in res.stderr and _back(root, content), res.stderr
        assert not warm.served(), "a server of other powers answered"
    finally:
        data.chmod(0o755)


def test_a_server_that_cannot_listen_leaves_quietly_and_leaves_nothing(warm):
    """A directory where the socket should be: the server cannot listen there. It leaves at once,
    quietly (the fetches run cold), and takes its lock file with it: before, the 0-byte lock file
    stayed for ever. Guards (mutation-checked): serve()'s ``except OSError: return`` after the
    socket's unlink (else a traceback) and its ``finally`` around everything after the lock."""
    run = warm.socket().parent
    run.mkdir(mode=0o700)
    warm.socket().mkdir()
    proc = subprocess.run(warm.server_command(), env=warm.env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", (proc.stdout, proc.stderr)
    assert sorted(p.name for p in run.iterdir()) == [warm.socket().name], "the lock file stayed"
    assert warm.socket().is_dir()
