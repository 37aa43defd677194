"""`jam clone` of a 100,000-file snapshot against its peer in the same run: `git clone` of a
local git repository holding the same tree.

A tree of ``--files`` (100,000) small files (``--file-bytes``, 512, random) in directories of
100 is committed once with `jam commit` (into a dir remote on the same disk) and once with git.
Then, ``--repeat`` (3) times each on fresh destinations, the median reported:

  * jam: `jam clone REMOTE DEST` (the newest snapshot fetched and verified, the root built
    aside in DEST's stage: every file created as its stub under its own name, one syncfs, the
    catalog in two statements, then the stage's top entries renamed into DEST);
  * git: `git clone REPO DEST` of the repository packed (`git gc`; local: the pack hard-linked,
    every file checked out; git does not fsync the checkout).

Wall time and CPU time (user + sys of the child, from getrusage) are printed for both: on a
shared machine the CPU time is the steadier figure.

    .venv/bin/python bench/bench_clone.py            # 100,000 files
    .venv/bin/python bench/bench_clone.py --quick    # 10,000 files, once
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_history import make_tree, run  # the same tree and runner as the commit benchmark

JAM = str(Path(sys.executable).parent / "jam")


def timed(*args, cwd=None, env=None) -> tuple[float, float]:
    """(wall, CPU = user + sys) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = run(*args, cwd=cwd, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--file-bytes", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.files, args.repeat = 10_000, 1
    work = Path(tempfile.mkdtemp(prefix="bench-clone-", dir=os.environ.get("BENCH_DIR")))
    env = dict(os.environ, HOME=str(work / "home"), XDG_DATA_HOME=str(work / "home/data"),
               XDG_CONFIG_HOME=str(work / "home/config"), JAM_MACHINE_ID="bench-a",
               GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@b")
    try:
        src, remote, repo = work / "tree", work / "remote", work / "repo"
        remote.mkdir()
        make_tree(src, args.files, args.file_bytes)
        shutil.copytree(src, repo, symlinks=True)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        run(sys.executable, "-c", "import sys; from jam_core.root import Root; "
            "from jam_core.manager import make_plugin_manager; from jam_core.ops.remotes import add_remote; "
            "r, _ = Root.init(sys.argv[1], default_remote=False); "
            "add_remote(r, make_plugin_manager(), 'vault', sys.argv[2])", src, remote, env=env)
        took = run(JAM, "commit", "-m", "bench", cwd=src, env=env)
        print(f"setup: jam commit of {args.files:,} files: {took:.1f} s", flush=True)
        run("git", "init", "-q", cwd=repo, env=env)
        run("git", "add", "-A", cwd=repo, env=env)
        # packed now, as a repository one clones usually is; and no `git gc --auto` left to start
        # in the background (it repacks under a local clone: "failed to copy file")
        run("git", "-c", "gc.auto=0", "commit", "-q", "-m", "bench", cwd=repo, env=env)
        run("git", "gc", "-q", cwd=repo, env=env)
        run("git", "config", "gc.auto", "0", cwd=repo, env=env)
        jam_t, git_t, jam_c, git_c = [], [], [], []
        for n in range(args.repeat):
            dest = work / f"jam-{n}"
            wall, cpu = timed(JAM, "clone", remote, dest, cwd=work, env=dict(env, JAM_MACHINE_ID=f"bench-{n}"))
            jam_t.append(wall)
            jam_c.append(cpu)
            made = sum(len(f) for _d, _s, f in os.walk(dest)) - sum(
                len(f) for _d, _s, f in os.walk(dest / ".jam"))
            assert made == args.files, f"jam clone made {made} files"
            shutil.rmtree(dest)
            gdest = work / f"git-{n}"
            wall, cpu = timed("git", "clone", "-q", repo, gdest, cwd=work, env=env)
            git_t.append(wall)
            git_c.append(cpu)
            shutil.rmtree(gdest)
            print(f"run {n + 1}: jam clone {jam_t[-1]:.2f} s (CPU {jam_c[-1]:.2f} s), "
                  f"git clone {git_t[-1]:.2f} s (CPU {git_c[-1]:.2f} s)", flush=True)
        j, g = statistics.median(jam_t), statistics.median(git_t)
        jc, gc = statistics.median(jam_c), statistics.median(git_c)
        print(f"clone of {args.files:,} files: jam {j:.2f} s, git {g:.2f} s: jam/git = {j / g:.2f}x wall; "
              f"CPU jam {jc:.2f} s, git {gc:.2f} s: jam/git = {jc / gc:.2f}x (median of {args.repeat})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
