"""``framepack-client``: use a framepack-celery server from the shell.

    framepack-client submit photo.jpg --prompt "..." --set total_second_length=5 --lora NAME:0.8 -o out.mp4
    framepack-client batch jobs.jsonl [--set steps=25] [-o DIR]
    framepack-client extend JOB_ID --seconds 3 [--prompt "..."] [-o longer.mp4]
    framepack-client watch JOB_ID [-o out.mp4]
    framepack-client status JOB_ID [--json] | cancel JOB_ID | list | loras

With API tokens on the server: ``--token TOKEN`` or ``FRAMEPACK_TOKEN``.  ``submit --webhook URL``
asks the server to POST signed job snapshots there (``--webhook-events start,section,completed``).
Every failure is one line on stderr and an exit status of its own (:data:`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from . import APIError, FramePackClient

#: The exit statuses, as ``--help`` lists them.
EXIT_CODES = {
    0: "done (the job succeeded, the command did what it says)",
    1: "a job did not succeed, or a batch entry was refused",
    2: "the server refused the request (the field it names is wrong), or the command line is wrong",
    3: "the server cannot be reached, or what answered is not a framepack-celery server",
    4: "the server refused the API token (--token / FRAMEPACK_TOKEN)",
    5: "a local file is missing or unreadable (an image, the batch file, where to write)",
}
BATCH_FORMAT = """\
The batch file has one JSON object per line: "image" (a path, relative to the file), and any
FramePack parameter ("prompt", "total_second_length", "steps", "seed", "end_image", "loras",
...); --set gives defaults for every line.  Blank lines are skipped.  Example:

  {"image": "cat.png", "prompt": "The cat turns its head", "total_second_length": 3}
  {"image": "dog.png", "prompt": "The dog wags its tail", "seed": 7}
