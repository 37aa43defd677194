"""`jam hook bash|zsh|fish` (prints the cd hook) and the hidden `jam hook-fetch DIR` it runs.

No click at module level: the hook's `jam hook-fetch [--] DIR` runs :func:`run_hook_fetch`
straight from ``jam_core.cli.main`` (jam_core/cli/__init__.py); :func:`register` declares both
commands on the click group for every other use (``--help``, CliRunner, odd arguments)."""

from __future__ import annotations

import os
import sys

from jam_core.cli import EXIT_BOOT

SHELLS = ("bash", "zsh", "fish")
ENV_HOOK_CWD = "JAM_HOOK_CWD"  # set by the hooks when they run the jam script from /: the shell's directory
PROGRESS_FROM = 16 * 10**6  # show a progress bar for fetches larger than this (on a terminal)

HOOK_HELP = """Print the cd hook for SHELL: `cd` into a directory of a jam root and its stubs
come back.

\b
Install it with one line:
  bash  ~/.bashrc                   eval "$(jam hook bash)"
  zsh   ~/.zshrc                    eval "$(jam hook zsh)"
  fish  ~/.config/fish/config.fish  jam hook fish | source

Outside every root the hook starts no process; inside one it starts jam only when the
directory has stubs to fetch. Per root, in .jam/config.toml:

\b
  [hook]
  depth = 0            # 0: the directory's own stubs; N: N levels below too; "all"
  max_fetch = "1GB"    # above this, fetch nothing and say how to get them
  background = false   # true: the prompt returns at once, a line says when it is done

JAM_DISABLE=1 turns the hook off in a shell; JAM_BACKGROUND=1 or 0 overrides `background`.
"""


def shell_dir() -> str:
    """Where the shell files are: ``shell/`` of a checkout (editable install) or the copy the
    wheel carries as the ``jam_core.shell`` package data."""
    import importlib.util

    spec = importlib.util.find_spec("jam_core.shell")
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            if os.path.isfile(os.path.join(d, "jam.bash")):
                return d
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shell")


def jam_executable() -> str:
    """The absolute path of the running `jam` (what the hook will call)."""
    import shutil

    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "jam" and os.path.isfile(argv0):
        return os.path.abspath(argv0)
    found = shutil.which("jam")
    return os.path.abspath(found) if found else os.path.join(os.path.dirname(sys.executable), "jam")


def _quote(shell: str, value: str) -> str:
    if shell == "fish":
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    import shlex

    return shlex.quote(value)


BOOT_MODULES = ("jam_core", "jam_dir")  # what the hook's fetch in a root of dir remotes imports


def boot_paths() -> list[str]:
    """The ``sys.path`` entries the hook's site-less python needs, from this process (started
    as ``jam``, with site): every entry site and the environment added (site-packages, .pth
    lines, a user site), then the directories holding jam's own packages when an import hook
    (an editable install's finder) rather than ``sys.path`` finds them. The script's own
    directory and the working directory are left out. The bootstrap skips entries the bare
    interpreter already has (the standard library)."""
    import importlib.util

    script = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else None
    out: list[str] = []
    for entry in sys.path:
        if not isinstance(entry, str) or not entry or not os.path.isabs(entry):
            continue  # '' and relative entries: the working directory of whoever cds
        if entry != script and entry not in out:
            out.append(entry)
    for name in BOOT_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        top = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))  # above the package
        if top not in out:
            out.append(top)
    return out


