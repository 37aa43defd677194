"""`jam tui` against `ncdu` in the same run (warm cache, for both):

  1. time from starting `jam tui` in a real terminal (tmux, 80x24) to its first complete screen:
     the listing of the current directory with every row's own name, state and size on screen
     (a file's state and true size; a directory's name and the stubs the catalog knows below
     it, its totals still "…"), and, separately, to the screen with nothing left to fill in
     (every directory's totals and the summary bar: no "…" left on screen), on a root
     of ``--files`` (100,000) files in directories of 100 (1,000 directories; half the files
     stubs, written directly with ``write_stub`` and recorded in the catalog as bench_core.py
     does), and on one directory of ``--dir-files`` (10,000) files; against
     ``ncdu -0 -o /dev/null`` scanning the same tree;
  2. resident memory of the app once its first screen is complete at 100,000 files (in-process,
     Pilot, ru_maxrss);
  3. the time each key takes to be answered (Pilot: the key pressed, its handler run and the
     screen refreshed; Enter and Backspace until the new directory is listed).

Goals (PRODUCT.md): the first screen before ncdu has scanned the tree; every key < 100 ms.

    .venv/bin/python bench/bench_tui.py            # 100,000 files (a minute or two to build)
    .venv/bin/python bench/bench_tui.py --quick    # 10,000 files, a directory of 2,000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

JAM = str(Path(sys.executable).parent / "jam")


def build(base: Path, nfiles: int, per_dir: int) -> Path:
    from bench_core import build_status_tree

    from jam_core.root import Root

    root = base / "root"
    root.mkdir(parents=True)
    Root.init(root, register=False)
    build_status_tree(root, nfiles, per_dir)
    _stamp(root)
    return root


def _stamp(root: Path) -> None:
    """Record each stub's inode and ctime in the catalog, as a real stash does (so a scan may
    trust an untouched stub from its stat alone)."""
    from jam_core.catalog import Catalog

    with Catalog(root / ".jam" / "catalog.db") as cat:
        rows = []
        for p, (size, mtime) in cat.stub_stats().items():
            st = os.lstat(root / os.fsdecode(p))
            oid = cat.db.execute("SELECT oid, stashed_at FROM stubs WHERE path = ?", (p,)).fetchone()
            rows.append((os.fsdecode(p), oid[0], size, mtime, oid[1], st.st_ino, st.st_ctime_ns))
        cat.replace_stubs(rows)


def best(fn, repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def time_ncdu(root: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["ncdu", "-0", "-x", "-o", "/dev/null", str(root)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


RUNS = 0


def _listed(text: str) -> bool:
    """The header line and the row under it are drawn: the listing is on screen (the rows of a
    directory are drawn together, each with its name, state and size)."""
    lines = text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if "state" in line and "size" in line and "tiers" in line:
            return bool(lines[i + 1].strip())
    return False


def _complete(text: str) -> bool:
    return "free" in text and "…" not in text and ("stub" in text or "local" in text)


def time_tui(root: Path, rel: str, env: dict) -> tuple[float, float]:
    """Seconds from starting `jam tui` in tmux to its first complete screen (the listing), and
    to a screen with nothing left to fill in."""
    global RUNS
    RUNS += 1
    sock = f"jambench-{os.getpid()}-{RUNS}"  # a fresh server per run: a dying one cannot be reused
    where = root / rel
    t = time.perf_counter()
    subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-s", "b", "-x", "80", "-y", "24",
                    f"cd {where} && {JAM} tui"], env=env, check=True)
    try:
        deadline = t + 300
        first = None
        while True:
            text = subprocess.run(["tmux", "-L", sock, "capture-pane", "-p", "-t", "b"], capture_output=True,
                                  text=True).stdout
            now = time.perf_counter() - t
            if first is None and _listed(text):
                first = now
            if _complete(text):
                return (first if first is not None else now), now
            if time.perf_counter() > deadline:
                raise SystemExit(f"bench: jam tui never finished its first screen:\n{text}")
            time.sleep(0.005)  # polling the screen
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)


PILOT = r"""
import asyncio, json, resource, sys, time
from jam_core.manager import make_plugin_manager
from jam_core.root import Root
from jam_core.tui.app import make_app
from jam_core.tui.widgets.listing import Listing

root = Root(__import__("pathlib").Path(sys.argv[1]))
out = {}

