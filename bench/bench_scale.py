"""Thousands of watchers per web host: one running job, N watchers, gevent vs thread-per-socket.

    python -m bench.bench_scale [--smoke] [--watchers 100,500,1000,2000] [--servers gevent,gthread]
                                [--sse-share 0.25] [--clients 4] [--web-processes 1]
                                [--library-clients] [--json OUT]

Why: a popular job is watched by many browsers at once, and each watcher holds a
connection to the web tier for the whole run.  ``gevent`` (the default web server) holds
one greenlet per connection; ``gthread`` (what the web tier ran before) one thread per
socket, here given ``N + 100`` threads so it is not capped: today's thread-per-socket
numbers.  (gunicorn's gthread worker also stops accepting new connections at
``--worker-connections``, 1,000 by default, which ``stack.web_command`` never set: the old
command line served at most 1,000 watchers per process, however many threads it had.  Here
it gets ``N + 1100``.)

For each server and each N, on a fresh stack (Valkey + one web process, no worker yet):

1. one tiny-profile job is submitted and waits in the queue;
2. N watchers attach from ``--clients`` processes (asyncio, garbage collector off, spawned):
   3 of every 4 WebSockets on ``/ws/jobs/<id>``, 1 of every 4 SSE on ``/api/jobs/<id>/events``
   (``--sse-share``), in batches so the listen backlog is not flooded.  The watchers are lean
   socket clients that parse only frame or event boundaries and each message's head: the
   websockets and httpx libraries spent about as much CPU per message as the server
   (``--library-clients`` uses them), and on two shared cores that, not the server, set
   the latencies;
3. a listener process subscribes to the job's Celery result channel (``celery-task-meta-<id>``),
   then the worker starts.  The moment each ``seq`` reaches the listener's socket (the
   kernel's timestamp, so the listener's own scheduling does not count) is the reference:
   latency = a watcher's receive time − that moment (one machine, one clock), over every
   (watcher, update) pair;
4. while the job runs, a REST prober GETs ``/api/jobs/<id>`` every 100 ms, and the web
   process's RSS and the CPU of every party (web, clients, worker, Valkey) are sampled;
   the web tier's ``framepack_web_fanout_seconds`` gives its own time per fan-out (wall; one
   update or several that arrived together), and ``framepack_web_fanout_cpu_seconds`` the CPU
   time of it.
5. once, after the runs: the floor (:func:`send_floor`), one bare ``send`` per watcher.

Everything shares this machine's cores, the measuring clients included: read the cores
column before reading the latencies.  Each result also has every update's p50 / p99
(``by_update``: where the tail is) and the slowest REST probes with their times.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import multiprocessing as mp
import os
import re
import resource
import socket
import statistics
import struct
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil  # noqa: F401  (imported now, not in the middle of a run: see CpuWindow)

from bench.bench_overhead import noise_png
from bench.harness import BenchStack, bench_main, cpu_delta, cpu_seconds, machine_facts, percentiles, rss_mb

#: 42 updates (7 stages, 2 × 16 progress, 2 sections, final) over ~30 s on a 2-core CPU,
#: with ~9 KB previews (256 bucket); the smoke job: ~10 updates in ~2 s.
FORM = {"total_second_length": "2", "steps": "16", "resolution": "256", "seed": "1"}
SMOKE_FORM = {"total_second_length": "1", "steps": "4", "seed": "1"}
WATCHERS = (100, 500, 1000, 2000)
SERVERS = ("gevent", "gthread")
BATCH, BATCH_PAUSE = 50, 0.05  # each client attaches this many watchers, then pauses (listen backlog)
ATTACH_TIMEOUT = 300.0  # every watcher attached or failed by then
SNAPSHOT_TIMEOUT = 60.0  # a connection without its snapshot by then has failed
REFUSALS = (429, 503)  # what a server at capacity answers (a WebSocket: close 1013)
RUN_TIMEOUT = 600.0  # the job's final on the channel by then
DRAIN_TIMEOUT = 60.0  # after the final, watchers still waiting for theirs are given up
PROBE_PERIOD = 0.1
RSS_PERIOD = 0.2

SEQ = re.compile(r'"seq":(\d+)')
TYPE = re.compile(r'^\{"type":"(\w+)"')


# -- watchers (client processes) ----------------------------------------------------------------
class Gate:
    """One client process's watchers: ready once each is attached or failed, done once each
    has its final or has ended; sockets close only when ``release`` is set (closing hundreds
    at once would compete with the finals other watchers are still receiving)."""

    def __init__(self, n: int):
        self.n, self.settled, self.ended = n, 0, 0
        self.ready, self.done, self.release = asyncio.Event(), asyncio.Event(), asyncio.Event()


class Watcher:
    """What one watcher saw: every message after its snapshot as (seq, type, receive time)."""

    def __init__(self, kind: str, gate: Gate):
        self.kind, self.gate = kind, gate  # kind: ws or sse
        self.attached = False  # got its snapshot
        self.final = False
        self.failure: tuple[str, str] | None = None  # ("refused", status or close code) or ("error", what)
        self.messages: list[tuple[int, str, float]] = []
        self._settled = self._ended = False
        self.first, self.ended = asyncio.Event(), asyncio.Event()  # for the lean clients

    def message(self, text: str, now: float) -> None:
        """Regexes, not ``json.loads``: the clients share the cores with the server under test."""
        kind = TYPE.match(text)
        if not self.attached:
            self.attached = True
            self.first.set()
            self.settle()
            if kind and kind.group(1) == "snapshot":
                return
        seq = SEQ.search(text)
        if kind and seq:
            self.messages.append((int(seq.group(1)), kind.group(1), now))
            if kind.group(1) == "final":
                self.final = True
                self.end()

    def fail(self, how: str, detail: str) -> None:
        if not self.final and self.failure is None:
            self.failure = (how, detail)

    def settle(self) -> None:
        """Attached or failed: counted once."""
        if not self._settled:
            self._settled = True
            self.gate.settled += 1
            if self.gate.settled == self.gate.n:
                self.gate.ready.set()

    def end(self) -> None:
        """Final received or failed: counted once (and settled, if it failed before its snapshot)."""
        self.settle()
        self.ended.set()
        if not self._ended:
            self._ended = True
            self.gate.ended += 1
            if self.gate.ended == self.gate.n:
                self.gate.done.set()

    def report(self) -> tuple:
        return (self.kind, self.attached, self.final, self.failure, self.messages)


async def _ws_watcher(url: str, w: Watcher) -> None:
    import websockets

    try:
        async with websockets.connect(url, max_size=None, compression=None, open_timeout=60, ping_interval=None,
                                      close_timeout=5) as ws:  # fmt: skip
            try:
                w.message(_text(await asyncio.wait_for(ws.recv(), SNAPSHOT_TIMEOUT)), time.time())
                async for raw in ws:
                    w.message(_text(raw), time.time())
                    if w.final:
                        break
            except websockets.ConnectionClosed:
                pass
            except TimeoutError:
                w.fail("error", "no snapshot")
            # closed before its snapshot: at capacity the server says 1013 (try again later)
            w.fail("refused" if ws.close_code == 1013 else "error", f"ws {ws.close_code}")
            w.end()
            await w.gate.release.wait()
    except websockets.InvalidStatus as exc:
        status = exc.response.status_code
        w.fail("refused" if status in REFUSALS else "error", f"http {status}")
    except (OSError, TimeoutError, websockets.WebSocketException) as exc:
        w.fail("error", type(exc).__name__)
    finally:
        w.settle()
        w.end()


def _text(raw: str | bytes) -> str:
    return raw if isinstance(raw, str) else raw.decode()


async def _sse_events(r: httpx.Response) -> Any:
    """``text/event-stream``: ``id:``, ``event:`` and ``data:`` lines, a blank line ends an
    event; yields each event's data (the message the WebSocket sends) and its receive time."""
    data: list[str] = []
    async for line in r.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield "\n".join(data), time.time()
            data = []


