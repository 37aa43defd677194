"""`jam pin` and `jam unpin`: files and directories that policies never stash."""

from __future__ import annotations

import click

from jam_core.cli import main
from jam_core.cli.common import plugin_manager, report, root_and_rels, session, show_path


@main.command()
@click.argument("paths", nargs=-1, type=click.Path())
def pin(paths: tuple[str, ...]) -> None:
    """Keep PATHS on this device: policies never stash them; pinned stubs come back now.

    With no PATHS, list the pins of the root around the current directory.
    """
    from jam_core.ops.checkout import checkout
    from jam_core.policy import pins as policy
    from jam_core.root import Root

    if not paths:
        pins = policy.pins(Root.find("."))
        for p in pins:
            click.echo(show_path(p))
        if not pins:
            click.echo("no pins")
        return
    root, rels = root_and_rels(paths)
    policy.pin(root, rels)
    click.echo(f"pinned {', '.join(show_path(r) for r in rels)}")
    with session("fetching") as s:
        result = checkout(root, rels, plugin_manager(), s)
    if result.done or result.failed or result.skipped or result.aborted:
        report(result, "checked out", "fetched")
    raise SystemExit(result.exit_code)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
def unpin(paths: tuple[str, ...]) -> None:
    """Let policies stash PATHS again (their content stays local until a policy chooses it)."""
    from jam_core.policy import pins as policy

    root, rels = root_and_rels(paths)
    done, not_pinned, held = policy.unpin(root, rels)
    for rel in not_pinned:
        click.echo(f"jam: {show_path(rel)} was not pinned", err=True)
    for rel, holder in held:
        click.echo(f"jam: {show_path(rel)} stays pinned through the pin on {show_path(holder)}", err=True)
    if done:
        click.echo(f"unpinned {', '.join(show_path(r) for r in done)}")
    raise SystemExit(1 if not_pinned or held else 0)
