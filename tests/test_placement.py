"""Where the models go on a GPU: the low-VRAM decisions, without a GPU."""

from __future__ import annotations

from diffusers_helper.profiles import ACTIVATION_MARGIN_GB, OFFLOADED_COMPONENTS, transformer_fits


def test_the_transformer_stays_on_the_gpu_only_with_room_to_sample():
    transformer_gb = 23.98  # FramePack's 13 B transformer in bf16
    assert transformer_fits(transformer_gb, budget_gb=48 - 6)  # a 48 GB card preserving 6 GB: resident
    assert not transformer_fits(transformer_gb, budget_gb=48 - 40)  # 8 GB allowed: streamed
    assert not transformer_fits(transformer_gb, budget_gb=24 - 6)  # a 24 GB card always streams
    assert not transformer_fits(transformer_gb, budget_gb=transformer_gb + ACTIVATION_MARGIN_GB / 2)


def test_offloaded_components_run_in_pipeline_order():
    from diffusers import HunyuanVideoFramepackPipeline

    order = HunyuanVideoFramepackPipeline.model_cpu_offload_seq.split("->")
    assert [c for c in order if c not in ("text_encoder", "transformer")] == list(OFFLOADED_COMPONENTS)