async def _sse_watcher(client: httpx.AsyncClient, url: str, w: Watcher) -> None:
    try:
        async with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as r:
            if r.status_code != 200:  # at capacity the server says 503 (Retry-After)
                w.fail("refused" if r.status_code in REFUSALS else "error", f"http {r.status_code}")
                return
            events = _sse_events(r)
            try:
                w.message(*await asyncio.wait_for(anext(events), SNAPSHOT_TIMEOUT))
                async for text, now in events:
                    w.message(text, now)
                    if w.final:
                        break
            except TimeoutError:
                w.fail("error", "no snapshot")
            except StopAsyncIteration:
                pass
            w.fail("error", "sse ended")
            w.end()
            await w.gate.release.wait()
    except (httpx.HTTPError, OSError) as exc:
        w.fail("error", type(exc).__name__)
    finally:
        w.settle()
        w.end()


# -- lean watchers: the load generator must cost far less than the server it measures ---------
class _RawStream(asyncio.Protocol):
    """One watcher over a bare socket: an HTTP request, then the server's bytes parsed in place.

    A WebSocket or SSE client library costs the measuring process ~0.1 ms per message
    (measured: 11.5 s of client CPU for 2,000 library watchers over one job, more than the
    web process itself); on two shared cores that cost, not the server, set the latencies.
    These parse only what a watcher needs (frame or event boundaries, the head of each
    message) and take one timestamp per read."""

    def __init__(self, w: Watcher, request: bytes):
        self.w, self.request = w, request
        self.buf = b""
        self.head_done = False
        self.closed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = int(self.buf.split(b" ", 2)[1])
            self.buf = self.buf[end + 4 :]
            self.head_done = True
            if status != self.ok:
                self.w.fail("refused" if status in REFUSALS else "error", f"http {status}")
                self.transport.close()
                return
        self.parse(now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _RawWs(_RawStream):
    ok = 101

    def parse(self, now: float) -> None:
        buf, pos = self.buf, 0
        while len(buf) - pos >= 2:
            opcode, n, head = buf[pos] & 0x0F, buf[pos + 1] & 0x7F, 2
            if n == 126:
                n, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                n, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if len(buf) - pos < head + n:
                break
            start = pos + head
            if opcode == 1:
                self.w.message(buf[start : start + min(n, 400)].decode(errors="ignore"), now)
            elif opcode == 8:  # close: at capacity the server says 1013 (try again later)
                code = int.from_bytes(buf[start : start + 2], "big") if n >= 2 else 1005
                if not self.w.final:
                    self.w.fail("refused" if code == 1013 else "error", f"ws {code}")
                self.w.end()
            elif opcode == 9:  # ping: a masked pong with the same payload
                self.transport.write(_masked(0x8A, buf[start : start + n]))
            pos = start + n
        self.buf = buf[pos:]
        if self.w.final:
            self.w.end()


class _RawSse(_RawStream):
    ok = 200

    def parse(self, now: float) -> None:
        buf, pos = self.buf, 0
        while (end := buf.find(b"\n\n", pos)) >= 0:
            data = buf.find(b"data: ", pos, end)
            if data >= 0:  # comments (keep-alive) carry no data
                self.w.message(buf[data + 6 : min(end, data + 406)].decode(errors="ignore"), now)
            pos = end + 2
        self.buf = buf[pos:]
        if self.w.final:
            self.w.end()


def _masked(first: int, payload: bytes) -> bytes:
    """A client frame (clients must mask); the all-zero mask keeps the payload as is."""
    return bytes((first, 0x80 | len(payload))) + b"\0\0\0\0" + payload


async def _raw_watcher(host: str, port: int, path: str, kind: str, w: Watcher) -> None:
    if kind == "ws":
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()  # fmt: skip
        factory: Callable[[], _RawStream] = lambda: _RawWs(w, request)  # noqa: E731
    else:  # HTTP/1.0: the stream's bytes as they are, no chunked framing to undo
        request = f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
        factory = lambda: _RawSse(w, request)  # noqa: E731
    loop = asyncio.get_running_loop()
    try:
        _transport, proto = await loop.create_connection(factory, host, port)
    except OSError as exc:
        w.fail("error", type(exc).__name__)
        w.settle()
        w.end()
        return
    first = asyncio.ensure_future(w.first.wait())
    await asyncio.wait([proto.closed, first], timeout=SNAPSHOT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    if not w.attached:
        w.fail("error", "no snapshot" if not proto.closed.done() else f"{kind} closed")
    w.settle()
    if w.attached:
        ended = asyncio.ensure_future(w.ended.wait())
        await asyncio.wait([proto.closed, ended], return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if not w.final:
            w.fail("error", f"{kind} ended")
    first.cancel()
    w.end()
    await w.gate.release.wait()
    proto.transport.close()


@dataclass(frozen=True)
class Setup:
    """How the watchers and the web tier are run (the command-line flags of a run)."""

    sse_share: float = 0.25
    clients: int = 4
    library: bool = False
    web_processes: int = 1

    def flags(self) -> str:
        """The command-line flags that give this setup."""
        return ((f" --sse-share {self.sse_share:g}" if self.sse_share != 0.25 else "")
                + (f" --clients {self.clients}" if self.clients != 4 else "")
                + (" --library-clients" if self.library else "")
                + (f" --web-processes {self.web_processes}" if self.web_processes > 1 else ""))  # fmt: skip


def is_sse(i: int, share: float) -> bool:
    """Watcher ``i`` is an SSE one: spreads ``share`` evenly (0.25: every 4th, from the 4th)."""
    return int((i + 1) * share) > int(i * share)


def _client_process(ws_url: str, sse_url: str, first: int, n: int, setup: Setup, conn: Any) -> None:
    """``n`` watchers (global numbers ``first``...); says "ready", then sends what each saw."""
    gc.disable()  # the measuring client must not add its own collector pauses to the numbers
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def main() -> None:
        gate = Gate(n)
        watchers = [Watcher("sse" if is_sse(first + k, setup.sse_share) else "ws", gate) for k in range(n)]
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60, read=None), trust_env=False) as sse:
            tasks = []
            for k, w in enumerate(watchers):
                if not setup.library:
                    url = urlsplit(ws_url if w.kind == "ws" else sse_url)
                    coro = _raw_watcher(url.hostname, url.port, url.path, w.kind, w)
                elif w.kind == "ws":
                    coro = _ws_watcher(ws_url, w)
                else:
                    coro = _sse_watcher(sse, sse_url, w)
                tasks.append(asyncio.create_task(coro))
                if k % BATCH == BATCH - 1:
                    await asyncio.sleep(BATCH_PAUSE)
            try:
                await asyncio.wait_for(gate.ready.wait(), ATTACH_TIMEOUT)
            except TimeoutError:
                pass
            conn.send(("ready", sum(w.attached for w in watchers)))
            before = _cpu_self()
            stop = asyncio.create_task(_stopped(conn))
            await asyncio.wait([asyncio.create_task(gate.done.wait()), stop], return_when=asyncio.FIRST_COMPLETED)
            conn.send(("result", [w.report() for w in watchers], _cpu_self() - before))
            gate.release.set()
            stop.cancel()
            _done, pending = await asyncio.wait(tasks, timeout=10)
            for t in pending:
                t.cancel()

    asyncio.run(main())


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _stopped(conn: Any) -> None:
    """The bench process gave up waiting (``stop``)."""
    while not conn.poll():
        await asyncio.sleep(0.2)
    conn.recv()


# -- the bench process --------------------------------------------------------------------------
#: Linux's SO_TIMESTAMPNS (the socket module has no name for it): the kernel stamps what a
#: socket receives with the time it arrived (SCM_TIMESTAMPNS, a struct timespec).
SO_TIMESTAMPNS = 35


def _resp_array(buf: bytearray) -> tuple[list, int] | None:
    """A RESP2 array of bulk strings and integers at the start of ``buf`` (a pub/sub message
    or subscribe reply) and its length; None while incomplete."""
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    count, pos, items = int(buf[1:end]), end + 2, []
    for _ in range(count):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        if buf[pos] == ord(":"):
            items.append(int(buf[pos + 1 : end]))
            pos = end + 2
            continue
        size, start = int(buf[pos + 1 : end]), end + 2
        if len(buf) < start + size + 2:
            return None
        items.append(bytes(buf[start : start + size]))
        pos = start + size + 2
    return items, pos


class StampedSubscriber:
    """``SUBSCRIBE`` on a raw socket; each message comes with the kernel's time of arrival of
    the read it began in, not the time this process got to read it: on a loaded 2-core
    machine a listener (a thread here, then a process of its own) was woken up to 60 ms after
    watchers had an update.  When several messages wait in one read they share its time (the
    latest), which can only shorten the latencies measured against them."""

    def __init__(self, redis_url: str, channel: str):
        url = urlsplit(redis_url)
        self.sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379), timeout=30)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        name = channel.encode()
        self.sock.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(name), name))
        self.buf = bytearray()
        self.stamps: list[tuple[int, float]] = []  # (offset in buf where a read began, its arrival time)

    def read(self, timeout: float) -> list[tuple[list, float]]:
        """What one read completed: [(RESP array, arrival time)]; [] after ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
        except TimeoutError:
            return []
        if not data:
            raise ConnectionError("Valkey closed the subscription")
        stamp = time.time()
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", raw[:16])
                stamp = sec + nsec / 1e9
        self.stamps.append((len(self.buf), stamp))
        self.buf += data
        out = []
        while self.buf and (parsed := _resp_array(self.buf)) is not None:
            items, size = parsed
            out.append((items, max(s for s in self.stamps if s[0] <= 0)[1]))
            del self.buf[:size]
            shifted = [(offset - size, t) for offset, t in self.stamps]
            self.stamps = shifted[max(i for i, (offset, _t) in enumerate(shifted) if offset <= 0) :]
        return out

    def close(self) -> None:
        self.sock.close()


def _listen_process(redis_url: str, key: str, events: tuple, conn: Any) -> None:
    """The reference clock: the arrival time of each update on the job's Celery channel."""
    from tasks.protocol import TERMINAL, message_type, parse_celery_payload

    subscribed, running, finished, halt = events
    seen: dict[int, tuple[float, str]] = {}  # seq -> (arrival time, message type)
    lag_ms: list[float] = []  # arrival − the worker's emitted_at (its Redis write included)
    subscriber = StampedSubscriber(redis_url, key)
    while not halt.is_set():
        for items, stamp in subscriber.read(0.2):
            if items[0] == b"subscribe":
                subscribed.set()
                continue
            state, meta = parse_celery_payload(items[2])
            seq = meta.get("seq")
            if seq is None or seq in seen:
                continue  # Celery's own writes carry no seq
            seen[seq] = (stamp, "final" if state in TERMINAL else message_type(meta))
            lag_ms += [(stamp - float(meta["emitted_at"])) * 1000] if meta.get("emitted_at") else []
            if not running.is_set():
                running.set()
            if state in TERMINAL:
                finished.set()
    subscriber.close()
    conn.send((seen, lag_ms))


