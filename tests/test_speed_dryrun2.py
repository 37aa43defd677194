"""The dry-run's speed work, part two (issue 13): nothing a user can see changes.

The console script leaves a finished dry-run with ``os._exit`` (no teardown of the plan's
objects): its output, to a file or a pipe, is still complete, the catalog is intact, and
``main(args=...)`` callers keep their process.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

OLD = 1_000_000_000  # 2001: older than any policy's threshold

SITE = """import atexit, os
_marker = os.environ.get("JAM_TEST_ATEXIT")
if _marker:
    atexit.register(lambda: open(_marker, "a").write("teardown\\n"))
"""


def _old_files(root, n: int, per_dir: int = 50) -> None:
    for i in range(n):
        p = root.path / f"d{i // per_dir:03d}" / f"f{i:05d}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x" * (1 + i % 300))
        os.utime(p, (OLD, OLD))


def _age_root(root) -> None:
    root.update_config(lambda c: c.setdefault("policy", {}).__setitem__("age", {"older_than": "30d"}))
    root.update_config(lambda c: c.setdefault("core", {}).__setitem__("min_size", "1"))


def _env(tmp_path: Path, marker: Path) -> dict:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    env = dict(os.environ, JAM_TEST_ATEXIT=str(marker))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return env


def _catalog_ok(root) -> None:
    con = sqlite3.connect(root.jam_dir / "catalog.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        con.close()


@pytest.mark.parametrize("files", [300, 6_000])  # 6,000: the walk is shared with a helper process
def test_a_dry_run_leaves_without_teardown_and_its_output_is_whole(jam_bin, jam_root, runner, tmp_path, files):
    """``jam stash --auto --dry-run`` written to a file and to a pipe is the same, complete
    plan the in-process command prints; the interpreter's teardown did not run (an atexit
    handler planted through sitecustomize never fires), while ``jam remote list`` still ends the
    usual way; the catalog is intact afterwards."""
    from jam_core.cli import main

    _age_root(jam_root)
    _old_files(jam_root, files)
    expected = runner.invoke(main, ["stash", "--auto", "--dry-run"])
    assert expected.exit_code == 0, expected.output
    assert expected.output.count("\n") == files + 1  # a line per file and the summary
    marker = tmp_path / "atexit.txt"
    env = _env(tmp_path, marker)

    out = tmp_path / "plan.txt"
    with open(out, "wb") as f:
        done = subprocess.run([jam_bin, "stash", "--auto", "--dry-run"], stdout=f, stderr=subprocess.PIPE,
                              env=env, cwd=jam_root.path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == expected.output, "the plan written to a file differs"
    piped = subprocess.run([jam_bin, "stash", "--auto", "--dry-run"], capture_output=True, text=True,
                           env=env, cwd=jam_root.path, timeout=120)
    assert piped.returncode == 0 and piped.stderr == ""
    assert piped.stdout == expected.output, "the plan written to a pipe differs"
    assert not marker.exists(), "the finished dry-run went through the interpreter's teardown"

    listed = subprocess.run([jam_bin, "remote", "list"], capture_output=True, text=True, env=env, cwd=jam_root.path,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert marker.read_text() == "teardown\n"  # (the planted handler does fire where jam ends the usual way)
    _catalog_ok(jam_root)


def test_a_closed_pipe_still_ends_quietly(jam_bin, jam_root, tmp_path):
    """A reader that stops early (``| head -1``): the dry-run ends as before, no traceback,
    nothing on stderr but what jam says (or nothing)."""
    _age_root(jam_root)
    _old_files(jam_root, 3_000)
    proc = subprocess.Popen([jam_bin, "stash", "--auto", "--dry-run"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=jam_root.path)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert first.strip().endswith(b")")
    assert "Traceback" not in err and "Exception ignored" not in err
    assert proc.returncode in (0, 141)
    _catalog_ok(jam_root)


def test_callers_of_main_keep_their_process(jam_root, runner):
    """In-process (CliRunner, ``main(args=...)``) a finished dry-run returns: nothing is kept
    or frozen, the process goes on."""
    import gc

    from jam_core import cli

    _age_root(jam_root)
    _old_files(jam_root, 20)
    frozen = gc.get_freeze_count()
    result = runner.invoke(cli.main, ["stash", "--auto", "--dry-run"])
    assert result.exit_code == 0 and "would stash 20 of 20" in result.output
    assert cli._KEPT == () and not cli._DONE and gc.get_freeze_count() == frozen
    assert sys.modules["jam_core.cli"] is cli


def _with_stubs(root, runner, n: int = 4) -> list[str]:
    from jam_core.cli import main

    names = []
    root.update_config(lambda c: c.setdefault("core", {}).__setitem__("min_size", "1"))
    for i in range(n):
        p = root.path / "s" / f"stub{i}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(os.urandom(100_000 + i))
        os.utime(p, (OLD, OLD))
        names.append(f"s/stub{i}.bin")
    res = runner.invoke(main, ["stash", "s"])
    assert res.exit_code == 0, res.output
    assert all(os.stat(root.path / n).st_blocks * 512 < 100_000 for n in names), res.output
    return names


@pytest.mark.parametrize("policy, made", [("age", False), ("lru", True)])
def test_a_stubs_record_is_made_only_for_a_policy_that_reads_them(jam_root, runner, monkeypatch, policy, made):
    """The scan holds the clean stubs as lists: the age policy (which never reads
    ``records.stubs``) costs no FileRecord per stub; lru (whose share counts them) is
    offered every one, by path, and its plan is what it was."""
    from jam_core.cli import main
    from jam_core.policy import records

    stubs = _with_stubs(jam_root, runner)
    _old_files(jam_root, 8)
    table = {"older_than": "30d"} if policy == "age" else {"keep": "50%", "by": "count"}
    jam_root.update_config(lambda c: c.setdefault("policy", {}).__setitem__(policy, table))
    jam_root.update_config(lambda c: c.setdefault("core", {}).__setitem__("min_size", "1"))
    made_for = []
    real = records.Stubs.record
    monkeypatch.setattr(records.Stubs, "record", lambda self, i: made_for.append(self.paths[i]) or real(self, i))
    res = runner.invoke(main, ["stash", "--auto", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert sorted(made_for) == (stubs if made else [])
    # lru: 8 candidates and 4 stubs by count, keep 50% = 6 kept, so the 6 least recent candidates
    # go (all equally old: one group stays whole, so none is nominated); age: all 8.
    assert res.output.count("would stash") == 1
    if policy == "age":
        assert "would stash 8 of 8" in res.output


@pytest.mark.parametrize("seed", range(3))
def test_the_plan_merged_on_the_lists_is_the_general_merge(seed):
    """Nominations naming each candidate once are merged on the candidates' lists (C passes,
    named tuples built from the lists): the same items, in path order, as the general merge
    over records; a path named twice, or named but not a candidate, goes the general way
    (every reason kept, the stranger refused)."""
    import random

    from jam_core.model import FileRecord, Nomination
    from jam_core.policy import plan
    from jam_core.policy.records import Candidates

    rng = random.Random(seed)
    recs = [FileRecord(f"d{rng.randrange(9)}/f{i:04d}-{rng.random():.6f}", rng.randrange(1, 10**6), 1.0 * i,
                       2.0 * i, rng.random() * 1e9) for i in range(400)]
    by_path = {r.path: r for r in recs}
    cands = Candidates(recs)
    chosen = rng.sample(recs, 150)
    once = [Nomination(r.path, "age", f"reason {rng.randrange(3)}") for r in chosen]
    fast = plan.merge(once, cands, [])
    assert fast == plan.merge(once, by_path, []) and [i.path for i in fast] == sorted(r.path for r in chosen)
    assert all(isinstance(i, plan.PlanItem) and i.reasons == [("age", i.reasons[0][1])] for i in fast)
    twice = once + [Nomination(chosen[0].path, "lru", "also"), Nomination("not/a/candidate", "lru", "x")]
    refused_fast, refused_general = [], []
    assert plan.merge(twice, cands, refused_fast) == plan.merge(twice, by_path, refused_general)
    assert refused_fast == refused_general == [("not/a/candidate", "lru")]
    assert plan._merge_once(once, cands, None) is not None and plan._merge_once(twice, cands, None) is None
