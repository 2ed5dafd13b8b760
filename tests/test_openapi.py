"""`schemathesis run --checks all` over /api/openapi.json finds nothing.

The real CLI against the real web tier (gunicorn) and Valkey, with no worker (submitted jobs
stay queued, so /readyz's documented 503 is expected).  The job routes get real ids through
the document's links from the submissions (stateful phase).  Deterministic: fixed seed, 10
random examples per operation besides the coverage phase's boundary cases (the suite has a
time budget: 25 took 2.5 times as long; hypothesis' data-generation health checks, which
fewer examples trip, are off).  Twice: the open server, and
one with API tokens and webhooks (the
document then declares the security schemes, and ``ignored_auth`` checks that every
operation refuses a request without the admin token schemathesis sends)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stack import ROOT, Proc, Valkey, free_port, stack_env, wait_http, web_command

from .conftest import ADMIN, TOKENS, WEBHOOK_SECRET

pytestmark = pytest.mark.slow

CONFIG = """
hooks = "tests.schemathesis_hooks"

# /readyz answers its documented 503 while no worker runs (keep the 2xx-4xx too)
[[operations]]
include-path = "/readyz"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]

# a live job's event stream runs until the job ends: read its first event and stop
[[operations]]
include-path = "/stream/status/{job_id}"
max-stream-events = 1

[[operations]]
include-path = "/api/jobs/{job_id}/events"
max-stream-events = 1

# the new-videos stream never ends and, with no worker, carries only keep-alive comments
# (no event to stop after): tests/test_original_api.py reads it against a real worker instead
[[operations]]
include-path = "/video_stream"
enabled = false
"""


SECURED = {"FRAMEPACK_API_TOKENS": TOKENS, "FRAMEPACK_WEBHOOK_SECRET": WEBHOOK_SECRET,
           "FRAMEPACK_WEBHOOK_ALLOW": "http://127.0.0.1:9/hook,https://hooks.example.com"}  # fmt: skip


@pytest.mark.parametrize("config", ["open", "secured"])
def test_schemathesis_finds_nothing(tmp_path: Path, config: str):
    extra = SECURED if config == "secured" else {}
    auth = ["--header", f"Authorization: Bearer {ADMIN}"] if config == "secured" else []
    with Valkey(tmp_path / "valkey") as valkey:
        env = stack_env(valkey.url + "/0", tmp_path / "results", {"FRAMEPACK_SWEEP_SECONDS": "1", **extra})
        port = free_port()
        with Proc(web_command(port), env, tmp_path / "web.log", echo=False, name="web") as web:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/healthz", 60, proc=web)
            config_file = tmp_path / "schemathesis.toml"
            config_file.write_text(CONFIG)
            cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config_file), "run",
                   f"{base}/api/openapi.json", "--checks", "all", "--max-examples", "10",
                   "--suppress-health-check=filter_too_much,too_slow", "--seed", "1",
                   "--generation-deterministic", "--workers", "1", *auth]  # fmt: skip
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = out.stdout[-6000:]
    assert out.returncode == 0, tail
    assert "No issues found" in out.stdout or "passed" in out.stdout, tail
