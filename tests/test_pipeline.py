"""The batch pipeline under stash and checkout: order, early stop, cleanup, interruption."""

from __future__ import annotations

import pytest

from jam_core.model import Session
from jam_core.ops import pipeline


def run(batches, move, stop=lambda: False):
    log = []

    def finish(prepared, future):
        log.append(("finish", prepared, future.result()))

    session = Session()
    closed = []
    session.on_close(lambda: closed.append(True))
    pipeline.run(batches, prepare=lambda b: (log.append(("prepare", b)), b)[1], move=move, finish=finish,
                 stop=stop, session=session, cleanup=lambda p: log.append(("cleanup", p)))
    return log, closed


def test_each_batch_is_prepared_moved_finished_and_cleaned_in_order():
    log, closed = run([1, 2, 3], move=lambda b: b * 10)
    finishes = [e for e in log if e[0] == "finish"]
    assert finishes == [("finish", 1, 10), ("finish", 2, 20), ("finish", 3, 30)]
    assert [e[1] for e in log if e[0] == "cleanup"] == [1, 2, 3]
    # batch 2 is prepared before batch 1 is finished: that is the overlap
    assert log.index(("prepare", 2)) < log.index(("finish", 1, 10))
    assert closed == []


def test_a_failed_move_starts_no_further_batch():
    moved = []

    def move(b):
        moved.append(b)
        if b == 1:
            raise OSError("remote gone")
        return b

    with pytest.raises(OSError):
        run([1, 2, 3], move)
    assert moved == [1]  # batch 2 was prepared, but never moved


def test_an_interruption_closes_the_session_and_cleans_every_batch():
    cleaned, closed = [], []
    session = Session()
    session.on_close(lambda: closed.append(True))

    def prepare(b):
        if b == 3:
            raise KeyboardInterrupt
        return b

    with pytest.raises(KeyboardInterrupt):
        pipeline.run([1, 2, 3], prepare=prepare, move=lambda b: b, finish=lambda p, f: None,
                     stop=lambda: False, session=session, cleanup=cleaned.append)
    assert closed == [True] and sorted(cleaned) == [1, 2]
