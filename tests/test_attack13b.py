"""Issue 13, a second attacker's review of the speed paths (R4): the catalog trusted as a cache,
the dry-run, and trees far from the benchmark's shape (deep, wide, long names, many
directories). Each test works on real files with real xattrs through the real `jam` command;
faults are injected at the exact instant (a wrapper around the function that runs then), never
by sleeping, and nothing is timed.

Holes found (each test here failed before its fix):

* (3f919f7) a stash or checkout over more directories than RLIMIT_NOFILE allows failed every file after
  the limit (``fs.DirFds`` kept a descriptor per directory for the whole command);
* (3f919f7) a stash in a tree deeper than ~990 directories died with a RecursionError
  (``fs.DirFds.get`` opened each ancestor recursively; the index's removal used shutil.rmtree);
* (3f919f7) doctor in a tree deeper than PATH_MAX called the cd hook's index out of step for ever
  (``ops.doctor._index_marks`` walked the index by path);
* (4d17f8f) with an empty or relative entry in $PYTHONPATH, the cd hook's fallback ran the jam
  script in the directory just entered, which imported a ``jam_core`` planted there;
* (453fc1d) a write into a new stub between its swap and the stamp the stash recorded (an lstat by name
  after the swap) was vouched for: status counted the dirty stub clean, doctor never reported
  it; doctor --fix did the same with the row it saved for a stub it checked.

Fixed by the commit that added this paragraph's last item:

* ``scan.new_stub_stamp`` (453fc1d) vouched for whatever clean stub was at the name after the
  swap: another clean stub moved over the new one in between got the row's stamp, and doctor
  trusted the row's object id instead of reading the stub's own (now: only the stub made).

Guards checked (each test fails with its guard removed):

* the ctime in the catalog's stamp (``scan.classify``): a stub deleted and replaced, on the
  inode ext4 hands back, by a read-only sparse file of the same size and mtime is read;
* the oid in ``Catalog.record_stamps``: a stub whose xattr was rewritten in place (setfattr)
  never gets the old row's stamp, so doctor still reads it and finds its object missing;
* ``scan``'s O_NOFOLLOW directory opens on the dry-run's path: a directory swapped for a
  symlink the instant the walk opens it is not entered, by the dry-run or the real stash;
* ``stash_auto_command``'s early return for ``--dry-run``: a full snapshot of the tree, .jam
  and the remote (catalog aside) is the same after a dry-run, and its plan is what the stash
  then does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import resource
import sqlite3
import subprocess
from pathlib import Path

import pytest

from jam_core.stub import rewrite_header
from tests.safety_support import JAM, b3, is_stub, jam, make_tree, record

OLD = 1_500_000_000  # 2017: old enough for the age policy


def _root(tmp_path, policy: bool = True, older_than: str = "1d"):
    t = make_tree(tmp_path)
    if policy:
        cfg = t.root / ".jam" / "config.toml"
        cfg.write_text(cfg.read_text() + f'\n[policy.age]\nolder_than = "{older_than}"\n')
    return t


def _write(path: Path, data: bytes, old: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if old:
        os.utime(path, (OLD, OLD))


def _stamp(root: Path, rel: str):
    db = sqlite3.connect(root / ".jam" / "catalog.db")
    try:
        row = db.execute("SELECT size, mtime_ns, ino, ctime_ns FROM stubs WHERE path = ?", (rel.encode(),)).fetchone()
    finally:
        db.close()
    return row


def _nominated(out: str) -> list[str]:
    """The paths a dry-run's plan lines name ("  SIZE UNIT  PATH  (reason)")."""
    names = []
    for line in out.splitlines():
        if line.startswith("  ") and "  (" in line:
            names.append(line.split("  (")[0].split()[-1])
    return sorted(names)


# -- 1. the catalog trusted as a cache ------------------------------------------------------------


