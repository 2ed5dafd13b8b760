"""Shared fixtures: the tiny profile built once per test session, in a private cache."""

from __future__ import annotations

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
    """A running Valkey + Celery worker + gunicorn web tier (what `make run` starts)."""

    def __init__(self, base: str, redis_url: str, root: Path, env: dict[str, str]):
        self.base, self.redis_url, self.root, self.env = base, redis_url, root, env
        self.ws_base = base.replace("http://", "ws://")

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

        return httpx.get(f"{self.base}/api/jobs/{job_id}").json()


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path):
    from stack import Proc, Valkey, free_port, stack_env, wait_http, web_command, worker_command

    root = tmp_path_factory.mktemp("stack")
    with Valkey(root / "valkey") as valkey:
        redis_url = valkey.url + "/0"
        env = stack_env(
            redis_url,
            root / "results",
            {
                "FRAMEPACK_CACHE": str(tiny_dir.parent),
                "FRAMEPACK_PROGRESS_INTERVAL": "0",
                "FRAMEPACK_MAX_UPLOAD_BYTES": str(2 * 2**20),
                "FRAMEPACK_TORCH_THREADS": "1",
                "FRAMEPACK_WS_SEND_BUFFER": str(16 * 1024),
                # short heartbeats, so a stall shows within a test
                "FRAMEPACK_HEARTBEAT_SECONDS": "0.5",
                "FRAMEPACK_HEARTBEAT_TTL": "3",
                "FRAMEPACK_PROFILE": "tiny",
            },
        )
        port = free_port()
        with (
            Proc(worker_command(), env, root / "worker.log", echo=False, name="worker"),
            Proc(web_command(port, threads=400), env, root / "web.log", echo=False, name="web") as web,
        ):
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/readyz", 180, proc=web)
            print(f"\nlive stack: {base} (logs in {root})")
            yield LiveStack(base, redis_url, root, env)
