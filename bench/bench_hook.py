"""What the cd hook adds to `cd`, against the same shell with no hook and with direnv's hook.

For each shell, a loop of `cd a; cd b` runs N times in one `SHELL -c` process; the per-cd cost
is (time(N) - time(0)) / 2N, the best of several runs, so shell start-up is not counted. zsh and
fish run their hooks on cd by themselves (chpwd, --on-variable PWD); bash runs hooks at the
prompt, which `bash -c` never shows, so every cd is followed by what PROMPT_COMMAND would run
(`_jam_hook`, `_direnv_hook`, or nothing).

Cases: outside every root (a roots list with one root elsewhere), and inside a root with no
stubs in a or b (its index exists: another directory holds stubs). direnv runs in directories
without an .envrc, its cheapest case.

Then the figures of start-up and of the hook's fetch, each against its peer in the same run:

- start-up: `jam --version` against `python -c pass` (the same interpreter; also `python -I -S
  -c pass`, the interpreter alone without site-packages); median and best of --rounds
  interleaved runs.
- fetch: `zsh -f -c 'source HOOK; cd DIR'` where DIR holds 3 stubs of 64 KiB (dir remote),
  against the same with DIR a directory of the root with nothing to fetch; the stubs are made
  again (jam stash, not timed) before every round and checked to be back after it. Twice:
  through the hook's warm server (the default: a first cd starts it, jam_core/cli/hook_server.py)
  and cold (JAM_HOOK_SERVER=0: the bootstrap imports and fetches itself).
- where the hook's fetch spends its imports: `python -X importtime` of the command the hook
  runs (`python -I -S -c BOOTSTRAP hook-fetch -- DIR`, see `jam hook zsh`), the top entries by
  cumulative time (best of 3 runs per module).
- with --instructions (valgrind installed): instructions of that command against `python -c
  pass` and `python -I -S -c pass`, counted by callgrind (steady on a loaded machine, unlike
  time); median of --instruction-runs.

    python bench/bench_hook.py [--n 1000] [--runs 5] [--rounds 15] [--skip-cd] [--instructions] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JAM = str(Path(sys.executable).parent / "jam")


def setup(tmp: Path) -> dict:
    (tmp / "run").mkdir(mode=0o700)
    env = dict(os.environ, HOME=str(tmp / "home"), XDG_DATA_HOME=str(tmp / "home/.local/share"),
               XDG_CONFIG_HOME=str(tmp / "home/.config"), XDG_RUNTIME_DIR=str(tmp / "run"), JAM_DISABLE="")
    env.pop("PROMPT_COMMAND", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # jam as installed: its modules compiled once, not per run
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


def _run_times(cmds: dict[str, list[str]], rounds: int, env: dict, before=None, after=None) -> dict:
    """Run each command once per round, interleaved (the machine's load hits all alike);
    ``before(name)``/``after(name)`` run untimed around each. Returns name -> (sorted wall
    seconds, sorted CPU seconds: user + system of the command and its children; on a shared
    machine the CPU time moves less than the wall time)."""
    import resource

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in cmds}
    for _ in range(rounds):
        for name, cmd in cmds.items():
            if before:
                before(name)
            c, t = cpu(), time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name][0].append(time.perf_counter() - t)
            times[name][1].append(cpu() - c)
            if after:
                after(name)
    return {k: (sorted(w), sorted(c)) for k, (w, c) in times.items()}


def _med(v: list[float]) -> float:
    return v[len(v) // 2] * 1000


def _figures(t: dict) -> dict:
    return {k: {"median_ms": round(_med(w), 2), "best_ms": round(w[0] * 1000, 2), "cpu_median_ms": round(_med(c), 2)}
            for k, (w, c) in t.items()}


def startup(env: dict, rounds: int) -> dict:
    py = sys.executable
    t = _run_times({"jam --version": [JAM, "--version"], "python -c pass": [py, "-c", "pass"],
                    "python -I -S -c pass": [py, "-I", "-S", "-c", "pass"]}, rounds, env)
    return _figures(t)


def fetch(tmp: Path, env: dict, rounds: int, counting: bool = False, runs: int = 3) -> dict:
    """cd into a directory with 3 stubs of 64 KiB (zsh hook, dir remote) vs one with none."""
    root = tmp / "froot"
    (root / "stubs").mkdir(parents=True)
    (root / "empty").mkdir()
    data = {}
    for i in range(3):
        data[i] = os.urandom(64 * 1024)
        (root / f"stubs/f{i}").write_bytes(data[i])
    subprocess.run([JAM, "init", str(root)], env=env, check=True, capture_output=True)
    hook = tmp / "hook.zsh"
    hook.write_text(subprocess.run([JAM, "hook", "zsh"], env=env, check=True, capture_output=True,
                                   text=True).stdout)
    zsh = shutil.which("zsh")

    def stubbed(_name: str) -> None:
        subprocess.run([JAM, "stash", str(root / "stubs")], env=env, check=True, capture_output=True)
        assert (root / ".jam/stubdirs/stubs").stat().st_mode & 0o1000

    def back(name: str) -> None:
        if name == "cd, 3 stubs":
            for i, d in data.items():
                assert (root / f"stubs/f{i}").read_bytes() == d, "the hook did not bring the stubs back"

    cd_stubs = [zsh, "-f", "-c", f"source {str(hook)!r}; cd {str(root / 'stubs')!r}"]
    cmds = {"cd, 3 stubs": cd_stubs,
            "cd, 3 stubs, cold": ["env", "JAM_HOOK_SERVER=0", *cd_stubs],
            "cd, nothing to fetch": [zsh, "-f", "-c", f"source {str(hook)!r}; cd {str(root / 'empty')!r}"]}
    fenv = dict(env, JAM_BACKGROUND="0")
    stubbed("")
    subprocess.run(cd_stubs, env=fenv, check=True, capture_output=True)  # cold: starts the warm server
    server = wait_for_server(env)
    try:
        t = _run_times(cmds, rounds, fenv, before=stubbed, after=back)
    finally:
        os.kill(server, signal.SIGTERM)
    out = _figures(t)
    stubbed("")
    out["importtime"] = importtime(root / "stubs", dict(env, JAM_HOOK_SERVER="0"), stubbed)
    if counting and shutil.which("valgrind"):
        out["instructions"] = instructions(root / "stubs", dict(fenv, JAM_HOOK_SERVER="0"), stubbed, runs)
    return out


def wait_for_server(env: dict) -> int:
    """The pid of the hook's warm server (jam_core/cli/hook_server.py) once it accepts
    connections (30 s at most): the cold fetch before started it in the background."""
    import select
    import socket

    d = Path(env["XDG_RUNTIME_DIR"]) / f"jam-{os.geteuid()}"
    for _ in range(3000):
        for sock in d.glob("hook-*.sock"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(str(sock))
                return int(Path(f"{sock}.lock").read_text())
            except (OSError, ValueError):
                pass
            finally:
                s.close()
        select.select([], [], [], 0.01)
    sys.exit("bench: the hook's warm server did not start")


def hook_command(directory: Path, env: dict) -> list[str]:
    """The command the zsh hook runs for a cd into ``directory``: its interpreter and bootstrap
    read from `jam hook zsh` (or the jam script, for a hook that has none)."""
    text = subprocess.run([JAM, "hook", "zsh"], env=env, check=True, capture_output=True, text=True).stdout
    got = subprocess.run([shutil.which("zsh") or "zsh", "-f", "-c", f"{text}\nprint -rn -- \"$_JAM_PY\"$'\\0'\"$_JAM_BOOT\""],
                         env=dict(env, JAM_DISABLE="1"), check=True, capture_output=True, text=True).stdout
    py, _, boot = got.partition("\0")
    if not py:
        return [JAM, "hook-fetch", "--", str(directory)]
    return [py, "-I", "-S", "-c", boot, "hook-fetch", "--", str(directory)]


def instructions(directory: Path, env: dict, restub, runs: int = 3) -> dict:
    """Instructions (callgrind) of the hook's fetch of 3 stubs and of the bare interpreter."""
    import re as _re

    def count(cmd: list[str]) -> int:
        res = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
                             env=dict(env, PYTHONHASHSEED="0"), capture_output=True, text=True, check=True)
        return int(_re.search(r"Collected : (\d+)", res.stderr).group(1))

    py = sys.executable
    cmds = {"hook fetch, 3 stubs": hook_command(directory, env), "python -c pass": [py, "-c", "pass"],
            "python -I -S -c pass": [py, "-I", "-S", "-c", "pass"]}
    out = {}
    for name, cmd in cmds.items():
        got = []
        for _ in range(runs):
            restub("")
            got.append(count(cmd))
        out[name] = sorted(got)[len(got) // 2]
    return out


def importtime(directory: Path, env: dict, restub, runs: int = 3, top: int = 15) -> list:
    """(module, cumulative µs, self µs) of the top-level imports of the hook's fetch command,
    best of ``runs`` per module, largest first."""
    best: dict[str, tuple[int, int]] = {}
    cmd = hook_command(directory, env)
    cmd = [cmd[0], "-X", "importtime", *cmd[1:]] if cmd[0] != JAM else [sys.executable, "-X", "importtime", *cmd]
    for i in range(runs):
        if i:
            restub("")
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        for line in res.stderr.splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            own, cum, name = line[len("import time:"):].split("|")
            if name.startswith("  "):
                continue  # nested: counted in its top-level importer
            key = name.strip()
            cur = (int(cum), int(own))
            best[key] = min(best.get(key, cur), cur)
    return [(k, c, o) for k, (c, o) in sorted(best.items(), key=lambda kv: -kv[1][0])[:top]]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=15, help="rounds of the start-up and fetch figures")
    ap.add_argument("--skip-cd", action="store_true", help="only the start-up and fetch figures")
    ap.add_argument("--instructions", action="store_true", help="count instructions with callgrind")
    ap.add_argument("--instruction-runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as t:
        s = setup(Path(t))
        extra = {"startup": startup(s["env"], args.rounds)}
        if shutil.which("zsh"):
            extra["fetch"] = fetch(Path(t), s["env"], args.rounds, args.instructions, args.instruction_runs)
        for shell in ("bash", "zsh", "fish") if not args.skip_cd else ():
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
        print(json.dumps({"per_cd": rows, **extra}, indent=2))
        return 0
    def line(a: dict, b: dict) -> str:
        return (f"{a['median_ms'] - b['median_ms']:+.1f} ms (median), {a['best_ms'] - b['best_ms']:+.1f} ms (best), "
                f"{a['cpu_median_ms'] - b['cpu_median_ms']:+.1f} ms of CPU (median)")

    st = extra["startup"]
    print("start-up (ms, median / best / CPU median):")
    for k, v in st.items():
        print(f"  {k:22} {v['median_ms']:7.1f} {v['best_ms']:7.1f} {v['cpu_median_ms']:7.1f}")
    print(f"  jam --version over python -c pass: {line(st['jam --version'], st['python -c pass'])}")
    if "fetch" in extra:
        f = extra["fetch"]
        a, c, b = f["cd, 3 stubs"], f["cd, 3 stubs, cold"], f["cd, nothing to fetch"]
        print("fetch on cd (zsh, dir remote, 3 x 64 KiB; ms, median / best / CPU median; the warm server's")
        print("child's CPU is not the shell's and is not counted):")
        for k in ("cd, 3 stubs", "cd, 3 stubs, cold", "cd, nothing to fetch"):
            print(f"  {k:22} {f[k]['median_ms']:7.1f} {f[k]['best_ms']:7.1f} {f[k]['cpu_median_ms']:7.1f}")
        print(f"  the fetch adds {line(a, b)} (warm server)")
        print(f"  the fetch adds {line(c, b)} (cold: JAM_HOOK_SERVER=0)")
        if "instructions" in f:
            ins = f["instructions"]
            print("  instructions (callgrind, median): " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in ins.items()))
            print(f"  the hook's fetch over python -c pass: {(ins['hook fetch, 3 stubs'] - ins['python -c pass']) / 1e6:+.1f} M")
        print("  python -X importtime, the hook's hook-fetch, top-level imports (cumulative / self, ms):")
        for name, cum, own in f["importtime"]:
            print(f"    {cum / 1000:7.2f} {own / 1000:7.2f}  {name}")
    if rows:
        print("added cost per cd (ms): shell  none(abs)  jam-outside  jam-inside(no stubs)  direnv  direnv/jam-inside")
        for r in rows:
            print(f"  {r['shell']:5} {r['none_ms']:9.4f} {r['jam_outside_ms']:12.4f} {r['jam_inside_ms']:21.4f} "
                  f"{r.get('direnv_ms', float('nan')):7.3f} {r.get('direnv_over_jam_inside', float('nan')):8.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
