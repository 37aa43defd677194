"""Plain records passed between the core and plugins.

``FileRecord`` and ``Nomination`` (what policies read and answer) are built on first use
(PEP 562 ``__getattr__``): the cd hook's fetch needs ``Remote`` and ``Session`` alone, and each
dataclass decoration costs it ~5 M instructions. ``from jam_core.model import FileRecord``,
``jam_core.model.FileRecord`` and pickling find them as ever (one class, built once)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields

from jam_core.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable


def _set_by_slot(cls):
    """A frozen, slotted dataclass whose ``__init__`` sets each slot through its descriptor
    instead of ``object.__setattr__`` (the frozen dataclass's way: half the cost of building a
    record, and a dry-run builds one per file). The same signature, fields, equality, hash and
    immutability (``__setattr__`` still raises FrozenInstanceError): one way to build them, for
    the core and for plugins. Left as it is if it is not such a class."""
    fs = fields(cls)
    if tuple(f.name for f in fs) != tuple(getattr(cls, "__slots__", ())) or \
            any(f.default_factory is not MISSING or not f.init for f in fs) or hasattr(cls, "__post_init__"):
        return cls
    env = {f"_set_{f.name}": getattr(cls, f.name).__set__ for f in fs}
    env.update({f"_default_{f.name}": f.default for f in fs if f.default is not MISSING})
    params = ", ".join(f.name if f.default is MISSING else f"{f.name}=_default_{f.name}" for f in fs)
    body = "".join(f"    _set_{f.name}(self, {f.name})\n" for f in fs)
    ns: dict = {}
    exec(f"def __init__(self, {params}):\n{body}", env, ns)  # noqa: S102 (built from field names only)
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__annotations__ = dict(cls.__init__.__annotations__)
    cls.__init__ = init
    return cls


@dataclass(frozen=True)
class Remote:
    """A named place for objects.

    ``kind`` picks the backend (``dir``, ``sftp``...), ``location`` is what that backend needs
    to find it (a directory for ``dir``, the URL for ``sftp``), ``tier`` orders remotes
    (0 = nearest). ``options`` holds the rest of the remote's config table.
    """

    name: str
    kind: str
    url: str
    location: str
    tier: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)


class Session:
    """State that lives for one command: backends keep connections here.

    ``cache`` is a dict a backend may use (keyed by something of its own, e.g. the remote
    name); ``on_close`` registers cleanup that runs when the command ends. Backends call
    ``progress(nbytes)`` as content moves; the core calls ``begin(total)`` once it knows how
    many bytes a command will move and ``file_done(size)`` after each file, so the display is
    right even for a backend that reports nothing (or an object that was already there).

    ``adopt`` lets a backend make a file being stashed its object by a hard link, where the
    stash allows it (``adoption``: the stash's leases, see ``jam_core.fs.Leases.adopt``).
    """

    def __init__(self, progress: Callable[[int], None] | None = None,
                 total: Callable[[int], None] | None = None):
        self.cache: dict[Any, Any] = {}
        self._on_progress = progress
        self._on_total = total
        self.moved = 0
        self._done = 0
        self._lock = threading.RLock()
        self._closers: list[Callable[[], None]] = []
        self.adoption = None  # set by stash while it holds leases (fs.Leases); None: no adoption

    def adopt(self, source, link: Callable[[], bool], settle: Callable[[bool], None]) -> bool:
        """For a backend's ``stash``: make ``source`` (the ``/proc/self/fd/N`` the core passed)
        the object itself. True if the file may be (leased, no other name, the caller's own):
        the backend answers stored. The core calls ``link()`` later, once the batch's stubs are
        durable and just before its swaps, only while the file is still unchanged: it links the
        file into place and answers True, or False where a verified object is there already (no
        link), or raises OSError (the file then stays local). ``settle(kept)`` runs once after a
        link, before the lease goes: ``kept`` if the file became a stub (seal the object), else
        the object must stop sharing the file's inode (a writer waits for that)."""
        gate = self.adoption
        return gate is not None and gate.adopt(source, link, settle)

    def progress(self, n: int) -> None:
        """Count ``n`` bytes moved; safe to call from a backend's transfer threads."""
        with self._lock:
            self.moved += n
            if self._on_progress is not None:
                self._on_progress(n)

    def begin(self, total: int) -> None:
        if self._on_total is not None:
            self._on_total(total)

    def file_done(self, size: int) -> None:
        with self._lock:
            self._done += size
            if self.moved < self._done:
                self.progress(self._done - self.moved)

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        while self._closers:
            fn = self._closers.pop()
            try:
                fn()
            except Exception:  # cleanup must not hide the command's own result
                pass

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_POLICY_RECORDS = ("FileRecord", "Nomination")


def __getattr__(name: str):
    if name in _POLICY_RECORDS:
        _build_policy_records()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_POLICY_RECORDS})


_BUILD_LOCK = threading.Lock()


def _build_policy_records() -> None:
    """Define FileRecord and Nomination (once, whichever thread asks first) as this module's
    own classes."""
    with _BUILD_LOCK:
        if "FileRecord" not in globals():
            _define_policy_records()


def _define_policy_records() -> None:

    @_set_by_slot
    @dataclass(frozen=True, slots=True)
    class FileRecord:
        """What a policy sees of one file: no I/O needed to decide.

        ``path`` is relative to the root (``str``, undecodable bytes kept as surrogate escapes),
        ``last_used`` is the newest of atime, mtime and jam's own record of use (epoch seconds),
        ``state`` is ``local``, ``stub`` or ``dirty``.
        """

        path: str
        size: int
        mtime: float
        atime: float
        last_used: float
        state: str = "local"
        pinned: bool = False
        nlink: int = 1

    @_set_by_slot
    @dataclass(frozen=True, slots=True)
    class Nomination:
        """A policy's choice of one file, with the reason a person can read."""

        path: str
        policy: str
        reason: str

    for cls in (FileRecord, Nomination):  # as if defined at the top level (repr, pickle)
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        cls.__init__.__qualname__ = f"{cls.__name__}.__init__"
    globals().update(FileRecord=FileRecord, Nomination=Nomination)


# -- what a policy plugin reads --------------------------------------------------------------------
STASH, FETCH = "stash", "fetch"  # the ``purpose`` of a ``select`` call


def policy_table(config: Mapping[str, Any], name: str, known: Iterable[str]) -> dict | None:
    """The ``[policy.NAME]`` table, or None when absent. Unknown keys are a usage error."""
    policy = config.get("policy")
    if not isinstance(policy, Mapping) or name not in policy:
        return None
    table = policy[name]
    if not isinstance(table, Mapping):
        raise UsageError(f"policy.{name}: expected a table ([policy.{name}]), got {table!r}")
    known = tuple(known)
    for key in table:
        if key not in known:
            raise UsageError(f"policy.{name}: unknown setting {key!r} (known: {', '.join(known)})")
    return dict(table)
