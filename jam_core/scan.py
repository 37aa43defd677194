"""One walk of a tree that every operation shares: a stat per entry, an xattr read only where
the stat says the file may be a stub. Symlinks are never followed; ``.jam`` is skipped."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Iterator

from jam_core.root import JAM_DIR
from jam_core.stub import BadStub, StubRecord, is_dirty, may_be_stub, read_record

TMP_PREFIX = ".jam-"  # temporary files jam writes beside the file they replace
TMP_SUFFIX = ".tmp"

LOCAL, STUB, DIRTY, BAD = "local", "stub", "dirty", "bad"


@dataclass(slots=True)
class Entry:
    rel: str  # relative to the root
    path: str  # absolute
    st: os.stat_result
    state: str  # local, stub, dirty (a stub written into), bad (unreadable stub metadata)
    record: StubRecord | None = None
    problem: str = ""


def classify(path: str, st: os.stat_result) -> tuple[str, StubRecord | None, str]:
    """(state, record, problem) of a regular file from its lstat."""
    if not may_be_stub(st):
        return LOCAL, None, ""
    try:
        rec = read_record(path)
    except BadStub as exc:
        return BAD, None, str(exc)
    except OSError as exc:
        return BAD, None, exc.strerror or str(exc)
    if rec is None:
        return LOCAL, None, ""
    return (DIRTY if is_dirty(st, rec) else STUB), rec, ""


def is_jam_tmp(name: str) -> bool:
    return name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)


def walk(root_path: str, rel: str = ".", on_error=None) -> Iterator[Entry]:
    """Every regular file under ``rel`` (a file or directory relative to the root), sorted."""
    start = root_path if rel == "." else os.path.join(root_path, rel)
    try:
        st = os.lstat(start)
    except OSError as exc:
        if on_error:
            on_error(rel, exc)
        return
    if stat.S_ISREG(st.st_mode):
        state, rec, problem = classify(start, st)
        yield Entry(rel, start, st, state, rec, problem)
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    stack = [(start, "" if rel == "." else rel + "/")]
    while stack:
        dpath, prefix = stack.pop()
        try:
            with os.scandir(dpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if on_error:
                on_error(prefix.rstrip("/") or ".", exc)
            continue
        subdirs = []
        for e in entries:
            if not prefix and e.name == JAM_DIR:
                continue
            try:
                est = e.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished while we looked
            mode = est.st_mode
            if stat.S_ISREG(mode):
                if is_jam_tmp(e.name):
                    continue
                state, rec, problem = classify(e.path, est)
                yield Entry(prefix + e.name, e.path, est, state, rec, problem)
            elif stat.S_ISDIR(mode):
                subdirs.append((e.path, prefix + e.name + "/"))
        stack.extend(reversed(subdirs))
