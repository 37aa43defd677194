"""The core's throughput and latency against a peer measured in the same run (warm cache:
dropping caches needs root on the host and is impossible in CI, so every figure is with the
data in the page cache, for jam and its peer alike). Transfers print the median of
``--repeat`` (3) alternating runs of each side, and the ratio of the best runs beside it.

  1. stash / checkout through a ``dir`` remote of one large file (``--large-mib``, 1024) and
     of ``--files`` (2000) files of ``--file-kib`` (64) KiB, against ``cp`` of the same data,
     and ``cp`` + ``sync -f`` (jam makes what it writes durable; cp alone does not);
  2. ``jam status`` over a tree of ``--status-files`` (100,000) files, half of them stubs,
     against ``find ROOT -printf '%s %b\\n'``; the stubs are made directly with
     ``jam_core.stub.write_stub`` (fsync skipped) because stashing 50,000 files only to build
     the tree would take minutes;
  3. start-up: ``jam --version`` against ``python -c pass`` (the same interpreter).

Goals (PRODUCT.md): dir remote >= 0.8x cp; status within 2x find (issue 13: 1.5x; the median
of 11 alternating runs of each, and the ratio of the best runs). If status is slower than 2x
find, a cProfile of an in-process status is printed (``--profile`` forces it).

    .venv/bin/python bench/bench_core.py            # full run (a few minutes)
    .venv/bin/python bench/bench_core.py --quick    # 256 MiB, 500 files, 20,000-file status
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PY = sys.executable
JAM = str(Path(sys.executable).parent / "jam")
ROWS: list[tuple[str, str, float, str]] = []


def write_random(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left, i = size, 0
        while left > 0:
            chunk = block if left >= len(block) else block[:left]
            f.write(i.to_bytes(8, "little") + chunk[8:])  # every MiB differs: nothing dedupes
            left -= len(chunk)
            i += 1


def run(*argv, cwd=None, env=None, out=subprocess.DEVNULL) -> None:
    res = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, stdout=out, stderr=subprocess.PIPE)
    if res.returncode != 0:
        sys.exit(f"bench: {' '.join(map(str, argv))} failed ({res.returncode}): {res.stderr.decode()[-2000:]}")


CPU: list[float] = [0.0]  # user + sys seconds of the children the last timed() ran


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(*argv, cwd=None, env=None) -> float:
    """Wall seconds of one command; its CPU time (user + sys) is left in ``CPU[0]``."""
    c = _children_cpu()
    t = time.perf_counter()
    run(*argv, cwd=cwd, env=env)
    wall = time.perf_counter() - t
    CPU[0] = _children_cpu() - c
    return wall


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def record(case: str, who: str, value: float, unit: str) -> None:
    ROWS.append((case, who, value, unit))
    print(f"  {case:<28} {who:<22} {value:>10.1f} {unit}", flush=True)


def ratio(case: str, a: str, b: str) -> str:
    va = next(v for c, w, v, _ in ROWS if c == case and w == a)
    vb = next(v for c, w, v, _ in ROWS if c == case and w == b)
    return f"{va / vb:.2f}x"


class Bench:
    def __init__(self, work: Path):
        self.work = work
        self.env = dict(os.environ, XDG_DATA_HOME=str(work / "xdg-data"), XDG_CONFIG_HOME=str(work / "xdg-config"),
                        HOME=str(work / "home"))
        (work / "home").mkdir()

    def new_root(self, name: str) -> tuple[Path, Path]:
        root, remote = self.work / name, self.work / f"{name}-remote"
        root.mkdir()
        remote.mkdir()
        run(JAM, "init", root, env=self.env)
        run(JAM, "remote", "add", "bench", remote, cwd=root, env=self.env)
        # stash to the bench remote only (init added the embedded default too)
        run(JAM, "remote", "remove", "default", cwd=root, env=self.env)
        return root, remote

    # -- 1. transfers ---------------------------------------------------------------------
    def transfers(self, case: str, make, nbytes: int, target: str, repeat: int) -> None:
        """Each side stores and fetches ``repeat`` times, alternating in one run; the median
        run of each side counts (the best is printed beside it: the machine may be shared)."""
        root, remote = self.new_root(case.replace(" ", "-"))
        make(root)
        peer = self.work / f"{case.replace(' ', '-')}-peer"
        src = root / target
        # warm the cache for everyone: read the data once
        run("cat", *(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src])
        runs: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}

        ballast = self.work / "ballast"

        def settle():  # nobody pays for flushing what an earlier step left dirty
            # Every timed step starts with the same blocks just freed: on ext4 new blocks cost
            # up to 10x blocks freed a moment ago (1.4 s against 0.15 s for `cp` of 512 MiB here),
            # so whoever wrote after a removal (the stash's, the rm between runs) was favoured.
            if ballast.exists():
                ballast.unlink()
            run("sync", "-f", self.work)

        def reballast():  # the space the next step is given, made before it (untimed)
            with open(ballast, "wb") as f:
                f.truncate(0)
                chunk = b"\xa5" * (1 << 20)
                for _ in range(max(1, nbytes >> 20)):
                    f.write(chunk)

        def take(step, who, seconds, cpu_seconds=None):
            runs.setdefault((step, who), []).append(seconds)
            cpu.setdefault((step, who), []).append(CPU[0] if cpu_seconds is None else cpu_seconds)

        def cp_sync(source, dest):  # wall and CPU of cp, then of sync -f, added
            wall = timed("cp", "-r", source, dest)
            spent = CPU[0]
            wall += timed("sync", "-f", dest)
            return wall, spent + CPU[0]

        for _ in range(repeat):
            peer.mkdir()
            reballast()
            settle()
            take("store", "cp", timed("cp", "-r", src, peer / "a"))
            reballast()
            settle()
            take("store", "cp + sync", *cp_sync(src, peer / "b"))
            reballast()
            settle()
            take("store", "jam", timed(JAM, "stash", target, cwd=root, env=self.env))
            reballast()
            settle()
            take("fetch", "cp", timed("cp", "-r", peer / "a", peer / "c"))
            reballast()
            settle()
            take("fetch", "cp + sync", *cp_sync(peer / "a", peer / "d"))
            reballast()
            settle()
            take("fetch", "jam", timed(JAM, "checkout", target, cwd=root, env=self.env))
            shutil.rmtree(peer)
            shutil.rmtree(remote / "objects" / "b3")  # the next stash stores everything again
        for step, verb in (("store", "jam stash"), ("fetch", "jam checkout")):
            c = f"{case}: {step}"
            for who in ("cp", "cp + sync"):
                record(c, who, mbps(nbytes, statistics.median(runs[step, who])), "MB/s")
            record(c, verb, mbps(nbytes, statistics.median(runs[step, "jam"])), "MB/s")
            best = min(runs[step, "cp + sync"]) / min(runs[step, "jam"])
            print(f"  {c:<28} median of {repeat}: jam / cp {ratio(c, verb, 'cp')}, jam / (cp + sync) "
                  f"{ratio(c, verb, 'cp + sync')} (goal >= 0.8x); best runs: {best:.2f}x", flush=True)
            wall_s = {who: statistics.median(runs[step, who]) for who in ("cp + sync", "jam")}
            cpu_s = {who: statistics.median(cpu[step, who]) for who in ("cp + sync", "jam")}
            print(f"  {c:<28} median wall / CPU (user+sys): {verb} {wall_s['jam']:.2f} s / "
                  f"{cpu_s['jam']:.2f} s, cp + sync {wall_s['cp + sync']:.2f} s / {cpu_s['cp + sync']:.2f} s",
                  flush=True)
        shutil.rmtree(remote)
        shutil.rmtree(root)

    def large(self, size: int, repeat: int) -> None:
        self.transfers(f"1 file of {size >> 20} MiB", lambda root: write_random(root / "big", size), size, "big",
                       repeat)

    def small(self, count: int, size: int, repeat: int) -> None:
        def make(root):
            d = root / "small"
            d.mkdir()
            for i in range(count):
                write_random(d / f"f{i:05d}", size)
        self.transfers(f"{count} files of {size >> 10} KiB", make, count * size, "small", repeat)

    # -- 2. status ------------------------------------------------------------------------
    def status(self, nfiles: int, profile: bool) -> None:
        root, remote = self.new_root("status")
        t0 = time.perf_counter()
        build_status_tree(root, nfiles)
        print(f"  (built {nfiles} files, half stubs, in {time.perf_counter() - t0:.1f} s)", flush=True)
        jam_status = [JAM, "status", root]
        find = ["find", root, "-printf", "%s %b\\n"]
        for argv in (jam_status, find):  # warm the dentry and inode caches
            run(*argv, env=self.env)
        js, fs = [], []
        for _ in range(11):  # alternating: a machine that slows down for a while slows both
            js.append(timed(*jam_status, env=self.env))
            fs.append(timed(*find))
        case = f"status over {nfiles} files"
        tj, tf = statistics.median(js), statistics.median(fs)
        record(case, "find -printf (median)", tf * 1000, "ms")
        record(case, "jam status (median)", tj * 1000, "ms")
        record(case, "find -printf (best)", min(fs) * 1000, "ms")
        record(case, "jam status (best)", min(js) * 1000, "ms")
        tjs = min(timed(JAM, "status", "--json", root, env=self.env) for _ in range(3))
        record(case, "jam status --json", tjs * 1000, "ms")
        print(f"  {case:<28} jam / find {tj / tf:.2f}x median of 11, {min(js) / min(fs):.2f}x best "
              "(issue 13's goal: <= 1.5x)")
        if profile or tj > 2 * tf:
            profile_status(root, self.env)
        shutil.rmtree(root)
        shutil.rmtree(remote)

    # -- 3. start-up ----------------------------------------------------------------------
    def startup(self, n: int) -> None:
        for argv in ([PY, "-c", "pass"], [JAM, "--version"]):
            run(*argv)
        py = statistics.median(timed(PY, "-c", "pass") for _ in range(n)) * 1000
        jam = statistics.median(timed(JAM, "--version") for _ in range(n)) * 1000
        record("start-up (median)", "python -c pass", py, "ms")
        record("start-up (median)", "jam --version", jam, "ms")
        print(f"  {'start-up (median)':<28} jam costs {jam - py:.1f} ms more than a bare interpreter")


def build_status_tree(root: Path, nfiles: int, per_dir: int = 1000) -> None:
    """``nfiles`` files in directories of ``per_dir``: even ones local (4 KiB to 60 KiB of
    bytes), odd ones stubs of 100 KiB to 10 MiB written directly as jam would (fsync skipped)
    and recorded in the catalog as a stash records them."""
    import random

    from jam_core.catalog import Catalog
    from jam_core.stub import StubRecord, write_stub

    rows = []

    rng = random.Random(1)
    real_fsync = os.fsync
    os.fsync = lambda fd: None  # building the fixture only: durability does not matter here
    try:
        payload = os.urandom(64 << 10)
        for i in range(nfiles):
            d = root / f"d{i // per_dir:04d}"
            if i % per_dir == 0:
                d.mkdir()
            p = d / f"file{i:06d}.dat"
            if i % 2 == 0:
                with open(p, "wb") as f:
                    f.write(payload[: rng.randrange(4 << 10, 60 << 10)])
            else:
                size = rng.randrange(100 << 10, 10 << 20)
                rec = StubRecord(oid="b3:" + rng.randbytes(32).hex(), size=size, mode=0o644,
                                 mtime_ns=1_700_000_000_000_000_000 + i, remotes=("bench",),
                                 stashed_at="2024-01-01T00:00:00Z")
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    write_stub(fd, rec, p.name, rec.mtime_ns)
                finally:
                    os.close(fd)
                st = os.lstat(p)  # the stamp a stash records: inode and ctime once the stub is made
                rows.append((str(p.relative_to(root)), rec.oid, rec.size, rec.mtime_ns, rec.stashed_at,
                             st.st_ino, st.st_ctime_ns))
    finally:
        os.fsync = real_fsync
    with Catalog(root / ".jam" / "catalog.db") as cat:
        cat.replace_stubs(rows)
    run("sync", "-f", root)


def profile_status(root: Path, env: dict) -> None:
    """Where an in-process status spends its time (cProfile, top functions by own time)."""
    code = (
        "import cProfile, pstats, sys, time\n"
        "from jam_core.root import Root\n"
        "from jam_core.ops.status import status\n"
        "r = Root.find(sys.argv[1])\n"
        "t = time.perf_counter(); status(r); print(f'  in-process status (no start-up): "
        "{(time.perf_counter() - t) * 1000:.0f} ms')\n"
        "cProfile.run('status(r)', '/tmp/jam-status.prof')\n"
        "pstats.Stats('/tmp/jam-status.prof').sort_stats('tottime').print_stats(12)\n"
    )
    print("  profile of jam status (cProfile, by own time):")
    subprocess.run([PY, "-c", code, str(root)], env=env, check=True)


def warm_bytecode() -> None:
    """Compile jam's modules once, as an installed package is: with PYTHONDONTWRITEBYTECODE set
    (as in this sandbox) and stale ``.pyc`` files (any module edited since), every jam the
    benchmark starts would compile them again, and that would be counted as jam's time."""
    import compileall

    for top in ("jam_core", "plugins"):
        compileall.compile_dir(str(REPO / top), quiet=2)


