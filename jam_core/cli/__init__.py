"""The ``jam`` command line: a thin layer over the library functions of ``jam_core``.

Only click is imported at start-up; the plugin manager, paramiko and textual load inside the
commands that need them (``jam`` runs from a shell hook).
"""

from __future__ import annotations

import os

import click

from jam_core import __version__
from jam_core.errors import JamError

CONTEXT = {"help_option_names": ["-h", "--help"]}


class JamGroup(click.Group):
    """Turns every JamError into one line on stderr and its exit code; never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except JamError as exc:
            click.echo(f"jam: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("jam: interrupted; nothing was lost (files not yet done are as they were)", err=True)
            ctx.exit(130)
        except OSError as exc:
            if os.environ.get("JAM_DEBUG"):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"jam: {where}{exc.strerror or exc}", err=True)
            ctx.exit(1)


@click.group(cls=JamGroup, context_settings=CONTEXT, invoke_without_command=True)
@click.version_option(__version__, "-V", "--version", prog_name="jam")
@click.pass_context
def main(ctx: click.Context) -> None:
    """jam keeps a directory tree whole while most of its bytes live on remotes.

    Cold files become stubs (sparse placeholders with their true size, mtime and mode);
    `jam checkout` or the cd hook brings them back.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


from jam_core.cli import files, remotes, plugins_cmd, pins, hook  # noqa: E402,F401  (register commands)
