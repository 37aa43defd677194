"""`jam pin` and `jam unpin`: files and directories that policies never stash."""

from __future__ import annotations

import os

import click

from jam_core.cli import main
from jam_core.cli.common import plugin_manager, report, root_and_rels, session, show_path


@main.command()
@click.argument("paths", nargs=-1, type=click.Path())
def pin(paths: tuple[str, ...]) -> None:
    """Keep PATHS on this device: policies never stash them; pinned stubs come back now.

    With no PATHS, list the pins of the root around the current directory.
    """
    from jam_core.catalog import Catalog
    from jam_core.checkout import checkout
    from jam_core.errors import UsageError
    from jam_core.root import CATALOG, Root

    if not paths:
        root = Root.find(".")
        with Catalog(root.jam_dir / CATALOG) as cat:
            for p in sorted(cat.pins()):
                click.echo(show_path(p))
        return
    root, rels = root_and_rels(paths)
    for path, rel in zip(paths, rels):
        if not os.path.lexists(root.abs(rel)):
            raise UsageError(f"{path}: no such file or directory")
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat:
        cat.pin(rels)
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
    from jam_core.catalog import Catalog
    from jam_core.policy import covered
    from jam_core.root import CATALOG

    root, rels = root_and_rels(paths)
    code = 0
    with root.lock(), Catalog(root.jam_dir / CATALOG) as cat:
        pins = cat.pins()
        cat.unpin(rels)
        left = pins - set(rels)
        for rel in rels:
            if rel not in pins:
                click.echo(f"jam: {show_path(rel)} was not pinned", err=True)
                code = 1
            if covered(rel, left):
                holder = next(p for p in sorted(left, key=len, reverse=True) if covered(rel, {p}))
                click.echo(f"jam: {show_path(rel)} stays pinned through the pin on {show_path(holder)}", err=True)
                code = 1
    done = [r for r in rels if r in pins]
    if done:
        click.echo(f"unpinned {', '.join(show_path(r) for r in done)}")
    raise SystemExit(code)
