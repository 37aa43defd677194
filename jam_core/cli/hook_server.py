"""The cd hook's warm start: a per-user process that has already imported what the hook's
fetch needs, and forks a child for each ``jam hook-fetch -- DIR`` (a zygote, as Android starts
apps and Mercurial's chg starts hg).

A cold ``python -I -S`` hook-fetch spends ~70% of its time importing (pathlib, sqlite3,
pluggy and jam's own modules); the child of a warm server starts with all of that done. The hook's
bootstrap (``jam hook SHELL``, jam_core/cli/hook.py) calls :func:`start`: :func:`ask` hands the
request to the server if one answers, else the fetch runs cold in this process, which then
starts a server (:func:`spawn`) for the next one.

What makes the child the same as a cold start: it takes the client's stdin, stdout and stderr
(passed over the socket once the server said it took the connection), working directory, umask,
resource limits, scheduling (nice, CPUs, OOM score), arguments and whole environment; the server
itself runs nothing of jam before forking (only imports), so no state of an earlier request
exists. What cannot be handed over is checked instead: a server answers only clients of its own
powers (ids, groups, capabilities, no_new_privs, seccomp, namespaces, cgroup, security label;
their digest is in the socket's name, so each kind of shell has its own server) and loader
variables (LD_*...); anything else goes cold. Ctrl-C in the shell reaches the child (the client
forwards SIGINT); the child's exit code is the client's.

Safety: the socket lives in a directory of this user's alone (``$XDG_RUNTIME_DIR/jam-UID`` or
``/tmp/jam-UID``: a real directory, owned by the user, no access for group or others; anything
else and no server is used), both sides check the other's uid (SO_PEERCRED), and a server whose
code changed on disk since it started (an upgrade, an edit, a shared library replaced) answers
no request: it exits and the client runs cold. A server with no request for :data:`IDLE`
seconds exits. ``JAM_HOOK_SERVER=0`` turns it off (every fetch runs cold, and none is started).

This module imports only ``os`` and ``sys`` at its top: the client side runs before anything
else of the hook's fetch.
"""

from __future__ import annotations

import os
import sys

ENV_SERVER = "JAM_HOOK_SERVER"  # 0/off/no/false: no server (cold starts only)
ENV_IDLE = "JAM_HOOK_SERVER_IDLE"  # seconds a server waits for a request before it exits (tests)
IDLE = 900.0
ANSWER = 10.0  # seconds a server has to start the child: past that it is taken for hung
MAGIC = b"jam-hook-3"
MAX_MESSAGE = 1 << 20  # a request: arguments, working directory and environment

# What a hook-fetch in a root of dir remotes imports (tests/test_hook_server.py checks that a cold
# fetch loads nothing the server did not import first).
WARM = (
    "jam_core.cli",
    "jam_core.cli.hook",
    "jam_core.cli.common",
    "jam_core.hook.fetch",
    "jam_core.history.auto",
    "jam_core.manager",
    "jam_core.hookspecs",
    "jam_core.ops.checkout",
    "jam_core.ops.refs",
    "jam_core.ops.remotes",
    "jam_dir",
    "blake3",
    "ctypes",
    "queue",
)


def _off() -> bool:
    return os.environ.get(ENV_SERVER, "").strip().lower() in ("0", "off", "no", "false")


def run_dir(create: bool = False) -> str | None:
    """This user's directory for the socket, or None if it is missing (``create`` False) or is
    not one only this user can reach."""
    uid = os.geteuid()
    base = os.environ.get("XDG_RUNTIME_DIR") or ""
    if not base or not os.path.isabs(base) or len(base) > 50 or not _private(base, uid):
        base = "/tmp"  # (a socket's path has at most 107 bytes)
    d = os.path.join(base, f"jam-{uid}")
    if create:
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return None
    return d if _private(d, uid) else None


def _private(path: str, uid: int) -> bool:
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077


def socket_path(d: str, key: str) -> str:
    return os.path.join(d, f"hook-{key}.sock")


def _peer_uid(s) -> int:
    return _peer(s)[1]


