"""Issue 13, attacker's review of the session's speed changes (R3). Each test injects one fault
at the exact instant (monkeypatch, events between the copy and the hash threads, a second
process that kills itself, a real sshd), on real files with real xattrs; none sleeps and none
times anything.

* cd83613 hashed the dir remote's large copy chunk by chunk while the copy went on, and let the
  checkout trust that hash: a write by another open of the file DURING the copy, after the
  hasher read that region, was vouched for (checkout) or stored as the object (stash): found
  here, so the copy is hashed once it is over again (and the checkout hashes what it
  fetched); a failed fetch followed by another remote's wrong bytes is refused;
* ef6c50e ``stash_ahead``: SIGKILL during the copy ahead leaves only a part (removed by the next
  command), the remote full during it leaves no part and the stash copies again;
* 995c8ec: a place plugin loaded through its entry point still decides per object;
* 8b73d8e / e3e144c: the dry-run prints byte for byte what 5185f06 printed on a tree of tricky
  names (partly walked by the forked helper), and ends as before when its reader leaves;
* ddd6464: a connection dropped while replies are read through ChunkPipe fails the fetch with
  one RemoteError line.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import jam_core.objects as objects
from jam_core import hookimpl
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.ops.checkout import checkout
from jam_core.ops.stash import stash
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import BIG, b3, is_stub, make_tree, on_another_disk, record, stashed_big

REPO = Path(__file__).resolve().parent.parent


class _Liar:
    """A third-party backend (kind ``liar``) that never hashes: it writes ``size`` bytes of
    garbage into the temporary file and says it fetched the object."""

    @hookimpl
    def fetch(self, remote, oid, dest, size, session):
        if remote.kind != "liar":
            return None
        fd = os.open(dest, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, b"\xa5" * size, 0)
        finally:
            os.close(fd)
        return True


def test_a_hash_left_by_a_failed_fetch_never_vouches_for_the_next_remote(tmp_path, monkeypatch):
    """The dir remote's fetch copies the whole object into the temporary file and then fails;
    the core resets the file and asks the next remote, which writes wrong bytes of the same
    size into the same inode. The core must hash them and refuse them."""
    import jam_dir

    t = make_tree(tmp_path)
    make_file(t.root / "big", BIG, seed=7)
    want = b3(t.root / "big")
    with Session() as s:
        res = stash(Root(t.root), ["big"], make_plugin_manager(), s)
    assert [r for r, _ in res.done] == ["big"], res
    cfg = t.root / ".jam" / "config.toml"
    cfg.write_text(
        cfg.read_text() + '\n[remote.liar]\nkind = "liar"\nurl = "liar://x"\nlocation = "liar://x"\ntier = 1\n'
    )
    oid = record(t.root / "big").oid
    real = jam_dir._copy
    copied = []

    def copy_then_fail(src, dst, size, progress):
        real(src, dst, size, progress)
        copied.append(size)
        raise OSError(errno.EIO, "injected: the remote failed after the copy")

    monkeypatch.setattr(jam_dir, "_copy", copy_then_fail)
    pm = make_plugin_manager()
    pm.register(_Liar(), name="liar-backend")
    root = Root(t.root)
    with Session() as s:
        res = checkout(root, ["big"], pm, s)
    assert copied == [BIG]  # the dir remote did write the right bytes first
    assert not res.done and res.failed, res
    why = res.failed[0][1]
    assert "injected" in why and "liar" in why and "corrupt" in why, why  # the liar was asked and refused
    assert is_stub(t.root / "big")
    assert record(t.root / "big").oid == oid and want == oid.split(":")[1]


# -- ef6c50e: SIGKILL while the copy ahead runs -----------------------------------------------

_KILLED_STASH = r"""
import os, signal, sys
import jam_core.ops.stash as sm
sm.AHEAD_MIN = 9 << 20  # the hook's threshold, lowered for a small file
import jam_dir
jam_dir._may_adopt = lambda *a, **k: False  # as on another disk: copied, not linked
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.root import Root
real = jam_dir._copy_range

def killing(src, dst, off, count, progress):
    real(src, dst, off, min(count, 1 << 20), progress)  # a first MiB of the copy ahead
    os.kill(os.getpid(), signal.SIGKILL)

