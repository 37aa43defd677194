"""The hooks of jam. Plugins implement them with ``@jam_core.hookimpl``.

Hooks are called with keyword arguments; arguments may be added later, never renamed, so an
implementation names only the ones it needs. The data path is one straight line:

    stash:    select -> place -> stash (per chosen remote) -> verify -> swap file for stub
    checkout: fetch (first remote that answers) -> verify -> swap stub for file

Backend hooks (``stash``, ``fetch``, ``has``, ``hash_object``, ``list_objects``, ``check_remote``) must return
``None`` for a remote whose ``kind`` they do not handle, so the backend of that kind answers.
"""

from __future__ import annotations

import pluggy

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: the cd hook's fetch loads no policy records, pathlib or typing here
    from pathlib import Path
    from typing import Any, Iterable, Mapping, Sequence

    from jam_core.model import FileRecord, Nomination, Remote, Session

hookspec = pluggy.HookspecMarker("jam")


@hookspec
def select(
    root: Path,
    records: Sequence[FileRecord],
    purpose: str,
    anchors: Sequence[str],
    config: Mapping[str, Any],
    local_bytes: int,
) -> list[Nomination] | None:
    """Nominate files, each with a reason. Every policy is asked; the core merges the answers.

    Called by ``jam stash --auto`` (purpose ``"stash"``) and ``jam checkout --related``
    (purpose ``"fetch"``).

    :param root: the root being worked on.
    :param records: every candidate file, read once by a scan; paths are relative to root.
    :param purpose: ``"stash"`` (choose what leaves) or ``"fetch"`` (choose what comes back).
    :param anchors: for ``"fetch"``, the paths the user asked for; empty for ``"stash"``.
    :param config: the root's whole configuration (a policy reads its own ``policy.NAME`` table).
    :param local_bytes: the bytes on this disk of every file of the root that is not a stub (a
        sparse file by its blocks, a hard-linked file once), including those not offered in
        ``records`` (pinned, ignored, small): what a size budget measures.
    :return: nominations (or ``None`` for none). The core drops pinned, ignored, hard-linked
        and dirty files whatever a policy says.
    """


@hookspec(firstresult=True)
def place(root: Path, oid: str, size: int, remotes: Sequence[Remote], copies: int,
          free: Mapping[str, int | None]) -> list[Remote] | None:
    """Choose the remotes that must hold an object before its file may become a stub.

    Called once per object during a stash. First non-None answer wins; the core's default
    comes last: ``copies`` distinct remotes that are not caches, nearest tier first, the
    remotes of one tier taken as one pool (most free space first, ties by name); then every
    cache remote (``[remote.NAME] cache = "7d"``).

    :param root: the root being worked on.
    :param oid: the content id (``b3:<hex>``).
    :param size: the content's size in bytes.
    :param remotes: the root's configured remotes.
    :param copies: ``[place] copies`` (default 1): how many distinct remotes must hold it.
    :param free: bytes free per remote name as the command saw them (less what this command
        placed there since), ``None`` where unknown; only filled for tiers with several remotes.
    :return: the remotes to store on, in order. All but the caches must succeed for the stub to
        be made; a cache that fails is skipped.
    """


@hookspec(firstresult=True)
def stash(remote: Remote, oid: str, source: Path, size: int, session: Session) -> bool | None:
    """Store the content of ``source`` on ``remote`` as object ``oid``.

    Called per chosen remote. First non-None answer wins: the backend of ``remote.kind``.
    The backend writes under a temporary name, makes it durable, renames it into place and
    verifies it against ``oid`` (content that does not hash to ``oid`` must raise
    :class:`jam_core.errors.IntegrityError` and leave no object under its final name).
    An object that is already present and valid may be kept as it is.

    :param remote: where to store.
    :param oid: the content id the stored bytes must hash to.
    :param source: the local file to read. The core passes ``/proc/self/fd/N`` of the file it
        hashed and holds open, so that a name swapped meanwhile cannot redirect the read: open
        it as a path (following it, no ``O_NOFOLLOW``), and use it only for reading.
    :param size: the expected size of ``source``.
    :param session: per-command state (connections, progress). Where the remote shares the
        file's filesystem, a backend may make the file itself the object by a hard link
        instead of a copy, through ``session.adopt(source, link, settle)`` only (it links
        only while the core's lease keeps every writer out; see ``Session.adopt``). What a
        command killed meanwhile leaves linked is the backend's to undo (``recover``).
    :return: ``True`` once stored and verified; raise :class:`jam_core.errors.RemoteError`
        on failure.
    """


