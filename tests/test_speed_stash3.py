"""Issue 13, third pass: the large copy started while the core hashes (``stash_ahead``), and
the core's per-stub cost. Behaviour only, never time.

* a corrupt large object is refused by checkout;
* the stash asks ``place`` only where its answer can differ from the default one;
* a stub's header is built from a cached template, byte for byte what ``json.dumps`` made.
"""

from __future__ import annotations

import os

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


def test_a_corrupt_large_object_is_still_refused(tmp_path):
    """The object holds other bytes than the stub's id: the core's hash of the fetched file
    finds it corrupt and leaves the stub."""
    t, want = stashed_big(tmp_path, seed=31)
    obj = t.remote / "objects" / objects.object_relpath(record(t.root / "big").oid)
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.seek(BIG - 7)
        b = f.read(1)
        f.seek(BIG - 7)
        f.write(bytes([b[0] ^ 1]))
    with Session() as s:
        res = checkout(Root(t.root), ["big"], make_plugin_manager(), s)
    assert not res.done and res.failed, res
    assert is_stub(t.root / "big")
    assert [n for n in os.listdir(t.root) if n != ".jam"] == ["big"]


# -- the per-stub cost: one `place` call per command where its answer cannot differ -----------

class _CountPlace:
    """Counts the calls of ``place`` and lets the default answer (returns None)."""

    def __init__(self):
        self.calls = 0

    @hookimpl(tryfirst=True)
    def place(self, oid):
        self.calls += 1
        return None


