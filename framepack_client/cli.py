"""``framepack-client``: use a framepack-celery server from the shell.

    framepack-client submit photo.jpg --prompt "..." --set total_second_length=5 --lora NAME:0.8 -o out.mp4
    framepack-client batch jobs.jsonl [--set steps=25] [-o DIR]
    framepack-client extend JOB_ID --seconds 3 [--prompt "..."] [-o longer.mp4]
    framepack-client watch JOB_ID [-o out.mp4]
    framepack-client status JOB_ID | cancel JOB_ID | list | loras

A batch file has one JSON object per line: {"image": "photo.jpg", "prompt": "...", ...}
(image paths relative to the file).  The command exits non-zero if the server refused an
entry or a job did not succeed.

With API tokens on the server: ``--token TOKEN`` or ``FRAMEPACK_TOKEN``.  ``submit --webhook URL``
asks the server to POST signed job snapshots there (``--webhook-events start,section,completed``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import APIError, FramePackClient


def _params(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set wants NAME=VALUE, got {pair!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="framepack-client", description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default=os.environ.get("FRAMEPACK_SERVER", "http://127.0.0.1:8000"))
    ap.add_argument("--token", default=os.environ.get("FRAMEPACK_TOKEN"),
                    help="API token, when the server requires one (default: $FRAMEPACK_TOKEN)")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="queue a job, then watch it and download the video")
    s.add_argument("image")
    s.add_argument("--prompt", default="")
    s.add_argument("--end-image", default=None)
    s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="any FramePack parameter")
    s.add_argument("--lora", action="append", default=[], metavar="NAME:WEIGHT", help="a LoRA (repeatable)")
    s.add_argument("-o", "--output", default=None, help="download the video here when done")
    s.add_argument("--no-wait", action="store_true")
    s.add_argument("--previews", default=None, help="save preview strips in this directory")
    s.add_argument("--webhook", default=None, help="URL the server POSTs signed job snapshots to")
    s.add_argument("--webhook-events", default=None, metavar="EVENTS",
                   help="comma-separated: start, section, completed (default: completed)")
    b = sub.add_parser("batch", help="queue a batch from a JSON-lines file, follow every job, download")
    b.add_argument("file")
    b.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="defaults for every entry")
    b.add_argument("-o", "--output", default=None, help="download every video into this directory")
    b.add_argument("--no-wait", action="store_true")
    x = sub.add_parser("extend", help="continue a finished video forward (F1), follow it, download")
    x.add_argument("job_id")
    x.add_argument("--seconds", type=float, required=True)
    x.add_argument("--prompt", default=None)
    x.add_argument("-o", "--output", default=None)
    x.add_argument("--no-wait", action="store_true")
    w = sub.add_parser("watch", help="follow a job with progress bars")
    w.add_argument("job_id")
    w.add_argument("-o", "--output", default=None)
    w.add_argument("--previews", default=None)
    for name in ("status", "cancel"):
        sub.add_parser(name).add_argument("job_id")
    sub.add_parser("list")
    sub.add_parser("loras")
    args = ap.parse_args(argv)

    with FramePackClient(args.server, token=args.token or "") as client:
        try:
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
                print(json.dumps(client.job(args.job_id), indent=2))
            elif args.command == "cancel":
                print(client.cancel(args.job_id)["state"])
            elif args.command == "loras":
                for entry in client.loras():
                    print(f"{entry['name']}  {entry['format']:<16} {entry['size']:>12} bytes")
            elif args.command == "list":
                for j in client.jobs()["jobs"]:
                    print(f"{j['id']}  {j['state']:<10} {round(100 * (j.get('progress') or 0)):>3}%  {j['prompt']}")
        except APIError as exc:
            where = f" ({exc.field})" if exc.field else ""
            print(f"error{where}: {exc.body.get('error', exc)}", file=sys.stderr)
            return 2
    return 0


def _batch(client: FramePackClient, path: Path, defaults: dict[str, str], output: str | None, no_wait: bool) -> int:
    jobs = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise SystemExit(f"{path}:{n}: not JSON ({exc})") from None
        for name in ("image", "end_image"):
            if isinstance(entry.get(name), str):
                entry[name] = path.parent / entry[name]
        jobs.append(entry)
    batch = client.submit_batch(jobs, defaults)
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
