"""Content-defined chunks (issue 15, last bullet): a file over ``[history] chunk_above`` is
committed as chunks, a recipe object and a ``meta/recipes/`` pointer; an edit in its middle
uploads one or two chunks; any root (a clone) brings the file back from its chunks, verified;
a corrupt or missing chunk and a hostile recipe or pointer fail in one line and leave the stub
a stub; gc keeps the chunks a kept snapshot needs. Real files, real xattrs, a dir remote, the
real sshd for sftp, the real `jam` command."""

from __future__ import annotations

import os
import subprocess
import zlib
from pathlib import Path

import pytest

from jam_core.history import chunks
from jam_core.history.chunks import RecipeError, encode, id_of, parse
from tests.safety_support import JAM, b3, is_stub, make_tree, record, run_jam

MiB = 1 << 20


def b3_bytes(data: bytes) -> str:
    import blake3

    return blake3.blake3(data).hexdigest()
ABOVE = 'chunk_above = 1048576\n'


def _objects(remote: Path) -> dict[str, Path]:
    return {"b3:" + p.name: p for p in (remote / "objects").rglob("*") if p.is_file()}


def _chunky(root: Path) -> None:
    with open(root / ".jam/config.toml", "a") as f:
        f.write("\n[history]\n" + ABOVE)


_run = run_jam


def _committed(tmp_path, size=4 * MiB):
    """Root A with a chunked file committed (machine "aaa"): (tree, data)."""
    t = make_tree(tmp_path, "a")
    _chunky(t.root)
    data = bytearray(os.urandom(size))
    (t.root / "big.bin").write_bytes(data)
    _run(t.root, "commit", "-m", "one", machine="aaa")
    return t, data


def _clone(tmp_path, t, name="b"):
    b = tmp_path / name
    _run(tmp_path, "clone", str(t.remote), str(b), machine="bbb")
    assert is_stub(b / "big.bin")
    return b


# -- the recipe's parser: validation ---------------------------------------------------------------
def _recipe(text: bytes) -> tuple[bytes, str]:
    data = zlib.compress(text)
    return data, id_of(data)


def test_parse_refuses_hostile_recipes():
    oid, size = "b3:" + "a" * 64, 300
    c1, c2 = "b3:" + "1" * 64, "b3:" + "2" * 64
    good, rid = _recipe(f"jam-recipe 1\n{oid} {size}\n{c1} 100\n{c2} 200\n".encode())
    assert parse(good, rid, oid, size) == [(c1, 100), (c2, 200)]
    hostile = {
        "do not match": good[:-1] + bytes([good[-1] ^ 1]),  # its bytes are not its id's (checked below)
        "add up to 250": f"jam-recipe 1\n{oid} {size}\n{c1} 100\n{c2} 150\n".encode(),
        "more than the file": f"jam-recipe 1\n{oid} {size}\n{c1} 100\n{c2} 250\n".encode(),
        "malformed line": f"jam-recipe 1\n{oid} {size}\n../../etc/passwd 300\n".encode(),
        "malformed line ": f"jam-recipe 1\n{oid} {size}\nb3:../{'1' * 61} 300\n".encode(),
        "malformed line  ": f"jam-recipe 1\n{oid} {size}\n{c1} -300\n".encode(),
        "another file": f"jam-recipe 1\n{'b3:' + 'b' * 64} {size}\n{c1} 300\n".encode(),
        "another file ": f"jam-recipe 1\n{oid} 301\n{c1} 300\n".encode(),
        "not a recipe": f"jam-recipe 2\n{oid} {size}\n{c1} 300\n".encode(),
        "more than 64 MiB": f"jam-recipe 1\n{oid} {size}\n{c1} {100 << 20}\n".encode(),
    }
    for why, text in hostile.items():
        if why == "do not match":
            data, r = text, rid
        else:
            data, r = _recipe(text)
        with pytest.raises(RecipeError) as exc:
            parse(data, r, oid, size)
        msg = str(exc.value)
        assert why.strip() in msg and "\n" not in msg, (why, msg)
    # a count beyond the limit, and a zip bomb: refused before they cost anything
    many = b"jam-recipe 1\n" + f"{oid} {chunks.MAX_COUNT + 1}\n".encode() + f"{c1} 1\n".encode() * (chunks.MAX_COUNT + 1)
    data, r = _recipe(many)
    with pytest.raises(RecipeError, match="chunks, more than"):
        parse(data, r, oid, chunks.MAX_COUNT + 1)
    bomb = zlib.compress(b"jam-recipe 1\n" + b"\0" * (chunks.MAX_TEXT + 1))
    with pytest.raises(RecipeError, match="once inflated"):
        parse(bomb, id_of(bomb), oid, size)
    assert chunks.decode_pointer(chunks.encode_pointer(rid, 10)) == (rid, 10)
    assert chunks.decode_pointer(b"jam-recipe-pointer 1\n../x\n12\n") is None
    assert chunks.decode_pointer(b"jam-recipe-pointer 9\n" + f"{rid}\n10\n".encode()) is None  # not a pointer
    assert chunks.decode_pointer(chunks.encode_pointer(rid, 10) + b" " * 300) is None
    assert chunks.decode_pointer(chunks.encode_pointer(rid, 10 ** 13)) is None


