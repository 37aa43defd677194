"""Policies as pure functions over plain records: tables of cases, borg-prune style."""

from __future__ import annotations

import pytest

from jam_age import select_older
from jam_budget import select_budget
from jam_budget import settings as budget_settings
from jam_core import FileRecord, Nomination, UsageError
from jam_core.policy.pins import covered
from jam_core.policy.plan import merge
from jam_core.units import parse_duration, parse_percent
from jam_lru import select_lru
from jam_lru import settings as lru_settings
from jam_related import select_related, split_name

DAY = 86400.0
NOW = 1_800_000_000.0  # a fixed "now": no test depends on the clock


def rec(path: str, size: int = 100, age_days: float = 0.0, state: str = "stub") -> FileRecord:
    t = NOW - age_days * DAY
    return FileRecord(path=path, size=size, mtime=t, atime=t, last_used=t, state=state)


def paths(nominations) -> list[str]:
    return sorted(n.path for n in nominations)


# -- values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("10m", 600), ("12h", 43200), ("30d", 30 * DAY), ("2w", 14 * DAY),
    ("1y", 365 * DAY), ("1.5h", 5400), (" 7 days ", 7 * DAY), ("0s", 0), ("10M", 600),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["30", 30, "", "d", "-3d", "3 fortnights", "3d4h", None, True, "1e3d"])
def test_parse_duration_refuses_with_a_hint(bad):
    with pytest.raises(UsageError, match="expected a duration like 10m"):
        parse_duration(bad, "policy.age.older_than")


@pytest.mark.parametrize("text, share", [("25%", 0.25), ("0%", 0.0), ("100%", 1.0), ("12.5 %", 0.125)])
def test_parse_percent(text, share):
    assert parse_percent(text) == share


@pytest.mark.parametrize("bad", ["25", 0.25, 25, "101%", "-5%", "%", "a%", None])
def test_parse_percent_refuses(bad):
    with pytest.raises(UsageError, match="expected a percentage"):
        parse_percent(bad, "policy.lru.keep")


@pytest.mark.parametrize("rel, pins, expected", [
    ("a/b/c.txt", set(), False),
    ("a/b/c.txt", {"a"}, True),
    ("a/b/c.txt", {"a/b"}, True),
    ("a/b/c.txt", {"a/b/c.txt"}, True),
    ("a/bc/d", {"a/b"}, False),  # a prefix of a name is not a parent
    ("ab/c", {"a"}, False),
    ("x", {"."}, True),  # pinning the root pins everything
])
def test_pin_covers_directory_contents(rel, pins, expected):
    assert covered(rel, pins) is expected


# -- age ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ages, older_than, expected", [
    ({}, 30 * DAY, []),  # empty tree
    ({"a": 31, "b": 29}, 30 * DAY, ["a"]),
    ({"a": 30, "b": 30.0001}, 30 * DAY, ["b"]),  # exactly 30 days old stays
    ({"a": 1, "b": 2}, 0, ["a", "b"]),  # 0s: everything used before now
    ({"a": 0}, 0, []),  # used this instant: not older than 0s
    ({"a": 100, "b": 100}, 30 * DAY, ["a", "b"]),  # equal ages go together
    ({"a": 10 / (24 * 60) + 1e-6, "b": 9 / (24 * 60)}, 600, ["a"]),  # 10m
])
def test_age(ages, older_than, expected):
    records = [rec(p, age_days=d) for p, d in ages.items()]
    got = select_older(records, older_than, NOW)
    assert paths(got) == expected
    assert all(n.policy == "age" and "older than" in n.reason and "last used" in n.reason for n in got)


def test_age_reason_reads_like_a_sentence():
    (n,) = select_older([rec("a", age_days=40)], 30 * DAY, NOW)
    assert n.reason.startswith("last used 20") and n.reason.endswith(", older than 30d")
    (n,) = select_older([rec("a", age_days=1)], 600, NOW)
    assert ":" in n.reason.split("last used ")[1]  # short thresholds show the time of day too


# -- lru ------------------------------------------------------------------------------------