def _count_default_place(monkeypatch):
    import jam_core.placement as placement

    calls = []
    real = placement.place.__wrapped__ if hasattr(placement.place, "__wrapped__") else placement.choose
    monkeypatch.setattr(placement, "choose", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _header_remotes(path) -> tuple:
    from jam_core.stub import StubRecord

    with open(path, "rb") as f:
        return StubRecord.from_header(f.read(4096)).remotes


def _stash_n(tmp_path, pm, n=4, config="", extra_remote=None):
    t = make_tree(tmp_path)
    for i in range(n):
        make_file(t.root / f"f{i}", 70_000, seed=70 + i)
    if extra_remote is not None:
        from jam_core.ops.remotes import add_remote

        far = tmp_path / "far"
        far.mkdir()
        add_remote(Root(t.root), make_plugin_manager(), "far", str(far), **extra_remote)
    if config:
        cfg = t.root / ".jam" / "config.toml"
        cfg.write_text(cfg.read_text() + config)
    with Session() as s:
        res = stash(Root(t.root), [f"f{i}" for i in range(n)], pm, s)
    return t, res


def test_the_default_placement_is_asked_once_per_stash(tmp_path, monkeypatch):
    calls = _count_default_place(monkeypatch)
    t, res = _stash_n(tmp_path, make_plugin_manager())
    assert len(res.done) == 4, res
    assert calls == [1]
    assert {_header_remotes(t.root / f"f{i}") for i in range(4)} == {(Root(t.root).remotes()[0].name,)}


def test_a_place_plugin_is_asked_for_every_object(tmp_path):
    counter = _CountPlace()
    t, res = _stash_n(tmp_path, make_plugin_manager(extra=(counter,)))
    assert len(res.done) == 4, res
    assert counter.calls == 4


@pytest.mark.parametrize("case", ["copies2", "pool", "cache"])
def test_more_copies_a_pool_or_a_cache_ask_place_for_every_object(tmp_path, monkeypatch, case):
    calls = _count_default_place(monkeypatch)
    if case == "copies2":
        t, res = _stash_n(tmp_path, make_plugin_manager(), config="\n[place]\ncopies = 2\n",
                          extra_remote={"tier": 1})
    elif case == "pool":
        t, res = _stash_n(tmp_path, make_plugin_manager(), extra_remote={"tier": 0})
    else:
        t, res = _stash_n(tmp_path, make_plugin_manager(), extra_remote={"tier": 1, "options": {"cache": "7d"}})
    assert len(res.done) == 4, res
    assert len(calls) == 4
    if case == "copies2":
        assert all(len(_header_remotes(t.root / f"f{i}")) == 2 for i in range(4))


# -- the header, from a template --------------------------------------------------------------

def _old_header(rec, name: str) -> bytes:
    """The header as json.dumps made it (before the template)."""
    import json

    from jam_core.stub import HEADER_MAX, MAGIC, VERSION

    meta = {"jam": VERSION, "id": rec.oid, "size": rec.size, "mode": f"{rec.mode:04o}", "mtime_ns": rec.mtime_ns,
            "remotes": list(rec.remotes), "stashed_at": rec.stashed_at, "name": name}
    text = ("This file is stored by jam: its content is on a remote, not on this disk.\n"
            "Bring it back with:  jam checkout <this file>   (or cd into its directory with\n"
            "the jam shell hook). Do not edit this placeholder.\n"
            f"{json.dumps(meta, ensure_ascii=True, separators=(',', ':'))}\n").encode("ascii")
    data = MAGIC + text
    return _old_header(rec, "") if len(data) > HEADER_MAX and name else data


@pytest.mark.parametrize("name", ["f", 'quo"te\\back', "tab\tnew\nline\x01\x7f", "été ☃ 𝄞", "bad\udcffbyte",
                                  "</script>", "x" * 3000, "y" * 5000, ""], ids=lambda n: f"{n[:12]!r}-{len(n)}")
def test_the_header_is_byte_for_byte_what_json_dumps_made(name):
    from jam_core.stub import StubRecord, record_from_block

    for remotes, stashed, mtime, mode in [((), "", 0, 0), (("a", 'b"c', "ü"), "2026-12-01T00:00:00Z", -5, 0o7777),
                                          (("n",) * 3, "t", (1 << 62), 0o644)]:
        rec = StubRecord(oid="b3:" + "ab" * 32, size=(1 << 50), mode=mode, mtime_ns=mtime, remotes=remotes,
                         stashed_at=stashed)
        new = rec.header(name)
        assert new == _old_header(rec, name), name
        assert record_from_block(new, rec.size) == rec


# -- a large file's copy started while the core hashes it (stash_ahead) -------------------------

def _ahead_tree(tmp_path, monkeypatch):
    import jam_core.ops.stash as stash_mod

    monkeypatch.setattr(stash_mod, "AHEAD_MIN", 9 << 20)  # the hook's threshold, lowered for a small test
    on_another_disk(monkeypatch)
    t = make_tree(tmp_path)
    make_file(t.root / "big", BIG, seed=41)
    return t, b3(t.root / "big")


def _copies(monkeypatch, corrupt_ahead: bool = False):
    """Count the dir backend's large copies by thread; ``corrupt_ahead``: the copy started
    ahead holds other bytes than the file (one flipped after it was written)."""
    import threading

    import jam_dir

    seen = []
    real = jam_dir._copy_verifying

    def counted(src, dst, size, algorithm, progress):
        ahead = threading.current_thread().name == "jam-dir-ahead"
        seen.append("ahead" if ahead else "stash")
        got = real(src, dst, size, algorithm, progress)
        if ahead and corrupt_ahead:
            b = os.pread(dst, 1, 12345)
            os.pwrite(dst, bytes([b[0] ^ 1]), 12345)
            os.lseek(dst, 0, os.SEEK_SET)
            got = jam_dir.hash_fd(dst, algorithm, limit=size)
        return got

    monkeypatch.setattr(jam_dir, "_copy_verifying", counted)
    return seen


def _no_parts(t) -> bool:
    return not os.listdir(t.remote / "tmp")


def test_a_large_stash_takes_the_copy_started_while_it_hashed(tmp_path, monkeypatch):
    t, want = _ahead_tree(tmp_path, monkeypatch)
    seen = _copies(monkeypatch)
    with Session() as s:
        res = stash(Root(t.root), ["big"], make_plugin_manager(), s)
    assert [r for r, _ in res.done] == ["big"], res
    assert seen == ["ahead"]  # one copy, made while the core hashed
    oid = record(t.root / "big").oid
    assert b3(t.remote / "objects" / objects.object_relpath(oid)) == want == oid.split(":")[1]
    assert _no_parts(t)


def test_a_copy_ahead_that_does_not_hash_to_the_id_is_never_taken(tmp_path, monkeypatch):
    t, want = _ahead_tree(tmp_path, monkeypatch)
    seen = _copies(monkeypatch, corrupt_ahead=True)
    with Session() as s:
        res = stash(Root(t.root), ["big"], make_plugin_manager(), s)
    assert [r for r, _ in res.done] == ["big"], res
    assert seen == ["ahead", "stash"]  # copied again, and that copy verified
    oid = record(t.root / "big").oid
    assert b3(t.remote / "objects" / objects.object_relpath(oid)) == want
    assert _no_parts(t)


def test_a_copy_ahead_of_a_file_that_stays_local_is_removed(tmp_path, monkeypatch):
    """The file changed while it was hashed: it stays local, and the copy started for it is
    stopped and removed when the command ends."""
    import jam_core.ops.stash as stash_mod

    t, want = _ahead_tree(tmp_path, monkeypatch)
    seen = _copies(monkeypatch)
    real = stash_mod.hash_fd
    monkeypatch.setattr(stash_mod, "hash_fd", lambda *a, **k: (lambda r: (r[0], r[1] - 1))(real(*a, **k)))
    with Session() as s:
        res = stash(Root(t.root), ["big"], make_plugin_manager(), s)
    assert not res.done and res.skipped, res
    assert seen == ["ahead"]
    assert b3(t.root / "big") == want and not is_stub(t.root / "big")
    assert _no_parts(t)
    assert not list((t.remote / "objects").rglob("*")) or not any(p.is_file() for p in (t.remote / "objects").rglob("*"))


def test_a_stash_without_a_session_removes_the_copy_ahead_it_did_not_take(tmp_path, monkeypatch):
    """Called without a session (a library caller), the stash closes the one it made: the
    copy started for a file that stayed local does not stay on the remote."""
    import jam_core.ops.stash as stash_mod

    t, want = _ahead_tree(tmp_path, monkeypatch)
    seen = _copies(monkeypatch)
    real = stash_mod.hash_fd
    monkeypatch.setattr(stash_mod, "hash_fd", lambda *a, **k: (lambda r: (r[0], r[1] - 1))(real(*a, **k)))
    res = stash(Root(t.root), ["big"], make_plugin_manager())
    assert not res.done and res.skipped, res
    assert seen == ["ahead"]
    assert _no_parts(t)
