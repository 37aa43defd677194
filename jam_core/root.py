"""Roots: finding one, creating one, its config and its lock."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jam_core.errors import UsageError
from jam_core.fs import setxattr
from jam_core.model import Remote
from jam_core.units import human, parse_size  # noqa: F401  (re-exported)

JAM_DIR = ".jam"
CONFIG = "config.toml"
CATALOG = "catalog.db"
LOCK = "lock"

DEFAULT_REMOTE = "default"
DEFAULT_MIN_SIZE = 64 * 1024

def _xdg(var: str, default: str) -> Path | None:
    """On Linux, the XDG base directory rule itself (what platformdirs answers there), without
    importing platformdirs: it costs the cd hook's fetch 6-20 ms. Elsewhere None."""
    if not sys.platform.startswith("linux"):
        return None
    base = os.environ.get(var, "")
    if not os.path.isabs(base):  # the XDG spec: a relative value is ignored
        base = os.path.expanduser(default)
    return Path(base) / "jam"


def user_data_dir() -> Path:
    """``$XDG_DATA_HOME/jam``: the embedded default remote and the roots list."""
    d = _xdg("XDG_DATA_HOME", "~/.local/share")
    if d is not None:
        return d
    import platformdirs

    return Path(platformdirs.user_data_dir("jam", appauthor=False))


def user_config_dir() -> Path:
    """``$XDG_CONFIG_HOME/jam``: the user's defaults (``config.toml``)."""
    d = _xdg("XDG_CONFIG_HOME", "~/.config")
    if d is not None:
        return d
    import platformdirs

    return Path(platformdirs.user_config_dir("jam", appauthor=False))


def roots_file() -> Path:
    """A plain list of roots, one per line, that the shell hooks read without starting Python."""
    return user_data_dir() / "roots"


def default_remote_location() -> Path:
    """The embedded default: a ``dir`` remote under ``$XDG_DATA_HOME/jam/``, shared by roots."""
    return user_data_dir() / "remotes" / DEFAULT_REMOTE


def find_root(start: Path) -> Path | None:
    """The nearest directory at or above ``start`` that holds ``.jam/config.toml``."""
    p = start if start.is_dir() else start.parent
    for d in (p, *p.parents):
        if (d / JAM_DIR / CONFIG).is_file():
            return d
    return None


def abspath(path: str | os.PathLike) -> Path:
    """Absolute and normalised, without resolving the last component (it may be a symlink)."""
    return Path(os.path.abspath(os.fspath(path)))


def check_rel(rel: object) -> str:
    """``rel`` if it is a file's normalised path relative to a root (``.`` for the root), else
    ValueError saying why. Paths read from metadata (xattrs, headers, the catalog, pins, the cd
    hooks' marks) are held to this before use: relative, no NUL, no empty, ``.`` or ``..``
    component, not under ``.jam``, encodable as a file name."""
    if not isinstance(rel, str) or not rel:
        raise ValueError("not a path")
    if rel == ".":
        return rel
    if "\0" in rel:
        raise ValueError("contains a NUL byte")
    if rel.startswith("/"):
        raise ValueError("an absolute path")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError("not a normalised path inside the root (empty, '.' or '..' component)")
    if parts[0] == JAM_DIR:
        raise ValueError("inside jam's own .jam directory")
    try:
        os.fsencode(rel)
    except UnicodeEncodeError:
        raise ValueError("not encodable as a file name") from None
    return rel


def valid_rel(path: object) -> bool:
    """Is ``path`` (from the catalog, a mark, any metadata) a file's path inside a root (not
    the root itself)? A bad row is skipped by its reader (doctor reports it)."""
    if path == ".":
        return False
    try:
        check_rel(path)
    except ValueError:
        return False
    return True


class RootBusy(UsageError):
    """Another jam process holds the root's lock (``Root.lock(wait=False)``)."""