@pytest.mark.parametrize("files, keep, by, expected", [
    ([], 0.25, "bytes", []),  # empty tree
    ([("a", 100, 1), ("b", 100, 2), ("c", 100, 3), ("d", 100, 4)], 0.25, "bytes", ["b", "c", "d"]),
    ([("a", 100, 1), ("b", 100, 2), ("c", 100, 3), ("d", 100, 4)], 0.5, "count", ["c", "d"]),
    ([("a", 100, 1), ("b", 100, 2)], 0.0, "bytes", ["a", "b"]),  # keep nothing
    ([("a", 100, 1), ("b", 100, 2)], 1.0, "bytes", []),  # keep everything
    # by bytes: the newest file is big enough to be the whole kept share
    ([("big", 900, 1), ("s1", 50, 2), ("s2", 50, 3)], 0.25, "bytes", ["s1", "s2"]),
    # by count: one of three files is at least 25%
    ([("big", 900, 1), ("s1", 50, 2), ("s2", 50, 3)], 0.25, "count", ["s1", "s2"]),
    # by bytes: the kept share is reached only after several small recent files
    ([("s1", 10, 1), ("s2", 20, 2), ("big", 70, 3)], 0.25, "bytes", ["big"]),
    # ...and a file that straddles the boundary stays (never less than keep)
    ([("s1", 10, 1), ("s2", 10, 2), ("big", 80, 3)], 0.25, "bytes", []),
    # ties: files used at the same instant stay or go together (kept share >= keep)
    ([("a", 100, 1), ("b", 100, 1), ("c", 100, 2), ("d", 100, 2)], 0.25, "bytes", ["c", "d"]),
    ([("a", 100, 5), ("b", 100, 5), ("c", 100, 5)], 0.1, "bytes", []),
    ([("z", 0, 1)], 0.5, "bytes", []),  # no bytes at all
])
def test_lru(files, keep, by, expected):
    records = [rec(p, size=s, age_days=d) for p, s, d in files]
    got = select_lru(records, keep, by)
    assert paths(got) == expected
    share = round((1 - keep) * 100)
    assert all(n.reason == f"among the least recently used {share}% by {by}" for n in got)


@pytest.mark.parametrize("table, message", [
    ({}, "set keep"),
    ({"keep": "25"}, "expected a percentage"),
    ({"keep": "25%", "by": "size"}, 'expected "bytes" or "count"'),
    ({"keep": "25%", "kep": 1}, "unknown setting 'kep'"),
])
def test_lru_bad_config(table, message):
    with pytest.raises(UsageError, match=message):
        lru_settings({"policy": {"lru": table}})


def _run_until_stable(records, select, runs=3):
    """Apply a policy run after run, nominated records becoming stubs; the local paths after
    each run."""
    local = {r.path: r for r in records}
    stubbed: dict[str, FileRecord] = {}
    after = []
    for _ in range(runs):
        for path in {n.path for n in select(list(local.values()), list(stubbed.values()))}:
            stubbed[path] = local.pop(path)
        after.append(sorted(local))
    return after


@pytest.mark.parametrize("keep, by, sizes, kept", [
    (0.25, "count", [100] * 12, 3),  # the case: 3 of 12 stay, run after run
    (0.25, "bytes", [100] * 12, 3),
    (0.5, "count", [100] * 7, 4),  # 3.5 files: never fall short, so 4
    (0.1, "bytes", [1000, 10, 10, 10, 10, 10, 10, 10, 10, 10], 1),  # the newest is big enough alone
    (0.3, "bytes", [10, 10, 10, 1000, 10, 10], 4),  # ...or reached only with a big older one
    (0.0, "count", [100] * 5, 0),
    (1.0, "bytes", [100] * 5, 5),
])
def test_lru_converges_stubs_count_in_the_share(keep, by, sizes, kept):
    records = [rec(f"f{i:02}", size=s, age_days=i + 1) for i, s in enumerate(sizes)]  # f00 newest
    after = _run_until_stable(records, lambda recs, stubs: select_lru(recs, keep, by, stubs=stubs))
    assert after[0] == [f"f{i:02}" for i in range(kept)]
    assert after[1] == after[0] and after[2] == after[0]  # a second run nominates nothing new