class Channel:
    """The reference clock: when each ``seq`` was published on the job's Celery channel.

    Subscribed before the worker starts, so every update of the run is seen; ``running`` is
    set at the first update, ``finished`` at the final; :meth:`stop` brings ``seen`` back."""

    def __init__(self, stack: BenchStack, job_id: str):
        from tasks.protocol import Keys

        ctx = mp.get_context("spawn")
        self.subscribed, self.running, self.finished, self._halt = (ctx.Event() for _ in range(4))
        self._conn, child = ctx.Pipe()
        events = (self.subscribed, self.running, self.finished, self._halt)
        self._proc = ctx.Process(target=_listen_process, args=(stack.redis_url, Keys.celery_meta(job_id), events,
                                                                child), daemon=True)  # fmt: skip
        self.seen: dict[int, tuple[float, str]] = {}
        self.lag_ms: list[float] = []

    def __enter__(self) -> Channel:
        self._proc.start()
        if not self.subscribed.wait(60):
            raise RuntimeError("could not subscribe to the job's channel")
        return self

    def stop(self) -> None:
        self._halt.set()
        if self._conn.poll(30):
            self.seen, self.lag_ms = self._conn.recv()

    def __exit__(self, *exc: Any) -> None:
        self._halt.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()


class Every(threading.Thread):
    """Call ``fn`` every ``period`` seconds until stopped (a late call is not made up for)."""

    def __init__(self, period: float, fn: Callable[[], None], name: str):
        super().__init__(name=name, daemon=True)
        self.period, self.fn = period, fn
        self._halt = threading.Event()

    def run(self) -> None:
        due = time.monotonic()
        while not self._halt.is_set():
            self.fn()
            due = max(due + self.period, time.monotonic())
            self._halt.wait(due - time.monotonic())

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(35)


