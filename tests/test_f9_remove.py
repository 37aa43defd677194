"""F9: `jam remote remove` decides from the remotes themselves, not from the catalog's rows
(real dir remotes, real stubs; the R8 holes are in tests/test_attack_r8.py)."""

from __future__ import annotations

import sqlite3

import pytest

from jam_core.manager import make_plugin_manager
from jam_core.objects import MARKER_NAME, object_relpath
from jam_core.ops.copies import remove_remote
from jam_core.ops.remotes import add_remote
from jam_core.ops.stash import stash
from jam_core.root import CATALOG, Root
from tests.conftest import make_file
from tests.test_attack_r8 import _b3, _holds, _jam, _oid, _root


@pytest.fixture
def pm():
    return make_plugin_manager()


def test_move_to_copies_what_a_copy_lost_elsewhere_leaves_short(tmp_path, pm):
    """f is on a and c (copies 1); c lost its copy behind jam's back, the catalog still lists it.
    `jam remote remove a --move-to b` must copy f to b (counted live, not from the rows), then
    forget a. Guard (mutation-checked): copies.move_off's copies_left (replaced by the catalog's
    count: nothing was copied and the removal was refused)."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    root = _root(tmp_path, "r", {"a": a, "c": c}, copies=2, pm=pm)
    make_file(root.path / "f.bin", 200_000)
    assert stash(root, ["f.bin"], pm).exit_code == 0
    oid = _oid(root, "f.bin")
    with root.lock():
        root.update_config(lambda own: own["place"].__setitem__("copies", 1))
    (c / "objects" / object_relpath(oid)).unlink()
    b.mkdir()
    add_remote(root, pm, "b", str(b), 0)
    r = _jam(root.path, "remote", "remove", "a", "--move-to", "b")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert _holds(b, oid) and _b3(b / "objects" / object_relpath(oid)) == oid
    assert "a" not in {x.name for x in Root.find(root.path).remotes()}


def _on_a_and_b(tmp_path, pm) -> Root:
    """A root whose f.bin is stashed on both a and b (copies = 2), now wanting one copy."""
    root = _root(tmp_path, "r", {"a": tmp_path / "a", "b": tmp_path / "b"}, copies=2, pm=pm)
    make_file(root.path / "f.bin", 200_000)
    assert stash(root, ["f.bin"], pm).exit_code == 0
    with root.lock():
        root.update_config(lambda own: own["place"].__setitem__("copies", 1))
    return root


def test_remove_forgets_the_location_rows_of_that_name(tmp_path, pm):
    """After `remote remove a` (b holds a copy: allowed), no catalog row says a holds anything:
    a remote added later as a vouches for none of the old one's copies (the interactive prompt
    and `jam where` read those rows). Guard (mutation-checked): Catalog.forget_remote's call in
    copies.remove_remote."""
    root = _on_a_and_b(tmp_path, pm)
    remove_remote(Root.find(root.path), "a", pm=pm)
    with sqlite3.connect(root.jam_dir / CATALOG) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM locations WHERE remote = 'a'").fetchone()[0]
        kept = conn.execute("SELECT COUNT(*) FROM locations WHERE remote = 'b'").fetchone()[0]
    assert rows == 0 and kept == 1, (rows, kept)


def test_remove_refuses_while_the_other_remote_cannot_be_asked(tmp_path, pm):
    """b is said (by the catalog) to hold f too, but b's disk is unplugged (its marker gone):
    an unreachable remote holds nothing that can be counted, so `remote remove a` refuses.
    Guard (mutation-checked): copies._only_on's reachable() (ensure_identity) before any has()."""
    b = tmp_path / "b"
    root = _on_a_and_b(tmp_path, pm)
    (b / MARKER_NAME).unlink()  # the drive unplugged: an empty mount point
    r = _jam(root.path, "remote", "remove", "a")
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2 and r.stderr.startswith("jam: ") and "only copy" in r.stderr, (r.returncode, r.stderr)


def test_remove_does_not_count_a_corrupt_copy_of_the_right_size(tmp_path, pm):
    """f is on a and b; b's copy rotted (same size, other bytes). `jam remote remove a` must
    refuse: a is the only intact copy, as `drop --from a` already knows (copies._verified).
    Guard (mutation-checked): copies._only_on's intact() (``has``, a size check, in its place:
    a was forgotten and f could no longer come back)."""
    b = tmp_path / "b"
    root = _on_a_and_b(tmp_path, pm)
    oid = _oid(root, "f.bin")
    obj = b / "objects" / object_relpath(oid)
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[1000] ^= 0xFF
    obj.write_bytes(bytes(data))
    r = _jam(root.path, "remote", "remove", "a")
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2 and "only copy of 1 stubbed file" in r.stderr, (r.returncode, r.stderr)
    assert "a" in {x.name for x in Root.find(root.path).remotes()}
    r = _jam(root.path, "checkout", "f.bin")
    assert r.returncode == 0, r.stderr
    assert _b3(root.path / "f.bin") == oid
