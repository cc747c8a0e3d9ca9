"""Per sampler: the Asynchronous KSampler (AsynDM, dynamic masks) against ComfyUI's own sampler
of the same name inside ComfyUI, for every sampler ComfyUI lists (the native per-pixel ones and
the rest through the change of clock).

Same model, sigmas, latent and conditioning, one process; per sampler both sides are warmed, then
timed in interleaved rounds (benchmarks/interleaved.py); prints the median wall time per step of
each and the median of the rounds' ratios (target: AsynDM dynamic ≤ 1.05× per step). Threads:
torch's default, as ComfyUI runs (``--threads N`` to pin; the test harness's one thread is not used).

    COMFYUI_PATH=/path/to/ComfyUI OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_comfy_asyndm.py \
        [--size 256] [--steps 4] [--repeats 3] [--channels 320] [--samplers all | euler,uni_pc,...]

The model is SD1.5's UNet (ComfyUI's own SD15 config: 320 base channels, two ResBlocks per
level, attention at latent/1, /2, /4, 768-wide context) with random weights; --channels and
--light shrink it for a quick look on a small CPU. Threads: torch's default (ComfyUI's); no
process-wide setting (denormal flushing, thread count) is applied, to either side.
"""

import argparse
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def comfy_parser(doc):
    """An argument parser with the options every ComfyUI benchmark takes: --comfyui, --threads."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout ($COMFYUI_PATH)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, as in ComfyUI)")
    return ap


def comfy_args(ap):
    """Parsed arguments; exits with the fix when no ComfyUI checkout is given."""
    args = ap.parse_args()
    if not args.comfyui:
        sys.exit("set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout")
    return args


def bootstrap(comfy_path, prefix="bench_asyndm_", threads=0):
    """ComfyUI imported as the integration harness does, but at ComfyUI's own thread count (torch's
    default) unless ``threads`` > 0."""
    os.environ["COMFYUI_TEST_THREADS"] = str(threads)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # noqa: F401  (imports this checkout as asyndm_fpdm)
    import comfy_workflows

    comfy_workflows.bootstrap_comfyui(comfy_path, pathlib.Path(tempfile.mkdtemp(prefix=prefix)))


def build_model(channels, seed=0, light=False):
    import comfy.supported_models as sm

    levels = [1, 2, 4] if light else [1, 2, 4, 4]
    unet = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "in_channels": 4,
        "use_spatial_transformer": True, "legacy": False, "model_channels": channels,
        "num_res_blocks": [1 if light else 2] * len(levels), "channel_mult": levels, "context_dim": 768,
        "transformer_depth": [1, 1, 1] if light else [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
        "transformer_depth_output": [1] * 6 if light else [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_linear_in_transformer": False, "use_temporal_resblock": False, "use_temporal_attention": False,
        "adm_in_channels": None, "num_heads": 8, "num_head_channels": -1,
    }
    model_patcher = patcher(sm.SD15(unet), seed)
    model_patcher.model.diffusion_model.out[-1].weight.data.mul_(0.05)
    return model_patcher


def patcher(config, seed=0, dtype=None):
    """A ModelPatcher of ``config``'s model with seeded random weights (fan-in scaled, norms at 1),
    in float32 unless ``dtype``; ``config.prune(model)``, where set, drops blocks before the fill."""
    import comfy.model_management
    import comfy.model_patcher
    import torch

    config.set_inference_dtype(dtype or torch.float32, None)
    model = config.get_model({}, "", device="cpu")
    if getattr(config, "prune", None):
        config.prune(model.diffusion_model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        if getattr(model.diffusion_model, "pos_embed", None) is not None:
            model.diffusion_model.pos_embed.normal_(0, 0.1, generator=gen)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def main():
    ap = comfy_parser(__doc__)
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--channels", type=int, default=320, help="UNet base channels (SD1.5: 320)")
    ap.add_argument("--light", action="store_true", help="three levels, one ResBlock each (quick look)")
    ap.add_argument("--scheduler", default="karras")
    ap.add_argument("--samplers", default="all", help="comma-separated names, or all (comfy's KSampler.SAMPLERS)")
    args = comfy_args(ap)
    bootstrap(args.comfyui, threads=args.threads)

    import comfy.utils
    import nodes
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False  # both sides: no tqdm bars in the printed table

    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMKSampler

    model = build_model(args.channels, light=args.light)
    gen = torch.Generator().manual_seed(1)
    targets = {"words": ["rabbit", "basketball"], "ks": [0.7, 0.7], "positions": [[2], [4]], "context_len": 77}
    pos = [[torch.randn(1, 77, 768, generator=gen), {"asyndm_targets": targets}]]
    neg = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}

    def core(name):
        return lambda: nodes.KSampler().sample(model, 7, args.steps, 7.5, name, args.scheduler, pos, neg, latent)

    def asyn(name):
        return lambda: AsynDMKSampler().sample(model, 7, args.steps, 7.5, 1.0 if name != "ddim" else 0.0, "AsynDM",
                                               "dynamic", "bin", "", 1.0, "timestep 0 (paper)", pos, neg, latent,
                                               sampler_name=name, scheduler=args.scheduler)

    import comfy.samplers

    names = (list(comfy.samplers.KSampler.SAMPLERS) if args.samplers == "all"
             else [n.strip() for n in args.samplers.split(",") if n.strip()])
    print(f"SD1.5-shaped UNet, base channels {args.channels}{' (light)' if args.light else ''}, latent "
          f"{args.size // 8}x{args.size // 8}, {args.steps} steps ({args.scheduler}), cfg 7.5, threads "
          f"{torch.get_num_threads()}, {args.repeats} interleaved rounds (median per step; ratio: median of the rounds' ratios)")
    print(f"  {'sampler':20s} {'core ms/step':>13s} {'AsynDM ms/step':>15s} {'ratio':>7s} {'rounds':>11s}")
    from interleaved import interleaved, median, ratio, spread

    with torch.inference_mode():
        ratios = []
        for name in names:
            times = interleaved({"core": core(name), "asyn": asyn(name)}, args.repeats, per=args.steps)
            c, a = median(times["core"]), median(times["asyn"])
            ratios.append(ratio(times, "asyn", "core"))
            print(f"  {name:20s} {c * 1000:13.1f} {a * 1000:15.1f} {ratios[-1]:7.3f} "
                  f"{spread(times, 'asyn', 'core'):>11s}", flush=True)
    print(f"  median ratio over {len(ratios)} samplers {median(ratios):.3f}, largest {max(ratios):.3f}")


if __name__ == "__main__":
    main()
