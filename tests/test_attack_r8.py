"""R8: an attacker's review of every path that removes something (gc, drop/move, doctor --fix,
remote remove), on real dir remotes, real files and real xattrs.

Each test is either a hole (strict xfail, "BUG: ...") or a guard that was mutation-checked
(its docstring names the guard that was commented out once to watch it fail).

Holes found (the last copy of an object, or a copy counted that is not one):
- one place under two names (same identity marker, or a symlinked path): counted as two copies
  by drop, stash and doctor;
- a root copied with `cp -a` keeps the original's [core] id (also found by R10);
- another root's refs damaged (garbage, cut, JSON, emptied) or not a regular file: read as "no refs";
- a root of this machine naming the remote without an id: gc's silent-root stop misses it;
- refs published from the catalog alone: a `cp -a`'d stub drops out of them;
- `jam clone` records no refs: a second computer's clone is invisible to the first one's gc;
- `jam remote remove` keeps its refs on the remote: other roots still count that copy for it;
- the dir backend removes through a symlinked fan-out directory;
- a removal counts an sftp copy by its size (no hash_object in jam_sftp);
- `jam copy --to` takes a corrupt same-size copy on the destination for a copy;
- doctor --fix forgets a damaged stub's object, or trades it for a swapped xattr's;
- `jam remote remove` trusts the catalog's location rows (lost catalog, a reused or changed
  name, a copy lost elsewhere with --move-to);
- refs of a million objects exceed META_MAX: nobody can gc or drop on that remote.
Guards checked: gc's removal reads the refs again after its intent; pending refs count; a copy on
a remote another root does not use is no copy for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jam_core.manager import make_plugin_manager
from jam_core.objects import object_relpath
from jam_core.ops.remotes import add_remote
from jam_core.ops.stash import stash
from jam_core.root import Root
from jam_core.scan import DIRTY, STUB, walk
from tests.conftest import make_file
from tests.test_copies import _holds, _root

JAM = str(Path(sys.executable).parent / "jam")


@pytest.fixture
def pm():
    return make_plugin_manager()


def _oid(root: Root, rel: str) -> str:
    for e in walk(str(root.path), rel):
        assert e.state in (STUB, DIRTY)
        return e.record.oid
    raise AssertionError(rel)


def _another_machine_refers_to_y(tmp_path: Path, pm) -> tuple[Path, Root, str, Path]:
    """Roots A and B share the dir remote a; B stashed y.bin there, then B's config goes (B is
    another machine's root: not in this machine's roots list). Returns (a, A, y's id, B's refs
    file on a)."""
    from jam_core.ops.refs import root_id

    a = tmp_path / "a"
    ra = _root(tmp_path, "ra", {"a": a}, pm=pm)
    rb = _root(tmp_path, "rb", {"a": a}, pm=pm)
    make_file(rb.path / "y.bin", 200_000, seed=5)
    assert stash(rb, ["y.bin"], pm).exit_code == 0
    y = _oid(rb, "y.bin")
    with rb.lock():
        rid = root_id(rb)
    refs = a / "meta" / "refs" / rid
    assert y in refs.read_text()
    (rb.path / ".jam" / "config.toml").unlink()
    return a, ra, y, refs


def _jam(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([JAM, *args], cwd=cwd, capture_output=True, text=True, env=os.environ.copy(),
                          timeout=120)


# -- 1. the last copy ------------------------------------------------------------------------------

def test_one_location_added_under_two_names_is_never_counted_as_two_copies(tmp_path, pm):
    """`jam remote add a2 /same/dir` reuses the marker of remote a: a and a2 are one place.
    `jam drop --from a f` then asks a2 whether it holds f (yes: it is the same directory) and
    removes the only copy.
    Guards: remotes.add_remote's refusal and copies.remove_copies' skip of the store's other names
    (each alone keeps the copy here; tests/test_same_store.py checks each)."""
    a = tmp_path / "a"
    root = _root(tmp_path, "r", {"a": a}, pm=pm)
    make_file(root.path / "f.bin", 200_000)
    assert stash(root, ["f.bin"], pm).exit_code == 0
    oid = _oid(root, "f.bin")
    try:
        add_remote(root, pm, "a2", str(a), 1)  # refusing this is one acceptable fix
    except Exception as exc:  # noqa: BLE001 - a refusal must be a clear one-line error
        from jam_core.errors import JamError

        assert isinstance(exc, JamError), exc
        return
    from jam_core.ops.copies import drop

    drop(root, ["f.bin"], pm, "a")
    assert _holds(a, oid), "the only copy was removed"


def test_a_root_copied_with_cp_a_never_loses_its_stubs_to_the_originals_gc(tmp_path, pm):
    """Two roots, one id: the copy stashes y (refs/<id> = {x, y}), then the original runs gc:
    it publishes refs/<id> = {x} and y, on no list any more, goes. Guard (mutation-checked):
    refs.root_id takes a new id where ``[core] home`` is not this .jam directory."""
    a = tmp_path / "a"
    orig = _root(tmp_path, "orig", {"a": a}, pm=pm)
    make_file(orig.path / "x.bin", 200_000, seed=1)
    assert stash(orig, ["x.bin"], pm).exit_code == 0
    twin = tmp_path / "twin"
    subprocess.run(["cp", "-a", str(orig.path), str(twin)], check=True)
    make_file(twin / "y.bin", 200_000, seed=2)
    r = _jam(twin, "stash", "y.bin")
    assert r.returncode == 0, r.stderr
    y = _oid(Root.find(twin), "y.bin")
    assert _holds(a, y)
    r = _jam(orig.path, "gc")
    assert "Traceback" not in r.stderr, r.stderr
    assert _holds(a, y), "the copy's only copy of y.bin was collected by the original's gc"


@pytest.mark.parametrize("damage", ["garbage", "cut", "json", "empty"])
def test_gc_never_takes_another_roots_damaged_refs_for_no_refs(tmp_path, pm, damage):
    """Root B (another machine: not in this machine's roots list) refers to y on the shared
    remote; its refs file there is damaged (garbage bytes, cut before its first id, JSON from
    some other tool, emptied: only a pending list is ever emptied on purpose). Root A's gc must not read that as "B needs nothing".
    Guard (mutation-checked): refs.decode raises on what encode does not write (its end line counts the ids), refs._decoded turns that into a RemoteError."""
    from jam_core.ops.gc import gc

    a, ra, y, refs = _another_machine_refers_to_y(tmp_path, pm)
    refs.write_bytes({"garbage": os.urandom(300),
                      "cut": refs.read_bytes()[:20],
                      "json": b'{"copies": 1, "oids": ["' + y.encode() + b'"]}',
                      "empty": b""}[damage])
    out = gc(ra, pm)
    assert _holds(a, y), f"B's only copy was collected ({out.removed})"
    assert out.exit_code == 1 and out.problems, "a damaged refs file must be said"


# -- 4. remote remove --------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["catalog lost", "catalog rows gone"])
def test_remote_remove_never_forgets_the_only_holder_because_the_catalog_forgot(tmp_path, pm, how):
    """Guard wanted: the stubs themselves (a walk, as gc does) say which objects this root needs,
    not only the catalog's location rows.
    Guard (mutation-checked): copies._only_on (stubs walked, each object asked live of the other remotes)."""
    from jam_core.root import CATALOG

    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, "r", {"a": a, "b": b}, pm=pm)
    make_file(root.path / "f.bin", 200_000)
    assert stash(root, ["f.bin"], pm).exit_code == 0
    oid = _oid(root, "f.bin")
    assert _holds(a, oid) and not _holds(b, oid)
    db = root.jam_dir / CATALOG
    if how == "catalog lost":
        db.unlink()
        for side in root.jam_dir.glob(CATALOG + "-*"):
            side.unlink()
    else:
        import sqlite3

        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM locations")
    r = _jam(root.path, "remote", "remove", "a")
    assert "Traceback" not in r.stderr, r.stderr
    if how == "catalog lost":  # a root that had stubs: every command but doctor --fix refuses a lost catalog
        assert r.returncode == 1 and r.stderr.startswith("jam: ") and "missing" in r.stderr, (r.returncode, r.stderr)
    else:
        assert r.returncode == 2 and r.stderr.startswith("jam: ") and "only copy" in r.stderr, (r.returncode, r.stderr)
    assert "a" in {x.name for x in Root.find(root.path).remotes()}


def test_gc_stops_for_a_root_of_this_machine_that_names_the_remote_without_an_id(tmp_path, pm):
    """Root B (registered here) uses the shared remote from an older jam: its config has the
    remote's location but no id, and it never recorded refs. A's gc must stop on that remote
    (as it does for a root whose config has the id), not collect B's objects.
    Guard (mutation-checked): gc._silent_roots.names_it (a table without id matched by url or real path)."""
    import tomllib

    import tomli_w

    from jam_core.ops.gc import gc
    from jam_core.root import registered_roots

    a = tmp_path / "a"
    ra = _root(tmp_path, "ra", {"a": a}, pm=pm)
    rb = _root(tmp_path, "rb", {"a": a}, pm=pm)
    assert rb.path in registered_roots()
    make_file(rb.path / "y.bin", 200_000, seed=5)
    assert stash(rb, ["y.bin"], pm).exit_code == 0
    y = _oid(rb, "y.bin")
    cfg = rb.jam_dir / "config.toml"
    conf = tomllib.loads(cfg.read_text())
    del conf["remote"]["a"]["id"]  # as an older jam wrote it
    conf.get("core", {}).pop("id", None)
    cfg.write_text(tomli_w.dumps(conf))
    shutil.rmtree(a / "meta" / "refs")  # ... and it recorded no refs there
    ra_only = tmp_path / "ra" / "x.bin"
    make_file(ra_only, 200_000, seed=6)
    assert stash(ra, ["x.bin"], pm).exit_code == 0
    out = gc(ra, pm)
    assert _holds(a, y), f"B's only copy was collected ({out.removed})"
    assert out.exit_code == 1 and any("has recorded no refs" in p for p in out.problems), out.problems


# -- 2. copies between tiers -----------------------------------------------------------------------

def _b3(p: Path) -> str:
    import blake3

    return "b3:" + blake3.blake3(p.read_bytes()).hexdigest()


def test_copy_never_records_a_corrupt_copy_already_on_the_destination(tmp_path, pm):
    """B holds a copy of f's object with the right size and the wrong bytes (a bad sector, an
    interrupted tool). `jam copy --to b f` must verify it (hash in place, as drop does) and
    copy again, or fail; never say the content is on b.
    Guard (mutation-checked): copies._copy_entries asks _verified (hashed in place), not has()."""
    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, "r", {"a": a, "b": b}, pm=pm)
    make_file(root.path / "f.bin", 200_000)
    assert stash(root, ["f.bin"], pm).exit_code == 0
    oid = _oid(root, "f.bin")
    bad = b / "objects" / object_relpath(oid)
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"\xff" * 200_000)  # same size, other bytes
    r = _jam(root.path, "copy", "--to", "b", "f.bin")
    assert "Traceback" not in r.stderr, r.stderr
    intact = _b3(bad) == oid
    assert intact or r.returncode != 0, f"copy said done ({r.returncode}, {r.stdout!r}) over a corrupt copy"
    r = _jam(root.path, "remote", "remove", "a")
    assert intact or r.returncode != 0, "remote remove forgot the only intact copy"


def test_a_stub_copied_with_cp_a_stays_in_the_refs_another_roots_gc_reads(tmp_path, pm):
    """Root A: f stashed; the user `cp -a f g` (xattrs kept: g is a stub of the same object, the
    catalog does not know it) and checks f out; a later stash of h publishes A's refs from the
    catalog ({h}). Root B's gc then finds f's object on no root's list and removes it: g is a
    stub with no content anywhere. (A's own gc walks the tree and keeps it: the hole is in what
    A tells the others.)
    Guard (mutation-checked): refs.Recorder.publish keeps what the refs listed unless exact (gc)."""
    from jam_core.ops.checkout import checkout
    from jam_core.ops.gc import gc

    a = tmp_path / "a"
    ra = _root(tmp_path, "ra", {"a": a}, pm=pm)
    rb = _root(tmp_path, "rb", {"a": a}, pm=pm)
    make_file(ra.path / "f.bin", 200_000, seed=1)
    assert stash(ra, ["f.bin"], pm).exit_code == 0
    x = _oid(ra, "f.bin")
    subprocess.run(["cp", "-a", str(ra.path / "f.bin"), str(ra.path / "g.bin")], check=True)
    assert _oid(ra, "g.bin") == x
    assert checkout(ra, ["f.bin"], pm).exit_code == 0
    make_file(ra.path / "h.bin", 200_000, seed=2)
    assert stash(ra, ["h.bin"], pm).exit_code == 0
    out = gc(rb, pm)
    assert _holds(a, x), f"g.bin's only copy was collected by B's gc ({out.removed})"


# -- 3. doctor --fix -----------------------------------------------------------------------------------

def test_doctor_fix_never_forgets_the_object_of_a_stub_it_left_as_it_is(tmp_path, pm):
    """f's user.jam is garbage and its header block too: doctor reports bad-metadata and leaves
    the file alone. Until then the catalog's row keeps f's object referenced (gc keeps it); after
    `doctor --fix` replaces the stub table with the walk's rows, nothing does.
    Guard (mutation-checked): doctor._Doctor.keep_row (the old row kept for a stub left as it is)."""
    a = tmp_path / "a"
    root = _root(tmp_path, "r", {"a": a}, pm=pm)
    make_file(root.path / "f.bin", 200_000)
    assert stash(root, ["f.bin"], pm).exit_code == 0
    x = _oid(root, "f.bin")
    f = root.path / "f.bin"
    os.chmod(f, 0o644)
    with open(f, "r+b") as fh:
        fh.write(b"\x00jam? " + b"\xee" * 60)  # the header block damaged (no longer a header)
    os.chmod(f, 0o444)
    os.setxattr(f, "user.jam", b"\x01garbage")
    r = _jam(root.path, "gc", "--dry-run")
    assert "would remove 0 unused objects" in r.stdout, ("control: the catalog row keeps it", r.stdout)
    r = _jam(root.path, "doctor", "--fix", "--json")
    assert "Traceback" not in r.stderr and '"bad-metadata"' in r.stdout, (r.stdout[-800:], r.stderr)
    r = _jam(root.path, "gc")
    assert "Traceback" not in r.stderr, r.stderr
    assert _holds(a, x), "the damaged stub's object was collected after doctor --fix"


@pytest.mark.parametrize("entry", ["symlink", "directory", "fifo"])
def test_gc_stops_on_a_refs_entry_it_cannot_read(tmp_path, pm, entry):
    """Root B (another machine) refers to y; its refs entry on the shared remote is not a regular
    file (a sync tool that keeps symlinks, a restore gone wrong). jam must not read that as
    "B refers to nothing": it cannot tell, so it removes nothing there and says why.
    Guard (mutation-checked): jam_dir.list_meta lists every entry of a jam name (no is_file filter)."""
    from jam_core.ops.gc import gc

    a, ra, y, refs = _another_machine_refers_to_y(tmp_path, pm)
    real = tmp_path / "elsewhere"
    real.write_bytes(refs.read_bytes())
    refs.unlink()
    if entry == "symlink":
        refs.symlink_to(real)
    elif entry == "directory":
        refs.mkdir()
    else:
        os.mkfifo(refs)
    out = gc(ra, pm)
    assert _holds(a, y), f"B's only copy was collected ({out.removed})"
    assert out.exit_code == 1 and out.problems, "an unreadable refs entry must be said"


def test_a_name_reused_for_another_remote_never_vouches_for_the_old_ones_copies(tmp_path, pm):
    """f is on a (old disk) and b. The user forgets a (`remote remove a`: b holds a copy, so
    it is allowed), plugs in a new empty disk and adds it as a. b now holds f's only
    copy; `jam remote remove b` must refuse, not count the old a's copy under the new a.
    Guard (mutation-checked): copies._only_on (the other remotes asked live, not the catalog's rows)."""
    old, b, new = tmp_path / "old", tmp_path / "b", tmp_path / "new"
    root = _root(tmp_path, "r", {"a": old, "b": b}, copies=2, pm=pm)
    make_file(root.path / "f.bin", 200_000)
    assert stash(root, ["f.bin"], pm).exit_code == 0
    oid = _oid(root, "f.bin")
    assert _holds(old, oid) and _holds(b, oid)
    with root.lock():
        root.update_config(lambda own: own["place"].__setitem__("copies", 1))
    r = _jam(root.path, "remote", "remove", "a")
    assert r.returncode == 0, r.stderr
    new.mkdir()
    r = _jam(root.path, "remote", "add", "a", str(new))
    assert r.returncode == 0, r.stderr
    assert not _holds(new, oid)
    r = _jam(root.path, "remote", "remove", "b")
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2 and r.stderr.startswith("jam: ") and "only copy" in r.stderr, (r.returncode, r.stderr)


# -- 1b. gc in one root while another stashes the same content -------------------------------------

def _shared_content(tmp_path, pm):
    """Roots A and B on one remote; A stashed then checked out d (its object is unused by A,
    still on the remote); B has a local file with the same bytes."""
    from jam_core.ops.checkout import checkout

    a = tmp_path / "a"
    ra = _root(tmp_path, "ra", {"a": a}, pm=pm)
    rb = _root(tmp_path, "rb", {"a": a}, pm=pm)
    data = make_file(ra.path / "d.bin", 200_000, seed=9)
    assert stash(ra, ["d.bin"], pm).exit_code == 0
    x = _oid(ra, "d.bin")
    assert checkout(ra, ["d.bin"], pm).exit_code == 0
    (rb.path / "d.bin").write_bytes(data)
    make_file(rb.path / "e.bin", 200_000, seed=10)
    assert stash(rb, ["e.bin"], pm).exit_code == 0  # B has refs on the remote (no silent root)
    return a, ra, rb, x


def test_gc_after_reading_the_refs_never_removes_what_a_stash_just_swapped_on(tmp_path, pm, monkeypatch):
    """A's gc has read the refs (d's object is unused) when B, another process, stashes d: B's
    refs land before A writes its removal intent. The guard: remove_copies reads the refs again,
    live, after its intent (``here = users(...)``), not the list gc computed before; mutation-
    checked by handing remove_copies an empty ``Users()`` there: B's stub lost its object."""
    from jam_core.ops import gc as gcmod

    a, ra, rb, x = _shared_content(tmp_path, pm)
    ran = []
    real = gcmod.users

    def users_then_b_stashes(remote, pm_, session):
        u = real(remote, pm_, session)
        ran.append(_jam(rb.path, "stash", "d.bin"))
        return u

    monkeypatch.setattr(gcmod, "users", users_then_b_stashes)
    out = gcmod.gc(ra, pm)
    assert ran and ran[0].returncode == 0, ran
    assert _oid(rb, "d.bin") == x  # B's d.bin is a stub now
    assert _holds(a, x), f"B's stub lost its only copy ({out.removed})"
    assert any(o == x for _r, o, _why in out.kept), out


def test_gc_between_a_stashs_store_and_its_swap_keeps_the_object(tmp_path, pm, monkeypatch):
    """B (in this process) has written its pending refs for d, stored it (the object was there
    already), found no removal under way, and is about to swap d for its stub when A's gc
    (another process) runs whole. The guard: ``refs.users`` reads the pending lists
    (``<id>.pending.<n>``) as refs; mutation-checked by skipping the pending names there: A's
    gc removed the object and B swapped d onto nothing."""
    from jam_core.ops.refs import Recorder

    a, ra, rb, x = _shared_content(tmp_path, pm)
    ran = []
    real = Recorder.removing_elsewhere

    def then_a_collects(self, remote):
        going = real(self, remote)
        if not ran:
            ran.append(_jam(ra.path, "gc"))
        return going

    monkeypatch.setattr(Recorder, "removing_elsewhere", then_a_collects)
    res = stash(rb, ["d.bin"], pm)
    assert ran and "Traceback" not in ran[0].stderr, ran
    assert res.done and _oid(rb, "d.bin") == x, res
    assert _holds(a, x), "B swapped d.bin onto an object A's gc removed"


def test_remote_remove_move_to_never_forgets_a_remote_that_still_holds_the_only_copy(tmp_path, pm):
    """Guard (mutation-checked): copies.move_off counts the copies left live (_verified), and
    copies._only_on refuses the removal behind it."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    root = _root(tmp_path, "r", {"a": a, "c": c}, copies=2, pm=pm)
    make_file(root.path / "f.bin", 200_000)
    assert stash(root, ["f.bin"], pm).exit_code == 0
    oid = _oid(root, "f.bin")
    assert _holds(a, oid) and _holds(c, oid)
    with root.lock():
        root.update_config(lambda own: own["place"].__setitem__("copies", 1))
    (c / "objects" / object_relpath(oid)).unlink()  # c lost its copy (a bad disk, a hand)
    b.mkdir()
    assert add_remote(root, pm, "b", str(b), 0)
    r = _jam(root.path, "remote", "remove", "a", "--move-to", "b")
    assert "Traceback" not in r.stderr, r.stderr
    names = {x.name for x in Root.find(root.path).remotes()}
    moved = _holds(b, oid) and _b3(b / "objects" / object_relpath(oid)) == oid
    assert moved or ("a" in names and r.returncode != 0), (r.returncode, r.stdout, r.stderr, names)


def test_gc_works_beside_a_root_of_a_million_stubbed_objects(tmp_path, pm):
    """The product's scale (1,000,000 files) with distinct contents: root B's refs on the shared
    remote list a million ids (what ``refs.encode`` writes for it, planted here). A's gc must
    still work (and keep B's objects). Guard: the backends' META_MAX (256 MiB; 64 MiB failed)."""
    from jam_core.ops.gc import gc
    from jam_core.ops.refs import encode

    a = tmp_path / "a"
    ra = _root(tmp_path, "ra", {"a": a}, pm=pm)
    make_file(ra.path / "x.bin", 200_000, seed=3)
    assert stash(ra, ["x.bin"], pm).exit_code == 0
    raw = os.urandom(32 * 1_000_000).hex()
    oids = ["b3:" + raw[i:i + 64] for i in range(0, len(raw), 64)]
    data = encode(1, oids)
    (a / "meta" / "refs" / ("cd" * 16)).write_bytes(data)
    del raw, oids
    out = gc(ra, pm, dry_run=True)
    assert out.exit_code == 0, (len(data), out.problems)


def test_a_remote_a_root_forgot_never_counts_as_its_copy(tmp_path, pm):
    """B used a and r, then forgot r (`jam remote remove r`: a holds its copy, so allowed). Its
    refs file on r stays. A (a and r) drops y from a: the guard counts r's copy for B (B has
    refs on r), so a's copy goes, and B, whose remotes are now a alone, cannot get y back.
    Guard (mutation-checked): cli.remotes._forget_refs_on (refs emptied on the removed remote) and copies._short_of (a copy counts for another root only where its refs name the object)."""
    from jam_core.ops.checkout import checkout
    from jam_core.ops.copies import drop

    a, r = tmp_path / "a", tmp_path / "r"
    ra = _root(tmp_path, "ra", {"a": a, "r": r}, copies=2, pm=pm)
    rb = _root(tmp_path, "rb", {"a": a, "r": r}, copies=2, pm=pm)
    data = make_file(ra.path / "y.bin", 200_000, seed=4)
    (rb.path / "y.bin").write_bytes(data)
    assert stash(ra, ["y.bin"], pm).exit_code == 0
    assert stash(rb, ["y.bin"], pm).exit_code == 0
    y = _oid(rb, "y.bin")
    assert _holds(a, y) and _holds(r, y)
    for root in (ra, rb):
        with root.lock():
            root.update_config(lambda own: own["place"].__setitem__("copies", 1))
    res = _jam(rb.path, "remote", "remove", "r")
    assert res.returncode == 0, res.stderr
    assert _jam(rb.path, "gc", "--dry-run").returncode == 0  # B's refs on a: copies 1
    drop(ra, ["y.bin"], pm, "a")
    got = checkout(rb, ["y.bin"], pm)
    assert got.exit_code == 0 and (rb.path / "y.bin").read_bytes() == data, \
        f"B lost y.bin: {got.failed} (a: {_holds(a, y)}, r: {_holds(r, y)})"


# -- 1c. a clone on a second computer -------------------------------------------------------------------

def _elsewhere(tmp_path: Path, machine: str) -> dict:
    """The environment of another computer: its own HOME, data dir (roots list) and machine id."""
    home = tmp_path / f"home-{machine}"
    home.mkdir(exist_ok=True)
    return dict(os.environ, HOME=str(home), XDG_DATA_HOME=str(home / ".local/share"),
                XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
                JAM_MACHINE_ID=machine)


def test_gc_keep_on_one_computer_never_strands_a_fresh_clone_on_another(tmp_path):
    """Computer aaa commits f.bin; computer bbb clones (stubs); aaa changes f.bin, commits and runs
    `gc --keep "last 1"`: the object of the clone's stub must stay. Guard (mutation-checked):
    clone._refer (refs recorded before any stub is made) and the publish after."""
    from tests.safety_support import make_tree, run_jam

    t = make_tree(tmp_path, "a")
    data = os.urandom(70_000)
    (t.root / "f.bin").write_bytes(data)
    run_jam(t.root, "commit", "-m", "one", machine="aaa")
    x = "b3:" + __import__("blake3").blake3(data).hexdigest()
    assert _holds(t.remote, x)
    clone = tmp_path / "clone"
    r = subprocess.run([JAM, "clone", str(t.remote), str(clone)], cwd=tmp_path, capture_output=True, text=True,
                       env=_elsewhere(tmp_path, "bbb"))
    assert r.returncode == 0, r.stderr
    assert _oid(Root.find(clone), "f.bin") == x
    (t.root / "f.bin").write_bytes(os.urandom(70_000))
    run_jam(t.root, "commit", "-m", "two", machine="aaa")
    res = run_jam(t.root, "gc", "--keep", "last 1", machine="aaa", check=None)
    assert _holds(t.remote, x), f"the clone's f.bin lost its only copy: {res.out} {res.err}"


def test_drop_never_removes_through_a_symlinked_fan_out_directory(tmp_path, pm):
    """The user "deduplicated" two remote disks: b/objects/b3 is a symlink to a/objects/b3.
    `jam drop --from b f` finds an intact copy on a (so b's may go), then removes b's copy by
    a path that goes through the symlink: a's file, the only one there is.
    Guard (mutation-checked): jam_dir._object_dirfd (objects/, its algorithm and fan-out dirs opened
    O_NOFOLLOW one below the other; remove, has and _open_object go through it)."""
    from jam_core.ops.copies import drop

    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, "r", {"a": a, "b": b}, copies=2, pm=pm)
    make_file(root.path / "f.bin", 200_000)
    assert stash(root, ["f.bin"], pm).exit_code == 0
    oid = _oid(root, "f.bin")
    assert _holds(a, oid) and _holds(b, oid)
    with root.lock():
        root.update_config(lambda own: own["place"].__setitem__("copies", 1))
    shutil.rmtree(b / "objects" / "b3")
    (b / "objects" / "b3").symlink_to(a / "objects" / "b3")
    res = drop(root, ["f.bin"], pm, "b")
    assert (a / "objects" / object_relpath(oid)).is_file(), f"a's only copy was removed through b ({res})"


def test_copies_two_on_one_place_under_two_names_is_one_copy(tmp_path, pm):
    """The config names one directory twice (hand-written, or added before a fix refuses it;
    a symlinked path to the same disk is the same): stash must not count it as two copies, and
    doctor must not say all is well.
    Guard (mutation-checked): stash.choose_remotes counts the stores chosen (ids), not their names."""
    import tomllib

    import tomli_w

    a = tmp_path / "a"
    root = _root(tmp_path, "r", {"a": a}, copies=2, pm=pm)
    (tmp_path / "a-link").symlink_to(a)
    cfg = root.jam_dir / "config.toml"
    conf = tomllib.loads(cfg.read_text())
    conf["remote"]["a2"] = dict(conf["remote"]["a"], url=str(tmp_path / "a-link"),
                                location=str(tmp_path / "a-link"))
    cfg.write_text(tomli_w.dumps(conf))
    root = Root.find(root.path)
    make_file(root.path / "f.bin", 200_000)
    res = stash(root, ["f.bin"], pm)
    if res.done:
        r = _jam(root.path, "doctor")
        assert r.returncode == 1, f"stash made a stub with one copy of two and doctor says: {r.stdout[-600:]}"


def test_doctor_fix_never_trades_a_stubs_object_for_the_one_a_swapped_xattr_names(tmp_path, pm):
    """f's user.jam was overwritten with g's (a tool that copies xattrs between files). f's header
    block and the catalog still say f's object; doctor --fix records the xattr's instead, and
    the next gc removes f's content from the only remote.
    Guard (mutation-checked): doctor._Doctor.keep_row (the old row kept where the xattr names another object)."""
    a = tmp_path / "a"
    root = _root(tmp_path, "r", {"a": a}, pm=pm)
    make_file(root.path / "f.bin", 200_000, seed=1)
    make_file(root.path / "g.bin", 200_000, seed=2)
    assert stash(root, ["f.bin", "g.bin"], pm).exit_code == 0
    x = _oid(root, "f.bin")
    os.setxattr(root.path / "f.bin", "user.jam", os.getxattr(root.path / "g.bin", "user.jam"))
    r = _jam(root.path, "gc", "--dry-run")
    assert "would remove 0 unused objects" in r.stdout, ("control: the catalog row keeps it", r.stdout)
    r = _jam(root.path, "doctor", "--fix")
    assert "Traceback" not in r.stderr and r.returncode == 1, (r.returncode, r.stdout[-800:], r.stderr)
    r = _jam(root.path, "gc")
    assert "Traceback" not in r.stderr, r.stderr
    assert _holds(a, x), f"f.bin's own object was collected after doctor --fix: {r.stdout}"


def test_a_remote_re_added_under_another_name_is_still_the_only_holder(tmp_path, pm):
    """Guard (mutation-checked): copies._only_on (the stubs' objects, not the rows under the old name)."""
    a, b = tmp_path / "a", tmp_path / "b"
    root = _root(tmp_path, "r", {"a": a, "b": b}, pm=pm)
    make_file(root.path / "f.bin", 200_000)
    assert stash(root, ["f.bin"], pm).exit_code == 0
    oid = _oid(root, "f.bin")
    assert _holds(a, oid) and not _holds(b, oid)
    r = _jam(root.path, "remote", "remove", "a", "--force")  # "I will add it again as 'nas'"
    assert r.returncode == 0, r.stderr
    r = _jam(root.path, "remote", "add", "nas", str(a))
    assert r.returncode == 0, r.stderr
    r = _jam(root.path, "remote", "remove", "nas")
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2 and "only copy" in r.stderr, (r.returncode, r.stdout, r.stderr)


# -- 2b. the other copy on an sftp mirror (real OpenSSH server) ------------------------------------------

def test_drop_never_counts_a_corrupt_sftp_copy_of_the_right_size(runner, tmp_path, sshd, sftp_store, monkeypatch):
    """far (sftp) and near (dir) both hold f; far's copy has a flipped byte. With copies = 1,
    `jam drop --from near f` must find far's copy bad (read it back and hash it, as doctor --deep
    does for a backend that cannot hash in place) and keep near's.
    Guard (mutation-checked): jam_sftp's hash_object hook (Ops.hash_object streams and hashes the copy)."""
    from tests.test_sftp_copies import flip, holds, jam, mirrored_root, oid_of, set_copies

    near = tmp_path / "near"
    tree = mirrored_root(runner, tmp_path, "tree", sshd, sftp_store, near, monkeypatch)
    data = make_file(tree / "f.bin", 300_000, seed=2)
    jam(runner, "stash", "f.bin")
    oid = oid_of(tree / "f.bin")
    assert holds(sftp_store, oid) and holds(near, oid)
    set_copies(tree, 1)
    flip(sftp_store / "objects" / object_relpath(oid))
    res = jam(runner, "drop", "--from", "near", "f.bin", ok=False)
    assert holds(near, oid), f"near's intact copy was dropped for a corrupt one on far: {res.output}"
    assert res.exit_code == 1
    jam(runner, "checkout", "f.bin")
    assert (tree / "f.bin").read_bytes() == data, "differs"


def test_drop_never_counts_a_copy_on_a_remote_the_other_root_does_not_use(tmp_path, pm):
    """A uses a and p (its private disk); B uses a alone; both stashed y. A's drop of y from a
    leaves A a copy on p, but none B can reach: refused. The guard: ``copies._short_of`` counts a
    copy on r for another root only if that root has refs on r (``rid not in u.refs``);
    mutation-checked by counting every remote for every root: B's only copy went."""
    from jam_core.ops.checkout import checkout
    from jam_core.ops.copies import drop

    a, p = tmp_path / "a", tmp_path / "p"
    ra = _root(tmp_path, "ra", {"a": a, "p": p}, copies=2, pm=pm)
    rb = _root(tmp_path, "rb", {"a": a}, pm=pm)
    data = make_file(ra.path / "y.bin", 200_000, seed=4)
    (rb.path / "y.bin").write_bytes(data)
    assert stash(ra, ["y.bin"], pm).exit_code == 0
    assert stash(rb, ["y.bin"], pm).exit_code == 0
    y = _oid(rb, "y.bin")
    assert _holds(a, y) and _holds(p, y)
    with ra.lock():
        ra.update_config(lambda own: own["place"].__setitem__("copies", 1))
    res = drop(ra, ["y.bin"], pm, "a")
    assert _holds(a, y), "B's only reachable copy was dropped"
    assert res.exit_code == 1 and "needs 1 verified copy" in str(res.skipped), res
    assert checkout(rb, ["y.bin"], pm).exit_code == 0 and (rb.path / "y.bin").read_bytes() == data, "differs"
