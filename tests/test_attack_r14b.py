"""R14, continued (a second file: tests/test_attack_r14.py is being edited as its fixes land).
An attacker's review of `jam doctor`; each test breaks one thing on real files and processes.
A test marked xfail(strict=True) is a hole found (its fix is in R14's report)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import pytest

from tests.conftest import make_file
from tests.safety_support import jam, record
from tests.test_attack_r14 import SIZE, _obj, nobody_tree  # noqa: F401  (nobody_tree: the fixture)


def test_a_directory_that_can_be_listed_but_not_entered_is_never_all_well(nobody_tree):
    """`locked/g.bin` is a stub whose object the remote lost; the user (not root) made `locked`
    mode 644 (a common slip: `chmod -R 644 photos`): its names can be read, but no file in it
    can be stat'ed, so the walk's lstat fails with EACCES, as for a file that vanished. doctor
    cannot see g.bin, so it cannot prove it comes back: exit 1 naming the directory, before and
    after `--fix` (which must not forget g.bin's row).
    Guard (mutation-checked): ops/doctor._Doctor.hidden's ``os.stat`` of the row's own name
    (EACCES: listed, not searchable: the directory is `unseen`, the row kept)."""
    t, env, as_nobody = nobody_tree
    make_file(t.root / "f.bin", SIZE, seed=1)
    make_file(t.root / "locked" / "g.bin", SIZE, seed=2)
    jam("stash", "f.bin", "locked/g.bin", cwd=t.root, env=env)
    _obj(t.remote, record(t.root / "locked" / "g.bin").oid).unlink()  # g cannot come back
    as_nobody("doctor", check=1)  # the missing object is seen while the directory is searchable
    os.chmod(t.root / "locked", 0o644)
    first = as_nobody("doctor", "--json", check=1)
    assert any("locked" in c["path"] and c["status"] == "problem" and "no longer there" not in c["detail"]
               for c in json.loads(first.stdout)["checks"]), first.stdout
    as_nobody("doctor", "--fix", check=1)
    again = as_nobody("doctor", check=1)
    assert "all can come back" not in again.stdout, again.stdout


def test_an_unknown_stub_in_a_directory_listed_but_not_searchable_is_never_all_well(nobody_tree):
    """As above, but the catalog does not know `locked/g.bin` (copied in with `cp -a`, restored
    from a backup, a catalog rebuilt): no row makes doctor look again, so the only trace is the
    walk's own failed lstat (scan.py ``_scan_from``: ``except OSError: continue  # vanished``).
    A name that is listed but cannot be stat'ed is not a file that vanished: doctor must name
    the directory (`unseen`) and exit 1, never answer "all can come back".
    Guard (mutation-checked): ops/doctor._Doctor.look (the walk's tidy hook, called for every
    directory): the first entry's lstat failing with anything but ENOENT makes the directory `unseen`."""
    t, env, as_nobody = nobody_tree
    make_file(t.root / "locked" / "g.bin", SIZE, seed=3)
    jam("stash", "locked/g.bin", cwd=t.root, env=env)
    _obj(t.remote, record(t.root / "locked" / "g.bin").oid).unlink()  # g cannot come back
    db = sqlite3.connect(t.root / ".jam" / "catalog.db")
    db.execute("DELETE FROM stubs")
    db.commit()
    db.close()
    shutil.rmtree(t.root / ".jam" / "stubdirs", ignore_errors=True)  # the cd hook's index follows the catalog
    seen = as_nobody("doctor", "--json", check=1)  # while `locked` is searchable: found, and its object missing
    assert ("missing", "locked/g.bin") in {(c["kind"], c["path"]) for c in json.loads(seen.stdout)["problems"]}
    os.chmod(t.root / "locked", 0o644)
    res = as_nobody("doctor", check=1)
    assert "all can come back" not in res.stdout, res.stdout


def test_status_names_a_directory_it_can_list_but_not_enter(nobody_tree):
    """`jam status` in a root whose `locked` (mode 644) holds a stub: the walk lists its names
    but cannot stat one. Status must say it could not look there (a line on stderr naming
    `locked`), not count it as empty and say nothing.
    Guard (mutation-checked): scan._scan_from reports a directory whose entries fail to stat
    with anything but ENOENT (``unsearchable``) through on_error."""
    t, env, as_nobody = nobody_tree
    make_file(t.root / "locked" / "g.bin", SIZE, seed=4)
    jam("stash", "locked/g.bin", cwd=t.root, env=env)
    os.chmod(t.root / "locked", 0o644)
    res = as_nobody("status", check=0)
    assert "locked" in res.stderr, (res.returncode, res.stdout, res.stderr)