class Prober:
    """``GET /api/jobs/<id>`` (what a page or a script polls): does REST stay responsive
    while thousands of watchers are served?"""

    def __init__(self, base: str, job_id: str):
        self.client = httpx.Client(base_url=base, timeout=30, trust_env=False)
        self.path = f"/api/jobs/{job_id}"
        self.ms: list[float] = []
        self.at: list[float] = []  # when each probe began (time.time(), the watchers' clock)
        self.statuses: dict[str, int] = {}

    def probe(self) -> None:
        self.at.append(time.time())
        t0 = time.perf_counter()
        try:
            status = str(self.client.get(self.path).status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        self.ms.append((time.perf_counter() - t0) * 1000)
        self.statuses[status] = self.statuses.get(status, 0) + 1


def _probe_process(base: str, job_id: str, running: Any, stop: Any, conn: Any) -> None:
    """Probe every 100 ms from the job's first update until ``stop``.  A process of its own:
    an HTTP client in this process would hold the GIL the reference clock's thread needs."""
    prober = Prober(base, job_id)
    while not running.wait(0.1):
        if stop.is_set():
            break
    ticks = Every(PROBE_PERIOD, prober.probe, "bench-rest")
    if running.is_set():
        ticks.start()
    stop.wait()
    ticks.stop()
    conn.send((prober.ms, prober.at, prober.statuses))


class ProbeProcess:
    """The REST prober's process; :meth:`finish` stops it and returns (ms, statuses)."""

    def __init__(self, stack: BenchStack, job_id: str, running: Any):
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_probe_process, args=(stack.base, job_id, running, self._stop, child),
                                 daemon=True)  # fmt: skip
        self.ms: list[float] = []
        self.at: list[float] = []
        self.statuses: dict[str, int] = {}

    def __enter__(self) -> ProbeProcess:
        self._proc.start()
        return self

    def finish(self) -> None:
        self._stop.set()
        if self._conn.poll(60):
            self.ms, self.at, self.statuses = self._conn.recv()

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()


