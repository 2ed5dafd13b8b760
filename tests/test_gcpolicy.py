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
    assert not gcpolicy.collect_if_due(gap=True)  # not looked at yet: 10 s apart
    clock[0] += 11
    before = full_collections()
    assert not gcpolicy.collect_if_due(gap=False)  # updates are flowing: wait for a gap
    assert gcpolicy.collect_if_due(gap=True) and full_collections() == before + 1
    clock[0] += 11
    assert not gcpolicy.collect_if_due(gap=True)  # nothing grew since
    more = survivors()
    clock[0] += 21
    assert gcpolicy.collect_if_due(gap=False)  # twice late: even without a gap
    assert kept and more


def test_without_take_over_nothing_changes():
    assert gc.get_threshold()[2] < 1000 and not gcpolicy.collect_if_due()
