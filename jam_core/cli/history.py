"""`jam commit`, `jam log`, `jam diff`, `jam restore`, and `jam gc` (with `--keep`)."""

from __future__ import annotations

import json
import os
import time

import click

from jam_core.cli import main
from jam_core.cli.common import human, plugin_manager, plural, report, session, show_path, show_text


def _root_rels(paths):
    """The root of the cwd and each path relative to it; a path need not exist (a deleted
    file is what restore and log are for), but it must be inside the root."""
    from jam_core.root import Root

    root = Root.find(".")
    return root, [root.rel(p) for p in paths]


def _when(time_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time_ns / 1e9))


@main.command()
@click.option("-m", "--message", default="", help="What this snapshot is.")
@click.option("--auto", is_flag=True, help="Commit only if [history] auto has passed since the last commit.")
@click.argument("paths", nargs=-1, type=click.Path())
def commit(message: str, auto: bool, paths) -> None:
    """Record the tree as a snapshot (PATH...: only these are looked at; the rest is as in the
    last snapshot). Local files whose content no remote holds are uploaded first (they stay local)."""
    from jam_core.errors import UsageError
    from jam_core.history.restore import short
    from jam_core.history.store import commit as commit_

    if auto and paths:
        raise UsageError("jam commit --auto takes no paths")
    root, rels = _root_rels(paths) if paths else (None, None)
    if root is None:
        from jam_core.root import Root

        root = Root.find(".")
    from contextlib import nullcontext

    from jam_core.history import auto as auto_

    # one automatic commit of a root at a time, whoever started it (daemon, cd hook, cron)
    with auto_.hold(root.jam_dir) if auto else nullcontext(True) as got:
        if not got:
            click.echo("another automatic commit of this root is running; nothing done")
            raise SystemExit(0)
        with session("committing") as s:
            out = commit_(root, plugin_manager(), message, rels, s, auto=auto)
        try:
            auto_.stamp(root.jam_dir)  # the cd hook's clock: the next automatic commit one interval on
        except OSError:
            pass
    for rel, why in out.skipped[:20]:
        click.echo(f"jam: skipped: {show_path(rel)}: {show_text(why)}", err=True)
    if len(out.skipped) > 20:
        click.echo(f"jam: ... and {len(out.skipped) - 20} more skipped", err=True)
    for line in out.problems:
        click.echo(f"jam: {show_text(line)}", err=True)
    if out.nothing:
        click.echo(out.nothing)
    else:
        click.echo(f"committed {short(out.id)}: {plural(out.files, 'file')} (+{out.added} ~{out.modified} "
                   f"-{out.deleted}), {plural(out.uploaded, 'new object')} uploaded ({human(out.bytes)})")
    raise SystemExit(out.exit_code)


