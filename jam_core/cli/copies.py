"""`jam where`, `jam copy`, `jam move`, `jam drop`, `jam gc`."""

from __future__ import annotations

import json

import click

from jam_core.cli import main
from jam_core.cli.common import human, plugin_manager, plural, report, root_and_rels, session, show_path


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--check", is_flag=True, help="Ask every remote live (hashing in place where it can).")
@click.option("--json", "as_json", is_flag=True)
def where(paths, check: bool, as_json: bool) -> None:
    """Which remotes hold each stubbed file's content."""
    from jam_core.ops.copies import where as where_

    root, rels = root_and_rels(paths)
    rows, result = where_(root, rels, plugin_manager(), check=check)
    if as_json:
        click.echo(json.dumps([{"path": w.path, "oid": w.oid, "size": w.size, "remotes": w.known,
                                **({"check": w.live} if check else {})} for w in rows], indent=2))
    else:
        for w in rows:
            click.echo(f"{show_path(w.path)}\t{', '.join(w.known) or '(no remote)'}")
            for name, state in w.live.items():
                if state != "yes":
                    click.echo(f"  {name}: {state}")
    report(result, "", "", quiet=True)
    lacking = [w for w in rows if not w.known]
    raise SystemExit(1 if (result.exit_code or lacking) else 0)


@main.command()
@click.option("--to", "to", required=True, help="The remote to copy to.")
@click.argument("paths", nargs=-1, required=True)
def copy(to: str, paths) -> None:
    """Put the content of stubbed files on remote TO as well."""
    from jam_core.ops.copies import copy as copy_

    root, rels = root_and_rels(paths)
    with session("Copying") as s:
        result = copy_(root, rels, plugin_manager(), to, s)
    report(result, "Copied", f"to {to}")
    raise SystemExit(result.exit_code)


@main.command()
@click.option("--from", "src", required=True, help="The remote to move from.")
@click.option("--to", "dst", required=True, help="The remote to move to.")
@click.argument("paths", nargs=-1, required=True)
def move(src: str, dst: str, paths) -> None:
    """Copy stubbed files' content to remote TO, then remove it from remote FROM."""
    from jam_core.ops.copies import move as move_

    root, rels = root_and_rels(paths)
    with session("Moving") as s:
        result = move_(root, rels, plugin_manager(), src, dst, s)
    report(result, "Moved", f"to {dst}")
    raise SystemExit(result.exit_code)


@main.command()
@click.option("--from", "src", required=True, help="The remote to remove the copies from.")
@click.argument("paths", nargs=-1, required=True)
def drop(src: str, paths) -> None:
    """Remove stubbed files' content from remote FROM, only where enough copies remain."""
    from jam_core.ops.copies import drop as drop_

    root, rels = root_and_rels(paths)
    with session("Dropping") as s:
        result = drop_(root, rels, plugin_manager(), src, s)
    report(result, "Dropped", f"from {src}")
    raise SystemExit(result.exit_code)


@main.command()
@click.option("--dry-run", is_flag=True, help="Say what would go; remove nothing.")
def gc(dry_run: bool) -> None:
    """Remove from the remotes what nothing refers to any more (and stale uploads)."""
    from jam_core.ops.gc import gc as gc_
    from jam_core.root import Root

    out = gc_(Root.find("."), plugin_manager(), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for line in out.problems:
        click.echo(f"jam: {line}", err=True)
    for remote, oid, why in out.kept[:20]:
        click.echo(f"jam: kept {oid[:19]}… on {remote!r}: {why}", err=True)
    n, size = len(out.removed), sum(s for *_x, s in out.removed)
    e, esize = len(out.expired), sum(s for *_x, s in out.expired)
    t, tsize = len(out.leftovers), sum(s for *_x, s in out.leftovers)
    click.echo(f"gc: {verb} {plural(n, 'unused object')} ({human(size)}), "
               f"{plural(e, 'expired cache copy', 'expired cache copies')} ({human(esize)}), "
               f"{plural(t, 'stale upload')} ({human(tsize)})")
    raise SystemExit(out.exit_code)
