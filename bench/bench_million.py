"""Scans at scale: `jam status`, `jam stash --auto --dry-run` and `jam doctor` against
``find ROOT -printf '%s %T@ %p\\n'`` over the same tree, in the same run, with each command's
peak memory (its own ``ru_maxrss``, from ``wait4``).

The tree: ``--files`` files (100,000; 1,000,000 with ``--million`` or ``JAM_BENCH_MILLION=1``)
in directories of ``--per-dir`` (1000), mostly empty or tiny local files with ages spread over
400 days, and one in ``--stub-every`` (10) a stub. Stubs are made fast: the records are jam's
own (``StubRecord``, its header, its ``user.jam`` xattr, read-only, sparse), written without
fsync; they share ``--objects`` (1000) small objects on a ``dir`` remote, and the catalog gets
their rows with the inode and ctime stamps a stash records.

A large root is walked by two processes (``scan.scan_shared``: status and the dry-run): a
command's CPU time and peak RSS from ``wait4`` include its helper's (reaped before it exits).

Cases (median of ``--repeat`` runs, warm cache):

  * find -printf (the peer: one stat per file, one line out per file);
  * jam status, first after the catalog lost its stamps (as after `mv` of the stubs or a
    rebuilt catalog: every stub is read once and its stamp recorded), then repeated with
    nothing changed (every stub trusted from its stat, nothing opened);
  * jam stash --auto --dry-run with the age policy (older_than 300d, min_size 1: about a
    quarter of the local files are nominated and printed);
  * jam doctor (no --deep);
  * the cd hook's fetch in this root: ``jam hook-fetch`` of a directory holding 3 stubs of 64
    KiB (stashed again before each run): what a cd that fetches pays at this size over one
    that starts nothing (the hook's own test is a builtin ``stat``), index update included.

    .venv/bin/python bench/bench_million.py              # 100,000 files
    .venv/bin/python bench/bench_million.py --million    # 1,000,000 files (a few minutes to build)
    .venv/bin/python bench/bench_million.py --keep DIR   # build once into DIR, reuse it next time
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
JAM = str(Path(sys.executable).parent / "jam")
DAY = 86400
GIB = 1 << 30


def build(base: Path, env: dict, nfiles: int, per_dir: int, stub_every: int, nobjects: int) -> Path:
    """The tree under ``base/root``, its objects on ``base/remote``, its catalog rows."""
    os.environ.update(env)
    from jam_core.catalog import Catalog
    from jam_core.fs import setxattr
    from jam_core.hook.index import refresh
    from jam_core.manager import make_plugin_manager
    from jam_core.objects import hasher, object_relpath
    from jam_core.ops.remotes import add_remote
    from jam_core.root import Root
    from jam_core.stub import XATTR, StubRecord

    root_path, remote = base / "root", base / "remote"
    root_path.mkdir(parents=True)
    remote.mkdir()
    root, _ = Root.init(root_path, register=False)
    add_remote(root, make_plugin_manager(), "bench", str(remote))
    root.update_config(lambda c: c.setdefault("core", {}).__setitem__("min_size", "1"))
    root.update_config(lambda c: c.setdefault("policy", {}).__setitem__("age", {"older_than": "300d"}))

    objects = []  # (oid, size) of the shared objects
    for i in range(nobjects):
        data = i.to_bytes(8, "little") * (64 + i % 512)
        h = hasher()
        h.update(data)
        oid = "b3:" + h.hexdigest()
        final = remote / "objects" / object_relpath(oid)
        final.parent.mkdir(parents=True, exist_ok=True)
        final.write_bytes(data)
        objects.append((oid, len(data)))

    now_ns = time.time_ns()
    payload = b"jam bench " * 30
    rows = []
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    dfd = -1
    try:
        for n in range(nfiles):
            if n % per_dir == 0:
                if dfd >= 0:
                    os.close(dfd)
                dname = f"d{n // per_dir:05d}"
                os.mkdir(root_path / dname)
                dfd = os.open(root_path / dname, os.O_RDONLY | os.O_DIRECTORY)
            mtime_ns = now_ns - (n * 7919 % 400) * DAY * 10**9
            if n % stub_every == stub_every - 1:
                name = f"s{n:07d}.dat"
                oid, size = objects[n % nobjects]
                rec = StubRecord(oid, size, 0o644, mtime_ns, ("bench",), "2024-01-01T00:00:00Z")
                fd = os.open(name, flags, 0o600, dir_fd=dfd)
                try:
                    os.write(fd, rec.header(name)[:size])
                    os.ftruncate(fd, size)
                    setxattr(fd, XATTR, rec.pack())
                    os.fchmod(fd, 0o444)
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                rows.append((f"{dname}/{name}", oid, size, mtime_ns, rec.stashed_at, st.st_ino, st.st_ctime_ns))
            else:
                name = f"f{n:07d}.{('txt', 'jpg', 'log', 'bin')[n % 4]}"
                fd = os.open(name, flags, 0o644, dir_fd=dfd)
                try:
                    if n % 3:
                        os.write(fd, payload[: n % 300])
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
                finally:
                    os.close(fd)
            if n and n % 100_000 == 0:
                print(f"  ... {n} files", flush=True)
    finally:
        if dfd >= 0:
            os.close(dfd)
    with Catalog(root.jam_dir / "catalog.db") as cat:
        cat.replace_stubs(rows)
        with cat.transaction():
            for oid, size in objects:
                cat.record_location(oid, "bench", size)
        refresh(root, cat)
    subprocess.run(["sync", "-f", str(root_path)], check=False)
    return root_path


def forget_stamps(root: Path) -> None:
    """The catalog keeps its stub rows but loses their inode and ctime stamps (as after a
    `mv` of every stub, or a catalog rebuilt by an older jam)."""
    import sqlite3

    con = sqlite3.connect(root / ".jam" / "catalog.db")
    with con:
        con.execute("UPDATE stubs SET ino = NULL, ctime_ns = NULL")
    con.close()


def timed(argv: list[str], cwd=None, env=None, ok=(0,)) -> tuple[float, int, int, float]:
    """(seconds, peak RSS in bytes, bytes written to stdout, CPU seconds) of one run of ``argv``."""
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.PIPE)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stderr.close()
        if proc.returncode not in ok:
            raise SystemExit(f"{' '.join(argv[:4])} exited {proc.returncode}: {err.decode()[-400:]}")
        return elapsed, usage.ru_maxrss * 1024, out.tell(), usage.ru_utime + usage.ru_stime


def line(name: str, ours: tuple, peer: tuple) -> str:
    """One result: wall-clock times and their ratio, CPU times (user + system) and theirs (on
    a shared machine the CPU ratio is the steadier one), peak RSS."""
    t, rss, out, cpu = ours
    tf, cf = peer[0], peer[3]
    return (f"{name:<34} {t:7.3f}s  find {tf:6.3f}s  ratio {t / tf:5.2f}x   cpu {cpu:6.3f}s  find {cf:6.3f}s  "
            f"ratio {cpu / cf:5.2f}x   peak RSS {rss / 2**20:6.1f} MiB  ({out / 2**20:.1f} MiB out)")


def cd_fetch(root: Path, env: dict, repeat: int) -> None:
    """The cd hook's fetch of 3 small stubs in the big root (a cd with nothing to fetch starts
    no process); the stash before each run (3 files, the index updated) is timed too."""
    here = root / "cd-here"
    here.mkdir(exist_ok=True)
    for i in range(3):
        (here / f"f{i}").write_bytes(os.urandom(64 << 10))
    stashes, fetches = [], []
    for _ in range(max(repeat, 3)):
        stashes.append(timed([JAM, "stash", "cd-here"], cwd=root, env=env)[0])
        fetches.append(timed([JAM, "hook-fetch", str(here)], cwd=here, env=dict(env, JAM_BACKGROUND="0"))[0])
    m = statistics.median
    print(f"{'cd fetch of 3 stubs of 64 KiB':<34} {m(fetches) * 1000:7.1f} ms more than a cd with nothing to fetch "
          f"(goal < 75 ms); the stash of the 3 before it: {m(stashes) * 1000:.1f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--million", action="store_true", default=os.environ.get("JAM_BENCH_MILLION") == "1",
                    help="1,000,000 files (also JAM_BENCH_MILLION=1)")
    ap.add_argument("--files", type=int, help="files in the tree (default 100,000; 1,000,000 with --million)")
    ap.add_argument("--per-dir", type=int, default=1000)
    ap.add_argument("--stub-every", type=int, default=10)
    ap.add_argument("--objects", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", metavar="DIR", help="build into DIR (kept) or reuse the tree already there")
    ap.add_argument("--skip", default="", help="comma-separated cases to skip: status,first,dry-run,doctor,cd")
    args = ap.parse_args()
    nfiles = args.files or (1_000_000 if args.million else 100_000)
    skip = set(filter(None, args.skip.split(",")))

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="jam-bench-million-"))
    home = base / "home"
    env = dict(os.environ, HOME=str(home), XDG_DATA_HOME=str(home / ".local/share"),
               XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # jam as installed: its modules compiled once
    root = base / "root"
    try:
        if not (root / ".jam").is_dir():
            t0 = time.perf_counter()
            build(base, env, nfiles, args.per_dir, args.stub_every, args.objects)
            print(f"built {nfiles} files ({nfiles // args.stub_every} stubs) in {time.perf_counter() - t0:.1f}s",
                  flush=True)
        else:
            print(f"reusing the tree in {root}")
        find = ["find", str(root), "-printf", "%s %T@ %p\n"]
        timed(find)
        timed([JAM, "status", str(root)], env=env, ok=(0, 1))  # warm the caches, compile modules
        rows = []

        def case(name, argv, ok=(0,), repeat=args.repeat):
            runs, peers = [], []
            for _ in range(repeat):  # the peer runs beside each run of ours
                runs.append(timed(argv, cwd=root, env=env, ok=ok))
                peers.append(timed(find))
            record(name, runs, peers)

        def record(name, runs, peers):
            ours = (statistics.median(r[0] for r in runs), max(r[1] for r in runs), runs[-1][2],
                    statistics.median(r[3] for r in runs))
            peer = (statistics.median(r[0] for r in peers), 0, 0, statistics.median(r[3] for r in peers))
            rows.append((name, ours, peer))
            print(line(name, ours, peer), flush=True)

        if "first" not in skip:
            runs, peers = [], []
            for _ in range(args.repeat):
                forget_stamps(root)
                runs.append(timed([JAM, "status"], cwd=root, env=env))
                peers.append(timed(find))
            record("status, catalog without stamps", runs, peers)
        if "status" not in skip:
            case("status (repeated, nothing changed)", [JAM, "status"])
        if "dry-run" not in skip:
            case("stash --auto --dry-run (age)", [JAM, "stash", "--auto", "--dry-run"])
        if "doctor" not in skip:
            case("doctor", [JAM, "doctor"], ok=(0, 1), repeat=1 if nfiles > 200_000 else args.repeat)
        if "cd" not in skip:
            cd_fetch(root, env, args.repeat)
        worst = max(r[1][1] for r in rows) if rows else 0
        print(f"peak RSS of any jam command: {worst / 2**20:.1f} MiB ({'under' if worst < GIB else 'OVER'} 1 GiB)")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