def _peer(s) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of ``s``."""
    import _socket

    cred = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # struct ucred: pid, uid, gid
    return int.from_bytes(cred[0:4], sys.byteorder), int.from_bytes(cred[4:8], sys.byteorder)


_CRED_LINES = (b"Uid:", b"Gid:", b"Groups:", b"CapInh:", b"CapPrm:", b"CapEff:", b"CapBnd:", b"CapAmb:",
               b"NoNewPrivs:", b"Seccomp:", b"Seccomp_filters:")
_NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _powers(pid: int | str) -> bytes | None:
    """What process ``pid`` may do, beyond its uid: its ids and groups, capabilities, no_new_privs,
    seccomp, namespaces, cgroup and security label. A child forked by the server has the server's;
    it answers only a client whose are the same (a root shell without CAP_DAC_OVERRIDE must not get
    a fetch written with it). None if they cannot be read."""
    try:
        status = _read(f"/proc/{pid}/status")
        out = [line for line in status.split(b"\n") if line.startswith(_CRED_LINES)]
        out.append(_read(f"/proc/{pid}/cgroup"))
        for n in _NAMESPACES:
            try:
                out.append(os.fsencode(os.readlink(f"/proc/{pid}/ns/{n}")))
            except FileNotFoundError:
                out.append(b"")
    except OSError:
        return None
    try:
        out.append(_read(f"/proc/{pid}/attr/current"))
    except OSError:
        out.append(b"")
    return b"\0".join(out)


def _tag() -> str:
    """This process's :func:`_powers`, digested (FNV-1a, 64 bits, the high half): part of the
    socket's name, so that shells of other privileges, namespaces or cgroups (a tmux server, a
    container, a confined root shell) each have their own server rather than none."""
    h = 0xCBF29CE484222325
    for b in _powers("self") or b"":
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h >> 32:08x}"


def _limit_numbers(resource) -> list[int]:
    """The resource limits a child takes from its client (every RLIMIT_* this Python knows)."""
    return sorted({getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_")})


def _exec_env(items) -> list[tuple[bytes, bytes]]:
    """The variables that act when a program starts (the dynamic loader's, glibc's tunables and
    malloc's): a server started under one set keeps them for its whole life, so it answers only
    clients with the same set (an LD_PRELOAD of eatmydata would make every fetch undurable)."""
    return sorted((k, v) for k, v in items if k.startswith((b"LD_", b"GLIBC_TUNABLES", b"MALLOC_")))


def _request() -> bytes:
    """The request: magic, the encoding this process decodes names with, working directory,
    umask, arguments, then the environment (each NUL-separated)."""
    mask = os.umask(0o022)
    os.umask(mask)
    head = [
        MAGIC,
        sys.getfilesystemencoding().encode(),
        os.getcwdb(),
        str(mask).encode(),
        str(len(sys.argv) - 1).encode(),
    ]
    args = [os.fsencode(a) for a in sys.argv[1:]]
    env = [k + b"=" + v for k, v in os.environb.items()]
    return b"\0".join(head + args + env)


def ask(key: str) -> int | None:
    """Have the warm server answer this process's ``hook-fetch`` (its ``sys.argv``); its exit
    code, or None when no server answered (none runs, it refused, its code changed): the caller
    then runs the fetch itself."""
    if _off():
        return None
    d = run_dir()
    if d is None:
        return None
    import _signal
    import _socket

    try:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    except OSError:
        return None
    child = [0, False]  # the child's pid once known; a Ctrl-C that came before

    def interrupt(signum, frame):
        if child[0]:
            os.kill(child[0], _signal.SIGINT)
        else:
            child[1] = True

    path = socket_path(d, key)
    try:
        try:
            s.settimeout(ANSWER)  # a stopped server with a full backlog: connect fails at once
            there = os.lstat(path).st_ino
            s.connect(path)
            if _peer_uid(s) != os.geteuid():
                return None
            # The server says it took the connection (and is not stale) before any descriptor of
            # ours goes: a request queued to a stopped server would hold our stdout for its life.
            if s.recv(64) != b"R":
                return None
            message = _request()
        except TimeoutError:
            _give_up(path, there)
            return None
        except OSError:
            return None
        previous = _signal.signal(_signal.SIGINT, interrupt)
        try:
            try:
                s.sendmsg(
                    [message],
                    [
                        (
                            _socket.SOL_SOCKET,
                            _socket.SCM_RIGHTS,
                            b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2)),
                        )
                    ],
                )
            except OSError:
                return None
            while True:
                try:
                    reply = s.recv(64)
                except TimeoutError:
                    _give_up(path, there)
                    reply = b""
                except OSError:
                    reply = b""
                if not reply:  # the server went away (or never answered): before the child began, nothing was done
                    if child[0]:
                        return 1
                    return 130 if child[1] else None  # Ctrl-C before any child: nothing to fetch cold either
                kind, value = reply[:1], reply[1:]
                if kind == b"P" and value.isdigit():
                    s.settimeout(None)  # the child runs: as long as the fetch takes
                    child[0] = int(value)
                    if child[1]:
                        os.kill(child[0], _signal.SIGINT)
                elif kind == b"C" and value.isdigit():
                    return int(value)
                else:  # "S": stale or not for this process
                    return None
        finally:
            _signal.signal(_signal.SIGINT, previous)
    finally:
        s.close()


def _give_up(path: str, ino: int) -> None:
    """The server at ``path`` did not answer in time (stopped, hung): take its socket away, so
    that the next fetch runs cold at once (or with a new server) rather than wait for it too. The
    server, if it ever goes on, finds its socket gone and leaves."""
    try:
        if os.lstat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass


def start(key: str) -> None:
    """The hook's bootstrap: the server's answer if one gives it, else the cold fetch here, and a
    server started for the next one. Never returns."""
    from jam_core import cli  # (the package this module is in: imported already)

    key = f"{key}-{_tag()}"
    code = ask(key)
    if code is None:
        code = cli.boot_code()
        if code != cli.EXIT_BOOT and not _off():
            spawn(key)
    cli._leave(code)


def spawn(key: str) -> None:
    """Start a server in the background, detached (its own session, no terminal); it takes the
    socket only if no other server holds it. Silent if it cannot."""
    code = (
        "import sys\n"
        "sys.path[:]=sys.argv[3:]\n"
        "import jam_core.cli.hook_server as v\n"
        "if v.__file__==sys.argv[2]:v.serve(sys.argv[1])\n"
    )
    paths = [p for p in sys.path if isinstance(p, str) and os.path.isabs(p)]
    try:
        os.posix_spawn(
            sys.executable,
            [sys.executable, "-I", "-S", "-c", code, key, __file__, *paths],
            os.environ,
            setsid=True,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDWR, 0),
                (os.POSIX_SPAWN_DUP2, 0, 1),
                (os.POSIX_SPAWN_DUP2, 0, 2),
            ],
        )
    except OSError:
        pass


# The server side.

_LOCK = [-1]  # the server's lock on its key (a child closes its copy)
_EXEC_ENV: list = []  # _exec_env of the server's own start
_POWERS: list = [None]  # _powers of the server itself


def _stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _stamps() -> dict[str, tuple | None]:
    """Every file this process's code came from (the interpreter, each module's source or
    extension, every shared library mapped): a change in any and the server no longer answers."""
    files = {sys.executable}
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and os.path.isabs(f):
            files.add(f)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as maps:
            for line in maps:
                parts = line.rstrip("\n").split(None, 5)
                f = parts[5] if len(parts) == 6 else ""
                if f.endswith(" (deleted)"):
                    f = f[: -len(" (deleted)")]  # replaced under us: the file there now differs
                if f.startswith("/"):
                    files.add(f)
    except OSError:
        pass
    return {f: _stamp(f) for f in files}


def _began_ns() -> int:
    """When this process started (realtime ns), before any of its imports (the spawn code's
    own come before :func:`serve`); 20 ms earlier for the 10 ms tick of /proc's start time and
    the coarse clock file change times come from."""
    import time

    stat = _read("/proc/self/stat")
    ticks = int(stat.rsplit(b")", 1)[1].split()[19])
    age = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - ticks * 10**9 // os.sysconf("SC_CLK_TCK")
    return time.time_ns() - age - 20_000_000


def serve(key: str) -> None:
    """Run the server for ``key`` until it has been idle for :data:`IDLE` seconds, its socket is
    gone or replaced, or its code changed on disk. Exits at once if another server holds the
    key's lock."""
    import fcntl
    import gc
    import importlib
    import signal
    import socket
    import time

    if _off():
        return
    # Whatever the shell that started the first fetch left open (a terminal's pipe, a coprocess):
    # a reader waiting for its end must not wait for this server.
    os.closerange(3, 2**31 - 1)
    d = run_dir(create=True)
    if d is None:
        return
    path = socket_path(d, key)
    try:
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another server has it (or it cannot be had)
    _LOCK[0] = lock
    mine: list[int | None] = [None]  # the socket's inode once bound
    try:
        os.ftruncate(lock, 0)
        os.write(lock, b"%d\n" % os.getpid())  # which process serves (the lock file says, for people and tests)
        os.chdir("/")
        try:
            idle = float(os.environ.get(ENV_IDLE, "") or IDLE)
        except ValueError:
            idle = IDLE
        began = _began_ns()
        for name in WARM:
            importlib.import_module(name)
        from jam_core import fs

        fs._c()  # libc, loaded once here rather than in each child
        stamps = _stamps()
        if any(st is not None and st[3] >= began for st in stamps.values()):
            return  # a file changed while it was being imported (an upgrade under way): which is loaded?
        _EXEC_ENV[:] = _exec_env(os.environb.items())
        _POWERS[0] = _powers(os.getpid())
        try:
            os.unlink(path)  # a dead server's socket: the lock says nobody serves it
        except FileNotFoundError:
            pass
        except OSError:
            return  # not a socket we may remove (a directory there): the fetches run cold
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            listener.bind(path)
        except OSError:
            return  # (a path too long for a socket, a full disk): the fetches run cold
        finally:
            os.umask(old)
        mine[0] = os.lstat(path).st_ino
        listener.listen(64)
        try:
            os.write(1, b"ready\n")  # for whoever waits on it (tests); /dev/null when spawned
        except OSError:
            pass
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
        gc.collect()
        gc.freeze()  # what the server made is never walked again (no copy-on-write in the children)
        listener.settimeout(min(idle, 30.0))
        last = time.monotonic()
        while True:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                if time.monotonic() - last >= idle or _stamp(path) is None or os.lstat(path).st_ino != mine[0]:
                    return
                continue
            last = time.monotonic()
            with conn:
                if not _serve_one(conn, listener, stamps):
                    return
    finally:  # whenever it leaves, even before it listened: its socket and lock file go (if still its own)
        for name, ino in ((path, mine[0]), (path + ".lock", os.fstat(lock).st_ino)):
            try:
                if ino is not None and os.lstat(name).st_ino == ino:  # ours still (not a newer server's)
                    os.unlink(name)
            except OSError:
                pass


