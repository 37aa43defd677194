"""Issue 15 (brief V4, gap 1): `jam copy`, `jam move` and `remote remove --move-to` carry an
object a remote holds ONLY as content-defined chunks (a large file committed, never stashed
whole) as its pieces: the recipe and every chunk the destination lacks, each verified by its
id, then the pointer last; a move removes the source's pieces only once the destination holds
them all, never a piece another needed version shares. Real files, real xattrs, real dir
remotes, the real sshd for sftp, the real `jam` command; kills land at the exact hook call."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from jam_core.history import chunks
from jam_core.manager import make_plugin_manager
from jam_core.model import Session
from jam_core.objects import object_relpath
from jam_core.ops.remotes import add_remote
from jam_core.root import Root
from tests.safety_support import JAM, b3, is_stub, record, run_jam
from tests.test_history_chunks import MiB, _chunky, _clone, _committed, _objects, _recipe_chunks, b3_bytes


def _pointer(remote: Path, oid: str) -> Path:
    return remote / "meta/recipes" / ("b3-" + oid.split(":")[1])


def _pieces(remote: Path, oid: str) -> set[str]:
    """The recipe and chunks of ``oid`` as ``remote``'s pointer names them."""
    rid, _n = chunks.decode_pointer(_pointer(remote, oid).read_bytes())
    return _recipe_chunks(_objects(remote)[rid]) | {rid}


def _remote_of(root: Path, name: str):
    return next(r for r in Root(root).remotes() if r.name == name)


def _held(root: Path, name: str, oid: str, size: int) -> bool:
    return chunks.held(_remote_of(root, name), oid, size, make_plugin_manager(), Session())


def _add(root: Path, name: str, url: str) -> None:
    add_remote(Root(root), make_plugin_manager(), name, url)


def _one_line(res, *words) -> None:
    lines = [x for x in res.err.splitlines() if x.strip()]
    assert lines and all(x.startswith("jam: ") for x in lines), res.err
    assert any(all(w in x for w in words) for x in lines), res.err


# -- copy: a clone's stub of a chunk-only object reaches a second remote ------------------------------------
def test_copy_carries_a_chunk_only_object_and_a_clone_from_the_destination_checks_it_out(tmp_path):
    t, data = _committed(tmp_path)
    whole = "b3:" + b3_bytes(bytes(data))
    b = _clone(tmp_path, t)
    second = tmp_path / "second"
    second.mkdir()
    _add(b, "second", str(second))
    res = run_jam(b, "copy", "--to", "second", "big.bin", machine="bbb")
    assert "Copied 1 file" in res.out, res.out + res.err
    assert whole not in _objects(second), "carried as pieces, not assembled whole"
    assert _pieces(t.remote, whole) <= set(_objects(second)), "every piece is on the destination"
    for oid, p in _objects(second).items():
        assert "b3:" + b3(p) == oid, "a piece on the destination does not hash to its id"
    assert _held(b, "second", whole, len(data))
    assert "all can come back" in run_jam(b, "doctor", machine="bbb").out
    live = json.loads(run_jam(b, "where", "--check", "--json", "big.bin", machine="bbb").out)
    assert sorted(live[0]["remotes"]) == ["origin", "second"], live
    # a second copy finds everything there and copies nothing new
    before = {o: p.stat().st_mtime_ns for o, p in _objects(second).items()}
    run_jam(b, "copy", "--to", "second", "big.bin", machine="bbb")
    assert {o: p.stat().st_mtime_ns for o, p in _objects(second).items()} == before
    # B commits (its head lands on second too); a fresh clone from second alone brings it back
    (b / "note.txt").write_bytes(b"note\n")
    run_jam(b, "commit", "-m", "note", machine="bbb")
    c = tmp_path / "c"
    run_jam(tmp_path, "clone", str(second), str(c), machine="ccc")
    assert [r.name for r in Root(c).remotes()] == ["origin"]
    run_jam(c, "checkout", "big.bin", machine="ccc")
    assert not is_stub(c / "big.bin") and b3(c / "big.bin") == b3_bytes(bytes(data)), "differs"