@main.command()
@click.argument("path", required=False, type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def log(path, as_json: bool) -> None:
    """The snapshots, newest first: id, when, machine, message, what changed (+added ~modified
    -deleted). With PATH: the snapshots in which it changed."""
    from jam_core.history.restore import log as log_
    from jam_core.history.restore import short

    root, rels = _root_rels([path] if path else ["."])
    rows = log_(root, rels[0])
    if as_json:
        click.echo(json.dumps([{"id": r.id, "time": _when(r.time_ns), "time_ns": r.time_ns, "machine": r.machine,
                                "host": r.host, "message": r.message, "files": r.files, "added": r.added,
                                "modified": r.modified, "deleted": r.deleted,
                                **({"change": r.change, "size": r.item.size if r.item else None,
                                    "oid": r.item.oid if r.item else None} if path else {})} for r in rows],
                              indent=2))
        return
    for r in rows:
        what = f"+{r.added} ~{r.modified} -{r.deleted}"
        if r.change and r.item is not None and rels[0] == r.item.path:
            what = f"{r.change}, {human(r.item.size)}" if r.item.kind == "f" else f"{r.change} (symlink)"
        elif r.change == "deleted" and rels[0] != "." and r.added == r.modified == 0:
            what = "deleted" if r.deleted == 1 else what
        msg = f"  {show_text(r.message.splitlines()[0])}" if r.message else ""  # made elsewhere: data
        click.echo(f"{show_text(short(r.id))}  {_when(r.time_ns)}  {show_text(r.host or r.machine)}  {what}{msg}")


@main.command()
@click.argument("args", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
def diff(args, as_json: bool) -> None:
    """What changed: [A] [B] [PATH]. A and B are snapshot ids (or unique prefixes, or dates);
    default A is the newest snapshot and B the tree now."""
    from jam_core.errors import UsageError
    from jam_core.history.index import Index
    from jam_core.history.restore import diff as diff_
    from jam_core.history.restore import open_index, resolve, short
    from jam_core.root import Root

    root = Root.find(".")
    snaps: list[str] = []
    rel = "."
    args = list(args)
    if len(args) > 3:
        raise UsageError("jam diff takes at most A, B and PATH")
    with open_index(root) as ix:
        assert isinstance(ix, Index)
        for n, a in enumerate(args):
            if len(snaps) < 2 and n < len(args) - 1:
                snaps.append(resolve(ix, a))
            elif len(snaps) < 2:
                try:
                    snaps.append(resolve(ix, a))
                except UsageError:
                    rel = root.rel(a)
            else:
                rel = root.rel(a)
    out = diff_(root, snaps[0] if snaps else None, snaps[1] if len(snaps) > 1 else None, rel)
    if rel != "." and not (out.added or out.modified or out.deleted) and not os.path.lexists(root.abs(rel)):
        raise UsageError(f"{args[-1]}: neither a snapshot nor a path of this root (now or in the snapshots compared)")
    if as_json:
        click.echo(json.dumps({"a": out.a, "b": out.b or None,
                               "added": [i.path for i in out.added], "modified": [n.path for _o, n in out.modified],
                               "deleted": [i.path for i in out.deleted]}, indent=2))
    else:
        for rel_, why in out.skipped[:20]:
            click.echo(f"jam: skipped: {show_path(rel_)}: {show_text(why)}", err=True)
        for i in out.added:
            click.echo(f"+ {show_path(i.path)}")
        for _o, n in out.modified:
            click.echo(f"~ {show_path(n.path)}")
        for i in out.deleted:
            click.echo(f"- {show_path(i.path)}")
        click.echo(f"{short(out.a)} -> {short(out.b) if out.b else 'now'}: +{len(out.added)} "
                   f"~{len(out.modified)} -{len(out.deleted)}", err=True)


@main.command()
@click.argument("path", type=click.Path())
@click.option("--at", "at", default=None, help="A snapshot (id, unique prefix) or a date; default the newest.")
@click.option("--as", "as_path", default=None, type=click.Path(), help="Restore to NEWPATH instead.")
@click.option("--fetch", is_flag=True, help="Fetch the content too (default: stubs).")
def restore(path, at, as_path, fetch: bool) -> None:
    """Bring back PATH (a file or a directory) as it was in a snapshot, as stubs (or fetched).
    Never overwrites a file that differs (use --as NEWPATH)."""
    from jam_core.history.restore import restore as restore_
    from jam_core.history.restore import short

    root, rels = _root_rels([path] + ([as_path] if as_path else []))
    pm = plugin_manager() if fetch else None
    with session("fetching") as s:
        out = restore_(root, rels[0], pm, at=at, as_rel=rels[1] if as_path else None, fetch=fetch, session=s)
    code = 0
    if out.fetched is not None:
        report(out.fetched, "fetched", "fetched", quiet=True)
        code = out.fetched.exit_code
    click.echo(f"restored {plural(len(out.restored), 'path')} from {short(out.snapshot)}"
               + (f", {len(out.present)} already as in it" if out.present else "")
               + (" (fetched)" if fetch and code == 0 and out.restored else ""))
    raise SystemExit(code)


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Say what would go; remove nothing.")
@click.option("--keep", default=None, metavar="RULES",
              help='Thin snapshots first, like borg prune: "daily 7, weekly 4, monthly 12" (last, hourly, daily, '
                   "weekly, monthly, yearly); the newest is always kept.")
def gc(dry_run: bool, keep: str | None) -> None:
    """Remove from the remotes what nothing refers to any more (and stale uploads)."""
    from jam_core.history.restore import short
    from jam_core.ops.gc import gc as gc_
    from jam_core.root import Root

    out = gc_(Root.find("."), plugin_manager(), dry_run=dry_run, keep=keep)
    verb = "would remove" if dry_run else "removed"
    for sid, why in out.forgotten:
        click.echo(f"{'would forget' if dry_run else 'forgot'} snapshot {short(sid)}: {show_text(why)}")
    for line in out.problems:
        click.echo(f"jam: {show_text(line)}", err=True)
    for remote, oid, why in out.kept[:20]:
        click.echo(f"jam: kept {show_text(oid[:19])}… on {show_text(repr(remote))}: {show_text(why)}", err=True)
    n, size = len(out.removed), sum(s for *_x, s in out.removed)
    e, esize = len(out.expired), sum(s for *_x, s in out.expired)
    t, tsize = len(out.leftovers), sum(s for *_x, s in out.leftovers)
    snaps = f"{plural(len(out.forgotten), 'snapshot')} forgotten ({len(out.snapshots_kept)} kept), " if keep else ""
    click.echo(f"gc: {snaps}{verb} {plural(n, 'unused object')} ({human(size)}), "
               f"{plural(e, 'expired cache copy', 'expired cache copies')} ({human(esize)}), "
               f"{plural(t, 'stale upload')} ({human(tsize)})")
    raise SystemExit(out.exit_code)


# `jam gc` lives here: it thins snapshots (--keep) before it collects what nothing refers to.
main.add_command(gc, "gc")
