"""`jam remote add|list|remove`."""

from __future__ import annotations

import json

import click

from jam_core.cli import main
from jam_core.cli.common import plugin_manager


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
    click.echo(f"Added remote {r.name!r} (tier {r.tier}): {desc}")


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
        click.echo(f"{r.name}\t{r.kind}\ttier {r.tier}\t{r.url}")


@remote.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True, help="Forget it even if it holds the only copy of some stubs.")
def remote_remove(name: str, force: bool) -> None:
    """Forget remote NAME (its objects stay where they are)."""
    from jam_core.ops.remotes import remove_remote
    from jam_core.root import Root

    remove_remote(Root.find("."), name, force)
    click.echo(f"Removed remote {name!r} (its objects were left on it)")
