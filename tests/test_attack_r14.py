"""R14: an attacker's review of `jam doctor` (exit 0 only if every stub can come back; --fix never
loses a byte). Each test breaks one thing on real files (real xattrs, real dir remotes, real
processes, a real mount) and checks what doctor says. Attacks already in test_doctor*.py,
test_stub_safety.py, test_attack_r8/r9/r10.py, test_history_chunks.py and test_copies_faults.py
are not repeated here. A test marked xfail(strict=True) is a hole found (the fix is in R14's
report)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from jam_core.manager import make_plugin_manager
from jam_core.objects import object_relpath
from jam_core.ops.remotes import add_remote
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import JAM, jam, make_tree, record

SIZE = 200_000


def _doctor(cwd, *args, check, env=None) -> dict:
    return json.loads(jam("doctor", "--json", *args, cwd=cwd, check=check, env=env).out)


def _problems(out) -> list[tuple[str, str, bool]]:
    return [(c["kind"], c["path"], c["fixed"]) for c in out["checks"] if c["status"] == "problem"]


def _root(tmp_path: Path, remotes: dict[str, tuple[Path, int, dict]], copies: int = 1) -> Root:
    """A root with dir remotes ``{name: (location, tier, options)}`` and ``[place] copies``."""
    pm = make_plugin_manager()
    path = tmp_path / "r"
    path.mkdir()
    root, _ = Root.init(path, default_remote=False)
    for name, (loc, tier, opts) in remotes.items():
        loc.mkdir(exist_ok=True)
        add_remote(root, pm, name, str(loc), tier, options=opts)
    with root.lock():
        root.update_config(lambda own: own.setdefault("place", {}).__setitem__("copies", copies))
    return Root.find(path)


def _obj(loc: Path, oid: str) -> Path:
    return loc / "objects" / object_relpath(oid)


# -- 1. a copy on an edge cache is not a copy -------------------------------------------------------------

def _edge_setup(tmp_path, copies):
    edge, far, far2 = tmp_path / "edge", tmp_path / "far", tmp_path / "far2"
    remotes = {"edge": (edge, 0, {"cache": "7d"}), "far": (far, 1, {})}
    if copies > 1:
        remotes["far2"] = (far2, 2, {})
    root = _root(tmp_path, remotes, copies)
    make_file(root.path / "f.bin", SIZE, seed=1)
    jam("stash", "f.bin", cwd=root.path)
    oid = record(root.path / "f.bin").oid
    assert _obj(edge, oid).is_file() and _obj(far, oid).is_file()
    return root, edge, far, far2, oid


def test_an_edge_cache_copy_does_not_make_up_for_a_lost_mirror(tmp_path):
    """copies = 2 over `far` and `far2`, with an edge cache in front (README: a cache's copies do
    not count as copies; `jam gc` expires it only while the count holds elsewhere). far2 loses
    the object: one durable copy is left, and doctor must say so (`copies`, exit 1), not count
    the edge's copy as the second.
    Guard (mutation-checked): doctor._Doctor.check_objects's ``held = (...) - caches``
    (placement.is_cache: a cache's copy is not counted)."""
    root, edge, far, far2, oid = _edge_setup(tmp_path, copies=2)
    assert _obj(far2, oid).is_file()
    _obj(far2, oid).unlink()
    out = _doctor(root.path, check=1)
    assert ("copies", "f.bin", False) in _problems(out), out["checks"]


def test_an_object_only_on_an_edge_cache_is_reported(tmp_path):
    """copies = 1: `far`, the only durable remote, loses the object; only the edge cache (which
    expires what is not used) holds it. The stub can come back today, but no copy that counts is
    left: doctor must not answer "all can come back" with exit 0.
    Guard (mutation-checked): doctor._Doctor.check_objects counts copies whenever a remote is a
    cache, caches taken out (``held = (...) - caches``)."""
    root, edge, far, _far2, oid = _edge_setup(tmp_path, copies=1)
    _obj(far, oid).unlink()
    out = _doctor(root.path, check=1)
    assert any(k in ("copies", "missing") and p == "f.bin" for k, p, _ in _problems(out)), out["checks"]


# -- 2. a directory doctor cannot read ---------------------------------------------------------------------

NOBODY = 65534


@pytest.fixture
def nobody_tree():
    """A root and its dir remote owned by ``nobody`` (uid 65534), in a directory that user can
    reach (pytest's tmp_path is root's alone), with its own HOME; jam run as that user."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run jam as another user")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is not installed")
    base = Path(tempfile.mkdtemp(prefix="jam-r14-"))
    os.chmod(base, 0o755)
    home = base / "home"
    env = dict(os.environ, HOME=str(home), XDG_DATA_HOME=str(home / ".local/share"),
               XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"))
    (home / ".config").mkdir(parents=True)
    t = make_tree(base)

    def as_nobody(*args, check):
        for d, _dirs, files in os.walk(base):  # everything jam made as root so far is nobody's
            for p in [d, *(os.path.join(d, f) for f in files)]:
                if os.lstat(p).st_uid != NOBODY:  # (a chown moves the ctime: only where needed)
                    os.lchown(p, NOBODY, NOBODY)
        res = subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", JAM,
                              *args], cwd=t.root, capture_output=True, text=True, env=env)
        assert "Traceback" not in res.stdout + res.stderr, res.stderr
        assert check is None or res.returncode == check, (args, res.returncode, res.stdout[-3000:], res.stderr)
        return res

    yield t, env, as_nobody
    for d, dirs, _files in os.walk(base):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o755)
    shutil.rmtree(base, ignore_errors=True)


def test_a_directory_doctor_cannot_read_is_never_all_well(nobody_tree):
    """`locked/g.bin` is a stub whose object the remote lost; the user (not root) made `locked`
    unreadable (chmod 000). doctor cannot see it, so it cannot prove it comes back: it must say
    which directory it could not read and exit 1, also after `--fix` (which must not forget the
    catalog's rows of stubs it could not see as "no longer there").
    Guard (mutation-checked, both removed): doctor._Doctor.walk_error (an unreadable directory is
    `unseen`) and _Doctor.hidden in check_catalog (the row of a stub it could not look at is kept)."""
    t, env, as_nobody = nobody_tree
    make_file(t.root / "f.bin", SIZE, seed=1)
    make_file(t.root / "locked" / "g.bin", SIZE, seed=2)
    jam("stash", "f.bin", "locked/g.bin", cwd=t.root, env=env)
    _obj(t.remote, record(t.root / "locked" / "g.bin").oid).unlink()  # g cannot come back
    as_nobody("doctor", check=1)  # the missing object is seen while the directory is readable
    os.chmod(t.root / "locked", 0)
    first = as_nobody("doctor", "--json", check=1)
    assert any("locked" in c["path"] and c["status"] == "problem" and "no longer there" not in c["detail"]
               for c in json.loads(first.stdout)["checks"]), first.stdout
    as_nobody("doctor", "--fix", check=1)
    again = as_nobody("doctor", check=1)
    assert "all can come back" not in again.stdout, again.stdout


# -- 3. --fix's claims --------------------------------------------------------------------------------------

def test_fix_never_claims_a_reupload_the_remote_does_not_hold(tmp_path, monkeypatch):
    """f.bin's object is gone from the only remote; copy.bin is a local file with the same
    content, so `--fix` stores it again from there. The backend answers "stored" but holds
    nothing (a buggy or lying backend; the same injection as test_copies_faults' re-copy
    test, whose fix is checked by hashing in place): the finding must stay unfixed, exit 1.
    Guard (mutation-checked): doctor._Doctor.reupload's ``self.holds(r, oid, size)`` (each copy
    hashed in place on its remote, else ``has``) before it counts as stored."""
    import jam_dir as jd
    from jam_core.model import Session
    from jam_core.ops.doctor import doctor

    t = make_tree(tmp_path)
    make_file(t.root / "f.bin", SIZE, seed=3)
    make_file(t.root / "copy.bin", SIZE, seed=3)
    jam("stash", "f.bin", cwd=t.root)
    oid = record(t.root / "f.bin").oid
    _obj(t.remote, oid).unlink()
    liar = jd.hookimpl(tryfirst=True)(lambda remote, oid, source, size, session: True)  # "stored", nothing written
    monkeypatch.setattr(jd, "stash", liar)
    with Session() as s:
        res = doctor(Root.find(t.root), ".", make_plugin_manager(), s, fix=True)
    assert not _obj(t.remote, oid).exists()
    missing = [f for f in res.findings if f.kind == "missing"]
    assert missing and not any(f.fixed for f in missing), missing
    assert res.exit_code == 1


def _zero_header(path: Path) -> None:
    """The stub's header block lost to zeros, its mtime and mode put back (a bad block)."""
    from jam_core.stub import HEADER_MAX

    st = os.lstat(path)
    os.chmod(path, 0o644)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\0" * HEADER_MAX, 0)
    finally:
        os.close(fd)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(path, st.st_mode & 0o7777)


def test_fix_never_writes_a_header_over_a_concurrent_write(tmp_path, monkeypatch):
    """f.bin's header block was lost to zeros: `doctor --fix` writes it again (``rewrite``),
    in place, after checking the ctime. Another process (root, or the owner once doctor made
    the stub writable for its write) writes the user's text into it at that instant (injected
    in ``stub.rewrite_header``, the call that writes in place, or in ``fs.exchange`` for a repair
made aside and swapped in). The user's bytes must survive: --fix
    never touches a stub written into (README), so the header goes in through a new inode
    swapped in and checked after, as stash's swaps are, or not at all.
    Guard (mutation-checked): doctor._Doctor.rewrite's check after the exchange (the inode that went
    out must be unchanged: size, mtime, bytes), else it is exchanged back."""
    import jam_core.fs as jam_fs
    import jam_core.ops.doctor as doc
    from jam_core.model import Session

    t = make_tree(tmp_path)
    make_file(t.root / "f.bin", SIZE, seed=4)
    jam("stash", "f.bin", cwd=t.root)
    p = t.root / "f.bin"
    _zero_header(p)
    mine = b"the user's own words, written at the last instant\n" * 20
    written = []

    def user_writes():
        if not written:
            written.append(True)
            w = os.open(p, os.O_WRONLY)  # another process's descriptor: root writes past the mode
            try:
                os.pwrite(w, mine, 0)
            finally:
                os.close(w)

    real_rewrite, real_exchange = doc.rewrite_header, jam_fs.exchange

    def rewrite_racing(fd, rec, name):  # the instant an in-place repair writes
        user_writes()
        return real_rewrite(fd, rec, name)

    def exchange_racing(dir_fd, a, b):  # the instant a repair by exchange swaps its new stub in
        user_writes()
        return real_exchange(dir_fd, a, b)

    monkeypatch.setattr(doc, "rewrite_header", rewrite_racing)
    monkeypatch.setattr(jam_fs, "exchange", exchange_racing)
    with Session() as s:
        res = doc.doctor(Root.find(t.root), ".", make_plugin_manager(), s, fix=True)
    assert written and [f.kind for f in res.problems] == ["bad-header"], res.problems
    assert p.read_bytes()[:len(mine)] == mine, "the user's write was overwritten by the header"


# -- 4. a filesystem mounted inside the root ---------------------------------------------------------------

@pytest.fixture
def mount_over():
    """mount_over(dir): a fresh tmpfs mounted on ``dir`` (hiding what is in it); unmounted at the end."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting tmpfs needs root and mount(8)")
    mounted: list[Path] = []

    def make(point: Path) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(point)], check=True)
        mounted.append(point)

    def undo(point: Path) -> None:
        subprocess.run(["umount", str(point)], check=True)
        mounted.remove(point)

    make.undo = undo
    yield make
    for point in reversed(mounted):
        if subprocess.run(["umount", str(point)]).returncode != 0:
            subprocess.run(["umount", "-l", str(point)])


def test_stubs_hidden_by_a_mount_are_never_forgotten(tmp_path, mount_over):
    """`sub/g.bin` is a stub; a drive is then mounted on `sub` (an sshfs, a USB stick: people
    mount into their trees), hiding it. doctor cannot see the stub, so `--fix` must not forget
    its catalog row as "no longer there": the row is what keeps its object referenced, and the
    next `jam gc` would remove the only copy. After the unmount the stub must still come back.
    Guard (mutation-checked): doctor._Doctor.probe_dir's st_dev check (a mount on the way hides the stub)."""
    t = make_tree(tmp_path)
    make_file(t.root / "sub" / "g.bin", SIZE, seed=5)
    make_file(t.root / "f.bin", SIZE, seed=6)
    jam("stash", "f.bin", "sub/g.bin", cwd=t.root)
    oid = record(t.root / "sub" / "g.bin").oid
    mount_over(t.root / "sub")
    jam("doctor", "--fix", cwd=t.root, check=None)
    jam("gc", cwd=t.root, check=None)
    mount_over.undo(t.root / "sub")
    assert _obj(t.remote, oid).is_file(), "gc removed the only copy of a stub hidden under a mount point"
    jam("checkout", "sub/g.bin", cwd=t.root)


def test_stubs_in_a_directory_taken_for_another_root_are_never_forgotten(tmp_path):
    """`proj/g.bin` is a stub of this root; then `proj/.jam/` appears (a tool's folder, a
    repository cloned there, a half-made root): every walk now skips `proj` as another root's.
    doctor cannot see g.bin, so `--fix` must not forget its row, or `jam gc` removes its only
    copy (it can still be checked out by name).
    Guard (mutation-checked): doctor._Doctor.probe_dir's _foreign check (a directory every walk skips)."""
    t = make_tree(tmp_path)
    make_file(t.root / "proj" / "g.bin", SIZE, seed=7)
    jam("stash", "proj/g.bin", cwd=t.root)
    oid = record(t.root / "proj" / "g.bin").oid
    (t.root / "proj" / ".jam").mkdir()
    jam("doctor", "--fix", cwd=t.root, check=None)
    jam("gc", cwd=t.root, check=None)
    assert _obj(t.remote, oid).is_file(), "gc removed the only copy of a stub doctor --fix forgot"


# -- 5. hangs ------------------------------------------------------------------------------------------------

def test_doctor_never_opens_an_rc_file_that_is_a_fifo(jam_root, isolated_home, monkeypatch):
    """~/.zshrc is a named pipe (a dotfile manager's trick, or a mistake): opening it for
    reading blocks until someone writes (`jam doctor` hangs: seen with the real command). The
    shell-hook check must not open it blocking (a regular file only; O_NONBLOCK then fstat).
    Injected: ``open`` in doctor's module and ``os.open`` are wrapped, and a blocking open of
    the FIFO is refused there (recorded) instead of hanging the test.
    Guard (mutation-checked): doctor._shell_hook opens each rc file with O_NONBLOCK and reads it
    with root.read_capped (a regular file only)."""
    import jam_core.ops.doctor as doc
    from jam_core.model import Session

    fifo = isolated_home / ".zshrc"
    os.mkfifo(fifo)
    blocking_opens = []
    real_open, real_os_open = open, os.open

    def is_fifo(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(path) == str(fifo)

    def watching(path, *args, **kwargs):
        if is_fifo(path):
            blocking_opens.append(path)
            raise OSError(6, "this open would block forever")  # rather than hang the test
        return real_open(path, *args, **kwargs)

    def watching_os(path, flags, *args, **kwargs):
        if is_fifo(path) and kwargs.get("dir_fd") is None and not flags & os.O_NONBLOCK:
            blocking_opens.append(path)
            raise OSError(6, "this open would block forever")
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(doc, "open", watching, raising=False)
    monkeypatch.setattr(os, "open", watching_os)
    with Session() as s:
        doc.doctor(jam_root, ".", make_plugin_manager(), s)
    assert blocking_opens == [], "doctor opened a FIFO for reading, blocking: without a writer it hangs"


# -- 6. what a named path is ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_named_path_that_is_no_file_is_never_all_well(tmp_path, kind):
    """The user asks about `link` (a symlink to a stub whose object the remote lost) or `pipe`
    (a FIFO): doctor follows no symlink and reads no FIFO, so it proves nothing about it. It
    must say so (a local file named gets `not-a-stub`, exit 1; a symlink through a directory
    is a usage error, exit 2), never "all can come back" with exit 0.
    Guard (mutation-checked): doctor.doctor's lstat of each named path (``_not_a_file``: a
    symlink, FIFO, socket or device named is `not-a-stub`, a problem)."""
    t = make_tree(tmp_path)
    make_file(t.root / "g.bin", SIZE, seed=8)
    jam("stash", "g.bin", cwd=t.root)
    _obj(t.remote, record(t.root / "g.bin").oid).unlink()
    if kind == "symlink":
        os.symlink("g.bin", t.root / "named")
    else:
        os.mkfifo(t.root / "named")
    res = jam("doctor", "named", cwd=t.root, check=None)
    assert res.returncode != 0 and "all can come back" not in res.out, (res.returncode, res.out)


# -- 7. hostile metadata -------------------------------------------------------------------------------------

def test_a_stub_naming_a_held_object_with_the_wrong_size_is_reported(tmp_path):
    """a.bin is a good stub. b.bin is a clean stub (header and xattr agree) of the same object
    id but another size: made by hand, or by a tool that wrote a record of its own (metadata
    is input). `jam checkout b.bin` cannot bring it back (the object has another size), so
    doctor must not pass it because a.bin's size matched.
    Guard (mutation-checked): doctor._by_size (check_objects checks each (object, size) the stubs
    name apart)."""
    import time

    from jam_core.stub import StubRecord, write_stub

    t = make_tree(tmp_path)
    make_file(t.root / "a.bin", SIZE, seed=9)
    jam("stash", "a.bin", cwd=t.root)
    good = record(t.root / "a.bin")
    fd = os.open(t.root / "b.bin", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_stub(fd, StubRecord(good.oid, SIZE + 4096, 0o644, time.time_ns()), "b.bin", time.time_ns())
    finally:
        os.close(fd)
    jam("checkout", "b.bin", cwd=t.root, check=1)  # it cannot come back
    assert record(t.root / "b.bin") is not None
    jam("doctor", "--fix", cwd=t.root, check=None)  # the catalog learns b.bin (catalog-unknown, fixed)
    out = _doctor(t.root, check=1)
    assert any(p == "b.bin" for _k, p, _f in _problems(out)), out["checks"]


def test_fix_stores_a_lost_object_again_on_as_many_remotes_as_copies_asks(tmp_path):
    """copies = 2 over `a` and `b`; both lose f.bin's object; copy.bin has the same content.
    `jam doctor --fix` stores it again (README), and must do so on the two remotes the copy
    count asks for (as stash would), not on the nearest alone: after it the root is clean.
    Guard (mutation-checked): doctor._Doctor.reupload asks ``place`` with
    ``placement.Candidates(usable, copies)`` ([place] copies carried to the default placement)."""
    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, {"a": (a, 0, {}), "b": (b, 1, {})}, copies=2)
    make_file(root.path / "f.bin", SIZE, seed=10)
    make_file(root.path / "copy.bin", SIZE, seed=10)
    jam("stash", "f.bin", cwd=root.path)
    oid = record(root.path / "f.bin").oid
    for loc in (a, b):
        _obj(loc, oid).unlink()
    jam("doctor", "--fix", cwd=root.path, check=None)
    assert _obj(a, oid).is_file() and _obj(b, oid).is_file(), "stored again on one remote only"
    _doctor(root.path, check=0)


# -- 8. guarded (kept: each fails without the guard named) ----------------------------------------------------

def test_a_drive_swapped_for_another_remote_holding_the_same_objects_is_not_all_well(tmp_path):
    """The remote's directory is now another jam remote (a second backup drive plugged in
    where the first was, mounted at the same path) that holds the very same objects: every
    object is "there", with its size, yet this is not the drive the stubs' copies were
    counted on. doctor must say so (`identity`, exit 1), not "all can come back".
    Guard (mutation-checked): ops/doctor._check_remotes's ``elif recorded and got != recorded``
    (another marker: the remote is unusable for this run)."""
    t = make_tree(tmp_path)
    other = make_tree(tmp_path, "other")
    make_file(t.root / "f.bin", SIZE, seed=11)
    make_file(other.root / "f.bin", SIZE, seed=11)
    jam("stash", "f.bin", cwd=t.root)
    jam("stash", "f.bin", cwd=other.root)
    os.rename(t.remote, tmp_path / "first-drive")
    os.rename(other.remote, t.remote)  # the other drive, where the first was
    assert _obj(t.remote, record(t.root / "f.bin").oid).is_file()
    out = _doctor(t.root, check=1)
    assert ("identity", "vault", False) in _problems(out), out["checks"]
    assert "all can come back" not in jam("doctor", cwd=t.root, check=1).out