async def main():
    app = make_app(root, ".", make_plugin_manager())
    t0 = time.perf_counter()
    async with app.run_test(size=(80, 24)) as pilot:
        def listing():
            return app.screen.query_one(Listing)
        while True:
            await pilot.pause()
            screen = app.screen
            if "listed_s" not in out and screen.query(Listing) and listing().rows:
                out["listed_s"] = time.perf_counter() - t0
            if hasattr(screen, "totals") and screen.totals is not None and \
                    screen.query_one("#summary").summary is not None:
                break
        out["first_screen_s"] = time.perf_counter() - t0
        out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        keys = {}
        for _ in range(3):  # Pilot's own cost per key: a key nothing is bound to
            t = time.perf_counter()
            await pilot.press("x")
            keys["(pilot baseline: unbound key)"] = min(keys.get("(pilot baseline: unbound key)", 1e9),
                                                         (time.perf_counter() - t) * 1000)
        async def key(name, *presses, until=None):
            t = time.perf_counter()
            await pilot.press(*presses)
            if until is not None:
                while not until():
                    await pilot.pause()
            keys[name] = (time.perf_counter() - t) * 1000
        await key("down", "down")
        await key("pagedown", "pagedown")
        await key("end", "end")
        await key("home", "home")
        await key("space (mark)", "space")
        await key("2 (sort by size)", "2")
        await key("o (cycle sort)", "o")
        await key("a (true/disk size)", "a")
        await key("i (info pane)", "i")
        await key("i (close)", "i")
        await key("1 (sort by name)", "1")
        await key("home", "home")
        first = listing().current.rel
        await key("enter (open a directory)", "enter", until=lambda: listing().rows and
                  listing().rows[0].rel.startswith(first + "/"))
        await key("down in it", "down")
        await key("end in it", "end")
        await key("backspace (up)", "backspace", until=lambda: "/" not in (listing().current.rel if listing().current else "/"))
        await key("/ (filter box)", "slash")
        await key("type one letter", "d")
        await key("type another", "0")
        await key("enter (close filter)", "enter")
        await key("escape (clear filter)", "escape")
        await key("? (help)", "question_mark")
        await key("escape (close help)", "escape")
        await key("t (tiers view)", "t")
        await key("escape (back)", "escape")
        out["keys_ms"] = keys
        await pilot.press("q")

asyncio.run(main())
print(json.dumps(out))
"""


def pilot_run(root: Path, env: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", PILOT, str(root)], env=env, capture_output=True, text=True,
                         cwd=root)
    if res.returncode != 0:
        raise SystemExit(f"bench: the Pilot run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10,000 files in directories of 10; a directory of 2,000")
    ap.add_argument("--files", type=int, help="files in the big tree (default 100000)")
    ap.add_argument("--dir-files", type=int, help="files in the single directory (default 10000)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    nfiles = args.files or (10_000 if args.quick else 100_000)
    dir_files = args.dir_files or (2_000 if args.quick else 10_000)
    for tool in ("tmux", "ncdu"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is needed (apt-get install {tool})")
    base = Path(tempfile.mkdtemp(prefix="jam-bench-tui-"))
    home = base / "home"
    env = dict(os.environ, HOME=str(home), XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"),
               TERM="xterm-256color")
    os.environ.update({k: env[k] for k in ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME")})
    try:
        print(f"building {nfiles:,} files in {nfiles // 100:,} directories (half stubs)...", flush=True)
        big = build(base / "big", nfiles, 100)
        print(f"building one directory of {dir_files:,} files (half stubs)...", flush=True)
        one = build(base / "one", dir_files, dir_files)
        rows = []
        for label, root, rel in ((f"{nfiles:,} files in {nfiles // 100:,} dirs", big, "."),
                                 (f"one directory of {dir_files:,} files", one, "d0000")):
            time_ncdu(root), time_tui(root, rel, env)  # warm the caches for both
            tn = best(lambda: time_ncdu(root), args.repeat)
            runs = [time_tui(root, rel, env) for _ in range(args.repeat)]
            rows.append((label, min(r[0] for r in runs), min(r[1] for r in runs), tn))
        print()
        print("first screen = the listing of the current directory, every row with its own name, state and")
        print("size (directories: the stubs the catalog knows below them, totals still '…'); all filled =")
        print("every directory's totals and the summary bar in (no '…' left). Both from starting `jam tui`.")
        print(f"{'case':<34} {'first screen':>13} {'all filled':>11} {'ncdu -o /dev/null':>18} "
              f"{'ncdu/first':>11} {'ncdu/all':>9}")
        for label, tj, ta, tn in rows:
            print(f"{label:<34} {tj * 1000:>10.0f} ms {ta * 1000:>8.0f} ms {tn * 1000:>15.0f} ms "
                  f"{tn / tj:>10.2f}x {tn / ta:>8.2f}x")
        p = pilot_run(big, env)
        print()
        print(f"in-process at {nfiles:,} files (Pilot, no start-up): listing {p['listed_s'] * 1000:.0f} ms, "
              f"all filled {p['first_screen_s'] * 1000:.0f} ms")
        print(f"resident memory at {nfiles:,} files (max RSS): {p['rss_mib']:.0f} MiB")
        print("keys (ms until answered; goal < 100):")
        worst = 0.0
        base = p["keys_ms"]["(pilot baseline: unbound key)"]
        print(f"  {'key':<30} {'ms':>7} {'minus Pilot baseline':>21}")
        for k, ms in p["keys_ms"].items():
            if not k.startswith("(pilot"):
                worst = max(worst, ms - base)
            print(f"  {k:<30} {ms:7.1f} {ms - base:21.1f}")
        print(f"slowest key, Pilot's own cost taken out: {worst:.1f} ms "
              f"({'within' if worst < 100 else 'over'} 100 ms)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
