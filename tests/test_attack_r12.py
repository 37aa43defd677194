"""R12: an attacker's review of versions and a second computer (commit, log, diff, restore,
gc --keep, clone, sync). Two roots on one machine stand in for two computers (each jam process
its own JAM_MACHINE_ID) sharing a dir remote; real files, real xattrs, the real `jam`; races
injected at their exact instant (a monkeypatched function, in-process or in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.safety_support import JAM, b3, is_stub, make_tree, run_jam


def run(root, *args, machine: str, check: int | None = 0):
    return run_jam(root, *args, machine=machine, check=check)


def two(tmp_path):
    """Root A (machine "aaa") with a committed tree; root B cloned from A's remote ("bbb")."""
    t = make_tree(tmp_path, "a")
    a = t.root
    (a / "docs").mkdir()
    (a / "docs/one.txt").write_bytes(b"one\n")
    (a / "big.bin").write_bytes(os.urandom(100_000))
    run(a, "commit", "-m", "first", machine="aaa")
    b = tmp_path / "b"
    run(tmp_path, "clone", str(t.remote), str(b), machine="bbb")
    return t, a, b


def _holds(remote: Path, oid: str) -> bool:
    algo, _, hexd = oid.partition(":")
    return any(p.name == hexd or p.name.endswith(hexd) for p in (remote / "objects").rglob("*"))


# -- 1. gc --keep on one computer, sync on the other -------------------------------------------------
def test_a_head_whose_chain_passes_through_a_thinned_snapshot_still_merges(tmp_path):
    """aaa commits twice after bbb cloned, then `gc --keep "last 1"` (its middle snapshot is
    forgotten and collected: no root's refs name it). bbb's sync must still merge aaa's head:
    the parent walk meets a snapshot no remote holds. Today the first sync fails on it ("no
    remote has it") and the next merges against no base: a false conflict for a file bbb never
    touched.
    Guard (mutation-checked): sync._fetch_chain stops at a parent no remote holds (SnapshotAbsent) and
    Graph.base bridges the cut with that machine's earlier snapshots."""
    t, a, b = two(tmp_path)
    (a / "docs/one.txt").write_bytes(b"one v2\n")
    run(a, "commit", "-m", "middle", machine="aaa")
    (a / "docs/one.txt").write_bytes(b"one v3\n")
    run(a, "commit", "-m", "newest", machine="aaa")
    run(a, "gc", "--keep", "last 1", machine="aaa", check=None)
    first = run(b, "sync", machine="bbb", check=None)
    again = run(b, "sync", machine="bbb", check=None)  # it never heals: a false conflict next
    assert first.returncode == 0 and again.returncode == 0, first.err + again.err
    assert not [p for p in (b / "docs").iterdir() if "conflicted copy" in p.name], "bbb changed nothing"
    run(b, "checkout", "docs/one.txt", machine="bbb")
    assert (b / "docs/one.txt").read_bytes() == b"one v3\n"


def _sync_in_process(b: Path, monkeypatch, at: str, action) -> object:
    """bbb's `jam sync` in this process, ``action()`` run as ``sync.<at>`` is entered."""
    from jam_core.history import sync as sync_mod
    from jam_core.manager import make_plugin_manager
    from jam_core.root import Root

    monkeypatch.setenv("JAM_MACHINE_ID", "bbb")
    real = getattr(sync_mod, at)

    def hooked(*args, **kw):
        action()
        return real(*args, **kw)

    monkeypatch.setattr(sync_mod, at, hooked)
    return sync_mod.sync(Root.find(b), make_plugin_manager())


