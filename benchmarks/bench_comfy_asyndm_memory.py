"""Peak memory of the Asynchronous KSampler (AsynDM dynamic, and with a fixed mask) against
ComfyUI's own KSampler, per model family (issue 16: AsynDM ≤ 1.1× the core run's peak).

Each run is one fresh process (the same model, latent, conditioning and sampler as
bench_comfy_asyndm_transformers.py builds), so no side inherits the other's allocator state. In
it: the model and inputs are built, freed heap is returned to the OS (malloc_trim), the kernel's
peak-RSS mark is reset (/proc/self/clear_refs, Linux) and the resident size read; one sampling run;
then the peak (VmHWM). Large tensors are mapped one by one (MALLOC_MMAP_THRESHOLD_), so memory
freed during the run leaves the resident size as it would on a GPU allocator. "Sampling peak" is the peak minus the resident size before the run: what the
run itself added at its highest (activations, attention, the per-token maps); "total" includes the
weights. Ratios are AsynDM / core of each.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_comfy_asyndm_memory.py \
        [--size 1024] [--unet-size 512] [--steps 2] [--hidden 256] [--depth 4] [--families sd15,flux,sd3,chroma,wan,qwen_image,hidream,lumina2,hunyuan_image]

At the default 1024 px a patch-2 transformer sees 4096 image tokens (Flux / Qwen-Image at 1024²):
the attention read for masks must stay blockwise there (a full image × text attention matrix per
head would show here as extra peak).
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = pathlib.Path(__file__).resolve().parent
SIDES = ("core", "asyn", "tokens")


def _status(field):
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def one(args):
    """Child: one side, one run; prints a JSON line with the bytes."""
    sys.path.insert(0, str(HERE))
    from bench_comfy_asyndm_transformers import bootstrap, build, inputs

    bootstrap(args.comfyui, threads=args.threads)
    import ctypes
    import gc

    import comfy.utils
    import nodes
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False
    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMKSampler

    family = args.one
    gen = torch.Generator().manual_seed(1)
    size = args.unet_size if family == "sd15" else args.size
    if family == "sd15":
        from bench_comfy_asyndm import build_model

        model, cfg = build_model(args.channels), 7.5
        targets = {"words": ["rabbit", "basketball"], "ks": [0.7, 0.7], "positions": [[2], [4]], "context_len": 77}
        pos = [[torch.randn(1, 77, 768, generator=gen), {"asyndm_targets": targets}]]
        neg = [[torch.randn(1, 77, 768, generator=gen), {}]]
        latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    else:
        model = build(family, args.hidden, args.depth)
        cfg, pos, neg, latent = inputs(family, size, gen)
    half = torch.zeros(1, size, size)
    half[:, :, : size // 2] = 1

    def run():
        if args.side == "core":
            return nodes.KSampler().sample(model, 7, args.steps, cfg, "euler", "simple", pos, neg, latent)
        source, mask = ("dynamic", None) if args.side == "asyn" else ("mask input", half)
        return AsynDMKSampler().sample(model, 7, args.steps, cfg, 0.0, "AsynDM", source, "bin", "", 1.0,
                                       "clean (sigma 0, like ComfyUI)", pos, neg, latent,
                                       sampler_name="euler", scheduler="simple", denoise=1.0, mask=mask)

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current resident size
    before = _status("VmRSS")
    with torch.inference_mode():
        run()
    print(json.dumps({"before": before, "peak": _status("VmHWM")}))


def main():
    from bench_comfy_asyndm import comfy_args, comfy_parser

    ap = comfy_parser(__doc__)
    ap.add_argument("--size", type=int, default=1024, help="image size in pixels (latent = size/8)")
    ap.add_argument("--unet-size", type=int, default=512, help="SD1.5's image size (its native 512)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256, help="transformer width")
    ap.add_argument("--depth", type=int, default=4, help="transformer blocks (Flux/Chroma: double; 2× single)")
    ap.add_argument("--channels", type=int, default=320, help="SD1.5 UNet base channels")
    ap.add_argument("--families", default="sd15,flux,sd3,chroma,wan,qwen_image,hidream,lumina2,hunyuan_image")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = comfy_args(ap)
    if args.one:
        return one(args)
    if not os.path.exists("/proc/self/clear_refs"):
        sys.exit("this benchmark reads Linux's per-process peak memory (/proc/self/clear_refs)")
    print(f"transformers {args.size}² px (latent {args.size // 8}²) h{args.hidden} × {args.depth} blocks, SD1.5 UNet "
          f"{args.unet_size}² px {args.channels} channels; {args.steps} euler/simple steps; one fresh process per run")
    print(f"  {'family':12s} {'core peak':>10s} {'AsynDM peak':>12s} {'ratio':>6s} {'mask-input':>11s} "
          f"{'core total':>11s} {'AsynDM total':>13s} {'ratio':>6s}")
    common = [sys.executable, __file__, "--comfyui", args.comfyui, "--size", str(args.size), "--steps",
              str(args.steps), "--unet-size", str(args.unet_size), "--hidden", str(args.hidden), "--depth", str(args.depth), "--channels",
              str(args.channels), "--threads", str(args.threads)]
    for family in args.families.split(","):
        got = {}
        for side in SIDES:
            # every large tensor mapped on its own: glibc would otherwise raise its mmap threshold and keep
            # freed blocks resident, which reads as memory the run does not hold
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            out = subprocess.run(common + ["--one", family, "--side", side], capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"{family} {side} failed:\n{out.stderr[-3000:]}")
            got[side] = json.loads(out.stdout.strip().splitlines()[-1])
        inc = {s: got[s]["peak"] - got[s]["before"] for s in SIDES}
        mb = 2 ** 20
        print(f"  {family:12s} {inc['core'] / mb:8.0f}MB {inc['asyn'] / mb:10.0f}MB {inc['asyn'] / inc['core']:6.2f} "
              f"{inc['tokens'] / inc['core']:11.2f} {got['core']['peak'] / mb:9.0f}MB "
              f"{got['asyn']['peak'] / mb:11.0f}MB {got['asyn']['peak'] / got['core']['peak']:6.2f}", flush=True)


if __name__ == "__main__":
    main()
