"""The tiny profile: the real FramePack pipeline classes with tiny, seeded random weights.

No machine here can download the ~30 GB of real weights, so the tiny profile builds every
component of ``HunyuanVideoFramepackPipeline`` (Llama and CLIP text encoders with their
tokenizers, SigLIP image encoder, HunyuanVideo VAE, one FramePack transformer per
variant) with sizes that fit together (see the facts, section 4), saves them in the same
directory layout as a local profile, and lets :mod:`diffusers_helper.profiles` load them
back through ``from_pretrained`` exactly as it loads real weights.  The videos are noise;
everything else is the real code path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .params import Variant

#: Bump when the tiny configs change, so stale caches are rebuilt.
TINY_VERSION = 1
#: Bucket base for tiny jobs: 64 px keeps a 2-second job to about a second on a laptop CPU.
TINY_RESOLUTION = 64

LLAMA_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# Sizes that must agree (facts, section 4).
LLAMA_HIDDEN = 16
CLIP_HIDDEN = 8
SIGLIP_HIDDEN = 32
HEADS, HEAD_DIM = 2, 10
ROPE_AXES = (2, 4, 4)


def transformer_config() -> dict:
    """Tiny FramePack transformer config (the forward needs image proj and clean-x embedder)."""
    return dict(
        in_channels=16,
        out_channels=16,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=LLAMA_HIDDEN,
        pooled_projection_dim=CLIP_HIDDEN,
        rope_axes_dim=ROPE_AXES,
        image_condition_type=None,
        has_image_proj=True,
        image_proj_dim=SIGLIP_HIDDEN,
        has_clean_x_embedder=True,
    )


def default_cache_dir() -> Path:
    root = os.environ.get("FRAMEPACK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "framepack-celery"
    )
    return Path(root) / f"tiny-v{TINY_VERSION}"


def llama_tokenizer():
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>", *LLAMA_SPECIALS]
    chars = ["▁", "\n"] + [chr(c) for c in range(33, 127)]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab = {tok: i for i, tok in enumerate(specials + chars + byte_tokens)}
    tok = LlamaTokenizer(vocab=vocab, merges=[], add_prefix_space=False)
    tok.add_special_tokens({"additional_special_tokens": list(LLAMA_SPECIALS)})
    tok.pad_token = "<unk>"
    return tok


def clip_tokenizer():
    from transformers import CLIPTokenizer

    # GPT-2's byte-to-unicode table: every byte gets a printable character.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = specials + chars + [c + "</w>" for c in chars]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_tiny(target: Path, seed: int = 0) -> Path:
    """Build and save the tiny profile under ``target`` (local-profile layout).

    Layout (the same a local directory profile uses)::

        base/{text_encoder,text_encoder_2,tokenizer,tokenizer_2,vae,scheduler}
        image_encoder/{feature_extractor,image_encoder}
        framepack/          (transformer, original variant)
        framepack-f1/       (transformer, F1 variant)
    """
    import torch
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoFramepackTransformer3DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    target = Path(target)
    base = target / "base"
    enc = target / "image_encoder"

    llama_tok = llama_tokenizer()
    torch.manual_seed(seed)
    LlamaModel(
        LlamaConfig(
            vocab_size=len(llama_tok),
            hidden_size=LLAMA_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            pad_token_id=llama_tok.pad_token_id,
        )
    ).save_pretrained(base / "text_encoder")
    llama_tok.save_pretrained(base / "tokenizer")

    clip_tok = clip_tokenizer()
    torch.manual_seed(seed + 1)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=CLIP_HIDDEN,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=CLIP_HIDDEN,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    ).save_pretrained(base / "text_encoder_2")
    clip_tok.save_pretrained(base / "tokenizer_2")

    torch.manual_seed(seed + 2)
    AutoencoderKLHunyuanVideo(
        latent_channels=16,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    ).save_pretrained(base / "vae")
    FlowMatchEulerDiscreteScheduler().save_pretrained(base / "scheduler")

    torch.manual_seed(seed + 3)
    SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=SIGLIP_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(enc / "image_encoder")
    SiglipImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(enc / "feature_extractor")

    for offset, variant in enumerate(Variant, start=4):
        torch.manual_seed(seed + offset)
        HunyuanVideoFramepackTransformer3DModel(**transformer_config()).save_pretrained(
            target / variant.value
        )
    (target / "tiny.json").write_text(json.dumps({"version": TINY_VERSION, "seed": seed}))
    return target


def ensure_tiny(cache_dir: Path | None = None) -> Path:
    """The tiny profile's directory, built once (atomically: concurrent builders are safe)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if (cache_dir / "tiny.json").exists():
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=cache_dir.parent))
    try:
        build_tiny(tmp)
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            if not (cache_dir / "tiny.json").exists():  # lost a race to a half-built dir
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir
