"""Off the happy path, the way a team running Celery meets it: a Redis restart mid-job,
``celery control revoke`` / ``terminate``, ``celery purge``, Flower's view of every end,
``celery inspect conf``.  Real Valkey, real worker, real web tier, real Celery CLI."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time

import httpx
import pytest

from stack import ROOT

from .conftest import running_stack
from .wsclient import watch

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")
LONG = {"total_second_length": 10, "steps": 60}  # ~20 s on the tiny profile, one torch thread


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (httpx.HTTPError, ValueError, KeyError):
            value = None  # the web tier answers 503 while Redis is down
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _ended(stack, job_id: str, timeout: float = 120) -> dict:
    return _wait(lambda: (j := stack.job(job_id))["state"] in TERMINAL and j, timeout, f"job {job_id} to end")


def _sampling(stack, job_id: str) -> dict:
    return _wait(lambda: (j := stack.job(job_id))["state"] == "running" and j["step"] and j, 60, "sampling")


def _sse(stack, job_id: str, out: list) -> threading.Thread:
    def run() -> None:
        with httpx.stream("GET", f"{stack.base}/stream/status/{job_id}", timeout=180) as resp:
            name = None
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    out.append((name, json.loads(line[6:])))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class Events(threading.Thread):
    """Captures the Celery task events, as Flower does, into ``celery.events.state.State``."""

    def __init__(self, redis_url: str):
        super().__init__(daemon=True)
        from celery import Celery
        from celery.events.state import State

        self.app = Celery(broker=redis_url)
        self.state = State()
        self.ready = threading.Event()
        self.receiver = None

    def run(self) -> None:
        with self.app.connection() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self.state.event})
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def task(self, job_id: str):
        return self.state.tasks.get(job_id)

    def __enter__(self) -> Events:
        self.start()
        self.ready.wait(10)
        time.sleep(1.0)  # the receiver's queue is bound
        return self

    def __exit__(self, *exc) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True


@pytest.fixture(scope="module")
def ops(tmp_path_factory, tiny_dir):
    with running_stack(tmp_path_factory.mktemp("ops"), tiny_dir) as stack:
        yield stack


def test_revoke_of_a_queued_job_ends_it_with_a_reason_and_moves_the_queue(ops):
    running = ops.submit(**LONG)
    b, c = ops.submit(), ops.submit()
    _sampling(ops, running["id"])
    assert (ops.job(b["id"])["position"], ops.job(c["id"])["position"]) == (1, 2)
    w = watch(ops.ws_base + b["links"]["ws"], timeout=60)
    out = ops.celery("control", "revoke", b["id"])
    assert out.returncode == 0, out.stderr
    w.join(30)
    (final,) = w.of_type("final")
    assert final["state"] == "cancelled" and "revoked by operator" in final["reason"] and final["seq"] >= 1
    view = ops.job(b["id"])
    assert view["state"] == "cancelled" and view["position"] is None and "revoked" in view["reason"]
    assert ops.job(c["id"])["position"] == 1  # no phantom ahead of it
    queue = httpx.get(ops.base + "/queue").json()["queue"]  # the original API's view agrees
    assert [q["job_id"] for q in queue if q["status"] == "pending"] == [c["id"]]
    assert httpx.get(ops.base + "/worker/status").json()["processing_job_id"] == running["id"]
    meta = json.loads(ops.redis().get(f"celery-task-meta-{b['id']}"))
    assert meta["status"] == "REVOKED" and meta["result"]["seq"] == final["seq"]
    ops.celery("control", "terminate", "SIGTERM", running["id"])  # free the worker for the next test
    for job in (running, c):
        _ended(ops, job["id"])


def test_terminate_ends_the_running_job_and_every_watcher_gets_the_final(ops):
    with Events(ops.redis_url) as events:
        job = ops.submit(**LONG)
        nxt = ops.submit()
        ws = watch(ops.ws_base + job["links"]["ws"], timeout=120)
        sse: list = []
        _sse(ops, job["id"], sse)
        before = _sampling(ops, job["id"])
        out = ops.celery("control", "terminate", "SIGTERM", job["id"])
        assert out.returncode == 0, out.stderr
        ws.join(60)
        (final,) = ws.of_type("final")
        assert final["state"] == "cancelled" and "terminated by operator" in final["reason"]
        assert final["progress"] >= before["progress"] > 0  # progress kept, not reset to 0
        _wait(lambda: sse and sse[-1][0] == "status", 30, "the SSE status event")
        assert sse[-1][1] == {"status": "cancelled", "message": "Job finished."}
        assert sse[-2][0] == "progress" and "terminated" in sse[-2][1]["progress_info"]
        view = ops.job(job["id"])
        assert view["state"] == "cancelled" and view["sections_done"] == final["sections_done"]
        # the pool child was replaced and loads again; the next job runs
        assert _ended(ops, nxt["id"], 180)["state"] == "succeeded"
        _wait(lambda: events.task(job["id"]) and events.task(job["id"]).state == "REVOKED", 20, "REVOKED in Flower")
        assert "terminated" in events.task(job["id"]).result
        # /readyz and /api/info count live workers only: the killed child is gone at once
        workers = httpx.get(ops.base + "/api/info").json()["workers"]
        assert len(workers) == 1 and workers[0]["ready"] and workers[0]["error"] is None


def test_purge_ends_queued_jobs_and_positions_follow(ops):
    running = ops.submit(**LONG)
    queued = [ops.submit() for _ in range(3)]
    _sampling(ops, running["id"])
    w = watch(ops.ws_base + queued[1]["links"]["ws"], timeout=60)
    out = ops.celery("purge", "-Q", "gpu", "-f")
    assert out.returncode == 0, out.stderr
    w.join(45)
    (final,) = w.of_type("final")
    assert final["state"] == "cancelled" and "purged" in final["reason"]
    for job in queued:  # each goes on the second sweep that finds it missing past its grace:
        view = _ended(ops, job["id"], 30)  # submitted a few ms apart, they may straddle a sweep
        assert view["state"] == "cancelled" and "purged from the broker" in view["reason"]
    assert [q for q in httpx.get(ops.base + "/queue").json()["queue"] if q["status"] == "pending"] == []
    assert _ended(ops, running["id"])["state"] == "succeeded"  # the running job was not touched
    later = ops.submit()
    assert later["position"] == 1  # nothing purged is counted ahead of it
    assert _ended(ops, later["id"])["state"] == "succeeded"


#: The operator Flower lets in (``FLOWER_BASIC_AUTH``, as the Procfile requires it).
OPERATOR = ("operator", "flower-Pa55-word")


def flower_command(port: int) -> list[str]:
    """The Procfile's ``flower:`` line with its defaults (local address, basic auth) filled in."""
    import shlex
    import sys

    line = next(x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith("flower:"))
    words = shlex.split(line.split(":", 1)[1])
    values = {"FLOWER_ADDRESS": "127.0.0.1", "FLOWER_PORT": str(port), "FLOWER_BASIC_AUTH": ":".join(OPERATOR)}
    out = []
    for word in words:
        for name, value in values.items():
            word = re.sub(r"\$\{" + name + r"(:[-?][^}]*)?\}", value, word)
        assert "$" not in word, word
        out.append(word)
    assert out[:3] == ["celery", "-A", "tasks"]
    return [sys.executable, "-m", *out]