def _serve_one(conn, listener, stamps) -> bool:
    """Fork a child for the request on ``conn``. False when this server must stop (its code
    changed on disk)."""
    import socket

    fds: list[int] = []
    try:
        conn.settimeout(1.0)
        client, uid = _peer(conn)
        if uid != os.geteuid():
            return True
        mine = _powers(os.getpid())
        if mine is None or mine != _POWERS[0]:
            conn.send(b"S")  # this server changed since it started (moved to another cgroup): it leaves
            return False
        if _powers(client) != mine:
            conn.send(b"S")  # another set of privileges, namespaces or cgroup: it runs cold
            return True
        if _stamps() != stamps:  # whatever the request (a newer jam's may not parse here)
            conn.send(b"S")
            return False
        conn.send(b"R")
        message, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
        if len(fds) != 3 or not message.startswith(MAGIC + b"\0"):
            return True
        fields = message.split(b"\0")
        nargs = int(fields[4])
        env = [item.partition(b"=") for item in fields[5 + nargs :]]
        if fields[1] != sys.getfilesystemencoding().encode() or _exec_env((k, v) for k, _, v in env) != _EXEC_ENV:
            conn.send(b"S")  # names decode otherwise, or another loader's set-up: not for this server
            return True
        pid = os.fork()
        if pid == 0:
            try:
                listener.close()
                _child(conn, fields, fds, client)
            finally:
                os._exit(1)
        return True
    except (OSError, ValueError, IndexError):
        return True
    finally:
        for fd in fds:
            os.close(fd)