def test_without_the_carrier_a_chunk_only_object_is_not_copied(tmp_path):
    """The library's copy moves whole objects only unless it is handed ``Pieces`` (the CLI
    does): the failure the carrier closes, in one line, nothing pointed at."""
    from jam_core.ops.copies import copy

    t, data = _committed(tmp_path)
    whole = "b3:" + b3_bytes(bytes(data))
    b = _clone(tmp_path, t)
    second = tmp_path / "second"
    second.mkdir()
    _add(b, "second", str(second))
    pm = make_plugin_manager()
    res = copy(Root(b), ["big.bin"], pm, "second")
    assert res.failed and "does not have" in res.failed[0][1]
    assert not _pointer(second, whole).exists()
    res = copy(Root(b), ["big.bin"], pm, "second", pieces=chunks.Pieces(Root(b), pm, Session()))
    assert not res.failed and res.done, res
    assert _held(b, "second", whole, len(data))


def test_a_corrupt_chunk_on_the_source_is_never_copied(tmp_path):
    t, data = _committed(tmp_path)
    whole = "b3:" + b3_bytes(bytes(data))
    b = _clone(tmp_path, t)
    second = tmp_path / "second"
    second.mkdir()
    _add(b, "second", str(second))
    rid, _n = chunks.decode_pointer(_pointer(t.remote, whole).read_bytes())
    victim_id = sorted(_recipe_chunks(_objects(t.remote)[rid]))[5]
    victim = _objects(t.remote)[victim_id]
    good = victim.read_bytes()
    os.chmod(victim, 0o644)
    victim.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])  # same size: only its hash tells
    res = run_jam(b, "copy", "--to", "second", "big.bin", machine="bbb", check=1)
    _one_line(res, "big.bin", "corrupt")
    assert victim_id not in _objects(second), "the corrupt chunk reached the destination"
    assert not _pointer(second, whole).exists(), "the destination points at an object it cannot give back"
    assert not _held(b, "second", whole, len(data))
    victim.write_bytes(good)
    run_jam(b, "copy", "--to", "second", "big.bin", machine="bbb")
    assert _held(b, "second", whole, len(data))


def test_a_hostile_pointer_or_recipe_on_the_source_is_refused_in_one_line(tmp_path):
    """Metadata is input: a malformed pointer, or one naming another file's recipe, on the
    source: the copy fails in one line and nothing is pointed at on the destination."""
    t, data = _committed(tmp_path)
    (t.root / "other.bin").write_bytes(os.urandom(2 * MiB))
    run_jam(t.root, "commit", machine="aaa")
    whole = "b3:" + b3_bytes(bytes(data))
    b = _clone(tmp_path, t)
    second = tmp_path / "second"
    second.mkdir()
    _add(b, "second", str(second))
    ptr = _pointer(t.remote, whole)
    honest = ptr.read_bytes()
    os.chmod(ptr, 0o644)
    for bad, word in ((b"jam-recipe-pointer 1\n../../etc/passwd\n5\n", "malformed"),
                      (_pointer(t.remote, "b3:" + b3(t.root / "other.bin")).read_bytes(), "another file")):
        ptr.write_bytes(bad)
        res = run_jam(b, "copy", "--to", "second", "big.bin", machine="bbb", check=1)
        _one_line(res, "big.bin", word)
        assert not _pointer(second, whole).exists()
    ptr.write_bytes(honest)
    run_jam(b, "copy", "--to", "second", "big.bin", machine="bbb")
    assert _held(b, "second", whole, len(data))


