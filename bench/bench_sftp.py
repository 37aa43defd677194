"""SFTP throughput: the jam_sftp plugin against OpenSSH ``sftp -b`` and rsync, same server, same run.

Starts its own sshd on 127.0.0.1 (tests/sshd.py), then:
  1. one large file (``--size-mib``, default 1024) up and down: jam, ``sftp -b``, rsync over ssh;
  2. ``--files`` (2000) files of ``--file-kib`` (64) KiB up and down through the user's path
     (jam_core.ops.stash.stash / jam_core.ops.checkout.checkout of a directory in a root whose remote is
     the sftp one: hashing, batches through stash_many/fetch_many, stubs), then the backend's
     batch hooks alone (with ``--per-file`` also the per-file hooks: where the time goes),
     ``sftp -b`` (one batch, serial) and ``rsync -W -r`` over ssh. Each case prints its wall
     time and the CPU seconds of the client (jam, or the peer's client) and of the sshd tree.
Every case runs ``--runs`` times (jam and its peers in turn, so the load of a shared machine hits
both); prints MB/s of each run and the ratios of the medians. A large object (>= 64 MiB) goes
in ranges over ``--connections`` connections, a batch of small ones over the free ones. Goals (PRODUCT.md): large >= 0.8x sftp each way; small files
>= 1.5x sftp each way.

    .venv/bin/python bench/bench_sftp.py                      # full run (a few minutes)
    .venv/bin/python bench/bench_sftp.py --size-mib 256 --files 500   # quick
    .venv/bin/python bench/bench_sftp.py --only small                 # the 2,000-file case alone
    .venv/bin/python bench/bench_sftp.py --runs 1                     # one round (default 3: medians)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.sshd import SSHD  # noqa: E402


def write_random(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left = size
        i = 0
        while left > 0:
            chunk = block if left >= len(block) else block[:left]
            # vary each MiB so no layer can dedupe or compress across blocks
            f.write(i.to_bytes(8, "little") + chunk[8:])
            left -= len(chunk)
            i += 1


_SERVER_PID: list[int] = []  # the bench's sshd listener: its tree's CPU is the server's


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and every process below it, including the ones
    that exited and were reaped (their parent's cutime/cstime)."""
    from tests.sshd import _descendants

    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in [pid, *_descendants(pid)]:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / tick


def cpu_now() -> tuple[float, float]:
    """(CPU seconds of this process and its waited children: jam or the peer client, of the sshd tree)."""
    t = os.times()
    server = tree_cpu(_SERVER_PID[0]) if _SERVER_PID else 0.0
    return t.user + t.system + t.children_user + t.children_system, server


def timed(fn) -> tuple[float, float, float]:
    """Wall seconds, client CPU seconds, server CPU seconds of ``fn()``."""
    c0, s0 = cpu_now()
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    c1, s1 = cpu_now()
    return wall, c1 - c0, s1 - s0


def per_file(one, items: list, threads: int) -> None:
    """Call ``one(item, session)`` for every item, serially or from ``threads`` threads."""
    from jam_core.model import Session

    with Session() as s:
        if threads == 1:
            for item in items:
                one(item, s)
        else:
            with ThreadPoolExecutor(threads) as ex:
                list(ex.map(lambda item: one(item, s), items))


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


