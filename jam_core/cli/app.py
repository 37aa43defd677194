"""The click group behind ``jam``: every command registers on it, and :class:`JamGroup` turns
every error into one line on stderr and its exit code.

Built on first use by ``jam_core.cli.main`` (see jam_core/cli/__init__.py): ``jam --version``
the cd hook's ``jam hook-fetch DIR`` and the plain ``jam status [--json] [PATH]`` never import
click.
"""

from __future__ import annotations

import sys

import click

from jam_core import __version__
from jam_core.cli import failed

CONTEXT = {"help_option_names": ["-h", "--help"]}


class JamUsageError(click.UsageError):
    """A mistake on the command line (unknown option or command, an argument too many or
    missing, a value of the wrong type): one ``jam: `` line and exit 2, instead of click's
    Usage/Try/Error block."""

    @classmethod
    def of(cls, exc: click.UsageError) -> JamUsageError:
        new = cls(exc.format_message(), exc.ctx)
        new.__cause__, new.__suppress_context__ = exc.__cause__, True
        return new

    def show(self, file=None) -> None:
        from jam_core.cli.common import show_path

        message = show_path(" ".join(self.format_message().split()))  # one line, nothing a terminal acts on
        where = "jam"
        if self.ctx is not None:  # `jam remote add --help`, whatever name the program was called by
            where = " ".join(["jam", *self.ctx.command_path.split(" ")[1:]])
        click.echo(f"jam: {message} (`{show_path(where)} --help` for help)", file=file, err=file is None)


def _usage(exc: click.UsageError) -> click.UsageError:
    """``exc`` as one ``jam: `` line; a group called without its subcommand still shows its help."""
    if isinstance(exc, (JamUsageError, click.exceptions.NoArgsIsHelpError)):
        return exc
    return JamUsageError.of(exc)


class JamGroup(click.Group):
    """Turns every error into one line on stderr and its exit code; never a traceback.

    Every error but click's own is said by ``jam_core.cli.failed`` (the commands answered
    without click say theirs the same way)."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _usage(exc) from None

    def invoke(self, ctx):
        try:
            out = super().invoke(ctx)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            return out
        except click.UsageError as exc:  # a subcommand's: unknown option, argument too many...
            raise _usage(exc) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            code = failed(exc)
            if code is None:
                raise
            ctx.exit(code)


@click.group("main", cls=JamGroup, context_settings=CONTEXT, invoke_without_command=True)
@click.version_option(__version__, "-V", "--version", prog_name="jam")
@click.pass_context
def group(ctx: click.Context) -> None:
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