def test_a_piece_the_source_lost_is_taken_from_another_remote(tmp_path):
    """The pieces go in batches from the source; one it lost (a batch fails) is then copied
    piece by piece from any remote of the root that holds it, verified by its id."""
    t, data = _committed(tmp_path)
    whole = "b3:" + b3_bytes(bytes(data))
    b = _clone(tmp_path, t)
    third, second = tmp_path / "third", tmp_path / "second"
    third.mkdir()
    second.mkdir()
    _add(b, "third", str(third))
    _add(b, "second", str(second))
    rid, _n = chunks.decode_pointer(_pointer(t.remote, whole).read_bytes())
    lost = sorted(_recipe_chunks(_objects(t.remote)[rid]))[7]
    keep = third / "objects" / object_relpath(lost)  # third holds that one chunk, no recipe
    keep.parent.mkdir(parents=True, exist_ok=True)
    os.rename(_objects(t.remote)[lost], keep)
    res = run_jam(b, "copy", "--to", "second", "big.bin", machine="bbb")
    assert "Copied 1 file" in res.out, res.out + res.err
    assert "b3:" + b3(_objects(second)[lost]) == lost
    assert _held(b, "second", whole, len(data))


def test_sftp_destination(tmp_path, sshd, sftp_store):
    t, data = _committed(tmp_path, size=3 * MiB)
    whole = "b3:" + b3_bytes(bytes(data))
    b = _clone(tmp_path, t)
    url = f"sftp://{sshd.alias}{sftp_store}"
    _add(b, "far", url)
    res = run_jam(b, "copy", "--to", "far", "big.bin", machine="bbb")
    assert "Copied 1 file" in res.out, res.out + res.err
    assert _pieces(t.remote, whole) <= set(_objects(sftp_store))
    assert _held(b, "far", whole, len(data))
    (b / "note.txt").write_bytes(b"note\n")
    run_jam(b, "commit", "-m", "note", machine="bbb")
    c = tmp_path / "c"
    run_jam(tmp_path, "clone", url, str(c), machine="ccc")
    run_jam(c, "checkout", "big.bin", machine="ccc")
    assert b3(c / "big.bin") == b3_bytes(bytes(data)), "differs"


# -- move: the source's pieces go, the ones another version shares stay ------------------------------------
def _versions(tmp_path):
    """Root A: big.bin committed twice (v1, then four 100-byte edits: v2 shares most chunks), v1
    restored as the stub old.bin (held only as chunks on 'vault'), and a second dir remote.
    Returns (tree, second, v1 bytes, v2 bytes)."""
    t, data = _committed(tmp_path)
    v1 = bytes(data)
    first = run_jam(t.root, "log", machine="aaa").out.split()[0]
    for at in (500_000, 1_500_000, 2_500_000, 3_500_000):  # four edits: v1 keeps 4 to 8 chunks of its own
        data[at:at + 100] = os.urandom(100)
    (t.root / "big.bin").write_bytes(data)
    run_jam(t.root, "commit", "-m", "two", machine="aaa")
    run_jam(t.root, "restore", "big.bin", "--at", first, "--as", "old.bin", machine="aaa")
    assert is_stub(t.root / "old.bin")
    second = tmp_path / "second"
    second.mkdir()
    _add(t.root, "second", str(second))
    return t, second, v1, bytes(data)


def _after_move(t, second: Path, v1: bytes, v2: bytes) -> None:
    w1, w2 = "b3:" + b3_bytes(v1), "b3:" + b3_bytes(v2)
    mine = _pieces(second, w1)
    shared = _pieces(t.remote, w2)
    assert _held(t.root, "second", w1, len(v1))
    on_vault = set(_objects(t.remote))
    assert shared <= on_vault, "a piece the other version needs was removed from the source"
    assert not (mine - shared) & on_vault, "the moved version's own pieces are still on the source"
    assert _pointer(t.remote, w1).read_bytes() == b"", "the source still points at the moved pieces"
    assert not _held(t.root, "vault", w1, len(v1)) and _held(t.root, "vault", w2, len(v2))
    assert "all can come back" in run_jam(t.root, "doctor", machine="aaa").out


