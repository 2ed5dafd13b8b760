"""framepack-client's failures, each one line on stderr with its documented exit status and no
traceback, against real servers that fail in each way (none, an HTML one, ours with tokens)."""

from __future__ import annotations

import dataclasses
import http.server
import subprocess
import sys
import threading

import pytest
from werkzeug.serving import make_server

from framepack_client.cli import EXIT_CODES, summary
from stack import ROOT, free_port

from .conftest import TOKENS, png_bytes


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    base = {"PATH": "/usr/bin:/bin", "FRAMEPACK_SERVER": f"http://127.0.0.1:{free_port()}"}  # nothing listens
    done = subprocess.run([sys.executable, "-m", "framepack_client.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**base, **(env or {})})  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def html_server():
    """A real web server that is not this API (answers HTML)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def secured(settings):
    """Our web tier with API tokens, served for real."""
    from webapp import create_app

    app = create_app({"SETTINGS": dataclasses.replace(settings, api_tokens=TOKENS), "SWEEPER": False})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_an_unreachable_server_says_which_url(tmp_path):
    port = free_port()
    nowhere = (["--server", f"http://127.0.0.1:{port}", "list"], ["list"], ["--server", "http://nope.invalid", "list"])
    for args in nowhere:
        rc, _, err = cli(*args)
        assert rc == 3 and "cannot reach the server at" in one_line(err), err
    rc, _, err = cli("--server", f"127.0.0.1:{port}", "list")
    assert rc == 3 and "not an http:// or https:// URL" in one_line(err)


def test_a_server_that_is_not_this_api_is_named_not_printed(html_server):
    rc, _, err = cli("--server", html_server, "list")
    line = one_line(err)
    assert rc == 3 and "not this API" in line and "<html" not in line.lower()


def test_local_files_name_themselves(tmp_path):
    rc, _, err = cli("submit", str(tmp_path / "nope.png"))
    assert rc == 5 and "nope.png" in one_line(err)
    (tmp_path / "a.png").write_bytes(png_bytes())
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"image": "a.png"}\n{"image": "b.png"}\n')
    rc, _, err = cli("batch", str(missing))
    assert rc == 5 and "missing.jsonl:2" in one_line(err) and "b.png" in one_line(err)
    odd = tmp_path / "odd.jsonl"
    odd.write_text('["a.png"]\n')
    rc, _, err = cli("batch", str(odd))
    assert rc == 5 and "odd.jsonl:1: each line must be a JSON object" in one_line(err)
    rc, _, err = cli("batch", str(tmp_path / "none.jsonl"))
    assert rc == 5 and "none.jsonl" in one_line(err)


def test_a_refused_token_says_what_to_do(secured):
    rc, _, err = cli("--server", secured, "list")
    assert rc == 4 and "FRAMEPACK_TOKEN" in one_line(err)
    rc, _, err = cli("--server", secured, "--token", "wrong", "list")
    assert rc == 4 and "--token" in one_line(err)


def test_help_documents_every_command_option_and_exit_status():
    rc, out, _ = cli("--help")
    assert rc == 0 and all(f"  {code}  " in out for code in EXIT_CODES) and "$FRAMEPACK_SERVER" in out
    for command in ("submit", "batch", "extend", "watch", "status", "cancel", "list", "loras"):
        assert command in out
    rc, out, _ = cli("batch", "--help")
    assert rc == 0 and "one JSON object per line" in out and '{"image": "cat.png"' in out
    rc, out, _ = cli("status", "--help")
    assert "--json" in out and "preview" in out


def test_status_is_a_few_readable_lines_without_the_preview():
    job = {"id": "j1", "state": "failed", "progress": 0.4, "error": "GPU out of memory", "params": {"prompt": "orb"},
           "preview": {"image": "data:image/jpeg;base64," + "A" * 5000}}  # fmt: skip
    text = summary(job)
    assert text.splitlines()[0] == "j1  failed  40%" and "why: GPU out of memory" in text and "AAAA" not in text