jam_dir._copy_range = killing
with Session() as s:
    from pathlib import Path
    sm.stash(Root(Path(sys.argv[1])), ["big"], make_plugin_manager(), s)
"""


def test_a_stash_killed_during_its_copy_ahead_leaves_no_object_and_its_part_is_removed(tmp_path, monkeypatch):
    t = make_tree(tmp_path)
    make_file(t.root / "big", BIG, seed=11)
    want = b3(t.root / "big")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _KILLED_STASH, str(t.root)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode(errors="replace")[-2000:]
    objs = [p for p in (t.remote / "objects").rglob("*") if p.is_file()] if (t.remote / "objects").exists() else []
    assert objs == []  # a half copy never became an object
    parts = os.listdir(t.remote / "tmp")
    assert len(parts) == 1 and parts[0].endswith(".part"), parts  # the copy ahead, half written
    assert b3(t.root / "big") == want and not is_stub(t.root / "big")

    # The next command (its own copy ahead too) removes the dead process's part and stores it.
    import jam_core.ops.stash as stash_mod

    monkeypatch.setattr(stash_mod, "AHEAD_MIN", 9 << 20)
    with Session() as s:
        res = stash(Root(t.root), ["big"], make_plugin_manager(), s)
    assert [r for r, _ in res.done] == ["big"], res
    assert os.listdir(t.remote / "tmp") == []
    oid = record(t.root / "big").oid
    assert b3(t.remote / "objects" / objects.object_relpath(oid)) == want


# -- 8b73d8e / e3e144c: the dry-run's nominations, as the code at 5185f06 made them ----------

_OLD = "5185f06"  # before this session's dry-run changes


def _git_tree(rev: str, into: Path) -> Path | None:
    """The code at ``rev`` (jam_core and the plugins), or None where git or history is missing."""
    try:
        arch = subprocess.run(
            ["git", "-C", str(REPO), "archive", rev, "jam_core", "plugins"], capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=arch, check=True)
    return into


def _run_jam(code_dir: Path | None, args: list[str], cwd: Path, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """The console script's path (``main()`` with sys.argv): os._exit and all; ``code_dir``:
    another version of jam_core and its plugins first on the path."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    prog = "import sys; from jam_core.cli import main; sys.argv[0] = 'jam'; main()"
    if code_dir is not None:
        env["PYTHONPATH"] = f"{code_dir}:{code_dir / 'plugins'}"
        prog = (
            f"import sys, jam_core, jam_age; assert jam_core.__file__.startswith({str(code_dir)!r}); "
            f"assert jam_age.__file__.startswith({str(code_dir)!r}); " + prog
        )
    return subprocess.run([sys.executable, "-c", prog, *args], cwd=cwd, env=env, stdout=stdout, stderr=subprocess.PIPE)


def _tricky_tree(tmp_path: Path, large: bool = True) -> Path:
    """Old and new, large and below min_size, local and stubbed, in directories and names a
    careless join or split would break: spaces, quotes, a newline, a tab, a backslash, a
    leading dash, non-UTF-8 bytes, a glob, unicode, deep nesting."""
    t = make_tree(tmp_path)
    cfg = t.root / ".jam" / "config.toml"
    cfg.write_text(
        cfg.read_text().replace('min_size = "64KiB"', 'min_size = "4KiB"')
        + '\n[policy.age]\nolder_than = "30d"\n\n[policy.lru]\nkeep = "40%"\nby = "count"\n'
    )
    old = 1_600_000_000
    names = [
        b"plain",
        b"with space",
        b"quo\"te'",
        b"new\nline",
        b"tab\there",
        b"back\\slash",
        b"-dash",
        b"bad\xff\xfebytes",
        b"glob*?[x]",
        "été ☃".encode(),
        b"a/b/c/d/e/deep",
        b"sub dir/x",
        b"sub dir/y\nz",
        b"\xff dir/\xfe",
    ]
    root = os.fsencode(t.root)
    k = 0
    for i, name in enumerate(names):
        for size, age in ((20_000 + i, old), (100 + i, old), (30_000 + i, None), (50 + i, None)):
            k += 1
            path = os.path.join(root, name + b".%d" % k)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(bytes([k % 251]) * size)
            when = old + 1000 * k if age else None
            if when:
                os.utime(path, (when, when))
    # Over 5,000 files in 24 top directories: the walk shares the later ones with its forked
    # helper (scan.SHARE_AFTER), whose findings come back joined and split (records._SEP).
    for d in range(24 if large else 0):
        top = os.path.join(root, b"top%02d" % d)
        os.makedirs(top)
        for j in range(230):
            with open(os.path.join(top, b"s%d" % j), "wb") as f:
                f.write(b"x")
        for i, name in enumerate(names[:10]):
            for size, when in ((10_000 + d * 10 + i, old + 7 * d + i), (10, old), (12_000 + i, None)):
                k += 1
                path = os.path.join(top, name + b".%d" % k)
                with open(path, "wb") as f:
                    f.write(bytes([k % 251]) * size)
                if when is not None:
                    os.utime(path, (when, when))
    with Session() as s:  # some stubs too (clean stubs are nominated by no policy but count)
        stash(Root(t.root), [os.fsdecode(b"plain.1"), os.fsdecode(b"bad\xff\xfebytes.29")], make_plugin_manager(), s)
    return t.root


