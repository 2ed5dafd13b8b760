"""The code's shape, checked without servers: imports without side effects, and every
Flask route in the OpenAPI document (and back)."""

from __future__ import annotations

import re
import subprocess
import sys

from stack import ROOT

#: Routes that are not the HTTP API: the UI's pages and files, the interactive docs, the
#: document itself, and the WebSocket streams (docs/protocol.md describes those).
NOT_API = {"/", "/jobs/{job_id}", "/batches/{job_id}", "/static/{filename}", "/docs/", "/docs/{path}",
           "/openapi.json", "/api/openapi.json", "/ws/jobs", "/ws/jobs/{job_id}"}  # fmt: skip


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://127.0.0.1:1/0"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True,
                          text=True, check=False)  # fmt: skip


def test_importing_tasks_reads_no_environment_and_builds_nothing():
    # a setting that makes Settings.from_env raise: any import that reads it fails
    code = ("import sys, tasks, tasks.protocol, tasks.lifecycle, tasks.snapshot, tasks.webhooks, tasks.metrics\n"
            "print(sorted(m for m in ('tasks.worker', 'tasks.job', 'torch', 'flask') if m in sys.modules))")
    done = _run(code, FRAMEPACK_WEBHOOK_ALLOW="https://hooks.example")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_web_tier_imports_neither_the_worker_nor_torch():
    code = ("import sys, webapp\napp = webapp.create_app()\n"
            "print(sorted(m for m in ('tasks.worker', 'tasks.job', 'torch', 'diffusers') if m in sys.modules))")
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_celery_finds_the_app_and_its_tasks_under_tasks():
    code = "from tasks import app\nprint(sorted(t for t in app.tasks if not t.startswith('celery.')))"
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['tasks.deliver_webhook', 'tasks.generate_video']"


def test_every_route_is_documented_and_every_documented_path_is_a_route():
    import webapp
    from webapp import openapi

    app = webapp.create_app({"REDIS_URL": "redis://127.0.0.1:1/0"})
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)  # /api/jobs/<job_id> -> /api/jobs/{job_id}
        routes.setdefault(path, set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    documented = {path: set(ops) - {"parameters"} for path, ops in openapi.document()["paths"].items()}
    assert set(routes) - NOT_API == set(documented), "routes and the OpenAPI document differ"
    for path, methods in documented.items():
        assert routes[path] == methods, f"{path}: Flask serves {sorted(routes[path])}, documented {sorted(methods)}"