def test_move_removes_the_sources_own_pieces_and_keeps_the_shared_ones(tmp_path):
    t, second, v1, v2 = _versions(tmp_path)
    res = run_jam(t.root, "move", "--from", "vault", "--to", "second", "old.bin", machine="aaa")
    assert "Moved 1 file" in res.out, res.out + res.err
    _after_move(t, second, v1, v2)
    run_jam(t.root, "checkout", "old.bin", machine="aaa")
    assert b3(t.root / "old.bin") == b3_bytes(v1), "differs"
    os.unlink(t.root / "big.bin")  # v2 comes back from the source's pieces, the shared ones included
    run_jam(t.root, "restore", "big.bin", "--fetch", machine="aaa")
    assert b3(t.root / "big.bin") == b3_bytes(v2), "differs"


def test_drop_after_copy_removes_the_pieces_and_counts_the_copy_held_as_chunks(tmp_path):
    t, second, v1, v2 = _versions(tmp_path)
    w1 = "b3:" + b3_bytes(v1)
    res = run_jam(t.root, "drop", "--from", "vault", "old.bin", machine="aaa", check=1)
    assert "needs 1 verified copy elsewhere and 0 are left" in res.out + res.err, res.out + res.err
    assert _held(t.root, "vault", w1, len(v1)), "dropped without a copy elsewhere"
    run_jam(t.root, "copy", "--to", "second", "old.bin", machine="aaa")
    run_jam(t.root, "drop", "--from", "vault", "old.bin", machine="aaa")
    _after_move(t, second, v1, v2)


def test_drop_refuses_while_the_copy_held_as_chunks_elsewhere_has_a_corrupt_chunk(tmp_path):
    """The copy on 'second' counts only if every chunk hashes to its id there: one chunk with a
    byte flipped (same size) and the drop from 'vault' is refused, nothing removed."""
    t, second, v1, v2 = _versions(tmp_path)
    w1 = "b3:" + b3_bytes(v1)
    run_jam(t.root, "copy", "--to", "second", "old.bin", machine="aaa")
    rid, _n = chunks.decode_pointer(_pointer(second, w1).read_bytes())
    victim = _objects(second)[sorted(_recipe_chunks(_objects(second)[rid]))[0]]
    good = victim.read_bytes()
    os.chmod(victim, 0o644)
    victim.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])
    before = set(_objects(t.remote))
    res = run_jam(t.root, "drop", "--from", "vault", "old.bin", machine="aaa", check=1)
    assert "needs 1 verified copy elsewhere and 0 are left" in res.out + res.err, res.out + res.err
    assert set(_objects(t.remote)) == before and _held(t.root, "vault", w1, len(v1)), "removed"


def test_move_keeps_the_pieces_a_stub_the_catalog_does_not_know_shares(tmp_path):
    """The other version is needed only by a stub of this root that neither the catalog nor the
    refs on the source list yet (no history, refs written before the stub came): the move walks
    the root afresh, as gc does, and keeps the chunks that version shares on the source."""
    import shutil
    import sqlite3

    from jam_core.ops.refs import encode, root_id

    t, second, v1, v2 = _versions(tmp_path)
    w1, w2 = "b3:" + b3_bytes(v1), "b3:" + b3_bytes(v2)
    os.unlink(t.root / "big.bin")
    run_jam(t.root, "restore", "big.bin", machine="aaa")  # v2 as a stub: held only as chunks on vault
    shutil.rmtree(t.root / ".jam/history")
    with sqlite3.connect(t.root / ".jam/catalog.db") as db:
        assert db.execute("DELETE FROM stubs WHERE path = ?", (b"big.bin",)).rowcount == 1
    refs = t.remote / "meta/refs"
    rid = root_id(Root(t.root))
    for p in refs.iterdir():
        os.unlink(p)
    (refs / rid).write_bytes(encode(1, {w1}))
    run_jam(t.root, "move", "--from", "vault", "--to", "second", "old.bin", machine="aaa")
    assert _held(t.root, "second", w1, len(v1))
    assert _held(t.root, "vault", w2, len(v2)), "the move removed chunks the other stub comes back from"
    run_jam(t.root, "checkout", "big.bin", machine="aaa")
    assert b3(t.root / "big.bin") == b3_bytes(v2), "differs"


