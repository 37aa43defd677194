"""Batches in a pipeline: while a worker thread moves batch N (the network, the remote's disk),
the calling thread prepares batch N+1 and finishes batch N-1 (hashing, stubs, renames)."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

B = TypeVar("B")
P = TypeVar("P")
_SKIPPED = object()  # what the worker returns for a batch it did not start

BATCH_FILES = 1024  # each batch costs a syncfs or two: small files go in large batches
BATCH_BYTES = 256 << 20


def files_per_batch() -> int:
    """BATCH_FILES, or fewer where the descriptor limit is low (``fs.fd_budget``: two batches
    in flight, descriptors per file and per directory)."""
    from jam_core.fs import fd_budget

    return min(BATCH_FILES, fd_budget())


def closes_held() -> int:
    """How many removed files a run may keep open to free them at its end (``fs.Closer``): the
    descriptors left once two batches in flight and the kept directories have theirs, halved
    for everything else; 0 under a low limit (each batch's are then freed with the next)."""
    from jam_core.fs import fd_budget, raise_fd_limit

    return max(0, raise_fd_limit() - 64 - 6 * files_per_batch() - fd_budget()) // 2


def batches(items: list, size_of) -> Iterable[list]:
    """Consecutive runs of at most ``files_per_batch()`` items and about BATCH_BYTES bytes."""
    most = files_per_batch()
    batch, total = [], 0
    for item in items:
        batch.append(item)
        total += size_of(item)
        if len(batch) >= most or total >= BATCH_BYTES:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def run(batches_: Iterable[B], prepare: Callable[[B], P], move: Callable[[P], object],
        finish: Callable[[P, object], None], stop: Callable[[], bool], session,
        cleanup: Callable[[P], None] = lambda p: None) -> None:
    """For each batch: ``prepare`` it here, ``move`` it in the worker, ``finish(prepared,
    future)`` here once the next batch is on its way. ``stop()``, or a ``move`` that raised,
    ends the run early: the worker starts no further batch, the one in flight is finished.
    ``cleanup`` runs for every prepared batch, whatever happened.

    On an interruption the session is closed first, so a backend's transfer in the worker
    stops at once instead of finishing its batch.

    A single batch (the cd hook's few stubs, most checkouts) has nothing to overlap with: it is
    moved here, with no worker thread (and no import of concurrent.futures and logging).
    """
    it = iter(batches_)
    first = next(it, _SKIPPED)
    if first is _SKIPPED:
        return
    second = next(it, _SKIPPED)
    if second is _SKIPPED:
        _run_one(first, prepare, move, finish, stop, session, cleanup)
        return
    _run_pool(_chain(first, second, it), prepare, move, finish, stop, session, cleanup)


def _chain(first, second, rest):
    yield first
    yield second
    yield from rest


class _Done:
    """What ``finish`` is handed for a batch moved here: a finished future's ``result`` and
    ``exception``."""

    __slots__ = ("_value", "_exc")

    def __init__(self, value=None, exc: BaseException | None = None):
        self._value, self._exc = value, exc

    def result(self):
        if self._exc is not None:
            raise self._exc
        return self._value

    def exception(self) -> BaseException | None:
        return self._exc


def _run_one(batch, prepare, move, finish, stop, session, cleanup) -> None:
    """One batch, all of it in this thread: the same order and the same guarantees as the pool."""
    if stop():
        return
    prepared, ready = None, False
    try:
        prepared = prepare(batch)
        ready = True
        if stop():  # as the worker does: a run stopped meanwhile moves nothing more
            return
        try:
            done = _Done(move(prepared))
        except Exception as exc:  # finish sees it as a failed future's, as from the worker
            done = _Done(exc=exc)
        finish(prepared, done)
    except BaseException:
        session.close()
        raise
    finally:
        if ready:
            cleanup(prepared)


def _run_pool(batches_: Iterable[B], prepare, move, finish, stop, session, cleanup) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    broken = threading.Event()

    def guarded(prepared: P):
        if broken.is_set() or stop():  # a batch before this one failed: do not start another
            return _SKIPPED
        try:
            return move(prepared)
        except BaseException:
            broken.set()
            raise

    def finish_one() -> None:
        prepared, future = in_flight.pop(0)
        try:
            if future.exception() is not None or future.result() is not _SKIPPED:
                finish(prepared, future)
        finally:
            cleanup(prepared)

    pool = ThreadPoolExecutor(1, thread_name_prefix="jam-move")
    in_flight: list[tuple[P, object]] = []
    try:
        for batch in batches_:
            if broken.is_set() or stop():
                break
            prepared = prepare(batch)
            in_flight.append((prepared, pool.submit(guarded, prepared)))
            if len(in_flight) > 1:
                finish_one()
        while in_flight:
            finish_one()
    except BaseException:
        session.close()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for prepared, _ in in_flight:
            cleanup(prepared)
