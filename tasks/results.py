"""Where a job's files live: a local directory or an S3-compatible bucket (torch- and Flask-free).

Both backends hold ``<root>/<job_id>/<name>``: the section videos, the final video, the
JSON sidecar and the input images.  :func:`open_store` picks one from the settings
(``RESULTS_URL``):

- :class:`DirectoryStore` (the default, ``RESULTS_DIR``): the worker writes straight into
  the directory, so publishing is a no-op; web and workers must share that disk.
- :class:`BucketStore` (``s3://bucket/prefix``): the worker writes into a private work
  directory (``FRAMEPACK_WORK_DIR``) and uploads each file as it is written
  (:class:`tasks.uploader.Uploader`); the web tier reads ranges from the bucket or hands
  out presigned URLs.  No disk is shared.

The web tier serves both through the same three calls (:meth:`stat`, :meth:`read`,
:meth:`presign`), so HTTP Range has one implementation (``webapp/files.py``).
"""

from __future__ import annotations

import mimetypes
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .settings import Settings

#: Bytes per chunk when streaming a file or an object.
CHUNK = 256 * 1024


class StoreUnavailable(Exception):
    """The bucket could not be reached or refused a call (not "no such file")."""


@dataclass(frozen=True)
class Blob:
    """One stored file, as an HTTP reply describes it."""

    name: str
    size: int
    etag: str  # quoted, as in an ETag header
    modified: float  # epoch seconds
    content_type: str


def safe_name(name: str) -> str:
    """A file name inside a job's folder: never a path (names come from Redis records)."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"not a result file name: {name!r}")
    return name


def content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


class ResultsStore:
    """What the worker and the web tier need of the place results live."""

    url: str
    #: True when the worker's files are already where the web tier reads them.
    local: bool

    def staging(self, job_id: str) -> Path:
        """The directory the worker writes a job's files into."""
        raise NotImplementedError

    def publish(self, job_id: str, path: Path, name: str | None = None) -> None:
        """Make ``path`` (a file in :meth:`staging`) readable by the web tier, as ``name``
        (by default its own)."""
        raise NotImplementedError

    def release_staging(self, job_id: str) -> None:
        """The job's files are all published: the worker's copy may go."""

    def stat(self, job_id: str, name: str) -> Blob | None:
        raise NotImplementedError

    def read(self, job_id: str, name: str, start: int, length: int) -> Iterator[bytes]:
        """``length`` bytes from ``start`` (the caller checked both against :meth:`stat`)."""
        raise NotImplementedError

    def presign(self, job_id: str, name: str, seconds: int) -> str | None:
        """A URL a client can GET without credentials for ``seconds``; None where there is none."""
        return None

    def names(self, job_id: str) -> list[str]:
        raise NotImplementedError

    def read_all(self, job_id: str, name: str) -> bytes | None:
        """A whole (small) file, or None if there is none: the input image for a thumbnail
        or an extension."""
        blob = self.stat(job_id, name)
        return None if blob is None else b"".join(self.read(job_id, name, 0, blob.size))

    def local_copy(self, job_id: str, name: str, dest: Path) -> Path | None:
        """A path the worker can read ``name`` of ``job_id`` from: the file itself where the
        store is a directory, else a download to ``dest``; None if there is no such file.
        (A section checkpoint: a job resumed on another host, or another job's, extended.)"""
        raise NotImplementedError

    def delete(self, job_id: str) -> int:
        """Remove every file of the job; returns how many went."""
        raise NotImplementedError


class DirectoryStore(ResultsStore):
    local = True

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = self.root.as_uri()

    def _path(self, job_id: str, name: str) -> Path:
        return self.root / safe_name(job_id) / safe_name(name)

    def staging(self, job_id: str) -> Path:
        return self.root / safe_name(job_id)

    def publish(self, job_id: str, path: Path, name: str | None = None) -> None:
        pass  # written in place

    def stat(self, job_id: str, name: str) -> Blob | None:
        path = self._path(job_id, name)
        if not path.is_file():
            return None
        st = path.stat()
        return Blob(name, st.st_size, f'"{st.st_mtime_ns:x}-{st.st_size:x}"', st.st_mtime, content_type(name))

    def read(self, job_id: str, name: str, start: int, length: int) -> Iterator[bytes]:
        with open(self._path(job_id, name), "rb") as f:
            f.seek(start)
            while length > 0:
                data = f.read(min(CHUNK, length))
                if not data:
                    return
                length -= len(data)
                yield data

    def local_copy(self, job_id: str, name: str, dest: Path) -> Path | None:
        path = self._path(job_id, name)
        return path if path.is_file() else None

    def names(self, job_id: str) -> list[str]:
        folder = self.staging(job_id)
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []

    def delete(self, job_id: str) -> int:
        count = len(self.names(job_id))
        shutil.rmtree(self.staging(job_id), ignore_errors=True)
        return count


