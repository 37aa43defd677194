"""SIGKILL in the middle of `jam stash` and `jam checkout` of a large file (invariants 1-3).

The real command runs as a subprocess and is killed at points it has observably reached (a
`.part` upload in the remote's tmp/ appears or grows, the object lands, the stub's temporary
file appears beside the file, a fetch's temporary file appears or grows) and at fractions of
an uninterrupted run's duration. Whatever the moment, the file must be either the intact
original or a valid stub that checks out to the same bytes; no half object may sit under its
final name; leftover temporary files are never counted as user files; and running the command
again finishes the job. The assertions do not depend on when the kill landed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.safety_support import JAM, b3, fingerprint, is_stub, jam, make_tree, objects_verify, record, status_json

pytestmark = pytest.mark.slow

SIZE = int(os.environ.get("JAM_TEST_KILL_MIB", "256")) << 20


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """One large file of random bytes, copied into each scenario, and its hash."""
    path = tmp_path_factory.mktemp("big") / "big"
    with open(path, "wb") as f:
        for _ in range(SIZE >> 24):
            f.write(os.urandom(1 << 24))
        f.write(os.urandom(SIZE & ((1 << 24) - 1)))
    return path, b3(path)


def _files(d: Path, pred) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(d) if pred(e.name)]
    except FileNotFoundError:
        return []


def _size(paths) -> int:
    best = 0
    for p in paths:
        try:
            best = max(best, p.stat().st_size)
        except FileNotFoundError:
            pass
    return best


def _jam_tmp(d: Path):
    return _files(d, lambda n: n.startswith(".jam-") and n.endswith(".tmp"))


def run_and_kill(args, cwd, when) -> int | None:
    """Start `jam ARGS`, SIGKILL it once ``when()`` is true (polled, never slept on), or once
    ``when`` (a float) seconds have passed. Returns the exit status (-9 if the kill landed)."""
    proc = subprocess.Popen([JAM, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if callable(when):
            while proc.poll() is None and not when():
                os.sched_yield()
        else:
            try:
                proc.wait(timeout=when)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        err = proc.stderr.read().decode(errors="replace")
        assert "Traceback" not in err, err
        return proc.returncode
    finally:
        proc.stderr.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check_after_kill(t, name: str, digest: str, mode: int) -> str:
    """The invariants after a kill; returns "stub" or "local" (what the kill left)."""
    path = t.root / name
    objects_verify(t.remote)  # no half object under its final name
    st = status_json(t.root)
    assert st["total"]["files"] == 1, st  # leftover .jam-*.tmp are not user files
    assert st["problems"] == [], st
    if is_stub(path):
        rec = record(path)
        assert rec.oid == f"b3:{digest}" and rec.size == SIZE and os.lstat(path).st_size == SIZE
        assert rec.mode == mode
        state = "stub"
    else:
        assert record(path) is None
        assert os.lstat(path).st_mode & 0o7777 == mode
        assert b3(path) == digest, "the original was damaged"
        state = "local"
    return state


STASH_POINTS = {
    "upload started": lambda t: _files(t.remote / "tmp", lambda n: n.endswith(".part")),
    "upload half done": lambda t: _size(_files(t.remote / "tmp", lambda n: n.endswith(".part"))) >= SIZE // 2,
    "upload complete": lambda t: _size(_files(t.remote / "tmp", lambda n: n.endswith(".part"))) >= SIZE,
    "object in place": lambda t: any(p.is_file() for p in (t.objects / "b3").rglob("*")),
    "stub being written": lambda t: _jam_tmp(t.root),
}


def test_sigkill_during_stash(tmp_path, big):
    src, digest = big
    t = make_tree(tmp_path)
    path = t.root / "big"

    # one uninterrupted run gives the time scale for the delay-based kills
    shutil.copyfile(src, path)
    os.chmod(path, 0o640)
    t0 = time.monotonic()
    jam("stash", "big", cwd=t.root)
    duration = time.monotonic() - t0

    points = list(STASH_POINTS.items()) + [(f"{k}/10 of a run", duration * k / 10) for k in range(1, 6)]
    outcomes = {}
    for label, when in points:
        # a fresh start: the original file, an empty remote
        if path.exists():
            os.chmod(path, 0o600)
            path.unlink()
        shutil.rmtree(t.objects / "b3", ignore_errors=True)
        shutil.copyfile(src, path)
        os.chmod(path, 0o640)

        code = run_and_kill(["stash", "big"], t.root, (lambda: when(t)) if callable(when) else when)
        state = check_after_kill(t, "big", digest, 0o640)
        outcomes[label] = (code, state)

        # running it again finishes the job, and the content comes back byte for byte
        jam("stash", "big", cwd=t.root)
        assert is_stub(path), label
        jam("doctor", cwd=t.root)
        jam("checkout", "big", cwd=t.root)
        assert b3(path) == digest and os.lstat(path).st_mode & 0o7777 == 0o640, label

    print("stash kills (exit, state left):", outcomes)
    killed = [label for label, (code, _) in outcomes.items() if code == -signal.SIGKILL]
    assert killed, f"no kill landed mid-stash (file too small for this machine?): {outcomes}"


CHECKOUT_POINTS = {
    "fetch started": lambda t: _jam_tmp(t.root),
    "fetch half done": lambda t: _size(_jam_tmp(t.root)) >= SIZE // 2,
    "fetch complete": lambda t: _size(_jam_tmp(t.root)) >= SIZE,
}


def test_sigkill_during_checkout(tmp_path, big):
    src, digest = big
    t = make_tree(tmp_path)
    path = t.root / "big"
    shutil.copyfile(src, path)
    os.chmod(path, 0o640)
    jam("stash", "big", cwd=t.root)
    t0 = time.monotonic()
    jam("checkout", "big", cwd=t.root)
    duration = time.monotonic() - t0

    points = list(CHECKOUT_POINTS.items()) + [(f"{k}/10 of a run", duration * k / 10) for k in range(1, 6)]
    outcomes = {}
    for label, when in points:
        if not is_stub(path):
            jam("stash", "big", cwd=t.root)
        stub_before = fingerprint(path)

        code = run_and_kill(["checkout", "big"], t.root, (lambda: when(t)) if callable(when) else when)
        state = check_after_kill(t, "big", digest, 0o640)
        outcomes[label] = (code, state)
        if state == "stub":
            assert fingerprint(path) == stub_before, f"{label}: an interrupted fetch touched the stub"

        jam("checkout", "big", cwd=t.root)
        assert b3(path) == digest and not is_stub(path), label

    print("checkout kills (exit, state left):", outcomes)
    killed = [label for label, (code, _) in outcomes.items() if code == -signal.SIGKILL]
    assert killed, f"no kill landed mid-checkout: {outcomes}"