class Root:
    """A tree jam manages. ``Root.find(path)`` or ``Root.init(path)``; cheap to construct."""

    def __init__(self, path: Path):
        self.path = path
        self.jam_dir = path / JAM_DIR
        self._config: dict | None = None

    # -- finding and creating -------------------------------------------------------------
    @classmethod
    def find(cls, path: str | os.PathLike = ".") -> "Root":
        p = abspath(path)
        root = find_root(p)
        if root is None:
            raise UsageError(f"{p} is not inside a jam root (run `jam init` in the tree's top directory)")
        return cls(root)

    @classmethod
    def init(cls, path: str | os.PathLike, register: bool = True,
             default_remote: bool = True) -> tuple["Root", bool]:
        """Make ``path`` a root. Returns (root, created). Refuses filesystems without xattrs/holes,
        and a path that overlaps a remote: the embedded default's location (unless
        ``default_remote`` is False: the caller gives the root another remote) or any ``dir``
        remote of a registered root. Everything is checked before anything is created."""
        p = abspath(path)
        if b"\n" in os.fsencode(p):  # the roots list the cd hooks read holds one root per line
            raise UsageError(f"{str(p)!r}: a jam root's path must not contain a newline "
                             "(the roots list holds one root per line); rename the directory")
        if not p.is_dir():
            raise UsageError(f"{p} is not a directory")
        existing = find_root(p)
        if existing == p:
            if register:  # a root moved with mv: `jam init .` puts it back on the hooks' list
                register_root(p)
            return cls(p), False
        if existing is not None:
            raise UsageError(f"{p} is already inside the jam root {existing}")
        jd = p / JAM_DIR
        try:
            in_the_way = not stat.S_ISDIR(os.lstat(jd).st_mode)
        except FileNotFoundError:
            in_the_way = False
        if in_the_way:
            raise UsageError(f"{jd} is in the way: it is not a directory (jam keeps its data there); "
                             "move it away and run `jam init` again")
        check_root_overlaps(p, default_remote)
        check_filesystem(p)
        for d in (jd, jd / "tmp", jd / "visits"):  # visits: the cd hooks' marks (jam_core.hook.marks)
            d.mkdir(mode=0o700, exist_ok=True)
            if not stat.S_ISDIR(os.lstat(d).st_mode):  # a symlink planted there: not ours
                raise UsageError(f"{d} is not a directory (a symlink?); remove it and run `jam init` again")
            os.chmod(d, 0o700)  # the cd hooks check owner and mode; whatever the umask
        root = cls(p)
        root.write_config({"core": {"min_size": "64KiB"}, "remote": {}})
        if register:
            register_root(p)
        return root, True

    # -- config ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.jam_dir / CONFIG

    @property
    def config(self) -> dict:
        """The merged view for readers: the root's own config over the user's defaults."""
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def own_config(self) -> dict:
        """Only what ``ROOT/.jam/config.toml`` itself says (no user defaults): what writers edit."""
        return _read_toml(self.config_path) or {}

    def update_config(self, change) -> dict:
        """Read the root's own config, let ``change(table)`` edit it in place, write it back.

        Only the root's own keys are written (never the user's defaults from
        ``~/.config/jam/config.toml``). The caller holds ``self.lock()``."""
        own = self.own_config()
        change(own)
        self.write_config(own)
        return own

    def write_config(self, config: dict) -> None:
        """Replace the root's own config file with ``config`` (atomically, durably)."""
        import tomli_w

        data = tomli_w.dumps(config).encode()
        tmp = self.config_path.with_name(f".{CONFIG}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.config_path)
        self._config = None  # the merged view is read again, user defaults included

    @property
    def min_size(self) -> int:
        core = self.config.get("core", {})
        if not isinstance(core, dict):
            raise UsageError(f"{self.config_path}: 'core' must be a table ([core])")
        return parse_size(core.get("min_size", DEFAULT_MIN_SIZE), "core.min_size")

    def remotes(self) -> list[Remote]:
        out = []
        tables = self.config.get("remote", {})
        if not isinstance(tables, dict):
            raise UsageError(f"{self.config_path}: 'remote' must be tables ([remote.NAME]); add a remote with "
                             "`jam remote add NAME URL`")
        for name, table in sorted(tables.items()):
            if not isinstance(table, dict) or "kind" not in table or "location" not in table:
                raise UsageError(f"{self.config_path}: remote {name!r} needs kind and location")
            tier = table.get("tier", 0)
            if not isinstance(tier, int) or isinstance(tier, bool) or tier < 0:
                raise UsageError(f"{self.config_path}: remote {name!r}: tier must be a whole number >= 0")
            opts = {k: v for k, v in table.items() if k not in ("kind", "location", "url", "tier")}
            out.append(Remote(name=name, kind=str(table["kind"]), url=str(table.get("url", table["location"])),
                              location=str(table["location"]), tier=tier, options=opts))
        return out

    # -- paths ----------------------------------------------------------------------------
    def rel(self, path: str | os.PathLike) -> str:
        """The path relative to the root; refuses paths outside it or inside ``.jam``."""
        p = abspath(path)
        try:
            rel = p.relative_to(self.path)
        except ValueError:
            raise UsageError(f"{p} is outside the jam root {self.path}") from None
        if rel.parts[:1] == (JAM_DIR,):
            raise UsageError(f"{p} is jam's own data, not a file jam manages")
        return str(rel) if rel.parts else "."

    def abs(self, rel: str) -> Path:
        return self.path if rel == "." else self.path / rel

    # -- locking --------------------------------------------------------------------------
    @contextmanager
    def lock(self, wait: bool = True) -> Iterator[None]:
        """One writer per root: an exclusive flock on ``.jam/lock``, released on exit or death."""
        try:  # never through a symlink planted in .jam: it would create a file wherever it points
            fd = os.open(self.jam_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UsageError(f"{self.jam_dir / LOCK} is a symlink; jam will not follow it (remove it: jam makes "
                                 "its own)") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UsageError(f"{self.jam_dir / LOCK} is not a regular file; remove it (jam makes its own)")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise RootBusy(f"another jam process is working on {self.path}") from None
                # always (from cron or a pipe too): a wait without a word looks like a hang
                try:
                    if sys.stderr is not None:
                        print(f"jam: waiting for another jam process working on {self.path}...",
                              file=sys.stderr, flush=True)
                except (OSError, ValueError):  # stderr closed: wait all the same
                    pass
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock


def load_config(path: Path) -> dict:
    """The root's TOML config over the user's defaults (``$XDG_CONFIG_HOME/jam/config.toml``)."""
    merged: dict = {}
    user = user_config_dir() / CONFIG
    for p in (user, path):
        data = _read_toml(p)
        if data is not None:
            _merge(merged, data)
    return merged


def _read_toml(path: Path) -> dict | None:
    """A TOML file's tables; None if it does not exist; UsageError if it is not TOML.

    Parsed through a cache (:func:`_cached`): the cd hook's fetch reads the config on every
    ``cd`` that fetches, and ``tomllib`` (its import and its parse) costs it ~6 ms."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO: never waited on
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read this config file: {exc.strerror}") from None
    try:
        return read_toml_fd(fd, path)
    finally:
        os.close(fd)


def read_toml_fd(fd: int, path: str | os.PathLike) -> dict:
    """The tables of the TOML file open at ``fd`` (at its start), named ``path`` (where
    its cache is looked for; the cache must match the file at ``fd`` itself, wherever found).
    UsageError if it is not TOML, not a regular file or larger than CONFIG_MAX."""
    st = os.fstat(fd)
    key = _cache_key(st)
    cached = _cached(path, key) if stat.S_ISREG(st.st_mode) else None
    if cached is not None:
        return cached
    raw = read_capped(fd, st, path, CONFIG_MAX, "a config file")
    data = _parse_toml(raw, path)
    _keep(path, key, st, data)
    return data


CONFIG_MAX = 1 << 20  # a config file larger than this is not one anybody wrote by hand


def read_capped(fd: int, st: os.stat_result, path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of the file open at ``fd`` (``st`` its fstat), read from where it is; UsageError
    if it is not a regular file (a FIFO, a device, a directory) or holds more than ``limit``."""
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path}: not a regular file")
    if st.st_size > limit:
        raise UsageError(f"{path}: {st.st_size} bytes is too large for {what}")
    chunks, left = [], limit + 1
    while left > 0:
        try:
            b = os.read(fd, min(left, 1 << 20))
        except OSError as exc:
            raise UsageError(f"{path}: cannot read it: {exc.strerror}") from None
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    if left <= 0:  # it grew while read
        raise UsageError(f"{path}: too large for {what}")
    return b"".join(chunks)


def _parse_toml(raw: bytes, path: str | os.PathLike) -> dict:
    import tomllib

    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None


# The parsed-config cache: ``.NAME.cache`` beside the TOML file, JSON of {"key", "data"}. Used
# only if it is a regular file (never through a symlink) of this user, writable by nobody else,
# and its key is the TOML file's as read now: device, inode, size, mtime and ctime in ns (ctime
# cannot be set by anyone: any write, rename or chmod of the file changes it). Written only for
# a file whose mtime and ctime are RACY_S old (a write in the same clock tick as the one cached
# would keep all five) and whose tables come back from JSON exactly (TOML dates do not: no cache).
CACHE_FORMAT = 1
RACY_S = 2.0
CACHE_MAX = 1 << 20


def _cache_key(st: os.stat_result) -> list:
    return [CACHE_FORMAT, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _cache_path(path: Path) -> str:
    return os.path.join(os.path.dirname(os.fspath(path)), f".{os.path.basename(os.fspath(path))}.cache")


def _cached(path: Path, key: list) -> dict | None:
    """The tables cached for ``path`` as it is now (``key``), or None."""
    import json

    try:
        fd = os.open(_cache_path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022 \
                or st.st_size > CACHE_MAX:
            return None
        raw = os.read(fd, CACHE_MAX + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("data"), dict):
        return None
    return doc["data"]


def _keep(path: Path, key: list, st: os.stat_result, data: dict) -> None:
    """Cache ``data`` for ``path`` (best effort: a directory not ours or read-only, a full
    disk: no cache, nothing said)."""
    import json
    import time

    now = time.time_ns()
    if now - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_S * 1e9:
        return
    try:
        text = json.dumps({"key": key, "data": data}, allow_nan=False)
        if json.loads(text)["data"] != data:
            return
    except (TypeError, ValueError):  # dates, times, inf or nan: parsed each time
        return
    where = _cache_path(path)
    try:
        if os.stat(os.path.dirname(where) or ".").st_uid != os.geteuid():
            return  # someone else's directory: leave it as it is
        tmp = f"{where}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(tmp, where)
    except OSError:
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def register_root(path: Path) -> None:
    """Add ``path`` to the roots list the shell hooks read (atomically rewritten). The list
    is bytes, one root per line, as the hooks compare $PWD: any path a file name can be,
    except one with a newline (UsageError). The longest paths come first: the hooks take the
    first root that holds $PWD, which is then the nearest (a root inside another root)."""
    s = os.fsencode(path)
    if b"\n" in s:
        raise UsageError(f"{os.fsdecode(s)!r}: a jam root's path must not contain a newline "
                         "(the roots list holds one root per line)")
    f = roots_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    try:
        roots = [line for line in f.read_bytes().split(b"\n") if line]
    except FileNotFoundError:
        roots = []
    wanted = sorted(roots if s in roots else roots + [s], key=lambda r: len(r.rstrip(b"/")), reverse=True)
    if wanted == roots:
        return
    roots = wanted
    tmp = f.with_name(f".roots.{os.getpid()}")
    tmp.write_bytes(b"".join(r + b"\n" for r in roots))
    os.replace(tmp, f)


def check_filesystem(path: Path) -> None:
    """Refuse a filesystem where stubs cannot work: user xattrs and sparse files are required."""
    probe = path / f".jam-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot write in {path}: {exc.strerror}") from None
    try:
        try:
            setxattr(fd, "user.jam.probe", b"1")
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, getattr(errno, "ENOATTR", errno.ENODATA)):
                raise UsageError(
                    f"{path}: this filesystem does not support user extended attributes; "
                    "jam needs them for stubs (ext4, xfs, btrfs do)"
                ) from None
            raise UsageError(f"{path}: cannot set extended attributes: {exc.strerror}") from None
        os.ftruncate(fd, 1 << 20)
        os.fsync(fd)
        if os.fstat(fd).st_blocks * 512 >= 1 << 20:
            raise UsageError(f"{path}: this filesystem does not support sparse files; jam needs them for stubs")
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


# -- roots and remotes never overlap (invariant 10) -----------------------------------------
# A remote inside a root would be scanned and stashed into itself; a root inside a remote
# would have its files taken for objects. Paths are compared resolved (realpath) and by the
# (st_dev, st_ino) of every existing directory on the way up, so neither a symlink nor a bind
# mount can hide an overlap.

def _ids_up(path: str) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of ``path`` (if it exists) and of each of its existing ancestors."""
    out = []
    p = os.path.realpath(path)
    while True:
        try:
            st = os.stat(p)
        except OSError:
            pass
        else:
            out.append((st.st_dev, st.st_ino))
        parent = os.path.dirname(p)
        if parent == p:
            return out
        p = parent


def _id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def overlap(a: str | os.PathLike, b: str | os.PathLike) -> str | None:
    """How ``a`` and ``b`` overlap: ``"same"``, ``"contains"`` (a contains b), ``"inside"``
    (a is inside b), or None when they are apart."""
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    if ra == rb:
        return "same"
    if rb.startswith(ra.rstrip(os.sep) + os.sep):
        return "contains"
    if ra.startswith(rb.rstrip(os.sep) + os.sep):
        return "inside"
    ia, ib = _id(ra), _id(rb)
    if ia is not None and ia == ib:
        return "same"
    if ia is not None and ia in _ids_up(rb):
        return "contains"
    if ib is not None and ib in _ids_up(ra):
        return "inside"
    return None


def registered_roots() -> list[Path]:
    """The roots of the roots list (unreadable list: none)."""
    try:
        text = roots_file().read_text(errors="surrogateescape")
    except OSError:
        return []
    return [Path(line) for line in text.split("\n")
            if line.startswith("/") and os.path.isfile(os.path.join(line, JAM_DIR, CONFIG))]


def dir_remotes_of(root: Path) -> list[tuple[str, str]]:
    """(name, location) of every ``dir`` remote in ``root``'s own config; a root whose config
    is gone or unreadable has none (it cannot be stashed into anything)."""
    return _dir_remotes_in(root / JAM_DIR / CONFIG)


def _dir_remotes_in(config_path: Path) -> list[tuple[str, str]]:
    """(name, location) of every ``dir`` remote a config file names; none if it is unreadable."""
    try:
        config = _read_toml(config_path) or {}
    except (OSError, UsageError):
        return []
    out = []
    remotes = config.get("remote")
    for name, table in (remotes.items() if isinstance(remotes, dict) else ()):
        if isinstance(table, dict) and table.get("kind") == "dir" and isinstance(table.get("location"), str) \
                and table["location"].startswith("/"):
            out.append((str(name), table["location"]))
    return out


def check_root_overlaps(path: Path, default_remote: bool = True) -> None:
    """Refuse (UsageError) a new root at ``path`` that overlaps jam's default remote or any
    ``dir`` remote of a registered root."""
    if default_remote:
        loc = default_remote_location()
        how = overlap(path, loc)
        if how is not None:
            where = {"same": "is", "contains": "contains", "inside": "is inside"}[how]
            raise UsageError(
                f"{path} {where} jam's default remote {loc}; a root and a remote must not overlap "
                "(pick a smaller root, or set XDG_DATA_HOME outside it)"
            )
    for other in registered_roots():
        for name, loc in dir_remotes_of(other):
            how = overlap(path, loc)
            if how is not None:
                where = {"same": "is", "contains": "contains", "inside": "is inside"}[how]
                raise UsageError(
                    f"{path} {where} the remote {name!r} ({loc}) of the jam root {other}; "
                    "a root and a remote must not overlap"
                )
    user = user_config_dir() / CONFIG  # its remotes are every root's
    for name, loc in _dir_remotes_in(user):
        how = overlap(path, loc)
        if how is not None:
            where = {"same": "is", "contains": "contains", "inside": "is inside"}[how]
            raise UsageError(f"{path} {where} the remote {name!r} ({loc}) of your user config ({user}); "
                             "a root and a remote must not overlap")


def check_remote_overlaps(location: str, root: Path) -> None:
    """Refuse (UsageError) a ``dir`` remote at ``location`` that is, is inside or contains
    ``root`` or any registered root."""
    roots = [root] + [r for r in registered_roots() if r != root]
    for r in roots:
        how = overlap(location, r)
        if how is None:
            continue
        what = "this jam root" if r == root else "the jam root"
        where = {"same": "is", "contains": "contains", "inside": "is inside"}[how]
        raise UsageError(f"remote location {location} {where} {what} {r}; "
                         "a root and a remote must not overlap (put the remote outside every root)")
