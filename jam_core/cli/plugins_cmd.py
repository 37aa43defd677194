"""`jam plugins`."""

from __future__ import annotations

import json

import click

from jam_core.cli import main
from jam_core.cli.common import plugin_manager


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List the plugins, their hooks and versions; a third-party plugin that could not be
    loaded is listed as broken, with why."""
    from jam_core.manager import plugin_info

    info = plugin_info(plugin_manager())
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for p in info:
        version = f" {p['version']}" if p["version"] else ""
        origin = "built-in" if p["builtin"] else "entry point"
        if p["broken"]:
            click.echo(f"{p['name']}{version} ({origin}): BROKEN, skipped: {p['broken']} "
                       f"(block it with JAM_BLOCK_PLUGINS={p['name']})")
        else:
            click.echo(f"{p['name']}{version} ({origin}): {', '.join(p['hooks'])}")
