"""Status: per directory and in total, what is local, what is stubbed, what it all weighs."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from jam_core.root import Root
from jam_core.scan import BAD, DIRTY, LOCAL, STUB, walk


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

    def to_json(self) -> dict:
        return {
            "root": self.root,
            "path": self.path,
            "total": asdict(self.total) | {"files": self.total.files},
            "directories": [
                {"path": d} | asdict(t) | {"files": t.files} for d, t in sorted(self.directories.items())
            ],
            "problems": [{"path": p, "problem": why} for p, why in self.problems],
        }


def status(root: Root, rel: str = ".") -> Status:
    """One scan of ``rel``: a stat per file, an xattr read only where the stat suggests a stub."""
    result = Status(root=str(root.path), path=rel)
    dirs = result.directories
    total = result.total

    def on_error(r, exc):
        result.problems.append((r, exc.strerror or str(exc)))

    for e in walk(str(root.path), rel, on_error):
        d = os.path.dirname(e.rel) or "."
        t = dirs.get(d)
        if t is None:
            t = dirs[d] = Tally()
        st = e.st
        t.add(e.state, st.st_size, st.st_blocks * 512)
        total.add(e.state, st.st_size, st.st_blocks * 512)
        if e.state in (DIRTY, BAD):
            result.problems.append((e.rel, "stub written into after stashing" if e.state == DIRTY else e.problem))
    return result