def filesystem(path: Path) -> str:
    """The filesystem ``path`` lies on, for the figures' reader: its type, device, mount options
    and (ext4/ext3) whether it has a journal. Two settings of the disk change what jam pays and
    ``cp`` does not: ``discard`` (freeing a stashed original's blocks waits for the device) and
    ext4 without a journal (every new inode is searched past the ones freed in the last minute)."""
    where = os.path.realpath(path)
    best = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) < 6 or len(tail) < 3:
                    continue
                point = fields[4].replace("\\040", " ")
                inside = where == point or where.startswith(point.rstrip("/") + "/")
                if inside and (best is None or len(point) >= len(best[0])):
                    best = (point, tail[0], tail[1], ",".join(dict.fromkeys(fields[5].split(",") + tail[2].split(","))))
    except OSError:
        return "filesystem: unknown"
    if best is None:
        return "filesystem: unknown"
    point, kind, source, options = best
    text = f"filesystem: {kind} on {source} at {point} ({options})"
    if kind in ("ext4", "ext3"):
        dev = os.path.basename(source)
        text += "; journal: " + ("yes" if os.path.exists(f"/proc/fs/jbd2/{dev}-8") else "no")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes: 256 MiB, 500 files, 20,000 for status")
    ap.add_argument("--large-mib", type=int, help="size of the large file (MiB, default 1024)")
    ap.add_argument("--files", type=int, help="number of small files (default 2000)")
    ap.add_argument("--file-kib", type=int, default=64, help="size of each small file (KiB)")
    ap.add_argument("--status-files", type=int, help="files in the status tree (default 100000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per transfer case; the median of each side counts")
    ap.add_argument("--only", choices=("large", "small", "status", "startup"), action="append")
    ap.add_argument("--profile", action="store_true", help="always profile jam status")
    ap.add_argument("--workdir", help="where to put files (default: a temp dir; same disk for jam and cp)")
    args = ap.parse_args()
    large = (args.large_mib or (256 if args.quick else 1024)) << 20
    files = args.files or (500 if args.quick else 2000)
    status_files = args.status_files or (20_000 if args.quick else 100_000)
    only = set(args.only or ("large", "small", "status", "startup"))

    work = Path(tempfile.mkdtemp(prefix="jam-bench-", dir=args.workdir))
    warm_bytecode()
    print(f"jam core benchmarks in {work} (warm cache, jam's bytecode compiled; MB = 10^6 bytes; "
          f"{os.cpu_count()} CPUs)")
    print(f"  {filesystem(work)}")
    try:
        b = Bench(work)
        if "large" in only:
            b.large(large, args.repeat)
        if "small" in only:
            b.small(files, args.file_kib << 10, args.repeat)
        if "status" in only:
            b.status(status_files, args.profile)
        if "startup" in only:
            b.startup(20)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
