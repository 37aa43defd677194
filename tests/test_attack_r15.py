"""R15: an attacker's review of the scans that must stay fast at a million files (`jam status`,
`jam stash --auto [--dry-run]`, `jam doctor`) and of what they trust: the catalog's stamp (size,
mtime, inode, ctime) that lets a scan count a stub without reading it. Each test breaks one
thing on real files (real xattrs, a real dir remote, the real `jam` command). A test marked
xfail(strict=True) is a hole found (its fix is in R15's report)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.ops.stash import stash
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import JAM, jam, make_tree, record
from tests.test_attack_r14 import nobody_tree  # noqa: F401  (the fixture)

SIZE = 100_000
NOBODY = 65534


def _doctor(cwd, *args, check, env=None) -> dict:
    return json.loads(jam("doctor", "--json", *args, cwd=cwd, check=check, env=env).out)


def _problems(out) -> list[tuple[str, str]]:
    return [(c["kind"], c["path"]) for c in out["checks"] if c["status"] == "problem"]


def _stash(root: Path, *rels: str) -> None:
    with Session() as s:
        res = stash(Root(root), list(rels), make_plugin_manager(), s)
    assert sorted(r for r, _ in res.done) == sorted(rels), res


def _deep(top: Path, levels: int, name: str = "dd") -> int:
    """``levels`` nested directories ``name`` under ``top`` (made through descriptors: the path
    is longer than PATH_MAX); returns a descriptor of the deepest one."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        try:
            os.mkdir(name, dir_fd=fd)
        except FileExistsError:
            pass
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _rmdeep(top: Path) -> None:
    """Remove a tree of any depth (shutil.rmtree recurses once per level: RecursionError)."""
    stack = [(os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW), -1, "")]
    while stack:
        fd, parent, name = stack[-1]
        sub = None
        for e in os.scandir(fd):
            if e.is_dir(follow_symlinks=False):
                sub = e.name
                break
            os.unlink(e.name, dir_fd=fd)
        if sub is not None:
            stack.append((os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd), fd, sub))
            continue
        stack.pop()
        os.close(fd)
        if parent >= 0:
            os.rmdir(name, dir_fd=parent)
    os.rmdir(top)


# -- 1. doctor gives up on a stub whose path is longer than PATH_MAX --------------------------------------

