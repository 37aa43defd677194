"""Batches in a pipeline: while a worker thread moves batch N (the network, the remote's disk),
the calling thread prepares batch N+1 and finishes batch N-1 (hashing, stubs, renames)."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

B = TypeVar("B")
P = TypeVar("P")

BATCH_FILES = 256
BATCH_BYTES = 256 << 20


def batches(items: list, size_of) -> Iterable[list]:
    """Consecutive runs of at most BATCH_FILES items and about BATCH_BYTES bytes."""
    batch, total = [], 0
    for item in items:
        batch.append(item)
        total += size_of(item)
        if len(batch) >= BATCH_FILES or total >= BATCH_BYTES:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def run(batches_: Iterable[B], prepare: Callable[[B], P], move: Callable[[P], object],
        finish: Callable[[P, object], None], stop: Callable[[], bool], session,
        cleanup: Callable[[P], None] = lambda p: None) -> None:
    """For each batch: ``prepare`` it here, ``move`` it in the worker, ``finish(prepared,
    future)`` here once the next batch is on its way. ``stop()`` ends the run early (the batch
    in flight is still finished). ``cleanup`` runs for every prepared batch, whatever happened.

    On an interruption the session is closed first, so a backend's transfer in the worker
    stops at once instead of finishing its batch.
    """
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="jam-move")
    in_flight: list[tuple[P, object]] = []
    try:
        for batch in batches_:
            prepared = prepare(batch)
            in_flight.append((prepared, pool.submit(move, prepared)))
            if len(in_flight) > 1:
                done = in_flight.pop(0)
                try:
                    finish(*done)
                finally:
                    cleanup(done[0])
            if stop():
                break
        while in_flight:
            done = in_flight.pop(0)
            try:
                finish(*done)
            finally:
                cleanup(done[0])
    except BaseException:
        session.close()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for prepared, _ in in_flight:
            cleanup(prepared)