def _old_code_and_tricky_tree(tmp_path):
    """The code at 5185f06 (from git history: skipped without it) and a tree of tricky names."""
    old_code = _git_tree(_OLD, tmp_path / "old")
    if old_code is None:
        pytest.skip("no git history here")
    return old_code, _tricky_tree(tmp_path)


def test_the_dry_run_nominates_what_it_did_before_this_session(tmp_path):
    old_code, root = _old_code_and_tricky_tree(tmp_path)
    args = ["stash", "--auto", "--dry-run"]
    before = _run_jam(old_code, args, root)
    after = _run_jam(None, args, root)
    assert before.returncode == 0, before.stderr.decode(errors="replace")[-3000:]
    assert after.returncode == before.returncode, after.stderr.decode(errors="replace")[-3000:]
    assert after.stderr == before.stderr
    assert before.stdout.count(b"\n") >= 200  # the tree did nominate files
    assert after.stdout == before.stdout, "the nominations differ"


# -- ddd6464: the connection dropped while a reply is read through ChunkPipe ------------------


@pytest.mark.parametrize("after_reads", [1, 7])
def test_a_connection_dropped_mid_read_fails_the_fetch_and_never_returns_it_whole(
    sshd, sftp_store, tmp_path, monkeypatch, after_reads
):
    """A big object fetched in ranges; after a few reads from the channel's ChunkPipe (a reply
    partly taken, chunks still buffered) the SSH transport drops. The fetch must end with a
    one-line RemoteError (no hang, no traceback), and with the core's own check the stub stays."""
    import paramiko

    from jam_core.errors import RemoteError
    from jam_sftp import parallel
    from jam_sftp.connect import ChunkPipe
    from tests.conftest_sshd import sftp_remote_for

    monkeypatch.setattr(parallel, "RANGE_MIN", 1 << 20)
    monkeypatch.setattr(parallel, "CHUNK", 256 << 10)
    (sftp_store / "objects").mkdir()
    (sftp_store / "tmp").mkdir()
    remote = sftp_remote_for(f"sftp://{sshd.alias}{sftp_store}")
    pm = make_plugin_manager(load_entrypoints=False)
    src = tmp_path / "big.bin"
    make_file(src, (3 << 20) + 555, seed=19)
    oid, size = objects.hash_file(src)
    with Session() as s:
        assert pm.hook.stash(remote=remote, oid=oid, source=src, size=size, session=s)

    orig = ChunkPipe.read
    reads = []
    dropped = []

    def drop_after(self, nbytes, timeout=None):
        out = orig(self, nbytes, timeout)  # (outside the pipe's lock: a close takes it)
        reads.append(len(out))
        if len(reads) == after_reads and not dropped:
            # the reader's own transport: found through the channel whose buffer this is
            for t in list(_transports):
                t.close()
            dropped.append(True)
        return out

    _transports: list[paramiko.Transport] = []
    orig_start = paramiko.Transport.start_client

    def track(self, *a, **k):
        _transports.append(self)
        return orig_start(self, *a, **k)

    monkeypatch.setattr(paramiko.Transport, "start_client", track)
    back = tmp_path / "back"
    back.write_bytes(b"")
    with Session() as s:
        monkeypatch.setattr(ChunkPipe, "read", drop_after)
        with pytest.raises(RemoteError) as info:
            pm.hook.fetch(remote=remote, oid=oid, dest=back, size=size, session=s)
    assert dropped
    assert "\n" not in str(info.value) and str(info.value), info.value


