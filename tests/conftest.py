"""Shared fixtures: the tiny profile built once per test session, in a private cache."""

from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers_helper.tiny import TINY_VERSION, ensure_tiny

    # laid out as $FRAMEPACK_CACHE/tiny-vN, so workers started by tests find it too
    return ensure_tiny(tmp_path_factory.mktemp("cache") / f"tiny-v{TINY_VERSION}")


@pytest.fixture(scope="session")
def tiny_models(tiny_dir: Path):
    from diffusers_helper.profiles import Models, resolve_profile

    return Models(resolve_profile("tiny", cache_dir=tiny_dir))


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture
def image() -> Image.Image:
    return noise_image(96, 80)


def png_bytes(height: int = 80, width: int = 80, seed: int = 0) -> bytes:
    import io

    buf = io.BytesIO()
    noise_image(height, width, seed).save(buf, format="PNG")
    return buf.getvalue()


class LiveStack:
    """A running Valkey + Celery worker(s) + gunicorn web tier (what `make run` starts)."""

    def __init__(self, base: str, redis_url: str, root: Path, env: dict[str, str], valkey=None):
        self.base, self.redis_url, self.root, self.env = base, redis_url, root, env
        self.ws_base = base.replace("http://", "ws://")
        self.valkey = valkey
        self.workers: list = []  # stack.Proc, one per worker
        self.worker_envs: list[dict[str, str]] = []
        self.web = None  # stack.Proc

    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url)

    def submit(self, **fields) -> dict:
        import httpx

        data = {"total_second_length": "1", "steps": "2", **{k: str(v) for k, v in fields.items()}}
        r = httpx.post(self.base + "/api/jobs", files={"image": ("in.png", png_bytes(), "image/png")}, data=data)
        assert r.status_code == 202, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        import httpx

        return httpx.get(f"{self.base}/api/jobs/{job_id}", timeout=60).json()

    def celery(self, *args: str, timeout: float = 60):
        """The Celery command line a team runs (``celery -A tasks ...``) against this stack."""
        import subprocess
        import sys

        from stack import ROOT

        cmd = [sys.executable, "-m", "celery", "-A", "tasks", *args]
        return subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def restart_valkey(self, down_seconds: float) -> float:
        """Stop the Valkey server, wait, start it again on the same port and data (AOF)."""
        import time

        from stack import Valkey

        port, data = self.valkey.port, self.valkey.data_dir
        self.valkey.__exit__(None, None, None)
        stopped = time.monotonic()
        time.sleep(down_seconds)
        self.valkey = Valkey(data, port=port, **self.valkey.config).__enter__()
        return time.monotonic() - stopped


STACK_ENV = {
    "FRAMEPACK_PROGRESS_INTERVAL": "0",
    "FRAMEPACK_MAX_UPLOAD_BYTES": str(2 * 2**20),
    "FRAMEPACK_TORCH_THREADS": "1",
    "FRAMEPACK_WS_SEND_BUFFER": str(16 * 1024),
    # short heartbeats and sweeps, so a stall or a purge shows within a test
    "FRAMEPACK_HEARTBEAT_SECONDS": "0.5",
    "FRAMEPACK_HEARTBEAT_TTL": "3",
    "FRAMEPACK_SWEEP_SECONDS": "1",
    "FRAMEPACK_PROFILE": "tiny",
}


