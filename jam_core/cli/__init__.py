"""The ``jam`` command line: a thin layer over the library functions of ``jam_core``.

Only click is imported at start-up; the plugin manager, paramiko and textual load inside the
commands that need them (``jam`` runs from a shell hook).
"""

from __future__ import annotations

import errno
import os
import sys

import click

from jam_core import __version__
from jam_core.errors import JamError

CONTEXT = {"help_option_names": ["-h", "--help"]}


class JamGroup(click.Group):
    """Turns every error into one line on stderr and its exit code; never a traceback.

    JamErrors carry their own message and code. The rest is the backstop: a closed stdout
    (``jam status | head -1``) ends quietly, a full disk and a damaged or locked catalog say
    what to do, a plugin's hook that raises is named, anything else is one line (the
    traceback with ``JAM_DEBUG=1``)."""

    def invoke(self, ctx):
        try:
            out = super().invoke(ctx)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            return out
        except JamError as exc:
            click.echo(f"jam: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("jam: interrupted; nothing was lost (files not yet done are as they were)", err=True)
            ctx.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                _quiet_stdout()
                ctx.exit(EXIT_PIPE)
            if os.environ.get("JAM_DEBUG"):
                raise
            click.echo(f"jam: {_os_error(exc)}", err=True)
            ctx.exit(1)
        except Exception as exc:
            if os.environ.get("JAM_DEBUG"):
                raise
            click.echo(f"jam: {_unexpected(exc)}", err=True)
            ctx.exit(1)


EXIT_PIPE = 141  # what a shell reports for a tool that SIGPIPE ended (128 + 13)


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
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return ("the catalog (.jam/catalog.db) is locked by another process; "
                "wait for it to finish and run the command again")
    if "full" in text:
        return "no space left on the local disk for the catalog (.jam/catalog.db); free some space and run it again"
    if "i/o" in text or "readonly" in text or "read-only" in text or "unable to open" in text:
        return (f"cannot write the catalog (.jam/catalog.db): {exc}; check the disk and "
                "the permissions of .jam, then run the command again")
    return (f"the catalog (.jam/catalog.db) is damaged ({exc}); `jam doctor --fix` rebuilds it "
            "from the tree")


@click.group(cls=JamGroup, context_settings=CONTEXT, invoke_without_command=True)
@click.version_option(__version__, "-V", "--version", prog_name="jam")
@click.pass_context
def main(ctx: click.Context) -> None:
    """jam keeps a directory tree whole while most of its bytes live on remotes.

    Cold files become stubs (sparse placeholders with their true size, mtime and mode);
    `jam checkout` or the cd hook brings them back.
    """
    if ctx.invoked_subcommand is None:
        if sys.stdin.isatty() and sys.stdout.isatty() and _in_root():  # a person at a terminal: the TUI
            from jam_core.cli.tui import run_tui

            raise SystemExit(run_tui("."))
        click.echo(ctx.get_help())


def _in_root() -> bool:
    from pathlib import Path

    from jam_core.root import find_root

    try:
        return find_root(Path.cwd()) is not None
    except OSError:
        return False


from jam_core.cli import copies, daemon, doctor, files, hook, pins, plugins_cmd, remotes, tui  # noqa: E402,F401  (register commands)
