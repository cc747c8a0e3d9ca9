"""AsynDM engine cost: vanilla vs AsynDM-dynamic vs AsynDM-static on one mid-size random UNet.

Every mode is warmed once, then timed in interleaved rounds (one run of each mode per round); the
ratio is the median of the rounds' ratios (benchmarks/interleaved.py), at torch's default thread
count. Target of this library benchmark: dynamic ≤ 1.10× vanilla; static is one extra vanilla pass
(≈ 2×). DESIGN.md's "Performance intent" (≤ 1.05× per step) is the ComfyUI sampler's against
ComfyUI's own, measured by benchmarks/bench_comfy_asyndm.py.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_asyndm.py [--rounds 5] [--steps 20]
"""

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import conftest  # noqa: E402,F401  (imports this checkout as asyndm_fpdm)
import torch  # noqa: E402

from asyndm_fpdm import tiny  # noqa: E402
from asyndm_fpdm.samplers.api import asyn_generate  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interleaved import interleaved, median, ratio, spread  # noqa: E402


def mid_unet(latent):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent, block_out_channels=(64, 128, 192, 192), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=256, attention_head_dim=32, norm_num_groups=32,
    ).eval().requires_grad_(False)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    return unet


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--latent", type=int, default=32)
    args = ap.parse_args()
    unet = mid_unet(args.latent)
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 77, 256, generator=gen), torch.randn(1, 77, 256, generator=gen)
    cfg = tiny.sd_scheduler_config()
    items = [([2], 0.7), ([4], 0.7)]
    modes = {
        "vanilla": dict(mode="vanilla"),
        "asyn-dynamic": dict(mode="asyn", mask_source="dynamic"),
        "asyn-static": dict(mode="asyn", mask_source="static"),
    }
    runs = {name: (lambda kw=kw: asyn_generate(unet, cfg, cond, uncond, items=items, steps=args.steps, seed=0,
                                                eta=0.0, **kw)) for name, kw in modes.items()}
    times = interleaved(runs, args.rounds)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"UNet {params:.1f}M params, latent {args.latent}x{args.latent}, {args.steps} steps, CFG, "
          f"{args.rounds} interleaved rounds after a warm-up of each, torch threads {torch.get_num_threads()}")
    for name in modes:
        print(f"{name:14s} median {median(times[name]):7.3f} s   ratio vs vanilla {ratio(times, name, 'vanilla'):5.3f}"
              f" (median of per-round ratios; rounds {spread(times, name, 'vanilla')})")


if __name__ == "__main__":
    main()
