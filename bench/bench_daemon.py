"""On-access hydration (`jam daemon`), each figure against its peer in the same run.

- first byte: open + read(1) of a 5 MiB stub with the daemon running (the open blocks while the
  object is fetched from a dir remote, verified and written in), against the same read of the
  same file already local; median of --rounds fresh stubs (goal: < 5 ms);
- ordinary files: open + read + close of --files small local files in a root, with the daemon
  running (its use-recording group: a notification per open) against no daemon; the best of
  --runs passes each, interleaved (goal: < 2% added);
- grep -r over a tree of --tree files of 64 KiB, 90% of them stubs (every stub hydrates on its
  open) against the same tree all local.

Needs root and Linux >= 6.14.   python bench/bench_daemon.py [--rounds 15] [--files 2000] [--tree 500]
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


def jam(*args, cwd):
    subprocess.run([JAM, *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def start_daemon(root: Path) -> subprocess.Popen:
    p = subprocess.Popen([JAM, "daemon", str(root)], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line.startswith("jam daemon: serving"):
        p.kill()
        raise SystemExit(f"jam daemon did not start: {line!r}")
    return p


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


def read_all(paths) -> float:
    t = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.read(fd, 65536)
        os.close(fd)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tree", type=int, default=500)
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
            hydrated = [first_byte(big / f"f{i}") for i in range(args.rounds)]
            local = [first_byte(big / f"f{i}") for i in range(args.rounds)]
        finally:
            stop_daemon(d)
        print(f"first byte of a 5 MiB stub (dir remote): median {statistics.median(hydrated) * 1e3:.2f} ms, "
              f"best {min(hydrated) * 1e3:.2f} ms; the same file local: {statistics.median(local) * 1e3:.3f} ms "
              f"(goal < 5 ms)")
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
            off.append(read_all(paths))
            d = start_daemon(root)
            try:
                read_all(paths)
                on.append(read_all(paths))
            finally:
                stop_daemon(d)
        a, b = min(off), min(on)
        print(f"open+read+close of {args.files} local files of 4 KiB: no daemon {a / args.files * 1e6:.2f} us, "
              f"daemon running {b / args.files * 1e6:.2f} us per file: {100 * (b - a) / a:+.1f}% (goal < 2%)")
        # -- grep -r over a tree 90% stubs ------------------------------------------------------
        tree = root / "tree"
        for i in range(args.tree):
            p = tree / f"d{i % 20}" / f"t{i}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rng.randbytes(64 * 1024).hex()[:64 * 1024].encode())
        twin = base / "twin"
        shutil.copytree(tree, twin)
        names = sorted(str(p.relative_to(root)) for p in tree.rglob("*.txt"))
        jam("stash", *names[: len(names) * 9 // 10], cwd=root)
        d = start_daemon(root)
        try:
            t = time.perf_counter()
            subprocess.run(["grep", "-r", "-c", "zzzz", str(tree)], stdout=subprocess.DEVNULL)
            stubs = time.perf_counter() - t
        finally:
            stop_daemon(d)
        t = time.perf_counter()
        subprocess.run(["grep", "-r", "-c", "zzzz", str(twin)], stdout=subprocess.DEVNULL)
        plain = time.perf_counter() - t
        print(f"grep -r over {args.tree} files of 64 KiB: 90% stubs hydrated on open {stubs * 1e3:.0f} ms, "
              f"all local {plain * 1e3:.0f} ms ({stubs / plain:.1f}x)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
