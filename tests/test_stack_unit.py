"""Fast unit tests for stack.py's pure parts and its embedded Valkey (no model, no worker, no web)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import redis

from stack import WEB_CONNECTIONS, Valkey, free_port, stack_env, web_command, worker_command


def _connect_refused(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_free_port_distinct_usable_not_reserved() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1
    assert not ports & {6379, 5672}
    for port in list(ports)[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))  # still usable


def test_valkey_refuses_system_redis_port(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Valkey(tmp_path, port=6379)


def test_valkey_ping_persist_and_release(tmp_path: Path) -> None:
    data = tmp_path / "valkey"
    with Valkey(data) as v:
        port = v.port
        assert port != 6379 and v.url == f"redis://127.0.0.1:{port}"
        assert v.alive()
        client = redis.Redis.from_url(v.url)
        assert client.ping()
        client.set("stack-unit", "kept")
        client.close()
    assert _connect_refused(port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # port released (TIME_WAIT allowed)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))

    with Valkey(data) as v2:  # same data_dir: the append-only file brings the value back
        client = redis.Redis.from_url(v2.url)
        assert client.get("stack-unit") == b"kept"
        client.close()


def test_worker_command_flags() -> None:
    cmd = worker_command()
    assert cmd[:6] == [sys.executable, "-m", "celery", "-A", "tasks", "worker"]
    for flag, value in (("-Q", "gpu"), ("-c", "1"), ("-P", "prefork"), ("--loglevel", "INFO")):
        assert cmd[cmd.index(flag) + 1] == value
    assert {"-E", "--without-gossip", "--without-mingle"} <= set(cmd)
    assert "-n" not in cmd
    cmd = worker_command(concurrency=2, pool="solo", queues="gpu,cpu", hostname="w1@%h")
    assert cmd[cmd.index("-c") + 1] == "2" and cmd[cmd.index("-P") + 1] == "solo"
    assert cmd[cmd.index("-Q") + 1] == "gpu,cpu" and cmd[-2:] == ["-n", "w1@%h"]


def test_web_command_flags() -> None:
    cmd = web_command(8123)
    assert cmd[:3] == [sys.executable, "-m", "gunicorn"] and cmd[-1] == "webapp:create_app()"
    for flag, value in (("-k", "gevent"), ("-w", "1"), ("-b", "127.0.0.1:8123"), ("--timeout", "120"),
                        ("--graceful-timeout", "5"), ("--worker-connections", str(WEB_CONNECTIONS))):  # fmt: skip
        assert cmd[cmd.index(flag) + 1] == value
    assert "--threads" not in cmd
    assert cmd[cmd.index("-c") + 1] == "python:gunicorn_conf"  # metrics across processes, JSON logs
    several = web_command(1, processes=3)
    assert several[several.index("-w") + 1] == "3"
    old = web_command(1, threads=50, server="gthread")  # thread per socket, for the benchmark's comparison
    assert old[old.index("-k") + 1] == "gthread" and old[old.index("--threads") + 1] == "50"
    with pytest.raises(ValueError, match="gevent or gthread"):
        web_command(1, server="tornado")


def test_stack_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRAMEPACK_PROFILE", raising=False)
    monkeypatch.setenv("STACK_UNIT_MARKER", "x")
    env = stack_env("redis://127.0.0.1:1", tmp_path)
    assert env["REDIS_URL"] == "redis://127.0.0.1:1" and env["RESULTS_DIR"] == str(tmp_path)
    assert env["PYTHONUNBUFFERED"] == "1" and env["FRAMEPACK_PROFILE"] == "tiny"
    assert env["STACK_UNIT_MARKER"] == "x"
    monkeypatch.setenv("FRAMEPACK_PROFILE", "full")
    assert stack_env("redis://x", tmp_path)["FRAMEPACK_PROFILE"] == "full"
    assert stack_env("redis://x", tmp_path, {"FRAMEPACK_PROFILE": "small"})["FRAMEPACK_PROFILE"] == "small"