def test_move_keeps_everything_another_root_still_needs_there(tmp_path):
    """A clone's move: root A (which never uses 'second') still needs the object on the
    source, so no piece leaves it (said, exit 1); the copy stands."""
    t, data = _committed(tmp_path)
    whole = "b3:" + b3_bytes(bytes(data))
    b = _clone(tmp_path, t)
    second = tmp_path / "second"
    second.mkdir()
    _add(b, "second", str(second))
    pieces = _pieces(t.remote, whole)
    res = run_jam(b, "move", "--from", "origin", "--to", "second", "big.bin", machine="bbb", check=1)
    assert "needs 1 verified copy elsewhere" in res.err, res.err
    assert pieces <= set(_objects(t.remote)) and _pointer(t.remote, whole).read_bytes() != b""
    assert _held(b, "second", whole, len(data))


def test_remote_remove_move_to_carries_chunk_only_objects(tmp_path):
    """`jam remote remove vault --move-to second`: the stub's chunk-only object and what the
    kept snapshots need (pieces included) land on second, verified, before anything leaves
    vault; then the root works from second alone."""
    t, second, v1, v2 = _versions(tmp_path)
    res = run_jam(t.root, "remote", "remove", "vault", "--move-to", "second", machine="aaa")
    assert "Removed remote 'vault'" in res.out, res.out + res.err
    for v in (v1, v2):
        assert _held(t.root, "second", "b3:" + b3_bytes(v), len(v))
    os.rename(t.remote, tmp_path / "vault-gone")
    run_jam(t.root, "checkout", "old.bin", machine="aaa")
    assert b3(t.root / "old.bin") == b3_bytes(v1), "differs"
    os.unlink(t.root / "big.bin")
    run_jam(t.root, "restore", "big.bin", "--fetch", machine="aaa")
    assert b3(t.root / "big.bin") == b3_bytes(v2), "differs"


# -- a move killed at each step loses nothing; the rerun completes --------------------------------------------
KILLER = '''
"""A test plugin: SIGKILLs its own jam at the Nth call of a hook (JAM_TEST_KILL="hook:prefix:N",
the prefix matched against a metadata name or an object id), just before the backend acts."""
import json
import os
import signal

from jam_core import hookimpl

_calls = {}


def _maybe(hook, key):
    spec = os.environ.get("JAM_TEST_KILL", "")
    if not spec:
        return
    name, prefix, n = spec.split(":")
    if name != hook or not key.startswith(prefix):
        return
    _calls[hook] = _calls.get(hook, 0) + 1
    if _calls[hook] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)


@hookimpl(wrapper=True)
def stash(remote, oid, source, size, session):
    _maybe("stash", oid)
    return (yield)


@hookimpl(wrapper=True)
def remove(remote, oid, session):
    _maybe("remove", oid)
    return (yield)


@hookimpl(wrapper=True)
def write_meta(remote, name, data, session):
    _maybe("write_meta", name)
    return (yield)
'''


@pytest.fixture
def killer_env(tmp_path):
    site = tmp_path / "killer-site"
    dist = site / "jam_test_chunk_killer-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "jam_test_chunk_killer.py").write_text(KILLER)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: jam-test-chunk-killer\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[jam]\nchunk_killer = jam_test_chunk_killer\n")
    return dict(os.environ, PYTHONPATH=str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                JAM_MACHINE_ID="aaa")


