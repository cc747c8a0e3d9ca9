"""Class-conditional sampling of an FPDM/DiT outside ComfyUI (CLI, tests, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .diffusion import ddim_step, ddpm_step, guide, make_diffusion
from .model import DiT
from .solver import FixedPointRun, SolverSettings


@dataclass
class SampleOptions:
    steps: int = 250
    method: str = "ddpm"  # "ddpm" (learned variance, the reference default) or "ddim"
    eta: float = 0.0
    cfg_scale: float = 4.0
    guidance: str = "reference"  # "reference" (3 channels) or "standard" (all)


def generate(model: DiT, labels: Sequence[int], noise: torch.Tensor, options: SampleOptions = SampleOptions(),
             solver: Optional[SolverSettings] = None, step_noise: Optional[Callable[[int, tuple], torch.Tensor]] = None,
             generator: Optional[torch.Generator] = None, callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None):
    """Sample latents (unscaled, as the network sees them) from ``noise`` (N, C, H, W).

    ``step_noise(k, shape)`` supplies the DDPM/DDIM noise of sampling step k (default: randn from
    ``generator``). CFG runs the conditional and null-class halves in one batch, like the reference.
    Returns (latents, run) where ``run`` holds the fixed-point counters (None for a plain DiT).
    """
    cfg = model.config
    if options.method not in ("ddpm", "ddim"):
        raise ValueError(f"method must be 'ddpm' or 'ddim', got {options.method!r}")
    diffusion = make_diffusion(options.steps, zero_snr=cfg.zero_terminal_snr)
    n = noise.shape[0]
    labels = torch.as_tensor(list(labels), dtype=torch.long, device=noise.device)
    if labels.numel() != n:
        raise ValueError(f"{labels.numel()} labels for {n} noise samples")
    use_cfg = options.cfg_scale > 1.0
    y = torch.cat([labels, torch.full_like(labels, model.null_class)]) if use_cfg else labels
    halves = [0, 1] if use_cfg else [0]
    run = FixedPointRun(solver or SolverSettings(), len(diffusion), cfg.iterations) if cfg.fixed_point else None
    if step_noise is None:
        def step_noise(k, shape):
            return torch.randn(shape, generator=generator, dtype=noise.dtype).to(noise.device)

    x = noise
    with torch.inference_mode():
        for k, i in enumerate(reversed(range(len(diffusion)))):
            t = torch.full((y.shape[0],), diffusion.timesteps[i], dtype=torch.long, device=x.device)
            xin = torch.cat([x, x]) if use_cfg else x
            out = run.evaluate(model, xin, t, y, k, halves) if run is not None else model(xin, t, y)
            if use_cfg:
                cond, uncond = out.chunk(2)
                out = guide(cond, uncond, options.cfg_scale, options.guidance, cfg.in_channels)
            eps_noise = step_noise(k, tuple(x.shape)) if (options.method == "ddpm" or options.eta > 0) else None
            if options.method == "ddpm":
                x, x0 = ddpm_step(diffusion, i, x, out, eps_noise, cfg.prediction)
            else:
                x, x0 = ddim_step(diffusion, i, x, out, eps_noise, options.eta, cfg.prediction)
            if callback is not None:
                callback(k, x, x0)
    return x, run
