"""The AsynDM sampling loop, independent of any model backend.

A *denoiser* is a callable ``denoise(x, timesteps, capture) -> (model_output, item_maps)``:
``x`` (B, C, H, W) in VP space, ``timesteps`` (B, H, W) integer timesteps per pixel,
``model_output`` already guided (CFG) in the model's prediction type, and ``item_maps``
(B, N, h, w) attention maps of the N prompt items when ``capture`` is true (else None).

Modes (as in the paper): ``vanilla`` (every pixel on DDIM's usual timesteps), ``concave``
(DMconcave: every pixel on the strongest item's concave curve) and ``asyn`` (item regions on
their concave curves, background linear). Mask sources for ``asyn``: ``dynamic`` (rebuilt
from attention after every step), ``static`` (given, e.g. from extract_static_masks) and
``external`` (any mask tensor, resized to the latent).
"""

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from .ddim import ddim_step
from .masks import build_item_masks, initial_dynamic_masks, resize_masks
from .schedule import AsyncSchedule, ddim_leading_timesteps, timesteps_of

MODES = ("asyn", "concave", "vanilla")
MASK_SOURCES = ("dynamic", "static", "external")


@dataclass
class SampleResult:
    latents: torch.Tensor
    timestep_maps: List[torch.Tensor] = field(default_factory=list)  # (B,H,W) per step
    masks: List[Optional[torch.Tensor]] = field(default_factory=list)  # masks that set each step's next state
    item_maps: List[Optional[torch.Tensor]] = field(default_factory=list)  # captured attention per step


def _fit_masks(masks: torch.Tensor, batch: int, size, n_items: int) -> torch.Tensor:
    """Accept (N,H,W), (B,N,H,W) or (H,W) masks of any size; binarise at 0.5 and fit the latent."""
    m = torch.as_tensor(masks, dtype=torch.float32)
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[None]
    if m.shape[1] != n_items:
        raise ValueError(f"got masks for {m.shape[1]} items but {n_items} strengths k: give one mask per item")
    if m.shape[0] not in (1, batch):
        raise ValueError(f"mask batch {m.shape[0]} does not match the latent batch {batch}: give 1 or {batch}")
    m = resize_masks(m, size).expand(batch, -1, -1, -1)
    return (m > 0.5).float()


def sample(
    denoise: Callable,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    schedule: AsyncSchedule,
    ks: Sequence[float],
    *,
    mode: str = "asyn",
    mask_source: str = "dynamic",
    external_masks: Optional[torch.Tensor] = None,
    static_masks: Optional[torch.Tensor] = None,
    anchors: Optional[Sequence[int]] = None,
    mask_thr: float = 1.0,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    noise_sampler: Optional[Callable[[int], torch.Tensor]] = None,
    callback: Optional[Callable] = None,
    capture_vanilla: bool = False,
) -> SampleResult:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if mask_source not in MASK_SOURCES:
        raise ValueError(f"unknown mask source {mask_source!r}: use one of {', '.join(MASK_SOURCES)}")
    if eta > 0 and noise_sampler is None:
        raise ValueError("eta > 0 needs a noise_sampler(step) for the stochastic part of each step")
    batch, _, height, width = noise.shape
    size = (height, width)
    ks = [float(k) for k in ks]
    steps = schedule.num_steps
    device = noise.device

    capture = capture_vanilla
    masks = None
    if mode == "concave":
        masks, ks = torch.ones(batch, 1, height, width, device=device), [max(ks)] if ks else [0.0]
    elif mode == "asyn" and ks:
        if mask_source == "dynamic":
            anchors = list(anchors) if anchors is not None else list(range(len(ks)))
            masks = initial_dynamic_masks(batch, anchors, size, device)
            capture = True
        elif mask_source == "static":
            if static_masks is None:
                raise ValueError("mask_source='static' needs static_masks (see extract_static_masks)")
            masks = _fit_masks(static_masks, batch, size, len(ks)).to(device)
        else:
            if external_masks is None:
                raise ValueError("mask_source='external' needs external_masks")
            masks = _fit_masks(external_masks, batch, size, len(ks)).to(device)

    if mode == "vanilla":
        # the reference's vanilla run uses the scheduler's own (leading) timesteps
        ts = ddim_leading_timesteps(steps, schedule.num_train_timesteps, schedule.steps_offset)
        states = [torch.full((batch, height, width), float(t), device=device) for t in ts]
        next_state = lambda i, state, m: states[i + 1]  # noqa: E731
        state = states[0]
    else:
        next_state = lambda i, state, m: schedule.step(state, steps - i - 1, m, ks)  # noqa: E731
        state = schedule.first_state(batch, height, width, masks, ks, device)

    result = SampleResult(latents=noise)
    x = noise
    for i in range(steps):
        prev_state = next_state(i, state, masks)
        t, t_prev = timesteps_of(state), timesteps_of(prev_state)
        out, maps = denoise(x, t, capture)
        x, x0 = ddim_step(
            out, x, t[:, None], t_prev[:, None], alphas_cumprod,
            prediction_type=prediction_type, eta=eta,
            noise=noise_sampler(i) if eta > 0 else None,
        )
        result.timestep_maps.append(t)
        result.masks.append(masks)
        result.item_maps.append(maps)
        if mode == "asyn" and mask_source == "dynamic" and ks:
            masks = build_item_masks(maps, ks, size, mask_thr)
        state = prev_state
        if callback is not None:
            callback(i, x, x0, t)
    result.latents = x
    return result


def extract_static_masks(
    denoise: Callable,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    schedule: AsyncSchedule,
    ks: Sequence[float],
    *,
    mask_thr: float = 1.0,
    **kwargs,
):
    """A vanilla run that records attention: (masks (B,N,H,W), mean maps (B,N,h,w), result)."""
    run = sample(denoise, noise, alphas_cumprod, schedule, ks, mode="vanilla", capture_vanilla=True, **kwargs)
    mean_maps = torch.stack(run.item_maps, dim=0).mean(dim=0)
    masks = build_item_masks(mean_maps, ks, noise.shape[-2:], mask_thr)
    return masks, mean_maps, run