class Clients:
    """The watcher processes: ``n`` watchers split over ``processes`` spawned clients."""

    def __init__(self, stack: BenchStack, job_id: str, n: int, setup: Setup):
        ctx = mp.get_context("spawn")
        processes = max(1, min(setup.clients, n))
        sizes = [n // processes + (i < n % processes) for i in range(processes)]
        ws_url, sse_url = f"{stack.ws_base}/ws/jobs/{job_id}", f"{stack.base}/api/jobs/{job_id}/events"
        self.conns, self.procs, first = [], [], 0
        for size in sizes:
            parent, child = ctx.Pipe()
            self.conns.append(parent)
            args = (ws_url, sse_url, first, size, setup, child)
            self.procs.append(ctx.Process(target=_client_process, args=args, daemon=True))
            first += size
        self.reports: list[tuple] = []
        self.self_cpu_s = 0.0  # the clients' own count (getrusage), from "ready" to their results

    def __enter__(self) -> Clients:
        for p in self.procs:
            p.start()
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid]

    def wait_ready(self) -> int:
        """Watchers attached (each process says so once all of its watchers are attached or failed)."""
        attached = 0
        for conn in self.conns:
            if not conn.poll(ATTACH_TIMEOUT + 60):
                raise RuntimeError("a client process did not report its watchers within the attach timeout")
            try:
                _tag, count = conn.recv()
            except EOFError:
                raise RuntimeError("a client process died while attaching its watchers") from None
            attached += count
        return attached

    def collect(self, timeout: float) -> None:
        """Every process's watchers, once each got its final or ``timeout`` passed (then: stop)."""
        deadline = time.monotonic() + timeout
        for conn in self.conns:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                conn.send("stop")  # give up on the watchers still waiting; what they saw comes back
                if not conn.poll(60):
                    raise RuntimeError("a client process did not send its results")
            try:
                _tag, reports, cpu = conn.recv()
            except EOFError:
                raise RuntimeError("a client process died before sending its results") from None
            self.reports += reports
            self.self_cpu_s += cpu

    def __exit__(self, *exc: Any) -> None:
        for conn in self.conns:  # after a failure: stop the watchers still waiting
            try:
                conn.send("stop")
            except OSError:
                pass
        for p in self.procs:
            p.join(15)
            if p.is_alive():
                p.terminate()
                p.join(5)


#: Lines of the web tier's log that say something went wrong (a restarted worker drops every watcher).
PROBLEM = re.compile(r"Traceback|ERROR|CRITICAL|WORKER TIMEOUT|Booting worker|Worker exiting|Error:")


def log_problems(path: Path) -> dict[str, Any]:
    """What the web tier's log says went wrong, kept with the result (the stack's directory is
    gone once the point is measured): counts, the first lines, and the first traceback in full.
    One "Booting worker" is the normal start."""
    counts: dict[str, int] = {}
    lines: list[str] = []
    first_traceback: list[str] = []
    state = "before"  # the first traceback: before, in, after
    for line in (path.read_text(errors="replace") if path.exists() else "").splitlines():
        if m := PROBLEM.search(line):
            counts[m.group(0)] = counts.get(m.group(0), 0) + 1
            if m.group(0) != "Booting worker" and len(lines) < 12 and line[:300] not in lines:
                lines.append(line[:300])
        if state == "before" and line.startswith("Traceback"):
            state = "in"
        elif state == "in" and line.startswith("["):  # gunicorn's next log line
            state = "after"
        if state == "in" and len(first_traceback) < 60:
            first_traceback.append(line[:300])
    return {"counts": counts, "first": lines, "first_traceback": first_traceback}


def submit(stack: BenchStack, form: dict[str, str]) -> str:
    r = httpx.post(stack.base + "/api/jobs", files={"image": ("in.png", noise_png(), "image/png")}, data=form,
                   timeout=30, trust_env=False)  # fmt: skip
    if r.status_code != 202:
        raise RuntimeError(f"POST /api/jobs answered {r.status_code}: {r.text}")
    return r.json()["id"]


def scrape(stack: BenchStack) -> dict[str, float]:
    """The web tier's /metrics, sample name -> value (summed over labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(stack.base + "/metrics", timeout=30, trust_env=False).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def fanout_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Mean ms the hub took to hand one update, or several that arrived together, to all
    watchers (None: the metric is absent)."""
    name = "framepack_web_fanout_seconds"
    if f"{name}_count" not in after:
        return None
    count = after[f"{name}_count"] - before.get(f"{name}_count", 0.0)
    return (after[f"{name}_sum"] - before.get(f"{name}_sum", 0.0)) / count * 1000 if count else None


def fanout_cpu_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Mean CPU ms of those fan-outs (the wall time above minus waiting for a core)."""
    name, count = "framepack_web_fanout_cpu_seconds_total", "framepack_web_fanout_seconds_count"
    if name not in after or not after.get(count, 0.0) - before.get(count, 0.0):
        return None
    return (after[name] - before.get(name, 0.0)) / (after[count] - before.get(count, 0.0)) * 1000


def gc_seen(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The web tier's full garbage collections between two scrapes: how many, and their ms."""
    name = "framepack_web_gc_seconds"
    n = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    return {"n": int(n), "ms": round((after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)) * 1000, 1)}


class CpuWindow:
    """CPU seconds of each party between :meth:`start` (the first update) and :meth:`end`."""

    def __init__(self, stack: BenchStack, clients: Clients):
        self.stack, self.clients, self.valkey = stack, clients, stack.valkey_pid()
        self.t0 = self.t1 = 0.0
        self.before: dict[str, dict[int, float]] = {}
        self.after: dict[str, dict[int, float]] = {}

    def _sample(self) -> dict[str, dict[int, float]]:
        return {
            "web": cpu_seconds([self.stack.web.popen.pid]),  # gunicorn master and its worker
            "clients": cpu_seconds(self.clients.pids),
            "worker": cpu_seconds([self.stack.worker.popen.pid]),  # Celery's main process and its pool child
            "valkey": cpu_seconds([self.valkey], children=False),
        }

    def start(self) -> None:
        self.t0, self.before = time.monotonic(), self._sample()

    def start_when(self, event: Any) -> None:
        """:meth:`start` once ``event`` is set (the job's first update), from a thread of its own."""

        def wait() -> None:
            if event.wait(RUN_TIMEOUT):
                self.start()

        threading.Thread(target=wait, name="bench-window", daemon=True).start()

    def end(self) -> None:
        self.t1, self.after = time.monotonic(), self._sample()

    def cores(self) -> dict[str, float]:
        wall = self.t1 - self.t0
        return {k: round(cpu_delta(self.before[k], self.after[k]) / wall, 3) for k in self.after} if wall > 0 else {}


