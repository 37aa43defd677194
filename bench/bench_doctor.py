"""`jam doctor` against a peer measured in the same run (warm cache, as bench_core.py).

  1. `jam doctor` (no --deep) over ``--stubs`` (100,000) stubs whose objects sit on a ``dir``
     remote, against ``find ROOT -printf '%s %b\\n'`` over the same tree (goal: within 3x).
     The stubs and objects are written directly (fsync skipped): stashing 100,000 files only
     to build the fixture would take many minutes.
  1b. `jam doctor` over ``--locals`` (100,000) ordinary local files (the common tree: nothing
     stubbed), against the same find; wall and CPU time (CPU is steadier on a loaded machine).
  2. `jam doctor --deep` throughput over ``--deep-mib`` (1024) MiB of objects in files of
     ``--deep-file-mib`` (32) MiB, against ``b3sum`` of the same object files (goal: >= 0.8x).

    .venv/bin/python bench/bench_doctor.py            # full run
    .venv/bin/python bench/bench_doctor.py --quick    # 10,000 stubs, 256 MiB
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
JAM = str(Path(sys.executable).parent / "jam")


def best(argv, cwd=None, env=None, runs=3, ok=(0,), cpu: list | None = None) -> float:
    """The fastest of ``runs`` runs (seconds); ``cpu`` gets the least user+system CPU time."""
    import resource

    times, cpus = [], []
    for _ in range(runs):
        u0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        res = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - t0)
        u1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(u1.ru_utime - u0.ru_utime + u1.ru_stime - u0.ru_stime)
        if res.returncode not in ok:
            raise SystemExit(f"{argv[:3]} exited {res.returncode}: {res.stderr.decode()[-400:]}")
    if cpu is not None:
        cpu.append(min(cpus))
    return min(times)


def build_locals(root, n: int, per_dir: int = 1000) -> None:
    """``n`` ordinary files of 100 B to 3 KB (writable, written out in full)."""
    for i in range(n):
        d = root.path / f"l{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(exist_ok=True)
        (d / f"file{i:06d}.txt").write_bytes(b"x" * (100 + (i * 37) % 3000))
    subprocess.run(["sync", "-f", str(root.path)])


def make_root(base: Path, env: dict):
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.remotes import add_remote
    from jam_core.root import Root

    os.environ.update(env)
    root_path, remote = base / "root", base / "remote"
    root_path.mkdir(parents=True)
    remote.mkdir()
    root, _ = Root.init(root_path, register=False)
    add_remote(root, make_plugin_manager(), "bench", str(remote))
    return root, remote


def build(root, remote: Path, sizes: list[int], per_dir: int = 1000) -> int:
    """A stub per size, its object (random bytes of that size) on the remote, catalog rows."""
    from jam_core.catalog import Catalog
    from jam_core.hook.index import refresh
    from jam_core.objects import hasher, object_relpath
    from jam_core.stub import StubRecord, write_stub

    rows, total = [], 0
    chunk = os.urandom(1 << 20)
    made: set[Path] = set()
    for i, size in enumerate(sizes):
        off = i % 4096
        if size <= len(chunk) - off:
            data = chunk[off:off + size] + i.to_bytes(8, "little")  # every object distinct
        else:
            data = (chunk * (size // len(chunk) + 2))[off:off + size] + i.to_bytes(8, "little")
        size += 8
        h = hasher()
        h.update(data)
        oid = "b3:" + h.hexdigest()
        final = remote / "objects" / object_relpath(oid)
        if final.parent not in made:
            final.parent.mkdir(parents=True, exist_ok=True)
            made.add(final.parent)
        with open(final, "wb") as f:
            f.write(data)
        d = root.path / f"d{i // per_dir:04d}"
        d.mkdir(exist_ok=True)
        p = d / f"file{i:06d}.dat"
        rec = StubRecord(oid, size, 0o644, 1_700_000_000_000_000_000 + i, ("bench",), "2024-01-01T00:00:00Z")
        sfd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_stub(sfd, rec, p.name, rec.mtime_ns, durable=False)
            st = os.fstat(sfd)
        finally:
            os.close(sfd)
        rows.append((str(p.relative_to(root.path)), oid, size, rec.mtime_ns, rec.stashed_at, st.st_ino,
                     st.st_ctime_ns))
        total += size
    with Catalog(root.jam_dir / "catalog.db") as cat:
        cat.replace_stubs(rows)
        with cat.transaction():
            for r in rows:
                cat.record_location(r[1], "bench", r[2])
        refresh(root, cat)
    subprocess.run(["sync", "-f", str(root.path)])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--stubs", type=int, default=100_000)
    ap.add_argument("--locals", type=int, default=100_000)
    ap.add_argument("--deep-mib", type=int, default=1024)
    ap.add_argument("--deep-file-mib", type=int, default=32)
    args = ap.parse_args()
    if args.quick:
        args.stubs, args.locals, args.deep_mib = 10_000, 10_000, 256
    base = Path(tempfile.mkdtemp(prefix="jam-bench-doctor-"))
    env = dict(os.environ, HOME=str(base / "home"), XDG_DATA_HOME=str(base / "home/.local/share"),
               XDG_CONFIG_HOME=str(base / "home/.config"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # jam as installed: its modules compiled once, not per run
    try:
        # 1. doctor over many stubs vs find
        root, remote = make_root(base / "many", env)
        t0 = time.perf_counter()
        build(root, remote, [1000 + (i * 37) % 3000 for i in range(args.stubs)])
        print(f"built {args.stubs} stubs and objects in {time.perf_counter() - t0:.1f}s", flush=True)
        find = best(["find", str(root.path), "-printf", "%s %b\n"])
        doc = best([JAM, "doctor"], cwd=root.path, env=env, ok=(0,))
        print(f"doctor, {args.stubs} stubs:     jam doctor {doc:.3f}s   find -printf {find:.3f}s   "
              f"ratio {doc / find:.2f}x (goal <= 3x)")
        shutil.rmtree(base / "many")

        # 1b. doctor over many local files vs find
        root, remote = make_root(base / "locals", env)
        build_locals(root, args.locals)
        fc, dc = [], []
        find = best(["find", str(root.path), "-printf", "%s %b\n"], cpu=fc)
        doc = best([JAM, "doctor"], cwd=root.path, env=env, cpu=dc)
        print(f"doctor, {args.locals} local files: jam doctor {doc:.3f}s (CPU {dc[0]:.3f}s)   find -printf "
              f"{find:.3f}s (CPU {fc[0]:.3f}s)   ratio {doc / find:.2f}x, CPU {dc[0] / max(fc[0], 1e-6):.2f}x "
              "(goal <= 3x)", flush=True)
        shutil.rmtree(base / "locals")

        # 2. --deep throughput vs b3sum
        n = max(1, args.deep_mib // args.deep_file_mib)
        root, remote = make_root(base / "deep", env)
        total = build(root, remote, [args.deep_file_mib << 20] * n)
        objs = sorted(str(p) for p in (remote / "objects").rglob("*") if p.is_file())
        deep = best([JAM, "doctor", "--deep"], cwd=root.path, env=env)
        plain = best([JAM, "doctor"], cwd=root.path, env=env)  # the same checks without reading objects
        jam_rate = total / deep / 1e6
        print(f"doctor --deep {deep:.3f}s, of which {plain:.3f}s is doctor without --deep (start-up, set-up "
              f"checks): the reading itself at {total / max(deep - plain, 1e-6) / 1e6:.0f} MB/s")
        b3 = shutil.which("b3sum")
        if b3 is None:
            print(f"doctor --deep, {total >> 20} MiB: {jam_rate:.0f} MB/s; b3sum is not installed (apt install b3sum)")
            return
        peer = best([b3, *objs])
        peer1 = best([b3, "--num-threads", "1", *objs])
        print(f"doctor --deep, {total >> 20} MiB: jam {jam_rate:.0f} MB/s   b3sum {total / peer / 1e6:.0f} MB/s "
              f"(1 thread {total / peer1 / 1e6:.0f} MB/s)   ratio {peer / deep:.2f}x "
              f"(vs 1 thread {peer1 / deep:.2f}x; goal >= 0.8x)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
