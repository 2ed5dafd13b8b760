"""Smoke run of the watcher-scale benchmark (both web servers), with assertions so it can't rot."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_scale_benchmark_smoke(tiny_dir, monkeypatch):
    from bench import bench_scale

    monkeypatch.setenv("FRAMEPACK_CACHE", str(tiny_dir.parent))
    # 20 watchers (15 WebSocket, 5 SSE) on one short job; the gevent server only (the thread-per-socket
    # comparison runs in `make bench`: the suite has a time budget)
    result = bench_scale.run(smoke=True, servers=("gevent",))
    runs = {r["server"]: r for r in result["runs"]}
    assert set(runs) == {"gevent"}
    for server, r in runs.items():
        assert "error" not in r, (server, r.get("error"))
        assert r["watchers"] == 20 and r["connected"] == {"ws": 15, "sse": 5}, (server, r)
        assert not r["refused"] and not r["errors"], (server, r["refused"], r["errors"])
        # every attached watcher got every update published on the job's channel, final included
        assert r["published"] >= 5 and r["published_types"].get("final") == 1, (server, r["published_types"])
        assert r["missed"] == 0 and r["without_final"] == 0, (server, r["missed"], r["without_final"])
        lat = r["latency_ms"]
        assert lat["n"] == 20 * r["published"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"] < 5000, (server, lat)
        # the reference (the kernel's arrival time on the listener's socket) precedes the receipts but for
        # scheduling noise: Redis writes to the hub's subscription first and may be preempted before the
        # listener's, so a watcher can be a millisecond or two ahead on a busy machine, never much more
        late = r["reference_late_ms"]
        assert r["min_latency_ms"] > -5 and all(ms < 5 for ms in late.values()), (server, late)
        for transport in ("ws", "sse"):
            assert r["latency_ms_by_transport"][transport]["n"] > 0
        assert r["rest_ms"]["n"] > 0 and set(r["rest_statuses"]) == {"200"}, (server, r["rest_statuses"])
        assert 0 < r["rss_mb"]["idle"] <= r["rss_mb"]["peak"] and r["rss_mb"]["attached"] <= r["rss_mb"]["peak"]
        assert all(r["cores"][k] > 0 for k in ("web", "clients", "worker")), (server, r["cores"])
        assert r["fanout_ms_per_update"] is not None and r["fanout_ms_per_update"] > 0
        assert 0 < r["fanouts"] <= r["published"]
    text = bench_scale.markdown(result)
    floor = result["send_floor"]
    assert floor["watchers"] == 20 and floor["us_per_watcher"] > 0 and "The floor:" in text
    assert "### Thousands of watchers per web host" in text and "| gevent | 20 |" in text