@contextlib.contextmanager
def flower(stack):
    """The real Flower, started as the Procfile starts it (its API for the operator only)."""
    from stack import Proc, free_port, wait_http

    port = free_port()
    with Proc(flower_command(port), stack.env, stack.root / "flower.log", echo=False, name="flower") as proc:
        wait_http(f"http://127.0.0.1:{port}/healthcheck", 60, proc=proc)
        yield f"http://127.0.0.1:{port}"


def _as_operator(method: str, url: str) -> httpx.Response:
    return httpx.request(method, url, auth=OPERATOR, timeout=30)


def test_flower_shows_every_end_as_an_end_state(ops):
    with Events(ops.redis_url) as events, flower(ops) as flower_url:
        ok = ops.submit()
        broken = ops.submit()
        ops.redis().delete(f"fp:job:{broken['id']}:input")  # its input is gone: it fails
        cancelled = ops.submit(**LONG)
        queued_cancel = ops.submit()
        _sampling(ops, cancelled["id"])
        _wait(lambda: events.task(cancelled["id"]) and "%" in (events.task(cancelled["id"]).result or ""), 20,
              "progress in Flower's Result column")  # fmt: skip
        assert events.task(cancelled["id"]).state == "STARTED"
        for job in (cancelled, queued_cancel):
            assert httpx.post(f"{ops.base}/api/jobs/{job['id']}/cancel").status_code == 202
        expected = {
            ok["id"]: ("succeeded", "SUCCESS"),
            broken["id"]: ("failed", "FAILURE"),
            cancelled["id"]: ("cancelled", "REVOKED"),
            queued_cancel["id"]: ("cancelled", "REVOKED"),
        }
        for job_id, (ours, celery_state) in expected.items():
            assert _ended(ops, job_id)["state"] == ours
            _wait(lambda j=job_id, c=celery_state: events.task(j) and events.task(j).state == c, 20,
                  f"{celery_state} in Flower for {ours}")  # fmt: skip
            raw = json.loads(ops.redis().get(f"celery-task-meta-{job_id}"))
            assert raw["status"] == celery_state  # the result backend agrees
            _wait(lambda j=job_id, c=celery_state: _as_operator("GET", f"{flower_url}/api/task/info/{j}").json()[
                  "state"] == c, 20, f"Flower itself to show {celery_state}")  # fmt: skip
        assert "input image is missing" in events.task(broken["id"]).result
        assert events.task(cancelled["id"]).result == "cancelled by user"
        shown = _as_operator("GET", f"{flower_url}/api/task/info/{cancelled['id']}").json()
        assert shown["result"] == "cancelled by user" and shown["started"]


