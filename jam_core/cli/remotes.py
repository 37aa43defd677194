"""`jam remote add|list|remove`."""

from __future__ import annotations

import json

import click

from jam_core.cli import main
from jam_core.cli.common import plugin_manager, report, session, show_text


@main.group()
def remote() -> None:
    """Configure where stashed content goes."""


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--tier", default=0, type=int, show_default=True, help="0 = nearest and fastest; higher = farther.")
def remote_add(name: str, url: str, tier: int) -> None:
    """Add remote NAME at URL (a path, file:///path or sftp://[user@]host[:port]/path)."""
    from jam_core.ops.remotes import add_remote
    from jam_core.root import Root

    r, desc = add_remote(Root.find("."), plugin_manager(), name, url, tier)
    click.echo(f"Added remote {show_text(repr(r.name))} (tier {r.tier}): {show_text(desc)}")


@remote.command("list")
@click.option("--json", "as_json", is_flag=True)
def remote_list(as_json: bool) -> None:
    """List the root's remotes, nearest tier first."""
    from jam_core.root import Root

    remotes = sorted(Root.find(".").remotes(), key=lambda r: (r.tier, r.name))
    if as_json:
        click.echo(json.dumps([{"name": r.name, "kind": r.kind, "url": r.url, "location": r.location,
                                "tier": r.tier} for r in remotes], indent=2))
        return
    if not remotes:
        click.echo("no remotes (add one with `jam remote add NAME URL`)")
    for r in remotes:
        click.echo(f"{show_text(r.name)}\t{show_text(r.kind)}\ttier {r.tier}\t{show_text(r.url)}")


@remote.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True, help="Forget it even if it holds the only copy of some stubs.")
@click.option("--move-to", "move_to", default=None, help="First move what it holds for this root to this remote.")
def remote_remove(name: str, force: bool, move_to: str | None) -> None:
    """Forget remote NAME (its objects stay where they are)."""
    import sys

    from jam_core.catalog import Catalog
    from jam_core.history.chunks import Pieces
    from jam_core.model import Session
    from jam_core.ops.copies import remove_remote
    from jam_core.root import CATALOG, Root

    root = Root.find(".")
    if move_to is None and not force and sys.stdin.isatty() and sys.stderr.isatty() \
            and name in {r.name for r in root.remotes()}:
        with Catalog(root.jam_dir / CATALOG) as cat:
            only = cat.objects_only_on(name)
        others = [r.name for r in root.remotes() if r.name != name]
        if only and others:
            answer = click.prompt(f"remote {name!r} holds the only copy of {only} stubbed file(s); move them to",
                                  type=click.Choice(others + ["no"]), default=others[0], err=True)
            move_to = None if answer == "no" else answer
    if move_to is not None:
        from jam_core.history.chunks import Pieces
        from jam_core.ops.copies import move_off

        pm = plugin_manager()
        with session("Moving") as s:
            result = move_off(root, pm, name, move_to, s, pieces=Pieces(root, pm, s))
        report(result, "Moved", f"to {move_to}", quiet=True)
        if result.failed or result.aborted:
            raise SystemExit(1)
    gone = next((r for r in root.remotes() if r.name == name), None)
    pm = plugin_manager()
    with Session() as s:
        remove_remote(root, name, force, pm=pm, session=s, pieces=Pieces(root, pm, s))
    if gone is not None and not force:
        _forget_refs_on(root, gone)
    click.echo(f"Removed remote {name!r} (its objects were left on it)")


def _forget_refs_on(root, remote) -> None:
    """Best effort: empty this root's refs on a remote it no longer uses, so that no other root
    counts a copy there as this root's (their removals read the refs; copies._short_of)."""
    from jam_core.errors import JamError
    from jam_core.ops.refs import encode, root_id
    from jam_core.placement import copies_of

    try:
        with session("Forgetting") as s, root.lock():
            plugin_manager().hook.write_meta(remote=remote, name=f"refs/{root_id(root)}",
                                             data=encode(copies_of(root.config), []), session=s)
    except (JamError, OSError):
        pass
