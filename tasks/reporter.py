"""A job's running updates: generation events -> ``update_state`` metas (no Flask, no torch).

Sampling must never wait on Redis: the task thread only records what happened
(:meth:`Reporter.on_event`, microseconds), and one writer thread per job does every Redis
and broker call — the ``update_state`` write (GET + SETEX + PUBLISH in Celery's backend),
the preview's base64, the record's ``seq``, Flower's progress event and the all-jobs feed.

While a write is slow or Redis is down, newer progress replaces pending progress (latest
wins, as in the web tier's outboxes); stage and section updates keep their place.  A
section update, once written, is also the job's ``section`` webhook event (when it asked).  A write
that fails is dropped without consuming a ``seq`` (every update carries all fields, so the
next one loses nothing but the intermediate steps).  :meth:`Reporter.close` waits for the
writer before the job's end is written, so no update can land after the final.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis

from . import webhooks
from .lifecycle import Lifecycle
from .logs import job_context
from .protocol import STATE_TO_CELERY, JobState, Keys, feed_event, flower_event, make_meta, preview_field

log = logging.getLogger("framepack.worker")

#: After a failed write the writer waits this long before the next one (outage back-off).
RETRY_PAUSE = 1.0
#: Flower and the all-jobs feed hear of progress at most this often (seconds).
ANNOUNCE_EVERY = 1.0


class Reporter:
    def __init__(
        self,
        task: Any,
        job_id: str,
        lifecycle: Lifecycle,
        started_at: float,
        seq: int = 0,
        *,
        attempts: int = 1,
        hostname: str | None = None,
        progress_interval: float = 0.1,
        sections_done: list[dict[str, Any]] | None = None,
        record: dict[str, Any] | None = None,
        on_drop: Callable[[], Any] | None = None,
    ):
        """``record`` is the job's (decoded) record: its owner labels the feed's progress
        events, its webhook says whether sections are announced."""
        self.task, self.job_id, self.lifecycle = task, job_id, lifecycle
        self.owner = (record or {}).get("owner")
        self.section_webhook = webhooks.wants(record, "section")
        self.hostname = hostname  # the Celery worker's, for the events it sends
        self.progress_interval = progress_interval
        self.on_drop = on_drop  # counts updates lost to a Redis outage (metrics)
        self.seq = seq  # a redelivered job continues its predecessor's sequence
        self.written = 0
        self.dropped = 0
        # a redelivered job keeps announcing the sections its predecessor finished
        self.fields: dict[str, Any] = {"started_at": started_at, "sections_done": list(sections_done or []),
                                       "progress": 0.0, "attempts": attempts}  # fmt: skip
        self._preview: Any = None
        self._pending: deque[tuple[str, dict[str, Any]]] = deque()  # (event, fields of that moment)
        self._cond = threading.Condition()
        self._closed = False
        self._last_queued = 0.0
        self._last_announced = 0.0
        self._thread = threading.Thread(target=self._run, name=f"framepack-reporter-{job_id[:8]}", daemon=True)
        self._thread.start()

    # -- the task thread ------------------------------------------------------------------
    def on_event(self, e: Any) -> None:
        from diffusers_helper import events as ev

        with self._cond:
            if isinstance(e, ev.Stage):
                self.fields.update(stage=e.text, message=e.text)
                self._queue("stage", {"stage": e.text, "message": e.text})
            elif isinstance(e, ev.PreviewReady):
                self._preview = e.preview
            elif isinstance(e, ev.Progress):
                self.fields.update(
                    stage="Sampling", message=e.message, progress=round(e.progress, 5), step=e.step,
                    steps=e.steps, section=e.section, sections=e.sections, eta=e.eta_seconds, prompt=e.prompt,
                )  # fmt: skip
                if e.step == e.steps or time.monotonic() - self._last_queued >= self.progress_interval:
                    self._queue("progress")
            elif isinstance(e, ev.Resumed):
                self.fields.update(stage=e.message, message=e.message, resumed_from_section=e.section)
                self._queue("stage", {"stage": e.message, "message": e.message})
            elif isinstance(e, ev.SectionDone):
                self.fields["sections_done"] = self.fields["sections_done"] + [
                    {"section": e.section, "frames": e.frames, "seconds": round(e.seconds, 3), "file": e.path.name}
                ]
                self.fields["message"] = e.message
                self._queue("section", {"message": e.message, "sections_done": self.fields["sections_done"]})

    def _queue(self, event: str, moment: dict[str, Any] | None = None) -> None:
        """Stage and section updates say what happened at that moment (``moment``); a
        progress update shows the latest fields when it is written."""
        self._last_queued = time.monotonic()
        if event == "progress" and self._pending and self._pending[-1][0] == "progress":
            return  # the pending one will carry these fields: latest wins
        self._pending.append((event, moment or {}))
        self._cond.notify()

    def close(self, timeout: float = 60.0) -> dict[str, Any]:
        """Stop after the pending updates (or ``timeout``); returns the fields the job's
        final carries on (the preview as last written)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("job %s: the update writer did not stop within %.0f s", self.job_id, timeout)
        with self._cond:
            return dict(self.fields)

    # -- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        with job_context(self.job_id):
            self._write_pending()

    def _write_pending(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                event, moment = self._pending.popleft()
                preview, self._preview = self._preview, None
                fields = {**self.fields, **moment}
            if preview is not None:  # base64 off the sampling thread, and only what is written
                fields["preview"] = preview_field(base64.b64encode(preview.jpeg).decode(), preview.frames,
                                                  preview.tile_width, preview.tile_height)  # fmt: skip
            if not self._write(event, fields):
                with self._cond:
                    if preview is not None and self._preview is None:
                        self._preview = preview  # not shown yet: the next write tries again
                time.sleep(RETRY_PAUSE)
                continue
            with self._cond:
                if "preview" in fields:
                    self.fields["preview"] = fields["preview"]  # sticky from now on

    def _write(self, event: str, fields: dict[str, Any]) -> bool:
        meta = make_meta(self.seq + 1, JobState.RUNNING, event=event, **fields)
        try:
            self.task.update_state(task_id=self.job_id, state=STATE_TO_CELERY[JobState.RUNNING], meta=meta)
        except Exception as exc:  # noqa: BLE001 — Redis down: drop it, never fail the job for progress
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
            log.warning("job %s: %s update dropped (%s: %s)", self.job_id, event, type(exc).__name__, exc)
            return False
        self.seq += 1
        self.written += 1
        try:
            self.lifecycle.save_seq(self.job_id, self.seq)
        except redis.RedisError:
            pass  # the meta holds it; the job's end takes the larger of the two
        self._announce(meta)
        if event == "section" and self.section_webhook:
            try:
                self.lifecycle.webhook_event(self.job_id, "section", meta)
            except Exception as exc:  # noqa: BLE001 — a webhook is never worth stopping the updates
                log.warning("job %s: section webhook not logged (%s: %s)", self.job_id, type(exc).__name__, exc)
        return True

    def _announce(self, meta: dict[str, Any]) -> None:
        """Flower and the all-jobs feed hear of progress at most once a second."""
        now = time.monotonic()
        if now - self._last_announced < ANNOUNCE_EVERY:
            return
        self._last_announced = now
        event, fields = flower_event(JobState.RUNNING, meta)
        try:
            with self.task.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                dispatcher.send(event, uuid=self.job_id, **fields)
        except Exception:  # noqa: BLE001 — events disabled or a broker hiccup: progress still flows
            pass
        keep = ("stage", "progress", "step", "steps", "section", "sections", "eta")
        try:
            self.lifecycle.r.publish(Keys.EVENTS, feed_event("progress", self.job_id, JobState.RUNNING,
                                                             seq=meta["seq"], owner=self.owner,
                                                             **{k: meta.get(k) for k in keep}))
        except redis.RedisError:
            pass
