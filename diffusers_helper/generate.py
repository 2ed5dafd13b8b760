"""Run one FramePack job in-process and report what happens inside it.

:func:`generate` reads top to bottom in the order the data moves, like a diffusers
pipeline: resolve parameters -> pick the pipeline -> encode the prompt -> fit and encode
the image -> sample section by section (previews and progress every step, the video so
far after every section) -> write the final mp4 and its JSON sidecar.  Everything it
needs comes in as arguments; it knows nothing of queues or HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import events as ev
from .buckets import fit_to_bucket, resize_and_center_crop
from .observe import capture_cond_output, tap_sections
from .params import FPS, JobParams, Variant
from .preview import LatentToRGB, make_preview
from .profiles import Models
from .sections import TEMPORAL_RATIO, output_seconds, pipeline_num_frames, section_count
from .stepcache import StepCache
from .video import video_tensor_to_frames, write_mp4

log = logging.getLogger(__name__)

#: FramePack's TeaCache threshold (rel-L1 0.15), used for diffusers' First Block Cache.
TEACACHE_THRESHOLD = 0.15
#: Tokens of prompt kept after the template (diffusers' default).
MAX_SEQUENCE_LENGTH = 256


class Cancelled(Exception):
    """Raised inside the step callback to stop the pipeline at once (its clean exit)."""


@dataclass(frozen=True)
class OutputLayout:
    """Where one job's files go: ``<dir>/<stem>.mp4``, ``<stem>.json``, sections, input."""

    directory: Path
    stem: str = "video"

    @property
    def video(self) -> Path:
        return self.directory / f"{self.stem}.mp4"

    @property
    def sidecar(self) -> Path:
        return self.directory / f"{self.stem}.json"

    @property
    def input_image(self) -> Path:
        return self.directory / f"{self.stem}-input.png"

    @property
    def end_image(self) -> Path:
        return self.directory / f"{self.stem}-end.png"

    def section(self, k: int) -> Path:
        return self.directory / f"{self.stem}-section-{k:02d}.mp4"


@dataclass
class GenerationResult:
    status: str  # "succeeded" | "cancelled"
    params: JobParams
    sections: int
    section_videos: list[Path] = field(default_factory=list)
    video: Path | None = None
    frames: int = 0
    seconds: float = 0.0
    width: int = 0
    height: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    cache_skipped_steps: int = 0
    transformer_calls: int = 0
    sidecar: Path | None = None
    input_image: Path | None = None

    @property
    def seed(self) -> int:
        assert self.params.seed is not None
        return self.params.seed