def measure(server: str, watchers: int, form: dict[str, str], setup: Setup) -> dict[str, Any]:
    """One (server, N) point on a fresh stack; see the module docstring for the steps."""
    env = {"FRAMEPACK_TORCH_THREADS": "1", "FRAMEPACK_WATCHER_CAPACITY": str(watchers + 100)}
    # gunicorn's gthread worker also stops accepting at --worker-connections (default 1,000),
    # whatever --threads says: uncapped means room for the threads plus keep-alive
    extra = ["--worker-connections", str(watchers + 1100)] if server == "gthread" else []
    extra += ["-w", str(setup.web_processes)] if setup.web_processes > 1 else []  # after web_command's own -w: it wins
    with BenchStack(worker=False, server=server, threads=watchers + 100, env=env, web_args=extra) as stack:
        job_id = submit(stack, form)
        web = stack.web_pid()
        rss = {"idle": rss_mb(web)}
        try:
            with Clients(stack, job_id, watchers, setup) as clients:
                t = time.monotonic()
                attached = clients.wait_ready()
                attach_s = time.monotonic() - t
                rss["attached"] = rss["peak"] = rss_mb(web)
                observed = _run_job(stack, job_id, clients, web, rss)
        except RuntimeError as exc:  # with what the web tier logged, which explains most
            raise RuntimeError(f"{exc}; web log: {log_problems(stack.root / 'web.log')}") from exc
        cores = observed.pop("cpu").cores()
        web_log = log_problems(stack.root / "web.log")
    return {"server": server, "web_processes": setup.web_processes,
            "watchers": watchers, "attached_at_ready": attached,
            "attach_s": round(attach_s, 2),
            **summarize(observed["channel"].seen, clients.reports), "rss_mb": {k: round(v, 1) for k, v in rss.items()},
            "kb_per_watcher": (rss["attached"] - rss["idle"]) * 1024 / max(1, attached),
            "rest_ms": percentiles(observed["prober"].ms), "rest_statuses": observed["prober"].statuses,
            # the five slowest probes: [s after the first update, ms]
            "rest_slowest": sorted(([round(at - min(observed["channel"].seen.values())[0], 3), round(ms, 1)]
                                    for at, ms in zip(observed["prober"].at, observed["prober"].ms, strict=True)),
                                   key=lambda p: -p[1])[:5],
            "fanout_ms_per_update": observed["fanout"],
            "fanout_cpu_ms_per_update": observed["fanout_cpu"], "fanouts": observed["fanouts"], "gc": observed["gc"],
            "run_s": observed["run_s"], "cores": cores,
            "reference_lag_ms": observed["reference_lag_ms"], "web_log": web_log,
            "clients_cpu_s_self": round(clients.self_cpu_s, 2)}  # fmt: skip


def _run_job(stack: BenchStack, job_id: str, clients: Clients, web: int, rss: dict[str, float]) -> dict[str, Any]:
    """Start the worker with the watchers attached; watch the run until every client is done.

    The job may start before the worker's /readyz answers: the run window (CPU, REST probes)
    opens at its first update."""
    cpu = CpuWindow(stack, clients)
    sampler = Every(RSS_PERIOD, lambda: rss.update(peak=max(rss["peak"], rss_mb(web))), "bench-rss")
    with Channel(stack, job_id) as channel, ProbeProcess(stack, job_id, channel.running) as prober:
        cpu.start_when(channel.running)
        before = scrape(stack)
        sampler.start()
        try:
            stack.start_worker()
            if not channel.finished.wait(RUN_TIMEOUT):
                raise RuntimeError(f"the job did not finish within {RUN_TIMEOUT:g} s")
            prober.finish()
            clients.collect(DRAIN_TIMEOUT)
            cpu.end()
            channel.stop()
        finally:
            sampler.stop()
    run_s = channel.seen[max(channel.seen)][0] - channel.seen[min(channel.seen)][0]
    return {"channel": channel, "prober": prober, "cpu": cpu, "fanout": fanout_ms(before, after := scrape(stack)),
            "fanout_cpu": fanout_cpu_ms(before, after),
            "fanouts": int(after.get("framepack_web_fanout_seconds_count", 0)
                           - before.get("framepack_web_fanout_seconds_count", 0)),
            "gc": {"attach": gc_seen({}, before), "run": gc_seen(before, after)},
            "run_s": round(run_s, 2), "reference_lag_ms": percentiles(channel.lag_ms)}  # fmt: skip


