"""doctor follow-ups of R15: --fix adopting stubs the catalog did not know records their objects
in the root's refs on its remotes (a remote whose refs cannot be written says so, and nothing is
adopted); a catalog row whose path is no name is reported and forgotten by --fix."""

from __future__ import annotations

import json
import sqlite3
import subprocess

import pytest

from jam_core.manager import make_plugin_manager
from jam_core.ops.refs import decode
from jam_core.root import Root
from jam_core.stub import read_record
from tests.conftest import make_file
from tests.safety_support import jam, make_tree

SIZE = 100_000


def _checks(cwd, *args) -> tuple[int, list[tuple[str, str, bool]]]:
    res = jam("doctor", "--json", *args, cwd=cwd, check=None)
    out = json.loads(res.out)
    return res.returncode, [(c["kind"], c["path"], c["fixed"]) for c in out["checks"] if c["status"] == "problem"]


def test_doctor_fix_adopts_a_stub_only_once_its_refs_are_written(tmp_path):
    """`mv A/photos B/photos` (stubs of root A into root B, one dir remote). B's remote refuses
    writes to its refs (`chattr +i meta/refs`): `jam doctor --fix` in B reports `refs` for the
    remote and leaves p.bin unknown (not fixed, exit 1), so nothing claims it is B's while no
    refs say so. Writable again, the next `doctor --fix` records it in B's refs and adopts it."""
    from jam_core.ops.remotes import add_remote

    t = make_tree(tmp_path, "A")
    b = tmp_path / "B"
    b.mkdir()
    root_b, _ = Root.init(b)
    add_remote(root_b, make_plugin_manager(), "vault", str(t.remote))
    make_file(t.root / "photos" / "p.bin", SIZE, seed=21)
    make_file(b / "own.bin", SIZE, seed=22)
    jam("stash", "photos", cwd=t.root)
    jam("stash", "own.bin", cwd=b)
    refs = t.remote / "meta" / "refs"
    if subprocess.run(["chattr", "+i", str(refs)], capture_output=True).returncode != 0:
        pytest.skip("chattr does not work here")
    try:
        (t.root / "photos").rename(b / "photos")
        code, problems = _checks(b, "--fix")
    finally:
        subprocess.run(["chattr", "-i", str(refs)], check=True)
    assert code == 1
    assert ("refs", "vault", False) in problems, problems
    assert ("catalog-unknown", "photos/p.bin", False) in problems, problems
    code, problems = _checks(b, "--fix")
    assert ("catalog-unknown", "photos/p.bin", True) in problems and code == 0, problems
    rid = Root(b).own_config()["core"]["id"]
    assert read_record(str(b / "photos" / "p.bin")).oid in decode((refs / rid).read_bytes())[1]


def test_doctor_reports_and_fix_forgets_a_catalog_row_whose_path_is_no_name(tmp_path):
    """SQLite keeps any type in stubs.path: a row whose path is the integer 42 is left out by
    every reader (catalog.py), so only doctor can say it is there: `catalog-stale` (exit 1), and
    `doctor --fix` drops it, even one given a path; the next doctor is clean."""
    t = make_tree(tmp_path)
    make_file(t.root / "a.bin", SIZE, seed=23)
    jam("stash", "a.bin", cwd=t.root)
    db = sqlite3.connect(t.root / ".jam" / "catalog.db")
    with db:
        db.execute("INSERT INTO stubs (path, oid, size, mtime_ns, stashed_at) VALUES (42, ?, 1, 0, 'x')",
                   ("b3:" + "0" * 64,))
    db.close()
    assert _checks(t.root) == (1, [("catalog-stale", "42", False)])
    jam("doctor", "--fix", "a.bin", cwd=t.root)  # (a whole --fix rewrites the table: a named path's, not)
    assert _checks(t.root) == (0, [])
    db = sqlite3.connect(t.root / ".jam" / "catalog.db")
    assert db.execute("SELECT count(*) FROM stubs").fetchone() == (1,)
    db.close()
