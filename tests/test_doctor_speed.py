"""`jam doctor` at speed (issue 10, performance half): a stub the catalog's stamp vouches for is
never read, a hostile catalog row is not trusted, --deep trusts no stamp and hashes each copy
once (in place through ``hash_object``, or fetched when a backend cannot), the cd-hook index is
judged from one path per directory. Real files, real xattrs, a real dir remote."""

from __future__ import annotations

import os
import sqlite3

import pytest

import jam_core.ops.doctor as doctor_mod
import jam_core.scan as scan_mod
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.objects import object_relpath
from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import jam, make_tree, record

N = 5


@pytest.fixture
def stashed(tmp_path):
    t = make_tree(tmp_path)
    (t.root / "d").mkdir()
    for i in range(N):
        make_file(t.root / "d" / f"f{i}.bin", 70_000 + i, seed=40 + i)
    jam("stash", ".", cwd=t.root)
    assert all(record(t.root / "d" / f"f{i}.bin") is not None for i in range(N))
    return t


def _run(t, **kw):
    with Session() as s:
        return doctor_mod.doctor(Root(t.root), ".", make_plugin_manager(), s, **kw)


@pytest.fixture
def reads(monkeypatch):
    """Count every read of a stub's metadata or bytes: the xattr (scan) and the bytes (doctor)."""
    seen = {"xattr": 0, "bytes": 0}
    real_get, real_open = scan_mod.getxattr, doctor_mod.open_checked

    def getxattr(*a, **k):
        seen["xattr"] += 1
        return real_get(*a, **k)

    def open_checked(*a, **k):
        seen["bytes"] += 1
        return real_open(*a, **k)
    monkeypatch.setattr(scan_mod, "getxattr", getxattr)
    monkeypatch.setattr(doctor_mod, "open_checked", open_checked)
    return seen


def test_untouched_stubs_are_not_read(stashed, reads):
    res = _run(stashed)
    assert (res.stubs, res.exit_code) == (N, 0)
    assert reads == {"xattr": 0, "bytes": 0}  # the stamps vouch for every stub


def test_a_touched_stub_is_read_and_its_edit_found(stashed, reads):
    p = stashed.root / "d" / "f1.bin"
    st = os.lstat(p)
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.seek(40)
        f.write(b"EDITED")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(p, st.st_mode & 0o7777)  # size, mtime and mode put back: only the ctime tells
    res = _run(stashed)
    assert [(p.kind, p.path) for p in res.problems] == [("dirty", "d/f1.bin")]
    assert reads["xattr"] == 1 and reads["bytes"] >= 1  # that one stub only


def test_hostile_catalog_row_is_not_trusted(stashed, reads):
    """A row whose stamp matches but whose id is garbage: the stub's own xattr decides."""
    db = sqlite3.connect(stashed.root / ".jam" / "catalog.db")
    db.execute("UPDATE stubs SET oid = 'b3:../../../etc/passwd' WHERE path = ?", (b"d/f2.bin",))
    db.commit()
    db.close()
    res = _run(stashed)
    assert (res.stubs, res.exit_code) == (N, 0), [(p.kind, p.path, p.detail) for p in res.problems]
    assert reads["xattr"] == 1
    out = jam("doctor", "--fix", cwd=stashed.root, check=0)
    assert "Traceback" not in out.err


def test_deep_trusts_no_stamp(stashed, reads):
    res = _run(stashed, deep=True)
    assert (res.stubs, res.verified, res.exit_code) == (N, N, 0)
    assert reads["xattr"] == N and reads["bytes"] >= N  # every stub's header read too


def test_deep_hashes_in_place_without_fetching(stashed, monkeypatch):
    calls = {"fetch": 0}
    pm = make_plugin_manager()
    real = pm.hook.fetch

    def fetch(**kw):
        calls["fetch"] += 1
        return real(**kw)
    monkeypatch.setattr(pm.hook, "fetch", fetch)
    victim = record(stashed.root / "d" / "f3.bin").oid
    obj = stashed.objects / object_relpath(victim)
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.seek(1000)
        f.write(b"rot")
    with Session() as s:
        res = doctor_mod.doctor(Root(stashed.root), ".", pm, s, deep=True)
    assert calls["fetch"] == 0  # the dir backend hashed each copy where it lies
    assert res.verified == N - 1
    assert ("corrupt", "d/f3.bin") in [(p.kind, p.path) for p in res.problems]


def test_deep_falls_back_on_fetch_when_a_backend_cannot_hash_in_place(stashed, monkeypatch):
    pm = make_plugin_manager()
    monkeypatch.setattr(pm.hook, "hash_object", lambda **kw: None)  # as a backend without the hook
    victim = record(stashed.root / "d" / "f0.bin").oid
    obj = stashed.objects / object_relpath(victim)
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.write(b"rot")
    with Session() as s:
        res = doctor_mod.doctor(Root(stashed.root), ".", pm, s, deep=True)
    assert res.verified == N - 1
    assert [(p.kind, p.path) for p in res.problems] == [("corrupt", "d/f0.bin"), ("missing", "d/f0.bin")]


def test_index_wanted_from_one_path_per_directory(stashed):
    from jam_core.catalog import Catalog
    from jam_core.hook.index import wanted
    from jam_core.hook.settings import settings

    rows = {p: ("b3:" + "0" * 64, 1, 1, "", 1, 1) for p in
            ("a/..", "a/ok", "b/c/d.bin", "b/c/e.bin", "../out", ".jam/x", "top.bin", "z/.", "z/y/f")}
    with Catalog(stashed.root / ".jam" / "catalog.db") as cat:
        got = doctor_mod._index_wanted(Root(stashed.root), cat, rows)
    assert got == wanted(rows, settings(Root(stashed.root)).depth)
    assert "a" in got  # "a/.." is no path, "a/ok" is: the directory counts
