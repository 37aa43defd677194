"""Snapshots (issue 15, part 1): `jam commit`, `jam log`, `jam diff`, `jam restore`, and gc
keeping what snapshots need. Real files, real xattrs, a dir remote, the real `jam` command;
faults injected at the exact instant (a monkeypatched function in a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from jam_core.history import snapshot as snapmod
from jam_core.history.snapshot import FILE, Item, Snapshot, SnapshotError, encode, parse
from jam_core.manager import make_plugin_manager
from jam_core.root import Root
from tests.safety_support import b3, is_stub, jam, make_tree, objects_verify, record

DAY = 86400 * 10**9


@pytest.fixture
def pm():
    return make_plugin_manager()


def _objects(remote: Path) -> set[str]:
    return {"b3:" + p.name for p in (remote / "objects").rglob("*") if p.is_file()}


def _head(t) -> str:
    return (t.root / ".jam/history/HEAD").read_text().strip()


def _log(t, *args) -> list[dict]:
    return json.loads(jam("log", *args, "--json", cwd=t.root).out)


# -- round trip -----------------------------------------------------------------------------------
def test_commit_log_diff_restore_round_trip(tmp_path):
    t = make_tree(tmp_path)
    (t.root / "docs").mkdir()
    (t.root / "docs/a.txt").write_bytes(b"first version\n")
    (t.root / "big.bin").write_bytes(os.urandom(300_000))
    os.symlink("docs/a.txt", t.root / "link")
    (t.root / "empty").write_bytes(b"")
    (t.root / "back.bin").write_bytes(os.urandom(100_000))
    jam("stash", "big.bin", "back.bin", cwd=t.root)
    jam("checkout", "back.bin", cwd=t.root)  # local again, its content still on the remote

    out = jam("commit", "-m", "one", cwd=t.root).out
    assert "5 files" in out and "1 new object uploaded" in out, out  # only a.txt went up
    assert record(t.root / "docs/a.txt") is None, "a committed file stays local"
    first = _head(t)
    assert first in _objects(t.remote)
    assert "nothing to commit" in jam("commit", cwd=t.root).out  # exit 0

    (t.root / "docs/a.txt").write_bytes(b"second version, longer\n")
    (t.root / "docs/new.txt").write_bytes(b"new\n")
    (t.root / "empty").unlink()
    diff = jam("diff", cwd=t.root).out.splitlines()
    assert diff == ["+ docs/new.txt", "~ docs/a.txt", "- empty"], diff
    jam("commit", "-m", "two", cwd=t.root)
    rows = _log(t)
    assert [r["message"] for r in rows] == ["two", "one"]
    assert (rows[0]["added"], rows[0]["modified"], rows[0]["deleted"]) == (1, 1, 1)
    assert [r["change"] for r in _log(t, "docs/a.txt")] == ["modified", "added"]
    assert jam("diff", first[3:12], rows[0]["id"], "docs", cwd=t.root).out.splitlines() == \
        ["+ docs/new.txt", "~ docs/a.txt"]

    # the first version comes back beside the current one, fetched and verified
    jam("restore", "docs/a.txt", "--at", first[3:12], "--as", "docs/a.old", "--fetch", cwd=t.root)
    assert (t.root / "docs/a.old").read_bytes() == b"first version\n"
    assert (t.root / "docs/a.txt").read_bytes() == b"second version, longer\n"
    # a deleted directory comes back whole, the symlink as a symlink
    for p in ("docs/a.txt", "docs/new.txt", "docs/a.old", "link", "back.bin"):
        os.unlink(t.root / p)
    (t.root / "docs").rmdir()
    jam("restore", ".", "--at", first, cwd=t.root)
    assert os.readlink(t.root / "link") == "docs/a.txt"
    assert is_stub(t.root / "docs/a.txt") and record(t.root / "docs/a.txt").size == 14
    assert (t.root / "empty").read_bytes() == b""
    jam("checkout", "docs", cwd=t.root)
    assert (t.root / "docs/a.txt").read_bytes() == b"first version\n"


def test_restore_of_a_deleted_file_as_stub_and_fetched(tmp_path):
    t = make_tree(tmp_path)
    data = os.urandom(200_000)
    (t.root / "f.bin").write_bytes(data)
    os.chmod(t.root / "f.bin", 0o640)
    jam("commit", cwd=t.root)
    os.unlink(t.root / "f.bin")
    out = jam("restore", "f.bin", cwd=t.root).out  # no --at: the newest snapshot's version
    assert "restored 1 path" in out
    rec = record(t.root / "f.bin")
    assert is_stub(t.root / "f.bin") and rec.oid == "b3:" + b3_bytes(data) and rec.mode == 0o640
    st = json.loads(jam("status", "f.bin", "--json", cwd=t.root).out)
    assert st["problems"] == [], st
    jam("checkout", "f.bin", cwd=t.root)
    assert b3(t.root / "f.bin") == b3_bytes(data), "differs"
    assert os.stat(t.root / "f.bin").st_mode & 0o7777 == 0o640

    os.unlink(t.root / "f.bin")
    jam("restore", "f.bin", "--fetch", cwd=t.root)
    assert not is_stub(t.root / "f.bin") and b3(t.root / "f.bin") == b3_bytes(data), "differs"


def b3_bytes(data: bytes) -> str:
    import blake3

    return blake3.blake3(data).hexdigest()


def test_restore_never_overwrites_a_file_that_differs(tmp_path):
    t = make_tree(tmp_path)
    (t.root / "d").mkdir()
    (t.root / "d/a").write_bytes(b"old a\n")
    (t.root / "d/b").write_bytes(b"old b\n")
    jam("commit", cwd=t.root)
    (t.root / "d/a").write_bytes(b"mine, unsaved elsewhere\n")
    os.unlink(t.root / "d/b")
    res = jam("restore", "d", cwd=t.root, check=1)
    assert res.err.startswith("jam: d/a: ") and len(res.err.splitlines()) == 1, res.err
    assert (t.root / "d/a").read_bytes() == b"mine, unsaved elsewhere\n"
    assert not (t.root / "d/b").exists(), "all or nothing: nothing restored"
    res = jam("restore", "d/a", "--as", "d/a.restored", cwd=t.root)
    assert is_stub(t.root / "d/a.restored")
    # the same content already there: nothing to do, no error
    (t.root / "d/a").write_bytes(b"old a\n")
    assert "already" in jam("restore", "d/a", cwd=t.root).out


def test_restore_never_follows_a_symlink_out_of_the_root(tmp_path):
    t = make_tree(tmp_path)
    (t.root / "d").mkdir()
    (t.root / "d/f").write_bytes(b"x" * 10)
    jam("commit", cwd=t.root)
    (t.root / "d/f").unlink()
    (t.root / "d").rmdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, t.root / "d")  # swapped in: d/f would land outside
    res = jam("restore", "d/f", cwd=t.root, check=1)
    assert "not a directory" in res.err, res.err
    assert list(outside.iterdir()) == []


# -- the format, hostile ----------------------------------------------------------------------------
def _snap(items, **kw) -> Snapshot:
    base = dict(parents=[], time_ns=1, host="h", machine="m1", tree="t", message="", pins=[])
    base.update(kw)
    return Snapshot(items=list(items), **base)


def _raw(head: dict, rows: list) -> bytes:
    text = b"jam-snapshot 1\n" + json.dumps(head).encode() + b"\n" + b"".join(json.dumps(r).encode() + b"\n"
                                                                                for r in rows)
    return zlib.compress(text)


HEAD = {"parents": [], "parent_sizes": [], "time": 1, "machine": {"host": "h", "id": "m1"}, "tree": "t", "message": "", "pins": []}
OID = "b3:" + "ab" * 32


def test_format_round_trip_keeps_every_name():
    items = [Item("a/b", FILE, OID, 5, 0o644, 123), Item("caf\udce9", FILE, OID, 0, 0o600, -5),
             Item("l", "l", mtime_ns=7, target="../../anything"), Item("tab\tand\nnewline", FILE, OID, 1, 0, 0)]
    s = _snap(items, parents=[OID], message="m\n2", pins=["a"], parent_sizes=[99])
    stored = encode(s)
    back = parse(stored, expect=s.id)
    assert back.items == sorted(items, key=lambda i: i.path) and back.pins == ["a"] and back.parents == [OID]
    assert back.parent_sizes == [99]
    assert back.id == s.id == snapmod.id_of(stored)


@pytest.mark.parametrize("rows, head, why", [
    ([["f", "../x", OID, 1, 0o644, 0]], HEAD, "bad path"),
    ([["f", "/etc/passwd", OID, 1, 0o644, 0]], HEAD, "bad path"),
    ([["f", ".jam/config.toml", OID, 1, 0o644, 0]], HEAD, "bad path"),
    ([["f", "a", "b3:zz", 1, 0o644, 0]], HEAD, "bad object id"),
    ([["f", "a", OID, -1, 0o644, 0]], HEAD, "impossible size"),
    ([["f", "a", OID, 1, 0o17777, 0]], HEAD, "impossible mode"),
    ([["f", "b", OID, 1, 0, 0], ["f", "a", OID, 1, 0, 0]], HEAD, "out of order"),
    ([["f", "a", OID, 1, 0, 0], ["f", "a/b", OID, 1, 0, 0]], HEAD, "both a file and a directory"),
    ([["l", "a", "x\u0000y", 0]], HEAD, "bad symlink target"),
    ([], {**HEAD, "tree": "../../etc"}, "bad tree name"),
    ([], {**HEAD, "parents": ["nope"], "parent_sizes": [1]}, "bad parents"),
    ([], {**HEAD, "parents": [OID], "parent_sizes": []}, "bad parent sizes"),
    ([], {**HEAD, "pins": ["../up"]}, "bad pin"),
])
def test_hostile_snapshot_is_refused_with_one_line(rows, head, why):
    with pytest.raises(SnapshotError) as exc:
        parse(_raw(head, rows))
    assert why in str(exc.value) and "\n" not in str(exc.value)


def test_snapshot_whose_bytes_do_not_match_its_id_is_refused():
    s = _snap([Item("a", FILE, OID, 1, 0, 0)])
    stored = encode(s)
    with pytest.raises(SnapshotError, match="do not match its id"):
        parse(stored[:-1] + bytes([stored[-1] ^ 1]), expect=s.id)


def test_snapshot_too_large_when_inflated_is_refused(monkeypatch):
    monkeypatch.setattr(snapmod, "MAX_TEXT", 1000)
    s = _snap([Item(f"f{i:05}", FILE, OID, 1, 0, 0) for i in range(100)])
    with pytest.raises(SnapshotError, match="larger than"):
        parse(encode(s))


def _plant(t, stored: bytes) -> str:
    """Put a (hostile) snapshot in the root's history as its newest, as a sync could."""
    from jam_core.history.index import Index

    sid = snapmod.id_of(stored)
    with Index(Root(t.root)) as ix:
        ix.save_bytes(sid, stored)
        ix.db.execute("INSERT INTO snapshots VALUES (?, ?, 'm1', 'h', 'evil', 1, 1, 0, 0, 1)", (sid, 10**19 // 10))
        ix.db.execute("INSERT OR REPLACE INTO meta VALUES ('head', ?)", (sid,))
    return sid


@pytest.mark.parametrize("row", [["f", "../x", OID, 1, 0o644, 0], ["f", "x", "b3:" + "0" * 63, 1, 0o644, 0]])
def test_hostile_snapshot_in_the_history_is_refused_by_restore(tmp_path, row):
    t = make_tree(tmp_path)
    (t.root / "x").write_bytes(b"x")
    jam("commit", cwd=t.root)
    os.unlink(t.root / "x")
    _plant(t, _raw(HEAD, [row]))
    for args in (["restore", "x"], ["restore", "."], ["log", "x"], ["diff"]):
        res = jam(*args, cwd=t.root, check=1)
        assert res.err.startswith("jam: snapshot ") and "refused" in res.err and len(res.err.splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (t.root / "x").exists()


# -- gc ------------------------------------------------------------------------------------------------
def test_gc_keeps_what_a_snapshot_needs_and_restore_brings_it_back(tmp_path):
    t = make_tree(tmp_path)
    data = os.urandom(100_000)
    (t.root / "f").write_bytes(data)
    jam("stash", "f", cwd=t.root)
    jam("commit", cwd=t.root)
    jam("checkout", "f", cwd=t.root)
    os.unlink(t.root / "f")
    oid = "b3:" + b3_bytes(data)
    snap = _head(t)
    jam("gc", cwd=t.root)
    assert {oid, snap} <= _objects(t.remote), "gc removed what a snapshot needs"
    # another root on the same remote removes nothing either
    from jam_core.ops.remotes import add_remote

    other = tmp_path / "other"
    other.mkdir()
    r2, _ = Root.init(other)
    add_remote(r2, make_plugin_manager(), "vault", str(t.remote))
    jam("gc", cwd=other)
    assert {oid, snap} <= _objects(t.remote), "another root's gc removed what a snapshot needs"
    jam("restore", "f", "--fetch", cwd=t.root)
    assert b3(t.root / "f") == b3_bytes(data), "differs"


def test_gc_keep_thins_snapshots_and_their_objects_go(tmp_path, pm):
    from jam_core.history.store import commit
    from jam_core.ops.gc import gc

    t = make_tree(tmp_path)
    root = Root(t.root)
    start = time.time_ns() - 30 * DAY
    contents = {}
    for day in range(6):  # one commit a day, two on the last day
        for k in range(2 if day == 5 else 1):
            data = f"day {day} take {k}\n".encode()
            (t.root / "f").write_bytes(data)
            out = commit(root, pm, f"d{day}.{k}", now_ns=start + day * DAY + k * 10**9)
            contents[out.id] = "b3:" + b3_bytes(data)
    ids = [r["id"] for r in _log(t)]
    assert len(ids) == 7
    res = jam("gc", "--keep", "daily 3", "--dry-run", cwd=t.root)
    assert res.out.count("would forget snapshot") == 4, res.out
    assert len(_log(t)) == 7, "--dry-run forgets nothing"
    assert all(s in _objects(t.remote) for s in ids)
    out = gc(root, pm, keep="daily 3")
    kept = dict(out.snapshots_kept)
    assert set(kept) == set(ids[:1] + ids[2:4]), (kept, ids)  # the newest of the last three days
    assert kept[ids[0]].startswith("the newest snapshot (HEAD)")
    assert [r["id"] for r in _log(t)] == ids[:1] + ids[2:4]
    gone = set(ids) - set(kept)
    have = _objects(t.remote)
    assert not (gone & have) and not ({contents[s] for s in gone} & have), "forgotten snapshots' objects stay"
    assert {contents[s] for s in kept} | set(kept) <= have
    jam("gc", "--keep", "weekly nonsense", cwd=t.root, check=2)


def test_prune_rules_like_borg():
    from jam_core.history.prune import parse_rules, plan

    assert parse_rules("daily 7, weekly 4, monthly 12") == {"daily": 7, "weekly": 4, "monthly": 12}
    t0 = int(time.mktime((2026, 1, 1, 12, 0, 0, 0, 0, -1)) * 1e9)
    snaps = [(f"b3:{i:064x}", t0 + i * DAY) for i in range(40)]  # 40 days, one a day
    kept, forgotten = plan(snaps, {"daily": 7, "weekly": 2}, snaps[-1][0])
    assert len(forgotten) + len(kept) == 40
    daily = [s for s, why in kept.items() if why.startswith("daily") or "daily" in why]
    assert len(daily) == 7 and len([w for w in kept.values() if w.startswith("weekly")]) == 2
    assert snaps[-1][0] in kept and snaps[0][0] not in kept
    kept, _ = plan(snaps[:2], {"daily": 5}, snaps[1][0])
    assert "[oldest]" not in " ".join(kept.values()) and len(kept) == 2


# -- ids cache, auto ---------------------------------------------------------------------------------
def test_unchanged_files_are_not_hashed_again(tmp_path, pm, monkeypatch):
    from jam_core.history import store

    t = make_tree(tmp_path)
    for i in range(5):
        (t.root / f"f{i}").write_bytes(b"%d" % i)
    calls = []
    real = store.hash_one
    monkeypatch.setattr(store, "hash_one", lambda dirs, e: calls.append(e.rel) or real(dirs, e))
    store.commit(Root(t.root), pm)
    assert len(calls) == 5
    calls.clear()
    (t.root / "f0").write_bytes(b"changed")
    out = store.commit(Root(t.root), pm)
    assert calls == ["f0"] and out.modified == 1


def test_commit_auto_waits_for_its_interval(tmp_path, pm):
    from jam_core.history.store import commit

    t = make_tree(tmp_path)
    with open(t.root / ".jam/config.toml", "a") as f:
        f.write('\n[history]\nauto = "10m"\n')
    (t.root / "f").write_bytes(b"1")
    now = time.time_ns()
    assert commit(Root(t.root), pm, auto=True, now_ns=now).id
    (t.root / "f").write_bytes(b"2")
    out = commit(Root(t.root), pm, auto=True, now_ns=now + 60 * 10**9)
    assert "recent" in out.nothing
    out = commit(Root(t.root), pm, auto=True, now_ns=now + 11 * 60 * 10**9)
    assert out.id and not out.nothing and out.modified == 1


# -- SIGKILL --------------------------------------------------------------------------------------------
_KILLER = """
import os, signal, sys
{patch}
from jam_core.cli import main
main(args=sys.argv[1:], prog_name="jam")
"""

_AT_HEAD = """
from jam_core.history import store
def boom(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
store.write_head = boom
"""

_MID_UPLOAD = """
from jam_core.ops import stash
real = stash.store_on
def store_on(remote, items, pm, session):
    for n, got in enumerate(real(remote, items, pm, session)):
        if n == 1:  # one object stored, the next one in flight
            os.kill(os.getpid(), signal.SIGKILL)
        yield got
stash.store_on = store_on
"""


def _killed(t, patch: str, *args):
    res = subprocess.run([sys.executable, "-c", _KILLER.format(patch=patch), *args], cwd=t.root,
                         capture_output=True)
    assert res.returncode == -signal.SIGKILL, res.stderr.decode()


def _remote_head(t) -> str | None:
    heads = list((t.remote / "meta/history").rglob("*")) if (t.remote / "meta/history").exists() else []
    files = [p for p in heads if p.is_file()]
    if not files:
        return None
    assert len(files) == 1
    return files[0].read_text().splitlines()[1]


def test_sigkill_at_the_head_write_loses_nothing(tmp_path):
    t = make_tree(tmp_path)
    (t.root / "a").write_bytes(b"a" * 1000)
    _killed(t, _AT_HEAD, "commit", "-m", "killed")
    first = _head(t)  # recorded here before the remote's head
    (t.root / ".jam/history/objects/.b3-dead.999.tmp").write_bytes(b"half")  # as a kill mid-write leaves
    assert _remote_head(t) is None
    assert [r["message"] for r in _log(t)] == ["killed"]
    (t.root / "b").write_bytes(b"b" * 1000)
    jam("commit", "-m", "next", cwd=t.root)
    second = _head(t)
    assert _remote_head(t) == second != first
    assert not list((t.root / ".jam/history/objects").glob(".*.tmp"))
    assert {first, second} <= _objects(t.remote)
    objects_verify(t.remote)
    jam("gc", cwd=t.root)
    assert {first, second, "b3:" + b3_bytes(b"a" * 1000)} <= _objects(t.remote)


_BEFORE_PUSH = """
from jam_core.history import store
def boom(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
store.push = boom
"""


def test_sigkill_after_the_local_record_the_next_commit_sends_both(tmp_path):
    t = make_tree(tmp_path)
    (t.root / "a").write_bytes(b"a" * 1000)
    _killed(t, _BEFORE_PUSH, "commit")
    first = _head(t)
    assert first not in _objects(t.remote) and _remote_head(t) is None
    jam("gc", cwd=t.root)  # the uploaded content is referenced already
    assert "b3:" + b3_bytes(b"a" * 1000) in _objects(t.remote)
    (t.root / "b").write_bytes(b"b")
    jam("commit", cwd=t.root)
    assert {first, _head(t)} <= _objects(t.remote) and _remote_head(t) == _head(t)


def test_sigkill_mid_upload_loses_nothing_and_the_next_commit_completes(tmp_path):
    t = make_tree(tmp_path)
    blobs = {f"f{i}": os.urandom(50_000) for i in range(4)}
    for name, data in blobs.items():
        (t.root / name).write_bytes(data)
    _killed(t, _MID_UPLOAD, "commit")
    assert not (t.root / ".jam/history/HEAD").exists() and _remote_head(t) is None
    assert all(b3(t.root / n) == b3_bytes(d) for n, d in blobs.items()), "a local file changed"
    objects_verify(t.remote)
    out = jam("commit", cwd=t.root).out
    assert "4 files" in out
    assert {"b3:" + b3_bytes(d) for d in blobs.values()} | {_head(t)} <= _objects(t.remote)
    assert _remote_head(t) == _head(t)
    for name in blobs:
        os.unlink(t.root / name)
    jam("restore", ".", "--fetch", cwd=t.root)
    assert all(b3(t.root / n) == b3_bytes(d) for n, d in blobs.items()), "differs"


# -- two machines -----------------------------------------------------------------------------------------
def test_two_machines_committing_to_one_remote_keep_both_heads(tmp_path):
    from jam_core.ops.remotes import add_remote

    t = make_tree(tmp_path, "one")
    two = tmp_path / "two"
    two.mkdir()
    r2, _ = Root.init(two)
    add_remote(r2, make_plugin_manager(), "vault", str(t.remote))
    for path in (t.root, two):
        with open(path / ".jam/config.toml", "a") as f:
            f.write('\n[history]\nname = "shared"\n')
        (path / "f").write_bytes(str(path).encode())
    env = dict(os.environ)
    jam("commit", cwd=t.root, env={**env, "JAM_MACHINE_ID": "machine-a"})
    jam("commit", cwd=two, env={**env, "JAM_MACHINE_ID": "machine-b"})
    heads = {p.name: p.read_bytes() for p in (t.remote / "meta/history/shared").iterdir()}
    assert set(heads) == {"machine-a", "machine-b"}
    from jam_core.history.store import decode_head

    (a, size), (b, _size) = decode_head(heads["machine-a"]), decode_head(heads["machine-b"])
    assert a == _head(t) and size == (t.root / ".jam/history/objects" / a.replace(":", "-")).stat().st_size and b == (two / ".jam/history/HEAD").read_text().strip()
    assert {a, b} <= _objects(t.remote)
    snap = parse((t.remote / "objects/b3" / a[3:5] / a[3:]).read_bytes(), expect=a)
    assert snap.machine == "machine-a" and snap.tree == "shared"
    jam("commit", cwd=t.root, env={**env, "JAM_MACHINE_ID": "BAD/ID"}, check=2)


def test_commit_of_named_paths_carries_the_rest(tmp_path):
    t = make_tree(tmp_path)
    for n in ("a", "b", "c"):
        (t.root / n).write_bytes(n.encode())
    os.symlink("a", t.root / "link")
    jam("commit", cwd=t.root)
    (t.root / "a").write_bytes(b"a2")
    (t.root / "b").write_bytes(b"b2")
    os.unlink(t.root / "c")
    os.unlink(t.root / "link")
    os.symlink("b", t.root / "link")
    out = jam("commit", "a", "c", "link", cwd=t.root).out  # c no longer exists: recorded as deleted
    assert "(+0 ~2 -1)" in out, out
    assert jam("diff", cwd=t.root).out.splitlines() == ["~ b"]
    snap = parse((t.root / ".jam/history/objects" / _head(t).replace(":", "-")).read_bytes(), expect=_head(t))
    assert snap.by_path()["link"].target == "b" and "c" not in snap.by_path()


def test_drop_from_another_root_keeps_what_a_snapshot_needs(tmp_path):
    from jam_core.ops.remotes import add_remote

    t = make_tree(tmp_path)
    data = os.urandom(80_000)
    (t.root / "f").write_bytes(data)
    jam("commit", cwd=t.root)  # uploaded by the commit; f stays local
    os.unlink(t.root / "f")  # now only the snapshot needs it
    oid = "b3:" + b3_bytes(data)
    other = tmp_path / "other"
    other.mkdir()
    second = tmp_path / "second"
    second.mkdir()
    r2, _ = Root.init(other)
    add_remote(r2, make_plugin_manager(), "vault", str(t.remote))
    add_remote(r2, make_plugin_manager(), "second", str(second))
    with open(other / ".jam/config.toml", "a") as f:
        f.write("\n[place]\ncopies = 2\n")
    (other / "g").write_bytes(data)
    jam("stash", "g", cwd=other)  # the same content, on both of its remotes
    conf = other / ".jam/config.toml"
    conf.write_text(conf.read_text().replace("copies = 2", "copies = 1"))  # one copy is enough for it
    res = jam("drop", "--from", "vault", "g", cwd=other, check=1)
    assert "kept" in res.err, res.err
    assert oid in _objects(t.remote), "another root's drop removed what a snapshot needs"
    jam("restore", "f", "--fetch", cwd=t.root)
    assert b3(t.root / "f") == b3_bytes(data), "differs"


def test_snapshots_are_named_by_prefix_date_or_age(tmp_path, pm):
    from jam_core.errors import UsageError
    from jam_core.history.index import Index
    from jam_core.history.restore import resolve
    from jam_core.history.store import commit

    t = make_tree(tmp_path)
    root = Root(t.root)
    day1 = int(time.mktime((2026, 3, 10, 9, 0, 0, 0, 0, -1)) * 1e9)
    ids = []
    for n, when in enumerate((day1, day1 + DAY, day1 + DAY + 3600 * 10**9)):
        (t.root / "f").write_bytes(b"%d" % n)
        ids.append(commit(root, pm, now_ns=when).id)
    with Index(root) as ix:
        assert resolve(ix, ids[0]) == ids[0] and resolve(ix, ids[1][3:9]) == ids[1]
        assert resolve(ix, "2026-03-10") == ids[0]  # a day means its end
        assert resolve(ix, "2026-03-11 09:30") == ids[1]
        assert resolve(ix, "2026-03-12") == ids[2]
        assert resolve(ix, "1d", now=(day1 + DAY + 1800 * 10**9) / 1e9) == ids[0]
        with pytest.raises(UsageError, match="no snapshot at or before"):
            resolve(ix, "2026-03-09")
        with pytest.raises(UsageError, match="neither"):
            resolve(ix, "yesterday-ish")


def test_commit_of_many_directories_within_a_small_descriptor_limit(tmp_path):
    import resource

    t = make_tree(tmp_path)
    for d in range(400):
        (t.root / f"d{d:03}").mkdir()
        for f in range(2):
            (t.root / f"d{d:03}/f{f}").write_bytes(b"%d-%d" % (d, f))

    def low():
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))

    res = subprocess.run([sys.executable, "-c", "from jam_core.cli import main; main(args=['commit'], prog_name='jam')"],
                         cwd=t.root, capture_output=True, preexec_fn=low)
    assert res.returncode == 0, res.stderr.decode()[-800:]
    assert "800 files" in res.stdout.decode() and "800 new objects" in res.stdout.decode()


def test_index_counts_what_only_one_remote_holds(tmp_path, pm):
    from jam_core.history.index import Index
    from jam_core.history.store import commit

    t = make_tree(tmp_path)
    (t.root / "f").write_bytes(b"only here")
    commit(Root(t.root), pm)
    with Index(Root(t.root)) as ix:
        assert ix.only_on("vault") == 2  # the content and the snapshot
        assert ix.only_on("elsewhere") == 0


def test_an_unreadable_directory_is_carried_not_deleted(tmp_path, pm, monkeypatch):
    from jam_core.history import store

    t = make_tree(tmp_path)
    (t.root / "d").mkdir()
    (t.root / "d/f").write_bytes(b"f")
    (t.root / "g").write_bytes(b"g")
    store.commit(Root(t.root), pm)
    (t.root / "g").write_bytes(b"g2")
    real = store.scan

    def failing(root, rels, ix, skipped, *more):  # the walk could not open d/ (EACCES, EIO...)
        items, pending, learned = real(root, rels, ix, skipped, *more)
        items.pop("d/f", None)
        skipped.append(("d", "Permission denied"))
        return items, pending, learned
    monkeypatch.setattr(store, "scan", failing)
    out = store.commit(Root(t.root), pm)
    assert (out.modified, out.deleted) == (1, 0) and out.exit_code == 1


def test_entry_lines_are_exactly_json():
    from jam_core.history.snapshot import body

    items = [Item("a\"b\\\\c\u00e9\udcff\n", FILE, OID, 5, 0o644, -3), Item("l", "l", mtime_ns=7, target="t\"\u2603")]
    lines = body(items).decode("ascii").splitlines()
    assert lines == [json.dumps(i.row(), separators=(",", ":")) for i in items]


def test_bad_settings_are_one_line_usage_errors(tmp_path):
    t = make_tree(tmp_path)
    (t.root / "f").write_bytes(b"f")
    conf = t.root / ".jam/config.toml"
    base = conf.read_text()
    conf.write_text(base + '\n[history]\nname = "../../escape"\n')
    res = jam("commit", cwd=t.root, check=2)
    assert res.err.startswith("jam: ") and "history.name" in res.err and len(res.err.splitlines()) == 1
    conf.write_text(base + '\n[history]\nauto = "soon"\n')
    assert "history.auto" in jam("commit", "--auto", cwd=t.root, check=2).err
    conf.write_text(base)
    jam("commit", cwd=t.root)
    assert "outside" in jam("restore", "f", "--as", str(tmp_path / "out"), cwd=t.root, check=2).err
    assert not (tmp_path / "out").exists()
    assert "history.auto is not set" in jam("commit", "--auto", cwd=t.root).out


def test_diff_of_a_name_that_is_neither_a_snapshot_nor_a_path_says_so(tmp_path):
    """`jam diff typo`: no snapshot by that id and no such path, now or in the snapshot: one line
    and exit 2, not an empty diff that reads as "nothing changed". A path deleted since the
    snapshot still diffs."""
    t = make_tree(tmp_path)
    (t.root / "docs").mkdir()
    (t.root / "docs/a.txt").write_bytes(b"one\n")
    jam("commit", "-m", "one", cwd=t.root)
    res = jam("diff", "no-such-thing", cwd=t.root, check=2)
    assert res.err.startswith("jam: no-such-thing: neither a snapshot nor a path") and res.out == "", res.err
    (t.root / "docs/a.txt").unlink()
    assert jam("diff", "docs", cwd=t.root).out.splitlines() == ["- docs/a.txt"]


def test_a_damaged_history_db_is_named_as_the_history_not_the_catalog(tmp_path):
    """history.db damaged past its header (opens, then a query fails): the one line names the
    history, whose records no `jam doctor --fix` can rebuild, not the catalog. Guard
    (mutation-checked): cli._sqlite_error's ``_raised_in(exc, jam_core/history/)``."""
    t = make_tree(tmp_path)
    for i in range(200):
        (t.root / f"f{i}").write_bytes(os.urandom(100) + str(i).encode())
    jam("commit", "-m", "one", cwd=t.root)
    db = t.root / ".jam" / "history" / "history.db"
    data = bytearray(db.read_bytes())
    for off in range(4096, len(data), 4096):  # every page but the first (the header and schema)
        data[off + 100:off + 400] = os.urandom(300)
    db.write_bytes(bytes(data))
    for args in (("commit", "-m", "two"), ("diff", "HEAD")):
        res = jam(*args, cwd=t.root, check=1)
        assert res.err.startswith("jam: the history (.jam/history/history.db) is damaged"), res.err
        assert "catalog" not in res.err and "Traceback" not in res.err and res.err.count("\n") == 1, res.err