class Bench:
    def __init__(self, work: Path, connections: int, fsync: bool):
        self.work = work
        self.server = SSHD(work / "sshd").start()
        assert self.server.proc is not None
        _SERVER_PID[:] = [self.server.proc.pid]
        self.home = work / "home"
        self.server.write_home(self.home)
        os.environ["HOME"] = str(self.home)
        os.environ.pop("SSH_AUTH_SOCK", None)
        self.opts = self.server.ssh_options(self.home)
        self.connections = connections
        self.per_file = False  # --per-file: also the per-file hooks (slow; where the time goes)
        self.fsync = fsync
        from jam_core.manager import make_plugin_manager

        self.pm = make_plugin_manager(load_entrypoints=False)
        self.results: list[tuple[str, str, float]] = []
        self.cpu: list[tuple[str, str, float]] = []  # (case, who, CPU seconds of client + sshd)

    def close(self) -> None:
        self.server.kill()

    # -- peers ---------------------------------------------------------------------------------

    def sftp_batch(self, lines: list[str]) -> None:
        batch = self.work / "batch"
        batch.write_text("\n".join(lines) + "\n")
        subprocess.run(
            ["sftp", *self.opts, "-q", "-b", str(batch), self.server.alias],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def rsync(self, src: str, dst: str) -> None:
        ssh = "ssh " + " ".join(self.opts)
        subprocess.run(["rsync", "-W", "-e", ssh, src, dst], check=True)

    # -- jam -------------------------------------------------------------------------------------

    def remote(self, store: Path):
        from jam_core.model import Remote

        for sub in ("objects", "tmp"):
            (store / sub).mkdir(parents=True, exist_ok=True)
        url = f"sftp://{self.server.alias}{store}"
        return Remote(
            name="bench", kind="sftp", url=url, location=url, options={"connections": self.connections, "fsync": self.fsync}
        )

    def jam_up(self, remote, items: list[tuple[str, Path, int]], threads: int) -> None:
        def one(item, s):
            oid, path, size = item
            assert self.pm.hook.stash(remote=remote, oid=oid, source=path, size=size, session=s)

        per_file(one, items, threads)

    def jam_down(self, remote, items: list[tuple[str, Path, int]], threads: int) -> None:
        def one(item, s):
            oid, dest, size = item
            dest.write_bytes(b"")
            assert self.pm.hook.fetch(remote=remote, oid=oid, dest=dest, size=size, session=s)

        per_file(one, items, threads)

    def record(self, case: str, who: str, nbytes: int, timing: tuple[float, float, float]) -> None:
        seconds, client, server = timing
        self.results.append((case, who, mbps(nbytes, seconds)))
        self.cpu.append((case, who, client + server))
        print(f"  {case:<22} {who:<22} {mbps(nbytes, seconds):9.1f} MB/s  ({seconds:.2f} s wall, "
              f"CPU {client:.2f} s client + {server:.2f} s sshd)", flush=True)

    def medians(self, cpu: bool = False) -> dict[tuple[str, str], float]:
        """The median MB/s (or with ``cpu`` the median CPU seconds) of every (case, who) over the runs."""
        import statistics

        runs: dict[tuple[str, str], list[float]] = {}
        for case, who, v in self.cpu if cpu else self.results:
            runs.setdefault((case, who), []).append(v)
        return {k: statistics.median(v) for k, v in runs.items()}

    # -- cases ---------------------------------------------------------------------------------

    def large(self, size: int, with_rsync: bool) -> None:
        from jam_core.objects import hash_file

        src = self.work / "large.bin"
        write_random(src, size)
        oid, _ = hash_file(src)
        print(f"one file of {size / 2**20:.0f} MiB", flush=True)
        # jam
        store = self.work / "store-large"
        remote = self.remote(store)
        self.record("large up", "jam", size, timed(lambda: self.jam_up(remote, [(oid, src, size)], 1)))
        back = self.work / "large.back"
        self.record("large down", "jam", size, timed(lambda: self.jam_down(remote, [(oid, back, size)], 1)))
        back.unlink()
        shutil.rmtree(store)
        # sftp -b
        dst = self.work / "sftp-large"
        dst.mkdir()
        self.record("large up", "sftp -b", size, timed(lambda: self.sftp_batch([f"put {src} {dst}/large.bin"])))
        self.record("large down", "sftp -b", size, timed(lambda: self.sftp_batch([f"get {dst}/large.bin {back}"])))
        back.unlink()
        shutil.rmtree(dst)
        if with_rsync:
            dst.mkdir()
            host = self.server.alias
            self.record("large up", "rsync -W over ssh", size, timed(lambda: self.rsync(str(src), f"{host}:{dst}/large.bin")))
            self.record("large down", "rsync -W over ssh", size, timed(lambda: self.rsync(f"{host}:{dst}/large.bin", str(back))))
            back.unlink()
            shutil.rmtree(dst)
        src.unlink()

    def small(self, count: int, size: int, with_rsync: bool) -> None:
        """``count`` files through the path a user takes: ``jam stash DIR`` / ``jam checkout DIR``.

        jam_core.ops.stash.stash and jam_core.ops.checkout.checkout on a root whose only remote is the
        sftp one: scan, hash, batches through stash_many/fetch_many, sync, stubs written and
        swapped (and the reverse). Beside it, the backend's hooks alone (the same batches, no
        core work) and with ``--per-file`` the per-file hooks, to show where the time goes.
        """
        from jam_core.model import Session
        from jam_core.objects import hash_file
        from jam_core.ops.checkout import checkout
        from jam_core.ops.remotes import add_remote
        from jam_core.ops.stash import stash
        from jam_core.root import Root

        tree = self.work / "root"
        tree.mkdir()
        src = tree / "small"
        src.mkdir()
        files = []
        for i in range(count):
            p = src / f"f{i:05}"
            p.write_bytes(i.to_bytes(8, "little") + os.urandom(size - 8))
            files.append(p)
        total = count * size
        print(f"{count} files of {size // 1024} KiB", flush=True)

        # jam, the user's path
        store = self.work / "store-small"
        store.mkdir()
        root, _ = Root.init(tree, register=False)
        add_remote(root, self.pm, "far", f"sftp://{self.server.alias}{store}",
                   options={"connections": self.connections, "fsync": self.fsync})
        root = Root(tree)
        os.sync()  # the files just written must not be flushed during the timed part

        def up() -> None:
            with Session() as s:
                res = stash(root, ["small"], self.pm, s)
            assert len(res.done) == count and not res.failed, (res.failed[:3], res.skipped[:3], res.aborted)

        def down() -> None:
            with Session() as s:
                res = checkout(root, ["small"], self.pm, s)
            assert len(res.done) == count and not res.failed, (res.failed[:3], res.skipped[:3], res.aborted)

        self.record("small up", "jam stash (core)", total, timed(up))
        os.sync()
        self.record("small down", "jam checkout (core)", total, timed(down))
        shutil.rmtree(store)

        # the backend's hooks alone, and the per-file hook
        items = [(hash_file(p)[0], p, size) for p in files]
        cases = [("jam stash_many hook", True)] + ([("jam per-file hook", False)] if self.per_file else [])
        for label, batch in cases:
            store = self.work / "store-hooks"
            remote = self.remote(store)
            os.sync()
            self.record("small up", label, total, timed(lambda: self.jam_up_hooks(remote, items, batch)))
            down_dir = self.work / "small-back"
            down_dir.mkdir()
            back = [(oid, down_dir / p.name, n) for oid, p, n in items]
            for _, dest, _ in back:
                dest.write_bytes(b"")
            os.sync()
            self.record("small down", label.replace("stash_many", "fetch_many"), total,
                        timed(lambda: self.jam_down_hooks(remote, back, batch)))
            shutil.rmtree(down_dir)
            shutil.rmtree(store)

        # OpenSSH sftp -b (serial) and rsync
        dst = self.work / "sftp-small"
        dst.mkdir()
        os.sync()
        self.record("small up", "sftp -b", total, timed(lambda: self.sftp_batch([f"put {src}/* {dst}/"])))
        down_dir = self.work / "small-back"
        down_dir.mkdir()
        os.sync()
        self.record("small down", "sftp -b", total, timed(lambda: self.sftp_batch([f"get {dst}/* {down_dir}/"])))
        shutil.rmtree(down_dir)
        shutil.rmtree(dst)
        if with_rsync:
            dst.mkdir()
            host = self.server.alias
            os.sync()
            self.record("small up", "rsync -W over ssh", total, timed(lambda: self.rsync_r(f"{src}/", f"{host}:{dst}/")))
            down_dir.mkdir()
            os.sync()
            self.record("small down", "rsync -W over ssh", total, timed(lambda: self.rsync_r(f"{host}:{dst}/", f"{down_dir}/")))
            shutil.rmtree(down_dir)
            shutil.rmtree(dst)
        shutil.rmtree(tree)

    def rsync_r(self, src: str, dst: str) -> None:
        ssh = "ssh " + " ".join(self.opts)
        subprocess.run(["rsync", "-W", "-r", "-e", ssh, src, dst], check=True)

    def jam_up_hooks(self, remote, items: list[tuple[str, Path, int]], batch: bool) -> None:
        from jam_core.model import Session
        from jam_core.ops.pipeline import files_per_batch

        step = files_per_batch()  # the core's batch size
        with Session() as s:
            if not batch:
                return self.jam_up(remote, items, 1)
            for i in range(0, len(items), step):
                out = list(self.pm.hook.stash_many(remote=remote, items=items[i:i + step], session=s))
                assert all(err is None for _, err in out), [err for _, err in out if err][:3]

    def jam_down_hooks(self, remote, items: list[tuple[str, Path, int]], batch: bool) -> None:
        from jam_core.model import Session
        from jam_core.ops.pipeline import files_per_batch

        if not batch:
            return self.jam_down(remote, items, 1)
        step = files_per_batch()  # the core's batch size
        with Session() as s:
            for i in range(0, len(items), step):
                out = list(self.pm.hook.fetch_many(remote=remote, items=items[i:i + step], session=s))
                assert all(ok is True for _, ok in out), [ok for _, ok in out if ok is not True][:3]

    def summary(self) -> None:
        runs = max(sum(1 for c, w, _ in self.results if (c, w) == (case, who)) for case, who, _ in self.results)
        print(f"\nratios of the median MB/s over {runs} run(s) (x / sftp -b, higher is better; "
              "goal for jam: large >= 0.8x, small >= 1.5x):")
        by = self.medians()
        cpu = self.medians(cpu=True)
        for case in dict.fromkeys(c for c, _, _ in self.results):
            peer = by.get((case, "sftp -b"))
            if not peer:
                continue
            for (c, who), v in by.items():
                if c == case and who != "sftp -b":
                    print(f"  {case:<12} {who:<24} {v / peer:5.2f}x   CPU (client + sshd) "
                          f"{cpu[(c, who)]:6.2f} s vs {cpu[(c, 'sftp -b')]:6.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the large file (MiB)")
    ap.add_argument("--files", type=int, default=2000, help="number of small files")
    ap.add_argument("--file-kib", type=int, default=64, help="size of each small file (KiB)")
    ap.add_argument("--connections", type=int, default=4, help="the sftp remote's connections option (pool size)")
    ap.add_argument("--no-fsync", action="store_true", help="skip fsync@openssh.com (sftp does not fsync)")
    ap.add_argument("--no-rsync", action="store_true")
    ap.add_argument("--per-file", action="store_true", help="also time the per-file hooks (stash/fetch of each file)")
    ap.add_argument("--only", choices=("large", "small"))
    ap.add_argument("--workdir", help="where to put files (default: a temp dir)")
    ap.add_argument("--runs", type=int, default=3,
                    help="rounds of every case, jam and its peers in turn (the ratios use the medians)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jam-bench-sftp-", dir=args.workdir))
    bench = Bench(work, args.connections, not args.no_fsync)
    bench.per_file = args.per_file
    try:
        print(f"sshd on 127.0.0.1:{bench.server.port}, work dir {work}, fsync={'on' if bench.fsync else 'off'}")
        rsync = not args.no_rsync and shutil.which("rsync") is not None
        for n in range(args.runs):  # rounds: a shared machine's load hits jam and its peers alike
            print(f"-- run {n + 1} of {args.runs}", flush=True)
            if args.only != "small":
                bench.large(args.size_mib << 20, rsync)
            if args.only != "large":
                bench.small(args.files, args.file_kib << 10, rsync)
        bench.summary()
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