def bootstrap(paths: list[str]) -> str:
    """The code the hook hands ``python -I -S -c``: no site (its .pth files and finders cost
    ~15 M instructions) and nothing from the environment or the working directory (-I: the
    directory just entered is no place to import from). It adds ``paths``, checks that the
    jam it imports is this one, and answers ``hook-fetch -- DIR``: through the warm server
    when one runs (jam_core/cli/hook_server.py), else itself. Anything it cannot answer (jam moved
    or reinstalled elsewhere, $PYTHONPATH/$PYTHONHOME set, another form of the command, a root
    that needs more than the dir backend) exits EXIT_BOOT, and the hook runs the jam script
    instead."""
    import hashlib

    import jam_core.cli.hook_server as server

    mine = os.path.abspath(server.__file__)
    key = hashlib.sha256("\0".join([sys.executable, mine, *paths]).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return (
        "import sys,os\n"
        f'if os.environ.get("PYTHONPATH") or os.environ.get("PYTHONHOME"):raise SystemExit({EXIT_BOOT})\n'
        f"p={paths!r}\n"
        "sys.path+=[x for x in p if x not in sys.path]\n"
        "try:\n"
        " import jam_core.cli.hook_server as v\n"
        "except Exception:\n"
        f" raise SystemExit({EXIT_BOOT})\n"
        f"if v.__file__!={mine!r}:raise SystemExit({EXIT_BOOT})\n"
        f"v.start({key!r})\n"
    )


def render(shell: str, jam_bin: str, roots_file: str, python: str = "", boot: str = "") -> str:
    """The hook's code for ``shell`` with the jam executable and the roots list filled in, and
    (``python``, ``boot``) the interpreter and bootstrap of the site-less start (empty: the
    hook runs ``jam_bin``)."""
    with open(os.path.join(shell_dir(), f"jam.{shell}"), encoding="utf-8") as f:
        text = f.read()
    fill = {"_JAM_BIN": jam_bin, "_JAM_ROOTS_FILE": roots_file, "_JAM_PY": python, "_JAM_BOOT": boot} \
        if shell != "fish" else \
        {"_jam_bin": jam_bin, "_jam_roots_file": roots_file, "_jam_py": python, "_jam_boot": boot}
    out = []
    for line in text.splitlines(keepends=True):
        if line.rstrip().endswith(f"# filled in by `jam hook {shell}`"):
            for name, value in fill.items():
                for prefix in (f"{name}=", f"typeset -g {name}=", f"set -g {name} "):
                    if line.startswith(prefix):
                        line = f"{prefix}{_quote(shell, value)}\n"
        out.append(line)
    return "".join(out)


def register(group) -> None:
    """Declare `jam hook` and the hidden `jam hook-fetch` on the click group."""
    import click

    @group.command("hook", help=HOOK_HELP)
    @click.argument("shell", type=click.Choice(SHELLS))
    @click.option("--bin", "jam_bin", hidden=True,
                  help="The jam the hook calls, always (tests, packagers): no site-less start.")
    def hook(shell: str, jam_bin: str | None) -> None:
        from jam_core.root import roots_file

        python, boot = "", ""
        if jam_bin is None and sys.executable and os.path.isabs(sys.executable):
            python, boot = sys.executable, bootstrap(boot_paths())
        click.echo(render(shell, jam_bin or jam_executable(), str(roots_file()), python, boot), nl=False)

    @group.command("hook-fetch", hidden=True)
    @click.argument("directory", type=click.Path(file_okay=False, readable=False))
    def hook_fetch(directory: str) -> None:
        """What the cd hook runs when DIRECTORY has stubs (see run_hook_fetch)."""
        sys.exit(run_hook_fetch(directory))


def run_hook_fetch(directory: str) -> int:
    """What the cd hook runs when DIRECTORY has stubs: fetch them within hook.depth and
    hook.max_fetch, record the visit as use. Returns 0 whatever happened (it is said on
    stderr), 130 when interrupted; any other code tells the hook that jam itself is broken."""
    from jam_core.errors import JamError

    try:
        return _hook_fetch(directory)
    except KeyboardInterrupt:
        _say("interrupted; what was fetched stays, the rest are still stubs")
        return 130
    except JamError as exc:
        _say(str(exc))
        return 0
    except OSError as exc:
        if os.environ.get("JAM_DEBUG"):
            raise
        _say(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")
        return 0


def _say(message: str) -> None:
    """One line on stderr, escaped as everything jam prints of text it did not write (a
    remote's message, a path): a terminal shows it and never acts on it (``show_text``; text
    escaped already passes unchanged)."""
    from jam_core.cli.common import show_text

    print(f"jam: {show_text(message)}", file=sys.stderr, flush=True)


def _needs_site(config) -> bool:
    """In a site-less start (jam_core.cli.boot): True unless fetching in a root of this config
    needs the built-in dir backend alone (a third-party plugin may live where only site finds
    it). Asked once there are stubs to fetch, before anything is fetched or forked."""
    from jam_core.cli import booted

    if not booted():
        return False
    from jam_core.manager import dir_suffices

    return not dir_suffices(config)


def _hook_fetch(directory: str) -> int:
    from jam_core.hook.fetch import arrive, leave

    a = arrive(directory)
    if a is None:
        return 0
    try:
        return _arrived(a)
    finally:
        leave(a)  # the catalog's one checkpoint


def _arrived(a) -> int:
    from jam_core.cli.common import human, show_path, show_text
    from jam_core.history.auto import kick
    from jam_core.hook.fetch import count_visit, heal, leave

    background = a.settings.background
    if os.environ.get("JAM_BACKGROUND", "") in ("0", "1"):
        background = os.environ["JAM_BACKGROUND"] == "1"
    v = a.visit
    # The jam script runs from / (the hooks' fallback); an exported JAM_HOOK_CWD means nothing elsewhere.
    shell_cwd = os.environ.get(ENV_HOOK_CWD) if os.getcwd() == "/" else None
    cwd = os.path.realpath(shell_cwd) if shell_cwd else os.path.abspath(os.getcwd())
    where = "here" if cwd == a.path else show_path(a.path)
    if not v.stubs:
        if v.dirty:  # said once: heal leaves such a directory out of the index
            _say(f"{v.dirty} stub{'s' if v.dirty != 1 else ''} {'in ' if where != 'here' else ''}{where}"
                 " written into after stashing, left as is (`jam checkout --keep-both PATH` fetches the stashed "
                 "version beside it; see `jam status`)")
        kick(a.root)  # [history] auto: a detached `jam commit --auto` when due (one stat when not)
        heal(a)
        count_visit(a)
        return 0
    n = len(v.stubs)
    if v.bytes > a.settings.max_fetch:
        _say(f"{n} stub{'s' if n != 1 else ''} ({human(v.bytes)}) {'in ' if where != 'here' else ''}{where}, "
             f"more than hook.max_fetch ({human(a.settings.max_fetch)}); get them with: jam checkout "
             + ("." if where == "here" else _shell_word(a.path)))
        kick(a.root)
        count_visit(a)
        return 0
    if _needs_site(a.root.config):
        return EXIT_BOOT  # the hook runs the jam script, which fetches them (and kicks the commit)
    kick(a.root)  # after the hand-over: it starts once this process ends, never before its fetch
    if background:
        leave(a)  # no SQLite connection crosses a fork
        if os.fork() != 0:
            return 0
        _detach()
        try:
            code = _fetch(a, where, show_progress=False)
        except KeyboardInterrupt:
            code = 130
        except BaseException as exc:  # noqa: BLE001  (a daemon has nobody to raise to)
            _say(f"background fetch in {show_path(a.path)} failed: {show_text(str(exc))}")
            code = 1
        finally:
            sys.stderr.flush()
        os._exit(code)
    return _fetch(a, where, show_progress=v.bytes >= PROGRESS_FROM and sys.stderr.isatty())


def _fetch(a, where: str, show_progress: bool) -> int:
    from jam_core.cli.common import human, plugin_manager, session, show_path, show_text
    from jam_core.hook.fetch import fetch
    from jam_core.model import Session

    with (session("fetching") if show_progress else Session()) as s:
        result = fetch(a, plugin_manager(a.root.config), s)
    for rel, why in (result.failed + result.skipped)[:5]:
        _say(f"{show_path(rel)}: {show_text(why)}")
    if result.aborted:
        _say(f"stopped: {result.aborted}")
    n = len(result.done)
    if n:
        _say(f"fetched {n} file{'s' if n != 1 else ''} ({human(result.bytes)}) "
             f"{'here' if where == 'here' else 'in ' + where}")
    return 0


def _detach() -> None:
    """The background child: its own session (Ctrl-C and a closed terminal leave it alone),
    nothing on stdout, stderr still the terminal for the line that says it is done."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)


def _shell_word(s: str) -> str:
    import shlex

    return shlex.quote(s)
