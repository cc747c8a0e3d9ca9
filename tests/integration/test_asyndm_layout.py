"""The per-pixel machinery on full-size SD1.5 / SD2.1 / SDXL UNet structures (built on the meta
device: no weights, no memory): which ResBlocks get which timestep stride and which
cross-attention layers are captured (the reference reads the 16×16 layers of a 512 px SD1.5)."""

import pytest

COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "in_channels": 4,
          "use_spatial_transformer": True, "legacy": False, "model_channels": 320,
          "use_temporal_attention": False, "use_temporal_resblock": False}
SD = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
      "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
CONFIGS = {
    "sd15": dict(COMMON, **SD, context_dim=768, num_heads=8, use_linear_in_transformer=False),
    "sd21": dict(COMMON, **SD, context_dim=1024, num_head_channels=64, use_linear_in_transformer=True),
    "sdxl": dict(COMMON, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 context_dim=2048, num_head_channels=64, use_linear_in_transformer=True,
                 num_classes="sequential", adm_in_channels=2816),
}


@pytest.mark.parametrize("fam", list(CONFIGS))
def test_asyndm_layout_of_full_size_unets(comfy_env, fam):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from asyndm_fpdm.samplers.backends.comfy_unet import unet_layout
    from asyndm_fpdm.samplers.backends.pixel_math import pick_capture_stride

    unet = UNetModel(**CONFIGS[fam], device="meta", operations=comfy.ops.disable_weight_init)
    res, attn = unet_layout(unet)
    stride = pick_capture_stride([a[3] for a in attn])
    captured = sorted({(b, i) for b, i, _, s in attn if s == stride})
    assert stride == 4
    if fam == "sdxl":
        assert captured == [("input", 7), ("input", 8), ("middle", 0), ("output", 0), ("output", 1), ("output", 2)]
        assert sum(1 for a in attn if a[3] == 4) == 60  # 2×10 input, 10 middle, 3×10 output
        assert max(res.values()) == 4 and len(res) == 2 * 3 + 2 + 3 * 3
    else:
        assert captured == [("input", 7), ("input", 8), ("output", 3), ("output", 4), ("output", 5)]
        assert max(res.values()) == 8 and len(res) == 2 * 4 + 2 + 3 * 4
    # every level's ResBlocks: input stride doubles per level, output mirrors it
    assert res["diffusion_model.input_blocks.1.0.emb_layers"] == 1
    assert res["diffusion_model.input_blocks.4.0.emb_layers"] == 2
    assert res["diffusion_model.output_blocks.0.0.emb_layers"] == max(res.values())
    assert res[f"diffusion_model.output_blocks.{len(unet.output_blocks) - 1}.0.emb_layers"] == 1
