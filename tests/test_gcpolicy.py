"""webapp.gcpolicy: full collections by Python's rule, but only between fan-outs, never put off for good."""

from __future__ import annotations

import gc

import pytest

from webapp import gcpolicy


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(gcpolicy.time, "monotonic", lambda: now[0])
    gcpolicy.take_over()
    yield now
    gcpolicy.release()


def full_collections() -> int:
    return gc.get_stats()[2]["collections"]


def survivors(n: int | None = None) -> list:
    """``n`` pairs of objects into the oldest generation, as watchers' objects get there;
    by default enough to grow it by two thirds (what this process already holds varies)."""
    n = len(gc.get_objects(2)) // 3 + 1000 if n is None else n
    kept = [[{"n": i}] for i in range(n)]
    gc.collect(1)
    return kept


def test_python_no_longer_collects_everything_on_its_own(clock):
    before = full_collections()
    kept = survivors(300_000)  # Python alone would walk everything several times meanwhile
    assert full_collections() == before and len(kept) == 300_000


def test_a_due_collection_waits_for_a_gap_but_not_forever(clock):
    kept = survivors()
    assert gcpolicy.collect_if_due(gap=True) is None  # not looked at yet: 10 s apart
    clock[0] += 11
    before = full_collections()
    assert gcpolicy.collect_if_due(gap=False) is None  # updates are flowing: wait for a gap
    assert gcpolicy.collect_if_due(gap=True) is not None and full_collections() == before + 1
    clock[0] += 11
    assert gcpolicy.collect_if_due(gap=True) is None  # nothing grew since
    more = survivors()
    clock[0] += 21
    assert gcpolicy.collect_if_due(gap=False) is not None  # twice late: even without a gap
    assert kept and more


def test_without_take_over_nothing_changes():
    assert gc.get_threshold()[2] < 1000 and gcpolicy.collect_if_due() is None


def test_an_idle_hub_collects_within_a_second_of_the_growth(clock):
    """Watchers attached to a queued job: their collection runs before its updates start,
    not 10 s later in the middle of them."""
    kept = survivors()
    clock[0] += 1.5
    before = full_collections()
    assert gcpolicy.collect_if_due(gap=True, quiet=0.2) is None  # updates are arriving: the 10 s rule
    assert gcpolicy.collect_if_due(gap=True, quiet=1.5) is not None and full_collections() == before + 1
    more = survivors()
    clock[0] += 0.5
    assert gcpolicy.collect_if_due(gap=True, quiet=2.0) is None  # looked at a moment ago
    clock[0] += 0.6
    assert gcpolicy.collect_if_due(gap=True, quiet=2.6) is not None
    assert kept and more
