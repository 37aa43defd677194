"""`jam daemon`: stubs fill in when any program opens them (fanotify pre-content events).

Real stubs on the real filesystem, the real `jam daemon` as a subprocess (the fixture waits
for its readiness line), real readers (open, mmap, cp, exec). Faults are injected at the exact
instant with fanotify itself: a test group holding FAN_OPEN_PERM on the remote's object file
stops the worker inside its fetch, for as long as the test wants (its pid is the event's).
Fetches are counted with inotify IN_OPEN on the object file. Skipped only where the kernel
has no pre-content events (probed once), or without root.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jam_core.daemon import fanotify as F
from tests.conftest import make_file

_MISSING = F.probe()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"no on-access hydration here: {_MISSING}")
READY = "jam daemon: serving "
HANG = 60  # seconds: a reader still blocked after this is a hang (the test fails, never waits forever)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha_file(path) -> str:
    with open(path, "rb") as f:
        return sha(f.read())


def is_stub(path) -> bool:
    """Without opening it (an open would hydrate it): it still carries user.jam."""
    try:
        os.getxattr(path, "user.jam", follow_symlinks=False)
        return True
    except OSError:
        return False


class Daemon:
    def __init__(self, jam_bin: str, root: Path, *args: str):
        self.err = open(root.parent / f"daemon-{os.getpid()}-{id(self)}.err", "w+")
        self.proc = subprocess.Popen([jam_bin, "daemon", str(root), *args], stdout=subprocess.PIPE,
                                     stderr=self.err, text=True)
        self.line = self.proc.stdout.readline()
        assert self.line.startswith(READY), f"daemon did not start: {self.line!r} {self.stderr()}"

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=HANG)
        self.proc.stdout.close()
        return code


@pytest.fixture
def stash(jam_root):
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash as do_stash

    def run(*rels):
        res = do_stash(jam_root, list(rels), make_plugin_manager())
        assert not res.failed, res.failed
        for r in rels:
            assert is_stub(jam_root.path / r)

    return run


@pytest.fixture
def daemon(jam_root, jam_bin):
    started = []

    def start(*args):
        d = Daemon(jam_bin, jam_root.path, *args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def object_path(root, rel) -> Path:
    from jam_core.objects import object_relpath
    from jam_core.stub import read_record

    rec = read_record(str(root.path / rel))
    loc = Path(root.remotes()[0].location)
    return loc / "objects" / object_relpath(rec.oid)


class OpenCounter:
    """inotify IN_OPEN on one file: how many times it was opened."""

    def __init__(self, path: Path):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        assert libc.inotify_add_watch(self.fd, os.fsencode(path), 0x20) >= 0  # IN_OPEN

    def count(self) -> int:
        n = 0
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return n
            i = 0
            while i < len(buf):
                _wd, mask, _cookie, ln = struct.unpack_from("=iIII", buf, i)
                if mask & 0x20:
                    n += 1
                i += 16 + ln

    def close(self):
        os.close(self.fd)


class Gate:
    """A fanotify FAN_OPEN_PERM mark of the test's own on a remote's object: whoever opens it
    (the daemon's worker, fetching) waits until the test answers."""

    def __init__(self, path: Path):
        self.fan = F.init(F.FAN_CLASS_CONTENT | F.FAN_CLOEXEC, os.O_RDONLY | os.O_LARGEFILE)
        F.mark(self.fan, F.FAN_MARK_ADD, F.FAN_OPEN_PERM, -100, str(path))

    def wait(self) -> F.Event:
        r, _, _ = select.select([self.fan], [], [], HANG)
        assert r, "the worker never opened the object"
        (ev,) = F.parse(os.read(self.fan, 4096))
        return ev

    def allow(self, ev: F.Event) -> None:
        F.respond(self.fan, ev.fd, F.FAN_ALLOW)
        os.close(ev.fd)

    def close(self):
        os.close(self.fan)


def read_in_thread(path: Path):
    out = {}

    def run():
        try:
            with open(path, "rb") as f:
                out["data"] = f.read()
        except OSError as exc:
            out["error"] = exc.errno

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# -- what readers see ----------------------------------------------------------------------------

def test_open_read_mmap_cp_exec_give_the_original_bytes(jam_root, stash, daemon, tmp_path):
    r = jam_root.path
    big = make_file(r / "big.bin", 5 << 20, 1)
    mapped = make_file(r / "mapped.bin", 300_000, 2)
    copied = make_file(r / "copied.bin", 2 << 20, 3)
    (r / "tool.sh").write_text("#!/bin/sh\necho tool ran\n")
    os.chmod(r / "tool.sh", 0o755)
    os.setxattr(r / "big.bin", "user.note", b"kept")
    stash("big.bin", "mapped.bin", "copied.bin", "tool.sh")
    d = daemon()
    assert "4 stubs" in d.line

    assert sha_file(r / "big.bin") == sha(big)
    with open(r / "mapped.bin", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert sha(m[:]) == sha(mapped)
    subprocess.run(["cp", "--sparse=always", str(r / "copied.bin"), str(tmp_path / "out.bin")], check=True)
    assert sha_file(tmp_path / "out.bin") == sha(copied)
    assert subprocess.run([str(r / "tool.sh")], capture_output=True, text=True, check=True).stdout == "tool ran\n"

    assert d.stop() == 0  # a planned stop finishes what was filled (durable, then user.jam removed)
    st = os.stat(r / "big.bin")
    assert not is_stub(r / "big.bin") and os.getxattr(r / "big.bin", "user.note") == b"kept"
    assert st.st_mode & 0o777 == 0o644
    assert os.stat(r / "tool.sh").st_mode & 0o777 == 0o755
    from jam_core.catalog import Catalog

    with Catalog(jam_root.jam_dir / "catalog.db") as cat:  # the stub rows went, uses recorded
        assert set(cat.stubs()) == set()
        assert {"big.bin", "mapped.bin"} <= set(cat.uses())


def test_the_open_alone_fills_it_so_a_sparse_copy_sees_data(jam_root, stash, daemon):
    """cp's sparse path asks where data is (SEEK_DATA/SEEK_HOLE) and may never read a hole:
    the open itself must fill the stub, or a copy would be the header and zeros."""
    r = jam_root.path
    data = make_file(r / "sparse.bin", 1 << 20, 12)
    stash("sparse.bin")
    daemon()
    fd = os.open(r / "sparse.bin", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == len(data)  # no hole left: the content is there
    finally:
        os.close(fd)
    assert sha_file(r / "sparse.bin") == sha(data)


def test_hundred_readers_one_fetch(jam_root, stash, daemon):
    r = jam_root.path
    data = make_file(r / "one.bin", 1 << 20, 4)
    make_file(r / "alone.bin", 1 << 20, 5)
    stash("one.bin", "alone.bin")
    counters = OpenCounter(object_path(jam_root, "one.bin")), OpenCounter(object_path(jam_root, "alone.bin"))
    gate = Gate(object_path(jam_root, "one.bin"))
    daemon()
    sha_file(r / "alone.bin")
    per_fetch = counters[1].count()
    assert per_fetch >= 1
    readers = [read_in_thread(r / "one.bin") for _ in range(100)]
    ev = gate.wait()  # the first fetch is held until every reader is waiting on the stub
    gate.allow(ev)
    gate.close()
    for t, out in readers:
        t.join(HANG)
        assert not t.is_alive() and sha(out["data"]) == sha(data)
    assert counters[0].count() == per_fetch  # one fetch, however many readers


def test_remote_down_gives_eio_not_zeros(jam_root, stash, daemon):
    r = jam_root.path
    data = make_file(r / "f.bin", 200_000, 6)
    stash("f.bin")
    loc = Path(jam_root.remotes()[0].location)
    daemon()
    loc.rename(loc.with_name("away"))
    with pytest.raises(OSError) as exc:
        (r / "f.bin").read_bytes()
    assert exc.value.errno == errno.EIO
    assert is_stub(r / "f.bin") and os.stat(r / "f.bin").st_blocks * 512 <= 8192  # still a stub
    loc.with_name("away").rename(loc)
    assert sha_file(r / "f.bin") == sha(data)  # still marked: the next open fills it


def test_worker_killed_mid_fetch_loses_nothing(jam_root, stash, daemon):
    r = jam_root.path
    data = make_file(r / "k.bin", 3 << 20, 7)
    stash("k.bin")
    gate = Gate(object_path(jam_root, "k.bin"))
    d = daemon()
    t, out = read_in_thread(r / "k.bin")
    ev = gate.wait()  # the worker is inside its fetch
    worker = ev.pid
    os.kill(worker, signal.SIGKILL)
    gate.allow(ev)  # the killed worker's open: nobody is left to read
    ev2 = gate.wait()  # a new worker fetches again
    assert ev2.pid != worker
    gate.allow(ev2)
    gate.close()
    t.join(HANG)
    assert not t.is_alive() and "data" in out and sha(out["data"]) == sha(data)
    assert d.stop() == 0  # a planned stop finishes what was filled (durable, then user.jam removed)
    assert not is_stub(r / "k.bin")
    assert "worker ended" in d.stderr()


def test_stub_made_while_running_hydrates(jam_root, daemon, jam_bin):
    r = jam_root.path
    daemon()
    data = make_file(r / "late.bin", 500_000, 8)
    subprocess.run([jam_bin, "stash", "late.bin"], check=True, cwd=r, capture_output=True)
    assert is_stub(r / "late.bin")
    assert sha_file(r / "late.bin") == sha(data)


def test_jam_itself_reads_stubs_without_hydrating(jam_root, stash, daemon, jam_bin):
    r = jam_root.path
    data = make_file(r / "j.bin", 300_000, 9)
    make_file(r / "k.bin", 300_000, 10)
    stash("j.bin", "k.bin")
    daemon()
    doc = subprocess.run([jam_bin, "doctor", "--deep"], cwd=r, capture_output=True, text=True)
    assert "on-access hydration is active" in doc.stdout, doc.stdout + doc.stderr
    assert is_stub(r / "j.bin") and is_stub(r / "k.bin")  # looked at, not fetched
    res = subprocess.run([jam_bin, "checkout", "j.bin"], cwd=r, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sha_file(r / "j.bin") == sha(data)


def test_stop_answers_waiting_readers_eagain_and_restart_serves(jam_root, stash, daemon, jam_bin):
    r = jam_root.path
    data = make_file(r / "s.bin", 400_000, 11)
    stash("s.bin")
    gate = Gate(object_path(jam_root, "s.bin"))
    d = daemon()
    t, out = read_in_thread(r / "s.bin")
    ev = gate.wait()  # a fetch in flight
    d.proc.send_signal(signal.SIGTERM)
    t.join(HANG)
    assert not t.is_alive() and out.get("error") == errno.EAGAIN, out.keys()
    gate.allow(ev)
    gate.close()
    assert d.stop() == 0
    assert not (jam_root.jam_dir / "daemon.sock").exists() and not (jam_root.jam_dir / "daemon.pid").exists()
    # the fetch the stop cut short either never filled the stub or finished it, verified
    assert is_stub(r / "s.bin") or sha_file(r / "s.bin") == sha(data)
    doc = subprocess.run([jam_bin, "doctor"], cwd=r, capture_output=True, text=True)
    assert "on-access hydration is off: no `jam daemon` serves this root" in doc.stdout  # the reason, no stray line
    daemon()
    assert sha_file(r / "s.bin") == sha(data)


def test_one_daemon_per_root(jam_root, daemon, jam_bin):
    daemon()
    res = subprocess.run([jam_bin, "daemon", str(jam_root.path)], capture_output=True, text=True, timeout=HANG)
    assert res.returncode == 2 and res.stderr.startswith("jam: another jam daemon (pid ")
    assert len(res.stderr.splitlines()) == 1


def test_missing_kernel_support_or_privilege_is_one_line(jam_root, runner, monkeypatch):
    import jam_core.cli.daemon  # noqa: F401  (registers the command)
    from jam_core.cli import main

    def no_perm(flags, event_f_flags):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(F, "init", no_perm)
    res = runner.invoke(main, ["daemon"])
    assert res.exit_code == 1
    assert res.output.strip() == ("jam: on-access hydration is not available: fanotify needs CAP_SYS_ADMIN: "
                                  "run `jam daemon` as root (or with that capability)")

    def no_kernel(flags, event_f_flags):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(F, "init", no_kernel)
    res = runner.invoke(main, ["daemon"])
    assert res.exit_code == 1 and "no fanotify pre-content support (Linux >= 6.14 needed)" in res.output


# -- what the daemon keeps up to date while it runs -----------------------------------------------

def idle(root) -> None:
    """Wait until the daemon has nothing queued or in progress (its own answer, not a sleep)."""
    from jam_core.daemon.client import wait_idle

    assert wait_idle(root.path if hasattr(root, "path") else root, HANG), "the daemon never became idle"


def test_directory_made_while_running_records_use(jam_root, daemon):
    from jam_core.catalog import Catalog

    r = jam_root.path
    daemon()
    idle(jam_root)
    (r / "new" / "deeper").mkdir(parents=True)  # made after the daemon marked the root's directories
    outside = r.parent / "outside-tree"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "m.txt").write_text("moved in\n")
    idle(jam_root)
    (r / "new" / "deeper" / "f.txt").write_text("hello\n")
    os.rename(outside, r / "movedin")  # a tree moved into the root, with what is already in it
    idle(jam_root)
    assert (r / "new" / "deeper" / "f.txt").read_text() == "hello\n"
    assert (r / "movedin" / "sub" / "m.txt").read_text() == "moved in\n"
    idle(jam_root)
    with Catalog(jam_root.jam_dir / "catalog.db") as cat:
        used = set(cat.uses())
    assert {"new/deeper/f.txt", "movedin/sub/m.txt"} <= used, used


def test_fill_clears_the_cd_hooks_index(jam_root, stash, daemon):
    from jam_core.hook.index import MARK, index_path

    r = jam_root.path
    data = make_file(r / "d" / "a.bin", 100_000, 13)
    make_file(r / "two" / "b.bin", 100_000, 14)
    make_file(r / "two" / "c.bin", 100_000, 15)
    stash("d/a.bin", "two/b.bin", "two/c.bin")
    index = Path(index_path(jam_root))

    def marked(rel) -> bool:
        return bool(os.stat(index / rel).st_mode & MARK)

    assert marked("d") and marked("two")  # stash listed both for the cd hook
    owner = os.stat(index / "d").st_uid
    daemon()
    assert sha_file(r / "d" / "a.bin") == sha(data)
    sha_file(r / "two" / "b.bin")
    idle(jam_root)
    assert not marked("d")  # nothing left to fetch there: a cd into it runs no fetch
    assert marked("two")  # c.bin is still a stub
    assert os.stat(index / "d").st_uid == owner  # changed in place, never made anew


@pytest.fixture
def nobody_root():
    """A root owned by the user `nobody`, and `run(*args)`: jam as that user. The user keeps
    CAP_DAC_READ_SEARCH only to run this test's Python from under /root; it does not open a
    root-only socket."""
    import pwd
    import shutil
    import tempfile

    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed"
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="jam-daemon-user-", dir="/var/tmp"))
    try:
        os.chmod(base, 0o755)
        home, root = base / "home", base / "root"
        for p in (home, root):
            p.mkdir()
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
        env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data"),
               "XDG_CONFIG_HOME": str(home / "config"), "XDG_CACHE_HOME": str(home / "cache")}
        as_user = [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                   "--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search"]

        def run(jam_bin, *args):
            res = subprocess.run([*as_user, jam_bin, *args], cwd=root, env=env, capture_output=True, text=True,
                                 timeout=HANG)
            assert res.returncode == 0, res.stderr
            return res

        yield base, root, run, nobody
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_stub_stashed_by_the_roots_non_root_owner_hydrates(nobody_root, jam_bin):
    """The daemon runs as root; the root belongs to a user whose `jam stash` must reach
    daemon.sock to have its new stubs marked."""
    base, root, run_as, nobody = nobody_root

    def run(*args):
        return run_as(jam_bin, *args)

    run("init", ".")
    data = make_file(root / "mine.bin", 300_000, 16)
    os.chown(root / "mine.bin", nobody.pw_uid, nobody.pw_gid)
    d = Daemon(jam_bin, root)
    try:
        idle(root)
        run("stash", "mine.bin")
        assert is_stub(root / "mine.bin")
        # the user plants a symlink where the daemon's catalog journal goes: the daemon
        # (root) writes the catalog with the user's rights alone, never through it
        victim = base / "victim"
        victim.write_bytes(b"root's file\n")
        wal = root / ".jam" / "catalog.db-wal"
        if wal.exists() or wal.is_symlink():
            wal.unlink()
        os.symlink(victim, wal)
        os.lchown(wal, nobody.pw_uid, nobody.pw_gid)
        assert sha_file(root / "mine.bin") == sha(data)  # marked through the socket: filled on open
        idle(root)
        assert victim.read_bytes() == b"root's file\n" and os.stat(victim).st_uid == 0
        wal.unlink()
        assert os.stat(root / "mine.bin").st_uid == nobody.pw_uid
        # the daemon wrote the catalog (the fill): it stays the user's to write
        more = make_file(root / "more.bin", 200_000, 17)
        os.chown(root / "more.bin", nobody.pw_uid, nobody.pw_gid)
        run("stash", "more.bin")
        run("status")
        assert sha_file(root / "more.bin") == sha(more)
    finally:
        assert d.stop() == 0


