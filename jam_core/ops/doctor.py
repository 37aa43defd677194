"""Doctor: a health check a person reads top to bottom, that proves every stub can come back.

Four sections, each a list of findings marked ``ok`` / ``info`` / ``warning`` / ``problem``:

* **setup**: jam's version and plugins (broken ones named); the config as commands read it
  (a value they would refuse, a key jam does not know in a table it owns); the root's filesystem (user
  xattrs, sparse files: probed in ``ROOT/.jam/tmp``); each remote reachable and writable,
  its identity marker the one recorded (read-only unless ``fix``), its free space; the
  shell hook in the user's rc files; the cd-hook index in step with the catalog; what
  on-access hydration will need.
* **stubs**: every stub's metadata valid, header and xattr agreeing, still a stub (a dirty one
  is reported with the command that keeps both versions); copies that lost their xattrs; the
  catalog in step with the tree; every object present with its size on a remote (one
  ``list_objects`` listing per remote, ``has`` per object for a backend without it); fewer
  copies than ``[place] copies`` asks for.
* **leftovers**: jam's temporary files in the tree (only provably jam's are removed; a
  ``.jam-*.tmp`` jam cannot prove is its own is a warning) and stale uploads on remotes;
  objects nothing in this root refers to (a warning: never deleted, another root may share
  the remote).
* **scrub** (``deep``): every copy read back and hashed, each verification recorded in the
  catalog; ``older_than`` re-reads only the copies not verified for that long, so a weekly
  cron job reads everything once a month and an interrupted run resumes.

``fix`` repairs only what is safe, and says what it did: ``user.jam`` from an intact header,
a header from an intact xattr, the catalog rebuilt (moved aside first when damaged), jam's
own temporary files removed, a missing object stored again from a local file with the same
content, the cd-hook index refreshed. It never discards data and never touches a dirty
stub's bytes.

``doctor(...)`` returns a :class:`DoctorResult`; its ``to_json()`` is the documented, stable
schema of ``jam doctor --json`` (README.md, "Checking a root: jam doctor").
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

from jam_core.catalog import Catalog, CatalogDamaged
from jam_core.errors import JamError, RemoteError, UsageError
from jam_core.fs import TMP_PREFIX
from jam_core.history import chunks
from jam_core.model import Remote, Session
from jam_core.root import CATALOG, JAM_DIR, Root, valid_rel
from jam_core.scan import ALWAYS, BAD, DIRTY, LOCAL, PART, STUB, Entry, classify, scan_stats
from jam_core.stub import (
    HEADER_MAX,
    LOST_XATTRS,
    XATTR,
    BadStub,
    StubRecord,
    open_checked,
    read_record,
    record_from_block,
    rewrite_header,  # noqa: F401  (the in-place write doctor no longer makes; tests watch it)
    verify_clean,
)

SCHEMA = 1  # the version of to_json()'s layout; bumped only for a change that breaks readers
SECTIONS = ("setup", "stubs", "leftovers", "scrub")
TITLES = {"setup": "Set-up", "stubs": "Stubs", "leftovers": "Leftovers", "scrub": "Scrub"}
OK, INFO, WARNING, PROBLEM = "ok", "info", "warning", "problem"
LOW_SPACE_GB = 1.0  # a remote with less free space than this is a warning
HYDRATION_KERNEL = (6, 14)


@dataclass
class Problem:
    """One line of the checklist (the name is historical: most findings are fine).

    ``kind`` is a stable machine name (README lists them); ``path`` a path relative to the
    root, a remote's name, or "" for the set-up as a whole."""

    kind: str
    path: str
    detail: str
    fixed: bool = False
    section: str = "stubs"
    status: str = PROBLEM


Finding = Problem


@dataclass
class DoctorResult:
    stubs: int = 0
    remotes: list[str] = field(default_factory=list)
    findings: list[Problem] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    deep: bool = False
    fix: bool = False
    verified: int = 0  # copies read back and hashed by this run
    verified_bytes: int = 0
    recent: int = 0  # copies skipped: verified within older_than

    @property
    def problems(self) -> list[Problem]:
        return [f for f in self.findings if f.status == PROBLEM]

    @property
    def unfixed(self) -> list[Problem]:
        return [p for p in self.problems if not p.fixed]

    @property
    def warnings(self) -> list[Problem]:
        return [f for f in self.findings if f.status == WARNING]

    @property
    def exit_code(self) -> int:
        return 1 if self.unfixed else 0

    def add(self, section: str, status: str, kind: str, path: str, detail: str, fixed: bool = False) -> Problem:
        f = Problem(kind, path, detail, fixed, section, status)
        self.findings.append(f)
        return f

    def ordered(self) -> list[Problem]:
        """The findings grouped by section, in the order found within each."""
        return sorted(self.findings, key=lambda f: SECTIONS.index(f.section))

    def summary(self) -> dict:
        counts = {s: sum(1 for f in self.findings if f.status == s) for s in (OK, INFO, WARNING, PROBLEM)}
        return counts | {"fixed": sum(1 for f in self.findings if f.fixed), "unfixed": len(self.unfixed),
                         "verified": self.verified, "verified_bytes": self.verified_bytes,
                         "recently_verified": self.recent}

    def to_json(self) -> dict:
        from jam_core import __version__

        return {"schema": SCHEMA, "version": __version__, "ok": not self.unfixed, "exit": self.exit_code,
                "paths": self.paths, "deep": self.deep, "fix": self.fix,
                "stubs": self.stubs, "remotes": self.remotes,
                "checks": [asdict(f) for f in self.ordered()],
                "problems": [asdict(p) for p in self.ordered() if p.status == PROBLEM],
                "warnings": [asdict(w) for w in self.ordered() if w.status == WARNING],
                "summary": self.summary()}


def keep_both_hint(rel: str) -> str:
    """The command to type, with ``rel`` quoted for the shell; a name holding anything not
    printable (ESC, CR, a bidi override, an undecodable byte) in bash's ``$'...'`` quoting,
    each such byte as ``\\xHH``: the hint is printed, and a terminal must never act on it."""
    return f"keep both versions with `jam checkout --keep-both {_shell_word(rel)}`"


def _shell_word(rel: str) -> str:
    if rel.isprintable():
        return shlex.quote(rel)
    raw = rel.encode("utf-8", "surrogateescape")
    return "$'" + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b"'\\" else f"\\x{b:02x}" for b in raw) + "'"


def _outermost(rels: Sequence[str]) -> list[str]:
    """The named paths without those inside another named path (each stub checked once)."""
    rels = sorted(set(rels))
    if "." in rels:
        return ["."]
    out: list[str] = []
    for r in rels:
        if not any(r.startswith(o + "/") for o in out):
            out.append(r)
    return out


def _under(path: str, rels: Sequence[str]) -> bool:
    return any(r == "." or path == r or path.startswith(r + "/") for r in rels)


def doctor(root: Root, rel: str | Sequence[str], pm, session: Session, deep: bool = False, fix: bool = False,
           older_than: float | None = None, now: float | None = None) -> DoctorResult:
    """Check ``rel`` (a path relative to the root, or several) and the set-up; see the module.

    ``older_than`` (seconds, with ``deep``): re-read only copies not verified for that long."""
    from jam_core.fs import ThroughSymlink, open_dir

    rels = _outermost([rel] if isinstance(rel, str) else list(rel))
    if not rels:
        raise UsageError("name a file or directory to check (`.` is the current directory)")
    if older_than is not None and not deep:
        raise UsageError("--older-than chooses what --deep reads again: use it with --deep")
    if older_than is not None and older_than < 0:
        raise UsageError("--older-than must not be negative")
    not_files: list[tuple[str, str]] = []
    for r in rels:
        try:
            root_fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                dir_fd = open_dir(root_fd, r.rpartition("/")[0])
            finally:
                os.close(root_fd)
            try:
                if r != ".":  # what the name itself is: the walk looks only at files and directories
                    kind = _not_a_file(os.stat(r.rpartition("/")[2], dir_fd=dir_fd, follow_symlinks=False))
                    if kind:
                        not_files.append((r, kind))
            finally:
                os.close(dir_fd)
        except ThroughSymlink as exc:
            raise UsageError(f"{r} is reached through the symlink {exc.filename}: "
                             "jam does not follow symlinks") from None
        except OSError:
            pass  # a missing path is reported by the walk
    res = DoctorResult(paths=rels, deep=deep, fix=fix)
    for r, kind in not_files:  # nothing to prove about it, and it must not read as all well
        res.add("stubs", PROBLEM, "not-a-stub", r, f"{kind}, not a file or a stub: doctor follows no symlink and "
                "reads no pipe or device, so it proves nothing about it (name the file itself)")
    _versions(res, pm)
    found = _config(res, root)
    remotes = sorted(found or [], key=lambda r: (r.tier, r.name))
    res.remotes = [r.name for r in remotes]
    _filesystem(res, root)
    import gc

    collecting = gc.isenabled()
    gc.disable()  # 100,000 stubs make millions of small tuples and no cycle: collections only cost
    try:
        if found is not None:  # without its remotes no stub can be proven: the config line says why
            _checks(res, root, pm, session, remotes, rels, deep, fix, older_than, now)
    except UsageError as exc:  # a value the checks read that the config check did not foresee
        res.add("setup", PROBLEM, "config", "", f"{exc} (the checks of the stubs stopped there)")
    finally:
        if collecting:
            gc.enable()
    _shell_hook(res)
    _hydration(res, root)
    return res