def test_a_stub_replaced_on_its_own_inode_by_a_sparse_lookalike_is_read_not_trusted(tmp_path):
    """A stub is deleted and a user's file takes its place at once: ext4 hands the freed inode
    back, and the new file is read-only, sparse (data in its first block only), of the same
    size and mtime: size, mtime_ns and ino all match the catalog's stamp. Only the ctime tells
    (guard: the ctime in ``scan.classify``'s stamp). status, dry-run and doctor must see a
    local file, and stash --auto then checkout must give back the user's bytes."""
    t = _root(tmp_path, older_than="0s")  # (the stash counted as a use: any age)
    p = t.root / "d" / "f"
    _write(p, random.Random(1).randbytes(100_000))
    jam("stash", "d/f", cwd=t.root)
    st = os.lstat(p)
    assert is_stub(p) and _stamp(t.root, "d/f") == (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    mine = b"the user's own first block, not a stub header\n" * 80  # 3,840 bytes: one block
    os.unlink(p)
    q = _on_inode(p.parent, st.st_ino)
    if q is None:
        pytest.skip("this filesystem did not hand the freed inode back")
    fd = os.open(q, os.O_WRONLY)
    try:
        os.write(fd, mine)
        os.ftruncate(fd, st.st_size)
    finally:
        os.close(fd)
    os.utime(q, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(q, 0o444)
    os.rename(q, p)
    now = os.lstat(p)
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns) and now.st_blocks * 512 <= 4096
    want = b3(p)

    s = json.loads(jam("status", "--json", cwd=t.root).out)["total"]
    assert (s["stubs"], s["local"]) == (0, 1), s
    assert _nominated(jam("stash", "--auto", "--dry-run", cwd=t.root).out) == ["d/f"]
    doc = json.loads(jam("doctor", "--json", cwd=t.root, check=None).out)
    assert doc["stubs"] == 0, doc["stubs"]
    jam("stash", "--auto", cwd=t.root)
    assert is_stub(p)
    jam("checkout", "d/f", cwd=t.root)
    assert b3(p) == want


def _on_inode(d: Path, ino: int) -> Path | None:
    """A new empty file in ``d`` on inode ``ino`` (just freed): ext4 hands out the lowest free
    inode of the directory's group, so files are made until one gets it (the others go)."""
    made = []
    try:
        for i in range(4000):
            q = d / f".r4-{i}"
            os.close(os.open(q, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            if os.lstat(q).st_ino == ino:
                return q
            made.append(q)
        return None
    finally:
        for q in made:
            os.unlink(q)


def test_a_stubs_xattr_rewritten_in_place_never_inherits_the_old_rows_stamp(tmp_path):
    """A stub is rewritten in place as a clean stub of another object (same size and mtime: its
    header block, then setfattr of its record):
    status reads it (the ctime moved) and counts a clean stub, but the catalog's row still
    names the old object, so no stamp may be recorded on it (guard: the oid in
    ``Catalog.record_stamps``). Otherwise doctor would trust the row and never see that the
    object the stub now names is on no remote."""
    t = _root(tmp_path, policy=False)
    p = t.root / "f"
    _write(p, random.Random(2).randbytes(100_000))
    jam("stash", "f", cwd=t.root)
    rec = record(p)
    other = dataclasses.replace(rec, oid="b3:" + "ab" * 32)
    mode = os.lstat(p).st_mode & 0o7777
    os.chmod(p, 0o600)
    fd = os.open(p, os.O_WRONLY)
    try:
        rewrite_header(fd, other, "f")  # the same inode, a clean stub of another object
    finally:
        os.close(fd)
    subprocess.run(["setfattr", "-n", "user.jam", "-v", "0x" + other.pack().hex(), str(p)], check=True)
    os.chmod(p, mode)
    assert record(p).oid == other.oid
    before = _stamp(t.root, "f")
    s = json.loads(jam("status", "--json", cwd=t.root).out)["total"]
    assert s["stubs"] == 1
    assert _stamp(t.root, "f") == before  # the row names the old object: not stamped
    doc = jam("doctor", cwd=t.root, check=1)
    assert "f" in doc.out and "1 problem" in doc.out, doc.out


# -- 2. the dry-run -------------------------------------------------------------------------------

_SWAP = r"""
import os, sys
root, outside = sys.argv[1], sys.argv[2]
real = os.open
done = []

def swapping(path, flags, mode=0o777, *, dir_fd=None):
    # the instant the walk opens d, listed and lstat'ed as a directory: d (old files the
    # policy nominates) becomes a symlink to a directory outside the root
    if path == "d" and dir_fd is not None and not done and os.path.samestat(os.fstat(dir_fd), os.stat(root)):
        done.append(1)
        os.rename(os.path.join(root, "d"), os.path.join(root, "d.gone"))
        os.symlink(outside, os.path.join(root, "d"))
    return real(path, flags, mode, dir_fd=dir_fd)

os.open = swapping
from jam_core.cli import main
sys.argv = ["jam", *sys.argv[3:]]
main()
"""


@pytest.mark.parametrize("dry", [True, False])
def test_a_directory_swapped_for_a_symlink_as_the_root_is_listed_is_never_entered(tmp_path, dry):
    """The root is listed and ``d`` (old files the age policy nominates) lstat'ed as a directory;
    the instant the walk opens it, it is renamed away and a symlink to a directory outside the
    root, with old files of its own, takes its name. The walk must not follow it (guard:
    O_NOFOLLOW in ``scan._scan_from``'s directory opens): the dry-run names nothing under
    ``d``, and the real stash leaves the outside files exactly as they were."""
    t = _root(tmp_path, older_than="0s")  # (reading the files to hash them is a use)
    for i in range(3):
        _write(t.root / "d" / f"f{i}", random.Random(i).randbytes(70_000))
    _write(t.root / "keep" / "k", random.Random(9).randbytes(70_000))
    outside = tmp_path / "outside"
    for i in range(3):
        _write(outside / f"f{i}", random.Random(10 + i).randbytes(70_000))
    before = {n: (b3(outside / n), os.lstat(outside / n).st_ino) for n in os.listdir(outside)}
    args = ["stash", "--auto"] + (["--dry-run"] if dry else [])
    res = subprocess.run(
        [str(Path(JAM).parent / "python"), "-c", _SWAP, str(t.root), str(outside), *args],
        cwd=t.root,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert os.path.islink(t.root / "d")  # the swap did happen
    named = _nominated(res.stdout)
    assert "keep/k" in named and not any(n.startswith("d/") for n in named), res.stdout
    after = {n: (b3(outside / n), os.lstat(outside / n).st_ino) for n in os.listdir(outside)}
    assert after == before
    assert not any(record(outside / n) for n in after)
    assert is_stub(t.root / "keep" / "k") != dry


def test_a_dry_run_changes_nothing_on_disk_and_names_what_the_stash_then_does(tmp_path):
    """Stubs (stamped and not), a dirty stub, a pinned file, young and old files, names with a
    newline and bytes that are not UTF-8: a full lstat+xattr snapshot of the tree and of .jam
    (the catalog and its side files aside) is the same after the dry-run, and the files it
    names are exactly those the real stash --auto then turns into stubs."""
    t = _root(tmp_path)
    r = t.root
    names = ["a/old1", "a/old2", "b/young", "b/line\nbreak", "c/pinned/p", "c/\udcff\udcfe-bytes"]
    for i, n in enumerate(names):
        _write(r / n, random.Random(i).randbytes(70_000), old=n != "b/young")
    _write(r / "s" / "stub1", random.Random(20).randbytes(90_000))
    _write(r / "s" / "stub2", random.Random(21).randbytes(90_000))
    jam("stash", "s", cwd=r)
    jam("status", cwd=r)  # stamps recorded
    os.chmod(r / "s" / "stub2", 0o644)
    with open(r / "s" / "stub2", "r+b") as f:
        f.write(b"written into")  # a dirty stub
    jam("pin", "c/pinned", cwd=r)
    jam("status", cwd=r, check=None)
    left = r / "a" / ".jam-0123456789abcdef.tmp"  # a part a killed jam left: the stash's to clean
    _write(left, b"half a part")
    os.setxattr(left, "user.jam.part", b"1")

    def snap():
        out = {}
        for top in (r, t.remote):
            for dp, dn, fn in os.walk(os.fsencode(top)):
                for n in dn + fn:
                    p = os.path.join(dp, n)
                    if n.startswith(b"catalog.db") or not os.path.lexists(p):
                        continue
                    st = os.lstat(p)
                    xs = {x: os.getxattr(p, x, follow_symlinks=False) for x in os.listxattr(p, follow_symlinks=False)}
                    out[p] = (
                        st.st_mode,
                        st.st_ino,
                        st.st_size,
                        st.st_mtime_ns,
                        st.st_ctime_ns,
                        st.st_nlink,
                        st.st_blocks,
                        sorted(xs.items()),
                    )
        return out

    before = snap()
    res = subprocess.run([JAM, "stash", "--auto", "--dry-run"], cwd=r, capture_output=True)
    assert res.returncode == 0 and b"Traceback" not in res.stderr, res.stderr
    after = snap()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    changed = [k for k in changed if k not in (os.fsencode(r / ".jam"),)]  # its mtime: SQLite's -wal
    assert changed == [], changed
    jam("stash", "--auto", cwd=r)
    became = sorted(
        os.fsdecode(os.path.relpath(k, os.fsencode(r)))
        for k in before
        if os.path.isfile(k)
        and not os.path.islink(k)
        and k.startswith(os.fsencode(r) + b"/")
        and b"/.jam/" not in k
        and record(k) is not None
        and k not in _stubs(before)
    )
    planned = sorted(os.fsdecode(os.fsencode(n)) for n in _plan_paths(res.stdout))
    assert became == planned == sorted(["a/old1", "a/old2", "b/line\nbreak", "c/\udcff\udcfe-bytes"]), (became, planned)
    assert not left.exists()  # (cleaned by the real stash, under the lock; never by the dry-run)


def _stubs(snapshot) -> set:
    return {k for k, v in snapshot.items() if any(x == "user.jam" for x, _ in v[7])}


def _plan_paths(out: bytes) -> list[str]:
    """The paths of a dry-run's plan (the same parse as _nominated, on bytes: a name may hold
    a newline, which the plan shows escaped)."""
    got = []
    for line in out.decode("utf-8", "surrogateescape").splitlines():
        if line.startswith("  ") and "  (" in line:
            shown = line.split("  (")[0].split(None, 2)[2]
            got.append(shown)
    return [_unshow(s) for s in got]


def _unshow(shown: str) -> str:
    """The name behind what the plan shows (jam shows a newline as \\n and bytes as \\xNN)."""
    if shown.startswith(("'", '"')):
        shown = shown[1:-1]
    if "\\" not in shown:
        return shown
    raw = shown.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1")
    return raw.decode("utf-8", "surrogateescape")


# -- 4. trees the benchmark does not make ---------------------------------------------------------


def _limited(n: int):
    def pre():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))  # `ulimit -n 256` in the user's shell

    return pre


def test_a_stash_and_checkout_over_more_directories_than_the_fd_limit_do_them_all(tmp_path):
    """300 directories with one file each, stashed then checked out under `ulimit -n 256`
    (a hard limit of 1024 or 4096 is common; a million-file tree has far more directories)."""
    t = _root(tmp_path, policy=False)
    files = [t.root / "w" / f"d{i:03}" / "f" for i in range(300)]
    for i, f in enumerate(files):
        _write(f, random.Random(i).randbytes(65_536), old=False)
    want = [b3(f) for f in files]
    for cmd, stubs in (("stash", 300), ("checkout", 0)):
        res = subprocess.run([JAM, cmd, "w"], cwd=t.root, capture_output=True, text=True, preexec_fn=_limited(256))
        assert "Traceback" not in res.stderr
        assert (res.returncode, sum(map(is_stub, files))) == (0, stubs), res.stderr[-600:]
    assert [b3(f) for f in files] == want


@pytest.fixture
def deep_away(tmp_path):
    """Removes the test's deep trees once it is done (the root, its index in .jam/stubdirs):
    pytest's own clean-up recurses and dies on them; rm(1) does not."""
    yield
    subprocess.run(["rm", "-rf", str(tmp_path / "root")], check=False)


def _deep(base: Path, depth: int, name: str) -> Path:
    """``depth`` nested directories named ``name`` under ``base`` (by descriptor: the path may
    be longer than PATH_MAX); returns the relative path of the deepest."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        out = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        try:
            os.write(out, random.Random(depth).randbytes(70_000))
        finally:
            os.close(out)
        os.utime("f", (OLD, OLD), dir_fd=fd)
    finally:
        os.close(fd)
    return Path(*[name] * depth)


def test_status_dry_run_and_doctor_finish_at_depth_1100(tmp_path, deep_away):
    """1,100 nested directories (past Python's recursion limit, and a path past PATH_MAX):
    status counts the file, the dry-run names it, doctor finishes with no problem (guard: the
    walk's explicit stack of directory descriptors in ``scan._scan_from``)."""
    t = _root(tmp_path)
    deep = _deep(t.root, 1100, "dd")
    s = json.loads(jam("status", "--json", cwd=t.root).out)["total"]
    assert s["local"] == 1
    assert len(_nominated(jam("stash", "--auto", "--dry-run", cwd=t.root).out)) == 1
    jam("doctor", cwd=t.root)
    assert len(str(deep)) > 3000


def test_a_stash_at_depth_1100_makes_its_stub_and_checkout_brings_it_back(tmp_path, deep_away):
    t = _root(tmp_path)
    deep = _deep(t.root, 1100, "dd")
    res = jam("stash", "--auto", cwd=t.root, check=None)
    assert res.returncode == 0, res.err
    fd = os.open(t.root, os.O_RDONLY)
    for part in deep.parts:
        nfd = os.open(part, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    try:
        assert os.getxattr(f"/proc/self/fd/{fd}/f", "user.jam")
    finally:
        os.close(fd)
    jam("checkout", ".", cwd=t.root)


def test_doctor_after_a_stash_deeper_than_path_max_finds_the_hook_index_in_step(tmp_path, deep_away):
    t = _root(tmp_path)
    _deep(t.root, 90, "x" * 50)  # 4,590 bytes of directories
    jam("stash", "--auto", cwd=t.root)
    jam("doctor", "--fix", cwd=t.root, check=None)
    res = jam("doctor", "--json", cwd=t.root, check=None)
    kinds = [p["kind"] for p in json.loads(res.out)["problems"]]
    assert res.returncode == 0 and "hook-index" not in kinds, kinds


# -- 1b. the stamp the stash records ------------------------------------------------------------


def _stash_f_then(t, monkeypatch, after) -> None:
    """Stash ``f`` through the real stash, running ``after()`` the instant its stub is swapped
    in (before the stamp the catalog keeps is taken)."""
    import jam_core.ops.stash as stash_mod
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.root import Root

    real = stash_mod._swap
    ran = []

    def swap_then(s, leases):
        ok = real(s, leases)
        if ok and s.name == "f":
            after()
            ran.append(1)
        return ok

    monkeypatch.setattr(stash_mod, "_swap", swap_then)
    with Session() as session:
        res = stash_mod.stash(Root(t.root), ["f"], make_plugin_manager(), session)
    assert [r for r, _ in res.done] == ["f"] and ran == [1]


def test_a_stub_written_into_just_after_its_swap_is_not_stamped_clean(tmp_path, monkeypatch):
    """The stash swaps the stub in, then takes the stamp the catalog keeps (``_swap_batch``:
    an lstat by name after the swap). Another process writes into the new stub in between
    (chmod, a byte in its header block, mtime and mode put back): the stamp must not vouch for
    those bytes, or status calls the dirty stub clean and doctor never reports it
    (invariant 5)."""
    t = _root(tmp_path, policy=False)
    p = t.root / "f"
    _write(p, random.Random(3).randbytes(100_000))

    def write_into():
        st = os.lstat(p)
        os.chmod(p, 0o600)
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, b"#", 200)  # inside the header block: no block more, same size
        finally:
            os.close(fd)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.chmod(p, st.st_mode & 0o7777)

    _stash_f_then(t, monkeypatch, write_into)
    s = json.loads(jam("status", "--json", cwd=t.root).out)["total"]
    doc = json.loads(jam("doctor", "--json", cwd=t.root, check=None).out)
    found = [p["kind"] for p in doc["problems"]]
    assert ((s["stubs"], s["dirty"]), found) == ((0, 1), ["dirty"]), (s, doc["problems"])


def _write_into_stub(p: Path) -> None:
    """Another process writes one byte into the stub's header block, mtime and mode put back."""
    st = os.lstat(p)
    os.chmod(p, 0o600)
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, b"#", 200)
    finally:
        os.close(fd)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(p, st.st_mode & 0o7777)


def test_a_stub_written_into_just_after_doctor_checked_it_is_not_stamped_clean(tmp_path, monkeypatch):
    """doctor --fix reads a stub the catalog cannot vouch for (no stamp), finds it clean and
    saves its row; another process writes into it between that check and the lstat doctor
    records: status must still see a dirty stub."""
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops import doctor as doc_mod
    from jam_core.root import Root

    t = _root(tmp_path, policy=False)
    p = t.root / "f"
    _write(p, random.Random(4).randbytes(100_000))
    jam("stash", "f", cwd=t.root)
    db = sqlite3.connect(t.root / ".jam" / "catalog.db")
    db.execute("UPDATE stubs SET ino = NULL, ctime_ns = NULL")
    db.commit()
    db.close()
    real = doc_mod._Doctor.clean
    wrote = []

    def clean_then_write(self, e, rec):
        ok = real(self, e, rec)
        if ok and e.rel == "f":
            _write_into_stub(p)
            wrote.append(1)
        return ok

    monkeypatch.setattr(doc_mod._Doctor, "clean", clean_then_write)
    with Session() as s:
        doc_mod.doctor(Root(t.root), ".", make_plugin_manager(), s, fix=True)
    assert wrote == [1]
    s = json.loads(jam("status", "--json", cwd=t.root).out)["total"]
    assert (s["stubs"], s["dirty"]) == (0, 1), s


# -- 3. the cd hook's start --------------------------------------------------------------------

_SHELL_FLAGS = {"bash": ["--norc", "--noprofile", "-c"], "zsh": ["-f", "-c"], "fish": ["--no-config", "-c"]}


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_a_cd_never_imports_code_from_the_directory_entered(shell, tmp_path):
    """A directory with stubs also holds ``jam_core/__init__.py`` (an unpacked archive, a
    synced folder); the user's PYTHONPATH is ``:/opt/lib`` (the common ``PYTHONPATH=
    $PYTHONPATH:/opt/lib`` with nothing before it: the empty entry is the working directory).
    The cd must fetch the stubs with jam's own code and never run the planted module."""
    from tests.conftest import require_tool

    exe = require_tool(shell)
    t = _root(tmp_path, policy=False)
    data = t.root / "data"
    for i in range(2):
        _write(data / f"f{i}", random.Random(i).randbytes(70_000))
    want = [b3(data / f"f{i}") for i in range(2)]
    jam("stash", "data", cwd=t.root)
    marker = tmp_path / "planted-code-ran"
    (data / "jam_core").mkdir()
    (data / "jam_core" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    env = dict(os.environ, JAM_DISABLE="", JAM_BACKGROUND="0", PYTHONPATH=":/nonexistent-r4")
    env.pop("PROMPT_COMMAND", None)
    hook = tmp_path / f"hook.{shell}"
    hook.write_text(subprocess.run([JAM, "hook", shell], env=env, capture_output=True, text=True, check=True).stdout)
    after = "; _jam_hook" if shell == "bash" else ""
    res = subprocess.run(
        [exe, *_SHELL_FLAGS[shell], f"source {str(hook)!r}; cd {str(data)!r}{after}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not marker.exists(), res.stderr
    assert [b3(data / f"f{i}") for i in range(2)] == want, res.stderr


def test_another_stub_moved_over_a_new_stub_before_its_stamp_is_not_vouched_for(tmp_path, monkeypatch):
    """The stash swaps f's stub in; before it takes the stamp, another clean stub of the same
    size and mtime (``other/g``, whose object the remote has lost) is moved over ``f``. The
    catalog's row for ``f`` names f's object; its stamp must not vouch for g's stub, or doctor
    trusts the row and never sees that the object ``f`` now needs is on no remote."""
    t = _root(tmp_path, policy=False)
    f, g = t.root / "f", t.root / "other" / "g"
    _write(f, random.Random(5).randbytes(100_000))
    _write(g, random.Random(6).randbytes(100_000))
    jam("stash", "other/g", cwd=t.root)
    lost = record(g).oid.split(":")[1]
    for obj in t.objects.rglob(lost):
        obj.unlink()  # the remote lost g's object
    _stash_f_then(t, monkeypatch, lambda: os.rename(g, f))  # g's clean stub (same size and mtime) takes f's name
    doc = json.loads(jam("doctor", "--json", cwd=t.root, check=None).out)
    assert ("missing", "f") in [(p["kind"], p["path"]) for p in doc["problems"]], doc["problems"]