def test_doctor_checks_a_stub_deeper_than_path_max(tmp_path):
    """A stub 1,500 directories down (`dd/dd/.../deep.bin`, 4,500 bytes of path: deeper than
    PATH_MAX). status, stash and checkout walk by directory descriptors and handle it; doctor
    trusts it while the catalog's stamp holds. After a `chmod` (the ctime moves, so the stamp no
    longer vouches) doctor must read it as it reads any stub (through the walk's descriptor)
    and still give its report; today it stops at that stub with one line, `...deep.bin: File
    name too long`, exit 1, and checks nothing else (`--deep` always does)."""
    t = make_tree(tmp_path)
    fd = _deep(t.root, 1500)
    try:
        try:
            f = os.open("deep.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
            os.write(f, os.urandom(SIZE))
            os.close(f)
            _stash(t.root, "dd/" * 1500 + "deep.bin")
            assert os.stat("deep.bin", dir_fd=fd).st_mode & 0o222 == 0  # a stub now
            os.chmod(f"/proc/self/fd/{fd}/deep.bin", 0o444)  # the same mode: only the ctime moves
        finally:
            os.close(fd)
        res = jam("doctor", "--json", cwd=t.root, check=None)
        assert res.returncode == 0, res.err[-300:]
        assert json.loads(res.out)["summary"]["problem"] == 0
    finally:
        _rmdeep(t.root)  # (its .jam/stubdirs mirrors the depth too; pytest's own clean-up of tmp_path recurses per level)


# -- 2. a failed `doctor --fix` of a zeroed header vouches for the stub -----------------------------------

@pytest.fixture
def as_nobody_tree(nobody_tree):
    """test_attack_r14's root and dir remote owned by ``nobody``; ``run(*args, check)`` runs the
    real jam as that user."""
    t, _env, run = nobody_tree
    return t, run


def test_a_zeroed_header_that_fix_could_not_rewrite_is_still_reported(as_nobody_tree):
    """`photos/a.bin` is a stub whose first block was overwritten with zeros (its mode and mtime
    put back): it now reads as a file of zeros (invariant 4). doctor finds it (`bad-header`).
    `doctor --fix` cannot write a new header beside it: the user made `photos` read-only
    (`chmod a-w`, common for an archive). The fix fails, and must not make things look fixed:
    the next `jam doctor` must still report the zeroed header, and `jam status` must not count
    it as a clean stub. Today --fix records the stamp (inode, ctime) of the broken stub as one
    it read clean (ops/doctor.py check(): ``self.row(e.rel, rec, e.st, vouch=not lost)`` after
    clean() returned True for a bad header), so every later scan trusts it unread: doctor says
    "all can come back", exit 0, while the stub reads as zeros."""
    t, run = as_nobody_tree
    make_file(t.root / "photos" / "a.bin", SIZE, seed=1)
    jam("stash", "photos/a.bin", cwd=t.root)
    p = t.root / "photos" / "a.bin"
    st = os.lstat(p)
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.write(b"\0" * 4096)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(p, st.st_mode)
    assert not p.read_bytes().strip(b"\0")  # silent zeros
    first = json.loads(run("doctor", "--json", check=1).stdout)
    assert ("bad-header", "photos/a.bin") in _problems(first)
    os.chmod(t.root / "photos", 0o555)
    run("doctor", "--fix", check=1)  # cannot write beside it: not fixed
    assert not p.read_bytes().strip(b"\0")
    again = run("doctor", "--json", check=None)
    assert ("bad-header", "photos/a.bin") in _problems(json.loads(again.stdout)), again.stdout
    assert again.returncode == 1


# -- 3. doctor after `mv` of a directory of identical stubs: quadratic --------------------------------------

def test_doctor_matches_moved_stubs_of_one_object_in_linear_time(tmp_path):
    """1,500 stubs of the same content (a folder of identical renders, a test fixture copied
    many times: one object, stored once) under `A`, then `mv A B`: every row of the catalog is
    stale and every stub unknown, and doctor pairs them (`catalog-moved`). ops/doctor.py
    check_catalog does ``next(p for p in cat_oids[oid] if p not in moved_from)`` for each moved
    stub: the generator walks again past every path already paired, N*N/2 steps. Measured here
    (`jam doctor` after `mv A B`): 5,000 stubs 0.5 s, 20,000 stubs 5.1 s (4.6 s in that line);
    a million such stubs would take hours. The count of steps is the measure (no timing): it
    must stay linear."""
    import sys

    from jam_core.ops import doctor as doctor_mod

    n = 1500
    t = make_tree(tmp_path)
    root = Root(t.root)
    with root.lock():
        root.update_config(lambda own: own.setdefault("core", {}).__setitem__("min_size", "1"))
    (t.root / "A").mkdir()
    for i in range(n):
        (t.root / "A" / f"f{i:05d}.txt").write_bytes(b"the same small file\n" * 8)
    with Session() as s:
        res = stash(Root(t.root), ["A"], make_plugin_manager(), s)
    assert len(res.done) == n, res
    os.rename(t.root / "A", t.root / "B")

    steps = [0]
    code = doctor_mod._Doctor.check_catalog.__code__
    budget = 20 * n

    def local(frame, event, arg):
        if event == "line":
            steps[0] += 1
            if steps[0] > budget:
                raise RuntimeError("quadratic")
        return local

    def tracer(frame, event, arg):  # only the generators made inside check_catalog
        if frame.f_code.co_name == "<genexpr>" and frame.f_back is not None and frame.f_back.f_code is code:
            return local
        return None

    sys.settrace(tracer)
    try:
        with Session() as s:
            out = doctor_mod.doctor(Root(t.root), ".", make_plugin_manager(), s)
    except RuntimeError as exc:
        assert str(exc) != "quadratic", f"more than {budget} steps to pair {n} moved stubs"
        raise
    finally:
        sys.settrace(None)
    moved = [p for p in out.problems if p.kind == "catalog-moved"]
    assert len(moved) == n


# -- 4. `jam stash --auto` lists a whole directory again for every file it was handed ---------------------

def test_stash_auto_of_a_large_directory_lists_it_once(tmp_path, monkeypatch):
    """The age policy nominates every file of `Downloads` (1,000 here; 20,000 is common).
    `jam stash --auto` hands stash one path per file; ops/common.collect walks each alone, and
    scan._scan_from, for a single file with ``clean=True``, calls ``_clean_dir(parent)``: a
    full listing of the directory, every name tested by ``fs.is_jam_tmp``, once per file:
    N*N tests. Measured here: 2,000 old small files `jam stash --auto` 3.7 s, 8,000 files
    30 s, while `jam stash Downloads` of the same 8,000 takes 3.3 s; the profile has 80% of
    the time in _clean_dir. The names tested are counted (no timing): linear, not N*N."""
    import jam_core.scan as scan_mod
    from jam_core.policy.plan import stash_auto

    n = 1000
    t = make_tree(tmp_path)
    root = Root(t.root)
    with root.lock():
        root.update_config(lambda own: own.setdefault("core", {}).__setitem__("min_size", "1"))
        root.update_config(lambda own: own.setdefault("policy", {}).__setitem__("age", {"older_than": "1d"}))
    (t.root / "Downloads").mkdir()
    for i in range(n):
        p = t.root / "Downloads" / f"f{i:05d}.txt"
        p.write_bytes(i.to_bytes(4, "little") * 50)
        os.utime(p, (1577836800, 1577836800))
    tested = [0]
    real = scan_mod.is_jam_tmp
    budget = 20 * n

    def counting(name):
        tested[0] += 1
        if tested[0] > budget:
            raise RuntimeError(f"more than {budget} names tested to stash {n} files")
        return real(name)

    monkeypatch.setattr(scan_mod, "is_jam_tmp", counting)
    with Session() as s:
        plan, res = stash_auto(Root(t.root), make_plugin_manager(), s)
    assert len(plan.items) == n
    assert len(res.done) == n, (res.failed[:3], res.skipped[:3])


# -- 5. a stub written into in full: status and doctor say dirty, stash --auto stashes it, gc drops the original

def _obj(remote: Path, oid: str) -> Path:
    from jam_core.objects import object_relpath

    return remote / "objects" / object_relpath(oid)


def test_stash_auto_keeps_a_stub_written_into_in_full(tmp_path):
    """`a.bin` is a stub (its content only on the remote). A tool run over the tree after
    `chmod -R u+w` rewrites it in place, in full, with what it read (the placeholder's
    notice): the same inode, still carrying `user.jam`, now writable and not sparse. `jam
    status` and `jam doctor` both call it a dirty stub ("written into after it was stashed;
    jam will not fetch over it"), and invariant 5 says its object is never removed. Then
    `jam stash --auto` (policy records.py: a writable, non-sparse file is a candidate from its
    stat alone; stash's collect classifies with look=LIKELY, which reads no xattr for it)
    stashes it as an ordinary file: the catalog row now names the new content, and `jam gc`
    removes the original's object from the remote. The original is gone for good.
    Expected: stash --auto leaves a dirty stub as it is (as `_skip_reason` means to), so the
    original stays referenced."""
    t = make_tree(tmp_path)
    make_file(t.root / "a.bin", SIZE, seed=5)
    with Root(t.root).lock():
        Root(t.root).update_config(lambda own: own.setdefault("policy", {}).__setitem__("age", {"older_than": "1d"}))
    jam("stash", "a.bin", cwd=t.root)
    oid = record(t.root / "a.bin").oid
    p = t.root / "a.bin"
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:  # a tool rewrites what it read, in place and in full
        seen = f.read()
        f.seek(0)
        f.write(seen.upper())
    os.utime(p, (1577836800, 1577836800))
    assert record(p).oid == oid  # still carries its record
    st = json.loads(jam("status", "--json", cwd=t.root).out)
    assert st["total"]["dirty"] == 1, st  # status: a dirty stub
    assert ("dirty", "a.bin") in _problems(_doctor(t.root, check=1))  # doctor agrees
    jam("stash", "--auto", cwd=t.root, check=None)
    jam("gc", cwd=t.root, check=None)
    assert _obj(t.remote, oid).exists(), "the original's only copy was removed"
    assert record(p) is not None and record(p).oid == oid


# -- 6. doctor's memory per stub: a million stubs do not fit in 1 GiB ---------------------------------------

def _stub_tree(base: Path, n: int, spread: bool = False) -> Path:
    """A root whose dir remote holds one object and whose `s/` holds ``n`` stubs of it (with
    ``spread``, one stub in each of ``n`` directories `s/dNNNNNN/`), made as
    bench/bench_million.py makes them (jam's own record, header and xattr, catalog rows with
    their stamps)."""
    import time

    from jam_core.catalog import Catalog
    from jam_core.fs import setxattr
    from jam_core.hook.index import refresh
    from jam_core.objects import hasher, object_relpath
    from jam_core.stub import XATTR, StubRecord

    t = make_tree(base)
    data = b"one object for every stub\n" * 400
    h = hasher()
    h.update(data)
    oid = "b3:" + h.hexdigest()
    obj = t.remote / "objects" / object_relpath(oid)
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(data)
    mtime = time.time_ns() - 10**15
    (t.root / "s").mkdir()
    dfd = os.open(t.root / "s", os.O_RDONLY | os.O_DIRECTORY)
    rows = []
    try:
        for i in range(n):
            name = f"s{i:06d}.dat"
            if spread:
                os.close(dfd)
                dfd = -1
                (t.root / "s" / f"d{i:06d}").mkdir()
                dfd = os.open(t.root / "s" / f"d{i:06d}", os.O_RDONLY | os.O_DIRECTORY)
                name = f"d{i:06d}/{name}"
            rec = StubRecord(oid, len(data), 0o644, mtime, ("vault",), "2024-01-01T00:00:00Z")
            fd = os.open(name.rpartition("/")[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dfd)
            try:
                os.write(fd, rec.header(name.rpartition("/")[2]))
                os.ftruncate(fd, len(data))
                setxattr(fd, XATTR, rec.pack())
                os.fchmod(fd, 0o444)
                os.utime(fd, ns=(mtime, mtime))
                st = os.fstat(fd)
            finally:
                os.close(fd)
            rows.append((f"s/{name}", oid, len(data), mtime, rec.stashed_at, st.st_ino, st.st_ctime_ns))
    finally:
        if dfd >= 0:
            os.close(dfd)
    with Catalog(t.root / ".jam" / "catalog.db") as cat:
        cat.replace_stubs(rows)
        with cat.transaction():
            cat.record_location(oid, "vault", len(data))
        refresh(Root(t.root), cat)  # the cd hook's index, as a stash leaves it
    return t.root


def test_doctor_memory_per_stub_fits_a_million_in_a_gibibyte(tmp_path):
    """PRODUCT.md: 1,000,000 files work in under 1 GiB of memory, i.e. under 1 KiB per file in
    all. A tree whose files are mostly stubs is what jam is for (bench_million.py's tree has one
    stub in ten, so it never sees this). Measured here: doctor's traced peak grows by ~1,600
    bytes per stub (3,000 -> 9,000 stubs of one object: 4.4 MB -> 13.9 MB; 20,000 stubs of
    distinct objects: 1,476 B/stub, RSS slope 1.2-1.6 KB/stub), so a million stubs need
    ~1.6 GB. The slope of the traced peak between 1,500 and 4,500 stubs must stay under 1 KiB."""
    import tracemalloc

    from jam_core.ops.doctor import doctor

    peaks = []
    for n in (1500, 4500):
        path = _stub_tree(tmp_path / f"t{n}", n)
        pm = make_plugin_manager()
        with Session() as s:
            doctor(Root(path), ".", pm, s)  # warm: modules imported, caches filled
        tracemalloc.start()
        try:
            with Session() as s:
                res = doctor(Root(path), ".", pm, s)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert res.stubs == n and not res.unfixed, [p.detail for p in res.unfixed][:3]
    per_stub = (peaks[1] - peaks[0]) / 3000
    assert per_stub < 1024, f"doctor holds {per_stub:.0f} bytes per stub: {per_stub * 1e6 / 2**30:.2f} GiB per million"


# -- 7. the plan's ctime check misses a file moved in with its directory ----------------------------------

def test_stash_auto_never_stashes_a_file_the_policies_did_not_judge(tmp_path):
    """The age policy chooses `photos/raw.bin` (not used for years). Between the plan and its
    carrying out (a large tree: seconds to minutes) the user swaps two folders: `photos` is
    renamed `photos.old` and `work` (opened this morning) is renamed `photos`. A directory's
    rename changes the directory's ctime, not its files': `photos/raw.bin` is now this
    morning's file, its ctime from before the plan began, so plan.carry_out's check
    (stash.py: ``entry.st.st_ctime_ns >= changed_after_ns``) passes and it is stashed: a file
    the policies never judged (and would have kept: used today) leaves the disk. Expected:
    carried out only if it is the file the policies chose (its inode, size and mtime too)."""
    from jam_core.policy.plan import carry_out, plan_auto

    t = make_tree(tmp_path)
    root = Root(t.root)
    with root.lock():
        root.update_config(lambda own: own.setdefault("policy", {}).__setitem__("age", {"older_than": "30d"}))
    make_file(t.root / "photos" / "raw.bin", SIZE, seed=7)
    os.utime(t.root / "photos" / "raw.bin", (1577836800, 1577836800))  # untouched since 2020
    make_file(t.root / "work" / "raw.bin", SIZE, seed=8)  # in use: written now
    pm = make_plugin_manager()
    plan = plan_auto(Root(t.root), pm)
    assert [i.path for i in plan.items] == ["photos/raw.bin"]
    os.rename(t.root / "photos", t.root / "photos.old")
    os.rename(t.root / "work", t.root / "photos")
    with Session() as s:
        carry_out(Root(t.root), plan, pm, s)
    assert record(t.root / "photos" / "raw.bin") is None, "today's file was stashed on a plan made for another"


# -- 8. a stub restored from a backup without holes is called written into --------------------------------

def test_a_stub_restored_by_rsync_without_holes_is_clean(tmp_path, monkeypatch):
    """The user backs up `docs/` with `rsync -aX` (xattrs kept, no -S: holes are written as
    zeros) and later restores it. Each stub comes back byte for byte (its header, then zeros),
    with its `user.jam`, mode and mtime, only no longer sparse. status and doctor call it "a
    stub written into after it was stashed" (stub.is_dirty: more blocks than a stub owns), and
    checkout refuses to fetch it: nothing in `docs/` comes back but by `--keep-both`, one
    extra file each. Nothing was written into it: when only the block count differs, the
    bytes decide (stub.verify_clean), as they do for a stub whose mtime was put back."""
    rsync = shutil.which("rsync")
    if rsync is None:
        pytest.skip("rsync is not installed")
    t = make_tree(tmp_path)
    want = make_file(t.root / "docs" / "a.bin", 200_000, seed=9)
    jam("stash", "docs/a.bin", cwd=t.root)
    backup = tmp_path / "backup"
    subprocess.run([rsync, "-aX", f"{t.root / 'docs'}/", f"{backup}/"], check=True)
    shutil.rmtree(t.root / "docs")
    subprocess.run([rsync, "-aX", f"{backup}/", f"{t.root / 'docs'}/"], check=True)
    assert record(t.root / "docs" / "a.bin") is not None  # user.jam came back with it
    st = json.loads(jam("status", "--json", cwd=t.root).out)
    assert st["total"]["dirty"] == 0 and st["total"]["stubs"] == 1, st["problems"]
    # its bytes were read once: the catalog's stamp vouches for it from then on (no full read per status)
    import jam_core.scan as scan_mod
    from jam_core.ops.status import status

    reads = []
    real = scan_mod.verify_clean_path
    monkeypatch.setattr(scan_mod, "verify_clean_path", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    assert status(Root(t.root)).total.stubs == 1 and not reads, reads
    jam("checkout", "docs", cwd=t.root)
    assert (t.root / "docs" / "a.bin").read_bytes() == want


# -- 9. status of a root the user may read but not write ------------------------------------------------

def test_status_of_a_root_that_cannot_be_written(tmp_path):
    """A root the user can read but not write: a colleague's tree shared read-only, a backup
    disk mounted read-only, a filesystem snapshot. `jam status` only reads; the catalog is a
    cache (ops/status.py _remember: "a root that cannot be written ... is simply not updated").
    Yet status stops with "the catalog ... cannot be written (attempt to write a readonly
    database)", exit 1, and counts nothing: catalog.Catalog() sets WAL and creates the schema
    on open, and status.py _from_catalog opens it so. Expected: the tallies, with the
    catalog read if it can be, else every possible stub read."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run jam as another user")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is not installed")
    base = Path(tempfile.mkdtemp(prefix="jam-r15-"))
    try:
        os.chmod(base, 0o755)
        t = make_tree(base)
        make_file(t.root / "a.bin", SIZE, seed=10)
        make_file(t.root / "b.bin", SIZE, seed=11)
        jam("stash", "a.bin", cwd=t.root)
        for d, _dirs, files in os.walk(base):  # readable by all, writable by root alone
            os.chmod(d, 0o755)
            for f in files:
                p = os.path.join(d, f)
                os.chmod(p, os.lstat(p).st_mode | 0o444)
        home = base / "home"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        env = dict(os.environ, HOME=str(home), XDG_DATA_HOME=str(home / ".local/share"),
                   XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"))
        res = subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", JAM,
                              "status", "--json"], cwd=t.root, capture_output=True, text=True, env=env)
        assert "Traceback" not in res.stderr
        assert res.returncode == 0, res.stderr
        total = json.loads(res.stdout)["total"]
        assert (total["stubs"], total["local"]) == (1, 1)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- 10. doctor after stubs were deleted from many folders: each folder's probe lists every ancestor ------

def test_doctor_after_stubs_deleted_from_many_folders_lists_each_folder_once(tmp_path, monkeypatch):
    """`albums/` holds a folder per album, a stub in each. The user deletes those stubs
    (`find albums -name '*.raw' -delete`) and keeps the folders: every catalog row is stale.
    For each stale row doctor asks ops/doctor.py hidden() why the walk did not see it; the
    answer is cached per parent directory, but probe_dir opens and *lists* every ancestor from
    the root down (`_foreign` on each listing), so `albums/` (N entries) is listed N times.
    Measured here (`jam doctor` after deleting the stubs, folders kept): 5,000 folders 10 s,
    20,000 folders 174 s (1 s before the deletion). The entries looked at are counted (no
    timing): they must stay linear in the folders."""
    import jam_core.scan as scan_mod
    from jam_core.ops.doctor import doctor

    n = 1000
    path = _stub_tree(tmp_path, n, spread=True)
    for d in (path / "s").iterdir():
        for f in d.iterdir():
            f.unlink()  # the folder stays
    looked = [0]
    real = scan_mod._foreign
    budget = 20 * n

    def counting(fd, entries):
        entries = list(entries)
        looked[0] += len(entries)
        if looked[0] > budget:
            raise RuntimeError(f"more than {budget} directory entries looked at for {n} stale rows")
        return real(fd, entries)

    monkeypatch.setattr(scan_mod, "_foreign", counting)
    with Session() as s:
        res = doctor(Root(path), ".", make_plugin_manager(), s)
    assert len([p for p in res.problems if p.kind == "catalog-stale"]) == n


# -- 11. stubs moved to another root: that root's doctor --fix adopts them, the first root's gc removes them

def test_stubs_moved_to_another_root_and_adopted_by_doctor_fix_survive_the_first_roots_gc(tmp_path):
    """Two roots of one user share a dir remote (as every root shares the embedded default).
    `A/photos/p.bin` is a stub; `B` stashed a file of its own earlier (its refs are on the
    remote). The user reorganises: `mv A/photos B/photos` (a stub's xattrs move with it).
    `jam doctor --fix` in B reports p.bin as "a stub the catalog does not know ... (fixed)": B's
    catalog now holds it. `jam doctor --fix` in A forgets its row ("no longer there"). Then
    `jam gc` in A removes p.bin's object: A no longer refers to it and B's refs on the remote,
    written before the move, do not list it. B's stub can never come back (invariants 6 and
    12: nothing is removed while a stub, of any root, refers to it). Expected: a doctor --fix
    that adopts stubs records them in the root's refs on its remotes (as a stash does), or gc
    keeps what another root's catalog holds."""
    from jam_core.ops.remotes import add_remote

    t = make_tree(tmp_path, "A")
    b = tmp_path / "B"
    b.mkdir()
    root_b, _ = Root.init(b)
    add_remote(root_b, make_plugin_manager(), "vault", str(t.remote))
    want = make_file(t.root / "photos" / "p.bin", SIZE, seed=12)
    make_file(b / "own.bin", SIZE, seed=13)
    jam("stash", "photos", cwd=t.root)
    jam("stash", "own.bin", cwd=b)  # B's refs are on the remote
    os.rename(t.root / "photos", b / "photos")
    fixed = _doctor(b, "--fix", check=None)
    assert ("catalog-unknown", "photos/p.bin") in [(c["kind"], c["path"]) for c in fixed["checks"]
                                                   if c["status"] == "problem" and c["fixed"]]
    _doctor(t.root, "--fix", check=None)
    jam("gc", cwd=t.root, check=None)
    jam("checkout", "photos", cwd=b, check=None)
    assert (b / "photos" / "p.bin").read_bytes() == want, "B's stub lost its only copy to A's gc"


# -- 12. after `mv` of a folder of stubs, every status reads every one of them, forever ---------------------

def test_status_after_mv_of_a_folder_of_stubs_stops_reading_them(tmp_path, monkeypatch):
    """`jam stash photos`, then `mv photos pictures` (the catalog's docstring: a `mv` of a stub
    costs nothing but a scan). The first status after it must read each stub (no row names
    its new path); it finds them clean, but ops/status.py _remember records stamps only on rows
    whose path matches (catalog.record_stamps: ``WHERE path = ?``): none does, so the second,
    third, ... status open and read every stub again. Measured here, 20,000 stubs: status 0.15 s
    before, 0.63-0.76 s every time after (a million: ~35 s, every run, until someone runs
    `jam doctor --fix`). The stubs read by the second status are counted: none."""
    import jam_core.scan as scan_mod
    from jam_core.ops.status import status

    n = 300
    path = _stub_tree(tmp_path, n)
    os.rename(path / "s", path / "pictures")
    first = status(Root(path))
    assert first.total.stubs == n
    reads = [0]
    real = scan_mod.verify_clean_path

    def counting(*args, **kwargs):
        reads[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(scan_mod, "verify_clean_path", counting)
    again = status(Root(path))
    assert again.total.stubs == n
    assert reads[0] == 0, f"the second status read {reads[0]} stubs again"


# -- 13. a catalog row whose path holds a NUL byte: doctor (and --fix, the repair) stop with an internal error

def test_doctor_fix_repairs_a_catalog_row_with_a_nul_in_its_path(tmp_path):
    """The catalog is an index the tree can rebuild, and what is read from it is validated
    before use (invariant 7). A damaged row (a flipped byte on a bad disk, a half-written
    page SQLite still accepts, a tool that wrote it) whose path holds a NUL byte: `jam
    status` and `jam stash --auto --dry-run` go on, but `jam doctor` stops with "internal
    error: ValueError: embedded null byte" (ops/doctor.py check_catalog -> hidden -> os.stat
    and probe_dir's os.open of the row's path), and so does `jam doctor --fix`, the command
    every catalog message sends the user to. Expected: the row reported (an impossible
    path) and forgotten by --fix."""
    import sqlite3

    t = make_tree(tmp_path)
    make_file(t.root / "a.bin", SIZE, seed=14)
    jam("stash", "a.bin", cwd=t.root)
    db = sqlite3.connect(t.root / ".jam" / "catalog.db")
    (oid,) = db.execute("SELECT oid FROM stubs").fetchone()
    db.execute("INSERT INTO stubs VALUES (?,?,?,?,?,?,?)", (b"photos/a\0b.bin", oid, SIZE, 1, "", None, None))
    db.commit()
    db.close()
    jam("status", cwd=t.root)
    res = jam("doctor", "--fix", cwd=t.root, check=None)
    assert "internal error" not in res.err, res.err
    _doctor(t.root, check=0)


# -- 14. a stub checked out while status looks at it is reported "written into" ----------------------------

def test_status_never_calls_a_stub_checked_out_meanwhile_written_into(tmp_path, monkeypatch):
    """`jam status` runs while a `jam checkout` (the cd hook, the TUI's own worker) swaps a stub
    for its content. The stub's catalog row cannot vouch for it (its folder was renamed), so
    status lstat()s it, then opens it to check its bytes; the checkout's rename lands between
    the two. stub.verify_clean_path answers False for "gone or replaced", and scan.classify
    turns any False into DIRTY: status reports "stub written into after stashing" for a file
    nobody wrote into (and counts a dirty stub that does not exist). Expected: a file replaced
    since its lstat is looked at again (or counted as what it was), never called dirty. The
    checkout's rename is made at that instant through the verify hook (fault injection)."""
    import jam_core.scan as scan_mod
    from jam_core.ops.status import status

    t = make_tree(tmp_path)
    want = make_file(t.root / "photos" / "a.bin", SIZE, seed=15)
    jam("stash", "photos/a.bin", cwd=t.root)
    os.rename(t.root / "photos", t.root / "pictures")  # no row names its path now
    os.chmod(t.root / "pictures" / "a.bin", 0o444)  # a new ctime: its row's stamp cannot vouch, status reads it
    real = scan_mod.verify_clean_path
    fired = []

    def checkout_lands_now(path, rec, st=None):
        fired.append(path)
        (t.root / "pictures" / ".a.bin.fetched").write_bytes(want)  # what a checkout renames over the stub
        os.utime(t.root / "pictures" / ".a.bin.fetched", ns=(rec.mtime_ns, rec.mtime_ns))
        os.rename(t.root / "pictures" / ".a.bin.fetched", t.root / "pictures" / "a.bin")
        return real(path, rec, st)

    monkeypatch.setattr(scan_mod, "verify_clean_path", checkout_lands_now)
    res = status(Root(t.root))
    assert fired, "the injection point (scan.verify_clean_path) was never reached: move it with the code"
    assert res.total.dirty == 0 and not res.problems, res.problems


# -- 15. a file deleted while doctor walks its directory is "bad metadata" ---------------------------------

def test_doctor_never_calls_a_file_removed_during_its_walk_bad_metadata(tmp_path, monkeypatch):
    """The walk lists and lstat()s a whole directory, then doctor classifies its files one by
    one (an xattr read each): for a large directory the window lasts seconds. A build or a
    `rm` removes `logs/b.log` (a read-only file) in it: scan.classify's getxattr fails with
    ENOENT, which it reports as BAD ("No such file or directory"), and doctor says
    "bad-metadata: No such file or directory; left as it is", exit 1, for a file that is
    simply gone (status and the policies say "unreadable stub" the same way). Expected: a
    file that vanished is no finding. The removal is made when doctor classifies the file
    before it (fault injection)."""
    import jam_core.ops.doctor as doctor_mod

    t = make_tree(tmp_path)
    make_file(t.root / "logs" / "a.log", 5000, seed=16)
    make_file(t.root / "logs" / "b.log", 5000, seed=17)
    os.chmod(t.root / "logs" / "a.log", 0o444)
    os.chmod(t.root / "logs" / "b.log", 0o444)
    real = doctor_mod.classify
    fired = []

    def meanwhile(path, st, *args, **kwargs):
        if path.endswith("/a.log"):
            fired.append(path)
            (t.root / "logs" / "b.log").unlink(missing_ok=True)  # removed by someone else, right now
        return real(path, st, *args, **kwargs)

    monkeypatch.setattr(doctor_mod, "classify", meanwhile)
    with Session() as s:
        res = doctor_mod.doctor(Root(t.root), ".", make_plugin_manager(), s)
    assert fired, "the injection point (ops.doctor.classify) was never reached: move it with the code"
    assert not [(p.kind, p.path, p.detail) for p in res.problems if p.path.startswith("logs")]
