"""Run one FramePack job in-process and report what happens inside it.

:func:`generate` reads top to bottom in the order the data moves, like a diffusers
pipeline: resolve parameters and the prompt of each section -> pick the pipeline and its
LoRAs -> encode each distinct prompt once -> fit and encode the image -> sample section by
section (:mod:`diffusers_helper.sampler`: previews and progress every step, the video so
far after every section) -> write the final mp4 and its JSON sidecar.  Everything it
needs comes in as arguments; it knows nothing of queues or HTTP.
"""

from __future__ import annotations

import dataclasses
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

from . import checkpoint, prompts
from . import events as ev
from .buckets import fit_to_bucket, resize_and_center_crop
from .params import FPS, CacheMode, JobParams, Variant
from .preview import LatentToRGB, make_preview
from .profiles import Models
from .sampler import PromptCond, Sampler
from .sections import TEMPORAL_RATIO, output_seconds, section_count
from .speed import options_of
from .stepcache import StepCache
from .video import video_tensor_to_frames, write_mp4

log = logging.getLogger(__name__)

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

    @property
    def checkpoint(self) -> Path:
        return self.directory / f"{self.stem}-checkpoint.safetensors"

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
    #: The step cache it ran with and its threshold (None: no cache).
    cache_mode: str = CacheMode.NONE.value
    cache_threshold: float | None = None
    #: The worker's speed options the transformer ran with (:mod:`diffusers_helper.speed`).
    speed: dict[str, str] = field(default_factory=dict)
    #: MagCache ratios measured by a calibration run (``calibrate=True``), one per step.
    calibrated_ratios: list[float] | None = None
    sidecar: Path | None = None
    input_image: Path | None = None
    #: The prompt of each section in time order (``prompts.SectionPrompt`` as dicts).
    prompt_schedule: list[dict[str, Any]] = field(default_factory=list)
    #: The LoRAs applied: name, weight, file hash, format.
    loras: list[dict[str, Any]] = field(default_factory=list)
    #: Sections a redelivered job did not run again (restored from its checkpoint).
    resumed_from_section: int | None = None
    #: Sections of the video this job extended (its sections are numbered after them).
    extended_sections: int = 0
    checkpoint_bytes: int = 0

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
    cache_threshold: float | None = None,
    calibrate: bool = False,
    lora_dir: Path | None = None,
    resume: bool = False,
    extend_from: Path | None = None,
) -> GenerationResult:
    """Generate one video; returns a result whose ``status`` is succeeded or cancelled.

    ``on_event`` receives :mod:`diffusers_helper.events`; ``should_cancel`` is polled at
    every stage and every sampling step, and a ``True`` stops at once, keeping the
    sections already written (no final video is claimed).  ``lora_dir`` holds the files
    ``params.loras`` names.  After every section a checkpoint is written
    (:mod:`diffusers_helper.checkpoint`): with ``resume`` a run continues after the last
    section its checkpoint holds (if it matches these parameters); ``extend_from`` (another
    job's checkpoint, F1 only) continues that job's finished video forward.
    ``cache_threshold`` overrides the job's (tests force skips with it); ``calibrate``
    measures MagCache ratios instead of skipping (``result.calibrated_ratios``).
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

    # 1. Resolve what "random" and "default" mean for this run, and the prompt of each section.
    params = params.with_seed().with_resolution(models.profile.default_resolution)
    if end_image is not None and params.model is not Variant.FRAMEPACK:
        raise ValueError("end_image: the framepack-f1 model cannot take an end image")
    variant, lws, steps = params.model, params.latent_window_size, params.steps
    extending = checkpoint.load(extend_from) if extend_from is not None else None
    if extend_from is not None:
        if variant is not Variant.FRAMEPACK_F1:
            raise ValueError("extend: only the framepack-f1 model continues a video forward")
        if extending is None:
            raise ValueError("extend: the video to extend has no checkpoint (made before checkpoints, or expired)")
    sections = section_count(params.total_second_length, lws)
    timeline = prompts.schedule(params.prompt, params.prompts, sections, lws)
    in_order = prompts.generation_order(timeline, variant)
    blends = prompts.blend_weights([p.text for p in in_order], params.prompt_blend_sections)
    base = extending[1]["video_sections"] if extending else 0  # sections of the video before this job's
    output.directory.mkdir(parents=True, exist_ok=True)
    result = GenerationResult(status="cancelled", params=params, sections=sections, timings=timings,
                              prompt_schedule=[dataclasses.asdict(p) for p in timeline],
                              extended_sections=base)  # fmt: skip
    emit(ev.Stage(ev.STAGE_STARTING))

    try:
        check_cancel()
        # 2. The pipeline for this variant (loads its transformer on first use), its LoRAs.
        emit(ev.Stage(ev.STAGE_LOADING))
        t = time.perf_counter()
        pipe = models.pipeline(variant, params.gpu_memory_preservation)
        result.speed = options_of(pipe.transformer).public_dict()
        if params.loras and result.speed["quant"] == "fp8":
            raise ValueError("loras: this worker runs its transformer in FP8 (FRAMEPACK_QUANT=fp8), which cannot "
                             "apply LoRAs; send the job without loras, or run a worker with FRAMEPACK_QUANT=none")
        generator = torch.Generator("cpu").manual_seed(params.seed)
        with models.loras.applied(pipe.transformer, params.loras, lora_dir) as loras:
            result.loras = loras
            t = lap("load", t)

            # 3. Text: each distinct prompt once.
            check_cancel()
            emit(ev.Stage(ev.STAGE_TEXT))
            template = fitted_prompt_template(pipe.tokenizer)
            encoded: dict[str, PromptCond] = {}

            def encode(text: str) -> PromptCond:
                if text not in encoded:
                    embeds, pooled, mask = pipe.encode_prompt(
                        prompt=text, prompt_2=None, prompt_template=template, device=pipe._execution_device,
                        max_sequence_length=MAX_SEQUENCE_LENGTH,
                    )  # fmt: skip
                    dtype = pipe.transformer.dtype
                    encoded[text] = PromptCond(embeds.to(dtype), pooled.to(dtype), mask.to(dtype))
                return encoded[text]

            conds = [encode(a).blend(encode(b), alpha) for a, b, alpha in blends]
            negative = encode(params.n_prompt) if params.cfg > 1 else None
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

            # 5. Sample, section by section (previews and progress every step, the video so far
            #    and a checkpoint after every section).
            mapper = LatentToRGB(pipe.transformer.config.out_channels)
            total_steps = sections * steps
            t_sampling = time.perf_counter()
            first_step = [0]  # steps this run did not sample (restored), for the ETA

            def on_step(k: int, s: int, x0: torch.Tensor) -> None:
                check_cancel()
                emit(ev.PreviewReady(make_preview(x0, mapper), section=base + k, step=s))
                done = (k - 1) * steps + s
                elapsed = time.perf_counter() - t_sampling
                eta = elapsed / max(done - first_step[0], 1) * (total_steps - done)
                emit(ev.Progress(done / total_steps, base + k, base + sections, s, steps, round(eta, 3),
                                 round(elapsed, 3), prompt=in_order[k - 1].text))  # fmt: skip

            sampler = Sampler(pipe, variant=variant, sections=sections, latent_window_size=lws, steps=steps,
                              height=height, width=width, guidance_scale=params.gs, true_cfg_scale=params.cfg,
                              rescale=params.rs, generator=generator, on_step=on_step)  # fmt: skip
            # what a checkpoint must agree on to continue this run
            agreement = {"params": params.public_dict(), "prompts": [list(b) for b in blends],
                         "loras": [[x["sha256"], x["weight"]] for x in loras], "profile": models.profile.name,
                         "video_sections": base + sections}  # fmt: skip
            result.cache_mode = params.cache_mode.value
            if params.cache_mode is not CacheMode.NONE:
                result.cache_threshold = cache_threshold or params.cache_threshold_or_default
            cache = StepCache(pipe.transformer, result.cache_mode, result.cache_threshold or 0.0, steps,
                              2 if negative else 1, mag_ratios=models.mag_ratios.get(variant.value),
                              calibrate=calibrate)  # fmt: skip
            try:
                check_cancel()
                for stage in (ev.STAGE_VAE, ev.STAGE_CLIP):
                    emit(ev.Stage(stage))
                restored = checkpoint.load(output.checkpoint) if resume else None
                why = checkpoint.mismatch(restored[1], agreement) if restored else "no checkpoint"
                if restored and why is None:
                    done = sampler.restore(*restored)
                    first_step[0] = done * steps
                    result.resumed_from_section = done
                    result.section_videos = [output.section(base + k) for k in range(1, done + 1)]
                    emit(ev.Resumed(base + done, base + sections))
                else:
                    if resume and restored:
                        log.warning("not resuming: the checkpoint's %s", why)
                    if extending:
                        sampler.restore(*extending, continue_forward=True)
                    else:
                        sampler.encode_images(start, last)
                emit(ev.Stage(ev.STAGE_SAMPLING))
                with cache:
                    for k in range(sampler.state.done, sections):
                        video = sampler.run_section(conds[k], negative)
                        if not torch.isfinite(video).all():
                            raise ValueError(
                                f"section {base + k + 1} decoded to NaN or infinite values (a LoRA weight too "
                                "high, or fp16 overflow): nothing to write"
                            )
                        frames = video_tensor_to_frames(video)
                        path = write_mp4(output.section(base + k + 1), frames, crf=params.mp4_crf)
                        tensors, meta = sampler.checkpoint()
                        result.checkpoint_bytes = checkpoint.save(output.checkpoint, tensors, {**meta, **agreement})
                        result.section_videos.append(path)
                        result.frames = len(frames)  # the video so far; the final count replaces it below
                        emit(ev.SectionDone(base + k + 1, base + sections, path, len(frames),
                                            output_seconds(len(frames))))  # fmt: skip
            finally:
                result.cache_skipped_steps = cache.skipped
                result.transformer_calls = cache.calls
                if calibrate:
                    result.calibrated_ratios = cache.ratios()
                timings["sampling"] = round(time.perf_counter() - t_sampling, 4)

        # 6. The final video: the history, trimmed to whole latent frames as the pipeline does.
        t = time.perf_counter()
        history = sampler.state.history_video
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
        "prompt_schedule": result.prompt_schedule,
        "loras": result.loras,
        "resumed_from_section": result.resumed_from_section,
        "extended_sections": result.extended_sections,
        "checkpoint_bytes": result.checkpoint_bytes,
        "cache": {
            "mode": result.cache_mode,
            "threshold": result.cache_threshold,
            "enabled": result.cache_mode != CacheMode.NONE.value,
            "transformer_calls": result.transformer_calls,
            "skipped_steps": result.cache_skipped_steps,
        },
        "speed": result.speed,
        "timings": result.timings,
    }


#: The warm-up job: two sections (the first and the last section's layouts) at the profile's
#: default bucket, one step each, and a different prompt per section, so the text length
#: differs between calls and compiled blocks take it as dynamic once, here, instead of
#: recompiling in the first job whose prompt has another length.
WARM_UP = JobParams(prompt="[0s: warm up] [1.2s: warming up the compiled transformer blocks of this worker]",
                    total_second_length=2.4, steps=1, seed=0, use_teacache=False, mp4_crf=23)  # fmt: skip


def warm_up(models: Models, variant: Variant, directory: Path) -> float:
    """Run :data:`WARM_UP` on ``variant`` (compiling its blocks, tuning kernels) and return
    the seconds it took; its files go to ``directory`` (the caller removes them)."""
    t = time.perf_counter()
    image = Image.new("RGB", (models.profile.default_resolution,) * 2, (96, 128, 160))
    params = WARM_UP.model_copy(update={"model": variant})
    result = generate(params, image, models=models, output=OutputLayout(directory, "warm-up"))
    if result.status != "succeeded":
        raise RuntimeError(f"warm-up did not finish: {result.status}")
    return time.perf_counter() - t