def _child(conn, fields: list[bytes], fds: list[int], client: int) -> None:
    """Become the hook-fetch of process ``client`` (its descriptors, directory, umask, limits,
    scheduling, arguments and environment) and answer it; the exit code goes back over ``conn``."""
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if _LOCK[0] >= 0:
        os.close(_LOCK[0])
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    cwd, mask, nargs = fields[2], int(fields[3]), int(fields[4])
    args = [os.fsdecode(a) for a in fields[5 : 5 + nargs]]
    env = fields[5 + nargs :]
    if not _take_process(client):
        conn.send(b"S")  # the client's limits or scheduling cannot be had here: it runs cold
        os._exit(1)
    os.environb.clear()
    for item in env:
        k, sep, v = item.partition(b"=")
        if sep and k:
            os.environb[k] = v
    os.umask(mask)
    os.chdir(cwd)
    sys.argv = ["-c", *args]
    conn.settimeout(None)
    conn.send(b"P%d" % os.getpid())
    from jam_core import cli

    try:
        code = cli.boot_code()
    except KeyboardInterrupt:  # Ctrl-C outside the fetch's own handler: a cold start dies of SIGINT (130)
        code = 130
    except BaseException:  # what the interpreter would print and exit with (JAM_DEBUG=1 re-raises)
        import traceback

        traceback.print_exc()
        code = 1
    cli._flush()
    try:
        conn.send(b"C%d" % code)
    except OSError:
        pass
    os._exit(code)


