"""FPDM part of ``python -m asyndm_fpdm demo``: a tiny random fixed-point DiT, the same
iteration budget spent three ways (fixed, increasing, fixed + reuse), numbers printed."""

from __future__ import annotations

import os
import time


def run(out_dir: str, steps: int = 10, iterations: int = 4) -> int:
    import torch

    from .model import DiT, FPDMConfig, init_random_
    from .pipeline import SampleOptions, generate
    from .solver import SolverSettings

    cfg = FPDMConfig(hidden_size=64, patch_size=2, num_heads=4, num_classes=1000, input_size=16, fixed_point=True,
                     default_iterations=iterations)
    model = init_random_(DiT(cfg), seed=0).eval()
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    os.makedirs(out_dir, exist_ok=True)
    ways = {"fixed": SolverSettings(iterations), "increasing": SolverSettings(iterations, allocation="increasing"),
            "fixed+reuse": SolverSettings(iterations, reuse=True)}
    for name, settings in ways.items():
        t0 = time.perf_counter()
        latents, fp_run = generate(model, [207, 360], noise, SampleOptions(steps=steps, method="ddim", cfg_scale=4.0),
                                   settings)
        took = time.perf_counter() - t0
        _save_preview(latents, os.path.join(out_dir, f"latents_{name.replace('+', '_')}.png"))
        print(f"FPDM {name:12s}: budget {steps * iterations} iterations/image, allocation sum {sum(fp_run.allocated)}, "
              f"block evaluations {fp_run.evaluations} (2 images x cond/uncond), {took:.2f} s")
    print(f"FPDM latent previews in {out_dir}/")
    return 0


def _save_preview(latents, path):
    """First three latent channels as an image strip (random weights: this is noise, not a picture)."""
    from PIL import Image

    x = latents[:, :3].float()
    x = (x - x.amin()) / (x.amax() - x.amin() + 1e-8)
    strip = (x.permute(2, 0, 3, 1).reshape(x.shape[2], -1, 3) * 255).byte().numpy()
    Image.fromarray(strip).resize((strip.shape[1] * 8, strip.shape[0] * 8), Image.NEAREST).save(path)
