"""FPDM training cost and warm start, measured side by side in one process.

1. Step time, parameters and memory of one training step (forward + hybrid loss + backward + AdamW),
   FPDM vs a plain DiT of the same width (DiT: ``depth`` blocks; FPDM: 1 pre + fixed-point block + 1
   post, the reference's stochastic iterations: no-grad drawn from [0, 10], with-grad from [1, 12]),
   at two widths (``--widths``), each with and without gradient checkpointing. Rounds are interleaved
   over all rows; times are medians, FPDM / DiT time ratios medians of the per-round ratios; FPDM's
   iteration counts follow one seeded sequence, the same every run.
   Memory, CPU (no allocator statistics there): the bytes of the tensors autograd saves for backward
   during the step, counted once per storage through ``torch.autograd.graph.saved_tensors_hooks``
   (the activation memory, which is what differs between the two), plus parameters + gradients +
   AdamW's two moments = 4 x parameter bytes. With gradient checkpointing the saved bytes leave out the
   transient of recomputing one block during backward (about one block's activations; the CUDA peak
   includes it). CUDA: ``torch.cuda.max_memory_allocated`` of the step.
2. Warm start vs from scratch on a small synthetic task (tiny VAE latents of coloured blobs): a DiT is
   trained first (the stand-in for public DiT weights), then an FPDM is trained for the same number of
   steps from the DiT (``--warm-start``) and from scratch; reported: the loss on a fixed held-out draw
   (same timesteps, noise, labels; EMA-free weights) after equal steps, and the training loss curve.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_fpdm_train.py [--widths 192,384 --depth 12 --grid 16 --batch 8]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = pathlib.Path(__file__).resolve().parents[1]


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_fpdm import _import_pack  # noqa: E402  (imports this checkout as asyndm_fpdm)

_import_pack()
import torch  # noqa: E402

from asyndm_fpdm.fpdm.diffusion import make_diffusion, q_sample, training_losses  # noqa: E402
from asyndm_fpdm.fpdm.model import DiT, FPDMConfig, initialize_weights  # noqa: E402
from asyndm_fpdm.fpdm.solver import draw_iterations, stochastic_solver  # noqa: E402


# ----------------------------------------------------------------------------- 1. step time and memory


class SavedBytes:
    """Bytes autograd keeps for backward, each storage counted once."""

    def __init__(self):
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += st.nbytes()
        return t

    @staticmethod
    def unpack(t):
        return t


def make(args, width, fixed_point, checkpointing):
    cfg = FPDMConfig(hidden_size=width, num_heads=max(width // 64, 1), patch_size=2, num_classes=1000,
                     input_size=args.grid, depth=args.depth, fixed_point=fixed_point, pre_depth=1, post_depth=1)
    torch.manual_seed(0)
    model = initialize_weights(DiT(cfg)).to(args.device).train()
    model.gradient_checkpointing = checkpointing
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def step(model, opt, batch, iters, diffusion, measure=False):
    x0, t, y, noise = batch
    xt = q_sample(diffusion, x0, t, noise)
    solver = stochastic_solver(*iters) if model.config.fixed_point else None
    saved = SavedBytes()
    cuda = x0.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ctx = torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack) if measure else _null()
    with ctx:
        loss = training_losses(diffusion, model(xt, t, y, solver=solver), x0, xt, t, noise)["loss"].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if cuda:
        torch.cuda.synchronize()
    took = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return took, saved.bytes, peak


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def bench_step(args):
    """Every (width, checkpointing, model) in the same interleaved rounds; FPDM / DiT ratios per pair."""
    diffusion = make_diffusion(None)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch, 4, args.grid, args.grid, generator=g).to(args.device),
             torch.randint(0, 1000, (args.batch,), generator=g).to(args.device),
             torch.randint(0, 1000, (args.batch,), generator=g).to(args.device),
             torch.randn(args.batch, 4, args.grid, args.grid, generator=g).to(args.device))
    widths = [int(w) for w in args.widths.split(",")]
    keys = [(w, ck, name) for w in widths for ck in (True, False) for name in ("DiT", "FPDM")]
    models = {k: make(args, k[0], k[2] == "FPDM", k[1]) for k in keys}
    draws = torch.Generator().manual_seed(1)
    iters = [draw_iterations(draws, (0, 10), (1, 12)) for _ in range(args.rounds + 1)]
    times, mem = {k: [] for k in keys}, {k: [] for k in keys}
    for r in range(args.rounds + 1):  # round 0: warm-up
        for k in keys:
            took, saved, peak = step(*models[k], batch, iters[r], diffusion, measure=True)
            if r:
                times[k].append(took)
                mem[k].append((saved, peak or 0))
    mean_iters = sum(a + b for a, b in iters[1:]) / args.rounds
    print(f"\n1. one training step (forward + hybrid loss + backward + AdamW), batch {args.batch}, {args.grid}x"
          f"{args.grid} latents, DiT depth {args.depth}, FPDM 1 pre + fixed point + 1 post (mean {mean_iters:.1f} "
          f"iterations per step), device {args.device}, {torch.get_num_threads()} torch threads, medians of "
          f"{args.rounds} rounds interleaved over all rows")
    print("\n| width | grad. ckpt | model | params | step s | activations MiB | params+grads+Adam MiB | total MiB "
          "| CUDA peak MiB |\n|---:|---|---|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for k in keys:
        model = models[k][0]
        n = sum(p.numel() for p in model.parameters())
        state = 4 * n * 4 / 2**20
        act = statistics.median(m[0] for m in mem[k]) / 2**20
        cuda_peak = statistics.median(m[1] for m in mem[k]) / 2**20
        rows[k] = (n, statistics.median(times[k]), act, state, cuda_peak)
        print(f"| {k[0]} | {'on' if k[1] else 'off'} | {k[2]} | {n:,} | {rows[k][1]:.3f} | {act:.1f} | {state:.1f} "
              f"| {act + state:.1f} | {f'{cuda_peak:.1f}' if cuda_peak else '-'} |")
    print("\nFPDM / DiT (time: median of the per-round ratios)\n\n| width | grad. ckpt | parameters | step time "
          "| activation memory | total training memory | CUDA peak |\n|---:|---|---:|---:|---:|---:|---:|")
    for w in widths:
        for ck in (True, False):
            d, f = rows[(w, ck, "DiT")], rows[(w, ck, "FPDM")]
            ratio_t = statistics.median(a / b for a, b in zip(times[(w, ck, "FPDM")], times[(w, ck, "DiT")]))
            peak = f"{f[4] / d[4]:.2f}x" if d[4] else "-"
            print(f"| {w} | {'on' if ck else 'off'} | {f[0] / d[0]:.2f}x | {ratio_t:.2f}x | {f[2] / d[2]:.2f}x "
                  f"| {(f[2] + f[3]) / (d[2] + d[3]):.2f}x | {peak} |")


# ----------------------------------------------------------------------------- 2. warm start vs scratch


def bench_warm_start(args):
    sys.path.insert(0, str(ROOT / "tests"))
    from fpdm_train_tiny import IMAGE_SIZE, make_images, make_vae

    from asyndm_fpdm.cli import main
    from asyndm_fpdm.fpdm.features import load_features
    from asyndm_fpdm.fpdm.loading import read_checkpoint
    from asyndm_fpdm.fpdm.config import TrainConfig
    from asyndm_fpdm.fpdm.train import build_model

    tmp = tempfile.mkdtemp(prefix="fpdm_warm_")
    images = make_images(os.path.join(tmp, "images"), classes=2, per_class=16)
    vae = make_vae(os.path.join(tmp, "vae"))
    feats = os.path.join(tmp, "feat")
    main(["fpdm", "features", "--images", images, "--vae", vae, "--out", feats, "--image-size", str(IMAGE_SIZE),
          "--flip", "--device", "cpu"])
    w = args.warm_width
    common = ["--features", feats, "--model", "DiT-S/2", "--hidden-size", str(w), "--num-heads", "4",
              "--global-batch-size", "16", "--lr", "1e-3", "--no-grad-checkpointing", "--log-every", "25",
              "--device", "cpu", "--engine", "torch", "--ckpt-every", "100000"]
    fp = ["--timestep-conditioning", "--no-grad-iters", "0", "2", "--with-grad-iters", "1", "2"]
    dit_run = os.path.join(tmp, "dit")
    t0 = time.perf_counter()
    main(["fpdm", "train", "--out", dit_run, "--no-fixed-point", "--depth", "6", "--steps", str(args.dit_steps), *common])
    dit_s = time.perf_counter() - t0
    dit_ckpt = os.path.join(dit_run, "checkpoints", f"{args.dit_steps:07d}.pt")
    runs = {}
    for name, extra in (("scratch", []), ("warm", ["--warm-start", dit_ckpt])):
        out = os.path.join(tmp, name)
        t0 = time.perf_counter()
        main(["fpdm", "train", "--out", out, "--steps", str(args.fpdm_steps), *common, *fp, *extra])
        runs[name] = (out, time.perf_counter() - t0)

    latents, labels, _ = load_features(feats)
    diffusion = make_diffusion(None)
    g = torch.Generator().manual_seed(123)
    n = len(latents)
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    xt = q_sample(diffusion, latents, t, noise)

    def held_out(path, fixed_point):
        import json

        sd, _, _ = read_checkpoint(path)  # "ema" preferred by the loader; this is the raw model
        ckpt = torch.load(path, weights_only=True)
        args_ = json.load(open(os.path.join(os.path.dirname(os.path.dirname(path)), "args.json")))
        model = build_model(TrainConfig.from_args(args_))
        model.load_state_dict(ckpt["model"])
        model.eval()
        with torch.no_grad():
            out = model(xt, t, labels, solver=stochastic_solver(0, 3) if fixed_point else None)
            return float(training_losses(diffusion, out, latents, xt, t, noise)["loss"].mean())

    import csv

    print(f"\n2. warm start vs scratch: FPDM width {w}, 1 pre + fixed point + 1 post, {args.fpdm_steps} steps each, "
          f"batch 16, lr 1e-3; the DiT (depth 6) trained {args.dit_steps} steps first ({dit_s:.0f}s)")
    print(f"{'run':<8} {'held-out loss':>14} {'train s':>8}  training loss every 25 steps")
    print(f"{'DiT':<8} {held_out(dit_ckpt, False):>14.4f} {dit_s:>8.0f}")
    for name, (out, secs) in runs.items():
        curve = [float(r["loss"]) for r in csv.DictReader(open(os.path.join(out, "metrics.csv")))]
        ckpt = os.path.join(out, "checkpoints", f"{args.fpdm_steps:07d}.pt")
        print(f"{name:<8} {held_out(ckpt, True):>14.4f} {secs:>8.0f}  " + " ".join(f"{c:.3f}" for c in curve))
    print(f"(held-out: {n} latents, one fixed draw of timesteps and noise, 3 fixed-point iterations)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="192,384", help="widths to compare (384 = DiT-S); heads = width / 64")
    p.add_argument("--depth", type=int, default=12, help="the DiT's depth (DiT-S: 12)")
    p.add_argument("--grid", type=int, default=16, help="latent size (32 = 256px images)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warm-width", type=int, default=64)
    p.add_argument("--dit-steps", type=int, default=400)
    p.add_argument("--fpdm-steps", type=int, default=150)
    p.add_argument("--skip", choices=["step", "warm"], default=None)
    args = p.parse_args(argv)
    if args.skip != "step":
        bench_step(args)
    if args.skip != "warm":
        bench_warm_start(args)


if __name__ == "__main__":
    main()
