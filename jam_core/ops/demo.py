"""``jam demo``: a guided run on a sample tree in a temporary folder, with a dir remote beside
it in that folder (never the user's real default remote: the demo leaves nothing there)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from jam_core.objects import hash_file

DAY = 86400


def _write(path: Path, size: int, age_days: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    t = time.time() - age_days * DAY
    os.utime(path, (t, t))


def build_sample(base: Path) -> dict[str, str]:
    """A small tree: a current project, last year's archive, old photos. Returns path -> id."""
    files = {
        "projects/current/notes.md": (3_000, 0),
        "projects/current/model.py": (9_000, 1),
        "projects/current/data.csv": (400_000, 2),
        "archive/2024/report.pdf": (2_500_000, 400),
        "archive/2024/slides.key": (3_000_000, 380),
        "archive/2023/dataset.tar": (6_000_000, 700),
        "photos/2022/beach-001.jpg": (1_500_000, 1100),
        "photos/2022/beach-002.jpg": (1_700_000, 1100),
        "photos/2022/beach-003.jpg": (1_600_000, 1100),
    }
    ids = {}
    for rel, (size, age) in sorted(files.items()):
        _write(base / rel, size, age)
        ids[rel] = hash_file(base / rel)[0]
    return ids


def run_demo(echo) -> int:
    from jam_core.manager import make_plugin_manager
    from jam_core.ops.checkout import checkout
    from jam_core.ops.remotes import add_remote
    from jam_core.ops.stash import stash
    from jam_core.ops.status import status
    from jam_core.root import Root
    from jam_core.units import human

    folder = Path(tempfile.mkdtemp(prefix="jam-demo-"))
    base = folder / "tree"
    base.mkdir()
    store = folder / "remote"  # beside the root, never inside it
    store.mkdir()
    echo(f"1. A sample tree in {base}: a current project, an archive, old photos.")
    ids = build_sample(base)
    pm = make_plugin_manager()
    root, _ = Root.init(base, register=False, default_remote=False)
    remote, _ = add_remote(root, pm, "demo", str(store))
    echo(f"2. `jam init`: {base} is a root; its remote is a directory beside it, {remote.location} "
         "(a real root gets the embedded default remote)")

    def show(label):
        t = status(root).total
        echo(f"   {label}: {t.local} local, {t.stubs} stubs; {human(t.bytes)} of files take "
             f"{human(t.disk_bytes)} on this disk")
        return t

    before = show("status")
    echo("3. `jam stash archive photos`: their content goes to the remote, verified, then each file "
         "becomes a stub (same name, size, mtime; the data is a hole).")
    res = stash(root, ["archive", "photos"], pm)
    after = show("status")
    echo(f"   freed {human(before.disk_bytes - after.disk_bytes)}; `ls -l` still shows every file at its true size.")
    stub = base / "photos/2022/beach-001.jpg"
    with open(stub, "rb") as f:
        f.readline()
        first = f.readline().decode().strip()
    echo(f"   a stub reads as a notice, never silent zeros: {first!r}")
    echo("4. `jam checkout photos`: fetched, verified against its id, swapped in place.")
    back = checkout(root, ["photos"], pm)
    show("status")
    bad = [rel for rel in ids if rel.startswith("photos/") and hash_file(base / rel)[0] != ids[rel]]
    if res.exit_code or back.exit_code or bad:
        echo(f"demo FAILED: {res.failed or back.failed or bad}")
        return 1
    echo(f"   {len(back.done)} photos are back, byte for byte ({human(back.bytes)} checked).")
    echo(f"Done. Explore it: cd {base} && jam status   (delete {folder} when finished)")
    return 0
