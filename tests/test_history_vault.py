"""Issue 15 part 3: a user's real set-up. Each "computer" is its own HOME and XDG dirs (so
`jam init` gives each its own embedded local `default` remote) and its own JAM_MACHINE_ID;
both add one shared `vault` dir remote with `jam remote add`. Everything runs through the
real `jam` command as subprocesses, on real files and xattrs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.safety_support import JAM, b3, is_stub


class Computer:
    def __init__(self, base: Path, name: str):
        self.home = base / f"{name}-home"
        self.home.mkdir()
        self.name = name
        self.env = dict(os.environ, HOME=str(self.home), XDG_DATA_HOME=str(self.home / ".local/share"),
                        XDG_CONFIG_HOME=str(self.home / ".config"), XDG_CACHE_HOME=str(self.home / ".cache"),
                        JAM_MACHINE_ID=name * 3)
        self.root = base / name / "tree"  # the same directory name: the same tree
        self.default = self.home / ".local/share/jam/remotes/default"

    def jam(self, *args, check: int | None = 0, cwd=None):
        res = subprocess.run([JAM, *args], cwd=cwd or self.root, capture_output=True, env=self.env)
        out, err = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
        assert "Traceback" not in out + err, err
        if check is not None:
            assert res.returncode == check, f"{self.name}: jam {args}: exit {res.returncode}\n{out}\n{err}"
        res.out, res.err = out, err
        return res

    def init(self, vault: Path) -> "Computer":
        self.root.mkdir(parents=True)
        self.jam("init", str(self.root))
        self.jam("remote", "add", "vault", str(vault))
        return self


def _objects(remote: Path) -> set[str]:
    return {f"b3:{p.name}" for p in (remote / "objects").rglob("*") if p.is_file()}


def _heads(remote: Path) -> set[str]:
    d = remote / "meta/history/tree"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def setup(tmp_path):
    vault = tmp_path / "vault"
    vault.mkdir()
    one = Computer(tmp_path, "a").init(vault)
    (one.root / "docs").mkdir()
    (one.root / "docs/plan.txt").write_bytes(b"the plan\n")
    (one.root / "big.bin").write_bytes(os.urandom(300_000))
    return vault, one


def test_a_commit_puts_every_object_of_its_head_on_the_vault(tmp_path):
    vault, one = setup(tmp_path)
    big = "b3:" + b3(one.root / "big.bin")
    one.jam("stash", "big.bin")  # content on `default` only (place: tier 0, ties by name)
    assert big in _objects(one.default) and big not in _objects(vault)
    one.jam("commit", "-m", "first")  # plan.txt uploaded (to `default`), both copied to the vault
    want = {big, "b3:" + b3(one.root / "docs/plan.txt")}
    assert want <= _objects(vault), "the vault holds what its head needs"
    assert len(_objects(vault) - _objects(one.default)) >= 1  # the snapshot itself
    assert _heads(vault) == {"aaa"}
    assert not _heads(one.default), "no head on this computer's own default remote"
    # a second computer clones from the vault and gets every byte
    two = Computer(tmp_path, "b")
    two.root.parent.mkdir()
    two.jam("clone", str(vault), str(two.root), cwd=tmp_path)
    assert is_stub(two.root / "big.bin")
    two.jam("checkout", "big.bin", "docs")
    assert (two.root / "docs/plan.txt").read_bytes() == b"the plan\n"
    assert "b3:" + b3(two.root / "big.bin") == big


def test_two_computers_with_their_own_defaults_sync_through_the_vault(tmp_path):
    vault, one = setup(tmp_path)
    one.jam("commit", "-m", "first")
    two = Computer(tmp_path, "b").init(vault)
    (two.root / "from-b.txt").write_bytes(b"written on b\n")
    two.jam("sync")
    assert is_stub(two.root / "big.bin") and is_stub(two.root / "docs/plan.txt")
    two.jam("checkout", "big.bin", "docs")
    assert b3(two.root / "big.bin") == b3(one.root / "big.bin")
    one.jam("sync")
    assert is_stub(one.root / "from-b.txt")
    one.jam("checkout", "from-b.txt")
    assert (one.root / "from-b.txt").read_bytes() == b"written on b\n"
    # neither computer's default received the other's files
    assert "b3:" + b3(one.root / "big.bin") not in _objects(two.default)
    assert "b3:" + b3(one.root / "from-b.txt") not in _objects(one.default)


def test_an_object_no_remote_holds_is_one_line_and_no_head(tmp_path):
    vault, one = setup(tmp_path)
    one.jam("stash", "big.bin")
    assert len(_objects(one.default)) == 1
    (victim,) = [p for p in (one.default / "objects").rglob("*") if p.is_file()]
    victim.unlink()  # its only copy is gone: nothing can complete the vault
    res = one.jam("commit", "-m", "first", check=1)
    lines = [ln for ln in res.err.splitlines() if "vault" in ln]
    assert len(lines) == 1 and lines[0].startswith("jam: ") and "head not written" in lines[0] \
        and "big.bin" in lines[0], res.err
    assert not _heads(vault), "no head promises what the vault lacks"


def test_a_file_hashed_by_diff_is_still_uploaded_by_the_next_commit(tmp_path):
    vault, one = setup(tmp_path)
    one.jam("commit", "-m", "first")
    (one.root / "docs/plan.txt").write_bytes(b"the plan, revised\n")
    (one.root / "docs/new.txt").write_bytes(b"new\n")
    one.jam("diff")  # hashes both into the ids cache
    one.jam("commit", "-m", "two")
    for name in ("docs/plan.txt", "docs/new.txt"):
        oid = "b3:" + b3(one.root / name)
        assert oid in _objects(vault) and oid in _objects(one.default), name


def test_remote_remove_move_to_carries_what_kept_versions_need(tmp_path):
    from tests.safety_support import jam, make_tree

    t = make_tree(tmp_path)  # one remote: `vault`
    (t.root / "old.txt").write_bytes(b"only in the first version\n")
    jam("commit", "-m", "one", cwd=t.root)
    first = (t.root / ".jam/history/HEAD").read_text().strip()
    os.unlink(t.root / "old.txt")
    jam("commit", "-m", "two", cwd=t.root)
    second = (t.root / ".jam/history/HEAD").read_text().strip()
    other = tmp_path / "other"
    other.mkdir()
    jam("remote", "add", "other", str(other), cwd=t.root)
    oid = "b3:" + __import__("blake3").blake3(b"only in the first version\n").hexdigest()
    assert oid in _objects(t.remote) and oid not in _objects(other)

    jam("remote", "remove", "vault", "--move-to", "other", cwd=t.root)
    assert {oid, first, second} <= _objects(other), "the versions' objects and the snapshots moved"
    import shutil

    shutil.rmtree(t.remote)  # the old remote is gone: the first version still comes back
    jam("restore", "old.txt", "--at", first[3:12], "--fetch", cwd=t.root)
    assert (t.root / "old.txt").read_bytes() == b"only in the first version\n"


def test_remote_remove_move_to_refuses_when_a_versions_object_cannot_be_copied(tmp_path):
    from tests.safety_support import jam, make_tree

    t = make_tree(tmp_path)
    (t.root / "old.txt").write_bytes(b"lost\n")
    jam("commit", "-m", "one", cwd=t.root)
    os.unlink(t.root / "old.txt")
    jam("commit", "-m", "two", cwd=t.root)
    other = tmp_path / "other"
    other.mkdir()
    jam("remote", "add", "other", str(other), cwd=t.root)
    oid = "b3:" + __import__("blake3").blake3(b"lost\n").hexdigest()
    (victim,) = [p for p in (t.remote / "objects").rglob("*") if p.is_file() and f"b3:{p.name}" == oid]
    victim.unlink()
    res = jam("remote", "remove", "vault", "--move-to", "other", cwd=t.root, check=1)
    assert "old.txt" in res.err and "Traceback" not in res.err
    assert "vault" in jam("remote", "list", cwd=t.root).out, "nothing removed"
