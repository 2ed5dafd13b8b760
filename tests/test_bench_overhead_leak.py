"""The overhead, leak and GPU benchmarks at smoke scale, with their numbers checked so they
cannot rot into code that runs but measures nothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_cache(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Benchmarks (and the workers they start) find the session's tiny profile, not ~/.cache."""
    monkeypatch.setenv("FRAMEPACK_CACHE", str(tiny_dir.parent))
    return tiny_dir


def test_overhead_smoke(tiny_cache: Path) -> None:
    from bench import bench_overhead

    result = bench_overhead.run(smoke=True)
    assert result["n"] == 2
    assert len(result["api"]) == len(result["inprocess"]) == 2
    assert result["median_api_ms"] > 0 and result["median_inprocess_ms"] > 0
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    for run in [result["warmup"]["api"], *result["api"]]:
        assert run["final_state"] == "succeeded", run
        assert "final" in run["types"] and run["wall_ms"] >= run["post_ms"] > 0
    assert all(r["status"] == "succeeded" and r["frames"] > 0 for r in result["inprocess"])
    md = bench_overhead.markdown(result)
    assert md.startswith("### ") and "python -m bench.bench_overhead" in md


def test_leak_smoke() -> None:
    from bench import bench_leak

    result = bench_leak.run(smoke=True)
    assert result["jobs_requested"] == result["jobs_submitted"] == 20
    assert result["statuses"] == {"202": 20}
    assert [s["jobs"] for s in result["samples"]] == [0, 2, 10, 20]
    assert result["queued_in_broker"] == 20 + result["warmup"]  # no worker: every job still queued
    for s in result["samples"]:
        assert s["subscriptions"] == 0, s
        assert s["connections"] > 0, s  # the web process's own connections were found
        assert s["rss_mb"] > 0
    assert result["submissions_per_s"] > 0
    assert "python -m bench.bench_leak" in bench_leak.markdown(result)


def test_gpu_skips_without_cuda_and_tiny_cpu_runs_every_phase() -> None:
    import torch

    from bench import bench_gpu

    if not torch.cuda.is_available():  # this machine: the GPU benchmark says why it measured nothing
        skipped = bench_gpu.run(smoke=True)
        assert "CUDA" in skipped["skipped"]
        assert "Skipped" in bench_gpu.markdown(skipped)

    result = bench_gpu.run(smoke=True, tiny_cpu=True)
    assert "skipped" not in result and result["errors"] == [] and result["skipped_phases"] == []
    placements = [r["transformer_placement"] for r in result["runs"]]
    assert placements == ["resident", "resident", "resident", "streamed (group offload)"]
    assert [r["text_encoder_streamed"] for r in result["runs"]] == [False, False, True, True]
    for r in result["runs"]:
        assert r["status"] == "succeeded" and r["seconds_per_frame"] > 0 and r["frames"] == 37
        assert len(r["vae_decode_s"]) == r["sections"] == 1 and r["previews"] == r["steps"] == 2
    assert result["load"]["load_s"] > 0 and result["preview"]["on_device_ms"] > 0
    assert "python -m bench.bench_gpu --tiny-cpu" in bench_gpu.markdown(result)


def test_checkpoint_benchmark_smoke() -> None:
    from bench import bench_checkpoint

    result = bench_checkpoint.run(smoke=True)
    tiny = [r["bytes"] for r in result["tiny"]]
    assert tiny == sorted(tiny) and tiny[0] > 0  # a checkpoint grows with the video
    per = result["real_bytes_per_section"]
    assert per == pytest.approx(9 * 16 * 80 * 76 * 4, abs=4096)  # 9 float32 latent frames at the 640 bucket
    assert "MiB per section" in bench_checkpoint.markdown(result)