def test_fill_through_the_backends_keeps_the_users_config_the_users(nobody_root, jam_bin):
    """An object too big for the in-memory path goes through the backends' fetch, which may
    record an older remote's identity in ROOT/.jam/config.toml: the daemon (root) does that as
    the root's owner, so the user can still change their own config afterwards."""
    from jam_core.daemon.worker import MEM_MAX

    base, root, run_as, nobody = nobody_root

    def run(*args):
        return run_as(jam_bin, *args)

    run("init", ".")
    big = root / "big.bin"
    with open(big, "wb") as f:  # mostly a hole: quick to make, hash and store
        f.truncate(MEM_MAX + (1 << 20))
        f.write(os.urandom(4096))
    os.chown(big, nobody.pw_uid, nobody.pw_gid)
    want = sha_file(big)
    run("stash", "big.bin")
    config = root / ".jam" / "config.toml"
    text = config.read_text()
    kept, section = [], ""
    for line in text.splitlines():  # an older jam's remote: no recorded id
        section = line if line.startswith("[") else section
        if not (section.startswith("[remote.") and line.startswith("id = ")):
            kept.append(line)
    older = "\n".join(kept)
    assert older != text
    config.write_text(older + "\n")
    os.chown(config, nobody.pw_uid, nobody.pw_gid)
    d = Daemon(jam_bin, root)
    try:
        idle(root)
        assert sha_file(big) == want
        idle(root)
    finally:
        assert d.stop() == 0
    assert os.stat(config).st_uid == nobody.pw_uid
    run("remote", "add", "spare", str(base / "home"))  # the user can still write their config


