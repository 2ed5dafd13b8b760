"""The one background place where jobs end without anyone asking (torch- and Flask-free).

Every ``sweep_seconds`` one process (a Redis lock elects it among every web process) :

- **lost**: a running job whose worker is gone (its heartbeat and the worker's own record
  expired: the whole Celery worker died, not just a pool child, which Celery's parent
  requeues itself) has its unacknowledged message put back at the head of the queue
  (kombu's own restore), so the next worker resumes it from its last section checkpoint
  within a minute instead of after the broker's visibility timeout (the longest job plus
  an hour: a live job's message must never come back while it runs);
- **stalled**: a running job whose worker's heartbeat is gone for ``stall_fail_seconds``
  fails as "worker lost"; its cancel flag is set, so a worker that wakes up stops at its
  next step and keeps that verdict;
- **revoked**: a queued job that ``celery control revoke`` named (the workers' revoked
  lists, ``inspect().revoked()``) is cancelled now, not when its message is delivered;
- **purged**: a queued job whose message is in no broker queue, no worker's hands and no
  unacknowledged set, in two sweeps in a row, is cancelled ("purged from the broker");
- **expired**: index entries whose records expired (``result_expires``) go, with files
  (the per-token indexes too);
- **webhooks**: a job whose webhook delivery has been due for a minute (its task was lost:
  the broker refused it, or a webhook worker died holding a retry) gets a delivery task again.

Reads never end jobs: ``GET`` only reports ``stalled``; this module acts on it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from . import webhooks
from .lifecycle import Lifecycle
from .protocol import QUEUE, JobState, Keys, Reason
from .settings import connect

log = logging.getLogger("framepack.sweeper")

#: kombu's Redis transport keeps priority levels in lists ``<queue>``, ``<queue>\x06\x163``...
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
#: A queued job is only considered lost this long after it was submitted (dispatch is not
#: atomic with the record) and must be missing in two sweeps in a row.
PURGE_GRACE_SECONDS = 10.0


class Broker:
    """What the sweep needs to know of the broker and the workers.

    ``nodes()`` names the Celery workers expected to answer ``inspect`` (from their
    heartbeat records: the ``gpu`` workers), so a broadcast goes to them only and returns as
    soon as they all did instead of waiting out its timeout (the ``webhooks`` worker, which
    holds no job, must not count as one of them)."""

    def __init__(self, celery: Any, nodes: Callable[[], set[str]] | None = None, inspect_timeout: float = 1.0):
        self.celery = celery
        self.url = celery.conf.broker_url or ""
        self.nodes = nodes or set
        self.inspect_timeout = inspect_timeout
        self._redis: redis.Redis | None = None

    def _inspect(self, method: str) -> dict[str, list] | None:
        try:
            nodes = sorted(self.nodes())
            inspect = self.celery.control.inspect(timeout=self.inspect_timeout, limit=len(nodes) or None,
                                                  destination=nodes or None)  # fmt: skip
            replies = getattr(inspect, method)()
        except Exception as exc:  # noqa: BLE001 — broker unreachable: decide nothing this time
            log.warning("inspect %s failed: %s", method, exc)
            return None
        return replies or {}  # no worker answered: none holds anything

    def revoked(self) -> set[str]:
        return {i for ids in (self._inspect("revoked") or {}).values() for i in ids}

    def held_by_workers(self) -> set[str] | None:
        """Task ids the workers have reserved or are running; None if the broadcast failed."""
        held: set[str] = set()
        for method in ("active", "reserved"):
            replies = self._inspect(method)
            if replies is None:
                return None
            for tasks in replies.values():
                held.update(t.get("id") for t in tasks if t.get("id"))
        return held

    def waiting(self) -> set[str] | None:
        """Ids of the messages in the broker (queued or delivered-unacknowledged), or None
        where the broker cannot list them (AMQP: then only an empty queue is conclusive)."""
        if self.url.startswith(("redis://", "rediss://", "unix://")):
            if self._redis is None:
                self._redis = connect(self.url, 2.0)
            r = self._redis
            ids: set[str] = set()
            for key in (QUEUE, *(f"{QUEUE}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS)):
                for raw in r.lrange(key, 0, -1):
                    ids.add(_message_id(raw))
            for raw in r.hvals("unacked"):  # delivered, not yet acknowledged: [message, exchange, key]
                try:
                    ids.add(json.loads(raw)[0]["headers"]["id"])
                except (ValueError, IndexError, KeyError, TypeError):
                    continue
            return ids
        count = self._amqp_count()
        return set() if count == 0 else None

    def restore_unacked(self, job_id: str) -> bool:
        """Put ``job_id``'s delivered-but-unacknowledged message back at the head of its queue
        (the Redis transport's ``unacked`` hash, through kombu's ``restore_by_tag``); False
        when it is not there (AMQP gives a dead consumer's messages back by itself)."""
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            return False
        if self._redis is None:
            self._redis = connect(self.url, 2.0)
        for tag, raw in self._redis.hgetall("unacked").items():
            try:
                found = json.loads(raw)[0]["headers"]["id"] == job_id
            except (ValueError, IndexError, KeyError, TypeError):
                continue
            if found:
                with self.celery.connection_for_write() as conn:
                    conn.default_channel.qos.restore_by_tag(tag.decode())  # to the end consumed first
                return True
        return False

    def depth(self) -> int | None:
        """Messages waiting in the ``gpu`` queue (not yet delivered to a worker); None
        when the broker cannot be asked."""
        if self.url.startswith(("redis://", "rediss://", "unix://")):
            if self._redis is None:
                self._redis = connect(self.url, 2.0)
            pipe = self._redis.pipeline(transaction=False)
            for key in (QUEUE, *(f"{QUEUE}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS)):
                pipe.llen(key)
            return sum(pipe.execute())
        return self._amqp_count()

    def _amqp_count(self) -> int | None:
        try:
            with self.celery.connection_for_read() as conn:
                return conn.default_channel.queue_declare(QUEUE, passive=True).message_count
        except Exception as exc:  # noqa: BLE001
            log.warning("could not read the broker queue length: %s", exc)
            return None


def _message_id(raw: bytes | str) -> str:
    try:
        return json.loads(raw).get("headers", {}).get("id", "")
    except (ValueError, AttributeError):
        return ""


class Sweeper:
    def __init__(self, lifecycle: Lifecycle, broker: Broker | None, remove_files: Callable[[str], None],
                 on_redis_error: Callable[[], Any] | None = None):  # fmt: skip
        self.on_redis_error = on_redis_error
        self.lc = lifecycle
        self.r = lifecycle.r
        self.settings = lifecycle.settings
        self.broker = broker
        self.remove_files = remove_files
        self._thread: threading.Thread | None = None
        self._lost_since: dict[str, float] = {}  # job id -> when a sweep first found its worker gone

    # -- one pass ----------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> dict[str, list[str]]:
        now = time.time() if now is None else now
        done = {"lost": self._lost(now), "stalled": self._stalled(now), "revoked": [], "purged": [],
                "expired": self._expired(now), "webhooks": self._webhooks(now)}  # fmt: skip
        queued = [i.decode() for i in self.r.zrange(Keys.QUEUED, 0, -1)]
        if queued and self.broker is not None:
            done["revoked"] = self._revoked(queued)
            queued = [i for i in queued if i not in done["revoked"]]
            done["purged"] = self._purged(queued, now)
        return done

    def _silent(self, job_id: str, rec: dict[str, Any], now: float) -> float:
        """Seconds since the job last showed life (its start or its last update)."""
        meta = self.r.get(Keys.celery_meta(job_id))
        last_update = ((json.loads(meta).get("result") or {}) if meta else {}).get("emitted_at") or 0
        return now - max(rec.get("started_at") or 0, last_update)

    def _lost(self, now: float) -> list[str]:
        """Running jobs whose whole worker is gone: their message goes back to the queue.

        Gone means: no heartbeat of the job and no record of its worker, in every sweep for
        ``heartbeat_ttl`` seconds.  One look is not enough: after a Redis outage longer than the
        TTL both keys have expired while the worker lives on, and it writes them again within
        a heartbeat period; restoring its message then would start a second run."""
        if self.broker is None:
            return []
        restored = []
        running = {raw.decode() for raw in self.r.zrange(Keys.RUNNING, 0, -1)}
        self._lost_since = {j: t for j, t in self._lost_since.items() if j in running}
        for job_id in running:
            rec = self.lc.record(job_id)
            if rec is None or self.r.exists(Keys.heartbeat(job_id)) or self.r.exists(Keys.worker(rec.get("worker"))):
                self._lost_since.pop(job_id, None)
                continue
            ttl = self.settings.heartbeat_ttl
            if now - self._lost_since.setdefault(job_id, now) < ttl or self._silent(job_id, rec, now) < ttl:
                continue
            self._lost_since.pop(job_id, None)
            if self.broker.restore_unacked(job_id):
                log.warning("job %s: its worker %s is gone; its message is back at the head of the queue (it "
                            "resumes from its last checkpoint)", job_id, rec.get("worker"), extra={"job_id": job_id})
                restored.append(job_id)
        return restored

    def _stalled(self, now: float) -> list[str]:
        ended = []
        for raw in self.r.zrange(Keys.RUNNING, 0, -1):
            job_id = raw.decode()
            if self.r.exists(Keys.heartbeat(job_id)):
                continue
            rec = self.lc.record(job_id)
            if rec is None:
                self.r.zrem(Keys.RUNNING, job_id)
                continue
            silent = self._silent(job_id, rec, now)
            if silent < self.settings.stall_fail_seconds:
                continue
            self.lc.request_cancel(job_id)  # a worker that wakes up stops at its next step
            if self.lc.finish(job_id, JobState.FAILED, error=Reason.STALLED.format(seconds=silent)):
                ended.append(job_id)
        return ended

    def _revoked(self, queued: list[str]) -> list[str]:
        revoked = self.broker.revoked() & set(queued)
        return [j for j in revoked if self.lc.finish(j, JobState.CANCELLED, reason=Reason.REVOKED)]

    def _purged(self, queued: list[str], now: float) -> list[str]:
        old = [j for j in queued if now - (self.r.zscore(Keys.JOBS, j) or now) > PURGE_GRACE_SECONDS]
        if not old:
            self.r.delete(Keys.MISSING)
            return []
        waiting = self.broker.waiting()
        if waiting is None:
            return []  # the broker cannot tell (AMQP with messages waiting)
        held = self.broker.held_by_workers()
        if held is None:
            return []
        missing = [j for j in old if j not in waiting and j not in held]
        seen_before = {k.decode() for k in self.r.hkeys(Keys.MISSING)}
        p = self.r.pipeline(transaction=False)
        p.delete(Keys.MISSING)
        if missing:
            p.hset(Keys.MISSING, mapping={j: repr(now) for j in missing})
        p.execute()
        purged = []
        for job_id in (j for j in missing if j in seen_before):
            if self.lc.finish(job_id, JobState.CANCELLED, reason=Reason.PURGED):
                purged.append(job_id)
        return purged

    def _expired(self, now: float) -> list[str]:
        """Index entries whose record expired (``result_ttl``), and their files.  An entry
        whose files cannot be removed (the bucket unreachable) stays for the next sweep."""
        cutoff = now - self.settings.result_ttl
        old = [i.decode() for i in self.r.zrangebyscore(Keys.JOBS, 0, cutoff)]
        gone = []
        for job_id in (i for i in old if not self.r.exists(Keys.job(i))):
            try:
                self.remove_files(job_id)
            except Exception as exc:  # noqa: BLE001 — tried again next sweep
                log.warning("sweep: files of expired job %s not removed: %s", job_id, exc, extra={"job_id": job_id})
                continue
            gone.append(job_id)
        owners = [o.decode() for o in self.r.smembers(Keys.OWNERS)]
        if gone:
            for index in (Keys.JOBS, Keys.QUEUED, Keys.RUNNING, Keys.WEBHOOKS_DUE,
                          *(Keys.owner_queued(o) for o in owners)):  # fmt: skip
                self.r.zrem(index, *gone)
        for owner in owners:  # each token's listing: the same cutoff (scores are creation times)
            index = Keys.owner_jobs(owner)
            stale = [i for i in self.r.zrangebyscore(index, 0, cutoff) if not self.r.exists(Keys.job(i.decode()))]
            if stale:
                self.r.zrem(index, *stale)
        return gone

    def _webhooks(self, now: float) -> list[str]:
        """Send the delivery task again for jobs whose delivery is overdue (lost task)."""
        if self.lc.dispatch is None:
            return []
        late = webhooks.overdue(self.r, now)
        for job_id in late:
            self.r.zadd(Keys.WEBHOOKS_DUE, {job_id: now})  # not again before RECOVER_AFTER
            self.lc.deliver_webhooks(job_id)
        return late

    # -- the background thread -----------------------------------------------------------------
    def start(self, owner: str) -> None:
        """Sweep in a daemon thread, in whichever process holds the lock at the time."""
        if self._thread is not None:
            return

        def loop() -> None:
            every = self.settings.sweep_seconds
            while True:
                try:
                    if self.r.set(Keys.SWEEPER, owner, nx=True, ex=max(1, int(every * 3))) or (
                        self.r.get(Keys.SWEEPER) or b""
                    ).decode() == owner:
                        self.r.expire(Keys.SWEEPER, max(1, int(every * 3)))
                        done = self.sweep()
                        for kind, ids in done.items():
                            for job_id in ids:
                                log.log(logging.INFO if kind == "expired" else logging.WARNING, "sweep: %s job %s",
                                        kind, job_id, extra={"job_id": job_id})  # fmt: skip
                except redis.RedisError as exc:
                    if self.on_redis_error is not None:
                        self.on_redis_error()
                    log.warning("sweep skipped: %s", exc)
                except Exception:  # noqa: BLE001 — the sweep must outlive any one bad record
                    log.exception("sweep failed")
                time.sleep(every)

        self._thread = threading.Thread(target=loop, name="framepack-sweeper", daemon=True)
        self._thread.start()
