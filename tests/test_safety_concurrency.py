"""One writer (invariant 8): jam processes working on one root at the same time serialise
their changes and neither loses work."""

from __future__ import annotations

import json
import os
import subprocess

from tests.conftest import make_file
from tests.safety_support import JAM, b3, is_stub, jam, make_tree, objects_verify, record, status_json


def _start_together(argvs, cwd):
    """Start processes that block on one pipe, then release them at once (no sleeps)."""
    r, w = os.pipe()
    procs = []
    for argv in argvs:
        # each waits for the go byte on stdin before exec'ing jam
        procs.append(subprocess.Popen(["sh", "-c", 'read go; exec "$0" "$@"', *argv], cwd=cwd, stdin=r,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    os.close(r)
    os.write(w, b"go\n" * len(procs))
    os.close(w)
    out = []
    for p in procs:
        o, e = p.communicate(timeout=300)
        out.append((p.returncode, o.decode(errors="replace"), e.decode(errors="replace")))
    return out


def test_two_processes_stashing_the_same_tree(tmp_path):
    t = make_tree(tmp_path)
    digests = {}
    for d in range(4):
        for i in range(15):
            p = t.root / f"d{d}" / f"f{i}"
            make_file(p, 70_000 + 1000 * i, seed=d * 100 + i)
            digests[p] = b3(p)
    make_file(t.root / "d0" / "dup", 70_000, seed=0)  # the same content as d0/f0: one object
    digests[t.root / "d0" / "dup"] = b3(t.root / "d0" / "dup")

    results = _start_together([[JAM, "stash", "."], [JAM, "stash", "d0", "d2", "d1", "d3"]], t.root)
    for code, out, err in results:
        assert code == 0, (out, err)
        assert "Traceback" not in err and "failed" not in err, err
    for p, h in digests.items():
        if is_stub(p):
            assert record(p).oid == "b3:" + h and os.lstat(p).st_size == record(p).size
        else:
            assert b3(p) == h
    assert all(is_stub(p) for p in digests)  # each process saw the other's stubs as done
    objects_verify(t.remote)

    res = jam("doctor", "--json", cwd=t.root)
    assert json.loads(res.out)["stubs"] == len(digests)
    jam("doctor", "--fix", cwd=t.root)  # rebuilding the catalog from the scan changes nothing
    st = status_json(t.root)["total"]
    assert (st["stubs"], st["local"], st["dirty"], st["bad"]) == (len(digests), 0, 0, 0)

    # and both directions at once: a checkout racing a stash of the same files
    results = _start_together([[JAM, "checkout", "d0", "d1"], [JAM, "stash", "d1", "d0"]], t.root)
    for code, out, err in results:
        assert code == 0 and "Traceback" not in err, (out, err)
    for p, h in digests.items():
        if is_stub(p):
            assert record(p).oid == "b3:" + h
        else:
            assert b3(p) == h
    jam("doctor", "--deep", cwd=t.root)
    jam("checkout", ".", cwd=t.root)
    assert {p: b3(p) for p in digests} == digests


def test_catalog_survives_two_writers(tmp_path):
    """Both processes record what they did: the catalog lists every stub, once."""
    import sqlite3

    t = make_tree(tmp_path)
    for i in range(20):
        make_file(t.root / f"a{i}", 66_000, seed=500 + i)
        make_file(t.root / f"b{i}", 66_000, seed=600 + i)
    results = _start_together([[JAM, "stash", *[f"a{i}" for i in range(20)]],
                               [JAM, "stash", *[f"b{i}" for i in range(20)]]], t.root)
    assert all(code == 0 for code, _, _ in results), results
    db = sqlite3.connect(t.root / ".jam" / "catalog.db")
    paths = sorted(os.fsdecode(p) for (p,) in db.execute("SELECT path FROM stubs"))
    db.close()
    assert paths == sorted([f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20)])
