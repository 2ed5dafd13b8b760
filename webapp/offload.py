"""CPU-heavy work of a request runs off the web process's event loop.

Under gunicorn's gevent worker every connection is a greenlet of one thread, so a 1.2 s
image decode in a request stalled every watcher and every request of that process for
1.2 s (8 at once: ``/healthz`` took 7.1 s).  :func:`off_loop` runs such work in a native
thread of a small pool while the calling greenlet waits and the loop goes on; Pillow, zlib
and numpy release the GIL while they work, which is what lets the loop run meanwhile.  The
pool is the process's own (``OFFLOAD_THREADS`` threads: more decodes wait their turn instead
of taking every core) and its threads run at a lower CPU priority than the loop, so on a
busy host the loop still gets a core when it needs one.  Outside gevent (thread-per-request
servers, tests) the work runs in the caller's thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .outbox import greenlets_only

T = TypeVar("T")

#: Native threads per web process for decoding uploads (a 2-core host: two at a time).
OFFLOAD_THREADS = 2
#: How much lower than the loop the decoding threads run (Linux nice values are per thread).
OFFLOAD_NICE = 10

_pool: Any = None
_pool_pid = 0
_lock = threading.Lock()


def _run(fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    """In a pool thread: below the loop's priority (``who=0`` is this thread on Linux), then work."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + OFFLOAD_NICE))
    except OSError:
        pass  # not permitted here: the work still runs, at the loop's priority
    return fn(*args)


def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, in a native thread when the caller is a greenlet (exceptions propagate)."""
    if not greenlets_only():
        return fn(*args)
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():  # one per process, made after the fork
            from gevent.threadpool import ThreadPool

            _pool, _pool_pid = ThreadPool(OFFLOAD_THREADS), os.getpid()
    return _pool.apply(_run, (fn, args))
