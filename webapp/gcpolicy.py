"""Full garbage collections of a web process, between fan-outs instead of in them.

A web process serving 2,000 watchers holds ~290,000 objects the collector tracks (~120 per
connection: greenlet, socket, request, WebSocket state).  A full collection walks all of them:
170-200 ms measured, during which no watcher of that process gets anything (a whole p99 on its
own; docs/benchmarks.md, scale).  Python starts one when the objects that survived into the
oldest generation since the last one exceed a quarter of those there, which watchers arriving
keep doing: in the middle of a fan-out as likely as anywhere.

:func:`take_over` (called by gunicorn in each web process, ``gunicorn_conf.post_worker_init``;
``create_app`` has frozen what start-up allocated) keeps the cheap young collections
automatic and leaves the full ones to :func:`collect_if_due`, which the hub calls between
fan-outs.  It applies Python's own rule (a quarter more objects in the oldest
generation than after the last full collection), looked at every ``QUIET_CHECK_SECONDS``
while no update has arrived for ``QUIET_SECONDS`` (watchers attached to a queued job: the
collection their objects call for runs before its updates start), every ``CHECK_SECONDS``
between fan-outs otherwise (a real model's steps are seconds apart), or regardless once
that check is ``CHECK_SECONDS`` late, so that updates that never pause cannot put
collection off for good.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("framepack.gc")

#: Seconds between looks at the oldest generation (counting it takes ~5 ms at 290,000 objects).
CHECK_SECONDS = 10.0
#: No update for this long: the hub is idle, look every QUIET_CHECK_SECONDS instead.
QUIET_SECONDS = 1.0
QUIET_CHECK_SECONDS = 1.0
#: Python's own rule for a full collection: this much growth of the oldest generation.
GROWTH = 1.25

_state = {"on": False, "checked": 0.0, "baseline": 0}


def take_over() -> None:
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 2**31 - 1)  # full collections only from collect_if_due
    _state.update(on=True, checked=time.monotonic(), baseline=len(gc.get_objects(2)))


def collect_if_due(gap: bool = True, quiet: float = 0.0) -> float | None:
    """A full collection if Python's rule asks for one (and :func:`take_over` ran); ``gap``:
    no update is being fanned out or waiting; ``quiet``: seconds since the last update
    arrived.  The seconds it took, or None if none ran."""
    waited = time.monotonic() - _state["checked"]
    if not _state["on"]:
        return None
    idle = gap and quiet >= QUIET_SECONDS and waited >= QUIET_CHECK_SECONDS
    if not idle and (waited < CHECK_SECONDS or (not gap and waited < 2 * CHECK_SECONDS)):
        return None
    _state["checked"] = time.monotonic()
    if len(gc.get_objects(2)) <= GROWTH * _state["baseline"]:
        return None
    started = time.perf_counter()
    gc.collect()
    took = time.perf_counter() - started
    _state["baseline"] = len(gc.get_objects(2))
    log.info("full garbage collection between fan-outs: %.0f ms, %d objects kept", took * 1000, _state["baseline"])
    return took


def release() -> None:
    """Give full collections back to Python (tests)."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 10)
    _state.update(on=False)
