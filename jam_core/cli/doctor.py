"""``jam doctor``: the health check, printed as a checklist (or ``--json``, the stable schema)."""

from __future__ import annotations

import json

import click

from jam_core.cli import main
from jam_core.cli.common import plugin_manager, plural, root_and_rels, session, show_path, show_text

MARKS = {"ok": "ok", "info": "info", "warning": "warning", "problem": "problem"}


@main.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--deep", is_flag=True, help="Read every object back and verify its hash (slow).")
@click.option("--fix", is_flag=True, help="Repair what is safe to repair, and say what was done.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a documented, stable schema).")
@click.option("--older-than", "older_than", metavar="DURATION",
              help="With --deep: read again only objects not verified for DURATION (e.g. 30d).")
def doctor(paths: tuple[str, ...], deep: bool, fix: bool, as_json: bool, older_than: str | None) -> None:
    """Check the set-up and prove that every stub under PATH (default: here) can come back.

    A checklist by section (Set-up, Stubs, Leftovers, Scrub), each line ok, info, warning or
    problem with what to do. Exit 0 when all is well, 1 when something needs attention."""
    from jam_core.errors import UsageError
    from jam_core.ops.doctor import TITLES
    from jam_core.ops.doctor import doctor as do_doctor
    from jam_core.units import parse_duration

    age = parse_duration(older_than, "--older-than") if older_than is not None else None
    if age is not None and not deep:
        raise UsageError("--older-than chooses what --deep reads again: use it with --deep")
    root, rels = root_and_rels(paths or ["."])
    with session("verifying") as s:
        res = do_doctor(root, rels, plugin_manager(), s, deep=deep, fix=fix, older_than=age)
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2))
        raise SystemExit(res.exit_code)
    section = None
    for f in res.ordered():
        if f.section != section:
            section = f.section
            click.echo(TITLES[section])
        where = f"{show_path(f.path)}: " if f.path else ""
        label = f"{f.kind}: " if f.status in ("problem", "warning") else ""
        done = " (fixed)" if f.fixed else ""
        click.echo(f"  {MARKS[f.status]:<8} {label}{where}{show_text(f.detail)}{done}")
    unfixed, fixed, warnings = len(res.unfixed), sum(1 for p in res.problems if p.fixed), len(res.warnings)
    line = f"checked {plural(res.stubs, 'stub')} on {plural(len(res.remotes), 'remote')}: "
    line += "all can come back" if not unfixed else f"{plural(unfixed, 'problem')} to look at"
    extra = []
    if fixed:
        extra.append(f"{fixed} repaired")
    if warnings:
        extra.append(plural(warnings, "warning"))
    if res.deep:
        extra.append(f"{res.verified} copies read back")
    click.echo(line + (f" ({', '.join(extra)})" if extra else ""))
    raise SystemExit(res.exit_code)
