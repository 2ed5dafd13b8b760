"""A job's files, published to the results store as they are written (no Flask, no torch).

``generate()`` writes into a local directory and knows nothing of buckets; the worker puts
an :class:`Uploader` between its events and the :class:`tasks.reporter.Reporter`:

- the input image is published as soon as the worker saved it;
- each :class:`~diffusers_helper.events.SectionDone` is uploaded from the uploader's own
  thread (sampling goes on meanwhile), with the job's section checkpoint, and only then
  passed on, so a section that watchers hear of can already be downloaded, and a job whose
  worker dies can resume on another host from the last section it announced;
- :meth:`Uploader.finish` publishes whatever else is in the directory (final video,
  sidecar, resized input and end image, a section whose upload failed) before the job's
  end is written; it raises :class:`tasks.results.StoreUnavailable` when a file cannot be
  stored, and the job fails with that reason.

With the local directory store nothing moves: events pass straight through.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .logs import job_context
from .protocol import CHECKPOINT_FILE
from .results import ResultsStore, StoreUnavailable

log = logging.getLogger("framepack.worker")

#: Tries per file (each one already retried by boto3), and the pause between them.
ATTEMPTS = 3
PAUSE = 1.0


class Uploader:
    def __init__(self, store: ResultsStore, job_id: str, forward: Callable[[Any], None], metrics: Any = None):
        self.store, self.job_id, self.forward, self.metrics = store, job_id, forward, metrics
        self.directory = store.staging(job_id)
        self._published: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) stored
        self._held: list[Any] = []  # SectionDone events whose file is not stored yet
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if not store.local:
            self._thread = threading.Thread(target=self._run, name=f"framepack-upload-{job_id[:8]}", daemon=True)
            self._thread.start()

    # -- the task thread ------------------------------------------------------------------
    def on_event(self, e: Any) -> None:
        from diffusers_helper import events as ev

        if self._thread is not None and isinstance(e, ev.SectionDone):
            self._queue.put(e)
        else:
            self.forward(e)

    def publish(self, path: Path) -> None:
        """Publish one file the worker wrote itself (the input), in the background."""
        if self._thread is not None:
            self._queue.put(path)

    def finish(self, timeout: float = 600.0) -> None:
        """Wait for the queued uploads, then publish every file not stored yet (or changed).

        Raises :class:`StoreUnavailable` naming the first file that could not be stored."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        failed: list[str] = []
        for path in sorted(self.directory.iterdir()) if self.directory.is_dir() else []:
            if path.is_file() and not path.name.startswith(".") and not self._upload(path):
                failed.append(path.name)
        for e in self._held:  # stored now (late): announce them before the end
            if e.path.name not in failed:
                self.forward(e)
        self._held.clear()
        if failed:
            raise StoreUnavailable(f"could not store {', '.join(failed)} in {self.store.url}")

    def release(self) -> None:
        """Drop the worker's copy (bucket store: everything is uploaded or given up on)."""
        if self._thread is not None:
            self.store.release_staging(self.job_id)

    # -- the upload thread ----------------------------------------------------------------
    def _run(self) -> None:
        with job_context(self.job_id):
            while True:
                item = self._queue.get()
                if item is None:
                    return
                try:
                    if isinstance(item, Path):
                        self._upload(item)
                    elif self._upload(item.path) and self._upload_checkpoint():
                        self.forward(item)
                    else:
                        self._held.append(item)
                except Exception:  # noqa: BLE001 — never lose the thread: finish() tries every file again
                    log.exception("job %s: upload of %s failed", self.job_id, getattr(item, "path", item))
                    if not isinstance(item, Path):
                        self._held.append(item)

    def _upload_checkpoint(self) -> bool:
        """The section checkpoint as it is now.  Sampling rewrites it (atomically, by rename)
        after the next section: a hard link keeps this version whole while it uploads."""
        path = self.directory / CHECKPOINT_FILE
        snapshot = path.with_name(f".{CHECKPOINT_FILE}.upload")
        snapshot.unlink(missing_ok=True)
        try:
            os.link(path, snapshot)
        except FileNotFoundError:
            return True  # none written (a model run without checkpoints)
        try:
            return self._upload(snapshot, CHECKPOINT_FILE)
        finally:
            snapshot.unlink(missing_ok=True)

    def _upload(self, path: Path, name: str | None = None) -> bool:
        """Store ``path`` (as ``name``, by default its own) unless it is stored as it is now;
        True when it is."""
        name = name or path.name
        st = path.stat()
        version = (st.st_size, st.st_mtime_ns)
        with self._lock:
            if self._published.get(name) == version:
                return True
        for attempt in range(1, ATTEMPTS + 1):
            t = time.perf_counter()
            try:
                self.store.publish(self.job_id, path, name)
            except StoreUnavailable as exc:
                if self.metrics is not None:
                    self.metrics.upload_errors.inc()
                log.warning("job %s: storing %s failed (try %d/%d): %s", self.job_id, name, attempt, ATTEMPTS,
                            exc)  # fmt: skip
                if attempt < ATTEMPTS:
                    time.sleep(PAUSE)
                continue
            if self.metrics is not None:
                self.metrics.upload_seconds.observe(time.perf_counter() - t)
                self.metrics.upload_bytes.inc(st.st_size)
            with self._lock:
                self._published[name] = version
            return True
        return False
