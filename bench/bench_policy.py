"""Policy selection: ``jam stash --auto --dry-run`` against ``find -printf '%s %T@ %p\\n'``, same tree, same run.

Builds ``--files`` (100,000) small files in ``--dirs`` directories with spread-out ages, sets
``core.min_size = 1`` so every file is a candidate, switches on age, lru and budget together,
pins one directory and ignores a pattern, then times (best of ``--repeat``, warm cache):

  * ``find ROOT -printf '%s %T@ %p\\n'`` (the peer: one stat per entry, one line out per entry);
  * ``jam stash --auto --dry-run`` (the whole command: start-up, one scan, the catalog's uses
    and pins, .jamignore, three policies, merging, printing the plan).

Prints both times and the ratio (wall clock, and CPU time: user + system, the steadier figure on
a shared machine). Selection reads metadata once (one scan), never a stat per policy.
``--age-only`` switches on the age policy alone, with no pin and no .jamignore (the issue's case).
1,000,000 files, status and doctor: bench/bench_million.py.

    .venv/bin/python bench/bench_policy.py                # 100,000 files
    .venv/bin/python bench/bench_policy.py --files 20000  # quick
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JAM = Path(sys.executable).parent / "jam"
DAY = 86400


def build(root: Path, files: int, dirs: int) -> None:
    now = time.time()
    per = max(1, files // dirs)
    n = 0
    for d in range(dirs):
        sub = root / f"d{d:04d}"
        sub.mkdir()
        for i in range(per if d < dirs - 1 else files - n):
            p = sub / f"f{i:05d}.{('jpg', 'txt', 'bin', 'log')[i % 4]}"
            with open(p, "wb") as f:
                f.write(b"x" * (100 + (n % 900)))
            t = now - (n % 400) * DAY
            os.utime(p, (t, t))
            n += 1


def best(cmd: list[str], env: dict, repeat: int, cwd: Path) -> tuple[float, str, float]:
    """(best wall time, output, best CPU time) of ``repeat`` runs."""
    times, cpus, out = [], [], ""
    for _ in range(repeat):
        t = time.perf_counter()
        before = os.times()
        res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        after = os.times()
        cpus.append(after.children_user - before.children_user + after.children_system - before.children_system)
        if res.returncode != 0:
            sys.exit(f"{cmd[0]} failed ({res.returncode}): {res.stderr.strip()}")
        out = res.stdout
    return min(times), out, min(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--age-only", action="store_true", help="the age policy alone, no pin, no .jamignore")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="jam-bench-policy-", dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        work = Path(tmp)
        home = work / "home"
        env = dict(os.environ, HOME=str(home), XDG_DATA_HOME=str(home / ".local/share"),
                   XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"))
        root = work / "root"
        root.mkdir()
        t = time.perf_counter()
        build(root, args.files, args.dirs)
        print(f"built {args.files} files in {args.dirs} directories in {time.perf_counter() - t:.1f}s")
        subprocess.run([str(JAM), "init", str(root)], env=env, check=True, capture_output=True)
        cfg = root / ".jam" / "config.toml"
        policies = '\n[policy.age]\nolder_than = "300d"\n'
        if not args.age_only:
            subprocess.run([str(JAM), "pin", "d0000"], env=env, cwd=root, check=True, capture_output=True)
            (root / ".jamignore").write_text("*.log\n")
            policies += '[policy.lru]\nkeep = "50%"\n[policy.budget]\nmax_local = "40MB"\nlow = "30MB"\n'
        cfg.write_text(cfg.read_text().replace('min_size = "64KiB"', 'min_size = "1"') + policies)

        find = ["find", str(root), "-printf", "%s %T@ %p\n"]
        best(find, env, 1, root)  # warm the caches
        best([str(JAM), "stash", "--auto", "--dry-run"], env, 1, root)
        peer, found, peer_cpu = best(find, env, args.repeat, root)
        ours, plan, our_cpu = best([str(JAM), "stash", "--auto", "--dry-run"], env, args.repeat, root)
        startup, _, _ = best([str(JAM), "--version"], env, args.repeat, root)
        print(plan.strip().splitlines()[-2])
        print(plan.strip().splitlines()[-1])
        print(f"find -printf:              {peer * 1000:8.1f} ms  cpu {peer_cpu * 1000:7.1f} ms  "
              f"({len(found.splitlines())} entries)")
        print(f"jam stash --auto --dry-run: {ours * 1000:7.1f} ms  cpu {our_cpu * 1000:7.1f} ms  "
              f"({len(plan.splitlines()) - 2} planned)")
        print(f"  (jam --version alone:    {startup * 1000:8.1f} ms)")
        print(f"ratio jam/find: {ours / peer:.2f}x wall, {our_cpu / peer_cpu:.2f}x cpu (goal <= 2x)")


if __name__ == "__main__":
    main()
