"""`jam where`, `jam copy`, `jam move`, `jam drop`, `jam gc`."""

from __future__ import annotations

import json

import click

from jam_core.cli import main
from jam_core.cli.common import plugin_manager, report, root_and_rels, session, show_path, show_text


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--check", is_flag=True, help="Ask every remote live (hashing in place where it can).")
@click.option("--json", "as_json", is_flag=True)
def where(paths, check: bool, as_json: bool) -> None:
    """Which remotes hold each stubbed file's content."""
    from jam_core.model import Session
    from jam_core.ops.copies import where as where_

    root, rels = root_and_rels(paths)
    pm, s = plugin_manager(), Session()
    pieces = None
    if check:
        from jam_core.history.chunks import Pieces

        pieces = Pieces(root, pm, s)
    rows, result = where_(root, rels, pm, check=check, session=s, pieces=pieces)
    if as_json:
        click.echo(json.dumps([{"path": w.path, "oid": w.oid, "size": w.size, "remotes": w.known,
                                **({"check": w.live} if check else {})} for w in rows], indent=2))
    else:
        for w in rows:
            click.echo(f"{show_path(w.path)}\t{show_text(', '.join(w.known)) or '(no remote)'}")
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

    _run(paths, "Copying", "Copied", f"to {to}", lambda root, rels, pm, s, p: copy_(root, rels, pm, to, s, pieces=p))


def _run(paths, title: str, verb: str, where: str, op) -> None:
    """One of copy, move, drop: the root and paths named, one session, the pieces (copies held
    as chunks count: ``history.chunks.Pieces``), the report and its exit code."""
    from jam_core.history.chunks import Pieces

    root, rels = root_and_rels(paths)
    pm = plugin_manager()
    with session(title) as s:
        result = op(root, rels, pm, s, Pieces(root, pm, s))
    report(result, verb, where)
    raise SystemExit(result.exit_code)


@main.command()
@click.option("--from", "src", required=True, help="The remote to move from.")
@click.option("--to", "dst", required=True, help="The remote to move to.")
@click.argument("paths", nargs=-1, required=True)
def move(src: str, dst: str, paths) -> None:
    """Copy stubbed files' content to remote TO, then remove it from remote FROM."""
    from jam_core.ops.copies import move as move_

    _run(paths, "Moving", "Moved", f"to {dst}",
         lambda root, rels, pm, s, p: move_(root, rels, pm, src, dst, s, pieces=p))


@main.command()
@click.option("--from", "src", required=True, help="The remote to remove the copies from.")
@click.argument("paths", nargs=-1, required=True)
def drop(src: str, paths) -> None:
    """Remove stubbed files' content from remote FROM, only where enough copies remain."""
    from jam_core.ops.copies import drop as drop_

    _run(paths, "Dropping", "Dropped", f"from {src}",
         lambda root, rels, pm, s, p: drop_(root, rels, pm, src, s, pieces=p))