def fitted_prompt_template(tokenizer: Any) -> dict[str, Any]:
    """diffusers' Llama prompt template with ``crop_start`` measured on *this* tokenizer.

    The default's ``crop_start=95`` is right only for the real Llama-3 tokenizer; counting
    the template's prefix tokens is right for any tokenizer, the real one included.
    """
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_framepack import DEFAULT_PROMPT_TEMPLATE

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    prefix = template.split("{}")[0]
    return {"template": template, "crop_start": len(tokenizer(prefix).input_ids)}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def generate(
    params: JobParams,
    image: Image.Image,
    on_event: Callable[[ev.Event], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    *,
    models: Models,
    output: OutputLayout,
    end_image: Image.Image | None = None,
    cache_threshold: float = TEACACHE_THRESHOLD,
) -> GenerationResult:
    """Generate one video; returns a result whose ``status`` is succeeded or cancelled.

    ``on_event`` receives :mod:`diffusers_helper.events`; ``should_cancel`` is polled at
    every stage and every sampling step, and a ``True`` stops at once, keeping the
    sections already written (no final video is claimed).
    """
    emit = on_event or (lambda _e: None)
    cancelled = should_cancel or (lambda: False)

    def check_cancel() -> None:
        if cancelled():
            raise Cancelled

    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 4)
        return now

    # 1. Resolve what "random" and "default" mean for this run.
    params = params.with_seed().with_resolution(models.profile.default_resolution)
    if end_image is not None and params.model is not Variant.FRAMEPACK:
        raise ValueError("end_image: the framepack-f1 model cannot take an end image")
    variant, lws, steps = params.model, params.latent_window_size, params.steps
    sections = section_count(params.total_second_length, lws)
    output.directory.mkdir(parents=True, exist_ok=True)
    result = GenerationResult(status="cancelled", params=params, sections=sections, timings=timings)
    emit(ev.Stage(ev.STAGE_STARTING))

    try:
        check_cancel()
        # 2. The pipeline for this variant (loads its transformer on first use).
        emit(ev.Stage(ev.STAGE_LOADING))
        t = time.perf_counter()
        pipe = models.pipeline(variant, params.gpu_memory_preservation)
        device = pipe._execution_device
        generator = torch.Generator("cpu").manual_seed(params.seed)
        t = lap("load", t)

        # 3. Text.
        check_cancel()
        emit(ev.Stage(ev.STAGE_TEXT))
        template = fitted_prompt_template(pipe.tokenizer)
        do_cfg = params.cfg > 1
        embeds, pooled, mask = pipe.encode_prompt(
            prompt=params.prompt, prompt_2=None, prompt_template=template, device=device,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )  # fmt: skip
        negative: dict[str, Any] = {}
        if do_cfg:
            n_embeds, n_pooled, n_mask = pipe.encode_prompt(
                prompt=params.n_prompt, prompt_2=None, prompt_template=template, device=device,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )  # fmt: skip
            negative = dict(
                negative_prompt_embeds=n_embeds,
                negative_pooled_prompt_embeds=n_pooled,
                negative_prompt_attention_mask=n_mask,
            )
        t = lap("text_encoding", t)

        # 4. Image: nearest bucket, resize + centre crop; the end image to the same size.
        check_cancel()
        emit(ev.Stage(ev.STAGE_IMAGE))
        start = fit_to_bucket(image, params.resolution)
        height, width = start.height, start.width
        result.width, result.height = width, height
        start.save(output.input_image)
        result.input_image = output.input_image
        last = None
        if end_image is not None:
            last = resize_and_center_crop(end_image, height, width)
            last.save(output.end_image)
        t = lap("image_processing", t)

        # 5. Sample.  The pipeline VAE-encodes the start frame, encodes it with SigLIP and
        #    runs the sections; only sampling is observable from here, so those stages are
        #    announced as it begins.
        check_cancel()
        for stage in (ev.STAGE_VAE, ev.STAGE_CLIP, ev.STAGE_SAMPLING):
            emit(ev.Stage(stage))
        mapper = LatentToRGB(pipe.transformer.config.out_channels)
        total_steps = sections * steps
        state = {"section": 0, "written": 0, "history": None}
        t_sampling = time.perf_counter()

        def on_step(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if i == 0:  # the step index restarts every section; count sections ourselves
                state["section"] += 1
            check_cancel()
            k, s = state["section"], i + 1
            x0 = pipe.scheduler.x0 if pipe.scheduler.x0 is not None else kwargs["latents"]
            emit(ev.PreviewReady(make_preview(x0, mapper), section=k, step=s))
            done = (k - 1) * steps + s
            elapsed = time.perf_counter() - t_sampling
            eta = elapsed / done * (total_steps - done)
            emit(ev.Progress(done / total_steps, k, sections, s, steps, round(eta, 3), round(elapsed, 3)))
            return {}

        def on_history(video: torch.Tensor) -> None:
            state["written"] += 1
            k = state["written"]
            frames = video_tensor_to_frames(video)
            path = write_mp4(output.section(k), frames, crf=params.mp4_crf)
            state["history"] = video
            result.section_videos.append(path)
            result.frames = len(frames)  # the video so far; the final count replaces it below
            emit(ev.SectionDone(k, sections, path, len(frames), output_seconds(len(frames))))

        cache = StepCache(pipe.transformer, params.use_teacache, cache_threshold, 2 if do_cfg else 1)
        try:
            pipe.scheduler.rescale = params.rs if do_cfg else 0.0  # FramePack: rs only with real CFG
            with cache, tap_sections(pipe, on_history), capture_cond_output(pipe, 2 if do_cfg else 1):
                pipe(
                    image=start,
                    last_image=last,
                    prompt_embeds=embeds,
                    pooled_prompt_embeds=pooled,
                    prompt_attention_mask=mask,
                    **negative,
                    true_cfg_scale=params.cfg,
                    guidance_scale=params.gs,
                    height=height,
                    width=width,
                    num_frames=pipeline_num_frames(sections, lws),
                    latent_window_size=lws,
                    num_inference_steps=steps,
                    generator=generator,
                    output_type="pt",
                    callback_on_step_end=on_step,
                    callback_on_step_end_tensor_inputs=["latents"],
                    prompt_template=template,
                    max_sequence_length=MAX_SEQUENCE_LENGTH,
                    sampling_type="inverted_anti_drifting" if variant is Variant.FRAMEPACK else "vanilla",
                )
        finally:
            result.cache_skipped_steps = cache.skipped
            result.transformer_calls = cache.calls
            timings["sampling"] = round(time.perf_counter() - t_sampling, 4)

        # 6. The final video: the pipeline's history, trimmed as the pipeline trims it.
        t = time.perf_counter()
        history = state["history"]
        n = (history.shape[2] - 1) // TEMPORAL_RATIO * TEMPORAL_RATIO + 1
        frames = video_tensor_to_frames(history[:, :, :n])
        result.video = write_mp4(output.video, frames, crf=params.mp4_crf)
        result.frames = len(frames)
        result.seconds = output_seconds(result.frames)
        result.status = "succeeded"
        lap("write_video", t)
    except Cancelled:
        result.status = "cancelled"  # frames: those of the last section written (or 0)
        result.seconds = output_seconds(result.frames)
    finally:
        timings["total"] = round(time.perf_counter() - t_start, 4)

    if timings.get("sampling") and result.transformer_calls:
        timings["per_step"] = round(timings["sampling"] / max(1, len(result.section_videos) * steps), 4)
    result.sidecar = output.sidecar
    _write_json(output.sidecar, sidecar(result, models))
    return result


def sidecar(result: GenerationResult, models: Models) -> dict[str, Any]:
    """The JSON written next to the video: enough to reproduce and to judge the run."""
    p = result.params
    return {
        "status": result.status,
        "params": p.public_dict(),
        "seed": result.seed,
        "profile": models.profile.public_dict(),
        "device": models.placement.device,
        "width": result.width,
        "height": result.height,
        "fps": FPS,
        "sections": result.sections,
        "sections_done": len(result.section_videos),
        "frames": result.frames,
        "seconds": result.seconds,
        "video": result.video.name if result.video else None,
        "section_videos": [v.name for v in result.section_videos],
        "input_image": result.input_image.name if result.input_image else None,
        "cache": {
            "enabled": p.use_teacache,
            "transformer_calls": result.transformer_calls,
            "skipped_steps": result.cache_skipped_steps,
        },
        "timings": result.timings,
    }