# -- 995c8ec: a place plugin through the real entry-point group still decides per object ------

_SPLITTER = '''
from jam_core import hookimpl


@hookimpl
def place(oid, remotes):
    """Objects whose id's last hex digit is even go to 'even', the others to 'odd'."""
    want = "even" if int(oid[-1], 16) % 2 == 0 else "odd"
    return [r for r in remotes if r.name == want] or None
'''


def test_a_place_plugin_from_an_entry_point_decides_for_every_object(tmp_path):
    """Two remotes on two tiers (the default placement would send all to the nearer); a
    third-party place plugin loaded by the real `jam` through its entry point (and chosen by
    JAM_LOAD_PLUGINS) splits the objects by id: every stub names the remote it chose, never
    the first answer reused (mutation-checked: stash._placement_is_fixed forced True fails it)."""
    from jam_core.ops.remotes import add_remote
    from tests.safety_support import jam

    site = tmp_path / "site"
    (site / "jam_test_splitter-0.1.dist-info").mkdir(parents=True)
    (site / "jam_test_splitter.py").write_text(_SPLITTER)
    (site / "jam_test_splitter-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: jam-test-splitter\nVersion: 0.1\n"
    )
    (site / "jam_test_splitter-0.1.dist-info" / "entry_points.txt").write_text("[jam]\nsplitter = jam_test_splitter\n")
    root_dir = tmp_path / "root"
    root_dir.mkdir()
    root, _ = Root.init(root_dir)
    for name, tier in (("even", 0), ("odd", 1)):
        (tmp_path / name).mkdir()
        add_remote(root, make_plugin_manager(), name, str(tmp_path / name), tier=tier)
    want, oids = {}, {}
    for i in range(12):
        make_file(root_dir / f"f{i}", 70_000 + i, seed=100 + i)
        oids[f"f{i}"] = oid = "b3:" + b3(root_dir / f"f{i}")
        want[f"f{i}"] = "even" if int(oid[-1], 16) % 2 == 0 else "odd"
    assert set(want.values()) == {"even", "odd"}  # both answers are needed
    env = dict(os.environ, PYTHONPATH=str(site), JAM_LOAD_PLUGINS="splitter")
    jam("stash", *want, cwd=root_dir, env=env)
    assert all(is_stub(root_dir / name) for name in want)
    got = {
        name: tuple(
            r for r in ("even", "odd") if (tmp_path / r / "objects" / objects.object_relpath(oids[name])).is_file()
        )
        for name in want
    }
    assert got == {name: (r,) for name, r in want.items()}


# -- ef6c50e: the remote full in the middle of the copy ahead ---------------------------------


def test_a_copy_ahead_that_fills_the_remote_leaves_no_part_and_the_stash_copies_again(tmp_path, monkeypatch):
    """The first large copy (the one started ahead) writes a MiB and then finds the remote full;
    the stash is not harmed: its half-written part is removed before the copy made after the
    hash, which stores a verified object (mutation-checked: _Ahead.drop without its unlink
    leaves the part behind)."""
    import jam_core.ops.stash as stash_mod
    import jam_dir

    monkeypatch.setattr(stash_mod, "AHEAD_MIN", 9 << 20)
    on_another_disk(monkeypatch)
    t = make_tree(tmp_path)
    make_file(t.root / "big", BIG, seed=29)
    want = b3(t.root / "big")
    real = jam_dir._copy_range
    calls = []
    parts_at_second_copy = []

    def full_once(src, dst, off, count, progress):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:  # the space the half copy ahead took is free again by now
            parts_at_second_copy.extend(os.listdir(t.remote / "tmp"))
        if len(calls) == 1:
            real(src, dst, off, min(count, 1 << 20), progress)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(src, dst, off, count, progress)

    monkeypatch.setattr(jam_dir, "_copy_range", full_once)
    with Session() as s:
        res = stash(Root(t.root), ["big"], make_plugin_manager(), s)
        parts_before_close = os.listdir(t.remote / "tmp")
    assert len(calls) >= 2  # the copy ahead, then the stash's own copy
    assert len(parts_at_second_copy) == 1, parts_at_second_copy  # its own part only
    assert [r for r, _ in res.done] == ["big"], res
    assert parts_before_close == [] and os.listdir(t.remote / "tmp") == []
    oid = record(t.root / "big").oid
    assert b3(t.remote / "objects" / objects.object_relpath(oid)) == want == oid.split(":")[1]


