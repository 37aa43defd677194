"""Status: per directory and in total, what is local, what is stubbed, what it all weighs."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from jam_core.policy.pins import covered
from jam_core.root import Root
from jam_core.scan import BAD, DIRTY, LOCAL, QUICK, STUB, classify, scan_dirs
from jam_core.stub import LOST_XATTRS


@dataclass
class Tally:
    local: int = 0
    stubs: int = 0
    dirty: int = 0
    bad: int = 0
    bytes: int = 0  # true size of the files
    disk_bytes: int = 0  # what they take on this disk
    local_bytes: int = 0
    stub_bytes: int = 0  # true size of the stubbed files (what lives on remotes)
    pinned: int = 0  # files covered by a pin (policies never stash them)

    def add(self, state: str, size: int, disk: int) -> None:
        self.bytes += size
        self.disk_bytes += disk
        if state == LOCAL:
            self.local += 1
            self.local_bytes += size
        elif state == STUB:
            self.stubs += 1
            self.stub_bytes += size
        elif state == DIRTY:
            self.dirty += 1
        elif state == BAD:
            self.bad += 1

    @property
    def files(self) -> int:
        return self.local + self.stubs + self.dirty + self.bad


@dataclass
class Status:
    root: str
    path: str
    directories: dict[str, Tally] = field(default_factory=dict)
    total: Tally = field(default_factory=Tally)
    problems: list[tuple[str, str]] = field(default_factory=list)
    pins: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "root": self.root,
            "path": self.path,
            "total": asdict(self.total) | {"files": self.total.files},
            "directories": [
                {"path": d} | asdict(t) | {"files": t.files} for d, t in sorted(self.directories.items())
            ],
            "problems": [{"path": p, "problem": why} for p, why in self.problems],
            "pins": self.pins,
        }


def status(root: Root, rel: str = ".") -> Status:
    """One scan of ``rel``: a stat per file, an xattr read only where the stat suggests a stub."""
    result = Status(root=str(root.path), path=rel)

    def on_error(r, exc):
        result.problems.append((r, exc.strerror or str(exc)))

    pins, known = _from_catalog(root, rel)
    result.pins = sorted(pins)
    fsencode = os.fsencode
    for d, files in scan_dirs(str(root.path), rel, on_error, ordered=False):
        t = result.directories.setdefault(d, Tally())
        dprefix = b"" if d == "." else fsencode(d) + b"/"
        if pins:
            t.pinned += len(files) if covered(d, pins) else sum(
                covered(n if d == "." else f"{d}/{n}", pins) for n, _, _ in files)
        for name, path, st in files:
            size, disk = st.st_size, st.st_blocks * 512
            if st.st_mode & 0o222 and disk >= size:  # writable and not sparse: a local file
                t.local += 1
                t.local_bytes += size
                t.bytes += size
                t.disk_bytes += disk
                continue
            state, _, problem = classify(path, st, QUICK, stamp=known.get(dprefix + fsencode(name)), verify=True)
            t.add(state, size, disk)
            if state in (DIRTY, BAD) or problem:
                rel_path = name if d == "." else f"{d}/{name}"
                if state == DIRTY:
                    problem = "stub written into after stashing" + (f" ({problem})" if problem else "")
                elif problem == LOST_XATTRS:
                    problem = f"a stub that {problem}: `jam doctor --fix` restores them"
                result.problems.append((rel_path, problem))
    total = result.total
    for t in result.directories.values():
        for k, v in t.__dict__.items():
            setattr(total, k, getattr(total, k) + v)
    return result


def _from_catalog(root: Root, rel: str) -> tuple[set[str], dict[bytes, tuple]]:
    """The pins, and the stubs the catalog knows under ``rel`` with their size, mtime, inode
    and ctime."""
    from jam_core.catalog import Catalog
    from jam_core.policy.pins import read_pins
    from jam_core.root import CATALOG

    pins = read_pins(root)  # ROOT/.jam/pins: pins survive a rebuilt catalog
    db = root.jam_dir / CATALOG
    if not db.exists():
        return pins, {}
    with Catalog(db) as cat:
        return pins, cat.stub_stamps(rel)
