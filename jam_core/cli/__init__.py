"""The ``jam`` command line: a thin layer over the library functions of ``jam_core``.

``main`` is both the console script's entry (``jam = jam_core.cli:main``) and the click group
every command registers on (``@main.command()``, ``CliRunner().invoke(main, ...)``). The group
(jam_core/cli/app.py) is built on first use, so this module imports no click: ``jam --version``,
the cd hook's ``jam hook-fetch [--] DIR`` and ``jam status [--json] [PATH]`` (a scan people run
on large trees: click and what it imports are a quarter of a small one's time) are answered
without it. On the hook's path only what the fetch needs loads (the plugin manager with the
built-in dir backend alone when every remote of the root is a ``dir`` one; see
jam_core/cli/hook.py). Any other command line, and any form of these that is not exactly the
plain one, goes to click; errors are said by ``failed`` either way.
"""

from __future__ import annotations

import errno
import os
import sys

from jam_core import __version__

EXIT_PIPE = 141  # what a shell reports for a tool that SIGPIPE ended (128 + 13)
EXIT_BOOT = 121  # the hook's site-less start cannot answer this one: the hook runs jam instead
ENV_SHOW_MODULES = "JAM_DEBUG_MODULES"  # a file: hook-fetch appends the modules it loaded (tests)

_GROUP = None
_BOOTED = False  # started by the hook's bootstrap (python -I -S, no site): see boot()
_SCRIPT = False  # running as the console script (``jam ...``), not main(args=...)
_DONE = False  # the command said it finished with everything written and closed: see finished()
_KEPT: tuple = ()  # what such a command made: never freed one by one


def _group():
    """The click group with every command registered (built once)."""
    global _GROUP
    if _GROUP is None:
        from jam_core.cli.app import group

        _GROUP = group
        from jam_core.cli import (  # noqa: F401
            copies,
            daemon,
            doctor,
            files,
            history,  # noqa: F401  (after copies: its `gc` adds --keep)
            hook,
            pins,
            plugins_cmd,
            remotes,
            sync,
            tui,
        )

        hook.register(group)
    return _GROUP


