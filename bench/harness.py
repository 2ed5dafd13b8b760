"""Shared by the benchmarks: a real stack to measure against, and small statistics helpers.

Every benchmark runs against the same processes `make run` starts (stack.py): an embedded
Valkey, the gunicorn web tier and, where a benchmark needs one, a Celery worker on the tiny
profile.  Numbers are only compared within one run on one machine.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis

from stack import Proc, Valkey, free_port, stack_env, wait_http, web_command, worker_command


class BenchStack:
    """Valkey + web tier (+ worker) in a temporary directory; a context manager."""

    def __init__(self, worker: bool = True, threads: int = 1200, env: dict[str, str] | None = None,
                 root: Path | None = None, server: str | None = None,
                 web_args: list[str] | None = None):  # fmt: skip
        """``server``: the web server kind (``stack.web_command``'s ``server``; None: its default);
        ``threads`` only matters for ``gthread``; ``web_args``: more gunicorn options.
        ``worker=False`` starts no Celery worker: a benchmark may start one later with
        :meth:`start_worker`."""
        self.with_worker = worker
        self.threads = threads
        self.server = server
        self.web_args = web_args or []
        self.extra_env = env or {}
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="fp-bench-")
        self.root = Path(root or self._tmp.name)
        self._stack = ExitStack()

    def __enter__(self) -> BenchStack:
        valkey = self._stack.enter_context(Valkey(self.root / "valkey"))
        self.redis_url = valkey.url + "/0"
        self.env = stack_env(self.redis_url, self.root / "results", {"FRAMEPACK_PROFILE": "tiny", **self.extra_env})
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        self.valkey = valkey
        if self.with_worker:
            self.worker = self._stack.enter_context(self._worker_proc())
        kind = {"server": self.server} if self.server else {}
        cmd = web_command(self.port, self.threads, **kind)
        cmd[-1:-1] = self.web_args  # options go before the app
        self.web = self._stack.enter_context(Proc(cmd, self.env, self.root / "web.log", echo=False, name="web"))
        wait_http(self.base + ("/readyz" if self.with_worker else "/healthz"), 300, proc=self.web)
        return self

    def _worker_proc(self) -> Proc:
        return Proc(worker_command(), self.env, self.root / "worker.log", echo=False, name="worker")

    def start_worker(self, timeout: float = 300) -> None:
        """Start the Celery worker of a stack made with ``worker=False``, and return once
        ``/readyz`` says 200: a benchmark can attach its watchers to a queued job first."""
        self.worker = self._stack.enter_context(self._worker_proc())
        wait_http(self.base + "/readyz", timeout, proc=self.worker)

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        if self._tmp:
            self._tmp.cleanup()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def web_pid(self) -> int:
        """The gunicorn worker process (the child of the master) that serves requests."""
        master = self.web.popen.pid
        out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else master

    def valkey_pid(self) -> int:
        """The Valkey server process (it says so itself: ``INFO server``)."""
        r = self.redis()
        try:
            return int(r.info("server")["process_id"])
        finally:
            r.close()


def bench_main(run: Any, markdown: Any, doc: str, smoke_help: str, extra: dict[str, dict] | None = None) -> None:
    """The command line every benchmark module shares: ``[--smoke] [--json OUT] [extra flags]``."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    ap.add_argument("--json", default=None, help="write the raw result here")
    for flag, options in (extra or {}).items():
        ap.add_argument(flag, **options)
    args = vars(ap.parse_args())
    out = args.pop("json")
    result = run(**args)
    print(markdown(result))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))


def commandstats(r: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items()}


def command_delta(before: dict[str, int], after: dict[str, int], skip: tuple[str, ...] = ("info",)) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if k not in skip and after[k] - before.get(k, 0)}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def pct(p: float) -> float:
        return v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))]

    return {"n": len(v), "p50": pct(50), "p95": pct(95), "p99": pct(99), "max": v[-1], "mean": statistics.fmean(v)}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pids: list[int], children: bool = True) -> dict[int, float]:
    """User + system CPU seconds of each process in ``pids`` (and, with ``children``, of each
    live descendant), from ``/proc/<pid>/stat``; keyed by pid, so that two samples can be
    subtracted process by process (:func:`cpu_delta`) even when a child came or went between."""
    import psutil

    ticks = os.sysconf("SC_CLK_TCK")
    tree: set[int] = set()
    for pid in pids:
        tree.add(pid)
        if children:
            try:
                tree.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    out: dict[int, float] = {}
    for pid in tree:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # gone
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, utime 14, stime 15
        out[pid] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two :func:`cpu_seconds` samples (processes that exited in
    between are lost; ones that started count from zero)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def machine_facts() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    facts: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return facts