def _not_a_file(st: os.stat_result) -> str:
    """What a named path is when it is neither a regular file nor a directory ("" if it is one)."""
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return ""
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISFIFO(st.st_mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(st.st_mode):
        return "a socket"
    return "a device"


def _checks(res: DoctorResult, root: Root, pm, session: Session, remotes: list[Remote], rels: list[str],
            deep: bool, fix: bool, older_than: float | None, now: float | None) -> None:
    """The checks that need the root's lock: remotes, catalog, tree, objects."""
    with root.lock():
        reachable = _check_remotes(res, root, pm, session, remotes, fix)
        cat = _open_catalog(root, fix, res)
        rebuilt = any(f.kind == "catalog" for f in res.findings)  # new and empty: the scan fills it
        catrows = _catalog_rows(cat) if cat is not None else {}
        stale_index = None if rebuilt else _hook_index(res, root, cat, catrows)
        try:
            d = _Doctor(root, pm, session, remotes, reachable, res, deep, fix, cat, rels,
                        older_than, time.time() if now is None else now, catrows)
            d.rebuilt = rebuilt
            d.run()
        finally:
            if cat is not None:
                cat.close()
        if fix:
            _refresh_index(root, stale_index)


# -- set-up ----------------------------------------------------------------------------------------

def _versions(res: DoctorResult, pm) -> None:
    from jam_core import __version__
    from jam_core.manager import broken_plugins

    names = sorted(name for name, plugin in pm.list_name_plugin() if plugin is not None)
    res.add("setup", OK, "version", "", f"jam {__version__}, {len(names)} plugins: {', '.join(names)}")
    for b in broken_plugins(pm):
        res.add("setup", WARNING, "plugin", b["name"], f"plugin {b['name']} was skipped: {b['reason']} (fix or "
                f"uninstall it; block it with JAM_BLOCK_PLUGINS={b['name']})")


# The keys jam itself reads, per table it owns ([remote.*] options and [policy.*] belong to the
# backends and policies, other tables to plugins: those are not judged here).
KNOWN_KEYS = {
    "core": ("min_size", "id", "home"),
    "place": ("copies",),
    "hook": ("depth", "max_fetch", "background"),
    "history": ("auto", "name", "chunk_above"),
}


def _config(res: DoctorResult, root: Root) -> list[Remote] | None:
    """The config as the commands read it: each value a command would refuse is a problem
    (the command would stop with that line), each key jam does not know in a table it owns a
    problem (a misspelt key is silently ignored by every command). Returns the remotes, None
    when their tables are broken."""
    from jam_core import placement
    from jam_core.history import auto, snapshot
    from jam_core.hook.settings import settings

    before = len(res.problems)
    remotes = None
    try:
        config = root.config
    except UsageError as exc:
        res.add("setup", PROBLEM, "config", "", str(exc))
        return None
    checks = (("remotes", root.remotes), ("core.min_size", lambda: root.min_size),
              ("place.copies", lambda: placement.copies_of(config)), ("hook", lambda: settings(root)),
              ("history.chunk_above", lambda: chunks.threshold(config)), ("history.auto", lambda: auto.interval(root)),
              ("history.name", lambda: snapshot.tree_name(root)))
    for what, read in checks:
        try:
            value = read()
        except (UsageError, AttributeError, TypeError, ValueError) as exc:  # (a table that is not a table)
            text = str(exc) if isinstance(exc, UsageError) else f"cannot be read ({exc}): commands that read it fail"
            res.add("setup", PROBLEM, "config", "", text if what.rpartition(".")[2] in text else f"{what}: {text}")
            continue
        if what == "remotes":
            remotes = value
    for table, known in KNOWN_KEYS.items():
        values = config.get(table, {})
        if not isinstance(values, dict):
            res.add("setup", PROBLEM, "config", "", f"{table} = {str(values)[:40]!r}: expected a table ([{table}])")
            continue
        for key in sorted(set(values) - set(known)):
            from difflib import get_close_matches  # only for a key jam does not know

            like = get_close_matches(key, known, n=1)
            hint = f" (a typo of {like[0]}?)" if like else f" (jam reads {', '.join(known)} there)"
            res.add("setup", PROBLEM, "config", "", f"unknown key [{table}] {key}{hint}: every command ignores "
                    f"it; fix it in {root.config_path} (or the user config)")
    if len(res.problems) == before:
        res.add("setup", OK, "config", "", "the config: every value valid, no unknown key in jam's tables")
    return remotes


def _setxattr(fd: int, name: str, value: bytes) -> None:  # one place for the probe (tests inject here)
    os.setxattr(fd, name, value)


def _filesystem(res: DoctorResult, root: Root) -> None:
    """Probe user xattrs and holes in ROOT/.jam/tmp with a nameless file (nothing left behind)."""
    where = root.jam_dir / "tmp"
    if not where.is_dir() or where.is_symlink():
        where = root.jam_dir
    try:
        fd = os.open(where, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            res.add("setup", PROBLEM, "filesystem", "", f"cannot write in {where}: {exc.strerror}; check the "
                    "disk and the permissions of .jam")
            return
        fd = None
    name = None
    if fd is None:  # no O_TMPFILE on this filesystem: a named probe, removed at once
        name = where / f".jam-probe-{os.getpid()}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            _setxattr(fd, "user.jam.probe", b"1")
        except OSError as exc:
            res.add("setup", PROBLEM, "filesystem", "", f"the filesystem of {root.path} does not keep user "
                    f"extended attributes ({exc.strerror}); stubs cannot work here (ext4, xfs, btrfs do)")
            return
        os.ftruncate(fd, 1 << 20)
        if os.fstat(fd).st_blocks * 512 >= 1 << 20:
            res.add("setup", PROBLEM, "filesystem", "", f"the filesystem of {root.path} does not keep sparse "
                    "files; stubs would take their full size on disk")
            return
        res.add("setup", OK, "filesystem", "", f"the filesystem of {root.path} keeps user xattrs and sparse files")
    finally:
        os.close(fd)
        if name is not None:
            name.unlink(missing_ok=True)


_FREE = re.compile(r"([0-9]+(?:\.[0-9]+)?) GB free")


def _check_remotes(res: DoctorResult, root: Root, pm, session: Session, remotes: list[Remote],
                   fix: bool) -> dict[str, str]:
    """Each remote reachable, writable, its marker the recorded one. Returns the remotes that
    must not be used by this run ({name: why})."""
    from jam_core.ops.remotes import _ID, ensure_identity

    bad: dict[str, str] = {}
    seen: dict[str, str] = {}  # identity -> the first remote holding it
    if not remotes:
        res.add("setup", PROBLEM, "remote", "", "no remote is configured: nothing can be stashed "
                "(`jam remote add NAME URL`)")
    for r in remotes:
        try:
            desc = pm.hook.check_remote(remote=r, session=session, create=False)
        except RemoteError as exc:
            text = str(exc)
            kind = "host-key" if "host key" in text.lower() else "unreachable"
            bad[r.name] = text
            res.add("setup", PROBLEM, kind, r.name, text)
            continue
        if desc is None:
            bad[r.name] = f"no installed plugin handles {r.kind} remotes"
            res.add("setup", PROBLEM, "unreachable", r.name, bad[r.name] + " (see `jam plugins`)")
            continue
        recorded = r.options.get("id")
        try:
            got = pm.hook.remote_id(remote=r, session=session, create=False)
        except RemoteError as exc:
            bad[r.name] = str(exc)
            res.add("setup", PROBLEM, "identity", r.name, str(exc))
            continue
        where = f"remote {r.name!r} ({r.location})"
        if got is None:
            ident = "its backend has no identity markers"
        elif recorded is not None and not (isinstance(recorded, str) and _ID.match(recorded)):
            bad[r.name] = "malformed id"
            res.add("setup", PROBLEM, "identity", r.name, f"{root.config_path}: remote {r.name!r}: id "
                    f"{str(recorded)[:40]!r} is malformed (32 hex digits expected)")
            continue
        elif recorded and got == "":
            bad[r.name] = "marker missing"
            res.add("setup", PROBLEM, "identity", r.name, f"{where}: its identity marker is missing; the drive "
                    "looks unplugged or this is another directory (plug it in, or fix the remote's location)")
            continue
        elif recorded and got != recorded:
            bad[r.name] = "another marker"
            res.add("setup", PROBLEM, "identity", r.name, f"{where} holds another remote's marker (id {got[:32]}, "
                    f"not {recorded}); the drive looks swapped or this is another directory")
            continue
        elif not recorded:
            f = res.add("setup", PROBLEM, "identity", r.name, f"{where} has no identity recorded (added by an "
                        "older jam): `jam doctor --fix` gives it one")
            if fix:
                try:
                    ensure_identity(root, r, pm, session)
                    f.fixed = True
                    f.detail = f"{where}: identity marker written and recorded in {root.config_path.name}"
                except RemoteError as exc:
                    f.detail = str(exc)
            ident = "identity recorded now" if f.fixed else "no identity"
        else:
            ident = "identity marker matches"
            twin = seen.setdefault(got, r.name)
            if twin != r.name:
                bad[r.name] = f"the same place as remote {twin!r}"
                res.add("setup", PROBLEM, "identity", r.name, f"{where} is the same place as remote {twin!r} (the "
                        f"same identity marker, id {got}): its copies are not second copies; remove one of them "
                        f"(`jam remote remove {r.name}`)")
                continue
        m = _FREE.search(desc)
        low = m is not None and float(m.group(1)) < LOW_SPACE_GB
        res.add("setup", WARNING if low else OK, "remote", r.name,
                f"{desc}; {ident}" + ("; little space left: stashes will fail soon" if low else ""))
    return bad


def _rc_files() -> list[Path]:
    home = Path(os.path.expanduser("~"))
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return [home / ".bashrc", home / ".zshrc", config / "fish" / "config.fish"]


def _shell_hook(res: DoctorResult) -> None:
    from jam_core.root import read_capped

    found = []
    for rc in _rc_files():
        try:  # never blocking (an rc file that is a FIFO would hang doctor), a regular file only
            fd = os.open(rc, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if b"jam hook" in read_capped(fd, st, rc, 1 << 24, "an rc file"):
                found.append(rc)
        except (OSError, UsageError):
            continue  # not a regular file, too large, unreadable: it does not install the hook
        finally:
            os.close(fd)
    if found:
        res.add("setup", OK, "shell-hook", "", "the cd hook is installed in " + ", ".join(map(str, found)))
        return
    shell = os.path.basename(os.environ.get("SHELL", "") or "bash")
    shell = shell if shell in ("bash", "zsh", "fish") else "bash"
    line = {"bash": "eval \"$(jam hook bash)\" to ~/.bashrc", "zsh": "eval \"$(jam hook zsh)\" to ~/.zshrc",
            "fish": "jam hook fish | source to ~/.config/fish/config.fish"}[shell]
    res.add("setup", WARNING, "shell-hook", "", "the cd hook is not installed (no rc file mentions `jam hook`): "
            f"add {line} so that cd brings stubs back")


def _index_marks(base: str) -> set[str] | None:
    """The directories the cd-hook index marks (relative, "" = the root); None if unreadable.
    Walked by descriptor (``fs.walk_dirs``): the index mirrors the root's directories, which
    may nest deeper than PATH_MAX or Python's stack."""
    if not os.path.isdir(base) or os.path.islink(base):
        return set() if not os.path.lexists(base) else None
    from jam_core.fs import DIR_FLAGS, walk_dirs
    from jam_core.hook.index import MARK

    try:
        top = os.open(base, DIR_FLAGS)
    except OSError:
        return None
    try:
        return {rel for rel, fd in walk_dirs(top) if os.fstat(fd).st_mode & MARK}
    except OSError:
        return None
    finally:
        os.close(top)


def _index_wanted(root: Root, cat: Catalog, catrows: dict[str, tuple] | None = None) -> set[str]:
    """What the cd-hook index should mark, from the catalog's stub paths (``catrows``, the
    rows already read, or a query). ``wanted`` depends only on each valid path's directory:
    it is given one valid path per directory (100,000 stubs in 100 directories cost 100
    checks, not 100,000)."""
    from jam_core.hook.index import wanted
    from jam_core.hook.settings import DEFAULT_DEPTH, settings

    try:
        depth = settings(root).depth
    except UsageError:
        depth = DEFAULT_DEPTH
    paths = cat.stubs() if catrows is None else catrows
    one: dict[str, str] = {}
    for p in paths:
        d = p.rpartition("/")[0]
        if d not in one and valid_rel(p):
            one[d] = p
    return wanted(one.values(), depth)


def _hook_index(res: DoctorResult, root: Root, cat: Catalog | None,
                catrows: dict[str, tuple] | None = None) -> Problem | None:
    """Is the cd hook's index in step with the catalog (as this run found it)?"""
    from jam_core.hook.index import index_path

    if cat is None:
        return None  # the catalog's problem is said once, below
    want = _index_wanted(root, cat, catrows)
    have = _index_marks(index_path(root))
    if have == want:
        res.add("setup", OK, "hook-index", "", "the cd hook's index (.jam/stubdirs) is in step with the catalog")
        return None
    n = len(want ^ have) if have is not None else 0
    return res.add("setup", PROBLEM, "hook-index", f"{JAM_DIR}/stubdirs",
                   f"the cd hook's index is out of step with the catalog ({n} directories differ): a cd may "
                   "not fetch; `jam doctor --fix` refreshes it")


def _refresh_index(root: Root, found: Problem | None) -> None:
    """After --fix changed the catalog (or found the index stale): the index follows it."""
    from jam_core.hook.index import index_path, refresh

    try:
        with Catalog(root.jam_dir / CATALOG) as cat:
            refresh(root, cat)
            ok = _index_marks(index_path(root)) == _index_wanted(root, cat)
    except JamError:
        return
    if found is not None:
        found.fixed = ok


def _hydration(res: DoctorResult, root: Root) -> None:
    from jam_core.daemon.client import status as daemon_status

    active, line = daemon_status(root.path)
    if active:
        res.add("setup", OK, "hydration", "", f"on-access hydration is active: {line}")
        return
    release = os.uname().release
    m = re.match(r"(\d+)\.(\d+)", release)
    kernel = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    privileged = False
    try:
        with open("/proc/self/status") as f:
            for row in f:
                if row.startswith("CapEff:"):
                    privileged = bool(int(row.split()[1], 16) & (1 << 21))  # CAP_SYS_ADMIN
    except (OSError, ValueError):
        pass
    need = f"Linux >= {HYDRATION_KERNEL[0]}.{HYDRATION_KERNEL[1]} and CAP_SYS_ADMIN"
    has = f"this kernel is {release} ({'new enough' if kernel >= HYDRATION_KERNEL else 'too old'}), " \
          f"CAP_SYS_ADMIN {'held' if privileged else 'not held'}"
    res.add("setup", INFO, "hydration", "", f"on-access hydration is off: {line} (`jam daemon` needs {need}; {has})")


# -- the catalog -------------------------------------------------------------------------------

def _open_catalog(root: Root, fix: bool, res: DoctorResult) -> Catalog | None:
    """The root's catalog; a damaged one is a problem, and with ``fix`` it is moved aside and
    a new one started (the scan refills it: the catalog only caches what the tree says)."""
    db = root.jam_dir / CATALOG
    shown = f"{root.jam_dir.name}/{CATALOG}"
    try:
        return Catalog(db)
    except CatalogDamaged as exc:
        if not fix:
            res.add("stubs", PROBLEM, "catalog", shown, str(exc))
            return None
    if not os.path.lexists(db):
        res.add("stubs", PROBLEM, "catalog", shown, "missing: rebuilt from the tree", fixed=True)
        return Catalog(db, rebuild=True)
    aside = _move_aside(db)
    res.add("stubs", PROBLEM, "catalog", shown, f"damaged: moved aside to {aside.name} and rebuilt from the tree",
            fixed=True)
    return Catalog(db, rebuild=True)


def _move_aside(db: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = db.with_name(f"{db.name}.damaged-{stamp}")
    n = 1
    while aside.exists():
        aside = db.with_name(f"{db.name}.damaged-{stamp}-{n}")
        n += 1
    os.rename(db, aside)
    for suffix in ("-wal", "-shm", "-journal"):  # SQLite's side files belong to the damaged file
        side = db.with_name(db.name + suffix)
        if os.path.lexists(side):
            os.rename(side, aside.with_name(aside.name + suffix))
    return aside


# -- the walk: stubs and the tree's leftovers ----------------------------------------------------

class _Doctor:
    def __init__(self, root, pm, session, remotes, unusable, res, deep, fix, cat, rels, older_than, now,
                 catrows: dict[str, tuple] | None = None):
        self.root, self.pm, self.session = root, pm, session
        self.remotes, self.unusable, self.res = remotes, unusable, res
        self.deep, self.fix, self.cat, self.rels = deep, fix, cat, rels
        self.older_than, self.now = older_than, now
        self.rows: list[tuple] = []
        self.locations: list[tuple[str, str, int]] = []
        # the catalog's rows, {path: (oid, size, mtime_ns, stashed_at, ino, ctime_ns)}: all of
        # them (what the tree is compared with, what unused objects are told by), and those under
        # the paths checked (``catrows`` is read once by doctor(): no second query)
        if catrows is None:
            catrows = _catalog_rows(cat) if cat is not None else {}
        self.all_rows = catrows
        self.stamps = catrows if rels == ["."] else {p: v for p, v in catrows.items() if _under(p, rels)}
        self.objects: dict[str, list[tuple[str, StubRecord]]] = {}  # oid -> stubs needing it
        self.reported: set[str] = set()  # paths with a finding already (no second one for the catalog)
        self.local_sizes: dict[int, list[str]] = {}  # local files by size (candidates to re-upload from)
        self.leftovers = 0
        self.foreign_tmps = 0
        self.rebuilt = False
        self.odd: list = []  # catalog rows whose path is no name (reported; --fix forgets them)
        # directories doctor could not look into: {dir: [why, stubs the catalog lists there]}
        self.unseen: dict[str, list] = {}
        self.probed: dict[str, tuple[str, str] | None] = {}  # dir of a catalog row -> why unseen
        self.adopted: set[str] = set()  # objects of stubs --fix adds that the catalog did not know
        self.unknown: dict[str, Problem] = {}  # those stubs (catalog-unknown): path -> finding

    def problem(self, kind: str, rel: str, detail: str, fixed: bool = False) -> Problem:
        self.reported.add(rel)
        return self.res.add("stubs", PROBLEM, kind, rel, detail, fixed)

    def run(self) -> None:
        self.walk()
        self.check_catalog()
        self.report_unseen()
        listings = self.list_remotes()
        self.check_objects(listings)
        self.unused(listings)
        if self.fix and self.cat is not None:
            self.save_catalog()
        res = self.res
        if self.leftovers == 0 and self.foreign_tmps == 0:
            res.add("leftovers", OK, "leftover", "", "no temporary files of interrupted jams in the tree")
        if self.deep:
            res.add("scrub", OK if not res.unfixed else INFO, "scrub", "",
                    f"read back and hashed {res.verified} copies ({_human(res.verified_bytes)})"
                    + (f"; {res.recent} verified less than {_age(self.older_than)} ago were skipped"
                       if self.older_than is not None else ""))
        else:
            res.add("scrub", INFO, "scrub", "", "objects were checked by name and size; `jam doctor --deep` reads "
                    "every byte back (`--deep --older-than 30d` from a weekly cron job reads everything monthly)")

    # -- leftovers in the tree -------------------------------------------------------------------
    def look(self, fd: int, dir_rel: str, entries: list) -> list:
        """Each directory's listing, before the walk stats its entries: a directory whose names
        can be listed but not looked at (read but no search permission: every lstat fails with
        EACCES, which the walk takes for files that vanished) is `unseen`; jam's temporary files
        are tidied where a name looks like one."""
        if entries:
            try:  # cached in the entry: the walk's own lstat of it costs nothing more
                entries[0].stat(follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    self.unseen.setdefault(dir_rel, [f"its names can be listed but not looked at ({exc.strerror})",
                                                     0])
            if TMP_PREFIX in "/".join([e.name for e in entries]):
                return self.tidy(fd, dir_rel, entries)
        return entries

    def tidy(self, fd: int, dir_rel: str, entries: list) -> list:
        from jam_core.scan import jam_temporaries

        removed = set()
        prefix = "" if dir_rel == "." else dir_rel + "/"
        for e, st, disposable in list(jam_temporaries(fd, entries)):
            rel = prefix + e.name
            if not disposable:
                self.foreign_tmps += 1
                self.res.add("leftovers", WARNING, "foreign-tmp", rel, "named like jam's temporary files, but "
                             "jam cannot prove it is its own: left alone (remove it yourself if it is not yours)")
                continue
            self.leftovers += 1
            f = self.res.add("leftovers", PROBLEM, "leftover", rel, f"a temporary file an interrupted jam left "
                             f"({_human(st.st_size)}); `jam doctor --fix` removes it")
            if self.fix:
                try:
                    now = os.stat(e.name, dir_fd=fd, follow_symlinks=False)
                    if (now.st_ino, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size):
                        os.unlink(e.name, dir_fd=fd)
                        f.fixed = True
                        f.detail = "a temporary file an interrupted jam left: removed"
                        removed.add(e.name)
                except OSError:
                    pass
        return [e for e in entries if e.name not in removed] if removed else entries

    # -- each file ----------------------------------------------------------------------------------
    def walk(self) -> None:
        """One scan of the tree (an lstat per entry). A stub whose lstat matches the stamp the
        catalog recorded when jam made it (size, mtime, inode, ctime: any write, chmod, xattr
        change or rename changes the ctime) is trusted without reading anything: its id and
        size come from the catalog row, validated. Any other file is classified by its xattr
        and, for a stub, its bytes (``check``). ``--deep`` trusts no stamp: it reads every
        stub's header too (a block gone bad under an untouched inode).

        A writable file that is not sparse (what a stat says of an ordinary file) has its xattr
        read only if its inode is one the catalog recorded for a stub: a stub overwritten in
        full in place (or renamed, or hard-linked) keeps its inode, so it is still found and
        reported dirty. Every file's xattr is read when the catalog cannot say that (a row with
        no inode, a catalog rebuilt or missing) and with ``--deep``."""
        from jam_core.objects import is_valid_oid

        top = str(self.root.path).rstrip("/") + "/"
        catrows = {} if self.deep else self.stamps
        get, new = catrows.get, tuple.__new__
        inodes = self.stub_inodes()
        sizes, named = self.local_sizes, set(self.rels)
        trusted = 0
        for r in self.rels:
            for dname, base, names, stats in scan_stats(top, r, on_error=self.walk_error, tidy=self.look,
                                                        tidy_tmps=False, chunk=PART):
                prefix = "" if dname == "." else dname + "/"
                for name, st in zip(names, stats, strict=True):
                    rel = prefix + name
                    row = get(rel)
                    if row is not None and is_valid_oid(row[0]) and isinstance(row[3], str) and len(row[3]) <= 64:
                        state, rec, problem = classify(base + name, st, ALWAYS, stamp=(row[1], row[2], row[4], row[5]))
                        if state == STUB and rec is None:  # the stamp vouches: counted, kept, object needed
                            trusted += 1
                            # marked in place (its row stays as it is, its object is needed: see
                            # trusted_rows): nothing kept per stub but the row already held
                            catrows[rel] = new(_Trusted, row)
                            continue
                    elif (inodes is not None and st.st_mode & 0o222 and st.st_blocks * 512 >= st.st_size
                          and st.st_ino not in inodes and rel not in named):
                        if st.st_size:  # an ordinary file, never a stub's inode: local
                            need = sizes.get(st.st_size)
                            if need is None:
                                sizes[st.st_size] = [rel]
                            else:
                                need.append(rel)
                        continue
                    else:
                        state, rec, problem = classify(base + name, st, ALWAYS)
                    # its path through the walk's directory descriptor (valid while check runs): an
                    # absolute path fails past PATH_MAX, and names whatever stands there by then
                    self.check(Entry(rel, base + name, st, state, rec, problem, dname))
        self.res.stubs += trusted
        objects = self.objects
        for rel, row in self.trusted_rows():  # the catalog's own path strings: no copy per stub
            need = objects.get(row.oid)
            if need is None:
                need = objects[row.oid] = []
            need.append((rel, row))

    def trusted_rows(self):
        """``(path, row)`` of each stub the walk found as its catalog row's stamp says."""
        return ((p, v) for p, v in self.stamps.items() if type(v) is _Trusted)

    def walk_error(self, rel: str, exc: OSError) -> None:
        """A directory the walk could not open or list: its stubs cannot be proven."""
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # gone, or a symlink: not followed
            self.unseen.setdefault(rel, [f"cannot be read ({exc.strerror or exc})", 0])

    def hidden(self, rel: str) -> tuple[str, str] | None:
        """Why the walk could not see the catalog's stub ``rel``, if it could not: (the
        directory, why). A directory it could not open, list or look into, a filesystem
        mounted on the way (st_dev differs from the root's: what was under it is hidden), a
        directory skipped as another root's or a remote's. None: ``rel`` is provably no
        longer a file (a missing name, a directory, a symlink on the way)."""
        from jam_core.fs import DIR_FLAGS
        from jam_core.scan import _foreign

        parent = rel.rpartition("/")[0]
        if parent in self.probed:
            why = self.probed[parent]
        else:
            why = self.probed[parent] = self.probe_dir(parent, DIR_FLAGS, _foreign)
        if why is None:  # a directory on the way is gone (or a symlink now)
            return self.linked_away(rel)
        if why[0]:
            return why
        if os.path.join(self.real_top(), rel) in self.mount_points():  # a file bind-mounted over the stub
            return rel, "a file is mounted on it, hiding what was there"
        try:  # the directories are there and ours: the name itself (EACCES: listed, not searchable)
            os.stat(os.path.join(str(self.root.path), rel), follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return parent or ".", f"cannot be read ({exc.strerror})"
        return self.linked_away(rel)  # None: gone, or there and walked (a local file now: checked out by hand)

    def linked_away(self, rel: str) -> tuple[str, str] | None:
        """Where ``rel`` (or a directory on its way) is now a symlink that leads out of the root
        to this very stub (``mv`` elsewhere, ``ln -s`` back): (rel, why). Its row is kept: it
        is what keeps the stub's object referenced, and forgotten, the next gc would remove
        the content of a stub that still exists. None otherwise."""
        path = os.path.join(str(self.root.path), rel)
        if os.path.realpath(path) == os.path.abspath(path):
            return None  # no symlink on the way
        real = os.path.realpath(path)
        top = os.path.realpath(str(self.root.path))
        if real == top or real.startswith(top.rstrip("/") + "/"):
            return None  # inside the root: the walk sees it there
        try:
            rec = read_record(real)
        except (OSError, ValueError):
            return None
        if rec is None or rec.oid != self.stamps[rel][0]:
            return None
        return rel, f"a symlink stands where this stub was, to the stub now at {real} (outside the root)"

    def probe_dir(self, parent: str, dir_flags: int, foreign) -> tuple | None:
        """``hidden``'s look at the directories from the root down to ``parent``, each opened
        by descriptor without following a symlink: (dir, why) if one hides what is below it,
        ("", "") when all are there and ours, None when one is gone. Each directory is looked at
        once per run (``probed``, the answer for the directories down to it): a folder of N
        folders of stale rows is listed once, not once per folder."""
        probed = self.probed
        try:
            fd = os.open(self.root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            return ".", f"cannot be read ({exc.strerror})"
        try:
            dev = os.fstat(fd).st_dev
            here = ""
            for part in parent.split("/") if parent else ():
                here = f"{here}/{part}" if here else part
                try:
                    nfd = os.open(part, dir_flags, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        return None
                    return here, f"cannot be read ({exc.strerror})"
                os.close(fd)
                fd = nfd
                if here in probed:  # looked at already (and all above it): opened only to go on down
                    if probed[here] == ("", ""):
                        continue
                    return probed[here]
                if os.fstat(fd).st_dev != dev or os.path.join(self.real_top(), here) in self.mount_points():
                    return here, "a filesystem is mounted on it, hiding what was there"  # (a bind mount: same dev)
                try:
                    with os.scandir(fd) as it:
                        entries = list(it)
                except OSError as exc:
                    return here, f"cannot be read ({exc.strerror})"
                if foreign(fd, entries):
                    return here, "it holds a .jam directory (or a remote's marker): every walk skips it as " \
                                 "another root's"
                probed[here] = ("", "")
            return "", ""
        finally:
            os.close(fd)

    def real_top(self) -> str:
        if not hasattr(self, "_real_top"):
            self._real_top = os.path.realpath(self.root.path)
        return self._real_top

    def mount_points(self) -> set[str]:
        """Where filesystems are mounted (``/proc/self/mountinfo``; read once, only for rows
        the walk did not see)."""
        if not hasattr(self, "_mounts"):
            self._mounts = _mount_points()
        return self._mounts

    def report_unseen(self) -> None:
        for d, (why, n) in sorted(self.unseen.items()):
            if why.startswith("a symlink stands"):
                self.problem("unseen", d, f"{why}: jam cannot manage it there, and keeps its catalog row so that "
                             "its content stays on the remotes; move the stub back in place of the symlink (or "
                             "remove the symlink, and jam forgets it: `jam gc` may then remove its content)")
                continue
            what = (f"the {n} stub{'' if n == 1 else 's'} the catalog lists under it cannot be looked at, so "
                    "nothing proves they come back (their catalog rows are kept)") if n else \
                "doctor could not look inside, so nothing proves the stubs there come back"
            todo = ("unmount it" if "mounted" in why else "move that .jam (or marker) away" if ".jam" in why
                    else "make it readable and searchable (chmod u+rx)")
            self.problem("unseen", d, f"{why}: {what}; {todo}, then run `jam doctor` again")

    def stub_inodes(self) -> set[int] | None:
        """The inodes the catalog recorded for stubs (None: read every file's xattr)."""
        if self.deep or self.rebuilt or self.cat is None:
            return None
        inodes = set()
        for row in self.all_rows.values():
            if not isinstance(row[4], int):
                return None  # a row with no inode: the catalog cannot say which files were stubs
            inodes.add(row[4])
        return inodes

    def check(self, e: Entry) -> None:
        if e.state == LOCAL:
            if e.rel in self.rels:  # named on the command line: say what it is rather than nothing
                self.problem("not-a-stub", e.rel, "a local file, not a stub: there is nothing to bring back")
            elif e.st.st_size > 0:
                self.local_sizes.setdefault(e.st.st_size, []).append(e.rel)
            return
        if e.state == BAD:
            self.bad(e)
            return
        rec = e.record
        lost = e.problem == LOST_XATTRS
        if e.state == DIRTY:
            self.res.stubs += 1
            self.keep_row(e, None if lost else rec)
            what = "a copy of a stub (it lost its xattrs) " if lost else ""
            self.problem("dirty", e.rel, f"{what}written into after it was stashed; jam will not fetch over it: "
                         + keep_both_hint(e.rel))
            return
        assert e.state == STUB
        if lost:
            p = self.problem("lost-xattr", e.rel, "a stub whose xattrs were lost (copied without them?); "
                             "`jam doctor --fix` restores them from its header")
            if self.fix:
                p.fixed = self.restore_xattr(e, rec)
            vouch = False
        else:
            vouch = self.clean(e, rec)
            if vouch is None:  # dirty: reported, its row kept
                return
        self.res.stubs += 1
        if not lost or self.fix:  # a stub, or its xattrs restored just now
            self.rows.append(self.row(e.rel, rec, e.st, vouch=vouch))
        self.need(e.rel, rec)

    def need(self, rel: str, rec: StubRecord) -> None:
        self.objects.setdefault(rec.oid, []).append((rel, rec))

    def bad(self, e: Entry) -> None:
        """Unreadable metadata. If the header is intact and the bytes are exactly a stub's,
        ``user.jam`` (damaged or missing) is restored from it; otherwise reported only."""
        rec = None
        try:
            fd = open_checked(e.path, e.st)
        except OSError:
            fd = None
        if fd is not None:
            try:
                rec = record_from_block(os.pread(fd, HEADER_MAX, 0), e.st.st_size)
                if rec is not None and not verify_clean(fd, rec):
                    rec = None
            except (BadStub, OSError):
                rec = None
            finally:
                os.close(fd)
        if rec is None:
            self.problem("bad-metadata", e.rel, f"{e.problem}; left as it is")
            self.keep_row(e, None)
            return
        p = self.problem("bad-metadata", e.rel, f"{e.problem}, but its header is intact: "
                         "`jam doctor --fix` restores user.jam from it")
        if self.fix:
            p.fixed = self.restore_xattr(e, rec)
        if p.fixed:  # a stub again: it counts, and its object must be there
            self.res.stubs += 1
            self.rows.append(self.row(e.rel, rec, e.st, vouch=False))  # repaired just now: read again next time
            self.need(e.rel, rec)
        else:
            self.keep_row(e, None)

    def keep_row(self, e: Entry, rec: StubRecord | None) -> None:
        """The catalog row of a stub left as it is (dirty, or metadata jam cannot read): the row
        it had, unvouched, where its metadata now names no object or another one (an xattr
        copied from another stub), so that its own object stays referenced and no gc removes
        it; else the row of what it says."""
        old = self.stamps.get(e.rel)
        if old is not None and (rec is None or old[0] != rec.oid):
            self.rows.append((e.rel, *old[:5], None))
        elif rec is not None:
            self.rows.append(self.row(e.rel, rec, e.st, vouch=False))

    def restore_xattr(self, e: Entry, rec: StubRecord) -> bool:
        """Give a stub whose bytes are intact its ``user.jam`` back (from its header), read-only
        and with the original's mtime, through one descriptor checked to be that file."""
        fd = open_checked(e.path, e.st)
        if fd is None:
            return False
        try:
            if not verify_clean(fd, rec):  # written into since the scan: leave it
                return False
            os.setxattr(fd, XATTR, rec.pack())
            os.fchmod(fd, rec.mode & ~0o222)
            os.utime(fd, ns=(e.st.st_atime_ns, rec.mtime_ns))
            return True
        finally:
            os.close(fd)

    def clean(self, e: Entry, rec: StubRecord) -> bool | None:
        """A stub with a good xattr whose stat looks untouched: are its bytes a stub's? If not,
        its header is repairable when it was lost to zeros, or damaged with no write through
        the filesystem (the catalog's inode and ctime still match); else it is dirty (None).
        True only if its bytes were read clean after e.st was taken, or its header written
        again: its stamp may then vouch for it. False for a stub left as it was (a bad header
        --fix did not repair: vouched for, every later scan would trust its zeros unread)."""
        fd = open_checked(e.path, e.st)
        if fd is None:
            return False  # gone or replaced since the scan: not this run's business (nothing read)
        try:
            if verify_clean(fd, rec):
                return True
            st = os.fstat(fd)
            zeros = not os.pread(fd, HEADER_MAX, 0).strip(b"\0")
            row = self.stamps.get(e.rel)
            untouched = row is not None and row[4:6] == (st.st_ino, st.st_ctime_ns)
        finally:
            os.close(fd)
        if not (zeros or untouched) or not _only_header_differs(e.path, rec, e.st):
            self.res.stubs += 1
            self.keep_row(e, rec)
            self.problem("dirty", e.rel, "written into after it was stashed (its size and mtime were put back); "
                         "jam will not fetch over it: " + keep_both_hint(e.rel))
            return None
        what = "lost (zeros)" if zeros else "damaged, with no write since the stub was made"
        p = self.problem("bad-header", e.rel, f"its header block is {what}; "
                         "`jam doctor --fix` writes it again from user.jam")
        if self.fix:
            p.fixed = self.rewrite(e, rec)
        return p.fixed

    def rewrite(self, e: Entry, rec: StubRecord) -> bool:
        """Give the stub a header again, never in place: a new stub (the same record, owner,
        mode, mtime and xattrs) is written aside in its directory and exchanged with it in
        one ``renameat2(RENAME_EXCHANGE)``, only if the stub is still the inode scanned and
        unchanged (ctime); what went out is then checked (the same inode, its size, mtime and
        bytes still those read before: a write at the last instant changes them) and, if
        anything changed, exchanged back: nobody's write is lost. True if repaired."""
        from jam_core.fs import fd_path, getxattr, listxattr, open_dir, owner, setxattr, tmp_name
        from jam_core.stub import _span, _zeros_from, write_stub

        fd = open_checked(e.path, e.st)
        if fd is None:
            return False
        dir_fd = new_fd = None
        tmp, new_ino = "", 0
        try:
            st0 = os.fstat(fd)
            if st0.st_ctime_ns != e.st.st_ctime_ns:  # changed since the scan
                return False
            span = _span(st0)
            block = os.pread(fd, span, 0)
            if len(block) != span or not _zeros_from(fd, span, rec.size):
                return False
            name = e.rel.rpartition("/")[2]
            root_fd = os.open(self.root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                dir_fd = open_dir(root_fd, e.rel.rpartition("/")[0])
            finally:
                os.close(root_fd)
            here = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (here.st_ino, here.st_dev) != (st0.st_ino, st0.st_dev):
                return False  # another file at the name now
            extra = {}
            for x in listxattr(fd):  # what the stub carries (other user xattrs, its ACLs) stays on it
                if x.startswith("user.") and x != XATTR:
                    extra[x] = getxattr(fd, x)
            raw = getxattr(fd, XATTR)
            oid_remotes = self.cat.remotes_of([rec.oid])[rec.oid] if self.cat is not None else set()
            full = StubRecord(rec.oid, rec.size, rec.mode, rec.mtime_ns, tuple(sorted(oid_remotes)), "")
            tmp = tmp_name()
            new_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dir_fd)
            new_ino = os.fstat(new_fd).st_ino
            if (st0.st_uid, st0.st_gid) != owner():
                os.fchown(new_fd, st0.st_uid, st0.st_gid)
            write_stub(new_fd, full, name, st0.st_atime_ns, extra)
            setxattr(new_fd, XATTR, raw)  # the record as it was, byte for byte
            os.fsync(new_fd)
            check = os.open(fd_path(new_fd), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if not verify_clean(check, rec):
                    return False
            finally:
                os.close(check)
            if os.fstat(fd).st_ctime_ns != e.st.st_ctime_ns:  # written into while the new stub was made
                return False
            try:
                _exchange(dir_fd, tmp, name)
                out = os.stat(tmp, dir_fd=dir_fd, follow_symlinks=False)
                held = os.fstat(fd)
                if ((out.st_ino, out.st_dev) != (st0.st_ino, st0.st_dev) or held.st_size != st0.st_size
                        or held.st_mtime_ns != st0.st_mtime_ns or os.pread(fd, span, 0) != block
                        or not _zeros_from(fd, span, rec.size)):
                    _exchange(dir_fd, tmp, name)  # what was there returns to its name
                    return False
            except BaseException:
                try:  # interrupted between the exchange and its check: put back what was there
                    if os.stat(tmp, dir_fd=dir_fd, follow_symlinks=False).st_ino != new_ino:
                        _exchange(dir_fd, tmp, name)
                except OSError:
                    pass
                raise
            os.unlink(tmp, dir_fd=dir_fd)  # the old stub, checked unchanged: the new one has its name
            tmp = ""
            os.fsync(dir_fd)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
            if new_fd is not None:
                os.close(new_fd)
            if tmp and dir_fd is not None:
                try:  # our new stub, if it is still at the temporary name (never anyone else's file)
                    if os.stat(tmp, dir_fd=dir_fd, follow_symlinks=False).st_ino == new_ino:
                        os.unlink(tmp, dir_fd=dir_fd)
                except OSError:
                    pass
            if dir_fd is not None:
                os.close(dir_fd)

    @staticmethod
    def row(rel: str, rec: StubRecord, st: os.stat_result, vouch: bool = True) -> tuple:
        """The catalog's row of a stub. Its stamp (inode and ctime) lets later scans trust the
        stub without reading it while both hold, so the ctime is recorded only from a stat
        taken before the stub's bytes were found clean (``vouch``): never for a dirty stub, nor
        from a stat taken after its check (a write in between would be vouched for)."""
        return (rel, rec.oid, rec.size, rec.mtime_ns, rec.stashed_at, st.st_ino, st.st_ctime_ns if vouch else None)

    # -- the catalog against the tree -------------------------------------------------------------
    def check_catalog(self) -> None:
        if self.cat is None or self.rebuilt:
            return
        self.odd = self.cat.odd_stub_paths()  # rows whose path is no name at all (42, NULL, text): not read
        for p in self.odd:
            self.res.add("stubs", PROBLEM, "catalog-stale", repr(p), "the catalog has a row whose path is no name "
                         "(a damaged row); `jam doctor --fix` forgets it", fixed=self.fix)
        known = self.stamps
        seen = {row[0] for row in self.rows}
        orphans = []
        for p in sorted(p for p, v in known.items()
                        if type(v) is not _Trusted and p not in seen and p not in self.reported):
            if not valid_rel(p):  # a damaged row (a NUL, "..", an absolute path): never probed, --fix forgets it
                self.reported.add(p)
                self.res.add("stubs", PROBLEM, "catalog-stale", p, "the catalog lists a path no file can have "
                             "(a damaged row); `jam doctor --fix` forgets it", fixed=self.fix)
                continue
            hidden = self.hidden(p)
            if hidden is None:
                orphans.append(p)
                continue
            # a stub doctor could not look at: its row is kept (it is what keeps its object
            # referenced: forgotten, the next gc would remove the only copy)
            self.unseen.setdefault(hidden[0], [hidden[1], 0])[1] += 1
            self.reported.add(p)
            self.rows.append((p, *known[p][:5], None))
        cat_oids: dict[str, list[str]] = {}
        for p in reversed(orphans):  # each object's stale paths, the first last: popped in order, once each
            cat_oids.setdefault(known[p][0], []).append(p)
        moved_from: set[str] = set()
        for row in [row for row in self.rows if row[0] not in known]:
            rel, oid = row[0], row[1]
            if rel in self.reported:
                continue
            stale = cat_oids.get(oid)
            src = stale.pop() if stale else None  # never a scan from the first again: linear in the stubs
            if src is not None:
                moved_from.add(src)
                f = self.problem("catalog-moved", rel, f"moved (from {src}) without jam: the catalog still has "
                                 "the old path; `jam doctor --fix` updates it")
            else:
                f = self.problem("catalog-unknown", rel, "a stub the catalog does not know: policies and the cd "
                                 "hook cannot see it; `jam doctor --fix` adds it")
                self.adopted.add(oid)
                self.unknown[rel] = f
            f.fixed = self.fix
        for p in orphans:
            if p in moved_from:
                continue
            self.reported.add(p)
            self.res.add("stubs", PROBLEM, "catalog-stale", p, "the catalog lists a stub that is no longer there "
                         "(removed, or checked out by hand); `jam doctor --fix` forgets it", fixed=self.fix)

    def save_catalog(self) -> None:
        cat = self.cat
        if self.rebuilt:  # every row is new to this catalog
            self.adopted.update(r[1] for r in self.rows)
        rows = self.rows
        if self.adopted and not self.publish_refs() and self.unknown:
            # not listed in the refs: not added either, so that they stay reported and the next
            # --fix records them (added, nothing would ever write their refs again)
            rows = [r for r in rows if r[0] not in self.unknown]
            for f in self.unknown.values():
                f.fixed = False
                f.detail += " (not added: this root's refs could not be written, see `refs`)"
        rows = rows + [(p, *v) for p, v in self.trusted_rows()]
        if self.rels == ["."]:
            cat.replace_stubs(rows)
        else:
            seen = {r[0] for r in rows}
            cat.upsert_stubs(rows, [p for p in self.stamps if p not in seen])
        with cat.transaction():
            if self.odd:
                cat.forget_odd_stubs()
            for oid, name, size in self.locations:
                cat.record_location(oid, name, size)

    def publish_refs(self) -> bool:
        """Stubs --fix adds that the catalog did not know (moved in from another root, copied by
        hand) are this root's from now on: its refs on its remotes must list their objects, as a
        stash's do, before its catalog says so. Else the root they came from, once it forgets
        them, may remove their only copy in its `jam gc`, and nothing here would say so
        (invariants 6 and 12). A remote whose refs cannot be written is a problem (False)."""
        from jam_core.ops.refs import Recorder, referenced

        try:
            recorder = Recorder(self.root, self.pm, self.session)
            oids = referenced(self.root, self.cat) | self.adopted
        except (JamError, OSError) as exc:
            self.problem("refs", ".", f"the stubs the catalog did not know are not recorded in this root's refs "
                         f"on its remotes ({exc}): another root's `jam gc` could remove their content; run "
                         "`jam doctor --fix` again")
            return False
        ok = True
        for r in self.remotes:
            why = self.unusable.get(r.name)
            if why is None:
                lines = recorder.publish(oids, [r])
                if not lines:
                    continue
                why = lines[0]
            ok = False
            self.problem("refs", r.name, f"this root's refs could not be written on remote {r.name!r} ({why}): the "
                         "stubs the catalog did not know are not listed there (another root's `jam gc` could remove "
                         "their content); run `jam doctor --fix` again once it can be written")
        return ok

    # -- objects on remotes -----------------------------------------------------------------------
    def list_remotes(self) -> dict[str, dict[str, int] | None]:
        """One listing per usable remote: {remote: {oid: size}} (None: the backend cannot list)."""
        out: dict[str, dict[str, int] | None] = {}
        for r in self.remotes:
            if r.name in self.unusable:
                continue
            try:
                listed = self.pm.hook.list_objects(remote=r, session=self.session, sweep=self.fix)
                if listed is None:
                    out[r.name] = None
                    continue
                objects: dict[str, int] = {}
                parts = []
                for name, size in listed:
                    if name.startswith("tmp/"):
                        parts.append((name, size))
                    else:
                        objects[name] = size
            except RemoteError as exc:
                self.unusable[r.name] = str(exc)
                self.res.add("setup", PROBLEM, "unreachable", r.name, str(exc))
                continue
            out[r.name] = objects
            for name, size in parts:
                self.res.add("leftovers", PROBLEM, "remote-leftover", f"{r.name}:{name}",
                             ("a stale upload of an interrupted jam: removed" if self.fix else
                              f"a stale upload of an interrupted jam ({_human(size)}); "
                              "`jam doctor --fix` removes it"), fixed=self.fix)
            if not parts:
                self.res.add("leftovers", OK, "remote-leftover", r.name, f"no stale uploads on remote {r.name!r}")
        return out

    def holders(self, oid: str, size: int, listings) -> tuple[list[Remote], list[str]]:
        """(remotes holding oid with that size, remotes holding it with another size)."""
        good, wrong = [], []
        for r in self.remotes:
            if r.name in self.unusable:
                continue
            listing = listings.get(r.name)
            if listing is None:
                try:
                    if (self.pm.hook.has(remote=r, oid=oid, size=size, session=self.session)
                            or chunks.held(r, oid, size, self.pm, self.session)):
                        good.append(r)
                except RemoteError as exc:
                    self.unusable[r.name] = str(exc)
                    self.res.add("setup", PROBLEM, "unreachable", r.name, str(exc))
                continue
            have = listing.get(oid)
            if have == size:
                good.append(r)
            elif have is not None:
                wrong.append(f"{r.name} ({have} bytes)")
            else:
                try:  # not whole: content-defined chunks of a large file (``jam commit``)
                    if chunks.held(r, oid, size, self.pm, self.session, listing):
                        good.append(r)
                except RemoteError as exc:
                    self.unusable[r.name] = str(exc)
                    self.res.add("setup", PROBLEM, "unreachable", r.name, str(exc))
        return good, wrong

    def check_objects(self, listings) -> None:
        from jam_core.placement import is_cache

        copies = _copies(self.root)
        caches = {r.name for r in self.remotes if is_cache(r)}  # an edge cache's copy is no copy: it expires
        counted = copies > 1 or bool(caches)
        known = self.cat.remotes_of(self.objects) if self.cat is not None and counted else {}
        verified = self.recently_verified()
        bad_before = len(self.res.unfixed)
        fine = 0
        if self.deep:
            self.session.begin(sum(stubs[0][1].size for stubs in self.objects.values()))
        usable = [r for r in self.remotes if r.name not in self.unusable]
        listed = [(r, listings[r.name]) for r in usable if listings.get(r.name) is not None]
        only = listed[0] if len(listed) == 1 == len(usable) else None  # the common case, checked inline
        for oid, stubs in _by_size(self.objects):
            rel, rec = stubs[0]
            if only is not None and only[1].get(oid) == rec.size:
                good = [only[0]]
            else:
                good, wrong = self.holders(oid, rec.size, listings)
            if not good:
                detail = "no reachable remote holds its object " + oid
                if wrong:
                    detail += " (wrong size on " + ", ".join(wrong) + ")"
                stored = self.reupload(oid, rec) if self.fix else []
                fixed = bool(stored)  # only copies verified on the remote (a backend's "stored" is not proof)
                if fixed:
                    good = stored
                    detail += (": stored again from a local file with the same content, on "
                               + ", ".join(r.name for r in stored))
                else:
                    detail += ("; not stored again: no local file has the same content, or no remote holds "
                               "it after storing it" if self.fix
                               else "; `jam doctor --fix` stores it again if a local file has the same content")
                for s_rel, _ in stubs:
                    self.problem("missing", s_rel, detail, fixed=fixed)
                if not fixed:
                    continue
            if self.fix:
                self.locations.extend((oid, r.name, rec.size) for r in good)
            if counted:
                held = ({r.name for r in good} | (known.get(oid, set()) & set(self.unusable))) - caches
                if len(held) < copies:
                    on_caches = sorted({r.name for r in good} & caches)
                    detail = (f"{len(held)} of the {copies} copies `[place] copies` asks for"
                              + (f" ({', '.join(sorted(held))})" if held else ""))
                    if on_caches:
                        detail += (f"; the edge cache{'s' if len(on_caches) > 1 else ''} {', '.join(on_caches)} "
                                   "do not count (a cache expires what is not used): `jam copy --to REMOTE` "
                                   "stores a copy that counts")
                    for s_rel, _ in stubs:
                        self.problem("copies", s_rel, detail)
            if self.deep:
                self.deep_check(stubs, good, verified)
            fine += len(stubs)
        if not self.res.unfixed[bad_before:] and self.objects:
            self.res.add("stubs", OK, "objects", "", f"every object of {len(self.objects)} checked is on a remote "
                         "with its size" + (" and its hash" if self.deep else ""))
        if self.res.stubs and not any(f.section == "stubs" and f.status == PROBLEM for f in self.res.findings):
            self.res.add("stubs", OK, "stubs", "", f"{self.res.stubs} stub(s): metadata valid, header and xattr agree, "
                         "none written into, catalog in step")

    def recently_verified(self) -> set[tuple[str, str]]:
        if not self.deep or self.older_than is None or self.cat is None:
            return set()
        return self.cat.verified_since(self.now - self.older_than)

    def deep_check(self, stubs, held: list[Remote], recent: set[tuple[str, str]]) -> None:
        """Read every copy back from the remotes that hold it and hash it, once: in place when
        the backend can (``hash_object``: a dir remote's file read and hashed as it streams,
        large ones with every core), else fetched into a nameless file in ROOT/.jam/tmp
        (O_TMPFILE: nothing is left behind, whatever interrupts the check) and hashed. Each good
        copy is recorded at once (an interrupted scrub resumes)."""
        rel, rec = stubs[0]
        good: list[Remote] = []
        corrupt: list[Remote] = []
        for r in held:
            if (rec.oid, r.name) in recent:
                self.res.recent += 1
                good.append(r)
                continue
            try:
                got = self.pm.hook.hash_object(remote=r, oid=rec.oid, size=rec.size, session=self.session)
                if got is None or got is False:  # cannot hash in place, or not there whole (chunks?)
                    got = self.fetch_and_hash(r, rec)
                if got is False:  # gone since the listing: not a copy
                    continue
                if got == rec.oid:
                    good.append(r)
                    self.res.verified += 1
                    self.res.verified_bytes += rec.size
                    if self.cat is not None:
                        self.cat.verified(rec.oid, r.name)
                    continue
                corrupt.append(r)
            except RemoteError as exc:
                self.unusable[r.name] = str(exc)
                self.res.add("setup", PROBLEM, "unreachable", r.name, str(exc))
            except JamError as exc:
                for s_rel, _ in stubs:
                    self.problem("corrupt", s_rel, str(exc))
        for r in corrupt:  # each corrupt copy: which remote, whether a good one is left, the fix
            detail = f"remote {r.name!r} holds a corrupt copy of {rec.oid} (its bytes do not hash to its id)"
            fixed = False
            if good:
                detail += f"; the copy on {good[0].name!r} is good"
                if self.fix:
                    why = self.recopy(good[0], r, rec)
                    fixed = not why
                    detail += f": copied again from {good[0].name!r}" if fixed else f"; not copied again: {why}"
                else:
                    detail += f" (`jam doctor --deep --fix` copies it again from {good[0].name!r})"
            for s_rel, _ in stubs:
                self.problem("corrupt", s_rel, detail, fixed=fixed)
        if not good:
            for s_rel, _ in stubs:
                self.problem("missing", s_rel, f"no remote holds an intact copy of {rec.oid}")

    def recopy(self, src: Remote, dest: Remote, rec: StubRecord) -> str:
        """Store ``rec``'s object on ``dest`` again from the good copy on ``src``: fetched into a
        nameless file in ROOT/.jam/tmp, hashed, stored on ``dest``, then hashed there again (in
        place where the backend can). "" once done, else why not."""
        from jam_core.fs import fd_path
        from jam_core.objects import hash_fd

        tmp_dir = self.root.jam_dir / "tmp"
        if not tmp_dir.is_dir() or tmp_dir.is_symlink():
            tmp_dir = self.root.jam_dir
        try:
            fd = os.open(tmp_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                ok = self.pm.hook.fetch(remote=src, oid=rec.oid, dest=Path(fd_path(fd)), size=rec.size,
                                        session=self.session)
                os.lseek(fd, 0, os.SEEK_SET)
                if ok is not True or hash_fd(fd, rec.oid.split(":")[0]) != (rec.oid, rec.size):
                    return f"the copy on {src.name!r} did not read back intact"
                if self.pm.hook.stash(remote=dest, oid=rec.oid, source=Path(fd_path(fd)), size=rec.size,
                                      session=self.session) is not True:
                    return f"remote {dest.name!r} did not store it"
                self.pm.hook.sync(remote=dest, session=self.session)
            finally:
                os.close(fd)
            got = self.pm.hook.hash_object(remote=dest, oid=rec.oid, size=rec.size, session=self.session)
            if got is None:
                got = self.fetch_and_hash(dest, rec)
            if got != rec.oid:
                return f"remote {dest.name!r} still does not hold an intact copy"
        except (JamError, OSError) as exc:
            return str(exc)
        if self.cat is not None:
            self.cat.verified(rec.oid, dest.name)
        return ""

    def fetch_and_hash(self, r: Remote, rec: StubRecord) -> str | bool:
        """The id the copy on ``r`` hashes to, fetched into a nameless file (False: not there)."""
        from jam_core.fs import fd_path
        from jam_core.objects import hash_fd

        tmp_dir = self.root.jam_dir / "tmp"
        if not tmp_dir.is_dir() or tmp_dir.is_symlink():
            tmp_dir = self.root.jam_dir
        fd = os.open(tmp_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            ok = self.pm.hook.fetch(remote=r, oid=rec.oid, dest=Path(fd_path(fd)), size=rec.size,
                                    session=self.session)
            if ok is False:  # not there whole: its chunks, if a recipe says so (the hash decides)
                os.ftruncate(fd, 0)
                try:
                    ok = chunks.assemble(r, rec.oid, rec.size, fd, self.pm, self.session)
                except RemoteError:
                    raise
                except (JamError, OSError):
                    return ""
                if not ok:
                    return False
            if not ok:
                return ""  # fetch answers False for an object it cannot read back: not intact
            if os.fstat(fd).st_size != rec.size:
                return ""
            os.lseek(fd, 0, os.SEEK_SET)
            got, n = hash_fd(fd, rec.oid.split(":")[0])
            return got if n == rec.size else ""
        finally:
            os.close(fd)

    def reupload(self, oid: str, rec: StubRecord) -> list[Remote]:
        """Store a missing object again from a local file of the tree with the same content
        (candidates of the same size, hashed), on the remotes ``place`` chooses for ``[place]
        copies`` (as a stash would). Each copy is then checked on its remote (hashed in place
        where the backend can, else ``has``): the remotes that verifiably hold it now."""
        from jam_core.fs import fd_path
        from jam_core.objects import hash_fd
        from jam_core.placement import Candidates

        usable = [r for r in self.remotes if r.name not in self.unusable]
        if not usable:
            return []
        for cand in self.local_sizes.get(rec.size, ()):
            try:
                fd = os.open(self.root.path / cand, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode) or hash_fd(fd, oid.split(":")[0]) != (oid, rec.size):
                    continue
                copies = _copies(self.root)
                chosen = self.pm.hook.place(root=self.root.path, oid=oid, size=rec.size, copies=copies, free={},
                                            remotes=Candidates(usable, copies)) or usable[:1]
                by_name = {r.name: r for r in usable}
                stored = []
                for name in dict.fromkeys(getattr(r, "name", None) for r in chosen):
                    r = by_name.get(name)
                    if r is None:  # not one of the usable remotes: never stored on
                        continue
                    try:
                        if self.pm.hook.stash(remote=r, oid=oid, source=Path(fd_path(fd)), size=rec.size,
                                              session=self.session) is not True:
                            continue
                        self.pm.hook.sync(remote=r, session=self.session)
                        if self.holds(r, oid, rec.size):
                            stored.append(r)
                    except JamError:
                        continue
                if stored:
                    return stored
            except (JamError, OSError):
                continue
            finally:
                os.close(fd)
        return []

    def holds(self, r: Remote, oid: str, size: int) -> bool:
        """Does ``r`` hold ``oid`` whole, as read back now: hashed in place where the backend
        can (``hash_object``), else its answer to ``has``."""
        got = self.pm.hook.hash_object(remote=r, oid=oid, size=size, session=self.session)
        if got is None:
            return self.pm.hook.has(remote=r, oid=oid, size=size, session=self.session) is True
        return got == oid

    def unused(self, listings) -> None:
        """Objects on a remote that nothing of this root refers to: reported, never deleted."""
        if self.rels != ["."] or self.cat is None:
            return
        referenced = {r[1] for r in self.rows} | {v[0] for v in self.all_rows.values()}
        referenced.update(self.objects)
        try:  # what the root's snapshots keep (`jam commit`) is not unused: gc keeps it too
            from jam_core.history.index import kept_objects

            referenced |= kept_objects(self.root)
        except (JamError, OSError) as exc:
            self.res.add("leftovers", WARNING, "unused", "history",
                         f"unused objects not counted: {exc}")
            return
        for r in self.remotes:
            listing = listings.get(r.name)
            if not listing:
                continue
            extra = [(o, listing[o]) for o in listing.keys() - referenced]
            if extra:  # not the pieces a referenced large file comes back from
                try:
                    pieces, _trouble = chunks.pieces_needed(r, referenced, self.pm, self.session)
                except (JamError, OSError):
                    pieces = set()
                extra = [(o, s) for o, s in extra if o not in pieces]
            if extra:
                n = f"{len(extra)} object{'' if len(extra) == 1 else 's'}"
                self.res.add("leftovers", WARNING, "unused", r.name,
                             f"{n} ({_human(sum(s for _, s in extra))}) on remote {r.name!r} that "
                             "nothing in this root refers to (older versions, or another root's); never deleted "
                             "by doctor")


class _Row(NamedTuple):
    """A stub's catalog row, as read (validated before use); what doctor needs of a stub the
    catalog's stamp vouches for (``rec.oid``, ``rec.size`` as a StubRecord's)."""

    oid: str
    size: int
    mtime_ns: int
    stashed_at: str
    ino: int | None
    ctime_ns: int | None


class _Trusted(_Row):
    """The row of a stub the walk found as its stamp says (marked in place of its ``_Row``)."""

    __slots__ = ()


def _catalog_rows(cat: Catalog) -> dict[str, _Row]:
    """The one query of the stub table: ``{path: _Row}``, paths decoded once (undecodable bytes
    kept as surrogates). A million rows are held at once: each is taken as the query reads it
    (never a list of them all beside), and the ids and stash times many rows share are held
    once (a stash's stubs share its time, copies of a file their id), about a third of a row's
    memory."""
    out: dict[str, _Row] = {}
    same: dict[str, str] = {}
    new, one = tuple.__new__, same.setdefault
    for p, oid, size, mtime_ns, stashed_at, ino, ctime_ns in cat.each_stub_row():
        if type(stashed_at) is str:
            stashed_at = one(stashed_at, stashed_at)
        out[p.decode("utf-8", "surrogateescape")] = new(_Row, (one(oid, oid) if type(oid) is str else oid, size,
                                                               mtime_ns, stashed_at, ino, ctime_ns))
    return out


def _mount_points() -> set[str]:
    """The mount points of this process's namespace (octal escapes of mountinfo undone)."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read(1 << 24).splitlines()
    except OSError:
        return set()
    out = set()
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4:
            out.add(os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])))
    return out


def _by_size(objects: dict[str, list[tuple[str, StubRecord]]]):
    """``(oid, stubs)`` for each object and size the stubs name: a stub naming a held object
    with another size (hostile or hand-made metadata) cannot come back, and is checked apart."""
    for oid, stubs in objects.items():
        size = stubs[0][1].size
        if len(stubs) == 1 or all(r.size == size for _, r in stubs):
            yield oid, stubs
            continue
        sizes: dict[int, list[tuple[str, StubRecord]]] = {}
        for s in stubs:
            sizes.setdefault(s[1].size, []).append(s)
        yield from ((oid, group) for group in sizes.values())


def _exchange(dir_fd: int, a: str, b: str) -> None:
    """``fs.exchange``, looked up when called (tests inject a write at that instant)."""
    from jam_core import fs

    fs.exchange(dir_fd, a, b)


def _copies(root: Root) -> int:
    table = root.config.get("place", {})
    n = table.get("copies", 1) if isinstance(table, dict) else 1
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UsageError(f"{root.config_path}: [place] copies must be a whole number >= 1, got {n!r}")
    return n


def _only_header_differs(path: str, rec: StubRecord, st: os.stat_result) -> bool:
    """The stat rule holds (size, mtime, blocks) and nothing but zeros follows the first block."""
    from jam_core.stub import _span, _zeros_from, is_dirty

    if is_dirty(st, rec) or not stat.S_ISREG(st.st_mode):
        return False
    fd = open_checked(path, st)
    if fd is None:
        return False
    try:
        return _zeros_from(fd, _span(os.fstat(fd)), rec.size)
    finally:
        os.close(fd)


def _human(n: int) -> str:
    from jam_core.units import human

    return human(n)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    from jam_core.units import format_duration

    return format_duration(seconds)

