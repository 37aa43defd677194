"""What ``jam stash --auto`` and ``jam checkout --related`` print (helpers, no commands)."""

from __future__ import annotations

import click

from jam_core.cli.common import human, plural, report, session, show_path


def reasons_text(item) -> str:
    return "; ".join(f"{policy}: {reason}" for policy, reason in item.reasons)


def plan_lines(items) -> list[str]:
    """One line per planned file: its size, its path, its reasons. A plan of 100,000 files
    holds few distinct sizes and reasons: each is formatted once (a dict per kind) and every
    line is one f-string of three strings already made."""
    sizes: dict[int, str] = {}
    reasons: dict[tuple, str] = {}
    lines = []
    add = lines.append
    for item in items:
        size = item.size
        shown = sizes.get(size)
        if shown is None:
            shown = sizes[size] = f"{human(size):>10}"
        why = item.reasons
        key = why[0] if len(why) == 1 else tuple(why)  # a pair, or a tuple of pairs: never equal
        text = reasons.get(key)
        if text is None:
            text = reasons[key] = reasons_text(item)
        path = item.path
        add(f"{shown}  {path if path.isprintable() else show_path(path)}  ({text})")
    return lines


def print_plan(plan, dry_run: bool) -> None:
    verb = "would stash" if dry_run else "stashing"
    lines = plan_lines(plan.items)
    if lines:
        click.echo("\n".join(lines))
    if plan.kept:
        kept = ", ".join(f"{n} {why}" for why, n in sorted(plan.kept.items()))
        click.echo(f"never stashed by policies: {kept}")
    for path, policy in plan.refused[:20]:
        click.echo(f"jam: policy {policy} nominated {show_path(path)}, which policies may not stash; ignored",
                   err=True)
    n = len(plan.items)
    click.echo(f"{verb} {n} of {plural(plan.candidates, 'candidate file')}, "
               f"freeing {human(plan.bytes)} (policies: {', '.join(plan.policies)}; "
               f"local now {human(plan.local_bytes)})")


def stash_auto_command(dry_run: bool, as_json: bool = False) -> int:
    import json

    from jam_core.cli.common import plugin_manager
    from jam_core.policy.plan import carry_out, plan_auto
    from jam_core.root import Root
    from jam_core.scan import gc_paused

    root = Root.find(".")
    pm = plugin_manager()
    with gc_paused():  # an object per file and no cycle: a collection on the way would walk them all
        scan: list = []  # the plan's scan: freed with the plan, not as plan_auto returns
        plan = plan_auto(root, pm, scan)
        if as_json:
            click.echo(json.dumps(plan.to_json(), indent=2))
        else:
            print_plan(plan, dry_run)
        if dry_run or not plan.items:
            from jam_core.cli import finished

            if not finished(plan, scan):  # the console script leaves without freeing them
                del plan, scan  # freed before the collector is back, not walked by it first
            return 0
        del scan
    with session("stashing") as s:
        result = carry_out(root, plan, pm, s)
    report(result, "stashed", "freed")
    return result.exit_code


def related_rels(root, rels: list[str], pm) -> list[str]:
    """The stubs the select hook (purpose fetch) nominates along with ``rels``; printed."""
    from jam_core.policy.plan import related

    items = related(root, pm, rels)
    for item in items:
        click.echo(f"related: {show_path(item.path)} ({reasons_text(item)})")
    return [i.path for i in items]
