"""Issue 15: `jam sync` merges pins three ways like files. Two roots on one machine stand in for
two computers (tests/test_sync.py's helpers: the real `jam`, real files, one dir remote)."""

from __future__ import annotations

from jam_core.history.sync import merge_pins
from tests.test_sync import run, sync, two


def pins(root, machine: str) -> set[str]:
    return set(run(root, "pin", machine=machine).out.split())


def test_a_pin_made_on_one_side_arrives_on_the_other(tmp_path):
    _t, a, b = two(tmp_path)
    run(a, "pin", "docs", machine="aaa")
    sync(a, "aaa")
    res = sync(b, "bbb")
    assert pins(b, "bbb") == {"docs"}, res.out + res.err
    assert "pinned docs" in res.out
    # and the pin is in B's next snapshot: a second sync of A changes nothing there
    sync(a, "aaa")
    assert pins(a, "aaa") == {"docs"}


def test_an_unpin_on_one_side_arrives_and_pins_on_both_sides_are_kept(tmp_path):
    _t, a, b = two(tmp_path)
    run(a, "pin", "docs", machine="aaa")
    sync(a, "aaa")
    sync(b, "bbb")
    assert pins(b, "bbb") == {"docs"}
    # B unpins docs and pins big.bin; A meanwhile pins link: every change since the base applies
    run(b, "unpin", "docs", machine="bbb")
    run(b, "pin", "big.bin", machine="bbb")
    run(a, "pin", "empty", machine="aaa")
    sync(b, "bbb")
    res = sync(a, "aaa")
    assert pins(a, "aaa") == {"big.bin", "empty"}, res.out + res.err
    assert "unpinned docs" in res.out
    sync(b, "bbb")
    assert pins(b, "bbb") == {"big.bin", "empty"}
    # a pin made on one side is not undone by the other side's older snapshot
    sync(a, "aaa")
    assert pins(a, "aaa") == {"big.bin", "empty"}


def test_merge_pins_three_ways_and_the_safe_side_without_a_base():
    assert merge_pins({"x", "new"}, {"y"}, {"x", "y"}) == {"new"}  # x unpinned there, y here
    assert merge_pins({"x"}, {"x", "t"}, {"x"}) == {"x", "t"}
    assert merge_pins(set(), {"x"}, {"x"}) == set()  # unpinned here since the base
    assert merge_pins({"x"}, set(), {"x"}) == set()  # unpinned there since the base
    assert merge_pins({"a"}, {"b"}, None) == {"a", "b"}  # no common base: keep every pin