def test_a_gc_elsewhere_between_the_head_read_and_the_refs_never_leaves_a_stub_of_nothing(tmp_path, monkeypatch):
    """aaa commits new.bin. bbb's sync reads aaa's head; in that instant aaa deletes new.bin,
    commits and runs `gc --keep "last 1"`, which removes new.bin's object (no root's refs name
    it yet) and ends (its removal intent emptied). bbb's _refer then records its pending refs
    and finds no intent: it makes a stub of an object no remote holds.
    Guard (mutation-checked): sync._refer, the store.absent check after the refs are recorded."""
    t, a, b = two(tmp_path)
    data = os.urandom(70_000)
    (a / "new.bin").write_bytes(data)
    run(a, "commit", "-m", "new", machine="aaa")
    oid = "b3:" + b3(a / "new.bin")
    assert _holds(t.remote, oid)

    def meanwhile():
        (a / "new.bin").unlink()
        run(a, "commit", "-m", "gone", machine="aaa")
        run(a, "gc", "--keep", "last 1", machine="aaa", check=None)

    _sync_in_process(b, monkeypatch, "_refer", meanwhile)
    if os.path.lexists(b / "new.bin"):
        assert _holds(t.remote, oid), "bbb's new.bin is a stub of an object no remote holds"


def test_a_gc_elsewhere_between_the_clones_head_read_and_its_refs_never_clones_stubs_of_nothing(tmp_path,
                                                                                                monkeypatch):
    """The clone reads aaa's head (new.bin in it); in that instant aaa deletes new.bin, commits and
    runs `gc --keep "last 1"` (no root's refs name new.bin's object: it goes). clone._refer then
    records its refs and finds no removal intent: the clone holds a stub of nothing.
    Guard (mutation-checked): clone._refer, the store.absent check after the refs (nothing cloned)."""
    from jam_core.history import clone as clone_mod
    from jam_core.manager import make_plugin_manager

    t = make_tree(tmp_path, "a")
    a = t.root
    (a / "new.bin").write_bytes(os.urandom(70_000))
    (a / "keep.txt").write_bytes(b"keep\n")
    run(a, "commit", "-m", "new", machine="aaa")
    oid = "b3:" + b3(a / "new.bin")
    assert _holds(t.remote, oid)
    real = clone_mod._refer

    def hooked(*args, **kw):
        (a / "new.bin").unlink()
        run(a, "commit", "-m", "gone", machine="aaa")
        run(a, "gc", "--keep", "last 1", machine="aaa", check=None)
        return real(*args, **kw)

    monkeypatch.setattr(clone_mod, "_refer", hooked)
    monkeypatch.setenv("JAM_MACHINE_ID", "bbb")
    b = tmp_path / "b"
    try:
        clone_mod.clone(str(t.remote), b, make_plugin_manager())
    except Exception as exc:  # refusing (one line) is a right answer
        assert "Traceback" not in str(exc)
    if os.path.lexists(b / "new.bin"):
        assert _holds(t.remote, oid), "the clone's new.bin is a stub of an object no remote holds"


def test_gc_keep_never_collects_the_snapshot_a_remote_still_names_as_this_machines_head(tmp_path, monkeypatch):
    """aaa's commit of S2 fails to write its head on vault (the remote failed at that instant),
    so vault's head of aaa still names S1. `gc --keep "last 1"` then forgets S1 (not HEAD here)
    and collects S1's snapshot and new.bin's object: the head on vault promises a clone every
    byte and no clone from it works any more.
    Guard (mutation-checked): gc._thin keeps every snapshot a ``head:<remote>`` index entry names."""
    from jam_core.errors import RemoteError
    from jam_core.history import store
    from jam_core.manager import make_plugin_manager
    from jam_core.root import Root

    t = make_tree(tmp_path, "a")
    a = t.root
    (a / "new.bin").write_bytes(os.urandom(70_000))
    run(a, "commit", "-m", "one", machine="aaa")
    oid = "b3:" + b3(a / "new.bin")
    (a / "new.bin").unlink()
    monkeypatch.setenv("JAM_MACHINE_ID", "aaa")

    def fail(*args, **kw):
        raise RemoteError("remote 'vault': connection lost")

    monkeypatch.setattr(store, "write_head", fail)
    res = store.commit(Root.find(a), make_plugin_manager(), "two")
    assert res.problems, "the head write failed"
    monkeypatch.undo()
    run(a, "gc", "--keep", "last 1", machine="aaa", check=None)
    hexd = oid.partition(":")[2]
    assert (t.remote / "objects" / "b3" / hexd[:2] / hexd).exists(), "the object the head on vault needs was collected"
    b = tmp_path / "b"
    res = run(tmp_path, "clone", str(t.remote), str(b), machine="bbb", check=None)
    assert res.returncode == 0, res.err
    run(b, "checkout", "new.bin", machine="bbb")


