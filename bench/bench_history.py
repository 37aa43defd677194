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

Then the large-file case (issue 15's goal: a 100-byte edit of a 1 GiB file uploads under 1 MiB):
``--big-bytes`` (1 GiB) of random data committed, 100 bytes changed in the middle, committed
again; the bytes the backend stored the second time (the sizes of the new files under the dir
remote's ``objects/``: chunks, recipe, snapshot) against the goal, and the time (wall and CPU)
against `rsync --stats --no-whole-file` of the same edit to a copy (its literal data and time).
FastCDC's (pyfastcdc) throughput here is printed beside blake3's.

    .venv/bin/python bench/bench_history.py            # 100,000 files, then 1 GiB
    .venv/bin/python bench/bench_history.py --quick    # 10,000 files, once, then 256 MiB
    .venv/bin/python bench/bench_history.py --only big # the large-file case alone
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


def timed(*args, cwd=None, env=None) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds user+sys of the child, its stdout)."""
    r0 = os.times()
    t0 = time.perf_counter()
    res = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True)
    took = time.perf_counter() - t0
    r1 = os.times()
    if res.returncode != 0:
        raise SystemExit(f"{args[0]} {args[1]} failed ({res.returncode}): {res.stderr.decode()[-500:]}")
    return took, (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system), \
        res.stdout.decode(errors="replace")


def objects_of(remote: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in (remote / "objects").rglob("*") if p.is_file()}


def edit_middle(path: Path, size: int, seed: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(100), size // 2 + seed * 4099)
    finally:
        os.close(fd)


def big_case(work: Path, env: dict, size: int, repeat: int) -> None:
    """Commit a large file, change 100 bytes in its middle, commit again: bytes uploaded and time,
    against rsync of the same edit to a copy."""
    import blake3
    from pyfastcdc import FastCDC

    from jam_core.history.chunks import AVG_CHUNK, MAX_CHUNK, MIN_CHUNK

    print(f"\nlarge file: {size / 2**30:.2f} GiB, 100 bytes changed in the middle", flush=True)
    src = work / "big-src.bin"
    with open(src, "wb") as f:
        for _ in range(size // (64 << 20)):
            f.write(os.urandom(64 << 20))
        f.write(os.urandom(size % (64 << 20)))
    t0 = time.perf_counter()
    n = sum(1 for _ in FastCDC(avg_size=AVG_CHUNK, min_size=MIN_CHUNK, max_size=MAX_CHUNK).cut_file(str(src)))
    cdc = size / (time.perf_counter() - t0) / 1e6
    t0 = time.perf_counter()
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(src, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    b3 = size / (time.perf_counter() - t0) / 1e6
    rows: dict[str, list[float]] = {k: [] for k in ("jam bytes", "jam wall", "jam cpu", "jam first wall",
                                                    "rsync bytes", "rsync wall", "rsync cpu")}
    tool = shutil.which("rsync")
    for k in range(repeat):
        jr, remote = work / f"bigjam{k}", work / f"bigremote{k}"
        jr.mkdir()
        remote.mkdir()
        shutil.copyfile(src, jr / "big.bin")
        run(JAM, "init", jr, env=env)
        run(JAM, "remote", "add", "vault", remote, cwd=jr, env=env)
        run(JAM, "remote", "remove", "default", cwd=jr, env=env)
        run("sync")
        wall, _cpu, _ = timed(JAM, "commit", "-m", "first", cwd=jr, env=env)
        rows["jam first wall"].append(wall)
        before = objects_of(remote)
        edit_middle(jr / "big.bin", size, k)
        run("sync")
        wall, cpu, out = timed(JAM, "commit", "-m", "edit", cwd=jr, env=env)
        new = {p: n for p, n in objects_of(remote).items() if p not in before}
        rows["jam bytes"].append(sum(new.values()))
        rows["jam wall"].append(wall)
        rows["jam cpu"].append(cpu)
        print(f"  jam commit after the edit: {len(new)} new objects, {sum(new.values()):,} bytes, "
              f"{wall:.2f} s wall, {cpu:.2f} s CPU ({out.strip()})", flush=True)
        shutil.rmtree(jr)
        shutil.rmtree(remote)
        if tool:
            a, dst = work / f"rs{k}.bin", work / f"rsdst{k}"
            dst.mkdir()
            shutil.copyfile(src, a)
            run(tool, "-a", a, dst / "big.bin")
            edit_middle(a, size, k)
            run("sync")
            wall, cpu, out = timed(tool, "-a", "--stats", "--no-whole-file", a, dst / "big.bin")
            sent = next((int(line.split(":")[1].split()[0].replace(",", "")) for line in out.splitlines()
                         if line.startswith("Total bytes sent")), -1)
            rows["rsync bytes"].append(sent)
            rows["rsync wall"].append(wall)
            rows["rsync cpu"].append(cpu)
            os.unlink(a)
            shutil.rmtree(dst)
    src.unlink()
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    print(f"\n{size / 2**30:.2f} GiB file, 100-byte edit, median of {repeat}:")
    print(f"  FastCDC (pyfastcdc, avg {AVG_CHUNK >> 10} KiB): {cdc:.0f} MB/s ({n} chunks); blake3: {b3:.0f} MB/s")
    print(f"  jam first commit (cut, every chunk uploaded): {med['jam first wall']:.2f} s wall")
    verdict = "meets" if med["jam bytes"] < 1 << 20 else "MISSES"
    print(f"  jam commit of the edit: uploaded {med['jam bytes']:,.0f} bytes ({verdict} the goal: < 1 MiB); "
          f"{med['jam wall']:.2f} s wall, {med['jam cpu']:.2f} s CPU")
    if tool:
        print(f"  rsync --no-whole-file to a copy: sent {med['rsync bytes']:,.0f} bytes; {med['rsync wall']:.2f} s wall, "
              f"{med['rsync cpu']:.2f} s CPU")
        print(f"  jam / rsync = {med['jam wall'] / med['rsync wall']:.2f}x the time, "
              f"{med['jam bytes'] / max(1, med['rsync bytes']):.1f}x the bytes")
    else:
        print("  rsync is not installed: no peer measured")


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
    ap.add_argument("--big-bytes", type=int, default=1 << 30)
    ap.add_argument("--only", choices=("all", "tree", "big"), default="all")
    args = ap.parse_args()
    if args.quick:
        args.files, args.repeat, args.big_bytes = 10_000, 1, 256 << 20
    work = Path(tempfile.mkdtemp(prefix="bench-history-", dir=os.environ.get("BENCH_DIR")))
    env = {**os.environ, "XDG_DATA_HOME": str(work / "xdg-data"), "XDG_CONFIG_HOME": str(work / "xdg-config"),
           "HOME": str(work / "home"), "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}
    (work / "home").mkdir()
    try:
        if args.only != "big":
            tree_case(work, env, args)
        if args.only != "tree":
            big_case(work, env, args.big_bytes, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def tree_case(work: Path, env: dict, args) -> None:
    if True:
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
        shutil.rmtree(src)


if __name__ == "__main__":
    main()
