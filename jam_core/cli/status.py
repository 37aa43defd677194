"""``jam status``'s work and output, without click: run by the click command
(jam_core/cli/files.py) and by the plain form's fast start (``jam_core.cli._fast``)."""

from __future__ import annotations

import sys


def show_status(path: str, as_json: bool) -> None:
    """Per directory and in total, what is local and stubbed under ``path``: a table (or JSON)
    on stdout, the first problems found on stderr."""
    from jam_core.cli.common import human, plural, root_and_rels, show_path, show_text
    from jam_core.ops.status import status

    root, (rel,) = root_and_rels([path])
    st = status(root, rel)
    out = sys.stdout.write
    if as_json:
        import json

        out(json.dumps(st.to_json(), indent=2) + "\n")
        return
    rows = [(show_path(d), t) for d, t in sorted(st.directories.items())]
    width = max([len(d) for d, _ in rows] + [9])
    lines = [f"{'directory':<{width}}  {'local':>7} {'stubs':>7} {'size':>10} {'on disk':>10}"]
    for d, t in rows:
        extra = f"  ({plural(t.dirty, 'modified stub')})" if t.dirty else ""
        extra += f"  ({t.pinned} pinned)" if t.pinned else ""
        lines.append(f"{d:<{width}}  {t.local:>7} {t.stubs:>7} {human(t.bytes):>10} {human(t.disk_bytes):>10}{extra}")
    t = st.total
    lines.append(f"{'total':<{width}}  {t.local:>7} {t.stubs:>7} {human(t.bytes):>10} {human(t.disk_bytes):>10}")
    lines.append(f"{human(t.stub_bytes)} on remotes, {human(t.disk_bytes)} on this disk, "
                 f"root {show_path(str(root.path))}")
    if st.pins:
        lines.append(f"{plural(t.pinned, 'file')} pinned by: {', '.join(show_path(p) for p in st.pins)}")
    for line in lines:  # (line by line: one write of it all could be cut short by a reader that left, unsaid)
        out(line + "\n")
    if st.problems:
        sys.stdout.flush()  # (the table first, as a terminal would show it)
        for rel, why in st.problems[:20]:
            sys.stderr.write(f"jam: {show_path(rel)}: {show_text(why)}\n")
        sys.stderr.flush()
