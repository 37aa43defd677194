"""Helpers shared by the safety tests (tests/test_safety_*.py): a root with a remote in a
known place, the real `jam` command as a subprocess, and exact snapshots of files and trees.

Everything here works on the real filesystem with real xattrs: a fault-injection test that
mocked the filesystem would prove nothing about the invariants.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import blake3

from jam_core.stub import XATTR, StubRecord

JAM = str(Path(sys.executable).parent / "jam")
BIG = 9 << 20  # over the dir backend's _BIG (8 MiB): copied in the kernel


@dataclass
class Tree:
    """A root and the dir remote it stashes to, both under one test's tmp_path."""

    root: Path
    remote: Path

    @property
    def objects(self) -> Path:
        return self.remote / "objects"


def make_tree(base: Path, name: str = "root") -> Tree:
    """An initialised root ``base/name`` whose only remote is the dir remote ``base/name-remote``."""
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import add_remote
    from jam_core.root import Root

    path = base / name
    remote = base / f"{name}-remote"
    path.mkdir(parents=True)
    remote.mkdir()
    root, _ = Root.init(path)
    add_remote(root, make_plugin_manager(), "vault", str(remote))
    return Tree(path, remote)


def on_another_disk(monkeypatch) -> None:
    """The dir remotes of these tests share the root's disk, where a stash links each file into
    the remote (adopts it) instead of copying it. For a test of the copy path, as if the remote
    were on another disk: the backend never adopts."""
    import jam_dir

    monkeypatch.setattr(jam_dir, "_may_adopt", lambda *a, **k: False)


def stashed_big(tmp_path: Path, seed: int) -> tuple["Tree", str]:
    """A tree whose file ``big`` (BIG bytes) was stashed through the real stash; returns the
    tree and the file's b3sum."""
    from jam_core.manager import make_plugin_manager
    from jam_core.model import Session
    from jam_core.ops.stash import stash
    from jam_core.root import Root
    from tests.conftest import make_file

    t = make_tree(tmp_path)
    make_file(t.root / "big", BIG, seed=seed)
    want = b3(t.root / "big")
    with Session() as s:
        res = stash(Root(t.root), ["big"], make_plugin_manager(), s)
    assert [r for r, _ in res.done] == ["big"], res
    return t, want


def jam(*args, cwd, check: int | None = 0, env=None) -> subprocess.CompletedProcess:
    """Run the real `jam` (args may be bytes). Never a traceback; ``check`` is the exit code wanted."""
    res = subprocess.run([JAM, *args], cwd=cwd, capture_output=True, env=env)
    out, err = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    assert "Traceback" not in out + err, f"jam {args}: traceback:\n{err}"
    if check is not None:
        assert res.returncode == check, f"jam {args}: exit {res.returncode}, wanted {check}\n{out}\n{err}"
    res.out, res.err = out, err
    return res


def status_json(cwd, path: str | bytes = ".") -> dict:
    return json.loads(jam("status", path, "--json", cwd=cwd).out)


def b3(path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def xattr(path) -> bytes | None:
    try:
        return os.getxattr(path, XATTR, follow_symlinks=False)
    except OSError:
        return None


def record(path) -> StubRecord | None:
    raw = xattr(path)
    return None if raw is None else StubRecord.unpack(raw)


def fingerprint(path) -> tuple:
    """Everything that must not move when jam leaves a stub alone: stat, xattr, first block."""
    st = os.lstat(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_blocks,
            xattr(path), head)


def is_stub(path) -> bool:
    st = os.lstat(path)
    return xattr(path) is not None and st.st_mode & 0o222 == 0


def listing(top: Path, dir_times: bool = True) -> dict[bytes, tuple]:
    """Every entry under ``top`` (bytes paths) with its type, size and mtime: a canary's state.

    ``dir_times=False`` leaves out directories' sizes and mtimes (a remote's tmp/ changes
    when a backend probes it)."""
    out = {}
    top_b = os.fsencode(top)
    for dirpath, dirnames, filenames in os.walk(top_b):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if not dir_times and stat.S_ISDIR(st.st_mode):
                out[os.path.relpath(p, top_b)] = "dir"
                continue
            out[os.path.relpath(p, top_b)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns,
                                              xattr(p) if stat.S_ISREG(st.st_mode) else None)
    return out


def objects_verify(remote: Path) -> list[Path]:
    """Every object under the remote's objects/ hashes to its name (no half object in place)."""
    found = []
    objects = remote / "objects"
    for p in objects.rglob("*"):
        if p.is_file():
            algo = p.relative_to(objects).parts[0]
            assert algo == "b3", p
            assert b3(p) == p.name, f"half-written or corrupt object under its final name: {p}"
            found.append(p)
    return found


def run_jam(cwd, *args, machine: str, check: int | None = 0):
    """The real `jam` in ``cwd`` as machine ``machine`` (JAM_MACHINE_ID): never a traceback;
    the exit code ``check`` unless None. The result has ``out`` and ``err`` as text."""
    env = dict(os.environ, JAM_MACHINE_ID=machine)
    res = subprocess.run([JAM, *map(str, args)], cwd=cwd, capture_output=True, env=env)
    out, err = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    assert "Traceback" not in out + err, err
    if check is not None:
        assert res.returncode == check, f"jam {args}: exit {res.returncode}\n{out}\n{err}"
    res.out, res.err = out, err
    return res


def held_fds(pid: int) -> list[str]:
    """What process ``pid``'s descriptors point at now (readlink of /proc/PID/fd/*). A descriptor
    closed between the listing and its readlink (the process is working) is left out."""
    held = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return held
    for fd in fds:
        try:
            held.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return held