def test_lru_stubs_are_never_ranked_as_kept():
    # the two newest files are stubs already (stashed by hand): they count in the total,
    # not in what stays local, so the newest local ones fill the share
    local = [rec(f"l{i}", age_days=i + 2) for i in range(6)]
    stubs = [rec("s0", age_days=0), rec("s1", age_days=1)]
    got = select_lru(local, 0.25, "count", stubs=stubs)  # 25% of 8 files = 2 stay local
    assert paths(got) == ["l2", "l3", "l4", "l5"]


def test_lru_hook_reads_the_stubs_the_core_offers():
    """The core passes the candidates as a tuple carrying the tree's stubs (policy.Records)."""
    import jam_lru
    from jam_core.policy.records import Records

    offered = Records(rec(f"f{i}", age_days=i, state="local") for i in range(3))
    offered.stubs = tuple(rec(f"s{i}", age_days=10 + i) for i in range(9))
    config = {"policy": {"lru": {"keep": "25%", "by": "count"}}}
    assert paths(jam_lru.select(records=offered, purpose="stash", config=config)) == []  # 3 of 12 stay
    assert paths(jam_lru.select(records=tuple(offered), purpose="stash", config=config)) == ["f1", "f2"]


@pytest.mark.parametrize("policy", ["age", "budget", "all"])
def test_age_and_budget_converge(policy):
    records = [rec(f"f{i:02}", size=100, age_days=i * 10) for i in range(12)]
    selects = {
        "age": lambda recs, stubs: select_older(recs, 30 * DAY, NOW),
        "budget": lambda recs, stubs: select_budget(recs, sum(r.size for r in recs), 1000, 500),
    }
    selects["all"] = lambda recs, stubs: (selects["age"](recs, stubs) + selects["budget"](recs, stubs)
                                          + select_lru(recs, 0.25, "count", stubs=stubs))
    after = _run_until_stable(records, selects[policy])
    assert after[0] and after[1] == after[0] and after[2] == after[0]


def test_lru_absent_table_means_off():
    assert lru_settings({}) is None and lru_settings({"policy": {"age": {"older_than": "1d"}}}) is None


# -- budget ---------------------------------------------------------------------------------

@pytest.mark.parametrize("files, local, max_local, low, expected", [
    ([], 0, 1000, 900, []),  # empty tree
    ([("a", 500, 9), ("b", 500, 1)], 1000, 1000, 900, []),  # exactly at the budget: met
    ([("a", 500, 9), ("b", 500, 1)], 900, 1000, 900, []),  # under: met
    ([("a", 500, 9), ("b", 400, 5), ("c", 101, 1)], 1001, 1000, 900, ["a"]),  # oldest first
    # evicts down to the low watermark, not just under max (no flapping)
    ([("a", 100, 9), ("b", 100, 8), ("c", 100, 7), ("d", 701, 0)], 1001, 1000, 701, ["a", "b", "c"]),
    ([("a", 100, 9), ("b", 100, 8), ("c", 100, 7), ("d", 701, 0)], 1001, 1000, 1000, ["a"]),
    # ties in last use: the bigger file goes first (fewer files moved)
    ([("a", 100, 5), ("b", 300, 5), ("c", 900, 0)], 1300, 1200, 1100, ["b"]),
    # local bytes include files the policy may not move (pinned...): it does what it can
    ([("a", 100, 9)], 5000, 1000, 900, ["a"]),
])
def test_budget(files, local, max_local, low, expected):
    records = [rec(p, size=s, age_days=d) for p, s, d in files]
    got = select_budget(records, local, max_local, low)
    assert paths(got) == expected
    assert all(n.reason.startswith("local ") and "evicting least recently used" in n.reason for n in got)


def test_budget_watermark_stops_flapping():
    """After an eviction down to low, the next run (a little growth, still under max) does nothing."""
    records = [rec(f"f{i}", size=100, age_days=10 - i) for i in range(10)]
    chosen = {n.path for n in select_budget(records, 1000, 950, 700)}
    assert chosen == {"f0", "f1", "f2"}
    left = [r for r in records if r.path not in chosen] + [rec("new", size=150)]
    assert select_budget(left, 850, 950, 700) == []