# -- commit: only what changed goes up --------------------------------------------------------------
def test_edit_in_the_middle_uploads_one_or_two_chunks(tmp_path):
    t, data = _committed(tmp_path)
    first = _objects(t.remote)
    whole = "b3:" + b3_bytes(bytes(data))
    assert whole not in first, "a file over chunk_above is stored as chunks, not whole"
    assert (t.remote / "meta/recipes" / ("b3-" + whole[3:])).is_file()
    n_chunks = len(first) - 2  # less the recipe and the snapshot
    assert n_chunks >= 16, n_chunks  # 4 MiB in chunks of ~128 KiB
    data[2_000_000:2_000_100] = os.urandom(100)
    (t.root / "big.bin").write_bytes(data)
    out = _run(t.root, "commit", "-m", "two", machine="aaa").out
    new = set(_objects(t.remote)) - set(first)
    # one or two chunks (three when the edit moved a boundary near the next one), the new recipe,
    # the new snapshot
    assert 3 <= len(new) <= 5, (len(new), out)
    assert sum(_objects(t.remote)[o].stat().st_size for o in new) < 1 * MiB
    # the same content committed again (another name) uploads nothing
    (t.root / "copy.bin").write_bytes(data)
    before = set(_objects(t.remote))
    _run(t.root, "commit", "-m", "three", machine="aaa")
    assert len(set(_objects(t.remote)) - before) == 1  # only the snapshot


# -- any root brings it back --------------------------------------------------------------------
def test_clone_then_checkout_hook_restore_and_daemon_give_the_exact_bytes(tmp_path):
    t, data = _committed(tmp_path)
    want = b3_bytes(bytes(data))
    b = _clone(tmp_path, t)
    _run(b, "checkout", "big.bin", machine="bbb")
    assert not is_stub(b / "big.bin") and b3(b / "big.bin") == want, "differs"

    # the cd hook's fetch (hook-fetch: checkout in groups)
    c = _clone(tmp_path, t, "c")
    res = subprocess.run([JAM, "hook-fetch", str(c)], capture_output=True, text=True,
                         env=dict(os.environ, JAM_MACHINE_ID="ccc", JAM_BACKGROUND="0"))
    assert "Traceback" not in res.stderr, res.stderr
    assert not is_stub(c / "big.bin") and b3(c / "big.bin") == want, res.stderr

    # jam restore --fetch, in the root that committed it (no whole object anywhere)
    os.unlink(t.root / "big.bin")
    _run(t.root, "restore", "big.bin", "--fetch", machine="aaa")
    assert b3(t.root / "big.bin") == want, "differs"

    # the daemon's worker: a dir remote read straight, then (no whole object) the fetch hooks
    from jam_core.daemon.worker import Worker
    from jam_core.root import Root

    d = _clone(tmp_path, t, "d")
    rec = record(d / "big.bin")
    got = Worker([str(d)]).fetch(Root(d), rec)
    if isinstance(got, int):
        os.lseek(got, 0, os.SEEK_SET)
        with os.fdopen(got, "rb") as f:
            body = f.read()
    else:
        body = bytes(got)
    assert b3_bytes(body) == want, "differs"


