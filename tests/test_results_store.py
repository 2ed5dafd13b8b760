"""The results store (``tasks/results.py``), HTTP Range over it (``webapp/files.py``) and the
settings that choose it.  The directory store and Range run in the fast lane; the bucket
store runs against a real SeaweedFS (slow: it starts a server)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from flask import Flask

from tasks.results import BucketStore, DirectoryStore, StoreUnavailable, open_store, safe_name
from tasks.settings import Settings

DATA = bytes(range(256)) * 40  # 10,240 bytes, every offset recognisable


def test_results_url_chooses_the_store_and_names_bad_values(tmp_path: Path):
    s = Settings.from_env({"RESULTS_URL": "s3://framepack-results/prod/jobs/", "AWS_ENDPOINT_URL": "http://s3:9000",
                           "AWS_REGION": "eu-west-1"})  # fmt: skip
    assert (s.results_url, s.s3_endpoint_url, s.s3_region) == ("s3://framepack-results/prod/jobs", "http://s3:9000",
                                                               "eu-west-1")  # fmt: skip
    store = open_store(s)
    assert isinstance(store, BucketStore) and (store.bucket, store.prefix) == ("framepack-results", "prod/jobs")
    assert store.key("abc", "video.mp4") == "prod/jobs/abc/video.mp4"
    assert Settings.from_env({"AWS_ENDPOINT_URL_S3": "http://a", "AWS_ENDPOINT_URL": "http://b"}).s3_endpoint_url == \
        "http://a"  # fmt: skip
    for env in ({}, {"RESULTS_DIR": str(tmp_path)}, {"RESULTS_URL": str(tmp_path)},
                {"RESULTS_URL": tmp_path.as_uri()}):  # fmt: skip
        s = Settings.from_env(env)
        assert s.results_url == "" and isinstance(open_store(s), DirectoryStore)
    assert Settings.from_env({"RESULTS_URL": str(tmp_path)}).results_dir == tmp_path
    with pytest.raises(ValueError, match="RESULTS_URL"):
        Settings.from_env({"RESULTS_URL": "gs://bucket/x"})
    with pytest.raises(ValueError, match="3 characters"):
        Settings.from_env({"RESULTS_URL": "s3://ab/x"})
    with pytest.raises(ValueError, match="FRAMEPACK_RESULTS_REDIRECT"):
        Settings.from_env({"FRAMEPACK_RESULTS_REDIRECT": "maybe"})
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        Settings.from_env({"LOG_FORMAT": "xml"})


def test_file_names_never_leave_the_job_folder():
    assert safe_name("video-section-01.mp4") == "video-section-01.mp4"
    for bad in ("", ".", "..", "../x", "a/b", ".hidden", "a\\b"):
        with pytest.raises(ValueError):
            safe_name(bad)


def test_directory_store_stat_read_delete(tmp_path: Path):
    store = DirectoryStore(tmp_path)
    assert store.local and store.stat("job1", "video.mp4") is None and store.names("job1") == []
    folder = store.staging("job1")
    folder.mkdir()
    (folder / "video.mp4").write_bytes(DATA)
    (folder / "video.json").write_text("{}")
    blob = store.stat("job1", "video.mp4")
    assert (blob.size, blob.content_type) == (len(DATA), "video/mp4") and blob.etag.startswith('"')
    assert b"".join(store.read("job1", "video.mp4", 100, 5000)) == DATA[100:5100]
    assert store.names("job1") == ["video.json", "video.mp4"]
    assert store.presign("job1", "video.mp4", 60) is None
    assert store.delete("job1") == 2 and not folder.exists()


def _app(store) -> Flask:
    from webapp import errors, files

    app = Flask(__name__)
    errors.init_app(app)
    app.get("/f/<name>")(lambda name: files.serve(store, "job1", name, "video"))
    return app


def test_range_conditional_and_errors_over_a_store(tmp_path: Path):
    store = DirectoryStore(tmp_path)
    store.staging("job1").mkdir()
    (store.staging("job1") / "video.mp4").write_bytes(DATA)
    client = _app(store).test_client()

    full = client.get("/f/video.mp4")
    assert full.status_code == 200 and full.data == DATA and full.headers["Accept-Ranges"] == "bytes"
    assert full.mimetype == "video/mp4" and int(full.headers["Content-Length"]) == len(DATA)
    part = client.get("/f/video.mp4", headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.data == DATA[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(DATA)}"
    tail = client.get("/f/video.mp4", headers={"Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.data == DATA[-100:]
    assert client.get("/f/video.mp4", headers={"Range": "bytes=0-0,5-6"}).status_code == 200  # several: whole file
    bad = client.get("/f/video.mp4", headers={"Range": f"bytes={len(DATA)}-"})
    assert bad.status_code == 416 and bad.json["field"] == "range" and bad.headers["Content-Range"] == \
        f"bytes */{len(DATA)}"  # fmt: skip
    etag = full.headers["ETag"]
    assert client.get("/f/video.mp4", headers={"If-None-Match": etag}).status_code == 304
    stale = client.get("/f/video.mp4", headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.data == DATA  # changed since: the whole file
    fresh = client.get("/f/video.mp4", headers={"Range": "bytes=0-9", "If-Range": etag})
    assert fresh.status_code == 206 and fresh.data == DATA[:10]
    head = client.head("/f/video.mp4")
    assert head.status_code == 200 and head.data == b"" and int(head.headers["Content-Length"]) == len(DATA)
    missing = client.get("/f/video-section-09.mp4")
    assert missing.status_code == 404 and missing.json["field"] == "video"


@pytest.mark.slow
def test_bucket_store_against_a_real_s3_server(tmp_path: Path):
    from stack import SeaweedS3

    with SeaweedS3(tmp_path / "s3") as s3:
        store = BucketStore(f"s3://{s3.bucket}/pre/fix", tmp_path / "work", s3.endpoint, "us-east-1")
        env = s3.env()
        with pytest.MonkeyPatch.context() as mp:  # boto3's credential chain reads the standard variables
            mp.setenv("AWS_ACCESS_KEY_ID", env["AWS_ACCESS_KEY_ID"])
            mp.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"])
            folder = store.staging("job1")
            folder.mkdir(parents=True)
            for name in ("video.mp4", "video-section-01.mp4", "input.png"):
                (folder / name).write_bytes(DATA)
                store.publish("job1", folder / name)
            store.release_staging("job1")
            assert not folder.exists()  # nothing of it needed on the worker's disk any more
            assert sorted(s3.keys("pre/fix/job1/")) == ["pre/fix/job1/input.png", "pre/fix/job1/video-section-01.mp4",
                                                        "pre/fix/job1/video.mp4"]  # fmt: skip
            blob = store.stat("job1", "video.mp4")
            assert (blob.size, blob.content_type) == (len(DATA), "video/mp4")
            assert store.stat("job1", "video.json") is None
            assert b"".join(store.read("job1", "video.mp4", 4000, 3000)) == DATA[4000:7000]

            client = _app(store).test_client()  # the same Range code as for a directory
            part = client.get("/f/video.mp4", headers={"Range": "bytes=10-19"})
            assert part.status_code == 206 and part.data == DATA[10:20]
            assert client.get("/f/video.mp4", headers={"If-None-Match": part.headers["ETag"]}).status_code == 304

            url = store.presign("job1", "video.mp4", 60)
            signed = httpx.get(url, headers={"Range": "bytes=0-99"})
            assert signed.status_code == 206 and signed.content == DATA[:100]

            assert store.names("job1") == ["input.png", "video-section-01.mp4", "video.mp4"]
            assert store.delete("job1") == 3 and s3.keys("pre/fix/job1/") == []

            # the worker's uploader: a section is passed on only once it can be downloaded
            from diffusers_helper import events as ev
            from tasks.uploader import Uploader

            seen: list = []
            uploader = Uploader(store, "job2", lambda e: seen.append((e, store.stat("job2", e.path.name))))
            uploader.directory.mkdir(parents=True)
            for k in (1, 2):
                (uploader.directory / f"video-section-{k:02d}.mp4").write_bytes(DATA[: 1000 * k])
                uploader.on_event(ev.SectionDone(k, 2, uploader.directory / f"video-section-{k:02d}.mp4", 37, 1.2))
            (uploader.directory / "video.json").write_text("{}")  # written at the end: stored by finish()
            uploader.finish()
            assert [(e.section, blob.size) for e, blob in seen] == [(1, 1000), (2, 2000)]
            assert store.names("job2") == ["video-section-01.mp4", "video-section-02.mp4", "video.json"]
            uploader.release()
            assert not uploader.directory.exists()

    t = time.monotonic()  # the server is gone: calls fail with StoreUnavailable, after boto3's retries
    with pytest.raises(StoreUnavailable):
        store.stat("job1", "video.mp4")
    assert time.monotonic() - t < 60


def test_an_unreachable_bucket_holds_sections_back_and_fails_the_job(tmp_path: Path, monkeypatch):
    """A real refused connection (nothing listens on the port), not a mock: the section is
    never announced, and storing the job's files fails with the file's name."""
    from diffusers_helper import events as ev
    from stack import free_port
    from tasks import uploader as up

    monkeypatch.setattr(up, "PAUSE", 0.0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store = BucketStore("s3://results/x", tmp_path / "work", f"http://127.0.0.1:{free_port()}", "us-east-1",
                        attempts=1)  # fmt: skip
    forwarded: list = []
    uploader = up.Uploader(store, "job1", forwarded.append)
    uploader.directory.mkdir(parents=True)
    section = uploader.directory / "video-section-01.mp4"
    section.write_bytes(DATA)
    uploader.on_event(ev.Stage(ev.STAGE_SAMPLING))  # not a file: passed straight on
    uploader.on_event(ev.SectionDone(1, 2, section, 37, 1.2))
    with pytest.raises(StoreUnavailable, match="video-section-01.mp4"):
        uploader.finish(timeout=60)
    assert forwarded == [ev.Stage(ev.STAGE_SAMPLING)]
    uploader.release()
    assert not uploader.directory.exists()
