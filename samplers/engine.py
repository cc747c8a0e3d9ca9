"""One asynchronous run, for every front end (Python API, CLI, ComfyUI's KSAMPLER and SAMPLER).

A backend supplies ``model_fn(x, sigma_map, capture, **extra) -> (denoised, item_maps)``;
``plan_model`` turns it into the plain ``model(x, sigma, **extra) -> denoised`` that the
per-pixel samplers call, asking for attention only on the first evaluation of a step where the
plan wants it. ``static_prepass`` is the paper's static mode: one vanilla run that records the
items' attention at every step, averaged into fixed masks. ``sample`` is the one run entry
point the API and the ComfyUI adapter call: masks by mode and source, the plan, the run, and the
run's ``RunRecord``.
"""

import inspect
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from .masks import build_item_masks
from .pixel_samplers import get_sampler


def plan_model(model_fn: Callable, plan):
    def model(x, sigma, **extra):
        capture = plan.capture_pending
        denoised, maps = model_fn(x, sigma, capture, **extra)
        if capture:
            plan.observe(maps)
        return denoised

    return model


def initial_latent(plan, noise, latent=None, noise_scaling=None):
    """x at the first step, per pixel: pure noise at each pixel's own first sigma (txt2img, the
    paper's start) or the latent noised to the first sigma (img2img)."""
    latent = torch.zeros_like(noise) if latent is None else latent
    scaling = noise_scaling or plan.model_sampling.noise_scaling
    max_denoise = plan.from_noise and not plan.model_sampling.flow
    return scaling(plan.initial_sigma().to(noise.dtype), noise, latent, max_denoise)


def run(model_fn: Callable, x: torch.Tensor, plan, sampler: str = "ddim", *, extra_args: Optional[dict] = None,
        callback=None, noise_sampler=None, **options) -> torch.Tensor:
    """Sample from x (already at the plan's first sigmas) along the plan; returns the final latent."""
    fn = get_sampler(sampler)
    if noise_sampler is not None and "noise_sampler" in inspect.signature(fn).parameters:
        options["noise_sampler"] = noise_sampler
    return fn(plan_model(model_fn, plan), x, plan, extra_args=extra_args or {}, callback=callback, **options)


def masks_from_attention(item_maps, ks, size, mask_thr: float = 1.0):
    """The static masks from a run's recorded attention: (masks (B, N, H, W), mean maps (B, N, h, w))."""
    maps = [m for m in item_maps if m is not None]
    if not maps:
        raise RuntimeError("no attention was captured: the positive conditioning carries no targets, or another "
                           "patch bypasses the model's cross-attention; use an external mask instead")
    mean = torch.stack(maps).mean(dim=0)
    return build_item_masks(mean, ks, size, mask_thr), mean


def static_prepass(run_vanilla: Callable, make_plan: Callable, ks, size, mask_thr: float = 1.0):
    """The paper's static masks. ``make_plan(mode, capture_all)`` builds a plan; ``run_vanilla(plan)``
    samples along it. Returns (masks (B, N, H, W), mean attention maps (B, N, h, w), the plan)."""
    plan = make_plan(mode="vanilla", capture_all=True)
    run_vanilla(plan)
    masks, mean = masks_from_attention(plan.item_maps, ks, size, mask_thr)
    return masks, mean, plan


@dataclass
class RunRecord:
    """What one asynchronous run leaves: the latents (None where the caller keeps them) and, per
    step, every pixel's timestep, the masks that set the step's next state and the attention read.
    ``max_timestep`` tops the model's timestep scale, what previews draw as white: 1001 on the
    paper's (table) models, the timestep of σ = 1 on flow models (Flux 1, SD3 1000). ``image_scale``:
    image pixels per latent pixel along a side, what previews enlarge the maps by to the image's size
    (8 for an 8× VAE, 32 for HunyuanImage 2.1's, 1 in pixel space)."""

    latents: Optional[torch.Tensor] = None
    max_timestep: float = 1001.0
    image_scale: int = 8
    ks: List[float] = field(default_factory=list)
    words: List[str] = field(default_factory=list)
    timestep_maps: List[torch.Tensor] = field(default_factory=list)  # (B, H, W) per step
    masks: List[Optional[torch.Tensor]] = field(default_factory=list)
    item_maps: List[Optional[torch.Tensor]] = field(default_factory=list)


def sample(run_along: Callable, make_plan: Callable, *, mode: str, mask_source: str, ks: Sequence[float], size,
           mask_thr: float = 1.0, external: Optional[torch.Tensor] = None, static: Optional[torch.Tensor] = None,
           capture_all: bool = False, words: Sequence[str] = ()) -> RunRecord:
    """One run. ``make_plan(mode, capture_all, masks, dynamic)`` builds a plan and
    ``run_along(plan)`` samples along it. Static masks come from ``static`` or a vanilla pre-pass,
    external ones from ``external``; dynamic ones from the run's own attention."""
    masks = None
    if mode == "asyn" and ks and mask_source == "static":
        masks = static if static is not None else static_prepass(run_along, make_plan, ks, size, mask_thr)[0]
    elif mode == "asyn" and ks and mask_source == "external":
        masks = external
    plan = make_plan(mode=mode, capture_all=capture_all, masks=masks, dynamic=mask_source == "dynamic")
    latents = run_along(plan)
    return RunRecord(latents=latents, max_timestep=float(getattr(plan.model_sampling, "max_timestep", 1001.0)),
                     ks=list(plan.ks), words=list(words), timestep_maps=list(plan.timestep_maps),
                     masks=list(plan.mask_history), item_maps=list(plan.item_maps))