class BucketStore(ResultsStore):
    """An S3-compatible bucket through boto3 (AWS, MinIO, SeaweedFS, R2...).

    One client per process, made on first use (boto3 clients are thread-safe; they must
    not cross a fork).  With an endpoint URL (not AWS) addresses are path-style, which
    every S3-compatible server understands."""

    local = False

    def __init__(self, url: str, work_dir: Path, endpoint_url: str = "", region: str = "", attempts: int = 5):
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"not an s3:// URL: {url!r}")
        self.url = url
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.work_dir = Path(work_dir)
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.attempts = attempts  # per call, with boto3's standard back-off
        self._client: Any = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                import boto3
                from botocore.config import Config

                config = Config(
                    retries={"max_attempts": self.attempts, "mode": "standard"},
                    max_pool_connections=64,  # the web tier streams from many threads
                    connect_timeout=5,
                    read_timeout=60,
                    s3={"addressing_style": "path" if self.endpoint_url else "auto"},
                )
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
                )
                self._pid = os.getpid()
            return self._client

    def key(self, job_id: str, name: str = "") -> str:
        folder = f"{self.prefix}/{safe_name(job_id)}/" if self.prefix else f"{safe_name(job_id)}/"
        return folder + (safe_name(name) if name else "")

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(what) from None
            raise StoreUnavailable(f"results bucket {self.bucket}: {what}: {exc}") from exc
        except (BotoCoreError, Boto3Error) as exc:  # (Boto3Error: upload_file's S3UploadFailedError)
            raise StoreUnavailable(f"results bucket {self.bucket}: {what}: {exc}") from exc

    def staging(self, job_id: str) -> Path:
        return self.work_dir / safe_name(job_id)

    def publish(self, job_id: str, path: Path, name: str | None = None) -> None:
        name = name or path.name
        extra = {"ContentType": content_type(name)}
        self._call(f"upload {name}", self.client.upload_file, str(path), self.bucket, self.key(job_id, name),
                   ExtraArgs=extra)  # fmt: skip

    def release_staging(self, job_id: str) -> None:
        shutil.rmtree(self.staging(job_id), ignore_errors=True)

    def stat(self, job_id: str, name: str) -> Blob | None:
        try:
            head = self._call(f"stat {name}", self.client.head_object, Bucket=self.bucket, Key=self.key(job_id, name))
        except FileNotFoundError:
            return None
        return Blob(name, int(head["ContentLength"]), head.get("ETag") or '""', head["LastModified"].timestamp(),
                    head.get("ContentType") or content_type(name))  # fmt: skip

    def read(self, job_id: str, name: str, start: int, length: int) -> Iterator[bytes]:
        if length <= 0:
            return
        obj = self._call(f"read {name}", self.client.get_object, Bucket=self.bucket, Key=self.key(job_id, name),
                         Range=f"bytes={start}-{start + length - 1}")  # fmt: skip
        body = obj["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def presign(self, job_id: str, name: str, seconds: int) -> str | None:
        params = {"Bucket": self.bucket, "Key": self.key(job_id, name)}
        return self._call("presign", self.client.generate_presigned_url, "get_object", Params=params,
                          ExpiresIn=seconds)  # fmt: skip

    def local_copy(self, job_id: str, name: str, dest: Path) -> Path | None:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            self._call(f"download {name}", self.client.download_file, self.bucket, self.key(job_id, name), str(tmp))
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            return None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, dest)  # whole or not at all: a checkpoint is read as one file
        return dest

    def _keys(self, job_id: str) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.key(job_id))
        for page in pages:  # (requests happen as this is iterated: callers wrap it in _call)
            for item in page.get("Contents", []):
                yield item["Key"]

    def names(self, job_id: str) -> list[str]:
        folder = self.key(job_id)
        return sorted(k[len(folder) :] for k in self._call("list", list, self._keys(job_id)))

    def delete(self, job_id: str) -> int:
        keys = self._call("list", list, self._keys(job_id))
        for i in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys a call
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            self._call("delete", self.client.delete_objects, Bucket=self.bucket, Delete=batch)
        return len(keys)


def open_store(settings: Settings) -> ResultsStore:
    """The store ``settings`` name (``RESULTS_URL``, else ``RESULTS_DIR``)."""
    if settings.results_url.startswith("s3://"):
        return BucketStore(settings.results_url, settings.work_dir, settings.s3_endpoint_url, settings.s3_region)
    return DirectoryStore(settings.results_dir)
