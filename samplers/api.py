"""The Python API: AsynDM with a diffusers UNet in one call.

    from asyndm_fpdm.samplers.api import asyn_generate
    result = asyn_generate(unet, scheduler_config, prompt_embeds, negative_embeds,
                           items=[([2], 0.7), ([4], 0.7)], steps=50, seed=1234)
    result.latents, result.masks, result.timestep_maps

``items`` are (token positions, k) pairs; positions count the start-of-text token as 0
(``token_positions`` turns words into positions with a tokenizer).
"""

from typing import List, Optional, Sequence, Tuple

import torch

from ..seeding import image_generators, per_image_randn
from .backends.diffusers_unet import DiffusersDenoiser
from .loop import SampleResult, extract_static_masks, sample
from .schedule import AsyncSchedule
from .tokens import locate_word


def token_positions(tokenizer, prompt: str, word: str, occurrence: int = 0) -> List[int]:
    """Positions of ``word`` in ``prompt`` as the text encoder sees it (start token = 0)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    shown = tokenizer.convert_ids_to_tokens(ids)
    return locate_word(ids, word_ids, shown, word=word, occurrence=occurrence)


def asyn_generate(
    unet,
    scheduler_config: dict,
    prompt_embeds: torch.Tensor,
    negative_embeds: Optional[torch.Tensor] = None,
    *,
    items: Sequence[Tuple[Sequence[int], float]] = (),
    latents: Optional[torch.Tensor] = None,
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 5.0,
    eta: float = 0.0,
    curve: str = "bin",
    mode: str = "asyn",
    mask_source: str = "dynamic",
    external_masks: Optional[torch.Tensor] = None,
    mask_thr: float = 1.0,
    attn_fraction: int = 4,
    added_cond=None,
    negative_added_cond=None,
    callback=None,
) -> SampleResult:
    """Run vanilla / DMconcave / AsynDM sampling; returns latents, masks and timestep maps."""
    batch = prompt_embeds.shape[0]
    device = prompt_embeds.device
    size = unet.config.sample_size
    shape = latents.shape if latents is not None else (batch, unet.config.in_channels, size, size)

    def fresh_run():
        # like the reference, every run re-seeds its generators: they draw the initial latents
        # (unless given) and then, for eta > 0, each step's noise
        gens = image_generators(seed, batch, device)
        drawn = per_image_randn(gens, shape, device)  # drawn even when given: keeps the noise stream in step
        x = latents if latents is not None else drawn
        sampler = (lambda i: per_image_randn(gens, shape, device, x.dtype)) if eta > 0 else None
        return x, sampler

    ac = alphas_cumprod_from_config(scheduler_config).to(device)
    schedule = AsyncSchedule(
        steps,
        num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
        steps_offset=scheduler_config.get("steps_offset", 0),
        curve=curve,
    )
    denoise = DiffusersDenoiser(
        unet, prompt_embeds, negative_embeds, guidance_scale=guidance_scale,
        token_groups=[list(p) for p, _ in items], attn_fraction=attn_fraction,
        added_cond=added_cond, uncond_added_cond=negative_added_cond,
    )
    ks = [float(k) for _, k in items]
    common = dict(mask_thr=mask_thr, eta=eta, prediction_type=scheduler_config.get("prediction_type", "epsilon"))
    static = None
    if mode == "asyn" and mask_source == "static":
        x, noise_sampler = fresh_run()
        static, _, _ = extract_static_masks(denoise, x, ac, schedule, ks, noise_sampler=noise_sampler, **common)
    x, noise_sampler = fresh_run()
    return sample(
        denoise, x, ac, schedule, ks, mode=mode, mask_source=mask_source,
        static_masks=static, external_masks=external_masks,
        anchors=[min(p) for p, _ in items], noise_sampler=noise_sampler, callback=callback, **common,
    )


def alphas_cumprod_from_config(config: dict) -> torch.Tensor:
    """ᾱ of a diffusers scheduler config (computed by diffusers' DDIMScheduler itself)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(dict(config)).alphas_cumprod