@hookspec(firstresult=True)
def recover(remote: Remote, session: Session) -> bool | None:
    """Optional: undo what a killed command left half done on ``remote``, now.

    Called by ``stash`` once per command and remote, before it looks at any file (keep it cheap:
    a remote with nothing to undo should cost one listing, no connection if none is open yet
    is better still). A stash killed after its backend adopted a file (``Session.adopt``)
    leaves the file's inode linked as an object (the file then looks hard-linked, and is left
    alone): the backend gives every such object an inode of its own (a verified copy), or
    removes it where the file changed since, and removes its stale uploads. A backend also does
    this on its own before its first upload of a command.

    :param remote: a configured remote (answer ``None`` for other kinds).
    :param session: per-command state.
    :return: ``True`` when done.
    """


@hookspec(firstresult=True)
def stash_ahead(remote: Remote, source: Path, size: int, session: Session) -> bool | None:
    """Optional: start copying a large file to ``remote`` while the core still hashes it.

    Called by ``stash`` for a file of at least 64 MiB, before its id is known, where the
    remotes ``place`` will choose cannot depend on the id (only the core's placement, one
    copy, no pool, no cache). A backend may start a copy of ``source`` to a temporary name
    of its own (in the background: this call must return at once) and, when ``stash`` comes
    for the same file with its id, move it into place only if the bytes it holds hash to that
    id (verified as ``stash`` verifies any copy). A backend that does nothing here answers
    ``False`` or does not implement it; what it started and ``stash`` never used must be
    removed when the session closes (``session.on_close``). Nothing may become visible as an
    object before ``stash`` verified it.

    :param remote: a remote ``place`` will choose for this file.
    :param source: as for ``stash``: ``/proc/self/fd/N`` of the open, leased file.
    :param size: the file's size.
    :param session: per-command state (``cache`` and ``on_close`` for the copy started).
    :return: ``True`` if a copy was started.
    """


@hookspec(firstresult=True)
def stash_many(
    remote: Remote, items: Sequence[tuple[str, Path, int]], session: Session
) -> Iterable[tuple[str, Exception | None]] | None:
    """Store several objects on ``remote`` at once (a backend that can pipeline or parallelise).

    Called by a stash with each batch of files placed on ``remote``, instead of one ``stash``
    call per file. First non-None answer wins; ``None`` (the default) makes the core call
    ``stash`` per item. The same contract as ``stash`` holds for each object.

    :param remote: where to store.
    :param items: ``(oid, source, size)`` triples, each oid once (``source`` as for ``stash``).
    :param session: per-command state (connections, progress).
    :return: an iterable of ``(oid, error)`` pairs, one per item, in any order, produced as each
        object is stored and verified: ``error`` is ``None`` on success, else the exception for
        that item (:class:`jam_core.errors.IntegrityError` if the source changed). Raise
        :class:`jam_core.errors.RemoteError` if the remote as a whole fails.
    """


@hookspec(firstresult=True)
def sync(remote: Remote, session: Session) -> bool | None:
    """Make every object stored on ``remote`` during ``session`` durable.

    Called after a batch of ``stash`` calls and before any of their files becomes a stub, so a
    backend may defer durability (one ``syncfs`` instead of an fsync per object). A backend
    whose ``stash`` already makes each object durable need not implement it. First non-None
    answer wins; raise :class:`jam_core.errors.RemoteError` on failure.
    """


@hookspec(firstresult=True)
def fetch(remote: Remote, oid: str, dest: Path, size: int, session: Session) -> bool | None:
    """Write object ``oid`` from ``remote`` into the new local file ``dest``.

    Called per remote, nearest tier first, until one succeeds. First non-None answer wins.
    ``dest`` is a temporary file beside the stub; the core verifies its hash and only then
    renames it over the stub.

    :param remote: where to read from.
    :param oid: the content id.
    :param dest: the temporary file to write (it exists and is empty). The core passes
        ``/proc/self/fd/N`` of the file it created beside the stub and holds open: open it as a
        path (following it, no ``O_NOFOLLOW``, no ``O_CREAT``), and write at most ``size`` bytes.
    :param size: the expected size.
    :param session: per-command state (connections, progress).
    :return: ``True`` once written; ``False`` if the remote does not have the object; raise
        :class:`jam_core.errors.RemoteError` when the remote cannot be reached.
    """