@contextlib.contextmanager
def running_stack(root: Path, tiny_dir: Path, extra_env: dict[str, str] | None = None, password: str | None = None,
                  gpus: str = "", web_processes: int = 1, worker_env: dict[str, str] | None = None,
                  web_env: dict[str, str] | None = None, worker_metrics: bool = False,
                  disk_per_worker: bool = False):  # fmt: skip
    """Valkey (append-only, restartable on its port) + the workers + the webhook worker + the web tier, in ``root``.

    ``gpus`` starts one worker per listed device as ``make run GPUS=...`` does (one worker
    without); ``worker_env`` and ``web_env`` are added to one side only; ``worker_metrics``
    gives each worker a free metrics port (its ``FRAMEPACK_WORKER_METRICS_PORT``);
    ``disk_per_worker`` gives each worker its own ``disk-<name>`` as ``RESULTS_DIR`` and
    ``FRAMEPACK_WORK_DIR``, as workers on separate hosts have.
    With ``password``, every process connects as an ACL user ``framepack`` with it (the
    default user stays open for the embedded server's own readiness check)."""
    from stack import (
        Proc,
        Valkey,
        free_port,
        parse_gpus,
        stack_env,
        wait_http,
        web_command,
        webhook_worker_command,
        worker_command,
        worker_specs,
    )

    config = {"user": f"framepack on >{password} ~* &* +@all"} if password else {}
    auth = f"framepack:{password}@" if password else ""
    port = free_port()
    with contextlib.ExitStack() as stack:
        valkey = Valkey(root / "valkey", **config).__enter__()
        redis_url = f"redis://{auth}127.0.0.1:{valkey.port}/0"
        (root / "loras").mkdir(exist_ok=True)
        env = stack_env(redis_url, root / "results", {"FRAMEPACK_CACHE": str(tiny_dir.parent), **STACK_ENV,
                                                     "FRAMEPACK_LORA_DIR": str(root / "loras"),
                                                     **(extra_env or {})})  # fmt: skip
        live = LiveStack(f"http://127.0.0.1:{port}", redis_url, root, env, valkey)
        stack.callback(lambda: live.valkey.__exit__(None, None, None))  # the one running now
        for spec in worker_specs(parse_gpus(gpus)):
            wenv = {**env, **spec.env, **(worker_env or {})}
            if disk_per_worker:
                wenv["RESULTS_DIR"] = wenv["FRAMEPACK_WORK_DIR"] = str(root / f"disk-{spec.name}")
            if worker_metrics:
                wenv["FRAMEPACK_WORKER_METRICS_PORT"] = str(free_port())
            live.worker_envs.append(wenv)
            live.workers.append(stack.enter_context(Proc(worker_command(hostname=spec.hostname), wenv,
                                                         root / f"{spec.name}.log", echo=False, name=spec.name)))
        stack.enter_context(Proc(webhook_worker_command(), env, root / "webhooks.log", echo=False, name="webhooks"))
        web = stack.enter_context(Proc(web_command(port, processes=web_processes),
                                       {**env, **(web_env or {})}, root / "web.log", echo=False, name="web"))
        live.web = web
        wait_http(live.base + "/readyz", 180, proc=web)
        print(f"\nstack: {live.base} (logs in {root})")
        yield live


#: Three API tokens (two users and an admin) and a webhook secret, for the tests of real users.
ANN, BOB, ADMIN = "ann-token-0123456789", "bob-token-0123456789", "root-token-0123456789"
TOKENS = f"ann:{ANN},bob:{BOB}:user,root:{ADMIN}:admin"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"framepack-test-secret-32-bytes!!").decode()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def secured(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path):
    """A stack with :data:`TOKENS`, a queued-jobs limit of 2 per token and webhooks allowed to
    ``http://127.0.0.1:<secured.hook_port>/hook`` (free when the stack starts, for a test's receiver)."""
    from stack import free_port

    hook_port = free_port()
    env = {"FRAMEPACK_API_TOKENS": TOKENS, "FRAMEPACK_MAX_QUEUED_PER_TOKEN": "2",
           "FRAMEPACK_WEBHOOK_ALLOW": f"http://127.0.0.1:{hook_port}/hook", "FRAMEPACK_WEBHOOK_SECRET": WEBHOOK_SECRET,
           "FRAMEPACK_WEBHOOK_BACKOFF": "0.5"}  # fmt: skip
    with running_stack(tmp_path_factory.mktemp("secured"), tiny_dir, env) as stack:
        stack.hook_port = hook_port
        yield stack


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path):
    with running_stack(tmp_path_factory.mktemp("stack"), tiny_dir) as stack:
        yield stack


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory):
    """One embedded Valkey for the fast tests (no worker, no web process)."""
    from stack import Valkey

    with Valkey(tmp_path_factory.mktemp("valkey")) as v:
        yield v


@pytest.fixture
def valkey_url(valkey_server) -> str:
    """A clean database on the shared embedded Valkey."""
    import redis

    url = valkey_server.url + "/1"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def settings(valkey_url: str, tmp_path: Path):
    from tasks.settings import Settings

    return Settings(redis_url=valkey_url, broker_url=valkey_url, result_backend=valkey_url,
                    results_dir=tmp_path / "results", heartbeat_ttl=3, redis_retry_seconds=2)  # fmt: skip