def test_budget_reason():
    (n,) = select_budget([rec("a", size=5 * 10**9)], 24_100_000_000, 20 * 10**9, 18 * 10**9)
    assert n.reason == "local 24.1 GB > 20 GB, evicting least recently used down to 18 GB"


@pytest.mark.parametrize("table, expected", [
    ({"max_local": "20GB"}, (20 * 10**9, 18 * 10**9)),
    ({"max_local": "20GB", "low": "50%"}, (20 * 10**9, 10 * 10**9)),
    ({"max_local": "20GB", "low": "15GB"}, (20 * 10**9, 15 * 10**9)),
    ({"max_local": "1GiB", "low": "100%"}, (2**30, 2**30)),
])
def test_budget_settings(table, expected):
    assert budget_settings({"policy": {"budget": table}}) == expected


@pytest.mark.parametrize("table, message", [
    ({}, "set max_local"),
    ({"max_local": "lots"}, "policy.budget.max_local: expected a size"),
    ({"max_local": "20GB", "low": "30GB"}, "must not be above max_local"),
    ({"max_local": "20GB", "low": "150%"}, "expected a percentage"),
    ({"max_local": "20GB", "high": "1GB"}, "unknown setting 'high'"),
])
def test_budget_bad_config(table, message):
    with pytest.raises(UsageError, match=message):
        budget_settings({"policy": {"budget": table}})


# -- related --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("a/photo.jpg", ("a", "photo", ".jpg")),
    ("photo.tar.gz", ("", "photo", ".gz")),
    ("a/b/README", ("a/b", "README", "")),
    (".bashrc", ("", ".bashrc", "")),
    ("x/IMG.JPG", ("x", "IMG", ".jpg")),
])
def test_split_name(name, expected):
    assert split_name(name) == expected


TREE = ["p/a.jpg", "p/b.jpg", "p/a.xmp", "p/c.png", "q/d.jpg", "q/a.xmp", "p/A.JPG", "p/sub/e.jpg"]


@pytest.mark.parametrize("options, expected", [
    ({}, ["p/A.JPG", "p/a.xmp", "p/b.jpg"]),
    ({"stem": False}, ["p/A.JPG", "p/b.jpg"]),
    ({"extensions": False}, ["p/a.xmp"]),
    ({"extensions": False, "stem": False}, ["p/A.JPG", "p/a.xmp", "p/b.jpg", "p/c.png"]),
    ({"same_dir": False}, ["p/A.JPG", "p/a.xmp", "p/b.jpg", "p/sub/e.jpg", "q/a.xmp", "q/d.jpg"]),
    ({"same_dir": False, "extensions": False}, ["p/a.xmp", "q/a.xmp"]),
])
def test_related(options, expected):
    records = [rec(p, age_days=i) for i, p in enumerate(TREE)]
    got = select_related(records, ["p/a.jpg"], **options)
    assert paths(got) == expected
    assert all(n.policy == "related" and n.reason.endswith("as p/a.jpg") for n in got)


def test_related_caps_most_recent_first():
    records = [rec(f"d/f{i}.txt", age_days=i) for i in range(30)]
    got = select_related(records, ["d/f0.txt"], max_files=3)
    assert [n.path for n in got] == ["d/f1.txt", "d/f2.txt", "d/f3.txt"]
    assert select_related([], ["d/x"]) == []


# -- merging --------------------------------------------------------------------------------

def test_merge_keeps_every_reason_and_drops_what_is_not_allowed():
    allowed = {"a": rec("a", size=7), "b": rec("b")}
    noms = [Nomination("a", "lru", "x"), Nomination("a", "age", "y"), Nomination("c", "age", "z"),
            Nomination("a", "lru", "x")]
    refused = []
    (item,) = merge(noms, allowed, refused)
    assert (item.path, item.size, item.reasons) == ("a", 7, [("age", "y"), ("lru", "x")])
    assert refused == [("c", "age")]


def test_everything_pinned_or_empty_plan_is_empty():
    assert merge([Nomination("a", "lru", "x")], {}) == []