def test_sftp_commit_edit_clone_checkout(tmp_path, sshd, sftp_store):
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import add_remote
    from jam_core.root import Root

    a = tmp_path / "a"
    a.mkdir()
    root, _ = Root.init(a, default_remote=False)
    url = f"sftp://{sshd.alias}{sftp_store}"
    add_remote(root, make_plugin_manager(), "far", url)
    _chunky(a)
    data = bytearray(os.urandom(3 * MiB))
    (a / "big.bin").write_bytes(data)
    _run(a, "commit", machine="aaa")
    first = set(_objects(sftp_store))
    data[1_500_000:1_500_100] = os.urandom(100)
    (a / "big.bin").write_bytes(data)
    _run(a, "commit", machine="aaa")
    assert 3 <= len(set(_objects(sftp_store)) - first) <= 4
    b = tmp_path / "b"
    _run(tmp_path, "clone", url, str(b), machine="bbb")
    assert is_stub(b / "big.bin")
    _run(b, "checkout", "big.bin", machine="bbb")
    assert b3(b / "big.bin") == b3_bytes(bytes(data)), "differs"


# -- faults: one line, the stub stays a stub, nothing lost --------------------------------------------
def _fails_cleanly(b: Path, *words: str) -> str:
    rec = record(b / "big.bin")
    res = _run(b, "checkout", "big.bin", machine="bbb", check=1)
    assert is_stub(b / "big.bin") and record(b / "big.bin") == rec
    lines = [line for line in res.err.splitlines() if "big.bin" in line or "jam:" in line]
    assert lines and all(w in res.err for w in words), res.err
    return res.err


def _writable(p: Path) -> None:
    os.chmod(p, 0o644)


def test_corrupt_or_missing_chunk_fails_in_one_line(tmp_path):
    t, data = _committed(tmp_path)
    b = _clone(tmp_path, t)
    whole = "b3:" + b3_bytes(bytes(data))
    rid, _n = chunks.decode_pointer((t.remote / "meta/recipes" / ("b3-" + whole[3:])).read_bytes())
    objs = _objects(t.remote)
    cids = [c for c in objs if c != rid and objs[c].stat().st_size < 2 * MiB and c in _recipe_chunks(objs[rid])]
    victim = objs[cids[3]]
    good = victim.read_bytes()
    _writable(victim)
    victim.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])  # same size, wrong bytes
    _fails_cleanly(b, "corrupt chunk")
    victim.write_bytes(good)
    os.unlink(victim)
    _fails_cleanly(b, "missing")
    victim.write_bytes(good)
    _run(b, "checkout", "big.bin", machine="bbb")
    assert b3(b / "big.bin") == b3_bytes(bytes(data)), "differs"


def _recipe_chunks(path: Path) -> set[str]:
    text = zlib.decompress(path.read_bytes()).decode()
    return {line.split(" ")[0] for line in text.splitlines()[2:]}


def _plant(remote: Path, text: bytes) -> tuple[str, int]:
    """Put a recipe object with these (inflated) bytes on the dir remote: (its id, stored size)."""
    from jam_core.objects import object_relpath

    data = zlib.compress(text)
    rid = id_of(data)
    p = remote / "objects" / object_relpath(rid)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return rid, len(data)


