"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=tests.schemathesis_hooks``) for the API fuzz run.

A schema cannot say "a decodable image at least 16 px a side": submissions that are valid
by the schema get a real 32x32 PNG, F1 submissions (which refuse an end image, a rule the
multipart schema cannot carry) drop it, and so do submissions with ``webhook_events`` but no
``webhook``; prompt spans that start after the video ends (the schema cannot compare two
fields) are dropped, and timestamps in a prompt's text are not left to chance."""

from __future__ import annotations

import base64
import io

import schemathesis
from PIL import Image

_buf = io.BytesIO()
Image.new("RGB", (32, 32), "red").save(_buf, format="PNG")
PNG = _buf.getvalue()


def _prompts_inside(entry: dict, length: object = 5.0, *, own_length: bool = True) -> None:
    length = entry.get("total_second_length", length) if own_length else length
    if isinstance(entry.get("prompts"), list) and isinstance(length, int | float):
        entry["prompts"] = [p for p in entry["prompts"] if not isinstance(p, dict)
                            or not isinstance(p.get("start"), int | float) or p["start"] < length]  # fmt: skip
    if isinstance(entry.get("prompt"), str):
        entry["prompt"] = entry["prompt"].replace("[", "(")


def _fix(entry: dict, multipart: bool, forward: bool, length: object = 5.0) -> None:
    _prompts_inside(entry, length)
    for name in ("image", "end_image"):
        if name in entry:
            entry[name] = PNG if multipart else base64.b64encode(PNG).decode()
    if forward or entry.get("model") == "framepack-f1" or entry.get("sampling_mode") == "forward":
        entry.pop("end_image", None)


@schemathesis.hook
def map_case(ctx, case):
    if case.meta is not None and case.meta.generation.mode.is_positive and isinstance(case.body, dict):
        multipart = case.media_type == "multipart/form-data"
        _fix(case.body, multipart, False)
        if multipart and isinstance(case.body.get("images"), list):  # a batch of uploads
            case.body["images"] = [PNG for _ in case.body["images"]]
        if isinstance(case.body.get("jobs"), list):  # a batch of job specs
            defaults = case.body.get("defaults") if isinstance(case.body.get("defaults"), dict) else {}
            forward = defaults.get("model") == "framepack-f1"
            lengths = [j.get("total_second_length", defaults.get("total_second_length", 5.0))
                       for j in case.body["jobs"] if isinstance(j, dict)]  # fmt: skip
            shortest = min([v for v in lengths if isinstance(v, int | float)] or [5.0])
            _prompts_inside(defaults, shortest, own_length=False)  # the defaults' spans apply to every entry
            for job in case.body["jobs"]:
                if isinstance(job, dict):
                    _fix(job, False, forward, defaults.get("total_second_length", 5.0))
                    if "webhook" not in job and "webhook" not in defaults:  # an entry is defaults + its fields
                        job.pop("webhook_events", None)
            if "webhook" not in defaults and any(isinstance(j, dict) and "webhook" not in j for j in case.body["jobs"]):
                defaults.pop("webhook_events", None)
        if "webhook" not in case.body:  # webhook_events needs a webhook (a rule multipart cannot carry)
            case.body.pop("webhook_events", None)
    return case
