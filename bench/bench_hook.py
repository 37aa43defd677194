"""What the cd hook adds to `cd`, against the same shell with no hook and with direnv's hook.

For each shell, a loop of `cd a; cd b` runs N times in one `SHELL -c` process; the per-cd cost
is (time(N) - time(0)) / 2N, the best of several runs, so shell start-up is not counted. zsh and
fish run their hooks on cd by themselves (chpwd, --on-variable PWD); bash runs hooks at the
prompt, which `bash -c` never shows, so every cd is followed by what PROMPT_COMMAND would run
(`_jam_hook`, `_direnv_hook`, or nothing).

Cases: outside every root (a roots list with one root elsewhere), and inside a root with no
stubs in a or b (its index exists: another directory holds stubs). direnv runs in directories
without an .envrc, its cheapest case.

    python bench/bench_hook.py [--n 1000] [--runs 5] [--json]
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

JAM = str(Path(sys.executable).parent / "jam")


def setup(tmp: Path) -> dict:
    env = dict(os.environ, HOME=str(tmp / "home"), XDG_DATA_HOME=str(tmp / "home/.local/share"),
               XDG_CONFIG_HOME=str(tmp / "home/.config"), JAM_DISABLE="")
    env.pop("PROMPT_COMMAND", None)
    (tmp / "home").mkdir()
    root = tmp / "root"
    for d in ("a", "b", "stubbed"):
        (root / d).mkdir(parents=True)
    (root / "stubbed/f").write_bytes(os.urandom(100_000))
    for args in (["init", str(root)], ["stash", str(root / "stubbed")]):
        subprocess.run([JAM, *args], env=env, check=True, capture_output=True)
    assert (root / ".jam/stubdirs/stubbed").stat().st_mode & 0o1000
    for d in ("a", "b"):
        (tmp / "out" / d).mkdir(parents=True)
    return {"env": env, "outside": tmp / "out", "inside": root}


def hook_code(shell: str, hook: str) -> str:
    if hook == "none":
        return ""
    if hook == "jam":
        return f'eval "$({JAM} hook {shell})"' if shell != "fish" else f"{JAM} hook fish | source"
    direnv = shutil.which("direnv")
    # fish: direnv arms its PWD handler at the first prompt, which `fish -c` never shows.
    return f'eval "$({direnv} hook {shell})"' if shell != "fish" else f"{direnv} hook fish | source; __direnv_export_eval"


def loop(shell: str, hook: str, n: int) -> str:
    after = {"none": ":", "jam": "_jam_hook", "direnv": "_direnv_hook"}[hook]
    if shell == "bash":
        return f"for ((i=0;i<{n};i++)); do cd a; {after}; cd ../b; {after}; cd ..; {after}; done"
    if shell == "zsh":
        return f"for ((i=0;i<{n};i++)); do cd a; cd ../b; cd ..; done"
    return f"for i in (seq {n}); cd a; cd ../b; cd ..; end"


def per_cd(shell: str, hook: str, where: Path, env: dict, n: int, runs: int) -> float:
    exe = shutil.which(shell)
    flags = {"bash": ["--norc", "--noprofile", "-c"], "zsh": ["-f", "-c"], "fish": ["--no-config", "-c"]}[shell]

    def best(k: int) -> float:
        script = f"{hook_code(shell, hook)}\ncd {str(where)!r}\n{loop(shell, hook, k)}"
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run([exe, *flags, script], env=env, check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t)
        return min(times)

    return (best(n) - best(0)) / (3 * n) * 1000  # ms per cd (a, ../b, .. per iteration)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as t:
        s = setup(Path(t))
        for shell in ("bash", "zsh", "fish"):
            if not shutil.which(shell):
                continue
            base = {w: per_cd(shell, "none", s[w], s["env"], args.n, args.runs) for w in ("outside", "inside")}
            row = {"shell": shell, "none_ms": round(base["outside"], 4)}
            for w in ("outside", "inside"):
                row[f"jam_{w}_ms"] = round(per_cd(shell, "jam", s[w], s["env"], args.n, args.runs) - base[w], 4)
            if shutil.which("direnv"):
                n = max(args.n // 10, 50)  # a process per cd: fewer rounds say as much
                row["direnv_ms"] = round(per_cd(shell, "direnv", s["outside"], s["env"], n, args.runs) - base["outside"], 4)
                row["direnv_over_jam_inside"] = round(row["direnv_ms"] / max(row["jam_inside_ms"], 1e-4), 1)
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("added cost per cd (ms): shell  none(abs)  jam-outside  jam-inside(no stubs)  direnv  direnv/jam-inside")
        for r in rows:
            print(f"  {r['shell']:5} {r['none_ms']:9.4f} {r['jam_outside_ms']:12.4f} {r['jam_inside_ms']:21.4f} "
                  f"{r.get('direnv_ms', float('nan')):7.3f} {r.get('direnv_over_jam_inside', float('nan')):8.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
