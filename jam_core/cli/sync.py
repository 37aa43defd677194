"""`jam clone` and `jam sync`: the same tree on a second computer."""

from __future__ import annotations

import click

from jam_core.cli import main
from jam_core.cli.common import plugin_manager, plural, session, show_path, show_text


@main.command()
@click.argument("url")
@click.argument("path", required=False, type=click.Path())
@click.option("--tree", default=None, help="The tree to clone, when the remote holds several.")
@click.option("--name", "remote_name", default="origin", show_default=True, help="The remote's name in the new root.")
def clone(url: str, path, tree, remote_name: str) -> None:
    """Make PATH (new or empty) a root holding the newest snapshot of a tree on the remote at URL:
    every file as a stub (no space used; `jam checkout` brings the bytes)."""
    from jam_core.history.clone import clone as clone_
    from jam_core.history.restore import short

    with session("cloning") as s:
        out = clone_(url, path, plugin_manager(), tree=tree, name=remote_name, session=s)
    for line in out.problems[:20]:
        click.echo(f"jam: {line}", err=True)
    click.echo(f"cloned tree {out.tree!r} ({short(out.snapshot)} from {out.host or out.machine}) into {out.root}: "
               f"{plural(out.files, 'entry', 'entries')}, {plural(out.stubs, 'stub')}")
    raise SystemExit(out.exit_code)


@main.command()
@click.option("-m", "--message", default="", help="The message of the commit made first.")
def sync(message: str) -> None:
    """Commit, push, then fetch the other machines' snapshots of this tree and merge them: new
    files arrive as stubs; both sides' edits of one file keep both (a conflict copy, exit 1)."""
    from jam_core.history.restore import short
    from jam_core.history.sync import sync as sync_
    from jam_core.root import Root

    root = Root.find(".")
    with session("syncing") as s:
        out = sync_(root, plugin_manager(), s, message)
    for path, copy in out.conflicts:
        click.echo(f"jam: conflict: {show_path(path)} changed on both sides; theirs is {show_path(copy)}", err=True)
    for path, why in out.kept[:20]:
        click.echo(f"jam: kept: {show_path(path)}: {show_text(why)}", err=True)
    for line in out.problems[:20]:
        click.echo(f"jam: {line}", err=True)
    pins = (f", pinned {', '.join(map(show_path, out.pinned))}" if out.pinned else "") + \
        (f", unpinned {', '.join(map(show_path, out.unpinned))}" if out.unpinned else "") + \
        (f", fetched {plural(len(out.fetched), 'pinned file')}" if out.fetched else "")
    click.echo(f"synced: {plural(len(out.merged), 'head')} merged, +{out.added} ~{out.updated} -{out.removed}, "
               f"{plural(len(out.conflicts), 'conflict')}{pins}" + (f"; head {short(out.head)}" if out.head else ""))
    raise SystemExit(out.exit_code)
