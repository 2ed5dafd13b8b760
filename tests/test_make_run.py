"""`make run` on a clean clone: sets itself up, becomes ready, runs a job, stops on Ctrl-C.

Clones the committed tree (what CI and a new user get), so it measures the real first-run
path: a fresh virtualenv, the tiny model built into an empty cache, an embedded Valkey.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from stack import ROOT, free_port, wait_http

from .conftest import png_bytes
from .wsclient import watch

pytestmark = pytest.mark.slow


def test_make_run_on_a_clean_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    port = free_port()
    ours = ("REDIS_URL", "CELERY_", "FRAMEPACK_", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(PORT=str(port), FRAMEPACK_CACHE=str(tmp_path / "cache"))
    log = open(tmp_path / "make-run.log", "wb")
    proc = subprocess.Popen(["make", "run"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/readyz", 900)
        assert httpx.get(base + "/api/info").json()["profiles"] == ["tiny"]
        job = httpx.post(base + "/api/jobs", files={"image": ("in.png", png_bytes(), "image/png")},
                         data={"total_second_length": "1", "steps": "2"}).json()  # fmt: skip
        w = watch(base.replace("http", "ws") + job["links"]["ws"])
        w.join(120)
        assert w.of_type("final")[0]["state"] == "succeeded"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        log.close()
    output = (tmp_path / "make-run.log").read_text(errors="replace")
    assert "profile: tiny" in output and "noise" in output, output[-3000:]
    assert "stopped" in output, output[-3000:]
    # our launcher exits 0; make itself dies of the SIGINT it also received, as with Ctrl-C
    assert rc in (0, -signal.SIGINT, 2, 130), (rc, output[-3000:])
    time.sleep(0.5)
    with pytest.raises(httpx.HTTPError):
        httpx.get(base + "/healthz", timeout=2)