def test_corrupt_object_gives_eio_and_the_stub_stays(jam_root, stash, daemon):
    """The object on the remote was changed (same size, other bytes): the reader gets EIO,
    never those bytes, and the stub is left exactly as it was."""
    from jam_core.stub import read_record, verify_clean_path

    r = jam_root.path
    data = make_file(r / "c.bin", 1 << 20, 18)
    stash("c.bin")
    rec = read_record(str(r / "c.bin"))
    obj = object_path(jam_root, "c.bin")
    good = obj.read_bytes()
    os.chmod(obj, 0o644)
    obj.write_bytes(bytes(len(good)))  # the right size, the wrong content
    d = daemon()
    with pytest.raises(OSError) as exc:
        (r / "c.bin").read_bytes()
    assert exc.value.errno == errno.EIO
    assert d.stop() == 0  # (an open by this test would go to the daemon again)
    assert is_stub(r / "c.bin") and verify_clean_path(r / "c.bin", rec)  # header and hole, untouched
    obj.write_bytes(good)
    daemon()
    assert sha_file(r / "c.bin") == sha(data)


def test_a_filled_stub_is_never_filled_over_again(jam_root, stash):
    """Once its readers are answered a filled stub may be written into before the finisher
    makes it a plain file (xattrs removed). An open queued before the mark went, or a new
    worker after one died in that window, must never fetch over those writes. The worker is
    driven directly (no fanotify): its `handle` is what each event runs."""
    from jam_core.daemon.worker import FILLING, Worker
    from jam_core.fs import getxattr
    from jam_core.stub import XATTR

    data = make_file(jam_root.path / "a.bin", 300_000, 21)
    data2 = make_file(jam_root.path / "b.bin", 300_000, 22)
    stash("a.bin", "b.bin")
    worker = Worker([str(jam_root.path)])
    for name in ("a.bin", "b.bin"):
        fd = os.open(jam_root.path / name, os.O_RDWR)
        try:
            assert worker.handle(fd) == 0  # the first event: filled
        finally:
            os.close(fd)
    assert sha_file(jam_root.path / "a.bin") == sha(data)
    assert getxattr(str(jam_root.path / "a.bin"), FILLING) == b"done"  # not finished yet
    with open(jam_root.path / "a.bin", "r+b") as f:  # the answered reader writes
        f.write(b"the user's edit")
    edited = (jam_root.path / "a.bin").read_bytes()
    fetches = worker.fetches
    fd = os.open(jam_root.path / "a.bin", os.O_RDWR)  # an open queued before the mark went (event fds are O_RDWR)
    try:
        assert worker.handle(fd) == 0
    finally:
        os.close(fd)
    assert worker.fetches == fetches
    assert (jam_root.path / "a.bin").read_bytes() == edited, "a fill went over the user's write"
    # a new worker (the first died before finishing): the edited file is kept as it is, the
    # untouched one is finished (its content is the object's)
    again = Worker([str(jam_root.path)])
    for name in ("a.bin", "b.bin"):
        fd = os.open(jam_root.path / name, os.O_RDWR)
        try:
            assert again.handle(fd) == 0
        finally:
            os.close(fd)
    assert again.fetches == 0
    assert (jam_root.path / "a.bin").read_bytes() == edited, "a new worker filled over the user's write"
    assert sha_file(jam_root.path / "b.bin") == sha(data2)
    fd, tmp = again.finishing.get_nowait()
    assert os.path.samefile(f"/proc/self/fd/{fd}", jam_root.path / "b.bin")
    os.close(fd)
    assert XATTR in os.listxattr(jam_root.path / "a.bin")  # still marked: doctor reports it written into
