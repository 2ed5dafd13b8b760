"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=tests.schemathesis_hooks``) for the API fuzz run.

A schema cannot say "a decodable image at least 16 px a side": submissions that are valid
by the schema get a real 32x32 PNG, F1 submissions (which refuse an end image, a rule the
multipart schema cannot carry) drop it, and so do submissions with ``webhook_events`` but no
``webhook``."""

from __future__ import annotations

import base64
import io

import schemathesis
from PIL import Image

_buf = io.BytesIO()
Image.new("RGB", (32, 32), "red").save(_buf, format="PNG")
PNG = _buf.getvalue()


@schemathesis.hook
def map_case(ctx, case):
    if case.meta is not None and case.meta.generation.mode.is_positive and isinstance(case.body, dict):
        for name in ("image", "end_image"):
            if name in case.body:
                case.body[name] = PNG if case.media_type == "multipart/form-data" else base64.b64encode(PNG).decode()
        if case.body.get("model") == "framepack-f1" or case.body.get("sampling_mode") == "forward":
            case.body.pop("end_image", None)
        if "webhook" not in case.body:  # webhook_events needs a webhook (a rule multipart cannot carry)
            case.body.pop("webhook_events", None)
    return case
