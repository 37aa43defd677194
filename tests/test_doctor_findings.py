"""`jam doctor` (issue 10): one test per finding. Each breaks exactly that thing on real files
(real xattrs, the real `jam`), checks doctor reports it with exit 1, that `--fix` repairs what
is safe, and that a second run is clean."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tomllib

import pytest

from jam_core.fs import TMP_MARK, part_name, tmp_name
from jam_core.objects import object_relpath
from tests.conftest import REPO, make_file
from tests.safety_support import jam, make_tree, record

SIZE = 200_000


def doctor(t, *args, check):
    return json.loads(jam("doctor", "--json", *args, cwd=t.root, check=check).out)


def kinds(out, status="problem"):
    return [(c["kind"], c["path"], c["fixed"]) for c in out["checks"] if c["status"] == status]


def clean(t):
    out = doctor(t, check=0)
    assert out["ok"] and out["problems"] == [], out["problems"]
    return out


@pytest.fixture
def stashed(tmp_path):
    t = make_tree(tmp_path)
    data = make_file(t.root / "a.bin", SIZE, seed=1)
    jam("stash", "a.bin", cwd=t.root)
    assert record(t.root / "a.bin") is not None
    return t, data


def _obj(t, name="a.bin"):
    return t.objects / object_relpath(record(t.root / name).oid)


# -- the catalog against the tree ----------------------------------------------------------------
def test_removed_catalog_row_is_reported_and_restored(stashed):
    t, _ = stashed
    db = sqlite3.connect(t.root / ".jam" / "catalog.db")
    db.execute("DELETE FROM stubs")
    db.commit()
    db.close()
    out = doctor(t, check=1)
    assert ("catalog-unknown", "a.bin", False) in kinds(out)
    out = doctor(t, "--fix", check=0)
    assert ("catalog-unknown", "a.bin", True) in kinds(out)
    clean(t)


def test_catalog_row_without_stub_is_reported_and_forgotten(stashed):
    t, _ = stashed
    make_file(t.root / "b.bin", SIZE, seed=2)
    jam("stash", "b.bin", cwd=t.root)
    os.chmod(t.root / "b.bin", 0o644)
    os.unlink(t.root / "b.bin")
    out = doctor(t, check=1)
    assert kinds(out) == [("catalog-stale", "b.bin", False)]
    assert kinds(doctor(t, "--fix", check=0)) == [("catalog-stale", "b.bin", True)]
    clean(t)


# -- leftovers in the tree and on the remote -----------------------------------------------------
def test_jam_temporary_file_is_removed_and_a_users_is_not(stashed):
    t, _ = stashed
    ours = t.root / tmp_name()
    ours.write_bytes(b"half a fetch")
    os.setxattr(ours, TMP_MARK, b"1")  # what jam puts on content it writes aside
    theirs = t.root / tmp_name()
    theirs.write_bytes(b"a user's file that happens to have jam's name")
    out = doctor(t, check=1)
    assert kinds(out) == [("leftover", ours.name, False)]
    assert kinds(out, "warning")[-1] == ("foreign-tmp", theirs.name, False)
    assert ours.exists()  # reported, not removed, without --fix
    out = doctor(t, "--fix", check=0)
    assert kinds(out) == [("leftover", ours.name, True)]
    assert not ours.exists() and theirs.read_bytes().startswith(b"a user's file")
    out = clean(t)
    assert ("foreign-tmp", theirs.name, False) in kinds(out, "warning")


def test_stale_upload_on_the_remote_is_removed(stashed):
    t, _ = stashed
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    host, _, rand, suffix = part_name().split(".")
    stale = t.remote / "tmp" / ".".join([host, str(dead.pid), rand, suffix])
    alive = t.remote / "tmp" / ".".join([host, str(os.getpid()), "0123456789abcdef", suffix])
    for p in (stale, alive):
        p.write_bytes(b"half an upload")
    out = doctor(t, check=1)
    assert kinds(out) == [("remote-leftover", f"vault:tmp/{stale.name}", False)]
    assert stale.exists()
    assert kinds(doctor(t, "--fix", check=0)) == [("remote-leftover", f"vault:tmp/{stale.name}", True)]
    assert not stale.exists() and alive.exists()  # an upload of a living jam is never touched
    clean(t)


def test_unused_object_is_a_warning_and_never_deleted(stashed):
    t, data = stashed
    obj = _obj(t)
    jam("checkout", "a.bin", cwd=t.root)
    out = doctor(t, "--fix", check=0)
    assert kinds(out, "warning")[-1][0] == "unused" and "1 object (" in out["warnings"][-1]["detail"]
    assert obj.exists()


def test_what_a_snapshot_keeps_is_not_unused(stashed):
    """`jam commit` uploads a local file and its snapshot: both are kept by the history (gc keeps
    them), so doctor must not call them unused; an object nothing keeps still is."""
    t, data = stashed
    (t.root / "local.txt").write_text("kept only by the snapshot\n")
    jam("commit", "-m", "one", cwd=t.root)
    out = doctor(t, check=0)
    assert [k for k in kinds(out, "warning") if k[0] == "unused"] == [], out["warnings"]
    (t.root / "later.bin").write_bytes(os.urandom(SIZE))  # stashed after the commit, then deleted
    jam("stash", "later.bin", cwd=t.root)
    jam("checkout", "later.bin", cwd=t.root)
    (t.root / "later.bin").unlink()
    out = doctor(t, check=0)
    assert [w["detail"].split(" on remote")[0] for w in out["warnings"] if w["kind"] == "unused"] == \
        ["1 object (200.0 KB)"], out["warnings"]


# -- objects on remotes ----------------------------------------------------------------------------
def test_missing_object_is_stored_again_from_a_local_copy(stashed):
    t, data = stashed
    _obj(t).unlink()
    out = doctor(t, check=1)
    assert kinds(out) == [("missing", "a.bin", False)]
    assert kinds(doctor(t, "--fix", check=1)) == [("missing", "a.bin", False)]  # no local copy: nothing to do
    (t.root / "copy.bin").write_bytes(data)  # the same content, kept locally under another name
    (t.root / "other.bin").write_bytes(bytes(SIZE))  # same size, other content: hashed, not used
    out = doctor(t, "--fix", check=0)
    assert kinds(out) == [("missing", "a.bin", True)]
    assert "stored again" in out["problems"][0]["detail"]
    clean(t)
    jam("checkout", "a.bin", cwd=t.root)
    assert (t.root / "a.bin").read_bytes() == data


def test_object_of_the_wrong_size_is_missing(stashed):
    t, _ = stashed
    obj = _obj(t)
    os.chmod(obj, 0o644)
    os.truncate(obj, 1000)
    out = doctor(t, check=1)
    assert kinds(out) == [("missing", "a.bin", False)] and "wrong size" in out["problems"][0]["detail"]


def test_corrupt_object_is_found_by_deep_only(stashed):
    t, _ = stashed
    obj = _obj(t)
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))
    clean(t)  # the name and size are right: only reading it back tells
    out = doctor(t, "--deep", check=1)
    assert [k[:2] for k in kinds(out)] == [("corrupt", "a.bin"), ("missing", "a.bin")]


def test_fewer_copies_than_configured(stashed):
    t, _ = stashed
    cfg = t.root / ".jam" / "config.toml"
    cfg.write_text(cfg.read_text() + "\n[place]\ncopies = 2\n")
    out = doctor(t, check=1)
    assert kinds(out) == [("copies", "a.bin", False)] and "1 of the 2 copies" in out["problems"][0]["detail"]
    cfg.write_text(cfg.read_text().replace("copies = 2", "copies = 1"))
    clean(t)


# -- the set-up ------------------------------------------------------------------------------------
def test_remote_marker_removed_is_an_identity_problem_never_recreated(stashed):
    t, _ = stashed
    marker = t.remote / "jam-remote.json"
    saved = marker.read_bytes()
    marker.unlink()
    out = doctor(t, check=1)
    assert ("identity", "vault", False) in kinds(out) and "unplugged" in out["problems"][0]["detail"]
    doctor(t, "--fix", check=1)
    assert not marker.exists()  # the marker says which drive this is: never made up
    marker.write_bytes(saved)
    clean(t)


def test_remote_added_by_an_older_jam_gets_an_identity(stashed):
    t, _ = stashed
    cfg = t.root / ".jam" / "config.toml"
    (t.remote / "jam-remote.json").unlink()
    cfg.write_text("\n".join(line for line in cfg.read_text().splitlines() if not line.startswith("id =")))
    assert ("identity", "vault", False) in kinds(doctor(t, check=1))
    assert ("identity", "vault", True) in kinds(doctor(t, "--fix", check=0))
    assert (t.remote / "jam-remote.json").exists()
    assert tomllib.loads(cfg.read_text())["remote"]["vault"]["id"]
    clean(t)


def test_unplugged_remote(stashed):
    t, _ = stashed
    t.remote.rename(t.remote.with_name("elsewhere"))
    out = doctor(t, "--fix", check=1)
    assert {k[0] for k in kinds(out)} == {"unreachable", "missing"}
    assert not t.remote.exists()
    t.remote.with_name("elsewhere").rename(t.remote)
    clean(t)


def test_hook_index_out_of_step_is_refreshed(stashed):
    t, _ = stashed
    import shutil

    shutil.rmtree(t.root / ".jam" / "stubdirs")
    out = doctor(t, check=1)
    assert kinds(out) == [("hook-index", ".jam/stubdirs", False)]
    assert kinds(doctor(t, "--fix", check=0)) == [("hook-index", ".jam/stubdirs", True)]
    assert os.stat(t.root / ".jam" / "stubdirs").st_mode & 0o1000
    clean(t)


def test_shell_hook_in_an_rc_file(stashed, isolated_home):
    t, _ = stashed
    env = dict(os.environ, HOME=str(isolated_home), SHELL="/bin/zsh")
    res = jam("doctor", "--json", cwd=t.root, env=env)
    warn = [w for w in json.loads(res.out)["warnings"] if w["kind"] == "shell-hook"]
    assert warn and "~/.zshrc" in warn[0]["detail"]
    (isolated_home / ".zshrc").write_text('eval "$(jam hook zsh)"\n')
    res = jam("doctor", "--json", cwd=t.root, env=env)
    assert [c["status"] for c in json.loads(res.out)["checks"] if c["kind"] == "shell-hook"] == ["ok"]


def test_filesystem_without_user_xattrs(stashed, monkeypatch):
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops import doctor as mod
    from jam_core.root import Root

    t, _ = stashed

    def refuse(fd, name, value):
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr(mod, "_setxattr", refuse)
    with Session() as s:
        res = mod.doctor(Root(t.root), ".", make_plugin_manager(), s)
    assert [(p.kind, p.section) for p in res.unfixed] == [("filesystem", "setup")]
    assert res.exit_code == 1


def test_broken_plugin_is_named(stashed):
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops.doctor import doctor as run
    from jam_core.root import Root

    t, _ = stashed
    pm = make_plugin_manager()
    pm.jam_broken.append({"name": "jam_evil", "version": "1.0", "reason": "ImportError: no module named x"})
    with Session() as s:
        res = run(Root(t.root), ".", pm, s)
    assert [(w.kind, w.path) for w in res.warnings if w.kind == "plugin"] == [("plugin", "jam_evil")]
    assert res.exit_code == 0


# -- scale: one listing per remote -------------------------------------------------------------------
class _CountHas:
    def __init__(self):
        self.calls = 0

    from jam_core import hookimpl

    @hookimpl(tryfirst=True)
    def has(self, remote, oid, size):
        self.calls += 1
        return None  # the backend answers


def test_no_round_trip_per_stub(tmp_path):
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops.doctor import doctor as run
    from jam_core.root import Root

    t = make_tree(tmp_path)
    for i in range(20):
        make_file(t.root / f"f{i}", 70_000, seed=i)
    jam("stash", ".", cwd=t.root)
    counter = _CountHas()
    pm = make_plugin_manager(extra=(counter,))
    with Session() as s:
        res = run(Root(t.root), ".", pm, s)
    assert res.stubs == 20 and res.exit_code == 0
    assert counter.calls == 0  # one list_objects per remote, no `has` per stub


# -- scrub ---------------------------------------------------------------------------------------------
def test_scrub_records_resumes_and_schedules(tmp_path, monkeypatch):
    import jam_core.objects
    import jam_dir
    from jam_core.catalog import Catalog
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops.doctor import doctor as run
    from jam_core.root import Root

    t = make_tree(tmp_path)
    for i in range(3):
        make_file(t.root / f"f{i}", 70_000, seed=10 + i)
    jam("stash", ".", cwd=t.root)
    root = Root(t.root)
    real = jam_core.objects.hash_fd
    calls = []

    def interrupted(fd, algorithm="b3", progress=None, threads=False):
        calls.append(fd)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the cron job killed mid-scrub
        return real(fd, algorithm, progress, threads)
    # the dir backend hashes each copy in place (hash_object) with the hash_fd it imported
    monkeypatch.setattr(jam_core.objects, "hash_fd", interrupted)
    monkeypatch.setattr(jam_dir, "hash_fd", interrupted)
    with Session() as s, pytest.raises(KeyboardInterrupt):
        run(root, ".", make_plugin_manager(), s, deep=True, older_than=30 * 86400)
    monkeypatch.setattr(jam_core.objects, "hash_fd", real)
    monkeypatch.setattr(jam_dir, "hash_fd", real)
    with Catalog(t.root / ".jam" / "catalog.db") as cat:
        assert len(cat.verified_at()) == 1  # what was verified stays recorded
    with Session() as s:
        res = run(root, ".", make_plugin_manager(), s, deep=True, older_than=30 * 86400)
    assert (res.verified, res.recent, res.exit_code) == (2, 1, 0)  # resumed: only the other two read
    with Session() as s:
        res = run(root, ".", make_plugin_manager(), s, deep=True, older_than=30 * 86400)
    assert (res.verified, res.recent) == (0, 3)
    with Session() as s:  # a month later everything is due again
        res = run(root, ".", make_plugin_manager(), s, deep=True, older_than=30 * 86400,
                  now=__import__("time").time() + 31 * 86400)
    assert (res.verified, res.recent) == (3, 0)
    out = doctor(t, "--deep", "--older-than", "30d", check=0)
    assert out["summary"]["recently_verified"] == 3 and out["summary"]["verified"] == 0


# -- usage -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["nothing-here"], ["/"], ["--older-than", "30d"], ["--deep", "--older-than", "30"]])
def test_usage_errors_exit_2(stashed, args):
    t, _ = stashed
    res = jam("doctor", *args, cwd=t.root, check=2)
    assert res.err.startswith("jam: ") and len(res.err.splitlines()) == 1 and res.out == ""


def test_several_paths(stashed):
    t, _ = stashed
    make_file(t.root / "d" / "b.bin", SIZE, seed=3)
    jam("stash", "d", cwd=t.root)
    out = doctor(t, "a.bin", "d", "d/b.bin", check=0)
    assert out["stubs"] == 2 and out["paths"] == ["a.bin", "d"]


# -- the JSON schema is documented and stable ---------------------------------------------------------
TOP = ["schema", "version", "ok", "exit", "paths", "deep", "fix", "stubs", "remotes", "checks", "problems",
       "warnings", "summary"]
CHECK = ["kind", "path", "detail", "fixed", "section", "status"]
SUMMARY = ["ok", "info", "warning", "problem", "fixed", "unfixed", "verified", "verified_bytes",
           "recently_verified"]


def _readme_doctor() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Checking a root: `jam doctor`")
    return text[start:text.index("\n## ", start + 10)]


def test_json_schema_is_stable_and_documented(stashed):
    t, _ = stashed
    out = doctor(t, check=0)
    assert list(out) == TOP and out["schema"] == 1
    assert all(list(c) == CHECK for c in out["checks"])
    assert list(out["summary"]) == SUMMARY
    assert {c["section"] for c in out["checks"]} == {"setup", "stubs", "leftovers", "scrub"}
    assert {c["status"] for c in out["checks"]} <= {"ok", "info", "warning", "problem"}
    doc = _readme_doctor()
    for key in TOP + CHECK + SUMMARY:
        assert f"`{key}`" in doc, f"README's doctor section does not document {key!r}"
    import re

    source = (REPO / "jam_core" / "ops" / "doctor.py").read_text()
    used = set(re.findall(r'(?:problem|add)\(\s*(?:"[a-z]+",\s*[A-Z]+,\s*)?"([a-z-]+)"', source))
    used |= set(re.findall(r'kind = "([a-z-]+)"', source))
    assert used, "no finding kinds found in doctor.py"
    for kind in sorted(used):
        assert f"`{kind}`" in doc, f"README's doctor section does not document the finding kind {kind!r}"
