"""On-access hydration (`jam daemon`), each figure against its peer in the same run.

Every timed pass starts only once the daemon is idle (``client.wait_idle``: no event queued or
in progress, fills durable, recorded uses written): nothing left over from start-up or an
earlier pass is measured. Each figure is the median of its repeats, printed beside its peer
with the ratio.

- first byte: open + read(1) of a 5 MiB stub with the daemon running (the open blocks while the
  object is fetched from a dir remote, verified and written in), against the same read of the
  same file already local; median of --rounds fresh stubs (goal: < 5 ms);
- ordinary files: open + read + close of --files small local files in a root, with the daemon
  running (after a warm-up pass: each file's use recorded once, then ignored) against no
  daemon; median of --runs passes each, interleaved (goal: < 2% added);
- grep -r over a tree of --tree files of 64 KiB, 90% of them stubs (every stub hydrates on its
  open) against the same tree all local; median of --runs (--grep-runs) fresh stashes.

Needs root and Linux >= 6.14.   python bench/bench_daemon.py [--rounds 15] [--files 2000] [--tree 300]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JAM = str(Path(sys.executable).parent / "jam")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jam_core.daemon.client import wait_idle  # noqa: E402


def jam(*args, cwd):
    subprocess.run([JAM, *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def start_daemon(root: Path) -> subprocess.Popen:
    p = subprocess.Popen([JAM, "daemon", str(root)], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line.startswith("jam daemon: serving"):
        p.kill()
        raise SystemExit(f"jam daemon did not start: {line!r}")
    idle(root)
    return p


def idle(root: Path) -> None:
    if not wait_idle(root, 120):
        raise SystemExit("jam daemon did not become idle")


def report(what: str, jam_s: list[float], peer_s: list[float], peer: str, unit: str = "ms", goal: str = "") -> None:
    a, b = statistics.median(jam_s), statistics.median(peer_s)
    k = 1e3 if unit == "ms" else 1e6
    print(f"{what}: jam {a * k:.3f} {unit} (best {min(jam_s) * k:.3f}) vs {peer} {b * k:.3f} {unit}: "
          f"{a / b:.2f}x, {100 * (a - b) / b:+.1f}%{'; goal ' + goal if goal else ''}", flush=True)


def stop_daemon(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    p.wait()


def first_byte(path: Path) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    os.read(fd, 1)
    dt = time.perf_counter() - t
    os.close(fd)
    return dt


def read_all(paths) -> tuple[float, float]:
    """(wall, CPU) seconds of one pass. The CPU time of this thread (user + kernel: the
    kernel's fanotify work is charged to the opener) is what the daemon adds to an open; the
    wall time also holds whatever else the machine was doing."""
    c = time.thread_time()
    t = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.read(fd, 65536)
        os.close(fd)
    return time.perf_counter() - t, time.thread_time() - c


def best_of(paths, n: int = 3) -> tuple[float, float]:
    runs = [read_all(paths) for _ in range(n)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tree", type=int, default=300)
    ap.add_argument("--grep-runs", type=int, default=3)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-daemon-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    env_home = base / "home"
    os.environ.update(HOME=str(env_home), XDG_DATA_HOME=str(env_home / "data"),
                      XDG_CONFIG_HOME=str(env_home / "config"))
    root = base / "root"
    root.mkdir()
    rng = random.Random(1)
    try:
        jam("init", ".", cwd=root)
        # -- first byte of a 5 MiB stub -------------------------------------------------------
        big = root / "big"
        big.mkdir()
        for i in range(args.rounds):
            (big / f"f{i}").write_bytes(rng.randbytes(5 << 20))
        jam("stash", "big", cwd=root)
        d = start_daemon(root)
        try:
            hydrated = []
            for i in range(args.rounds):
                hydrated.append(first_byte(big / f"f{i}"))
                idle(root)  # the fill made durable in the background before the next one
            local = [first_byte(big / f"f{i}") for i in range(args.rounds)]
        finally:
            stop_daemon(d)
        report("first byte of a 5 MiB stub (dir remote)", hydrated, local, "the same file local",
               goal="< 5 ms")
        # -- ordinary files with and without the daemon ---------------------------------------
        small = root / "small"
        small.mkdir()
        paths = []
        for i in range(args.files):
            p = small / f"s{i}"
            p.write_bytes(rng.randbytes(4096))
            paths.append(str(p))
        read_all(paths)
        off, on = [], []
        for _ in range(args.runs):
            off.append(best_of(paths))
            d = start_daemon(root)
            try:
                read_all(paths)  # warm-up: each file's use recorded once, then ignored
                idle(root)
                on.append(best_of(paths))
            finally:
                stop_daemon(d)
        for i, what in ((0, "wall"), (1, "CPU")):
            report(f"open+read+close of a local 4 KiB file, {what} ({args.files} files, {args.runs} runs)",
                   [t[i] / args.files for t in on], [t[i] / args.files for t in off], "no daemon", unit="us",
                   goal="< 2% added")
        # -- grep -r over a tree 90% stubs ------------------------------------------------------
        tree = root / "tree"
        for i in range(args.tree):
            p = tree / f"d{i % 20}" / f"t{i}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rng.randbytes(64 * 1024).hex()[:64 * 1024].encode())
        twin = base / "twin"
        shutil.copytree(tree, twin)
        names = sorted(str(p.relative_to(root)) for p in tree.rglob("*.txt"))
        stubbed = names[: len(names) * 9 // 10]
        on, off = [], []
        for _ in range(args.grep_runs):
            jam("stash", *stubbed, cwd=root)
            d = start_daemon(root)
            try:
                t = time.perf_counter()
                subprocess.run(["grep", "-r", "-c", "zzzz", str(tree)], stdout=subprocess.DEVNULL)
                on.append(time.perf_counter() - t)
                idle(root)
            finally:
                stop_daemon(d)
            t = time.perf_counter()
            subprocess.run(["grep", "-r", "-c", "zzzz", str(twin)], stdout=subprocess.DEVNULL)
            off.append(time.perf_counter() - t)
        report(f"grep -r over {args.tree} files of 64 KiB, 90% stubs hydrated on open", on, off, "all local")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
