"""A RabbitMQ broker with a Redis result backend runs a job end to end.

Uses the RabbitMQ server of this machine (127.0.0.1:5672, guest/guest) and the test
Valkey (a database of its own) for results and job records.
"""

from __future__ import annotations

import socket

import httpx
import pytest

from stack import Proc, free_port, stack_env, wait_http, web_command, worker_command

from .conftest import png_bytes
from .wsclient import watch

pytestmark = pytest.mark.slow

AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def _rabbitmq_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _rabbitmq_up(), reason="no RabbitMQ on 127.0.0.1:5672")
def test_rabbitmq_broker_with_redis_backend(live, tmp_path):
    redis_url = live.redis_url.rsplit("/", 1)[0] + "/3"
    ours = {k: v for k, v in live.env.items() if k.startswith("FRAMEPACK_")}
    env = stack_env(redis_url, tmp_path / "results", {**ours, "CELERY_BROKER_URL": AMQP})
    port = free_port()
    with (
        Proc(worker_command(hostname=f"rabbit-{port}@%h"), env, tmp_path / "worker.log", echo=False, name="worker"),
        Proc(web_command(port), env, tmp_path / "web.log", echo=False, name="web") as web,
    ):
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/readyz", 180, proc=web)
        job = httpx.post(
            base + "/api/jobs",
            files={"image": ("in.png", png_bytes(), "image/png")},
            data={"total_second_length": "1", "steps": "3", "seed": "9"},
        ).json()
        w = watch(base.replace("http", "ws") + job["links"]["ws"])
        w.join(120)
        (final,) = w.of_type("final")
        assert final["state"] == "succeeded" and final["result"]["frames"] == 37
        assert len(w.of_type("section")) == 1
        assert httpx.get(base + final["result"]["video_url"]).status_code == 200
        # the job went through RabbitMQ: the Valkey broker database of the main stack never saw it
        assert live.redis().llen("gpu") == 0