class _Main:
    """The ``jam`` entry: the click group, built when first needed. Called with no arguments
    (as the console script does) it answers the two fast forms from ``sys.argv`` itself;
    everything else (attributes, ``main(args=...)``) is the group's."""

    def __call__(self, *args, **kwargs):
        if not args and not kwargs:
            import gc

            first = sys.argv[1:2]
            if first == ["status"]:
                # A short process whose scan turns the collector off anyway (scan.gc_paused):
                # turned back on after it, its first collection would walk every object the
                # scan left (~5 ms after 100,000 files) just before the process ends.
                gc.disable()
            code = _fast(sys.argv[1:])
            if code is not None:
                if first in (["hook-fetch"], ["status"]):
                    _leave(code)  # (nothing is left open: no teardown to wait for)
                sys.exit(code)
            if first == ["status"]:
                gc.enable()  # (a form of status that click answers)
            global _SCRIPT
            _SCRIPT = True
            try:
                return _group()()
            except SystemExit as exc:
                if _DONE and (exc.code is None or isinstance(exc.code, int)):
                    _leave_done(exc.code or 0)
                raise
        return _group()(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(_group(), name)

    def __repr__(self) -> str:
        return "<jam command line (jam_core.cli.main)>"


main = _Main()


def _fast(args: list[str]) -> int | None:
    """The exit code of ``jam --version`` / ``jam -V``, of the hook's ``jam hook-fetch [--]
    DIR`` and of the plain ``jam status``, answered without click; None for any other command
    line (click parses it)."""
    if args == ["--version"] or args == ["-V"]:
        try:
            sys.stdout.write(f"jam, version {__version__}\n")  # what click's version_option prints
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_stdout()
            return EXIT_PIPE
        return 0
    if args[:1] == ["status"]:
        form = _plain_status(args[1:])
        return None if form is None else _run(form)
    if args[:1] != ["hook-fetch"]:
        return None
    rest = args[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    elif rest[:1] and rest[0].startswith("-"):
        return None  # --help and the like
    if len(rest) != 1 or not rest[0] or not _plain_dir(rest[0]):
        return None  # click says what is wrong, as it always did
    import gc

    # The fetch's imports allocate much and free almost nothing: a collection during them
    # finds no garbage and costs the hook a few milliseconds. Off for this short process
    # (its objects are a few per file; scan.py's walks turn it off anyway).
    was = gc.isenabled()
    gc.disable()
    try:
        from jam_core.cli.hook import run_hook_fetch

        return run_hook_fetch(rest[0])
    except Exception as exc:
        if os.environ.get("JAM_DEBUG"):
            raise
        from jam_core.cli.common import show_text

        print(f"jam: {show_text(_unexpected(exc))}", file=sys.stderr, flush=True)
        return 1
    finally:
        _show_modules()
        if was:
            gc.enable()


def _plain_status(args: list[str]):
    """``jam status [--json] [PATH]`` (in any order, ``--`` before a PATH that starts with a
    dash) as the work to run, or None for any other form (``--help``, an unknown option, two
    paths: click says what it says for them)."""
    as_json, paths, options = False, [], True
    for a in args:
        if options and a == "--":
            options = False
        elif options and a == "--json" and not as_json:
            as_json = True
        elif (options and a.startswith("-")) or not a or paths:
            return None
        else:
            paths.append(a)

    def work() -> None:
        from jam_core.cli.status import show_status

        show_status(paths[0] if paths else ".", as_json)

    return work


def _run(work) -> int:
    """Run a command's ``work`` outside click, its errors said as the click group says them."""
    try:
        work()
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return 0
    except (Exception, KeyboardInterrupt) as exc:
        code = failed(exc)
        if code is None:
            raise
        return code
    finally:
        _show_modules()


def failed(exc: BaseException) -> int | None:
    """A command's error as jam shows it, whichever way the command ran (the click group's
    ``JamGroup.invoke``, or ``_run``): one ``jam: `` line on stderr and the exit code to leave
    with. JamErrors carry their own message and code; a closed stdout (``jam status | head
    -1``) ends quietly; a full disk and a damaged or locked catalog say what to do; a plugin's
    hook that raises is named; anything else is one line. None: raise it (``JAM_DEBUG=1``
    shows the traceback)."""
    from jam_core.cli.common import show_text
    from jam_core.errors import JamError

    if isinstance(exc, JamError):
        line, code = show_text(exc), exc.exit_code
    elif isinstance(exc, KeyboardInterrupt):
        line, code = "interrupted; nothing was lost (files not yet done are as they were)", 130
    elif isinstance(exc, OSError) and exc.errno == errno.EPIPE:
        _quiet_stdout()
        return EXIT_PIPE
    elif not isinstance(exc, Exception) or os.environ.get("JAM_DEBUG"):
        return None
    else:
        line, code = show_text(_os_error(exc) if isinstance(exc, OSError) else _unexpected(exc)), 1
    print(f"jam: {line}", file=sys.stderr, flush=True)
    return code


def boot() -> None:
    """The cd hook's site-less start: ``python -I -S -c BOOTSTRAP hook-fetch -- DIR``, the
    bootstrap written by ``jam hook SHELL`` (jam_core/cli/hook.py) with the ``sys.path``
    entries jam needs. Answers the plain form only; for anything else, and for a root whose
    fetch needs more than the built-in dir backend (third-party plugins may come from .pth
    files and import hooks only site sets up), it exits EXIT_BOOT and the hook runs the jam
    script instead. Never returns. (The bootstrap of today's hooks goes through the warm
    server first: jam_core/cli/hook_server.py; this is the one of hooks loaded before it.)"""
    _leave(boot_code())


def boot_code() -> int:
    """:func:`boot`'s answer, as an exit code (also the warm server's child's)."""
    global _BOOTED
    _BOOTED = True
    args = sys.argv[1:]
    code = _fast(args) if args[:1] == ["hook-fetch"] else None
    return EXIT_BOOT if code is None else code


def booted() -> bool:
    """True in a process :func:`boot` started (no site)."""
    return _BOOTED


def _leave(code: int) -> None:
    """End the hook's ``jam hook-fetch`` process now: flush what it said and exit without the
    interpreter's teardown (a full collection and every module torn down: milliseconds the
    prompt waits for, with nothing left to do: catalogs are closed, no thread runs)."""
    _flush()
    os._exit(code)


def _flush() -> None:
    """Flush stdout and stderr, quietly (a closed pipe, a full disk, a stream the shell closed)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # (AttributeError: closed by the shell, it is None)
            pass


def finished(*keep) -> bool:
    """Said by a command that has done its work: its output written, its files and catalogs
    closed, no thread left. Run as the console script (``jam ...``), the process then leaves
    with ``os._exit`` once stdout and stderr are flushed, without the interpreter's teardown:
    ``keep`` (what the command made, e.g. a dry-run's plan of 100,000 files) is never freed
    object by object, and nothing made so far is walked by the collector again (``gc.freeze``);
    ~30 ms after a dry-run over 100,000 files. Returns False, and does nothing, under
    ``main(args=...)`` (CliRunner, callers): their process goes on."""
    global _DONE, _KEPT
    if not _SCRIPT:
        return False
    import gc

    _DONE, _KEPT = True, keep
    gc.freeze()
    return True


def _leave_done(code: int) -> None:
    """:func:`_leave` for a command that said it :func:`finished`, only if nothing could still
    need the teardown: one thread, and stdout and stderr flushed (a flush that fails goes the
    interpreter's usual way, with its usual message and exit code)."""
    import threading

    if threading.active_count() != 1:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        return
    os._exit(code)


def _plain_dir(path: str) -> bool:
    """What click's ``Path(file_okay=False, readable=False)`` accepts without a word: a missing
    path or one that is not a regular file (a directory one may enter but not list, too: a cd
    there must not turn the hook off)."""
    import stat

    try:
        st = os.stat(path)
    except OSError:
        return True  # click lets a path it cannot stat through (exists=False)
    except ValueError:  # a NUL byte
        return False
    return not stat.S_ISREG(st.st_mode)


def _show_modules() -> None:
    """With ``$JAM_DEBUG_MODULES`` naming a file, append the names of the modules this process
    loaded, one a line (tests check what the hook's path imports)."""
    where = os.environ.get(ENV_SHOW_MODULES)
    if where:
        with open(where, "a", encoding="utf-8") as f:
            f.write("".join(f"{name}\n" for name in sorted(sys.modules)))


def _quiet_stdout() -> None:
    """The reader went away: point stdout at /dev/null so nothing more (not even the
    interpreter's flush at exit) complains about it (the Python docs' recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (tests): nothing to flush
        pass


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return "no space left on the local disk" + (f" (writing {where})" if where else "") + \
            "; free some space and run the command again"
    return f"{where}: {exc.strerror or exc}" if where else f"{exc.strerror or exc}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unexpected(exc: Exception) -> str:
    """One line for an exception jam did not turn into a JamError itself."""
    sqlite3 = sys.modules.get("sqlite3")
    if sqlite3 is not None and isinstance(exc, sqlite3.Error):
        return _sqlite_error(exc)
    from jam_core.cli.common import last_plugin_manager

    pm = last_plugin_manager()
    if pm is not None:
        from jam_core.manager import plugin_of

        found = plugin_of(pm, exc.__traceback__)
        if found is not None:
            name, func = found
            return (f"plugin {name} failed in {func}: {_one_line(exc)} "
                    f"(block it with JAM_BLOCK_PLUGINS={name})")
    return f"internal error: {_one_line(exc)} (run again with JAM_DEBUG=1 to see where)"


def _sqlite_error(exc: Exception) -> str:
    """One line for an sqlite3 error that reached the CLI: the catalog's, or the history's
    (``jam_core/history`` in its traceback), which no doctor can rebuild from the tree."""
    history = _raised_in(exc, os.path.join("jam_core", "history", ""))
    what, where = ("the history", ".jam/history/history.db") if history else ("the catalog", ".jam/catalog.db")
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return (f"{what} ({where}) is locked by another process; "
                "wait for it to finish and run the command again")
    if "full" in text:
        return f"no space left on the local disk for {what} ({where}); free some space and run it again"
    if "i/o" in text or "readonly" in text or "read-only" in text or "unable to open" in text:
        return (f"cannot write {what} ({where}): {exc}; check the disk and "
                f"the permissions of {os.path.dirname(where)}, then run the command again")
    if history:
        return (f"the history ({where}) is damaged ({exc}); the command stopped there: put it back from a "
                "backup (jam keeps every object meanwhile)")
    return (f"the catalog ({where}) is damaged ({exc}); `jam doctor --fix` rebuilds it "
            "from the tree")


def _raised_in(exc: BaseException, part: str) -> bool:
    """True if a frame of ``exc``'s traceback runs code from a path containing ``part``."""
    tb = exc.__traceback__
    while tb is not None:
        if part in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False
