"""Tiny random diffusers models with fixed seeds, shared by the AsynDM tests.

The UNet is SD-shaped (three cross-attention levels + one plain level) but a few hundred
kilobytes, with a 16x16 latent so the latent/4 attention grid is 4x4. diffusers zero-inits
some output layers; every parameter is re-drawn so outputs and attention are non-trivial.
"""

import torch

CROSS_DIM = 32


def tiny_unet(seed=0, *, sdxl=False, sample_size=16):
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=1,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if sdxl:
        kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=CROSS_DIM + 6 * 8,
            cross_attention_dim=CROSS_DIM,
        )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return unet.eval().requires_grad_(False)


def sd_scheduler_config(prediction_type="epsilon"):
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type=prediction_type,
    )


def alphas_cumprod(config=None):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config or sd_scheduler_config()).alphas_cumprod


def embeds(batch=1, seed=1, length=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, CROSS_DIM, generator=gen)


def latents(batch=1, seed=2, size=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=gen)