def summarize(seen: dict[int, tuple[float, str]], reports: list[tuple]) -> dict[str, Any]:
    """Latency over every (attached watcher, published update) pair; what was missed; who failed."""
    latencies: dict[str, list[float]] = {"ws": [], "sse": []}
    by_seq: dict[int, list[float]] = {}  # seq -> every watcher's latency for it (where the tail is)
    missed: dict[int, int] = {}  # seq -> attached watchers that never got it
    first_ms: dict[int, float] = {}  # seq -> the earliest receipt, ms after the reference saw it
    without_final = 0
    refused: dict[str, int] = {}
    errors: dict[str, int] = {}
    for kind, attached, final, failure, messages in reports:
        if failure:
            bucket = refused if failure[0] == "refused" else errors
            bucket[failure[1]] = bucket.get(failure[1], 0) + 1
        if not attached:
            continue
        got: dict[int, float] = {}
        for seq, _type, now in messages:
            if seq in seen and seq not in got:
                got[seq] = (now - seen[seq][0]) * 1000
                first_ms[seq] = min(first_ms.get(seq, got[seq]), got[seq])
        for seq, ms in got.items():
            by_seq.setdefault(seq, []).append(ms)
        for seq in seen.keys() - got.keys():
            missed[seq] = missed.get(seq, 0) + 1
        without_final += not final
        latencies[kind] += got.values()
    types: dict[str, int] = {}
    for _t, kind in seen.values():
        types[kind] = types.get(kind, 0) + 1
    return {
        "published": len(seen), "published_types": types,
        "connected": {k: sum(1 for r in reports if r[0] == k and r[1]) for k in ("ws", "sse")},
        "refused": refused, "errors": errors, "missed": sum(missed.values()), "without_final": without_final,
        "missed_by_seq": {f"{seq} {seen[seq][1]}": n for seq, n in sorted(missed.items())},
        "latency_ms": percentiles(latencies["ws"] + latencies["sse"]),
        "latency_ms_by_transport": {k: percentiles(v) for k, v in latencies.items()},
        "min_latency_ms": min(first_ms.values(), default=None),
        # per update: published when (s after the first), its type, p50 / p99 over its watchers
        "by_update": [[seq, round(seen[seq][0] - seen[min(seen)][0], 3), seen[seq][1],
                       round(percentiles(by_seq[seq])["p50"], 1), round(percentiles(by_seq[seq])["p99"], 1)]
                      for seq in sorted(by_seq)],
        # updates some watcher had before the reference saw them: how far to trust the reference
        "reference_late_ms": {f"{seq} {seen[seq][1]}": round(-ms, 1) for seq, ms in sorted(first_ms.items())
                              if ms < 0},  # fmt: skip
    }  # fmt: skip


def _guarded(server: str, n: int, form: dict[str, str], setup: Setup) -> dict[str, Any]:
    """One point; a failure (the old server at 2,000 watchers, say) is a result, not a crash."""
    import sys

    print(f"  scale: {server}, {n} watchers ...", file=sys.stderr, flush=True)
    try:
        return measure(server, n, form, setup)
    except Exception as exc:  # noqa: BLE001 — recorded in the result and shown in the table
        where = [f"{f.name}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__) if "/bench/" in f.filename]
        return {"server": server, "watchers": n,
                "error": f"{type(exc).__name__}: {exc}", "where": where}  # fmt: skip


def run(smoke: bool = False, watchers: tuple[int, ...] | None = None, servers: tuple[str, ...] | None = None,
        sse_share: float | None = None, clients: int | None = None, library_clients: bool = False,
        web_processes: int = 1) -> dict[str, Any]:  # fmt: skip
    watchers = watchers or ((20,) if smoke else WATCHERS)
    servers = servers or SERVERS
    setup = Setup(0.25 if sse_share is None else sse_share, clients or 4, library_clients, web_processes)
    form = SMOKE_FORM if smoke else FORM
    runs = [_guarded(server, n, form, setup) for server in servers for n in watchers]
    floor = send_floor(max(watchers), setup.clients, 3 if smoke else FLOOR_ROUNDS)
    command = "python -m bench.bench_scale" + (" --smoke" if smoke else "")
    if watchers != ((20,) if smoke else WATCHERS):
        command += " --watchers " + ",".join(map(str, watchers))
    if tuple(servers) != SERVERS:
        command += " --servers " + ",".join(servers)
    command += setup.flags()
    return {"benchmark": "scale", "smoke": smoke, "command": command, "watchers": list(watchers),
            "servers": list(servers), "sse_share": setup.sse_share,
            "clients": setup.clients, "library_clients": setup.library, "web_processes": setup.web_processes,
            "job": form,
            "machine": machine_facts(), "runs": runs, "send_floor": floor}  # fmt: skip


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['server']} | {r['watchers']} | failed: {r['error'][:160]} | | | | | | | | |"
    notes = [f"{sum(v.values())} {k}" for k in ("refused", "errors") if (v := r[k])]
    notes += [f"{r['without_final']} without final"] if r["without_final"] else []
    logged = r["web_log"]["counts"]
    notes += [f"{logged['Traceback']} tracebacks in the web log"] if logged.get("Traceback") else []
    booted = logged.get("Booting worker", 1) > r.get("web_processes", 1)
    notes += ["web worker restarted"] if booted or logged.get("WORKER TIMEOUT") else []
    lat, rss, cores, nan = r["latency_ms"], r["rss_mb"], r["cores"], float("nan")
    fan, fan_cpu = r["fanout_ms_per_update"], r.get("fanout_cpu_ms_per_update")
    return (
        f"| {r['server']} | {r['watchers']}{' (' + ', '.join(notes) + ')' if notes else ''} "
        f"| {lat.get('p50', nan):.1f} | {lat.get('p95', nan):.1f} | {lat.get('p99', nan):.1f} | {r['missed']} "
        f"| {r['rest_ms'].get('p99', nan):.1f} | {rss['idle']:.0f} → {rss['attached']:.0f} (peak {rss['peak']:.0f}) "
        f"| {r['kb_per_watcher']:.0f} | {'n/a' if fan is None else f'{fan:.1f}'} "
        f"({'n/a' if fan_cpu is None else f'{fan_cpu:.1f}'}) × {r.get('fanouts', '?')} / {r['published']} "
        f"| {cores.get('web', nan):.2f} / {cores.get('clients', nan):.2f} / {cores.get('worker', nan):.2f} |"
    )


# -- the floor: what one write per watcher costs by itself -------------------------------------------------

FLOOR_FRAME = 9_000  # bytes: a progress message with its preview at the 256 bucket
FLOOR_ROUNDS = 20


