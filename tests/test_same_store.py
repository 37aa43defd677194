"""One store under two names is one copy (found by R8 and R10: `jam remote add b DIR` of a DIR
already configured, a symlink to it, or a remote's table copied by hand, all carry one identity).
Each test here names the guard it was mutation-checked against."""

from __future__ import annotations

from jam_core.root import Root
from tests.conftest import make_file
from tests.safety_support import jam, record
from tests.test_copies import _holds, _root


def _second_name(root: Root, name: str, of: str) -> None:
    """``name``: remote ``of``'s table copied by hand (the same location and identity)."""
    with root.lock():
        root.update_config(lambda own: own["remote"].__setitem__(name, dict(own["remote"][of])))


def test_a_second_name_for_a_configured_store_is_refused(tmp_path):
    """Guard (mutation-checked): remotes.add_remote's loop over the configured identities."""
    a = tmp_path / "a"
    root = _root(tmp_path, "root", {"a": a})
    (tmp_path / "a-link").symlink_to(a)
    before = root.config_path.read_bytes()
    for where in (a, tmp_path / "a-link"):
        res = jam("remote", "add", "b", str(where), cwd=root.path, check=2)
        assert res.err.startswith("jam: remote 'b': ") and "is remote 'a' already" in res.err, res.err
        assert res.err.count("\n") == 1, res.err
    assert root.config_path.read_bytes() == before


def test_placement_spreads_copies_over_stores_not_names(tmp_path):
    """``[place] copies = 2`` over a, a2 (a's table copied) and c: the two copies go to a and c.
    Counting names, the placement chose a and a2 (one store), and the stash then refused the
    file ("only 1 remote") though c was there. Guard (mutation-checked): placement.choose's
    ``store not in stores``."""
    a, c = tmp_path / "a", tmp_path / "c"
    root = _root(tmp_path, "root", {"a": a, "c": c}, 2)
    _second_name(root, "a2", "a")
    make_file(root.path / "f.bin", 200_000, seed=1)
    jam("stash", "f.bin", cwd=root.path)
    oid = record(root.path / "f.bin").oid
    assert _holds(a, oid) and _holds(c, oid)


def test_a_drop_never_counts_two_names_of_one_other_store_as_two_copies(tmp_path):
    """``[place] copies = 2`` on a and c, and c2 (c's table copied): dropping f from a leaves one
    store holding it (c, under two names), one short of two: refused. Guard (mutation-checked):
    copies._short_of counts each store once (``counted``)."""
    a, c = tmp_path / "a", tmp_path / "c"
    root = _root(tmp_path, "root", {"a": a, "c": c}, 2)
    make_file(root.path / "f.bin", 200_000, seed=2)
    jam("stash", "f.bin", cwd=root.path)
    oid = record(root.path / "f.bin").oid
    _second_name(root, "c2", "c")
    res = jam("drop", "--from", "a", "f.bin", cwd=root.path, check=None)
    assert res.returncode != 0 and "kept" in res.err, (res.out, res.err)
    assert _holds(a, oid)