@hookspec(firstresult=True)
def fetch_many(
    remote: Remote, items: Sequence[tuple[str, Path, int]], session: Session
) -> Iterable[tuple[str, bool | Exception]] | None:
    """Write several objects from ``remote`` into new local files at once.

    Called by a checkout with each batch of stubs whose next remote is ``remote``, instead
    of one ``fetch`` call per file. First non-None answer wins; ``None`` (the default) makes
    the core call ``fetch`` per item. The same contract as ``fetch`` holds for each object;
    the core verifies every file.

    :param remote: where to read from.
    :param items: ``(oid, dest, size)`` triples, each oid once; each ``dest`` exists, empty
        (``dest`` as for ``fetch``).
    :param session: per-command state (connections, progress).
    :return: an iterable of ``(oid, outcome)`` pairs, one per item, in any order: ``True``
        (written), ``False`` (the remote does not have it) or the exception for that item.
        Raise :class:`jam_core.errors.RemoteError` if the remote as a whole fails.
    """


@hookspec(firstresult=True)
def has(remote: Remote, oid: str, size: int, session: Session) -> bool | None:
    """Say whether ``remote`` holds object ``oid`` with the expected size (a cheap check).

    Called by ``jam doctor``. First non-None answer wins.

    :param remote: where to look.
    :param oid: the content id.
    :param size: the size the object must have.
    :param session: per-command state (connections).
    :return: ``True`` or ``False``; raise :class:`jam_core.errors.RemoteError` if unreachable.
    """


@hookspec(firstresult=True)
def hash_object(remote: Remote, oid: str, size: int, session: Session) -> str | bool | None:
    """Hash object ``oid`` where ``remote`` keeps it, reading it once and copying it nowhere.

    Called by ``jam doctor --deep`` per copy it reads back. Optional: a backend that can read
    its objects in place (a local directory) implements it; ``None`` (the default, and any
    backend without it) makes the core ``fetch`` the object into a nameless local file and
    hash that. First non-None answer wins: the backend of ``remote.kind``.

    :param remote: where the object is.
    :param oid: the content id; hash with its algorithm (``jam_core.hash_fd(fd, algorithm)``
        reads it in cache-sized pieces, the fastest way measured).
    :param size: the size the object must have.
    :param session: per-command state (connections, ``session.progress`` for the bytes read).
    :return: the id the stored bytes hash to (equal to ``oid`` when the copy is intact);
        ``False`` if the remote does not hold the object. Raise
        :class:`jam_core.errors.IntegrityError` if it holds it with another size than ``size``
        (nothing is read), :class:`jam_core.errors.RemoteError` if the remote cannot be reached.
        Never follow a symlink or read a FIFO or device in the object's place.
    """


@hookspec(firstresult=True)
def list_objects(remote: Remote, session: Session, sweep: bool) -> Iterable[tuple[str, int]] | None:
    """List what ``remote`` holds in one pass: every object with its size, and the stale
    leftovers of killed uploads. No request per object.

    Called by ``jam doctor``, once per remote and command, instead of one ``has`` per stub
    (a root of 100,000 stubs costs one listing, not 100,000 round trips). First non-None
    answer wins: the backend of ``remote.kind``; ``None`` (a backend without it) makes the
    core fall back on ``has`` per object, and report no leftovers or unused objects.

    :param remote: the remote to list.
    :param session: per-command state (a connection made here may be reused).
    :param sweep: also remove the stale uploads (as the backend does before its first store).
    :return: an iterable of ``(name, size)`` pairs: ``(oid, size)`` for each regular file
        under ``objects/`` at the place ``object_relpath(oid)`` gives (anything else there,
        a symlink, a directory, a name that is not an id, is left out); and
        ``("tmp/NAME", size)`` for each regular file in ``tmp/`` that is provably a stale
        upload of a jam (``part_is_stale``; never anything else in ``tmp/``). With ``sweep``
        such a part is removed and listed only once it was. Raise
        :class:`jam_core.errors.RemoteError` if the remote cannot be reached or listed
        (also while the iterable is consumed).
    """


@hookspec(firstresult=True)
def parse_url(url: str) -> dict[str, Any] | None:
    """Turn a remote URL into ``{"kind": ..., "location": ...}``; the kind's plugin answers.

    Called by ``jam remote add``. First non-None answer wins; ``None`` from every plugin means
    no installed plugin handles that URL. Raise :class:`jam_core.errors.UsageError` for a URL
    of your scheme that is malformed.

    :param url: what the user typed: a path, ``file:///path``, ``sftp://host/path``...
    """


@hookspec(firstresult=True)
def check_remote(remote: Remote, session: Session, create: bool) -> str | None:
    """Check that ``remote`` is reachable and writable; return a one-line description.

    Called by ``jam remote add`` (``create=True``: the backend may create its object layout
    inside an existing location) and by ``jam doctor`` (``create=False``). A location that has
    disappeared is an error, never silently re-created. First non-None answer wins.

    :param remote: the remote to check.
    :param session: per-command state (a connection made here may be reused).
    :param create: whether the backend may create its layout (``objects/``, ``tmp/``).
    :return: a description such as ``"directory /mnt/usb/jam, 120.3 GB free"``; raise
        :class:`jam_core.errors.RemoteError` if the remote is unusable.
    """