"""


class UsageError(Exception):
    """A mistake on the command line or in a local file (exit status ``code``)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _params(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--set wants NAME=VALUE, got {pair!r}", 2)
        out[key] = value
    return out


def parser() -> argparse.ArgumentParser:
    epilog = "exit status:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())
    ap = argparse.ArgumentParser(prog="framepack-client", description=__doc__.split("\n\n")[0], epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--server", default=os.environ.get("FRAMEPACK_SERVER", "http://127.0.0.1:8000"),
                    help="the server's URL (default: $FRAMEPACK_SERVER, else http://127.0.0.1:8000)")  # fmt: skip
    ap.add_argument("--token", default=os.environ.get("FRAMEPACK_TOKEN"),
                    help="API token, when the server requires one (default: $FRAMEPACK_TOKEN)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("submit", help="queue a job, then watch it and download the video")
    s.add_argument("image", help="the start image (PNG, JPEG, WebP ...)")
    s.add_argument("--prompt", default="", help='what the video shows; "[0s: ...] [2s: ...]" changes it over time')
    s.add_argument("--end-image", default=None, help="the image the video ends on (the original model only)")
    s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any FramePack parameter, e.g. total_second_length=5 steps=25 seed=7 (repeatable)")
    s.add_argument("--lora", action="append", default=[], metavar="NAME:WEIGHT", help="a LoRA (repeatable)")
    s.add_argument("-o", "--output", default=None, help="download the video here when done")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    s.add_argument("--previews", default=None, metavar="DIR", help="save preview strips in this directory")
    s.add_argument("--webhook", default=None, help="URL the server POSTs signed job snapshots to")
    s.add_argument("--webhook-events", default=None, metavar="EVENTS",
                   help="comma-separated: start, section, completed (default: completed)")
    b = sub.add_parser("batch", help="queue a batch from a JSON-lines file, follow every job, download",
                       description=BATCH_FORMAT, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    b.add_argument("file", help="the JSON-lines file (see above)")
    b.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="defaults for every entry")
    b.add_argument("-o", "--output", default=None, metavar="DIR", help="download every video into this directory")
    b.add_argument("--no-wait", action="store_true", help="print the batch id and return at once")
    x = sub.add_parser("extend", help="continue a finished video forward (F1), follow it, download")
    x.add_argument("job_id", help="a succeeded job")
    x.add_argument("--seconds", type=float, required=True, help="how many seconds to add")
    x.add_argument("--prompt", default=None, help="the prompt of the new part (default: the job's)")
    x.add_argument("-o", "--output", default=None, help="download the longer video here when done")
    x.add_argument("--no-wait", action="store_true", help="print the new job's id and return at once")
    w = sub.add_parser("watch", help="follow a job with progress bars")
    w.add_argument("job_id")
    w.add_argument("-o", "--output", default=None, help="download the video here when done")
    w.add_argument("--previews", default=None, metavar="DIR", help="save preview strips in this directory")
    st = sub.add_parser("status", help="a job's state, progress and result, in a few lines")
    st.add_argument("job_id")
    st.add_argument("--json", action="store_true", help="the whole snapshot as JSON (without the preview image)")
    st.add_argument("--preview", action="store_true", help="with --json: keep the preview image (base64)")
    sub.add_parser("cancel", help="cancel a queued or running job").add_argument("job_id")
    sub.add_parser("list", help="the newest jobs: id, state, progress, prompt")
    sub.add_parser("loras", help="the LoRA files jobs may name")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with FramePackClient(args.server, token=args.token or "") as client:
            return _run(client, args)
    except APIError as exc:
        if exc.status in (401, 403) and not exc.not_api:
            return _fail(f"the server refused the API token ({exc.body.get('error', exc)}): pass --token or set "
                         "FRAMEPACK_TOKEN", 4)  # fmt: skip
        if exc.not_api:
            return _fail(exc.body["error"], 3)
        where = f" ({exc.field})" if exc.field else ""
        return _fail(f"error{where}: {exc.body.get('error', exc)}", 2, prefix=False)
    except (httpx.UnsupportedProtocol, httpx.InvalidURL):
        return _fail(f"--server {args.server!r} is not an http:// or https:// URL", 3)
    except httpx.ConnectError as exc:
        return _fail(f"cannot reach the server at {args.server} ({exc}): is it running? (--server or "
                     "FRAMEPACK_SERVER)", 3)  # fmt: skip
    except httpx.TimeoutException:
        return _fail(f"the server at {args.server} did not answer in time", 3)
    except httpx.HTTPError as exc:
        return _fail(f"talking to the server at {args.server} failed: {exc}", 3)
    except ConnectionError as exc:  # the WebSocket's connection (an OSError too)
        return _fail(f"lost the connection to the server at {args.server}: {exc}", 3)
    except UsageError as exc:
        return _fail(str(exc), exc.code)
    except OSError as exc:  # a local file
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), 5)


def _fail(message: str, code: int, prefix: bool = True) -> int:
    print(f"error: {message}" if prefix else message, file=sys.stderr)
    return code


def _run(client: FramePackClient, args: argparse.Namespace) -> int:
    if args.command == "submit":
        events = [e.strip() for e in args.webhook_events.split(",")] if args.webhook_events else None
        job = client.submit(args.image, args.end_image, loras=args.lora, prompt=args.prompt,
                            webhook=args.webhook, webhook_events=events, **_params(args.set))  # fmt: skip
        print(f"job {job['id']} queued (position {job.get('position')})", file=sys.stderr)
        if args.no_wait:
            print(job["id"])
            return 0
        return _follow(client, job["id"], args.output, args.previews)
    if args.command == "extend":
        job = client.extend(args.job_id, args.seconds, args.prompt)
        print(f"job {job['id']} extends {args.job_id} (position {job.get('position')})", file=sys.stderr)
        if args.no_wait:
            print(job["id"])
            return 0
        return _follow(client, job["id"], args.output, None)
    if args.command == "batch":
        return _batch(client, Path(args.file), _params(args.set), args.output, args.no_wait)
    if args.command == "watch":
        return _follow(client, args.job_id, args.output, args.previews)
    if args.command == "status":
        job = client.job(args.job_id)
        if args.json:
            if not args.preview:
                job.pop("preview", None)
            print(json.dumps(job, indent=2))
        else:
            print(summary(job))
    elif args.command == "cancel":
        print(client.cancel(args.job_id)["state"])
    elif args.command == "loras":
        for entry in client.loras():
            print(f"{entry['name']}  {entry['format']:<16} {entry['size']:>12} bytes")
    elif args.command == "list":
        for j in client.jobs()["jobs"]:
            print(f"{j['id']}  {j['state']:<10} {round(100 * (j.get('progress') or 0)):>3}%  {j['prompt']}")
    return 0