def test_flower_as_shipped_lets_the_operator_revoke_and_terminate_and_no_one_else(ops):
    with flower(ops) as flower_url:
        for auth in (None, ("operator", "wrong"), ("someone", "flower-Pa55-word")):
            assert httpx.get(f"{flower_url}/api/workers", auth=auth).status_code == 401
            assert httpx.get(f"{flower_url}/", auth=auth).status_code == 401
        assert _as_operator("GET", f"{flower_url}/api/workers").status_code == 200
        running = ops.submit(**LONG)
        queued = ops.submit()
        _sampling(ops, running["id"])
        # its buttons call these: Revoke on the queued job, Terminate on the running one
        refused = httpx.post(f"{flower_url}/api/task/revoke/{queued['id']}")
        assert refused.status_code == 401 and ops.job(queued["id"])["state"] == "queued"
        assert _as_operator("POST", f"{flower_url}/api/task/revoke/{queued['id']}").status_code == 200
        ended = _wait(lambda: (v := ops.job(queued["id"]))["finished_at"] and v, 60, "the revoked job's end")
        assert ended["state"] == "cancelled" and "revoked by operator" in ended["reason"]
        terminate = f"{flower_url}/api/task/revoke/{running['id']}?terminate=true&signal=SIGTERM"
        assert _as_operator("POST", terminate).status_code == 200
        ended = _wait(lambda: (v := ops.job(running["id"]))["finished_at"] and v, 60, "the terminated job's end")
        assert ended["state"] == "cancelled" and "terminated by operator" in ended["reason"]


def test_redis_restart_mid_job_costs_nothing(tmp_path, tiny_dir):
    """Valkey stops for 5 s while a job samples and two wait: all three succeed, the watcher
    of the running job gets its final, and `celery inspect conf` never shows the password."""
    with running_stack(tmp_path, tiny_dir, password="s3cret-Pa55") as stack:
        a = stack.submit(**LONG)
        b, c = stack.submit(), stack.submit()
        w = watch(stack.ws_base + a["links"]["ws"], timeout=240)
        _sampling(stack, a["id"])
        down = stack.restart_valkey(5.0)
        assert down >= 5.0
        for job in (a, b, c):
            assert _ended(stack, job["id"], 240)["state"] == "succeeded", stack.job(job["id"])
        w.join(60)
        (final,) = w.of_type("final")
        assert final["state"] == "succeeded"
        assert stack.job(a["id"])["attempts"] == 1  # not restarted from zero
        conf = stack.celery("inspect", "conf", "--json")
        assert conf.returncode == 0, conf.stderr
        assert "s3cret-Pa55" not in conf.stdout and "REDIS_URL" not in conf.stdout
        exported = next(iter(json.loads(conf.stdout).values()))
        assert not {"os", "Queue", "MAX_JOB_SECONDS"} & set(exported)
        assert "s3cret-Pa55" not in httpx.get(stack.base + "/api/info").text