_IOPRIO = {"x86_64": (251, 252), "aarch64": (30, 31)}  # (ioprio_set, ioprio_get) syscall numbers


def _take_ioprio(pid: int) -> bool:
    """This process's I/O scheduling class and level those of ``pid`` (ioprio_get/ioprio_set,
    which Python does not wrap). True when done, or where the syscalls are not known here."""
    nums = _IOPRIO.get(os.uname().machine)
    if nums is None:
        return True
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    who_process = 1  # IOPRIO_WHO_PROCESS
    want = libc.syscall(nums[1], who_process, pid)
    if want < 0:
        return False
    if libc.syscall(nums[1], who_process, 0) != want and libc.syscall(nums[0], who_process, 0, want) != 0:
        return False
    return True


def _take_process(pid: int) -> bool:
    """Make this process's resource limits and scheduling (nice value, scheduling policy, I/O
    class, CPUs, OOM score adjustment) those of process ``pid`` (the client, read from the
    kernel, never from its request: a client at nice 19, `chrt -i` or `ionice -c3`, or under a
    low hard limit cannot shed it by claiming others). False if one cannot be had here (a lower
    nice, a real-time policy or a higher hard limit needs a privilege)."""
    import resource

    try:
        policy, param = os.sched_getscheduler(pid), os.sched_getparam(pid)
        if (os.sched_getscheduler(0), os.sched_getparam(0)) != (policy, param):
            os.sched_setscheduler(0, policy, param)
        if not _take_ioprio(pid):
            return False
        for n in _limit_numbers(resource):
            want = resource.prlimit(pid, n)
            if resource.getrlimit(n) != want:
                resource.setrlimit(n, want)
        nice = os.getpriority(os.PRIO_PROCESS, pid)
        if os.getpriority(os.PRIO_PROCESS, 0) != nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        cpus = os.sched_getaffinity(pid)
        if os.sched_getaffinity(0) != cpus:
            os.sched_setaffinity(0, cpus)
        oom = _read(f"/proc/{pid}/oom_score_adj").strip()
        if _read("/proc/self/oom_score_adj").strip() != oom:
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, oom)
            finally:
                os.close(fd)
    except (ValueError, OSError):
        return False
    return True