def summary(job: dict[str, Any]) -> str:
    """A snapshot in a few lines a person reads (``status``)."""
    lines = [f"{job['id']}  {job['state']}  {round(100 * (job.get('progress') or 0))}%"]
    if job.get("position"):
        lines.append(f"queued at position {job['position']}")
    if job["state"] == "running":
        where = [f"section {job['section']}/{job['sections']}" if job.get("section") else "",
                 f"step {job['step']}/{job['steps']}" if job.get("step") else "",
                 f"about {round(job['eta'])} s left" if job.get("eta") else ""]  # fmt: skip
        lines.append(", ".join(w for w in where if w) or (job.get("stage") or ""))
    why = job.get("error") or (job.get("reason") if job["state"] != "succeeded" else None)
    if why:
        lines.append(f"why: {why}")
    prompt = (job.get("params") or {}).get("prompt")
    if prompt:
        lines.append(f"prompt: {prompt}")
    result = job.get("result") or {}
    if job["state"] == "succeeded" and result:
        lines.append(f"video: {result.get('frames')} frames, {result.get('seconds')} s, seed {result.get('seed')}, "
                     f"{result.get('width')}x{result.get('height')}: {result.get('video_url')}")  # fmt: skip
    return "\n".join(line for line in lines if line)


def _read_batch(path: Path) -> list[dict[str, Any]]:
    """The batch file's entries, image paths resolved against it; one line naming the first problem."""
    jobs = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{path}:{n}: not JSON ({exc})", 5) from None
        if not isinstance(entry, dict):
            raise UsageError(f'{path}:{n}: each line must be a JSON object, like {{"image": "cat.png"}}', 5)
        for name in ("image", "end_image"):
            if isinstance(entry.get(name), str):
                entry[name] = path.parent / entry[name]
                if not entry[name].is_file():
                    raise UsageError(f"{path}:{n}: {name} {entry[name]}: no such file", 5)
        jobs.append(entry)
    return jobs


def _batch(client: FramePackClient, path: Path, defaults: dict[str, str], output: str | None, no_wait: bool) -> int:
    batch = client.submit_batch(_read_batch(path), defaults)
    for err in batch["errors"]:
        print(f"entry {err['index'] + 1} refused: {err['field']}: {err['message']}", file=sys.stderr)
    print(f"batch {batch['id']}: {batch['total']} job(s) queued", file=sys.stderr)
    if no_wait:
        print(batch["id"])
        return 1 if batch["errors"] else 0
    done = client.wait_batch(batch["id"])
    failed = [j for j in done["jobs"] if j["state"] != "succeeded"]
    for job in failed:
        print(f"{job['id']}: {job['state']} {job.get('reason') or job.get('error') or ''}".rstrip(), file=sys.stderr)
    if output:
        Path(output).mkdir(parents=True, exist_ok=True)
        for job in done["jobs"]:
            if job["state"] == "succeeded":
                print(client.download(job["id"], Path(output) / f"{job['id']}.mp4"))
    return 1 if failed or done["errors"] else 0


def _follow(client: FramePackClient, job_id: str, output: str | None, previews: str | None) -> int:
    final = client.wait(job_id, previews=previews)
    if final["state"] != "succeeded":
        print(f"{final['state']}: {final.get('error') or ''}".rstrip(": "), file=sys.stderr)
        return 1
    result = final.get("result") or {}
    print(f"succeeded: {result.get('frames')} frames, {result.get('seconds')} s, seed {result.get('seed')}",
          file=sys.stderr)  # fmt: skip
    if output:
        print(client.download(job_id, output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
