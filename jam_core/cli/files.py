"""Commands on files: init, stash, checkout, status, demo (doctor: cli/doctor.py)."""

from __future__ import annotations

import click

from jam_core.cli import main
from jam_core.cli.common import plugin_manager, report, root_and_rels, session, show_path


@main.command()
@click.argument("path", default=".", type=click.Path(file_okay=False))
def init(path: str) -> None:
    """Make PATH (default: here) a jam root. Adds the embedded default remote if none is set."""
    import os

    from jam_core.ops.remotes import ensure_default_remote
    from jam_core.root import Root, register_root

    root, created = Root.init(_as_the_shell_says(path))
    real = os.path.realpath(root.path)
    if real != str(root.path):  # the overlap checks and a shell that resolved links use this one
        register_root(real)
    remote = ensure_default_remote(root, plugin_manager())
    if created:
        click.echo(f"Initialised jam root {show_path(str(root.path))}")
    else:
        click.echo(f"{show_path(str(root.path))} is already a jam root")
    if remote is not None:
        click.echo(f"Added remote {remote.name!r}: {show_path(remote.location)} (tier {remote.tier})")


def _as_the_shell_says(path: str) -> str:
    """A relative PATH joined to $PWD when that names the same directory: the path the user
    reached it through (a symlink on the way: ``cd ~/data; jam init``), which the cd hooks
    compare $PWD with; getcwd() would give the physical path. Otherwise PATH as given."""
    import os

    pwd = os.environ.get("PWD", "")
    if os.path.isabs(path) or not os.path.isabs(pwd):
        return path
    joined = os.path.normpath(os.path.join(pwd, path))
    try:
        return joined if os.path.samefile(joined, path) else path
    except (OSError, ValueError):
        return path


@main.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--auto", is_flag=True, help="Let the configured policies choose what to stash.")
@click.option("--dry-run", is_flag=True, help="With --auto: print the plan and its reasons, change nothing.")
def stash(paths: tuple[str, ...], auto: bool, dry_run: bool) -> None:
    """Turn files (directories recursively) into stubs once their content is on the remotes."""
    from jam_core.errors import UsageError

    if dry_run and not auto:
        raise UsageError("--dry-run goes with --auto (jam stash --auto --dry-run)")
    if auto:
        if paths:
            raise UsageError("jam stash --auto takes no paths: policies look at the whole root "
                             "(keep files with `jam pin` or .jamignore)")
        from jam_core.cli.auto import stash_auto_command

        raise SystemExit(stash_auto_command(dry_run))
    if not paths:
        raise UsageError("name the files or directories to stash (or use --auto)")
    from jam_core.ops.stash import stash as do_stash  # not for --auto (its dry-run never stashes)
    root, rels = root_and_rels(paths)
    pm = plugin_manager()
    with session("stashing") as s:
        result = do_stash(root, rels, pm, s)
    report(result, "stashed", "freed")
    raise SystemExit(result.exit_code)


@main.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--related", is_flag=True, help="Also fetch the stubs most likely wanted next (see [related]).")
@click.option("--keep-both", is_flag=True,
              help="For a stub that was written into: fetch the stashed version beside it as "
                   "'NAME (stashed version)' and leave the written-into file as it is.")
def checkout(paths: tuple[str, ...], related: bool, keep_both: bool) -> None:
    """Bring stubs back (directories recursively): fetched, verified, then swapped in.

    Name what to bring back (`.` is the current directory). Exit 1 if a file could not come
    back (a stub that was written into is kept as it is: see --keep-both)."""
    from jam_core.errors import UsageError
    from jam_core.ops.checkout import checkout as do_checkout

    if not paths:
        raise UsageError("name the files or directories to check out (`jam checkout .` for the current directory)")
    root, rels = root_and_rels(paths)
    pm = plugin_manager()
    if related:
        from jam_core.cli.auto import related_rels

        rels += related_rels(root, rels, pm)
    options = {"keep_both": True} if keep_both else {}
    with session("fetching") as s:
        result = do_checkout(root, rels, pm, s, **options)
    report(result, "checked out", "fetched")
    raise SystemExit(result.exit_code)


@main.command()
@click.argument("path", default=".", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(path: str, as_json: bool) -> None:
    """Per directory and in total: files local and stubbed, true bytes and bytes on disk."""
    from jam_core.cli.status import show_status

    show_status(path, as_json)


@main.command()
def demo() -> None:
    """Build a sample tree in a temporary folder and show stash, status and checkout on it."""
    from jam_core.ops.demo import run_demo

    raise SystemExit(run_demo(click.echo))
