"""rclone remotes: jam stash/checkout through an S3 server against ``rclone copy``, same server, same run.

Starts its own SeaweedFS (``weed mini`` on 127.0.0.1, tests/seaweed.py), makes a bucket, then:
  1. one large file (``--size-mib``, default 1024; ``--quick``: 256): ``jam stash`` (hash, upload
     through the rclone remote, stub) and ``jam checkout`` against ``rclone copyto`` up and down;
  2. ``--files`` (2000) files of ``--file-kib`` (64) KiB: ``jam stash DIR`` / ``jam checkout DIR``
     against ``rclone copy DIR`` up and down (rclone's defaults: 4 transfers).
jam runs as a user runs it (the ``jam`` command in a root whose only remote is
``rclone:seaweed:BUCKET/jam``), so its times include start-up, hashing, stubs and fsyncs.
Prints seconds, MB/s and jam/rclone throughput ratios. Goals (PRODUCT.md): >= 0.8x rclone for the
large file, >= 1.0x for the small files.

    .venv/bin/python bench/bench_rclone.py            # full run
    .venv/bin/python bench/bench_rclone.py --quick    # 256 MiB and 2,000 x 64 KiB
    .venv/bin/python bench/bench_rclone.py --only small
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.seaweed import Seaweed  # noqa: E402

BIN = Path(sys.executable).parent


def write_random(path: Path, size: int, seed: int = 0) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left, i = size, 0
        while left > 0:
            chunk = block if left >= len(block) else block[:left]
            f.write((seed * 1_000_003 + i).to_bytes(8, "little") + chunk[8:])  # no two MiB alike
            left -= len(chunk)
            i += 1


def run(*cmd: str, cwd: Path | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run(list(cmd), cwd=cwd, capture_output=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}")
    return dt


def flush() -> None:
    os.sync()


class Bench:
    def __init__(self, work: Path):
        self.work = work
        self.server = Seaweed(work / "seaweed")
        self.server.start()
        os.environ.update(self.server.env("seaweed"))
        os.environ["RCLONE_CONFIG"] = str(work / "no-rclone.conf")
        self.bucket = "jambench"
        try:
            self.server.make_bucket(self.bucket)
        except BaseException:
            self.server.kill()
            raise
        self.rows: list[tuple[str, float, float, int]] = []
        self.tree = work / "tree"
        self.tree.mkdir()
        jam = str(BIN / "jam")
        run(jam, "init", str(self.tree))
        run(jam, "remote", "add", "s3", f"rclone:seaweed:{self.bucket}/jam", cwd=self.tree)
        run(jam, "remote", "remove", "default", cwd=self.tree)

    def jam(self, *args: str) -> float:
        flush()
        return run(str(BIN / "jam"), *args, cwd=self.tree)

    def rclone(self, *args: str) -> float:
        flush()
        return run(str(BIN / "rclone"), *args)

    def record(self, case: str, jam_s: float, rclone_s: float, nbytes: int) -> None:
        self.rows.append((case, jam_s, rclone_s, nbytes))
        mb = nbytes / 1e6
        print(f"{case:<28} jam {jam_s:7.2f} s ({mb / jam_s:7.1f} MB/s)   rclone {rclone_s:7.2f} s "
              f"({mb / rclone_s:7.1f} MB/s)   ratio {rclone_s / jam_s:5.2f}x", flush=True)

    def large(self, size: int) -> None:
        src = self.tree / "big.bin"
        write_random(src, size, seed=1)
        peer = self.work / "peer-big.bin"
        shutil.copyfile(src, peer)
        up_r = self.rclone("copyto", str(peer), f"seaweed:{self.bucket}/peer/big.bin")
        up_j = self.jam("stash", "big.bin")
        self.record(f"1 x {size >> 20} MiB up", up_j, up_r, size)
        peer.unlink()
        down_r = self.rclone("copyto", f"seaweed:{self.bucket}/peer/big.bin", str(peer))
        down_j = self.jam("checkout", "big.bin")
        self.record(f"1 x {size >> 20} MiB down", down_j, down_r, size)
        src.unlink()
        peer.unlink()

    def small(self, count: int, size: int) -> None:
        d = self.tree / "small"
        d.mkdir()
        for i in range(count):
            write_random(d / f"f{i:05}.bin", size, seed=1000 + i)
        peer = self.work / "peer-small"
        shutil.copytree(d, peer)
        up_r = self.rclone("copy", str(peer), f"seaweed:{self.bucket}/peer/small")
        up_j = self.jam("stash", "small")
        self.record(f"{count} x {size >> 10} KiB up", up_j, up_r, count * size)
        shutil.rmtree(peer)
        down_r = self.rclone("copy", f"seaweed:{self.bucket}/peer/small", str(peer))
        down_j = self.jam("checkout", "small")
        self.record(f"{count} x {size >> 10} KiB down", down_j, down_r, count * size)

    def close(self) -> None:
        self.server.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    ap.add_argument("--size-mib", type=int, help="size of the large file (MiB; default 1024, 256 with --quick)")
    ap.add_argument("--files", type=int, default=2000, help="number of small files")
    ap.add_argument("--file-kib", type=int, default=64, help="size of each small file (KiB)")
    ap.add_argument("--only", choices=("large", "small"))
    ap.add_argument("--workdir", help="where to put files (default: a temp dir)")
    args = ap.parse_args()
    size = (args.size_mib or (256 if args.quick else 1024)) << 20
    work = Path(tempfile.mkdtemp(prefix="jam-bench-rclone-", dir=args.workdir))
    bench = Bench(work)
    try:
        if args.only in (None, "large"):
            bench.large(size)
        if args.only in (None, "small"):
            bench.small(args.files, args.file_kib << 10)
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    print("goals: large >= 0.8x rclone, small files >= 1.0x rclone (ratio = jam's throughput / rclone's)")


if __name__ == "__main__":
    main()
