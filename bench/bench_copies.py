"""Stash with ``[place] copies = 2`` over two dir remotes on the same disk, against its peer
measured in the same run: two ``cp -r`` of the same bytes followed by ``sync -f`` (jam writes
both copies and makes them durable before a file becomes a stub). Warm cache for both sides
(dropping caches needs root on the host and is impossible in CI).

  1. one large file (``--large-mib``, 256);
  2. ``--files`` (500) files of ``--file-kib`` (64) KiB.

Each side runs ``--repeat`` (3) times, dirty pages flushed before each step; the median is
reported (the machine may be shared). Goal (PRODUCT.md): a dir remote at >= 0.8x ``cp`` +
``sync``; with two copies the peer is two cp runs.

    .venv/bin/python bench/bench_copies.py            # 256 MiB, 500 x 64 KiB
    .venv/bin/python bench/bench_copies.py --quick    # 64 MiB, 200 x 64 KiB, 2 runs
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import JAM, ROWS, mbps, ratio, record, run, timed, write_random  # noqa: E402


class Bench:
    def __init__(self, work: Path):
        self.work = work
        self.env = {**__import__("os").environ, "XDG_DATA_HOME": str(work / "xdg-data"),
                    "XDG_CONFIG_HOME": str(work / "xdg-config"), "HOME": str(work / "home")}
        (work / "home").mkdir()

    def new_root(self, name: str) -> tuple[Path, list[Path]]:
        """A root whose only remotes are two dir remotes of tier 0, with ``[place] copies = 2``."""
        root = self.work / name
        remotes = [self.work / f"{name}-mirror-a", self.work / f"{name}-mirror-b"]
        root.mkdir()
        run(JAM, "init", root, env=self.env)
        for r, label in zip(remotes, "ab", strict=True):
            r.mkdir()
            run(JAM, "remote", "add", label, r, cwd=root, env=self.env)
        run(JAM, "remote", "remove", "default", cwd=root, env=self.env)
        with open(root / ".jam" / "config.toml", "a") as f:
            f.write("\n[place]\ncopies = 2\n")
        return root, remotes

    def stash_vs_cp(self, case: str, make, nbytes: int, target: str, repeat: int) -> None:
        root, remotes = self.new_root(case.replace(" ", "-"))
        make(root)
        src = root / target
        peer = self.work / f"{case.replace(' ', '-')}-peer"
        run("cat", *(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src])  # warm the cache
        times: dict[str, list[float]] = {"2 x cp + sync": [], "jam stash": []}

        def settle():  # nobody pays for flushing what an earlier step left dirty
            run("sync", "-f", self.work)

        for _ in range(repeat):
            peer.mkdir()
            settle()
            t = timed("cp", "-r", src, peer / "a") + timed("cp", "-r", src, peer / "b") + timed("sync", "-f", peer)
            times["2 x cp + sync"].append(t)
            settle()
            times["jam stash"].append(timed(JAM, "stash", target, cwd=root, env=self.env))
            for r in remotes:  # both mirrors hold every object
                if not any((r / "objects").rglob("*")):
                    sys.exit(f"bench: mirror {r} received nothing")
            run(JAM, "checkout", target, cwd=root, env=self.env)
            shutil.rmtree(peer)
            for r in remotes:  # the next stash stores everything again
                shutil.rmtree(r / "objects" / "b3")
        for who, ts in times.items():
            record(case, who, mbps(nbytes, statistics.median(ts)), "MB/s")
            print(f"  {'':<28} {who:<22} runs: {', '.join(f'{t:.2f}s' for t in ts)}", flush=True)
        print(f"  {case:<28} jam / (2 x cp + sync) {ratio(case, 'jam stash', '2 x cp + sync')} (goal >= 0.8x)")
        shutil.rmtree(root)
        for r in remotes:
            shutil.rmtree(r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 MiB, 200 files, 2 runs")
    ap.add_argument("--large-mib", type=int, default=None)
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--file-kib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--only", choices=("large", "small"))
    ap.add_argument("--dir", help="work in this directory (default: a temporary one under /tmp)")
    args = ap.parse_args()
    large = (args.large_mib or (64 if args.quick else 256)) << 20
    files = args.files or (200 if args.quick else 500)
    size = args.file_kib << 10
    repeat = args.repeat or (2 if args.quick else 3)

    with tempfile.TemporaryDirectory(prefix="bench-copies-", dir=args.dir) as tmp:
        b = Bench(Path(tmp))
        print(f"[place] copies = 2 over two dir remotes on one disk ({tmp}); median of {repeat} runs")
        if args.only in (None, "large"):
            b.stash_vs_cp(f"1 file of {large >> 20} MiB", lambda root: write_random(root / "big", large), large,
                          "big", repeat)
        if args.only in (None, "small"):
            def make(root):
                d = root / "small"
                d.mkdir()
                for i in range(files):
                    write_random(d / f"f{i:05d}", size)
            b.stash_vs_cp(f"{files} files of {size >> 10} KiB", make, files * size, "small", repeat)
    if not ROWS:
        sys.exit("bench: nothing measured")


if __name__ == "__main__":
    main()
