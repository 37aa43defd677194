"""Roots: finding one, creating one, its config and its lock."""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from jam_core.errors import UsageError
from jam_core.model import Remote
from jam_core.units import human, parse_size  # noqa: F401  (re-exported)

JAM_DIR = ".jam"
CONFIG = "config.toml"
CATALOG = "catalog.db"
LOCK = "lock"

DEFAULT_REMOTE = "default"
DEFAULT_MIN_SIZE = 64 * 1024

def user_data_dir() -> Path:
    """``$XDG_DATA_HOME/jam`` (platformdirs): the embedded default remote and the roots list."""
    import platformdirs

    return Path(platformdirs.user_data_dir("jam", appauthor=False))


def user_config_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("jam", appauthor=False))


def roots_file() -> Path:
    """A plain list of roots, one per line, that the shell hooks read without starting Python."""
    return user_data_dir() / "roots"


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
    def init(cls, path: str | os.PathLike, register: bool = True) -> tuple["Root", bool]:
        """Make ``path`` a root. Returns (root, created). Refuses filesystems without xattrs/holes."""
        p = abspath(path)
        if not p.is_dir():
            raise UsageError(f"{p} is not a directory")
        existing = find_root(p)
        if existing == p:
            return cls(p), False
        if existing is not None:
            raise UsageError(f"{p} is already inside the jam root {existing}")
        check_filesystem(p)
        jd = p / JAM_DIR
        jd.mkdir(exist_ok=True)
        (jd / "tmp").mkdir(exist_ok=True)
        (jd / "visits").mkdir(exist_ok=True)  # the cd hooks' visit marks (jam_core.visitmarks)
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
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def write_config(self, config: dict) -> None:
        import tomli_w

        data = tomli_w.dumps(config).encode()
        tmp = self.config_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.config_path)
        self._config = config

    @property
    def min_size(self) -> int:
        return parse_size(self.config.get("core", {}).get("min_size", DEFAULT_MIN_SIZE), "core.min_size")

    def remotes(self) -> list[Remote]:
        out = []
        for name, table in sorted(self.config.get("remote", {}).items()):
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
        fd = os.open(self.jam_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise UsageError(f"another jam process is working on {self.path}") from None
                if sys.stderr.isatty():
                    print(f"jam: waiting for another jam process working on {self.path}...", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock


def load_config(path: Path) -> dict:
    """The root's TOML config over the user's defaults (``$XDG_CONFIG_HOME/jam/config.toml``)."""
    merged: dict = {}
    user = user_config_dir() / CONFIG
    for p in (user, path):
        try:
            with open(p, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            continue
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{p}: not valid TOML: {exc}") from None
        _merge(merged, data)
    return merged


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def register_root(path: Path) -> None:
    """Add ``path`` to the roots list the shell hooks read (atomically rewritten)."""
    f = roots_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    try:
        roots = [line for line in f.read_text().splitlines() if line]
    except FileNotFoundError:
        roots = []
    s = str(path)
    if s in roots:
        return
    roots.append(s)
    tmp = f.with_name(f".roots.{os.getpid()}")
    tmp.write_text("".join(r + "\n" for r in roots))
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
            os.setxattr(fd, "user.jam.probe", b"1")
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