@hookspec(firstresult=True)
def remote_id(remote: Remote, session: Session, create: bool) -> str | None:
    """Read the identity marker at the top of ``remote``'s location (``objects.MARKER_NAME``).

    Called once per command and remote before anything is stored on or fetched from it, and
    by ``jam remote add`` (``create=True``). The core compares the id with the one recorded in
    the root's config, so an empty mount point or another directory is never taken for the
    remote. First non-None answer wins; the backend of ``remote.kind`` answers.

    :param remote: the remote to identify.
    :param session: per-command state (a connection made here may be reused).
    :param create: write a new marker (``objects.marker_bytes(objects.new_remote_id())``,
        atomically, never over an existing one) when there is none, and return its id.
    :return: the marker's id; ``""`` when there is no marker (and ``create`` is False). Raise
        :class:`jam_core.errors.RemoteError` if the location is unreachable or the marker is
        not a jam marker.
    """


@hookspec(firstresult=True)
def remove(remote: Remote, oid: str, session: Session) -> bool | None:
    """Delete object ``oid`` from ``remote``.

    Called only by the core's removal paths (``jam drop``, ``jam move``, ``jam gc``, edge
    expiry), each of which has first checked, under the root's lock and against the remotes
    themselves, that enough verified copies remain for every root that refers to the object.
    A backend never decides to remove on its own. First non-None answer wins.

    :param remote: where to remove from.
    :param oid: the content id.
    :param session: per-command state (connections).
    :return: ``True`` once removed (and the removal durable), ``False`` if it was not there.
        Raise :class:`jam_core.errors.RemoteError` if the remote cannot be reached.
    """


@hookspec(firstresult=True)
def write_meta(remote: Remote, name: str, data: bytes, session: Session) -> bool | None:
    """Atomically replace the small metadata file ``meta/NAME`` on ``remote`` with ``data``
    (temporary name, durable, then renamed over: a reader sees the old or the new content).

    Called by the core to record, on every remote a root uses, which objects that root refers
    to (``refs/<root id>``, after every stash, checkout, copy, drop and gc) and which it is about
    to remove (``removing/<root id>``), so that ``drop`` and ``gc`` run from any root never remove what
    another root still needs. ``name`` is ``[a-z0-9._-]`` segments joined by ``/``.
    First non-None answer wins.

    :param remote: where to write.
    :param name: the name under ``meta/``.
    :param data: the whole new content.
    :param session: per-command state (connections).
    :return: ``True``; raise :class:`jam_core.errors.RemoteError` on failure.
    """


@hookspec(firstresult=True)
def read_meta(remote: Remote, name: str, session: Session) -> bytes | bool | None:
    """Read ``meta/NAME`` from ``remote`` (at most 64 MiB).

    Called by the removal paths (drop, move, gc, edge expiry) to learn what every root that
    uses the remote refers to, right before they remove anything.

    :param remote: where to read.
    :param name: the name under ``meta/``.
    :param session: per-command state (connections).
    :return: its bytes, or ``False`` if it does not exist. Raise
        :class:`jam_core.errors.RemoteError` if the remote cannot be reached: "unknown" is never
        answered as "absent".
    """


@hookspec(firstresult=True)
def list_meta(remote: Remote, prefix: str, session: Session) -> list[str] | None:
    """The names of the metadata files under ``meta/PREFIX`` on ``remote`` (e.g. every root's
    ``refs/`` file), relative to ``meta/``.

    Called by the removal paths before ``read_meta``; every entry directly under
    ``meta/PREFIX`` whose name jam could have written is listed, whatever it is (a symlink, a
    directory, a FIFO there: ``read_meta`` then refuses it, and no removal goes on as if that
    root's refs were absent); the listing never goes through a symlinked ``meta/PREFIX``.

    :param remote: where to list.
    :param prefix: a directory under ``meta/`` (``refs``, ``removing``).
    :param session: per-command state (connections).
    :return: a list of names; raise :class:`jam_core.errors.RemoteError` if unreachable.
    """


@hookspec(firstresult=True)
def free_space(remote: Remote, session: Session) -> int | None:
    """Bytes free on ``remote`` (for pools: several remotes of one tier filled by free space).

    Called once per command and remote by a stash, for the tiers that hold several remotes;
    the answers go to ``place`` as ``free``.

    :param remote: the remote to measure.
    :param session: per-command state (connections).
    :return: a number of bytes, or ``None`` when the backend cannot tell (it is then ranked
        last in its pool). Raise :class:`jam_core.errors.RemoteError` if unreachable.
    """
