"""The Python API: AsynDM with a diffusers UNet in one call.

    from asyndm_fpdm.samplers.api import asyn_generate
    result = asyn_generate(unet, scheduler_config, prompt_embeds, negative_embeds,
                           items=[([2], 0.7), ([4], 0.7)], steps=50, seed=1234)
    result.latents, result.masks, result.timestep_maps

``items`` are (token positions, k) pairs; positions count the start-of-text token as 0
(``token_positions`` turns words into positions with a tokenizer). Runs on the sigma-space
engine (plan.py, pixel_samplers.py, engine.py): any per-pixel sampler on any scheduler's sigmas;
the defaults (ddim, the paper's timesteps, eta 0) are the paper's configuration.
"""

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from ..seeding import image_generators, per_image_randn
from . import engine
from .backends.diffusers_unet import DiffusersDenoiser, model_sampling_of
from .pixel_samplers import ETA_SAMPLERS, get_sampler
from .plan import MODES, SigmaPlan
from .schedulers import make_sigmas
from .tokens import locate_word

MASK_SOURCES = ("dynamic", "static", "external")


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
    sampler: str = "ddim",
    scheduler: str = "paper",
    eta: float = 0.0,
    curve: str = "bin",
    mode: str = "asyn",
    mask_source: str = "dynamic",
    external_masks: Optional[torch.Tensor] = None,
    mask_thr: float = 1.0,
    capture_stride: int = 4,
    added_cond=None,
    negative_added_cond=None,
    callback=None,
) -> engine.RunRecord:
    """Run vanilla / DMconcave / AsynDM sampling; returns the run's ``engine.RunRecord``: latents
    (what ``vae.decode(latents / scaling_factor)`` takes), masks and timestep maps.

    ``sampler`` is a per-pixel sampler (pixel_samplers.SAMPLERS), ``scheduler`` a scheduler's name
    (schedulers.SCHEDULERS); ``eta`` is the noise of ddim and the ancestral/SDE samplers.
    ``latents`` is the initial noise (unit variance), drawn from ``seed`` (seed + i for image i)
    when not given. ``callback(info)`` gets k-diffusion's step dict (x, i, sigma, sigma_map,
    denoised) after each step's first evaluation.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if mask_source not in MASK_SOURCES:
        raise ValueError(f"unknown mask source {mask_source!r}: use one of {', '.join(MASK_SOURCES)}")
    get_sampler(sampler)  # unknown names fail before any model work
    options = {}
    if sampler in ETA_SAMPLERS:
        options["eta"] = float(eta)
    elif eta:
        raise ValueError(f"the sampler {sampler!r} takes no eta: use eta=0, or one of {', '.join(ETA_SAMPLERS)}")
    if mode == "asyn" and mask_source == "external" and external_masks is None:
        raise ValueError("mask_source='external' needs external_masks (one mask per item)")

    batch = prompt_embeds.shape[0]
    device = prompt_embeds.device
    size = unet.config.sample_size
    shape = latents.shape if latents is not None else (batch, unet.config.in_channels, size, size)
    hw = tuple(shape[-2:])

    model_sampling = model_sampling_of(scheduler_config)
    sigmas = make_sigmas(model_sampling, scheduler, steps, steps_offset=scheduler_config.get("steps_offset", 0))
    denoise = DiffusersDenoiser(
        unet, model_sampling, prompt_embeds, negative_embeds, guidance_scale=guidance_scale,
        prediction_type=scheduler_config.get("prediction_type", "epsilon"),
        positions=[list(p) for p, _ in items], capture_stride=capture_stride,
        added_cond=added_cond, uncond_added_cond=negative_added_cond,
    )
    ks = [float(k) for _, k in items]

    def make_plan(mode=mode, capture_all=False, masks=None, dynamic=False):
        return SigmaPlan(sigmas.to(device), model_sampling, batch, hw, mode=mode, ks=ks, masks=masks, dynamic=dynamic,
                         anchors=[min(p) for p, _ in items], curve=curve, mask_thr=mask_thr, from_noise=True,
                         capture_all=capture_all)

    def sample_along(plan, report=None):
        # like the reference, every run re-seeds its generators: they draw the initial latents
        # (drawn even when given, to keep the noise stream in step) and then each step's noise
        gens = image_generators(seed, batch, device)
        drawn = per_image_randn(gens, shape, device)
        noise = latents if latents is not None else drawn
        noise_sampler = lambda s, s_next: per_image_randn(gens, shape, device, noise.dtype)  # noqa: E731
        x = engine.initial_latent(plan, noise)
        x = engine.run(denoise, x, plan, sampler, callback=report, noise_sampler=noise_sampler, **options)
        # the returned latent is the VP latent at the last sigma, as the reference's DDIM leaves it: x / sqrt(1 + σ²)
        return x / (1 + plan.sigmas[-1] ** 2) ** 0.5

    def run_along(plan):  # the static pre-pass (a vanilla plan recording attention) reports nothing
        return sample_along(plan, None if plan.capture_all else callback)

    record = engine.sample(run_along, make_plan, mode=mode, mask_source=mask_source, ks=ks, size=hw,
                           mask_thr=mask_thr, external=external_masks)
    return dataclasses.replace(record, timestep_maps=[t.long() for t in record.timestep_maps])