def test_hostile_recipe_or_pointer_fails_in_one_line(tmp_path):
    t, data = _committed(tmp_path)
    (t.root / "other.bin").write_bytes(os.urandom(2 * MiB))
    _run(t.root, "commit", machine="aaa")
    b = _clone(tmp_path, t)
    whole = "b3:" + b3_bytes(bytes(data))
    ptr = t.remote / "meta/recipes" / ("b3-" + whole[3:])
    honest = ptr.read_bytes()
    rid, _n = chunks.decode_pointer(honest)
    lines = zlib.decompress(_objects(t.remote)[rid].read_bytes()).split(b"\n")
    body = lines[2:-1]
    head = b"jam-recipe 1\n" + lines[1] + b"\n"
    before = set(_objects(t.remote))

    def point(text: bytes) -> None:
        r, n = _plant(t.remote, text)
        ptr.write_bytes(chunks.encode_pointer(r, n))

    # wrong lengths: two chunks' lengths swapped (the total still right): the whole id fails
    c0, n0 = body[0].split(b" ")
    c1, n1 = body[1].split(b" ")
    if n0 != n1:
        point(head + b"\n".join([c0 + b" " + n1, c1 + b" " + n0, *body[2:]]) + b"\n")
        _fails_cleanly(b, "corrupt")
    point(head + b"\n".join([c0 + b" " + str(int(n0) + 1).encode(), *body[1:]]) + b"\n")
    _fails_cleanly(b, "add up to more than")  # a total that is not the size
    point(head + b"b3:../../../../etc/passwd 7\n")
    _fails_cleanly(b, "malformed line")
    point(head + (body[0] + b"\n") * (chunks.MAX_COUNT + 1))
    _fails_cleanly(b, "more than")
    # the pointer names the recipe of another file
    other = "b3:" + b3(t.root / "other.bin")
    ptr.write_bytes((t.remote / "meta/recipes" / ("b3-" + other[3:])).read_bytes())
    _fails_cleanly(b, "another file")
    ptr.write_bytes(b"jam-recipe-pointer 1\n../../x\n5\n")
    _fails_cleanly(b, "malformed")
    ptr.write_bytes(honest)
    assert before <= set(_objects(t.remote)), "nothing lost"
    _run(b, "checkout", "big.bin", machine="bbb")
    assert b3(b / "big.bin") == b3_bytes(bytes(data)), "differs"


# -- gc keeps what a kept snapshot needs ----------------------------------------------------------------
def test_gc_keeps_the_chunks_a_kept_snapshot_needs(tmp_path):
    t, data = _committed(tmp_path)
    v1 = "b3:" + b3_bytes(bytes(data))
    rid1, _ = chunks.decode_pointer((t.remote / "meta/recipes" / ("b3-" + v1[3:])).read_bytes())
    first = _recipe_chunks(_objects(t.remote)[rid1]) | {rid1}
    data[2_000_000:2_000_100] = os.urandom(100)
    (t.root / "big.bin").write_bytes(data)
    _run(t.root, "commit", "-m", "two", machine="aaa")
    v2 = "b3:" + b3_bytes(bytes(data))
    rid2, _ = chunks.decode_pointer((t.remote / "meta/recipes" / ("b3-" + v2[3:])).read_bytes())
    second = _recipe_chunks(_objects(t.remote)[rid2]) | {rid2}
    os.unlink(t.root / "big.bin")  # no stub, no local file: only the snapshots need it
    _run(t.root, "gc", machine="aaa")
    assert first | second <= set(_objects(t.remote)), "gc removed chunks a kept snapshot needs"
    # another root on the same remote removes none either
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import add_remote
    from jam_core.root import Root

    other = tmp_path / "other"
    other.mkdir()
    r2, _ = Root.init(other)
    add_remote(r2, make_plugin_manager(), "vault", str(t.remote))
    _run(other, "gc", machine="ccc")
    assert first | second <= set(_objects(t.remote)), "another root's gc removed chunks a snapshot needs"
    # thinning to the newest snapshot frees only what no kept recipe needs
    _run(t.root, "gc", "--keep", "last 1", machine="aaa", check=None)
    have = set(_objects(t.remote))
    assert second <= have, "gc --keep removed chunks the kept snapshot needs"
    assert not ((first - second) & have), "the forgotten snapshot's own chunks stay"
    _run(t.root, "restore", "big.bin", "--fetch", machine="aaa")
    assert b3(t.root / "big.bin") == b3_bytes(bytes(data)), "differs"


