"""What jam does on one rclone remote, through the command's ``rclone rcd`` (daemon.py).

Layout, as for the other backends, under the remote's location (an rclone fs string such as
``seaweed:bucket/jam`` or ``:s3,provider=Minio,endpoint=...:bucket/jam``): ``objects/b3/ab/<hex>``,
``tmp/<part_name()>``, ``meta/...`` and the identity marker ``jam-remote.json``.

**Uploads.** The bytes are streamed by jam itself to ``operations/uploadfile`` (one HTTP request,
the file sent as the body), never handed to rclone as a path: the core gives ``/proc/self/fd/N``,
which is jam's and not rclone's (and rclone's local backend would take it for a symlink). What is
sent is hashed as it is sent; the last chunk is held back until the whole content has been hashed,
and if it does not hash to the id the connection is cut before that chunk: rclone then sees a
truncated body and commits nothing (a multipart upload never completed, a partial file removed).
So a partial or wrong object is never committed under its id. rclone (``Rcat``) then compares
the size and the backend's hash of what it received with the object it stored, and removes a
mismatch ("corrupted on transfer": the upload fails). Objects of ``STAT_MIN`` or more (and every
object with the remote option ``verify = "stat"``) are also stat'ed by jam: the size must be the
size sent and, with ``verify = "stat"``, the MD5 the backend reports (where it reports one) the MD5
of what jam sent; else the object is deleted and the store fails.

Where it goes: object stores (S3 and compatibles, GCS, B2, Azure) have no rename, and their server
side "move" is a full copy plus a delete (twice the work for a large object); a PUT there is atomic
(nothing is visible before the upload completes), so the object is uploaded to its final name.
Backends that can move on the server (``fsinfo`` Features.Move: local, sftp, WebDAV, Drive...) may
show a file while it is written, so the upload goes to ``tmp/<part_name()>`` and is moved into place
with ``operations/movefile`` (a rename there). An existing object is never trusted: it is uploaded
again over itself (one transfer, the same cost as reading it back; never a bad commit, see above).

**Absent is never a guess.** An object is "not there" only when rclone says so clearly (``stat``
answers no item, HTTP 404) *and* the remote's identity marker is still found in the same check: a
bucket that vanished or a server that lies with 404 is a RemoteError, not "absent" (the way
git-annex-remote-rclone lost data).

**Links and special files are never followed.** On a file system behind rclone (sftp, and any
backend that is not bucket-based, wrappers included) an entry may be a symlink, a FIFO or a
device; rclone's ``stat``, reads and deletes follow a symlink, and reading a FIFO hangs the
server. Listings show neither (the daemon sets ``skip_links``, daemon.py ``NO_LINKS``), so there
an item counts only when its directory's listing shows it as a regular file, and each directory
on its way only when its parent's listing shows it as a directory (``Store.stat``,
``Store.dir_state``; a directory checked once is trusted for the rest of the command). A name the
listing does not show but ``stat`` finds is a symlink or a special file: ``NotRegular`` (the
hooks answer "not an object of ours" for objects, an error for metadata and the marker); nothing
is listed, read, stored or removed through it. Object stores have no links: one ``stat`` there.

**Downloads** stream from the daemon's ``--rc-serve`` (``GET /[fs]/objects/...``): the length
announced must be the size the stub says, else nothing is written; never more than ``size``
bytes reach ``dest``, which is opened as a path (the core's ``/proc/self/fd/N``).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import time
import uuid
from datetime import datetime
from urllib.parse import quote, urlencode

from jam_core import (
    MARKER_NAME,
    IntegrityError,
    JamError,
    RemoteError,
    UsageError,
    hasher,
    part_is_stale,
    part_name,
    split_oid,
)
from jam_rclone.daemon import Daemon, Lost, RcError

CHUNK = 1 << 20
STAT_MIN = 1 << 20  # objects this large are also stat'ed after their upload (one request)
HOLD = 1 << 20  # > rclone's streaming cutoff (daemon.py sets it): see Store._upload
LARGE = 64 << 20  # objects this large are fetched by rclone's own copy (see Store._get_large)
META_MAX = 256 << 20  # refs of ~3.8 million objects (a million-file root writes ~68 MB)
_META_NAME = re.compile(r"\A[a-z0-9_-][a-z0-9._-]*(?:/[a-z0-9_-][a-z0-9._-]*)*\Z")
_PART = re.compile(r"\A(?:[0-9a-f]{32}|[A-Za-z0-9_-]{1,64}\.[0-9]{1,10}\.[0-9a-f]{16})\.part\Z")
_NOT_FOUND = ("directory not found", "object not found", "not found", "nosuchbucket", "no such file")
_FULL = ("no space left", "quotaexceeded", "quota exceeded", "insufficient storage", "entitytoolarge",
         "storage quota", "disk full", "not enough space")
_MODTIME = re.compile(r"\A(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?\Z")


class NotRegular(RemoteError):
    """A symlink, a FIFO or another special file where jam expects its file or directory."""


class _LocalFull(Exception):
    """ENOSPC/EDQUOT writing the local file of a fetch."""


class _Abort(Exception):
    """The upload was cut on purpose (the content did not hash to its id)."""


def valid_meta_name(name: str) -> bool:
    return isinstance(name, str) and len(name) <= 512 and _META_NAME.match(name) is not None


def _epoch(text: str) -> float | None:
    m = _MODTIME.match(text or "")
    if m is None:
        return None
    frac = (m.group(2) or "")[:7]
    try:
        return datetime.fromisoformat(m.group(1) + frac + (m.group(3) or "Z").replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Store:
    """One rclone remote, for one command: its features (asked once) and its requests."""

    def __init__(self, remote, daemon: Daemon):
        self.remote = remote
        self.d = daemon
        loc = remote.location  # with its '/': rclone then never asks whether the location is a file
        self.fs = loc if loc.endswith((":", "/")) else loc + "/"  # (a server down read as "is a file")
        self.where = f"remote {remote.name!r} (rclone:{remote.location})"
        self._info: dict | None = None
        self.swept = False
        self.real_dirs: set[str] = {""}  # directories seen in their parent's listing (see dir_state)
        options = remote.options or {}
        try:
            self.transfers = max(1, min(int(options.get("transfers", 8) or 8), 64))
        except (TypeError, ValueError):
            raise UsageError(f"{self.where}: option transfers must be a number") from None
        self.verify = options.get("verify", "rclone")
        if self.verify not in ("rclone", "stat"):
            raise UsageError(f"{self.where}: option verify must be \"rclone\" or \"stat\"")

    # -- errors ------------------------------------------------------------------------------

    def remote_error(self, what: str, exc: BaseException | str) -> RemoteError:
        reason = exc.message if isinstance(exc, RcError) else str(exc)
        reason = "".join(c if c.isprintable() else "?" for c in " ".join(reason.split())[:400]) or type(exc).__name__
        return RemoteError(f"{self.where}: cannot {what}: {reason}")

    def item_error(self, what: str, exc: BaseException) -> JamError:
        """A failure of one object (the remote full, an object too large) is that item's
        JamError; anything else fails the remote as a whole."""
        if isinstance(exc, RcError) and any(k in exc.message.lower() for k in _FULL):
            return JamError(f"{self.where}: cannot {what}: the remote is full ({' '.join(exc.message.split())[:200]})")
        return self.remote_error(what, exc)

    def rc(self, what: str, method: str, **params) -> dict:
        """An rc call; any failure is the remote's (RemoteError)."""
        try:
            return self.d.call(method, params)
        except (RcError, Lost) as exc:
            raise self.remote_error(what, exc) from None

    # -- features, presence ------------------------------------------------------------------

    def info(self) -> dict:
        if self._info is None:
            self._info = self.rc("reach it", "operations/fsinfo", fs=self.fs)
        return self._info

    def can_move(self) -> bool:
        return bool((self.info().get("Features") or {}).get("Move"))

    def has_md5(self) -> bool:
        return "md5" in (self.info().get("Hashes") or [])

    def links(self) -> bool:
        """True where entries may be symlinks or special files: every backend that is not
        bucket-based (sftp, ftp, smb, a local disk under a wrapper...). Object stores have none."""
        return not (self.info().get("Features") or {}).get("BucketBased")

    def _stat_any(self, rel: str, what: str, hashes: bool = False) -> dict | None:
        """rclone's own stat (it follows a symlink): the item, a file or a directory, or None."""
        opt = {"noMimeType": True}
        if hashes:
            opt.update(showHash=True, hashTypes=["md5"])
        item = self.rc(what, "operations/stat", fs=self.fs, remote=rel, opt=opt).get("item")
        if item is not None and not isinstance(item, dict):
            raise RemoteError(f"{self.where}: cannot {what}: rclone answered no item for {rel}")
        return item

    def _listed(self, rel: str, what: str) -> dict | None:
        """``rel`` as its directory's listing shows it (a file or a directory; never a symlink
        or a special file: the daemon's NO_LINKS), None if the listing does not show it."""
        parent, _, name = rel.rpartition("/")
        params = {"fs": self.fs, "remote": parent,
                  "opt": {"recurse": False, "noMimeType": True, "noModTime": True},
                  "_filter": {"IncludeRule": [f"/{rel}", f"/{rel}/**"]}}  # names are [A-Za-z0-9._-]
        for it in self._list_call(params, what) or []:
            if it.get("Path") == rel:
                return it
        return None

    def _list_call(self, params: dict, what: str) -> list[dict] | None:
        """rclone's ``operations/list``: its items; None when the directory does not exist."""
        try:
            out = self.d.call("operations/list", params)
        except RcError as exc:
            if "directory not found" in exc.message.lower():
                return None
            raise self.remote_error(what, exc) from None
        except Lost as exc:
            raise self.remote_error(what, exc) from None
        items = out.get("list")
        if not isinstance(items, list):
            raise RemoteError(f"{self.where}: cannot {what}: rclone answered no listing")
        return [i for i in items if isinstance(i, dict)]

    def _odd(self, rel: str, what: str, as_dir: bool) -> dict | None:
        """``rel`` is not in its directory's listing: absent (None), a symlink or a special file
        (NotRegular), or made meanwhile by another jam (a second listing shows it: that item).
        Where a file is expected (not ``as_dir``), a symlink to a directory is nothing either."""
        if self._stat_any(rel, what) is None and not (as_dir and self._is_dir_followed(rel, what)):
            return None  # nothing there (a dangling symlink is nothing either)
        again = self._listed(rel, what)
        if again is not None:
            return again
        raise NotRegular(f"{self.where}: {rel} is a symlink or a special file, not jam's; jam does not "
                         f"follow it (cannot {what})")

    def _is_dir_followed(self, rel: str, what: str) -> bool:
        """Whether rclone can list ``rel`` as a directory, following links (its stat answers
        nothing for a symlinked directory: it looks the name up in the parent's listing)."""
        params = {"fs": self.fs, "remote": rel, "opt": {"recurse": False, "noMimeType": True, "noModTime": True},
                  "_filter": {"ExcludeRule": ["*"]}}  # its content is not wanted
        try:
            self.d.call("operations/list", params)
        except RcError as exc:
            if "directory not found" in exc.message.lower() or "not a directory" in exc.message.lower():
                return False
            raise self.remote_error(what, exc) from None
        except Lost as exc:
            raise self.remote_error(what, exc) from None
        return True

    def dir_state(self, rel: str, what: str) -> bool | None:
        """True if the directory ``rel`` (and each one above it) is a real directory, None if it
        (or one above) is absent; NotRegular for a symlink or a special file on the way, a
        RemoteError for a file. Only where ``links()``; each directory is checked once."""
        if rel in self.real_dirs:
            return True
        parent = rel.rpartition("/")[0]
        if self.dir_state(parent, what) is None:
            return None
        item = self._listed(rel, what)
        if item is None:
            item = self._odd(rel, what, as_dir=True)
            if item is None:
                return None
        if not item.get("IsDir"):
            raise RemoteError(f"{self.where}: {rel} is a file, not a directory (cannot {what})")
        self.real_dirs.add(rel)
        return True

    def stat(self, rel: str, what: str, hashes: bool = False) -> dict | None:
        """The regular file at ``rel``; None only when rclone clearly says there is none. Where
        ``links()``, only what the listings show (a symlink or a special file there, or on the
        way to it, is NotRegular; never followed)."""
        if self.links():
            if self.dir_state(rel.rpartition("/")[0], what) is None:
                return None
            item = self._listed(rel, what)
            if item is None:
                item = self._odd(rel, what, as_dir=False)
                if item is None:
                    return None
            if item.get("IsDir") or not isinstance(item.get("Size"), int):
                raise RemoteError(f"{self.where}: {rel} is not a file (cannot {what})")
            if not hashes:
                return item
        item = self._stat_any(rel, what, hashes)
        if item is None:
            return None
        if item.get("IsDir") or not isinstance(item.get("Size"), int):
            raise RemoteError(f"{self.where}: {rel} is not a file (cannot {what})")
        return item

    def confirm_absent(self, what: str) -> None:
        """Before answering "absent": the identity marker must still be there (a bucket or a
        directory that vanished, or a server down that answers 404, is not "absent")."""
        if self.stat(MARKER_NAME, what) is None:
            raise RemoteError(f"{self.where}: cannot {what}: its identity marker {MARKER_NAME} is gone "
                              "(bucket or directory removed or not mounted?); nothing was stored or fetched")

    def list(self, rel: str, what: str, recurse: bool, modtime: bool = False) -> list[dict] | None:
        """The files under ``rel``; None when rclone says the directory does not exist. Where
        ``links()``, ``rel`` and each directory above it must be real ones (a symlinked one is
        NotRegular, never listed through); below it, the listings skip links (NO_LINKS)."""
        if rel and self.links() and self.dir_state(rel, what) is None:
            return None
        opt = {"recurse": recurse, "filesOnly": True, "noMimeType": True, "noModTime": not modtime}
        return self._list_call({"fs": self.fs, "remote": rel, "opt": opt}, what)

    def check_location(self, what: str) -> None:
        """The location itself must exist (a bucket, a directory): never re-created."""
        if self.list("", what, recurse=False) is None:
            raise RemoteError(f"{self.where}: the location is missing (bucket or directory removed, "
                              "drive not mounted?); jam will not re-create it")

    # -- uploads -----------------------------------------------------------------------------

    def sweep(self) -> None:
        """Once per command, before the first store: remove the parts in ``tmp/`` that are
        provably stale uploads of jams (``part_is_stale``), nothing else."""
        if self.swept:
            return
        self.swept = True
        for _ in self.stale_parts(remove=True):
            pass

    def stale_parts(self, remove: bool):
        try:
            items = self.list("tmp", "list its tmp/", recurse=False, modtime=True) or []
        except NotRegular:
            return  # a symlinked tmp/: nothing in it is jam's to list or remove
        now = time.time()
        for it in items:
            name, size = it.get("Name"), it.get("Size")
            if it.get("Path") != f"tmp/{name}" or not isinstance(name, str) or not _PART.match(name):
                continue
            mtime = _epoch(it.get("ModTime", ""))
            if mtime is None or not part_is_stale(name, mtime, now):
                continue
            if remove:
                try:
                    self.d.call("operations/deletefile", {"fs": self.fs, "remote": f"tmp/{name}"})
                except (RcError, Lost):
                    continue  # gone meanwhile, or not ours to remove: not listed as removed
            yield name, size if isinstance(size, int) else 0

    def put(self, rel: str, src_fd: int, size: int, oid: str | None, progress) -> None:
        """Store ``size`` bytes read from ``src_fd`` (from offset 0) at ``rel``. With ``oid``,
        the bytes must hash to it or nothing is committed (IntegrityError)."""
        staged = f"tmp/{part_name()}" if self.can_move() else None
        md5 = hashlib.md5(usedforsecurity=False) if self.verify == "stat" and self.has_md5() else None
        target = staged or rel
        if staged is not None and self.links():
            # never an upload into, nor a move through, a symlinked directory (absent ones are
            # made by rclone as it stores)
            self.dir_state("tmp", f"store {rel}")
            self.dir_state(rel.rpartition("/")[0], f"store {rel}")
        try:
            self._upload(target, src_fd, size, oid, md5, progress)
            if staged is not None:
                # NoCheckDest: rclone would otherwise keep an existing object it finds "equal" by
                # size and time (a corrupt one) and drop the good upload
                self.rc(f"move {staged} into place", "operations/movefile", srcFs=self.fs, srcRemote=staged,
                        dstFs=self.fs, dstRemote=rel, _config={"NoCheckDest": True})
                staged = None
            if self.verify != "stat" and size < STAT_MIN:
                return  # rclone compared size and the backend's hash with what it received (Rcat)
            item = self.stat(rel, f"check {rel} after its upload", hashes=md5 is not None)
            got = (item or {}).get("Hashes", {}).get("md5") if item else None
            if item is None or item["Size"] != size or (md5 is not None and got and got != md5.hexdigest()):
                self._delete_quietly(rel)
                seen = "nothing" if item is None else f"{item['Size']} bytes" + (f", md5 {got}" if got else "")
                raise IntegrityError(f"{self.where}: {rel} does not hold what was sent ({seen} for {size} bytes); "
                                     "removed, not stored")
        finally:
            if staged is not None:
                self._delete_quietly(staged)

    def _delete_quietly(self, rel: str) -> None:
        try:
            self.d.call("operations/deletefile", {"fs": self.fs, "remote": rel})
        except (RcError, Lost):
            pass

    def _upload(self, rel: str, src_fd: int, size: int, oid: str | None, md5, progress) -> None:
        directory, _, name = rel.rpartition("/")
        boundary = uuid.uuid4().hex
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        h = hasher(split_oid(oid)[0], threads=size >= (64 << 20)) if oid else None
        conn = self.d.connection()
        sent_body = False
        started = []

        def start() -> None:  # the request goes out with the first chunk that may be sent
            if started:
                return
            started.append(True)
            conn.putrequest("POST", "/operations/uploadfile?" + urlencode({"fs": self.fs, "remote": directory}))
            for k, v in self.d.headers(**{"Content-Type": f"multipart/form-data; boundary={boundary}",
                                          "Content-Length": str(len(head) + size + len(tail))}).items():
                conn.putheader(k, v)
            conn.endheaders()
            conn.send(head)

        try:
            # rclone takes a body shorter than its streaming cutoff (100 KiB, set by daemon.py) for
            # a whole small file, even when it was cut: an object up to HOLD is read and hashed
            # whole before the request starts, so it is sent whole or not at all. A larger one
            # starts with a first chunk of 1 MiB and is cut (if it must be) only after that,
            # where a cut fails the upload.
            chunk = HOLD if size <= HOLD else CHUNK if size < (64 << 20) else 8 * CHUNK
            off = 0
            pending = None
            while off < size:
                data = os.pread(src_fd, min(chunk, size - off), off)
                if not data:
                    raise _Abort(f"the source is shorter than the {size} bytes expected (it changed while stored)")
                off += len(data)
                if h is not None:
                    h.update(data)
                if md5 is not None:
                    md5.update(data)
                if pending is not None:
                    start()
                    conn.send(pending)
                    progress(len(pending))
                pending = data
            if h is not None and f"{split_oid(oid)[0]}:{h.hexdigest()}" != oid:
                raise _Abort("its content does not hash to its id (it changed while stored)")
            start()
            if pending is not None:  # held back until the whole content was hashed
                conn.send(pending)
                progress(len(pending))
            conn.send(tail)
            sent_body = True
            resp = conn.getresponse()
            data = resp.read()
        except _Abort as exc:
            if started:
                self.d.drop_connection()  # cut past the streaming cutoff: rclone fails the upload
            raise IntegrityError(f"{self.where}: not stored: {exc}") from None
        except (http.client.HTTPException, OSError) as exc:
            self.d.drop_connection()
            if not sent_body and isinstance(exc, OSError) and exc.errno not in (None, errno.EPIPE, errno.ECONNRESET):
                raise
            raise self.remote_error(f"store {rel}", Lost(str(exc) or type(exc).__name__)) from None
        try:
            self.d._answer(resp.status, data)
        except RcError as exc:
            raise self.item_error(f"store {rel}", exc) from None

    # -- downloads ---------------------------------------------------------------------------

    def open_get(self, rel: str, size: int, what: str, checked: bool = False):
        """A response streaming ``rel``, None if clearly absent. Its length must be ``size``.
        Where ``links()``, ``rel`` is first checked to be a regular file (``stat``) unless the
        caller ``checked`` it: a symlink is never read through, a FIFO never opened."""
        if not checked and self.links():
            if self.stat(rel, what) is None:
                self.confirm_absent(what)
                return None
        conn = self.d.connection()
        path = "/[" + quote(self.fs, safe="") + "]/" + quote(rel)
        try:
            conn.request("GET", path, headers=self.d.headers())
            resp = conn.getresponse()
        except (http.client.HTTPException, OSError) as exc:
            self.d.drop_connection()
            raise self.remote_error(what, Lost(str(exc) or type(exc).__name__)) from None
        if resp.status == 404:
            resp.read()
            self.confirm_absent(what)
            return None
        if resp.status != 200:
            data = resp.read()
            try:
                self.d._answer(resp.status, data)
            except RcError as exc:
                raise self.remote_error(what, exc) from None
            raise RemoteError(f"{self.where}: cannot {what}: HTTP {resp.status}")
        length = resp.getheader("Content-Length")
        if length is None or not length.isdigit() or int(length) != size:
            self.d.drop_connection()  # never read (or write) a body of another size
            raise IntegrityError(f"{self.where} holds a corrupt {rel.rsplit('/', 1)[-1]}: {length} bytes, not the "
                                 f"{size} the stub says; not fetched, stub left as it was")
        return resp

    def stream(self, resp, size: int, sink, progress, what: str) -> None:
        """Read exactly ``size`` bytes of ``resp`` into ``sink(view)``."""
        buf = bytearray(min(max(size, 1), 8 * CHUNK))
        view = memoryview(buf)
        got = 0
        try:
            while got < size:
                n = resp.readinto(view[: min(len(buf), size - got)])
                if not n:
                    raise http.client.IncompleteRead(b"", size - got)
                sink(view[:n])
                got += n
                progress(n)
            if resp.read(1):
                raise IntegrityError(f"{self.where}: {what}: more than the {size} bytes announced")
        except (http.client.HTTPException, OSError) as exc:
            self.d.drop_connection()
            raise self.remote_error(what, Lost(str(exc) or type(exc).__name__)) from None
        except BaseException:
            self.d.drop_connection()
            raise

    def get(self, rel: str, dest, size: int, progress) -> bool:
        if size >= LARGE:
            return self._get_large(rel, dest, size, progress)
        what = f"fetch {rel}"
        resp = self.open_get(rel, size, what)
        if resp is None:
            return False
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CLOEXEC)  # may be /proc/self/fd/N: follow it
        except OSError:
            self.d.drop_connection()
            raise
        try:
            def write(view):
                done = 0
                while done < len(view):
                    try:
                        done += os.write(fd, view[done:])
                    except OSError as exc:
                        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise _LocalFull() from exc
                        raise _LocalWrite(exc) from exc

            self.stream(resp, size, write, progress, what)
        except (_LocalFull, _LocalWrite) as exc:
            self.d.drop_connection()
            if isinstance(exc, _LocalFull):
                raise JamError(f"cannot fetch {rel.rsplit('/', 1)[-1]}: no space left on the local disk") from None
            raise JamError(f"cannot fetch {rel.rsplit('/', 1)[-1]}: {exc.args[0]}") from None
        finally:
            os.close(fd)
        return True

    def _get_large(self, rel: str, dest, size: int, progress) -> bool:
        """A large object, copied by rclone itself into the file the core holds open (rclone
        reads the object store several times faster than its ``--rc-serve`` streams to us).

        The object is stat'ed first: a size other than ``size`` fails before anything is written.
        jam opens ``dest`` (the core's ``/proc/self/fd/N``) and hands rclone ``/proc/<jam's pid>/
        fd/<that fd>``, the very file (a name swapped meanwhile cannot redirect the write), with
        ``--inplace`` (no temporary name: /proc has none) and ``copy_links`` (follow the magic
        link). The copy runs as an rc job; its bytes are reported from core/stats, and a progress
        callback that raises (a cancelled command) stops the job. The core then hashes ``dest``."""
        import uuid

        what = f"fetch {rel}"
        item = self.stat(rel, what)
        if item is None:
            self.confirm_absent(what)
            return False
        if item["Size"] != size:
            raise IntegrityError(f"{self.where} holds a corrupt {rel.rsplit('/', 1)[-1]}: {item['Size']} bytes, "
                                 f"not the {size} the stub says; not fetched, stub left as it was")
        fd = os.open(dest, os.O_WRONLY | os.O_CLOEXEC)  # may be /proc/self/fd/N: follow it
        group = f"jam-{uuid.uuid4().hex}"
        try:
            job = self.rc(what, "operations/copyfile", srcFs=self.fs, srcRemote=rel,
                          dstFs=f":local,copy_links=true:/proc/{os.getpid()}/fd", dstRemote=str(fd),
                          _async=True, _group=group, _config={"Inplace": True, "NoCheckDest": True}).get("jobid")
            if not isinstance(job, int):
                raise RemoteError(f"{self.where}: cannot {what}: rclone started no job")
            reported = 0
            try:
                while True:
                    status = self.rc(what, "job/status", jobid=job)
                    stats = self.rc(what, "core/stats", group=group)
                    moved = min(int(stats.get("bytes") or 0), size)
                    if moved > reported:
                        progress(moved - reported)
                        reported = moved
                    if status.get("finished"):
                        break
                    time.sleep(0.05)  # polling rclone's job (no event to wait on)
            except BaseException:
                try:
                    self.d.call("job/stop", {"jobid": job})
                except (RcError, Lost):
                    pass
                raise
            finally:
                try:
                    self.d.call("core/stats-delete", {"group": group})
                except (RcError, Lost):
                    pass
            if not status.get("success"):
                msg = " ".join(str(status.get("error") or "failed").split())
                low = msg.lower()
                if "no space left" in low or "disk quota" in low:
                    raise JamError(f"cannot fetch {rel.rsplit('/', 1)[-1]}: no space left on the local disk")
                if "object not found" in low:
                    self.confirm_absent(what)
                    return False
                raise self.remote_error(what, msg)
            have = os.fstat(fd).st_size
            if have != size:
                raise IntegrityError(f"{self.where}: {rel.rsplit('/', 1)[-1]} came back as {have} bytes, not {size}")
            if size > reported:
                progress(size - reported)
            return True
        finally:
            os.close(fd)

    def read_small(self, rel: str, limit: int, what: str) -> bytes | None:
        item = self.stat(rel, what)
        if item is None:
            return None
        if item["Size"] > limit:
            raise RemoteError(f"{self.where}: {rel} is {item['Size']} bytes, more than {limit} (cannot {what})")
        resp = self.open_get(rel, item["Size"], what, checked=True)
        if resp is None:
            return None
        parts: list[bytes] = []
        self.stream(resp, item["Size"], lambda v: parts.append(bytes(v)), lambda n: None, what)
        return b"".join(parts)

    def put_small(self, rel: str, data: bytes, what: str) -> None:
        """Write a small file (a marker, metadata): staged and moved where the backend can,
        else one PUT (atomic on object stores)."""
        import tempfile

        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.flush()
            try:
                self.put(rel, f.fileno(), len(data), None, lambda n: None)
            except IntegrityError as exc:
                raise RemoteError(f"{self.where}: cannot {what}: {exc}") from None
            except JamError as exc:
                raise RemoteError(f"{self.where}: cannot {what}: {exc}") from None

    def executor(self):
        return self.d.executor(self.transfers)


class _LocalWrite(Exception):
    """Another OSError writing the local file of a fetch."""
