"""Asynchronous KSampler (dynamic mask) against the core KSampler inside ComfyUI.

Same model, same steps, same latent, same conditioning, one process, runs interleaved; prints the
median wall times side by side and their ratio (design target: AsynDM dynamic ≤ 1.10× core).

    COMFYUI_PATH=/path/to/ComfyUI OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_comfy_asyndm.py \
        [--size 256] [--steps 10] [--repeats 5] [--channels 64]

The model is an SD1.5-shaped UNet built from ComfyUI's own SD15 config with random weights
(three levels, attention at latent/1, /2, /4 like SD1.5 at 512 px, 768-wide context), small
enough for a CPU and large enough that the UNet, not Python, dominates a step.
"""

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def bootstrap(comfy_path):
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # noqa: F401  (imports this checkout as asyndm_fpdm)
    import comfy_workflows

    comfy_workflows.bootstrap_comfyui(comfy_path, pathlib.Path(tempfile.mkdtemp(prefix="bench_asyndm_")))


def build_model(channels, seed=0):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm
    import torch

    unet = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "in_channels": 4,
        "use_spatial_transformer": True, "legacy": False, "model_channels": channels,
        "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 4], "context_dim": 768,
        "transformer_depth": [1, 1, 1], "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1],
        "use_linear_in_transformer": False, "use_temporal_resblock": False, "use_temporal_attention": False,
        "adm_in_channels": None, "num_heads": 8, "num_head_channels": -1,
    }
    config = sm.SD15(unet)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        model.diffusion_model.out[-1].weight.mul_(0.05)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--channels", type=int, default=64, help="UNet base channels (SD1.5: 320)")
    args = ap.parse_args()
    if not args.comfyui:
        sys.exit("set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout")
    bootstrap(args.comfyui)

    import nodes
    import torch

    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMKSampler

    model = build_model(args.channels)
    gen = torch.Generator().manual_seed(1)
    targets = {"words": ["rabbit", "basketball"], "ks": [0.7, 0.7], "positions": [[2], [4]], "context_len": 77}
    pos = [[torch.randn(1, 77, 768, generator=gen), {"asyndm_targets": targets}]]
    neg = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}

    def core():
        return nodes.KSampler().sample(model, 7, args.steps, 7.5, "ddim", "ddim_uniform", pos, neg, latent)

    def asyn(mode="AsynDM"):
        return AsynDMKSampler().sample(model, 7, args.steps, 7.5, 0.0, mode, "dynamic", "bin", "", 1.0,
                                       "timestep 0 (paper)", pos, neg, latent)

    runs = {"core KSampler (ddim, ddim_uniform)": core, "Asynchronous KSampler (AsynDM, dynamic)": asyn,
            "Asynchronous KSampler (vanilla)": lambda: asyn("vanilla")}
    times = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["core KSampler (ddim, ddim_uniform)"])
    print(f"latent {args.size // 8}x{args.size // 8}, {args.steps} steps, cfg 7.5, base channels {args.channels}, "
          f"threads {torch.get_num_threads()}, {args.repeats} repeats (median)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:42s} {med * 1000:9.1f} ms   ratio {med / base:5.3f}")


if __name__ == "__main__":
    main()