def test_another_machine_syncs_a_chunked_file_and_its_push_completes(tmp_path):
    """B (a clone) syncs after A committed a chunked file: B's push finds the object as chunks on
    the remote (no whole object, no copy attempted), writes its head, and B's history then
    counts the recipe and chunks as its own (its gc keeps them even once A is gone)."""
    t, data = _committed(tmp_path)
    b = _clone(tmp_path, t)
    (b / "note.txt").write_bytes(b"from b\n")
    res = _run(b, "sync", machine="bbb")
    assert "head not written" not in res.out + res.err, res.out + res.err
    heads = os.listdir(t.remote / "meta/history/" / os.listdir(t.remote / "meta/history")[0])
    assert len(heads) == 2, heads
    whole = "b3:" + b3_bytes(bytes(data))
    rid, _ = chunks.decode_pointer((t.remote / "meta/recipes" / ("b3-" + whole[3:])).read_bytes())
    pieces = _recipe_chunks(_objects(t.remote)[rid]) | {rid}
    from jam_core.history.index import kept_objects
    from jam_core.root import Root

    assert pieces <= kept_objects(Root(b)), "B's history does not count the chunks it needs"


def test_a_file_stored_whole_already_is_not_cut_up_again(tmp_path):
    """A large file stashed (stored whole) and checked out again: its commit finds the whole
    object on the remote and uploads no chunk, no recipe."""
    t = make_tree(tmp_path, "a")
    _chunky(t.root)
    (t.root / "big.bin").write_bytes(os.urandom(3 * MiB))
    _run(t.root, "stash", "big.bin", machine="aaa")
    _run(t.root, "checkout", "big.bin", machine="aaa")
    before = set(_objects(t.remote))
    _run(t.root, "commit", machine="aaa")
    assert len(set(_objects(t.remote)) - before) == 1  # the snapshot alone
    assert not (t.remote / "meta/recipes").exists()


def test_held_says_whether_a_remote_holds_an_object_as_chunks(tmp_path):
    """What `jam doctor` asks (chunks.held): the pointer, the recipe and every chunk listed."""
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.root import Root

    t, data = _committed(tmp_path)
    pm, session = make_plugin_manager(), Session()
    remote = Root(t.root).remotes()[0]
    whole = "b3:" + b3_bytes(bytes(data))
    listing = {o: p.stat().st_size for o, p in _objects(t.remote).items()}
    assert chunks.held(remote, whole, len(data), pm, session, listing)
    assert chunks.held(remote, whole, len(data), pm, session)  # has() per chunk
    assert not chunks.held(remote, whole, len(data) + 1, pm, session, listing)  # another size: not its recipe
    rid, _ = chunks.decode_pointer((t.remote / "meta/recipes" / ("b3-" + whole[3:])).read_bytes())
    victim = sorted(_recipe_chunks(_objects(t.remote)[rid]))[0]
    del listing[victim]
    assert not chunks.held(remote, whole, len(data), pm, session, listing)
    os.unlink(_objects(t.remote)[victim])
    assert not chunks.held(remote, whole, len(data), pm, session)


