"""bench/bench_stack_gpu.py checked on the CPU (tiny profile) before GPU time is spent on it:
the stack as `make run` starts it, jobs over HTTP, watched over the WebSocket, then the
same job through generate() alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stack import ROOT

pytestmark = pytest.mark.slow


def test_the_stack_benchmark_runs_jobs_through_celery_and_reports_them(tmp_path):
    out = tmp_path / "stack.json"
    done = subprocess.run([sys.executable, "-m", "bench.bench_stack_gpu", "--jobs", "none,mag", "--seconds", "1",
                           "--steps", "4", "--direct", "--timeout", "240", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = json.loads(out.read_text())["runs"][0]
    statuses = [c["status"] for c in run["readyz"]["changes"]]
    assert 503 in statuses and statuses[-1] == 200  # not ready while the model loads, then ready
    assert run["workers"][0]["device"] == "cpu" and run["launcher_exit"] == 0
    plain, mag = run["jobs"]
    for job in (plain, mag):
        assert job["state"] == "succeeded" and job["previews"] >= 1
        assert job["video"]["frames"] == job["frames"] > 0  # the downloaded mp4 decodes to every frame
        assert job["preview_hop_ms"]["p50"] is not None and job["per_step_s"] > 0
    assert plain["cache"]["skipped"] == 0 and mag["cache"]["skipped"] > 0
    assert run["direct"]["frames"] == plain["frames"] and run["direct"]["per_step_s"] > 0
