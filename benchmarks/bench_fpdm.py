"""FPDM sampling cost side by side, in one process: wall time, fixed-point block evaluations and
peak memory per image against iterations, reuse on/off, allocation, tolerance and Anderson.

Random weights (fixed seed), so "error" is measured against a converged run of the same model
(tolerance 1e-5): the relative L2 distance of the final latents. Lower cost at equal error, or
lower error at equal cost, is the saving.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_fpdm.py [--hidden 384 --grid 16 --steps 10]
    ... --memory            peak memory per configuration (CUDA: allocator peak, all; CPU: peak RSS of a
                            fresh process, minus the model's own footprint, for a few configurations)
    ... --reference PATH    also time the reference FPDM's plain loop (needs its deps: timm, jaxtyping)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
from statistics import median

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _import_pack():
    if "asyndm_fpdm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("asyndm_fpdm", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["asyndm_fpdm"] = mod
        spec.loader.exec_module(mod)


_import_pack()
import torch  # noqa: E402

from asyndm_fpdm.fpdm.model import DiT, FPDMConfig, init_random_  # noqa: E402
from asyndm_fpdm.fpdm.pipeline import SampleOptions, generate  # noqa: E402
from asyndm_fpdm.fpdm.solver import SolverSettings  # noqa: E402

CONFIGS = [  # name, settings
    ("iters 2", dict(iterations=2)),
    ("iters 4", dict(iterations=4)),
    ("iters 8", dict(iterations=8)),
    ("iters 16", dict(iterations=16)),
    ("iters 4 + reuse", dict(iterations=4, reuse=True)),
    ("iters 4 increasing", dict(iterations=4, allocation="increasing")),
    ("iters 4 decreasing", dict(iterations=4, allocation="decreasing")),
    ("iters 4 increasing + reuse", dict(iterations=4, allocation="increasing", reuse=True)),
    ("iters 2 + reuse", dict(iterations=2, reuse=True)),
    ("tol 1e-3 (max 26)", dict(iterations=26, tolerance=1e-3)),
    ("tol 1e-3 (max 26) + reuse", dict(iterations=26, tolerance=1e-3, reuse=True)),
    ("tol 1e-3 (max 26) + anderson 5", dict(iterations=26, tolerance=1e-3, anderson=5)),
    ("iters 8 + anderson 5", dict(iterations=8, anderson=5)),
]

MEMORY_SUBSET = {"iters 2", "iters 16", "iters 4 + reuse", "tol 1e-3 (max 26) + anderson 5"}  # CPU probes are slow


def build(args):
    cfg = FPDMConfig(hidden_size=args.hidden, patch_size=2, num_heads=args.heads, num_classes=1000,
                     input_size=args.grid, fixed_point=True, pre_depth=1, post_depth=1)
    return init_random_(DiT(cfg), seed=0).eval().to(args.device)


def run_config(model, args, settings, noise):
    opts = SampleOptions(steps=args.steps, method="ddim", cfg_scale=4.0)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    lat, run = generate(model, list(range(noise.shape[0])), noise, opts, SolverSettings(**settings))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / noise.shape[0]
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    return lat, wall, run.evaluations / noise.shape[0], peak


def memory_probe(args, settings) -> float:
    """Peak RSS (MiB) of a fresh process sampling with ``settings``, minus one that only builds the model."""
    batch = max(args.batch, 8)  # enough activations to rise above allocator noise; 2 steps: the peak is per step

    def rss(extra):
        cmd = [sys.executable, __file__, "--probe", json.dumps(extra), "--hidden", str(args.hidden), "--heads",
               str(args.heads), "--grid", str(args.grid), "--steps", "2", "--batch", str(batch)]
        return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    return (rss(settings) - rss(None)) / batch


def probe(args):
    import resource

    model = build(args)
    noise = torch.randn(args.batch, 4, args.grid, args.grid, generator=torch.Generator().manual_seed(0))
    settings = json.loads(args.probe)
    if settings is not None:
        run_config(model, args, settings, noise)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def reference_sampler(args, model, noise, iterations):
    """The reference's own model (its plain loop) on the same weights, same DDIM sampling: a callable
    that samples ``noise`` and returns the latents."""
    sys.path[:0] = [args.reference]
    import models as R  # the reference's models.py
    from diffusion import create_diffusion

    c = model.config
    ref = R.DiT(input_size=args.grid, patch_size=2, hidden_size=c.hidden_size, num_heads=c.num_heads, num_classes=1000,
                class_dropout_prob=0, learn_sigma=True, use_gradient_checkpointing=False, fixed_point=True,
                fixed_point_pre_depth=1, fixed_point_post_depth=1, fixed_point_with_grad_min_iters=iterations,
                fixed_point_with_grad_max_iters=iterations, fixed_point_pre_post_timestep_conditioning=False)
    sd = dict(model.state_dict())
    sd["pos_embed"] = ref.pos_embed
    ref.load_state_dict(sd)
    ref = ref.eval().to(args.device)
    d = create_diffusion(str(args.steps))
    y = torch.cat([torch.arange(noise.shape[0]), torch.full((noise.shape[0],), 1000)]).to(args.device)
    z = torch.cat([noise, noise])

    def sample():
        with torch.inference_mode():
            out = d.ddim_sample_loop(ref.forward_with_cfg, z.shape, z, clip_denoised=False,
                                     model_kwargs=dict(y=y, cfg_scale=4.0), device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out[: noise.shape[0]]
    return sample


def compare_reference(args, model, noise):
    """Ours vs the reference's loop at 4 iterations: both warmed, the same rounds, interleaved; the
    ratio is the median of the per-round ratios (load drift on a shared machine hits both alike)."""
    ref = reference_sampler(args, model, noise, 4)
    ours = run_config(model, args, dict(iterations=4), noise)[0]
    ref_out = ref()  # warm-up (and the latents to compare)
    walls, ratios = {"ours": [], "reference": []}, []
    for _ in range(max(args.repeats, 3)):
        t0 = time.perf_counter()
        ref()
        r = (time.perf_counter() - t0) / noise.shape[0]
        o = run_config(model, args, dict(iterations=4), noise)[1]
        walls["reference"].append(r)
        walls["ours"].append(o)
        ratios.append(o / r)
    print(f"\nreference plain loop vs ours, iters 4, {len(ratios)} interleaved rounds after a warm-up of each: "
          f"reference {median(walls['reference']):.3f} s/image, ours {median(walls['ours']):.3f} s/image (medians); "
          f"ours/reference = {median(ratios):.2f} (median of per-round ratios, range {min(ratios):.2f}-{max(ratios):.2f}); "
          f"max |latent diff| = {(ref_out - ours).abs().max().item():.2e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384, help="hidden size (384 = DiT-S width)")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--grid", type=int, default=16, help="latent size (32 = 256px images)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=1, help="images per run (CFG doubles the network batch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--memory", action="store_true", help="measure peak memory per configuration")
    p.add_argument("--reference", default=None, help="path of the reference FPDM checkout, to time its loop")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (medians are reported)")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe is not None:
        return probe(args)
    torch.manual_seed(0)
    model = build(args)
    noise = torch.randn(args.batch, 4, args.grid, args.grid, generator=torch.Generator().manual_seed(0)).to(args.device)
    run_config(model, args, dict(iterations=1), noise)  # warm-up
    converged, *_ = run_config(model, args, dict(iterations=200, tolerance=1e-5), noise)

    # Interleaved rounds over the configurations (all warmed by the runs above); each time is reported
    # as the median over rounds and its ratio to "iters 4" as the median of the per-round ratios, so
    # load drift on a shared machine hits every configuration alike.
    walls, results = {name: [] for name, _ in CONFIGS}, {}
    for _ in range(args.repeats):
        for name, settings in CONFIGS:
            lat, wall, evals, peak = run_config(model, args, settings, noise)
            walls[name].append(wall)
            results[name] = (lat, evals, peak)
    rows = []
    for name, settings in CONFIGS:
        lat, evals, peak = results[name]
        err = ((lat - converged).norm() / converged.norm()).item()
        if args.memory and peak is None and name in MEMORY_SUBSET:
            peak = memory_probe(args, settings)
        ratio = median([w / b for w, b in zip(walls[name], walls["iters 4"])])
        rows.append((name, median(walls[name]), ratio, evals, peak, err))

    base = next(r for r in rows if r[0] == "iters 4")
    print(f"\nFPDM hidden {args.hidden}, {args.grid}x{args.grid} latents, {args.steps} DDIM steps, CFG 4, "
          f"batch {args.batch}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved rounds")
    print(f"{'configuration':34s} {'s/image':>8s} {'x iters4':>8s} {'block evals':>11s} {'x iters4':>8s} "
          f"{'peak MiB':>9s} {'rel. error':>10s}")
    for name, wall, ratio, evals, peak, err in rows:
        mem = f"{peak:9.1f}" if peak is not None else f"{'-':>9s}"
        print(f"{name:34s} {wall:8.3f} {ratio:8.2f} {evals:11.0f} {evals / base[3]:8.2f} {mem} {err:10.4f}")
    print("s/image: median over rounds; x iters4: median of the per-round time ratios. block evals: fixed-point "
          "block evaluations per image, cond + uncond halves together. rel. error: |x - x_converged| / "
          "|x_converged| of the final latents.")
    if args.reference:
        compare_reference(args, model, noise)


if __name__ == "__main__":
    main()