def test_two_roots_with_one_directory_name_on_one_remote_never_replace_each_others_head(tmp_path):
    """~/work/notes and ~/home/notes on one machine both use the vault: both default to tree
    'notes' and write meta/history/notes/<machine id>. X commits, Y commits (replacing X's
    head), X commits again (unchanged: nothing sent). A second computer cloning the vault gets
    Y's files as X's tree and never sees X's; its sync would then merge Y's tree into X's.
    Expected: Y's commit refuses (one line, exit 1/2) or the two roots' heads differ.
    Guard (mutation-checked): store.push, _strange_head (a head of this machine naming a snapshot this
    root never made nor saw is not replaced)."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import add_remote
    from jam_core.root import Root

    vault = tmp_path / "vault"
    vault.mkdir()
    roots = []
    for parent in ("work", "home"):
        p = tmp_path / parent / "notes"
        p.mkdir(parents=True)
        root, _ = Root.init(p)
        add_remote(root, make_plugin_manager(), "vault", str(vault))
        roots.append(p)
    x, y = roots
    (x / "x-only.txt").write_bytes(b"x\n")
    (y / "y-only.txt").write_bytes(b"y\n")
    run(x, "commit", "-m", "x", machine="aaa")
    ry = run(y, "commit", "-m", "y", machine="aaa", check=None)
    run(x, "commit", "-m", "x again", machine="aaa", check=None)
    c = tmp_path / "c"
    rc = run(tmp_path, "clone", str(vault), str(c), "--tree", "notes", machine="ccc", check=None)
    assert ry.returncode != 0 or (rc.returncode == 0 and os.path.lexists(c / "x-only.txt")), \
        "the vault's 'notes' head is Y's: X's tree is not there for a second computer"


# -- 2. sync writing into the tree ----------------------------------------------------------------
def test_sync_never_replaces_a_file_in_a_directory_moved_out_of_the_root(tmp_path, monkeypatch):
    """aaa modifies docs/one.txt; bbb syncs. As the replace takes its lease (after its checks),
    the user moves bbb's docs/ out of the root (same filesystem). The exchange must not happen
    in the moved directory: nothing written outside the root (invariant 7), the file there
    left as it was.
    Guard (mutation-checked): sync._replace's swap, its _still_in check before the exchange."""
    from jam_core.history import sync as sync_mod
    from jam_core.stub import read_record

    t, a, b = two(tmp_path)
    (a / "docs/one.txt").write_bytes(b"one v2\n")
    run(a, "commit", "-m", "v2", machine="aaa")
    before = read_record(str(b / "docs/one.txt")).oid
    outside = tmp_path / "outside"
    outside.mkdir()
    real = sync_mod._Tree.lease
    moved = []

    def lease(self, dfd, name):
        if not moved:
            os.rename(b / "docs", outside / "docs")
            moved.append(1)
        return real(self, dfd, name)

    monkeypatch.setattr(sync_mod._Tree, "lease", lease)
    _sync_in_process(b, monkeypatch, "_refer", lambda: None)
    assert moved
    assert sorted(os.listdir(outside / "docs")) == ["one.txt"], os.listdir(outside / "docs")
    assert read_record(str(outside / "docs/one.txt")).oid == before, "swapped outside the root"


