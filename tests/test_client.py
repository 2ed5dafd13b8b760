"""The Python client and its command line against the live stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffusers_helper.video import read_mp4
from framepack_client import APIError, FramePackClient

from .conftest import png_bytes

pytestmark = pytest.mark.slow


def test_submit_wait_download(live, tmp_path, capsys):
    with FramePackClient(live.base) as client:
        job = client.submit(png_bytes(), prompt="orb", total_second_length=2, steps=3, seed=4, use_teacache=False)
        final = client.wait(job["id"], previews=tmp_path / "previews")
        assert final["type"] == "final" and final["state"] == "succeeded"
        assert final["result"]["seed"] == 4 and final["result"]["frames"] == 73
        assert len(read_mp4(client.download(job["id"], tmp_path / "out.mp4"))) == 73
        assert len(read_mp4(client.download(job["id"], tmp_path / "s1.mp4", section=1))) < 73
        assert list((tmp_path / "previews").glob("preview-*.jpg"))
        assert client.job(job["id"])["params"]["use_teacache"] is False
    err = capsys.readouterr().err
    assert "section 1:" in err and "section 2:" in err  # the progress output announced both sections


def test_errors_name_the_field(live):
    with FramePackClient(live.base) as client:
        with pytest.raises(APIError) as exc:
            client.submit(png_bytes(), steps=1000)
        assert exc.value.status == 422 and exc.value.field == "steps"
        with pytest.raises(APIError) as exc:
            list(client.watch("no-such-job", reconnect=False))
        assert exc.value.status == 404


def test_command_line(live, tmp_path):
    (tmp_path / "in.png").write_bytes(png_bytes())
    out = tmp_path / "cli.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "framepack_client.cli", "--server", live.base, "submit", str(tmp_path / "in.png"),
         "--prompt", "orb", "--set", "total_second_length=1", "--set", "steps=2", "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and len(read_mp4(out)) == 37
    bad = subprocess.run(
        [sys.executable, "-m", "framepack_client.cli", "--server", live.base, "submit", str(tmp_path / "in.png"),
         "--set", "cfg=99"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "(cfg)" in bad.stderr


def test_batch_command_follows_every_job_and_fails_on_a_refused_entry(live, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(seed=1))
    (tmp_path / "b.png").write_bytes(png_bytes(seed=2))
    good = tmp_path / "good.jsonl"
    good.write_text('{"image": "a.png", "prompt": "one"}\n{"image": "b.png", "prompt": "two", "steps": 3}\n')
    cmd = [sys.executable, "-m", "framepack_client.cli", "--server", live.base, "batch", str(good),
           "--set", "total_second_length=1", "--set", "steps=2", "-o", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    videos = proc.stdout.split()
    assert len(videos) == 2 and all(len(read_mp4(v)) == 37 for v in videos)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png"}\n{"image": "b.png", "cfg": 99}\n')
    proc = subprocess.run(cmd[:6] + [str(bad), "--set", "total_second_length=1", "--set", "steps=2"],
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 1 and "entry 2 refused: cfg" in proc.stderr


def test_extend_command(live, tmp_path):
    with FramePackClient(live.base) as client:
        job = client.submit(png_bytes(), total_second_length=1.2, steps=2, model="framepack-f1")
        client.wait(job["id"], progress=False)
    out = tmp_path / "longer.mp4"
    cmd = [sys.executable, "-m", "framepack_client.cli", "--server", live.base, "extend", job["id"],
           "--seconds", "1.2", "-o", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(read_mp4(out)) == 37 + 36  # one section more
