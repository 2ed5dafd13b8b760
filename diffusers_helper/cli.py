"""``framepack`` command line: run a job in-process with progress bars.

    framepack generate IMAGE --prompt TEXT [--seconds S] [--steps N] [--seed N]
        [--model framepack|framepack-f1] [--profile tiny|hf|DIR] [--resolution R]
        [--end-image IMG] [--previews DIR] -o OUT.mp4

writes OUT.mp4, OUT.json (the sidecar) and, with ``--previews``, every preview JPEG.

    framepack calibrate IMAGE --prompt TEXT [--model ...] [--profile ...] [--steps 25] -o RATIOS.json

runs one job without skipping and writes MagCache's magnitude ratios for these weights
(merged into RATIOS.json per model variant); a worker uses them with
``FRAMEPACK_MAG_RATIOS=RATIOS.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from .params import JobParams, Variant, field_errors
from .profiles import DEFAULT_PROFILE


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="framepack", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a video from an image, in-process")
    g.add_argument("image", type=Path)
    g.add_argument("--prompt", default="")
    g.add_argument("--n-prompt", default="")
    g.add_argument("--seconds", type=float, default=None, help="video length (default 5)")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--seed", type=int, default=None, help="absent or -1: random (recorded)")
    g.add_argument("--model", choices=[v.value for v in Variant], default=Variant.FRAMEPACK.value)
    g.add_argument("--profile", default=os.environ.get("FRAMEPACK_PROFILE", DEFAULT_PROFILE), help="tiny | hf | DIR")
    g.add_argument("--resolution", type=int, default=None, help="bucket base (profile default)")
    g.add_argument("--end-image", type=Path, default=None)
    g.add_argument("--window", type=int, default=None, help="latent_window_size")
    g.add_argument("--cfg", type=float, default=None)
    g.add_argument("--gs", type=float, default=None)
    g.add_argument("--rs", type=float, default=None)
    g.add_argument("--crf", type=int, default=None, help="mp4_crf")
    g.add_argument("--no-teacache", action="store_true")
    g.add_argument("--previews", type=Path, default=None, help="directory for preview JPEGs")
    g.add_argument("-o", "--output", type=Path, required=True)
    c = sub.add_parser("calibrate", help="measure MagCache ratios for these weights (one job, nothing skipped)")
    c.add_argument("image", type=Path)
    c.add_argument("--prompt", default="The girl dances gracefully, with clear movements, full of charm.")
    c.add_argument("--model", choices=[v.value for v in Variant], default=Variant.FRAMEPACK.value)
    c.add_argument("--profile", default=os.environ.get("FRAMEPACK_PROFILE", DEFAULT_PROFILE), help="tiny | hf | DIR")
    c.add_argument("--steps", type=int, default=25, help="the step count jobs will use (ratios are per step)")
    c.add_argument("--seconds", type=float, default=5.0)
    c.add_argument("--resolution", type=int, default=None)
    c.add_argument("-o", "--output", type=Path, required=True, help="JSON file of ratios per variant")
    d = sub.add_parser("demo", help="generate a 2-second video from a built-in picture")
    d.add_argument("--profile", default=os.environ.get("FRAMEPACK_PROFILE", DEFAULT_PROFILE))
    d.add_argument("-o", "--output", type=Path, default=Path("results/demo.mp4"))
    return ap


def _params(args: argparse.Namespace) -> JobParams:
    given = {
        "prompt": args.prompt,
        "n_prompt": args.n_prompt,
        "total_second_length": args.seconds,
        "steps": args.steps,
        "seed": args.seed,
        "model": args.model,
        "resolution": args.resolution,
        "end_image": str(args.end_image) if args.end_image else None,
        "latent_window_size": args.window,
        "cfg": args.cfg,
        "gs": args.gs,
        "rs": args.rs,
        "mp4_crf": args.crf,
        "use_teacache": False if args.no_teacache else None,
    }
    return JobParams(**{k: v for k, v in given.items() if v is not None})


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm import tqdm

    from . import events as ev
    from .generate import OutputLayout, generate
    from .profiles import ModelNotFoundError, Models, resolve_profile

    try:
        params = _params(args)
    except ValidationError as exc:
        for e in field_errors(exc):
            print(f"error: {e['field']}: {e['message']}", file=sys.stderr)
        return 2
    try:
        image = Image.open(args.image)
        image.load()
        end = Image.open(args.end_image) if args.end_image else None
    except OSError as exc:
        print(f"error: cannot read image: {exc}", file=sys.stderr)
        return 2

    profile = resolve_profile(args.profile)
    print(f"profile: {profile.name} — {profile.description}", file=sys.stderr)
    models = Models(profile, allow_download=_allow_download())
    out = args.output
    layout = OutputLayout(out.parent if str(out.parent) else Path("."), out.stem)
    if args.previews:
        args.previews.mkdir(parents=True, exist_ok=True)

    bar = tqdm(total=1000, unit="‰", desc="Starting", dynamic_ncols=True, file=sys.stderr)

    def on_event(e: ev.Event) -> None:
        if isinstance(e, ev.Stage):
            bar.set_description(e.text)
        elif isinstance(e, ev.Progress):
            bar.set_description(f"section {e.section}/{e.sections} · step {e.step}/{e.steps}")
            bar.n = round(e.progress * 1000)
            bar.set_postfix_str(f"ETA {e.eta_seconds:.1f}s" if e.eta_seconds is not None else "")
            bar.refresh()
        elif isinstance(e, ev.PreviewReady) and args.previews:
            (args.previews / f"preview-s{e.section:02d}-{e.step:03d}.jpg").write_bytes(e.preview.jpeg)
        elif isinstance(e, ev.SectionDone):
            bar.write(f"section {e.section}/{e.sections} written: {e.path} ({e.message})", file=sys.stderr)

    try:
        result = generate(params, image, on_event, models=models, output=layout, end_image=end)
    except (ModelNotFoundError, ValueError) as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("interrupted", file=sys.stderr)
        return 130
    bar.close()
    print(
        f"{result.status}: {result.video} — {result.frames} frames, {result.seconds:.2f} s, "
        f"seed {result.seed}, sidecar {result.sidecar}"
    )
    return 0 if result.status == "succeeded" else 1


def cmd_calibrate(args: argparse.Namespace) -> int:
    """One job with MagCache in calibration mode; its ratios merged into ``args.output``."""
    import json
    import tempfile

    from PIL import Image

    from .generate import OutputLayout, generate
    from .profiles import Models, resolve_profile

    given = {"prompt": args.prompt, "model": args.model, "steps": args.steps, "seed": 31337,
             "total_second_length": args.seconds, "resolution": args.resolution, "cache": "none"}  # fmt: skip
    params = JobParams(**{k: v for k, v in given.items() if v is not None})
    image = Image.open(args.image).convert("RGB")
    models = Models(resolve_profile(args.profile), allow_download=_allow_download())
    with tempfile.TemporaryDirectory(prefix="framepack-calibrate-") as work:
        result = generate(params, image, models=models, output=OutputLayout(Path(work)), calibrate=True)
    existing = json.loads(args.output.read_text()) if args.output.is_file() else {}
    existing[params.model.value] = result.calibrated_ratios
    args.output.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"{params.model.value}: {len(result.calibrated_ratios or [])} ratios at {params.steps} steps -> "
          f"{args.output} (use FRAMEPACK_MAG_RATIOS={args.output})")  # fmt: skip
    return 0


def _allow_download() -> bool:
    """``FRAMEPACK_ALLOW_DOWNLOAD=1``: let the first load fetch missing weights."""
    return os.environ.get("FRAMEPACK_ALLOW_DOWNLOAD", "") in ("1", "true", "yes")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from PIL import Image

        picture = args.output.with_name("demo-input.png")
        picture.parent.mkdir(parents=True, exist_ok=True)
        Image.radial_gradient("L").convert("RGB").resize((512, 512)).save(picture)
        args = _parser().parse_args(
            ["generate", str(picture), "--prompt", "a glowing orb", "--seconds", "2",
             "--profile", args.profile, "-o", str(args.output)]
        )  # fmt: skip
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "calibrate":
        return cmd_calibrate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