# -- 4. hostile local history -------------------------------------------------------------------
def test_a_cached_snapshot_replaced_by_a_fifo_is_one_line_not_a_hang(tmp_path):
    """ROOT/.jam/history/objects/<head> is a FIFO (a sync tool that copies .jam, a mistake):
    `jam diff` must say so in one line, not wait for a writer that never comes.
    Guard (mutation-checked): Index.read_bytes, O_NONBLOCK|O_NOFOLLOW open and its S_ISREG check."""
    t = make_tree(tmp_path, "a")
    (t.root / "a.txt").write_bytes(b"a\n")
    run(t.root, "commit", "-m", "one", machine="aaa")
    head = (t.root / ".jam/history/HEAD").read_text().strip()
    cached = t.root / ".jam/history/objects" / head.replace(":", "-")
    cached.unlink()
    os.mkfifo(cached)
    try:  # the bound is a hang detector only: the answer takes well under a second
        res = subprocess.run([JAM, "diff"], capture_output=True, text=True, cwd=t.root, stdin=subprocess.DEVNULL,
                             env=dict(os.environ, JAM_MACHINE_ID="aaa"), timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("jam diff hung on a FIFO in the snapshot cache")
    assert res.returncode != 0 and res.stderr.startswith("jam: ") and len(res.stderr.splitlines()) == 1, res.stderr


# -- 3. hostile remote content --------------------------------------------------------------------
def test_a_head_whose_objects_no_remote_holds_never_replaces_a_local_file(tmp_path):
    """A head of machine 'evil' names a valid snapshot, child of bbb's head, in which
    docs/one.txt is an object that no remote holds. bbb's docs/one.txt is local (the base
    version): the sync must not swap it for a stub that can never come back (then every later
    commit of bbb fails to write its head: the remote lacks that object).
    Guard (mutation-checked): sync._refer, the store.absent check (the head is not merged)."""
    from jam_core.history.index import Index
    from jam_core.history.snapshot import Item, Snapshot, encode, id_of
    from jam_core.root import Root

    t, a, b = two(tmp_path)
    run(b, "checkout", "docs/one.txt", machine="bbb")
    assert not is_stub(b / "docs/one.txt")
    head = (b / ".jam/history/HEAD").read_text().strip()
    with Index(Root.find(b), create=False) as ix:
        mine = ix.load(head)
        size = len(ix.read_bytes(head))
    nowhere = "b3:" + "7" * 64
    items = [Item(i.path, i.kind, nowhere, 5, i.mode, i.mtime_ns + 1, i.target) if i.path == "docs/one.txt" else i
             for i in mine.items]
    evil = Snapshot([head], mine.time_ns + 10**9, "evil", "evil", mine.tree, "", list(mine.pins), items,
                    parent_sizes=[size])
    stored = encode(evil)
    sid = id_of(stored)
    hexd = sid.partition(":")[2]
    (t.remote / "objects/b3" / hexd[:2]).mkdir(parents=True, exist_ok=True)
    (t.remote / "objects/b3" / hexd[:2] / hexd).write_bytes(stored)
    d = t.remote / "meta/history" / mine.tree
    (d / "evil").write_bytes(f"jam-head 1\n{sid}\n{len(stored)}\n".encode())
    run(b, "sync", machine="bbb", check=None)
    assert (b / "docs/one.txt").read_bytes() == b"one\n", "a local file became a stub of nothing"


def test_two_computers_sharing_a_machine_id_are_told_not_silently_unsynced(tmp_path):
    """The new laptop got ~/.local/share/jam/machine-id from a backup of the old one: both are
    machine 'aaa'. The old one commits an edit; the new one's `jam sync` reads the heads, skips
    'aaa' as its own, and answers "synced: 0 heads merged" (exit 0): a user trusts that.
    Its push then replaces the old laptop's head with its own older one: a third computer's
    clone no longer sees the edit. Expected: the edit arrives, or the sync says why not (exit
    1), and the remote's head never goes back.
    Guard (mutation-checked): sync.sync's known_here check of "our" heads (exit 1, said) and
    store.push's _strange_head (the head is not replaced)."""
    t, a, b = two(tmp_path)
    (a / "docs/one.txt").write_bytes(b"edited on the old laptop\n")
    run(a, "commit", "-m", "edit", machine="aaa")
    res = run(b, "sync", machine="aaa", check=None)
    if res.returncode == 0:
        run(b, "checkout", "docs/one.txt", machine="aaa")
        assert (b / "docs/one.txt").read_bytes() == b"edited on the old laptop\n", res.out
    c = tmp_path / "c"
    run(tmp_path, "clone", str(t.remote), str(c), machine="ccc")
    run(c, "checkout", "docs/one.txt", machine="ccc")
    assert (c / "docs/one.txt").read_bytes() == b"edited on the old laptop\n", "the remote's head went back"


# -- 2. restore and sync never write over what appeared in the last instant ------------------------
def test_a_file_saved_where_restore_is_making_its_stub_is_never_replaced(tmp_path, monkeypatch):
    """`jam restore notes.txt` (deleted) checks that nothing is there, then makes the stub aside;
    in that instant the user saves a new notes.txt. The user's file stays, byte for byte, and the
    restore says so (exit 1). Guard (mutation-checked): restore._make's rename_noreplace (an
    os.rename there replaces the user's file)."""
    from jam_core.errors import JamError
    from jam_core.history import restore as restore_mod
    from jam_core.root import Root

    t = make_tree(tmp_path, "a")
    (t.root / "notes.txt").write_bytes(b"old notes\n" * 100)
    run(t.root, "commit", "-m", "one", machine="aaa")
    (t.root / "notes.txt").unlink()
    real = restore_mod.make_entry

    def saved_meanwhile(dfd, name, *args, **kw):
        out = real(dfd, name, *args, **kw)
        (t.root / "notes.txt").write_bytes(b"the user's new notes\n")
        return out

    monkeypatch.setattr(restore_mod, "make_entry", saved_meanwhile)
    with pytest.raises(JamError) as exc:
        restore_mod.restore(Root.find(t.root), "notes.txt")
    assert "appeared" in str(exc.value)
    assert (t.root / "notes.txt").read_bytes() == b"the user's new notes\n"
    assert not [n for n in os.listdir(t.root) if n.startswith(".jam-")], "no leftover"


def test_a_file_saved_where_sync_is_making_a_new_stub_is_never_replaced(tmp_path, monkeypatch):
    """aaa adds new.txt; bbb's sync makes its stub aside; in that instant bbb's user saves a
    new.txt of their own. Theirs must not replace it. Guard (mutation-checked): clone.place's
    rename_noreplace (an os.rename there replaces the user's file)."""
    from jam_core.history import clone as clone_mod

    t, a, b = two(tmp_path)
    (a / "new.txt").write_bytes(b"from aaa\n")
    run(a, "commit", "-m", "new", machine="aaa")
    real = clone_mod.make_entry
    saved = []

    def saved_meanwhile(dfd, name, *args, **kw):
        out = real(dfd, name, *args, **kw)
        if name == "new.txt" and not saved:
            (b / "new.txt").write_bytes(b"bbb's own new.txt\n")
            saved.append(1)
        return out

    monkeypatch.setattr(clone_mod, "make_entry", saved_meanwhile)
    res = _sync_in_process(b, monkeypatch, "_refer", lambda: None)
    assert saved and (b / "new.txt").read_bytes() == b"bbb's own new.txt\n"
    assert res.exit_code == 1


def _env(tmp_path: Path, machine: str) -> dict:
    home = tmp_path / f"home-{machine}"
    home.mkdir(exist_ok=True)
    return dict(os.environ, HOME=str(home), XDG_DATA_HOME=str(home / ".local/share"),
                XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"), JAM_MACHINE_ID=machine)


def _jam(cwd, env, *args, check: int | None = 0):
    res = subprocess.run([JAM, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)
    assert "Traceback" not in res.stderr, res.stderr
    if check is not None:
        assert res.returncode == check, f"jam {args}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


# -- 1. removals that break a head's promise --------------------------------------------------------
def test_drop_never_takes_from_a_remote_an_object_the_head_there_promises(tmp_path):
    """The laptop's root has the embedded `default` (its own disk) and `vault`. `jam commit`
    puts f.bin on vault (the head there promises a clone every byte); the user then stashes it
    and runs `jam drop --from vault f.bin` (the copy on `default` counts). The second computer's
    clone from vault can never fetch f.bin. Expected: drop keeps it (one line) while the head
    there needs it.
    Guard (mutation-checked): copies._drop keeps what promised_on (the head on that remote) names."""
    env = _env(tmp_path, "aaa")
    root, vault = tmp_path / "root", tmp_path / "vault"
    root.mkdir()
    vault.mkdir()
    _jam(root, env, "init", ".")
    _jam(root, env, "remote", "add", "vault", str(vault))
    assert "default" in _jam(root, env, "remote", "list").stdout
    data = os.urandom(70_000)
    (root / "f.bin").write_bytes(data)
    _jam(root, env, "commit", "-m", "one")
    _jam(root, env, "stash", "f.bin")
    _jam(root, env, "drop", "--from", "vault", "f.bin", check=None)
    env_b = _env(tmp_path, "bbb")
    _jam(tmp_path, env_b, "clone", str(vault), str(tmp_path / "c"))
    _jam(tmp_path / "c", env_b, "checkout", "f.bin")
    assert (tmp_path / "c" / "f.bin").read_bytes() == data, "differs"


def test_a_snapshot_corrupt_on_one_remote_is_fetched_from_the_other(tmp_path):
    """aaa's head is on vault and on vault2; the snapshot's bytes on vault rotted (same size).
    bbb (which uses both) must merge it from vault2, not give up on the first copy.
    Guard (mutation-checked): store.fetch_snapshot, a SnapshotError of one remote's copy goes on to the next."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import add_remote
    from jam_core.root import Root

    t, a, b = two(tmp_path)
    vault2 = tmp_path / "vault2"
    vault2.mkdir()
    add_remote(Root.find(a), make_plugin_manager(), "vault2", str(vault2))
    add_remote(Root.find(b), make_plugin_manager(), "vault2", str(vault2))
    (a / "docs/one.txt").write_bytes(b"one v2\n")
    run(a, "commit", "-m", "v2", machine="aaa")
    head = (a / ".jam/history/HEAD").read_text().strip()
    hexd = head.partition(":")[2]
    rotten = t.remote / "objects/b3" / hexd[:2] / hexd
    data = bytearray(rotten.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(rotten, 0o644)
    rotten.write_bytes(bytes(data))
    assert (vault2 / "objects/b3" / hexd[:2] / hexd).exists()
    res = run(b, "sync", machine="bbb", check=None)
    assert res.returncode == 0, res.err
    run(b, "checkout", "docs/one.txt", machine="bbb")
    assert (b / "docs/one.txt").read_bytes() == b"one v2\n"


# -- 5. cost that grows with the whole history -------------------------------------------------------
def test_a_sync_reads_the_snapshots_it_merges_not_the_whole_history(tmp_path, monkeypatch):
    """bbb has 30 snapshots of its own; aaa commits one edit; bbb's sync walks back to the base
    (one header each is what the walk needs) and loads ours, theirs and the base. It reads each
    cached snapshot of the walk whole ~4 times instead (Graph.known -> Index.read_bytes only to
    learn it exists; ancestors() of ours redone in base(), _refer and the merge loop). Bound:
    each snapshot read at most twice (once for the graph, once to load it).
    Guard (mutation-checked): Graph.known reads no bytes (index row + cache entry), Index.bytes_of's
    memo for load(), Index.size_of for the parent sizes."""
    from jam_core.history import index
    from jam_core.history.store import commit
    from jam_core.manager import make_plugin_manager
    from jam_core.root import Root

    t, a, b = two(tmp_path)
    monkeypatch.setenv("JAM_MACHINE_ID", "bbb")
    pm, rb = make_plugin_manager(), Root.find(b)
    for i in range(30):
        (b / f"n{i}.txt").write_bytes(b"n")
        commit(rb, pm, f"c{i}")
    (a / "docs/one.txt").write_bytes(b"one v2\n")
    run(a, "commit", "-m", "edit", machine="aaa")
    reads = []
    real = index.Index.read_bytes
    monkeypatch.setattr(index.Index, "read_bytes", lambda self, sid: reads.append(sid) or real(self, sid))
    res = _sync_in_process(b, monkeypatch, "_refer", lambda: None)
    assert res.exit_code == 0, res.problems
    most = max(reads.count(s) for s in set(reads))
    assert most <= 2, f"{len(reads)} whole reads of {len(set(reads))} cached snapshots (one of them {most} times)"


def test_sync_never_makes_a_new_stub_in_a_directory_moved_out_of_the_root(tmp_path, monkeypatch):
    """aaa adds docs/new.txt; bbb's sync opens bbb's docs/ and makes the stub aside in it; in that
    instant the user moves docs/ out of the root (same filesystem). Nothing may be written in
    the moved directory (invariant 7): no stub, no temporary file.
    Guard (mutation-checked): clone.place, its still_in check before the rename (the aside entry removed)."""
    from jam_core.history import clone as clone_mod

    t, a, b = two(tmp_path)
    (a / "docs/new.txt").write_bytes(b"new\n")
    run(a, "commit", "-m", "new", machine="aaa")
    outside = tmp_path / "outside"
    outside.mkdir()
    real = clone_mod.make_entry
    moved = []

    def make_entry(dfd, name, *args, **kw):
        if name == "new.txt" and not moved:
            os.rename(b / "docs", outside / "docs")
            moved.append(1)
        return real(dfd, name, *args, **kw)

    monkeypatch.setattr(clone_mod, "make_entry", make_entry)
    _sync_in_process(b, monkeypatch, "_refer", lambda: None)
    assert moved
    assert sorted(os.listdir(outside / "docs")) == ["one.txt"], os.listdir(outside / "docs")


def test_restore_never_makes_a_stub_in_a_directory_moved_out_of_the_root(tmp_path, monkeypatch):
    """`jam restore docs/gone.txt`: restore opens docs/ and makes the stub aside in it; in that
    instant the user moves docs/ out of the root. Nothing may be written there (invariant 7).
    Guard (mutation-checked): restore._make, its store.still_in check before the rename."""
    from jam_core.history import restore as restore_mod
    from jam_core.root import Root

    t = make_tree(tmp_path, "a")
    (t.root / "docs").mkdir()
    (t.root / "docs/keep.txt").write_bytes(b"keep\n")
    (t.root / "docs/gone.txt").write_bytes(b"gone\n" * 50)
    run(t.root, "commit", "-m", "one", machine="aaa")
    (t.root / "docs/gone.txt").unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    real = restore_mod.make_entry

    def make_entry(dfd, name, *args, **kw):
        os.rename(t.root / "docs", outside / "docs")
        return real(dfd, name, *args, **kw)

    monkeypatch.setattr(restore_mod, "make_entry", make_entry)
    try:
        restore_mod.restore(Root.find(t.root), "docs/gone.txt")
    except Exception as exc:  # refusing (one line) is right
        assert "Traceback" not in str(exc)
    assert sorted(os.listdir(outside / "docs")) == ["keep.txt"], os.listdir(outside / "docs")


def test_sync_never_removes_a_file_from_a_directory_moved_out_of_the_root(tmp_path, monkeypatch):
    """aaa deletes docs/one.txt; bbb's sync checks bbb's copy is the base version, then (as it
    takes its lease) the user moves docs/ out of the root to keep it. The file in the moved
    directory must stay (invariant 7: nothing outside the root is touched).
    Guard (mutation-checked): sync._remove, its _still_in checks before the rename aside and before the unlink."""
    from jam_core.history import sync as sync_mod

    t, a, b = two(tmp_path)
    (a / "docs/one.txt").unlink()
    (a / "docs/two.txt").write_bytes(b"two\n")  # docs/ stays a directory there
    run(a, "commit", "-m", "rm", machine="aaa")
    outside = tmp_path / "outside"
    outside.mkdir()
    real = sync_mod._Tree.lease
    moved = []

    def lease(self, dfd, name):
        if not moved:
            os.rename(b / "docs", outside / "docs")
            moved.append(1)
        return real(self, dfd, name)

    monkeypatch.setattr(sync_mod._Tree, "lease", lease)
    _sync_in_process(b, monkeypatch, "_refer", lambda: None)
    assert moved
    assert os.path.lexists(outside / "docs/one.txt"), "deleted outside the root"


def test_an_emptied_snapshot_cache_is_filled_again_from_the_remotes(tmp_path):
    """The user empties ROOT/.jam/history/objects (the README calls it a cache). Every snapshot
    is on vault, verified by its id: `jam commit` (and diff, restore, sync) must fetch what it
    needs again, not fail for ever with 'not in this root's cache'.
    Guard (mutation-checked): Index.read_bytes refills a recorded snapshot (its stored size in meta) via _refill."""
    t = make_tree(tmp_path, "a")
    (t.root / "a.txt").write_bytes(b"a\n")
    run(t.root, "commit", "-m", "one", machine="aaa")
    for p in (t.root / ".jam/history/objects").iterdir():
        p.unlink()
    (t.root / "a.txt").write_bytes(b"a2\n")
    res = run(t.root, "commit", "-m", "two", machine="aaa", check=None)
    assert res.returncode == 0, res.err