def test_doctor_counts_an_object_held_as_chunks_and_reads_it_back_with_deep(tmp_path):
    """A clone's stub of a chunked file: `jam doctor` proves it can come back (recipe and every
    chunk listed), `--deep` reads it back through its chunks and hashes the whole; a missing chunk
    makes it "missing", a corrupt one (same size) is caught by --deep."""
    t, data = _committed(tmp_path)
    b = _clone(tmp_path, t)
    ok = _run(b, "doctor", machine="bbb")
    assert "all can come back" in ok.out, ok.out
    deep = _run(b, "doctor", "--deep", machine="bbb")
    assert "read back and hashed 1 copies" in deep.out, deep.out
    whole = "b3:" + b3_bytes(bytes(data))
    rid, _n = chunks.decode_pointer((t.remote / "meta/recipes" / ("b3-" + whole[3:])).read_bytes())
    objs = _objects(t.remote)
    victim = objs[sorted(_recipe_chunks(objs[rid]))[2]]
    good = victim.read_bytes()
    _writable(victim)
    victim.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])  # same size: only reading it back can tell
    assert "all can come back" in _run(b, "doctor", machine="bbb").out
    bad = _run(b, "doctor", "--deep", machine="bbb", check=1)
    assert "big.bin" in bad.out and "all can come back" not in bad.out, bad.out
    os.unlink(victim)
    gone = _run(b, "doctor", machine="bbb", check=1)
    assert "big.bin" in gone.out and "no reachable remote holds its object" in gone.out, gone.out
    victim.write_bytes(good)
    assert "all can come back" in _run(b, "doctor", machine="bbb").out
    assert is_stub(b / "big.bin")


def test_gc_keeps_the_chunks_a_clones_stub_needs_though_it_never_committed(tmp_path):
    """B clones (never commits or syncs: it knows no recipe, its refs name only the whole id);
    A then deletes the file and thins its history to nothing that needs it. A's gc must still
    keep the recipe and chunks: B's stub comes back from them. (A remote's own recipe pointers
    say which pieces a needed whole id is made of.)"""
    t, data = _committed(tmp_path)
    whole = "b3:" + b3_bytes(bytes(data))
    rid, _ = chunks.decode_pointer((t.remote / "meta/recipes" / ("b3-" + whole[3:])).read_bytes())
    pieces = _recipe_chunks(_objects(t.remote)[rid]) | {rid}
    b = _clone(tmp_path, t)
    _run(b, "gc", "--dry-run", machine="bbb")  # B's refs are on the remote (as a user would have them)
    os.unlink(t.root / "big.bin")
    _run(t.root, "commit", "-m", "gone", machine="aaa")
    _run(t.root, "gc", "--keep", "last 1", machine="aaa", check=None)
    assert pieces <= set(_objects(t.remote)), "gc removed the chunks a clone's stub needs"
    _run(b, "checkout", "big.bin", machine="bbb")
    assert b3(b / "big.bin") == b3_bytes(bytes(data)), "differs"


def test_gc_removes_nothing_where_a_needed_recipe_cannot_be_read(tmp_path):
    t, data = _committed(tmp_path)
    whole = "b3:" + b3_bytes(bytes(data))
    b = _clone(tmp_path, t)
    _run(b, "gc", "--dry-run", machine="bbb")
    os.unlink(t.root / "big.bin")
    _run(t.root, "commit", "-m", "gone", machine="aaa")
    pointer = t.remote / "meta/recipes" / ("b3-" + whole[3:])
    _writable(pointer)
    pointer.write_bytes(b"garbage")
    before = set(_objects(t.remote))
    res = _run(t.root, "gc", "--keep", "last 1", machine="aaa", check=None)
    assert res.returncode != 0 and "malformed" in res.err + res.out, res.err + res.out
    assert before <= set(_objects(t.remote)), "gc removed objects though it could not tell a recipe's pieces"


def test_chunks_are_held_in_memory_in_bounded_batches():
    """A hostile recipe listing many chunks of the largest allowed length (64 MiB each) is fetched
    at most BATCH_BYTES at a time (a chunk over it alone), never 64 x 64 MiB at once."""
    big = {f"b3:{i:064x}": chunks.MAX_LENGTH for i in range(10)}
    small = {f"b3:{i + 100:064x}": 100 for i in range(200)}
    lengths = {**big, **small}
    batches = list(chunks._batches(list(lengths), lengths))
    assert sorted(c for b in batches for c in b) == sorted(lengths)
    for b in batches:
        assert len(b) <= chunks.FETCH_BATCH
        assert len(b) == 1 or sum(lengths[c] for c in b) <= chunks.BATCH_BYTES
