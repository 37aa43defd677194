"""`jam commit` of a large tree against its peer in the same run: `git add -A && git commit`.

A tree of ``--files`` (100,000) small files (``--file-bytes``, 512, random: each is its own
object) in directories of 100, in a root whose only remote is a dir remote on the same disk:

  1. the first commit: every file hashed and uploaded (it stays local), the snapshot written;
     git hashes every file into a loose object and writes its index and trees;
  2. a second commit with nothing changed (jam: a walk and the ids cache; git: a refresh of
     its index, and `git commit` finding nothing);
  3. the snapshot's size (compressed) against the size of git's index.

Each side runs ``--repeat`` (2) times on fresh copies; the median is reported (the machine may
be shared). Warm cache for both sides.

    .venv/bin/python bench/bench_history.py            # 100,000 files
    .venv/bin/python bench/bench_history.py --quick    # 10,000 files, once
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JAM = str(Path(sys.executable).parent / "jam")


def run(*args, cwd=None, env=None, ok=(0,)) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True)
    took = time.perf_counter() - t0
    if res.returncode not in ok:
        raise SystemExit(f"{args[0]} {args[1]} failed ({res.returncode}): {res.stderr.decode()[-500:]}")
    return took


def make_tree(top: Path, files: int, size: int) -> None:
    for i in range(files):
        d = top / f"d{i // 100:04}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:06}.dat").write_bytes(os.urandom(size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--file-bytes", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.files, args.repeat = 10_000, 1
    work = Path(tempfile.mkdtemp(prefix="bench-history-", dir=os.environ.get("BENCH_DIR")))
    env = {**os.environ, "XDG_DATA_HOME": str(work / "xdg-data"), "XDG_CONFIG_HOME": str(work / "xdg-config"),
           "HOME": str(work / "home"), "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}
    (work / "home").mkdir()
    try:
        src = work / "src"
        print(f"making {args.files:,} files of {args.file_bytes} B ...", flush=True)
        make_tree(src, args.files, args.file_bytes)
        times: dict[str, list[float]] = {k: [] for k in ("jam commit", "git add+commit", "jam commit (unchanged)",
                                                         "git add+commit (unchanged)")}
        snap_size = index_size = 0
        for n in range(args.repeat):
            jr, gr, remote = work / f"jam{n}", work / f"git{n}", work / f"remote{n}"
            shutil.copytree(src, jr, symlinks=True)
            shutil.copytree(src, gr, symlinks=True)
            remote.mkdir()
            run(JAM, "init", jr, env=env)
            run(JAM, "remote", "add", "vault", remote, cwd=jr, env=env)
            run(JAM, "remote", "remove", "default", cwd=jr, env=env)
            run("git", "init", "-q", gr, env=env)
            run("sync")
            times["jam commit"].append(run(JAM, "commit", "-m", "first", cwd=jr, env=env))
            run("sync")
            times["git add+commit"].append(run("sh", "-c", "git add -A && git commit -q -m first", cwd=gr, env=env))
            run("sync")
            times["jam commit (unchanged)"].append(run(JAM, "commit", cwd=jr, env=env))
            times["git add+commit (unchanged)"].append(
                run("sh", "-c", "git add -A && git commit -q -m again", cwd=gr, env=env, ok=(0, 1)))
            head = (jr / ".jam/history/HEAD").read_text().strip()
            snap_size = (jr / ".jam/history/objects" / head.replace(":", "-")).stat().st_size
            index_size = (gr / ".git/index").stat().st_size
            shutil.rmtree(jr)
            shutil.rmtree(gr)
            shutil.rmtree(remote)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{args.files:,} files of {args.file_bytes} B, median of {args.repeat}:")
        for k, v in med.items():
            print(f"  {k:30} {v:8.2f} s")
        print(f"  first commit: jam / git = {med['jam commit'] / med['git add+commit']:.2f}x the time")
        print(f"  unchanged:    jam / git = {med['jam commit (unchanged)'] / med['git add+commit (unchanged)']:.2f}x"
              " the time")
        print(f"  snapshot {snap_size / 1e6:.2f} MB compressed ({snap_size / args.files:.0f} B a file); "
              f"git's index {index_size / 1e6:.2f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