@pytest.mark.parametrize("at", [
    "stash::1",  # the first piece on its way to the destination
    "stash::9",  # half the pieces there
    "write_meta:recipes/:1",  # every piece there, durable; the pointer not yet written
    "remove::1",  # the guard passed: the first removal from the source
    "remove::4",  # some of the source's own chunks gone, the recipe still there
    "write_meta:recipes/:2",  # every own piece gone from the source; its pointer not yet emptied
])
def test_move_killed_at_each_step_loses_nothing_and_the_rerun_completes(tmp_path, killer_env, at):
    t, second, v1, v2 = _versions(tmp_path)
    w1, w2 = "b3:" + b3_bytes(v1), "b3:" + b3_bytes(v2)
    args = [JAM, "move", "--from", "vault", "--to", "second", "old.bin"]
    res = subprocess.run(args, cwd=t.root, capture_output=True, text=True, env={**killer_env, "JAM_TEST_KILL": at})
    assert res.returncode == -signal.SIGKILL, ("the kill did not land", res.returncode, res.stdout, res.stderr)
    # nothing lost: v1 can come back whole from one remote or the other; v2 from the source
    assert _held(t.root, "vault", w1, len(v1)) or _held(t.root, "second", w1, len(v1))
    assert _held(t.root, "vault", w2, len(v2))
    assert is_stub(t.root / "old.bin") and record(t.root / "old.bin").oid == w1
    res = subprocess.run(args, cwd=t.root, capture_output=True, text=True, env=killer_env)
    assert res.returncode == 0 and "Traceback" not in res.stderr, (res.stdout, res.stderr)
    _after_move(t, second, v1, v2)
    run_jam(t.root, "checkout", "old.bin", machine="aaa")
    assert b3(t.root / "old.bin") == b3_bytes(v1), "differs"


def test_sftp_move_there_and_back(tmp_path, sshd, sftp_store):
    """A move to an sftp remote, then back from it: each time the source keeps only what the
    other version needs, its pointer emptied; the file comes back byte-identical."""
    t, second, v1, v2 = _versions(tmp_path)
    w1 = "b3:" + b3_bytes(v1)
    _add(t.root, "far", f"sftp://{sshd.alias}{sftp_store}")
    run_jam(t.root, "move", "--from", "vault", "--to", "far", "old.bin", machine="aaa")
    assert _held(t.root, "far", w1, len(v1)) and not _held(t.root, "vault", w1, len(v1))
    assert _pointer(t.remote, w1).read_bytes() == b""
    own = _pieces(sftp_store, w1) - _pieces(t.remote, "b3:" + b3_bytes(v2))
    assert own and not own & set(_objects(t.remote))
    run_jam(t.root, "move", "--from", "far", "--to", "vault", "old.bin", machine="aaa")
    assert _held(t.root, "vault", w1, len(v1)) and not _held(t.root, "far", w1, len(v1))
    assert _pointer(sftp_store, w1).read_bytes() == b"" and not own & set(_objects(sftp_store))
    run_jam(t.root, "checkout", "old.bin", machine="aaa")
    assert b3(t.root / "old.bin") == b3_bytes(v1), "differs"


# -- the history index forgets what a removal took away ----------------------------------------------------
def test_a_commit_after_a_move_does_not_take_moved_content_for_stored(tmp_path):
    """Committed content moved off 'vault' (`jam move`): the history index must not keep
    counting it as stored there, or the next commit names 'vault' a complete copy of the tree
    (its head lands there) and a clone from 'vault' alone cannot bring the file back."""
    from tests.safety_support import make_tree

    t = make_tree(tmp_path, "a")
    data = os.urandom(200_000)
    (t.root / "f.bin").write_bytes(data)
    run_jam(t.root, "commit", "-m", "one", machine="aaa")  # f.bin uploaded to vault, stays local
    second = tmp_path / "second"
    second.mkdir()
    _add(t.root, "second", str(second))
    run_jam(t.root, "stash", "f.bin", machine="aaa")
    run_jam(t.root, "move", "--from", "vault", "--to", "second", "f.bin", machine="aaa")
    oid = "b3:" + b3_bytes(data)
    assert oid not in _objects(t.remote) and oid in _objects(second)
    run_jam(t.root, "checkout", "f.bin", machine="aaa")  # local again: a commit can upload it
    (t.root / "n.txt").write_bytes(b"x\n")
    run_jam(t.root, "commit", "-m", "two", machine="aaa")
    b = tmp_path / "b"
    run_jam(tmp_path, "clone", str(t.remote), str(b), machine="bbb")
    run_jam(b, "checkout", "f.bin", machine="bbb")
    assert b3(b / "f.bin") == b3_bytes(data), "differs"
