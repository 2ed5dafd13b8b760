"""Result files over HTTP, from whichever store holds them (:mod:`tasks.results`).

One implementation of conditional requests and single byte ranges for both stores: the
web tier reads only the bytes asked for (a ranged GET on the bucket), so a browser seeking
in a long video costs what it shows.  With ``FRAMEPACK_RESULTS_REDIRECT`` a bucket's files
are answered with a 302 to a presigned URL instead (the bucket serves the bytes; the web
tier serves none), valid ``FRAMEPACK_PRESIGN_SECONDS``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Response, redirect, request
from werkzeug.http import http_date, is_resource_modified

from tasks.results import ResultsStore

from .errors import ApiError


def serve(store: ResultsStore, job_id: str, name: str, field: str, *, redirect_seconds: int = 0) -> Response:
    """``name`` of job ``job_id``: 200, 206 (one range), 304, 302 (presigned) or 404/416
    naming ``field``."""
    blob = store.stat(job_id, name)
    if blob is None:
        raise ApiError(404, f"{field}: no such file (yet)", field)
    if redirect_seconds and request.method == "GET":
        url = store.presign(job_id, name, redirect_seconds)
        if url:
            resp = redirect(url, 302)
            resp.headers["Cache-Control"] = "no-store"  # the URL expires; never cache the pointer
            return resp
    headers = {"ETag": blob.etag, "Last-Modified": http_date(blob.modified), "Accept-Ranges": "bytes",
               "Cache-Control": "no-cache"}  # fmt: skip
    modified = datetime.fromtimestamp(blob.modified, UTC)
    if not is_resource_modified(request.environ, etag=blob.etag.strip('"'), last_modified=modified):
        return Response(status=304, headers=headers)
    start, length, status = 0, blob.size, 200
    ranges = request.range
    if_range = request.headers.get("If-Range")
    if ranges is not None and len(ranges.ranges) == 1 and (if_range is None or if_range.strip() == blob.etag):
        span = ranges.range_for_length(blob.size)
        if span is None:
            raise ApiError(416, f"range: not satisfiable for {blob.size} bytes", "range",
                           headers={"Content-Range": f"bytes */{blob.size}"})  # fmt: skip
        start, length, status = span[0], span[1] - span[0], 206
        headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{blob.size}"
    headers["Content-Length"] = str(length)
    body = store.read(job_id, name, start, length)  # a generator: nothing is read for HEAD
    return Response(body, status=status, headers=headers, mimetype=blob.content_type, direct_passthrough=True)