def _closed_after_first_line(code_dir: Path | None, args: list[str], cwd: Path) -> tuple[int, bytes]:
    """Run jam with stdout a pipe of one page, closed by its reader after the first line (as
    ``| head -1``): the exit status and stderr."""
    import fcntl

    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    prog = "import sys; from jam_core.cli import main; sys.argv[0] = 'jam'; main()"
    if code_dir is not None:
        env["PYTHONPATH"] = f"{code_dir}:{code_dir / 'plugins'}"
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: the output is more than the pipe holds
    proc = subprocess.Popen([sys.executable, "-c", prog, *args], cwd=cwd, env=env, stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    with os.fdopen(r, "rb") as out:
        out.readline()
    err = proc.stderr.read()
    proc.stderr.close()
    return proc.wait(), err


def test_a_dry_run_whose_reader_leaves_ends_as_before(tmp_path):
    """`jam stash --auto --dry-run | head -1`: the reader goes after one line; the dry-run ends
    as the code at 5185f06 did (SIGPIPE's status, nothing on stderr), os._exit or not."""
    old_code, root = _old_code_and_tricky_tree(tmp_path)
    args = ["stash", "--auto", "--dry-run"]
    before = _closed_after_first_line(old_code, args, root)
    after = _closed_after_first_line(None, args, root)
    assert b"Traceback" not in before[1] + after[1]
    assert after == before, (after, before)


# -- a write into the fetched file or the part DURING the copy is in what is hashed -----------


def _another_writer_during_the_copy(monkeypatch) -> list:
    """The dir remote copies in 1 MiB pieces; after the first, another open of the copy's
    destination writes into bytes already copied. Returns the list that says it wrote."""
    import jam_dir

    real = jam_dir._copy_range
    wrote: list = []

    def in_pieces(src, dst, off, count, progress):
        end = off + count
        while off < end:
            n = min(1 << 20, end - off)
            real(src, dst, off, n, progress)
            off += n
            if not wrote and off < end:
                other = os.open(f"/proc/self/fd/{dst}", os.O_WRONLY)  # another writer's own open
                try:
                    os.pwrite(other, b"\0SOMEONE ELSE WROTE THIS\0", 100)
                finally:
                    os.close(other)
                wrote.append(True)

    monkeypatch.setattr(jam_dir, "_copy_range", in_pieces)
    return wrote


def test_a_write_during_the_copy_after_its_bytes_were_hashed_is_not_vouched_for(tmp_path, monkeypatch):
    import jam_dir

    t, want = stashed_big(tmp_path, seed=37)
    wrote = _another_writer_during_the_copy(monkeypatch)
    with Session() as s:
        res = checkout(Root(t.root), ["big"], make_plugin_manager(), s)
    assert wrote
    if res.done:  # taken: then it must hold the object's bytes, not the other writer's
        assert b3(t.root / "big") == want, "checkout swapped in bytes that were never verified"
    else:
        assert is_stub(t.root / "big")


def test_a_write_into_the_remotes_part_during_the_copy_never_becomes_the_object(tmp_path, monkeypatch):
    import jam_dir

    on_another_disk(monkeypatch)
    t = make_tree(tmp_path)
    make_file(t.root / "big", BIG, seed=43)
    want = b3(t.root / "big")
    wrote = _another_writer_during_the_copy(monkeypatch)
    with Session() as s:
        res = stash(Root(t.root), ["big"], make_plugin_manager(), s)
    assert wrote
    if res.done:  # stubbed: the remote must hold the file's bytes under its id
        oid = record(t.root / "big").oid
        assert b3(t.remote / "objects" / objects.object_relpath(oid)) == want, "the object is not the file"
    else:
        assert b3(t.root / "big") == want and not is_stub(t.root / "big")
