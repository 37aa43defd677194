"""Policies end to end: `jam stash --auto`, pins, .jamignore, `jam checkout --related`, bad config."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from jam_core import Nomination, hookimpl
from jam_core.catalog import Catalog
from jam_core.cli import main
from jam_core.manager import make_plugin_manager
from jam_core.policy.plan import plan_auto, related, stash_auto
from jam_core.root import CATALOG, Root
from jam_core.scan import walk
from tests.conftest import make_file

DAY = 86400
SIZE = 100_000  # above the default core.min_size (64 KiB)


def jam(runner, *args, code=0):
    res = runner.invoke(main, list(args), catch_exceptions=False)
    assert code is None or res.exit_code == code, (res.output, res.stderr)
    return res


def add_config(root: Root, text: str) -> None:
    """Append TOML tables (or put bare top-level keys first, where TOML reads them as such)."""
    old = root.config_path.read_text()
    root.config_path.write_text(old + "\n" + text + "\n" if text.startswith("[") else text + "\n" + old)


def aged(root: Root, rel: str, days: float, size: int = SIZE, seed: int = 0) -> Path:
    """A file last used (atime and mtime) ``days`` ago."""
    p = root.path / rel
    make_file(p, size, seed)
    t = time.time() - days * DAY
    os.utime(p, (t, t))
    return p


def states(root: Root) -> dict[str, str]:
    return {e.rel: e.state for e in walk(str(root.path))}


def stubs(root: Root) -> set[str]:
    return {p for p, s in states(root).items() if s == "stub"}


def make_dirty_stub(root: Root, rel: str) -> None:
    """A stub that was written into after stashing (jam must keep it as it is)."""
    from jam_core.ops.stash import stash

    aged(root, rel, 100, seed=99)
    assert not stash(root, [rel], make_plugin_manager()).failed
    p = root.path / rel
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.seek(SIZE - 10)
        f.write(b"my edits!!")
    assert states(root)[rel] == "dirty"


# -- stash --auto ---------------------------------------------------------------------------

def test_stash_auto_age_stashes_exactly_the_old_files(runner, jam_root):
    root = jam_root
    aged(root, "old/a.bin", 40)
    aged(root, "old/b.bin", 31)
    aged(root, "recent/c.bin", 29)
    aged(root, "recent/d.bin", 0)
    aged(root, "old/tiny.txt", 400, size=100)  # under core.min_size
    aged(root, "old/app.log", 400)  # ignored below
    aged(root, "keep/k.bin", 400)  # pinned below
    (root.path / ".jamignore").write_text("*.log\n")
    with Catalog(root.jam_dir / CATALOG) as cat:
        cat.pin(["keep"])
    add_config(root, '[policy.age]\nolder_than = "30d"')

    res = jam(runner, "stash", "--auto", "--dry-run")
    lines = res.output.splitlines()
    planned = [line.split()[2] for line in lines if "age: last used" in line]
    assert planned == ["old/a.bin", "old/b.bin"]
    assert "older than 30d" in lines[0] and "100.0 KB" in lines[0]
    assert "would stash 2 of 4 candidate files, freeing 200.0 KB" in res.output
    assert "1 ignored (.jamignore), 1 pinned" in res.output
    assert stubs(root) == set()  # a dry run changes nothing

    res = jam(runner, "stash", "--auto")
    assert "stashed 2 files" in res.output
    assert stubs(root) == {"old/a.bin", "old/b.bin"}
    res = jam(runner, "stash", "--auto", "--dry-run")  # the plan is now empty
    assert "would stash 0 of 2 candidate files" in res.output


def test_stash_auto_lru_and_budget(runner, jam_root):
    root = jam_root
    for i in range(8):  # f0 the most recently used ... f7 the least
        aged(root, f"f{i}.bin", i + 1, seed=i)
    add_config(root, '[policy.lru]\nkeep = "25%"')
    jam(runner, "stash", "--auto")
    assert stubs(root) == {f"f{i}.bin" for i in range(2, 8)}

    jam(runner, "checkout", ".")
    for i in range(8):  # checkout records a use: age them again
        t = time.time() - (i + 1) * DAY
        os.utime(root.path / f"f{i}.bin", (t, t))
    with Catalog(root.jam_dir / CATALOG) as cat:
        cat.db.execute("DELETE FROM uses")
    root.config_path.write_text(root.config_path.read_text().replace(
        '[policy.lru]\nkeep = "25%"', '[policy.budget]\nmax_local = "700KB"\nlow = "500KB"'))
    res = jam(runner, "stash", "--auto")
    assert "budget: local 800 KB > 700 KB, evicting least recently used down to 500 KB" in res.output
    assert stubs(root) == {"f5.bin", "f6.bin", "f7.bin"}  # 800 KB -> 500 KB, least recent first
    res = jam(runner, "stash", "--auto", "--dry-run")  # 500 KB < 700 KB: no flapping
    assert "would stash 0 of 5" in res.output


def test_last_used_includes_jams_own_record_of_use(runner, jam_root):
    root = jam_root
    aged(root, "a.bin", 100)
    aged(root, "b.bin", 100, seed=1)
    with Catalog(root.jam_dir / CATALOG) as cat:
        cat.record_use(["b.bin"])  # e.g. a checkout or a cd hook visit, just now
    add_config(root, '[policy.age]\nolder_than = "30d"')
    plan = plan_auto(Root(root.path), make_plugin_manager())
    assert [i.path for i in plan.items] == ["a.bin"]


def test_user_config_supplies_default_policies(runner, jam_root, isolated_home):
    cfg = isolated_home / ".config" / "jam"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text('[policy.age]\nolder_than = "1w"\n')
    aged(jam_root, "a.bin", 8)
    aged(jam_root, "b.bin", 6, seed=1)
    jam(runner, "stash", "--auto")
    assert stubs(jam_root) == {"a.bin"}


def test_several_policies_keep_all_reasons(runner, jam_root):
    aged(jam_root, "a.bin", 40)
    aged(jam_root, "b.bin", 1, seed=1)
    add_config(jam_root, '[policy.age]\nolder_than = "30d"\n[policy.lru]\nkeep = "50%"\nby = "count"')
    res = jam(runner, "stash", "--auto", "--dry-run")
    (line,) = [x for x in res.output.splitlines() if "a.bin" in x]
    assert "age: last used" in line and "lru: among the least recently used 50% by count" in line
    assert "b.bin" not in res.output


# -- what no policy may ever have -------------------------------------------------------------

class Hostile:
    """Nominates every file in the tree, offered or not."""

    @hookimpl
    def select(self, root, purpose):
        if purpose != "stash":
            return None
        return [Nomination(e.rel, "hostile", "everything must go") for e in walk(str(root))]


def test_no_policy_gets_pinned_ignored_hardlinked_dirty_or_small_files(jam_root):
    root = jam_root
    aged(root, "free.bin", 1)
    aged(root, "pinned/p.bin", 1, seed=1)
    aged(root, "pinfile.bin", 1, seed=2)
    aged(root, "build/out.o", 1, seed=3)
    aged(root, "hard.bin", 1, seed=4)
    os.link(root.path / "hard.bin", root.path / "hard-link.bin")
    aged(root, "small.txt", 1, size=1000)
    make_dirty_stub(root, "dirty.bin")
    (root.path / ".jamignore").write_text("build/\n")
    with Catalog(root.jam_dir / CATALOG) as cat:
        cat.pin(["pinned", "pinfile.bin"])
    add_config(root, "[policy.hostile]\nall = true")
    pm = make_plugin_manager(extra=(Hostile(),))

    before = states(root)
    plan, result = stash_auto(Root(root.path), pm)
    assert [i.path for i in plan.items] == ["free.bin"]
    refused = {p for p, _ in plan.refused}
    assert {"pinned/p.bin", "pinfile.bin", "build/out.o", "hard.bin", "hard-link.bin", "small.txt",
            "dirty.bin", ".jamignore"} <= refused
    after = states(root)
    assert after.pop("free.bin") == "stub" and before.pop("free.bin") == "local"
    assert after == before  # everything else exactly as it was
    assert result.exit_code == 0


def test_pin_everything_leaves_nothing_to_stash(runner, jam_root):
    aged(jam_root, "a.bin", 100)
    add_config(jam_root, '[policy.age]\nolder_than = "1d"\n[policy.lru]\nkeep = "0%"')
    jam(runner, "pin", ".")
    res = jam(runner, "stash", "--auto")
    assert "0 of 0 candidate files" in res.output and stubs(jam_root) == set()


# -- pins -----------------------------------------------------------------------------------

def test_pin_keeps_files_and_brings_stubs_back(runner, jam_root):
    root = jam_root
    aged(root, "docs/a.bin", 100)
    aged(root, "docs/b.bin", 100, seed=1)
    aged(root, "other.bin", 100, seed=2)
    jam(runner, "stash", "docs/b.bin")
    res = jam(runner, "pin", "docs")
    assert "pinned docs" in res.output and "checked out 1 file" in res.output
    assert stubs(root) == set()  # a pinned stub comes back at once
    assert jam(runner, "pin").output.split() == ["docs"]

    st = json.loads(jam(runner, "status", "--json").output)
    assert st["pins"] == ["docs"] and st["total"]["pinned"] == 2
    assert {d["path"]: d["pinned"] for d in st["directories"]} == {".": 0, "docs": 2}
    assert "2 files pinned by: docs" in jam(runner, "status").output

    add_config(root, '[policy.age]\nolder_than = "30d"')
    jam(runner, "stash", "--auto")
    assert stubs(root) == {"other.bin"}

    res = jam(runner, "unpin", "docs/a.bin", code=1)  # not pinned itself; its directory is
    assert "stays pinned through the pin on docs" in res.stderr
    res = jam(runner, "unpin", "docs")
    assert "unpinned docs" in res.output
    jam(runner, "stash", "--auto")  # docs/b.bin came back with the pin: that was a use
    assert stubs(root) == {"other.bin", "docs/a.bin"}


def test_pin_refuses_missing_path(runner, jam_root):
    res = jam(runner, "pin", "nope", code=2)
    assert res.stderr.strip() == "jam: nope: no such file or directory"


# -- related --------------------------------------------------------------------------------

RELATED_TREE = ["p/a.jpg", "p/b.jpg", "p/a.xmp", "p/c.png", "q/d.jpg"]


def _related_tree(runner, root):
    for i, rel in enumerate(RELATED_TREE):
        aged(root, rel, 1, seed=i)
    jam(runner, "stash", "p", "q")
    assert stubs(root) == set(RELATED_TREE)


def test_checkout_related_fetches_same_dir_extension_and_stem(runner, jam_root):
    _related_tree(runner, jam_root)
    res = jam(runner, "checkout", "--related", "p/a.jpg")
    assert "related: p/b.jpg (related: same extension as p/a.jpg)" in res.output
    assert "related: p/a.xmp (related: same name stem as p/a.jpg)" in res.output
    assert stubs(jam_root) == {"p/c.png", "q/d.jpg"}


def test_related_is_configurable(runner, jam_root):
    _related_tree(runner, jam_root)
    add_config(jam_root, "[related]\nsame_dir = false\nstem = false\nmax_files = 1")
    jam(runner, "checkout", "--related", "p/a.jpg")
    assert len(stubs(jam_root)) == 3  # a.jpg and one other *.jpg, from anywhere


def test_third_party_plugin_adds_its_own_related(runner, jam_root):
    _related_tree(runner, jam_root)

    class Pngs:
        @hookimpl
        def select(self, records, purpose, anchors):
            if purpose == "fetch":
                return [Nomination(r.path, "pngs", "png goes with everything")
                        for r in records if r.path.endswith(".png")]

    items = related(Root(jam_root.path), make_plugin_manager(extra=(Pngs(),)), ["p/a.jpg"])
    assert {i.path: [p for p, _ in i.reasons] for i in items} == {
        "p/b.jpg": ["related"], "p/a.xmp": ["related"], "p/c.png": ["pngs"]}


# -- mistakes -------------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ('[policy.age]\nolder_than = "30"', "policy.age.older_than: expected a duration like 10m"),
    ('[policy.age]\nolder_than = 30', "policy.age.older_than: expected a duration"),
    ("[policy.age]\nolder = '3d'", "policy.age: unknown setting 'older'"),
    ('[policy.lru]\nkeep = "25"', "policy.lru.keep: expected a percentage"),
    ('[policy.lru]\nkeep = "25%"\nby = "size"', "policy.lru.by"),
    ('[policy.budget]\nmax_local = "20 gigs"', "policy.budget.max_local: expected a size"),
    ('[policy.budget]\nmax_local = "20GB"\nlow = "30GB"', "must not be above max_local"),
    ('policy = "lru"', "policy: expected a table"),
    ('[policy]\nuse_atime = "no"\n[policy.lru]\nkeep = "5%"', "policy.use_atime: expected true or false"),
])
def test_bad_config_is_one_line_and_exit_2(runner, jam_root, config, message):
    aged(jam_root, "a.bin", 100)
    add_config(jam_root, config)
    for args in (["stash", "--auto", "--dry-run"], ["stash", "--auto"]):
        res = jam(runner, *args, code=2)
        assert "Traceback" not in res.output + res.stderr
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("jam: ") and message in lines[0], res.stderr
    assert stubs(jam_root) == set()


@pytest.mark.parametrize("args, message", [
    (["stash", "--auto", "--dry-run"], "no policy is configured"),
    (["stash", "--dry-run", "x"], "--dry-run goes with --auto"),
    (["stash", "--auto", "x"], "takes no paths"),
])
def test_usage_mistakes(runner, jam_root, args, message):
    res = jam(runner, *args, code=2)
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_bad_related_config(runner, jam_root):
    aged(jam_root, "a.bin", 1)
    add_config(jam_root, "[related]\nmax_files = -1")
    res = jam(runner, "checkout", "--related", "a.bin", code=2)
    assert res.stderr.strip() == "jam: related.max_files: expected a whole number >= 0, got -1"


def test_cli_in_a_subprocess_with_an_isolated_home(jam_bin, jam_root):
    """The real console script, as a user runs it (env from the isolated_home fixture)."""
    import subprocess

    aged(jam_root, "old.bin", 60)
    aged(jam_root, "new.bin", 0, seed=1)
    add_config(jam_root, '[policy.age]\nolder_than = "30d"')
    out = subprocess.run([jam_bin, "stash", "--auto"], cwd=jam_root.path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert stubs(jam_root) == {"old.bin"}


def test_pin_landing_between_plan_and_stash_is_respected(jam_root):
    """stash_auto plans without the lock; a pin made before the stash takes it still holds."""
    from jam_core.catalog import Catalog
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.stash import stash
    from tests.conftest import make_file

    data = make_file(jam_root.path / "keep" / "a.bin", 100_000)
    with Catalog(jam_root.jam_dir / "catalog.db") as cat:
        cat.pin(["keep"])
    res = stash(jam_root, ["keep/a.bin"], make_plugin_manager(), explicit=False)
    assert res.done == [] and res.skipped == [("keep/a.bin", "pinned")]
    assert (jam_root.path / "keep/a.bin").read_bytes() == data


# -- every policy converges: a second run right after the first stashes nothing new ----------

CONVERGE = {
    "age": '[policy.age]\nolder_than = "132h"',  # 5.5 days
    "lru-count": '[policy.lru]\nkeep = "25%"\nby = "count"',
    "lru-bytes": '[policy.lru]\nkeep = "25%"\nby = "bytes"',
    "lru-percent": '[policy.lru]\nkeep = "40%"',
    "budget": '[policy.budget]\nmax_local = "700KB"\nlow = "500KB"',
    "all": '[policy.age]\nolder_than = "252h"\n[policy.lru]\nkeep = "50%"\nby = "count"\n'
           '[policy.budget]\nmax_local = "900KB"\nlow = "800KB"',
}
CONVERGED_LOCAL = {"age": 5, "lru-count": 3, "lru-bytes": 3, "lru-percent": 5, "budget": 5, "all": 6}


@pytest.mark.parametrize("name", sorted(CONVERGE))
def test_stash_auto_twice_stashes_nothing_new(runner, jam_root, name):
    root = jam_root
    for i in range(12):  # f00 used a day ago ... f11 twelve days ago, 100 KB each
        aged(root, f"f{i:02}.bin", i + 1, seed=i)
    add_config(root, CONVERGE[name])
    jam(runner, "stash", "--auto")
    first = stubs(root)
    local = 12 - len(first)
    assert local == CONVERGED_LOCAL[name]
    assert first == {f"f{i:02}.bin" for i in range(local, 12)}  # the least recently used went
    res = jam(runner, "stash", "--auto")
    assert f"stashing 0 of {local} candidate file" in res.output
    assert stubs(root) == first
    res = jam(runner, "stash", "--auto", "--dry-run")
    assert f"would stash 0 of {local} candidate file" in res.output


# -- pins live in ROOT/.jam/pins, which a rebuilt catalog does not forget --------------------

def _drop_catalog(root: Root) -> None:
    for suffix in ("", "-wal", "-shm"):
        (root.jam_dir / (CATALOG + suffix)).unlink(missing_ok=True)


def test_pins_survive_a_rebuilt_catalog_and_still_hold(runner, jam_root):
    root = jam_root
    aged(root, "keep/a.bin", 100)
    aged(root, "old.bin", 100, seed=1)
    jam(runner, "pin", "keep")
    _drop_catalog(root)  # lost, or rebuilt by doctor --fix: it has no pins table rows now
    assert jam(runner, "pin").output.split() == ["keep"]
    add_config(root, '[policy.age]\nolder_than = "30d"')
    res = jam(runner, "stash", "--auto")
    assert "1 pinned" in res.output
    assert stubs(root) == {"old.bin"}
    jam(runner, "unpin", "keep")
    _drop_catalog(root)
    assert jam(runner, "pin").output.strip() == "no pins"
    jam(runner, "stash", "--auto", code=1)  # a lost catalog of a root with stubs: refused until doctor --fix
    jam(runner, "doctor", "--fix", code=None)
    jam(runner, "stash", "--auto")
    assert stubs(root) == {"old.bin", "keep/a.bin"}


def test_pins_in_the_catalog_move_to_the_pins_file(runner, jam_root):
    root = jam_root
    aged(root, "keep/a.bin", 100)
    with Catalog(root.jam_dir / CATALOG) as cat:  # as an older jam left them
        cat.pin(["keep", "../outside", ".jam/config.toml"])
    assert not (root.jam_dir / "pins").exists()
    assert jam(runner, "pin").output.split() == ["keep"]  # hostile rows are not pins
    assert '"keep"' in (root.jam_dir / "pins").read_text().splitlines()
    _drop_catalog(root)
    add_config(root, '[policy.age]\nolder_than = "30d"')
    jam(runner, "stash", "--auto")
    assert stubs(root) == set()


def test_any_file_name_survives_the_pins_file(runner, jam_root):
    from jam_core.policy.pins import read_pins

    root = jam_root
    odd = ["new\nline", os.fsdecode(b"caf\xe9"), "tab\there", "quote\"s and \\ back", "ünï"]
    for i, name in enumerate(odd):
        aged(root, f"{name}/a.bin", 100, seed=i)
    res = runner.invoke(main, ["pin", *odd], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    raw = (root.jam_dir / "pins").read_bytes()
    assert raw.isascii() and raw.count(b"\n") == len(odd) + 1  # a header and one line per pin
    _drop_catalog(root)
    assert read_pins(Root(root.path)) == set(odd)
    add_config(root, '[policy.age]\nolder_than = "30d"')
    jam(runner, "stash", "--auto")
    assert stubs(root) == set()


@pytest.mark.parametrize("line, why", [
    ('"../etc"', "'..' component"),
    ('"/etc"', "absolute path"),
    ('".jam/config.toml"', ".jam"),
    ('"a//b"', "not a normalised path"),
    ('"a\\u0000b"', "NUL"),
    ("not json", "not a JSON string"),
    ("42", "not a path"),
])
def test_a_hostile_pins_file_is_refused_not_half_read(runner, jam_root, line, why):
    root = jam_root
    aged(root, "a.bin", 100)
    (root.jam_dir / "pins").write_text(f'# jam pins\n"a.bin"\n{line}\n')
    add_config(root, '[policy.age]\nolder_than = "30d"')
    res = jam(runner, "stash", "--auto", code=2)
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "pins, line 3: not a valid pin" in res.stderr and why in res.stderr
    assert stubs(root) == set()  # nothing stashed on a guess


def test_pins_file_that_is_a_symlink_or_fifo_is_refused(runner, jam_root, tmp_path):
    root = jam_root
    aged(root, "a.bin", 100)
    outside = tmp_path / "outside"
    outside.write_text('"a.bin"\n')
    (root.jam_dir / "pins").symlink_to(outside)
    res = jam(runner, "pin", "a.bin", code=2)
    assert "cannot read the pins" in res.stderr and res.stderr.count("\n") == 1
    assert outside.read_text() == '"a.bin"\n' and (root.jam_dir / "pins").is_symlink()
    (root.jam_dir / "pins").unlink()
    os.mkfifo(root.jam_dir / "pins")  # would block a plain open() forever
    res = jam(runner, "pin", code=2)
    assert "not a regular file" in res.stderr


def test_pins_file_is_replaced_atomically(runner, jam_root, monkeypatch):
    """A rewrite that fails before its rename leaves the old pins whole and no temporary."""
    import jam_core.policy.pins

    root = jam_root
    aged(root, "a.bin", 100)
    aged(root, "b.bin", 100, seed=1)
    jam(runner, "pin", "a.bin")
    before = (root.jam_dir / "pins").read_bytes()

    def no_rename(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(jam_core.policy.pins.os, "rename", no_rename)
    res = jam(runner, "pin", "b.bin", code=1)
    assert "no space left on the local disk" in res.stderr
    monkeypatch.undo()
    assert (root.jam_dir / "pins").read_bytes() == before
    assert sorted(p.name for p in root.jam_dir.iterdir() if "pins" in p.name) == ["pins"]
