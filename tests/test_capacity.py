"""More watchers than the old thread-per-socket server held, and a clear refusal beyond capacity.

The web tier `make run` starts (gunicorn, gevent worker), a queued job (no worker), and
``FRAMEPACK_WATCHER_CAPACITY=300``: 300 watchers — more than the 200 threads the old
server had, where the 201st waited silently — all get their snapshot; the next ones are
refused at once: a WebSocket with close code 1013, an event stream with 503 and
``Retry-After`` (our error shape on /api, FastAPI's on the original API's route).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stack import Proc, Valkey, free_port, stack_env, wait_http, web_command
from tests.conftest import png_bytes

pytestmark = pytest.mark.slow

CAPACITY = 300


@pytest.fixture
def web(tmp_path: Path):
    with Valkey(tmp_path / "valkey") as valkey:
        env = stack_env(valkey.url + "/0", tmp_path / "results", {"FRAMEPACK_WATCHER_CAPACITY": str(CAPACITY)})
        port = free_port()
        with Proc(web_command(port), env, tmp_path / "web.log", echo=False, name="web") as proc:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/healthz", 60, proc=proc)
            yield base


def metric(base: str, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def streams(base: str) -> dict:
    return httpx.get(base + "/api/info").json()["streams"]


async def _watch_then_refuse(url: str) -> tuple[int, int, str, float, list]:
    import websockets

    async def snapshot(ws) -> dict:
        return json.loads(await asyncio.wait_for(ws.recv(), 60))

    sockets = []
    for i in range(CAPACITY):
        sockets.append(await websockets.connect(url, open_timeout=60, ping_interval=None, compression=None))
        if i % 50 == 49:
            await asyncio.sleep(0)
    snapshots = [await snapshot(ws) for ws in sockets]
    started = time.monotonic()
    extra = await websockets.connect(url, open_timeout=10, ping_interval=None, compression=None)
    try:
        await asyncio.wait_for(extra.recv(), 10)
        raise AssertionError("a watcher over capacity got a message")
    except websockets.ConnectionClosed as closed:
        refusal = (closed.rcvd.code, closed.rcvd.reason)
    waited = time.monotonic() - started
    await sockets.pop().close()  # one slot frees up
    return sum(s["type"] == "snapshot" for s in snapshots), refusal[0], refusal[1], waited, sockets


def test_watchers_beyond_the_old_thread_cap_are_served_and_the_next_one_is_refused_at_once(web: str):
    job = httpx.post(web + "/api/jobs", files={"image": ("in.png", png_bytes(), "image/png")}, timeout=30).json()
    url = web.replace("http://", "ws://") + f"/ws/jobs/{job['id']}"

    async def scenario():
        served, code, reason, waited, held = await _watch_then_refuse(url)
        try:
            assert served == CAPACITY
            assert code == 1013 and "try again" in reason
            assert waited < 10  # answered, not left waiting (the wait above would have timed out)

            deadline = time.monotonic() + 30  # the server sees the close, then frees the slot
            while streams(web)["open"] != CAPACITY - 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert streams(web) == {"open": CAPACITY - 1, "capacity": CAPACITY, "refused": 1}

            # the freed slot serves an event stream: the same snapshot, with its seq as the event id
            async with httpx.AsyncClient(base_url=web, timeout=30) as client:
                async with client.stream("GET", f"/api/jobs/{job['id']}/events") as resp:
                    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
                    fields = {}
                    async for line in resp.aiter_lines():
                        if not line:
                            break
                        name, _, value = line.partition(": ")
                        fields[name] = value
                    data = json.loads(fields["data"])
                    assert fields["event"] == data["type"] == "snapshot" and data["job"]["id"] == job["id"]
                    assert fields.get("id") == (str(data["seq"]) if data["seq"] else None)

                    # full again: event streams are refused before any byte, in each API's own shape
                    ours = await client.get(f"/api/jobs/{job['id']}/events")
                    assert ours.status_code == 503 and ours.headers["Retry-After"] == "5"
                    assert "capacity" in ours.json()["error"]
                    legacy = await client.get(f"/stream/status/{job['id']}")
                    assert legacy.status_code == 503 and legacy.headers["Retry-After"] == "5"
                    assert "capacity" in legacy.json()["detail"]
            assert streams(web)["refused"] == 3
            assert metric(web, "framepack_watchers_refused_total") == 3
            assert metric(web, "framepack_watcher_capacity") == CAPACITY
        finally:
            await asyncio.gather(*(ws.close() for ws in held))

    asyncio.run(scenario())