def _drain_process(port: int, n: int, conn: Any) -> None:
    """``n`` loopback connections to ``port``, read and discarded until they close."""
    import selectors

    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    sel = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    conn.send("connected")
    while socks:
        for key, _ in sel.select():
            try:
                data = key.fileobj.recv(1 << 16)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(key.fileobj)
                socks.remove(key.fileobj)


def send_floor(n: int, clients: int = 4, rounds: int = FLOOR_ROUNDS) -> dict[str, float]:
    """CPU µs per watcher of the bare minimum of a fan-out: a loop of one non-blocking
    ``send`` of the same ~9 KB frame to each of ``n`` loopback connections, read by
    ``clients`` processes (no web tier, no worker: the kernel's share of the hub's fan-out,
    which on loopback pays the receiving side's TCP work and wake-ups too)."""
    ctx = mp.get_context("spawn")
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = listener.getsockname()[1]
    sizes = [n // clients + (i < n % clients) for i in range(clients)]
    pipes = [ctx.Pipe() for _ in sizes]
    procs = [ctx.Process(target=_drain_process, args=(port, size, child), daemon=True)
             for size, (_parent, child) in zip(sizes, pipes, strict=True)]  # fmt: skip
    for proc in procs:
        proc.start()
    socks = [listener.accept()[0] for _ in range(n)]
    for parent, _child in pipes:
        parent.recv()
    frame = b"x" * FLOOR_FRAME
    per_send = []
    try:
        for _ in range(rounds):
            time.sleep(0.2)  # the readers are done with the previous round
            cpu = time.thread_time()
            for sock in socks:
                try:
                    sock.send(frame, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
            per_send.append((time.thread_time() - cpu) / n * 1e6)
    finally:
        for sock in socks:
            sock.close()
        listener.close()
        for proc in procs:
            proc.join(10)
    return {"us_per_watcher": round(statistics.median(per_send), 1), "rounds": rounds, "watchers": n}


def _floor_lines(result: dict[str, Any]) -> list[str]:
    """The hub's CPU per watcher at the largest N next to the bare send's (:func:`send_floor`)."""
    floor = result.get("send_floor")
    if not floor:
        return []
    hub = [r["fanout_cpu_ms_per_update"] * 1000 / r["watchers"] for r in result["runs"]
           if "error" not in r and r["server"] == result["servers"][0] and r["watchers"] == floor["watchers"]
           and r.get("fanout_cpu_ms_per_update")]  # fmt: skip
    ours = f"{hub[0]:.1f} µs for the hub's fan-out ({result['servers'][0]})" if hub else "no fan-out measured"
    return [f"The floor: one non-blocking `send` of a {FLOOR_FRAME // 1000} KB frame to each of {floor['watchers']:,} "
            f"loopback connections read by the same client processes, from a plain loop (no web tier; "
            f"`send_floor`, median of {floor['rounds']} rounds), costs {floor['us_per_watcher']:.1f} µs of CPU per "
            f"watcher, against {ours}.", ""]  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    job = result["job"]
    share = result["sse_share"]
    ok = [r for r in result["runs"] if "error" not in r]
    updates = f"{ok[0]['published']} updates in ~{ok[0]['run_s']:.0f} s" if ok else "no run finished"
    return "\n".join([
        "### Thousands of watchers per web host (gevent vs thread-per-socket)",
        "",
        f"Command: `{result['command']}` (one tiny-profile job, {job['total_second_length']} s × {job['steps']} "
        f"steps{', ' + job['resolution'] + ' bucket' if 'resolution' in job else ''}: {updates}; watchers attached "
        f"before the worker starts, from {result['clients']} client processes, {1 - share:.0%} WebSocket / "
        f"{share:.0%} SSE; latency = a watcher's receive − the update's publish on the job's Redis channel; "
        "`gthread` runs with N + 100 threads and N + 1,100 worker connections).",
        "",
        "| server | watchers | p50 ms | p95 ms | p99 ms | missed | REST p99 ms "
        "| web RSS MB (idle → attached) | KB per watcher | fan-out ms (CPU) × fan-outs / updates "
        "| cores: web / clients / worker |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in result["runs"]),
        "",
        *_floor_lines(result),
        f"How to read it: everything shares this machine's {result['machine']['cores']} cores, the measuring "
        "clients included; the worker runs its torch thread at nice 10 (`FRAMEPACK_WORKER_NICE`, the default, "
        "its session's autogroup too). Cores are CPU seconds / wall seconds over the run (first update to the "
        "last watcher's final), an average: each update is a burst. "
        "Fan-out (`framepack_web_fanout_seconds`) is the web tier's own time to hand an update, or the several "
        "that arrived together, to every watcher, wall clock (REST requests are served between slices of "
        "it), with its CPU time in brackets (`framepack_web_fanout_cpu_seconds`), then how many fan-outs "
        "carried how many updates. Missed: (attached watcher, published update) pairs never received; KB per "
        "watcher: (attached − idle RSS) / watchers attached.",
    ])  # fmt: skip


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main() -> None:
    bench_main(run, markdown, __doc__, "20 watchers, a very short job (a check, not a measurement)", {
        "--watchers": {"type": _ints, "default": None, "help": "watcher counts (default 100,500,1000,2000)"},
        "--servers": {"type": _names, "default": None, "help": "web servers (default gevent,gthread)"},
        "--sse-share": {"type": float, "default": None, "help": "share of watchers on SSE (default 0.25)"},
        "--clients": {"type": int, "default": None, "help": "client processes (default 4)"},
        "--web-processes": {"type": int, "default": 1, "help": "gunicorn processes of the web tier (default 1)"},
        "--library-clients": {"action": "store_true", "help": "watch with the websockets and httpx libraries "
                              "instead of the lean socket clients (they cost the shared cores ~10x more)"},
    })  # fmt: skip


if __name__ == "__main__":
    main()
