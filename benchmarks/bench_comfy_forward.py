"""One model forward of a Lumina 2-shaped NextDiT (ComfyUI's own class, random weights): ComfyUI's
stock call against the per-token path (a two-timestep map, masks not read) and the per-token path
with the attention read for masks — time (interleaved rounds, median per forward and of the rounds'
ratios) and peak memory (each mode alone in a fresh process, two forwards: peak resident memory
and its growth over the resident memory with the model built, sampled every millisecond). Targets: ≤ 1.05× time, ≤ 1.1× peak memory.

    COMFYUI_PATH=/path/to/ComfyUI OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_comfy_forward.py \\
        [--hidden 512] [--depth 8] [--size 512] [--repeats 5] [--threads 0]

A forward isolates the model-side cost from the sampler's per-pixel bookkeeping (measured by
bench_comfy_asyndm_transformers.py), so its ratios are steadier on a shared machine.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = pathlib.Path(__file__).resolve().parent
MODES = ("stock", "tokens", "capture")


def setup(args):
    sys.path.insert(0, str(HERE))
    import bench_comfy_asyndm_transformers as b

    b.bootstrap(args.comfyui, threads=args.threads)
    import comfy.model_management
    import torch

    from asyndm_fpdm.samplers.backends import backend_for
    from asyndm_fpdm.samplers.backends.comfy_call import PixelCall

    model = b.build("lumina2", args.hidden, args.depth)
    comfy.model_management.load_models_gpu([model])
    ms = model.get_model_object("model_sampling")
    lat = args.size // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, lat, lat, generator=gen)  # cond and uncond, as CFG batches them
    kw = {"c_crossattn": torch.randn(2, 64, 512, generator=gen), "num_tokens": 64}
    s = ms.sigmas[len(ms.sigmas) // 2].float()
    sig = s.expand(2, 1, lat, lat).clone()
    sig[:, :, : lat // 2] = ms.sigmas[3 * len(ms.sigmas) // 4].float()  # half the tokens lag
    backend = backend_for(model)
    base = {"transformer_options": {"cond_or_uncond": [0, 1]}}

    def per_token(capture):
        call = PixelCall(sig, capture=capture, positions=[[2], [4]], context_len=64)
        to = backend.model_options(base, call)["transformer_options"]
        return lambda: model.model.apply_model(x, sig.flatten(1).amin(1), transformer_options=to, **kw)

    runs = {"stock": lambda: model.model.apply_model(x, s.expand(2), **kw), "tokens": per_token(False),
            "capture": per_token(True)}
    return runs, torch


def _rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def peak(args):
    """Child process: one mode's resident memory (KiB) with the model built, and its peak during two
    forwards (sampled every millisecond: large tensors are mapped and unmapped as they live)."""
    import threading
    import time

    runs, torch = setup(args)
    base = _rss_kib()
    seen, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            seen.append(_rss_kib())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with torch.inference_mode():
        for _ in range(2):
            runs[args.child]()
    done.set()
    thread.join()
    print(json.dumps({"peak": max(seen), "growth": max(seen) - base}))


def main():
    from bench_comfy_asyndm import comfy_args, comfy_parser

    ap = comfy_parser(__doc__)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--depth", type=int, default=8, help="joint layers (Lumina 2: 26; masks read 3)")
    ap.add_argument("--size", type=int, default=512, help="pixels (latent = size/8; tokens = (size/16)²)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = comfy_args(ap)
    if args.child:
        return peak(args)
    runs, torch = setup(args)
    from interleaved import interleaved, median, ratio, spread

    with torch.inference_mode():
        times = interleaved(runs, args.repeats)
    memory = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode] + sys.argv[1:]
        # every large tensor mapped on its own (glibc would otherwise raise its mmap threshold and keep
        # freed blocks resident, which reads as memory the forward does not hold)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        memory[mode] = json.loads(out)
    tokens = (args.size // 16) ** 2
    print(f"Lumina-2-shaped NextDiT, {args.depth} joint layers + 2 refiners, hidden {args.hidden}, {tokens} image "
          f"tokens + 64 caption tokens, batch 2, threads {torch.get_num_threads()}, {args.repeats} rounds")
    print(f"  {'mode':32s} {'ms/forward':>10s} {'ratio':>6s} {'rounds':>11s} {'peak MiB':>9s} {'ratio':>6s} "
          f"{'growth MiB':>10s} {'ratio':>6s}")
    names = {"stock": "ComfyUI", "tokens": "per-token timesteps", "capture": "per-token + attention read"}
    for mode in MODES:
        r = ratio(times, mode, "stock") if mode != "stock" else 1.0
        rounds = spread(times, mode, "stock") if mode != "stock" else ""
        m = memory[mode]
        print(f"  {names[mode]:32s} {median(times[mode]) * 1000:10.1f} {r:6.3f} {rounds:>11s} "
              f"{m['peak'] / 1024:9.1f} {m['peak'] / memory['stock']['peak']:6.3f} {m['growth'] / 1024:10.1f} "
              f"{m['growth'] / max(memory['stock']['growth'], 1):6.3f}")


if __name__ == "__main__":
    main()
