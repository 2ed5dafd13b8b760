"""FramePack's models at full size with random weights, built in memory: the ``random-full`` profile.

Why: a GPU machine without the Hugging Face hub (CI's lent GPU reaches no registry) can still
run the worker, the web tier and the benchmarks at FramePack's real sizes (a 13 B transformer,
an 8 B Llama text encoder, SigLIP, CLIP and the HunyuanVideo VAE), so speed and memory are
measured on the shapes users run.  The configs are the published ones (facts, section 3); the
weights are seeded random, so the videos are noise and cache skip rates mean nothing.  Built
directly on the GPU it takes ~16 s on an H200 (40 GB resident); on a CPU it would need ~52 GB
of memory in fp32, so the profile refuses to build there.  Importing this module imports no torch (the web tier
reads the profile names).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: FramePack's transformer (facts, section 3): the config of lllyasviel/FramePackI2V_HY.
FULL_TRANSFORMER: dict[str, Any] = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56), image_condition_type=None, has_image_proj=True, image_proj_dim=1152,
    has_clean_x_embedder=True,
)  # fmt: skip
#: hunyuanvideo-community/HunyuanVideo's text_encoder (a Llama-3-8B) and text_encoder_2
#: (CLIP ViT-L/14 text); lllyasviel/flux_redux_bfl's image encoder (SigLIP so400m, 384 px).
FULL_LLAMA = dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                  rope_theta=500000.0)  # fmt: skip
FULL_CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
FULL_SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=384, patch_size=14)  # fmt: skip


@contextmanager
def _default(device: str, dtype: torch.dtype):
    """Create parameters directly on ``device`` in ``dtype`` (13 B in fp32 on CPU: 52 GB)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_shared(device: str, component_dtype: torch.dtype) -> dict[str, Any]:
    """The shared components (text encoders, tokenizers, VAE, scheduler, image encoder), as
    :meth:`Models.load_shared` returns them."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from .tiny import clip_tokenizer, llama_tokenizer

    llama_tok, clip_tok = llama_tokenizer(), clip_tokenizer()  # offline; ids fit the real vocabularies
    torch.manual_seed(0)
    with _default(device, component_dtype):
        shared = dict(
            text_encoder=LlamaModel(LlamaConfig(**FULL_LLAMA, pad_token_id=llama_tok.pad_token_id)),
            tokenizer=llama_tok,
            text_encoder_2=CLIPTextModel(
                CLIPTextConfig(
                    **FULL_CLIP,
                    bos_token_id=clip_tok.bos_token_id,
                    eos_token_id=clip_tok.eos_token_id,
                    pad_token_id=clip_tok.pad_token_id,
                )
            ),  # fmt: skip
            tokenizer_2=clip_tok,
            vae=AutoencoderKLHunyuanVideo(),  # diffusers' defaults are HunyuanVideo's VAE
            scheduler_config=FlowMatchEulerDiscreteScheduler(shift=7.0).config,
            feature_extractor=SiglipImageProcessor(
                size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3
            ),  # fmt: skip
            image_encoder=SiglipVisionModel(SiglipVisionConfig(**FULL_SIGLIP)),
        )
    for name in ("text_encoder", "text_encoder_2", "vae", "image_encoder"):
        shared[name].eval().requires_grad_(False)
    return shared


def build_transformer(device: str, dtype: torch.dtype, seed: int = 1) -> Any:
    """FramePack's transformer (either variant: they share the architecture)."""
    import torch
    from diffusers import HunyuanVideoFramepackTransformer3DModel as Transformer

    torch.manual_seed(seed)
    with _default(device, dtype):
        transformer = Transformer(**FULL_TRANSFORMER)
    return transformer.eval().requires_grad_(False)


def build_full(device: str, dtype: torch.dtype, component_dtype: torch.dtype) -> tuple[dict[str, Any], Any]:
    """Every pipeline component at full size with random weights, as ``Models`` holds them."""
    return build_shared(device, component_dtype), build_transformer(device, dtype)
