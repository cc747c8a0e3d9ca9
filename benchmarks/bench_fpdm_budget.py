"""FPDM's compute-budget claims measured on a trained model: error of each iteration policy's samples
against a high-compute solution of the same noise, at several budgets of fixed-point block evaluations.

Data: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes; shipped inside the package, no
download; ``pip install scikit-learn``, needed by this benchmark only). Each digit (0..16) is scaled
to [-1, 1], upsampled to 16x16 (bilinear) and folded into a latent-shaped (4, 8, 8) tensor by a 2x2
space-to-depth (invertible: the samples unfold back to digit images), then standardised to unit
variance like the SD VAE's scaled latents. No further processing: the data is not tuned.

Models, trained here by the pack's own ``fpdm train`` (same recipe as the reference: no-grad
iterations from [0, 10], with-grad from [1, 12], hybrid loss, AdamW, EMA): an FPDM of width W
(1 pre + fixed-point block + 1 post, patch 2) and a plain DiT of the same width and depth 6, the
FPDM's per-step compute at 4 iterations (pre + 4 + post = 6 blocks): so 4 iterations per step is
the default budget here, as 26 = 28 - 1 - 1 is the reference's for DiT-XL's depth.

Sampling: 20 DDIM steps (eta 0: deterministic, so a policy's error is its own), class labels
i mod 10, no guidance. Error: |x - x*| / |x*| of the final latents over all samples, x* = the same
noise solved with 64 iterations per step (fixed, no reuse). Policies: fixed, increasing (more
iterations at the noisy start), decreasing, reuse (warm start from the previous step's solution),
reuse + increasing, Anderson (history 5), each at 1, 2, 3, 4, 6, 8 iterations per step; tolerance
(relative residual, at most 26 iterations per step) at several thresholds. "evals/image": block
evaluations per image actually spent. The evaluations a policy needs to reach fixed's error at the
default budget are read off its error curve by log-log interpolation between measured budgets.
"digit acc.": a logistic-regression digit classifier (fit on the data set) on the unfolded
samples: the share classified as the class they were sampled for (the samples have structure).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_fpdm_budget.py [--threads 2] [--quick]
    -> table on stdout, benchmarks/fpdm_budget.csv, benchmarks/fpdm_budget.png (error vs evaluations) and
       benchmarks/fpdm_budget_samples.png (data digits; FPDM at 64 and 4 iterations/step; the DiT)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_fpdm import _import_pack  # noqa: E402  (imports this checkout as asyndm_fpdm)

_import_pack()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from asyndm_fpdm.cli import main as cli  # noqa: E402
from asyndm_fpdm.fpdm.features import FORMAT, MANIFEST, shard_name  # noqa: E402
from asyndm_fpdm.fpdm.loading import load_fpdm  # noqa: E402
from asyndm_fpdm.fpdm.pipeline import SampleOptions, generate  # noqa: E402
from asyndm_fpdm.fpdm.solver import SolverSettings  # noqa: E402

DEFAULT_ITERS = 4  # the DiT's compute per step: depth 6 = 1 pre + 4 iterations + 1 post
POLICIES = {  # name -> SolverSettings fields besides iterations
    "fixed": {},
    "increasing": {"allocation": "increasing"},
    "decreasing": {"allocation": "decreasing"},
    "reuse": {"reuse": True},
    "reuse + increasing": {"reuse": True, "allocation": "increasing"},
    "Anderson (m=5)": {"anderson": 5},
}
TOLERANCES = (0.3, 0.1, 0.05, 0.02, 0.01, 0.005)


# ----------------------------------------------------------------------------- data


def digits():
    """-> (latents (N, 4, 8, 8) float32 with unit std, labels (N,), the scale used), and the raw digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # (N, 1, 8, 8) in [-1, 1]
    up = F.interpolate(img, size=(16, 16), mode="bilinear", align_corners=False)
    lat = F.pixel_unshuffle(up, 2)  # (N, 4, 8, 8)
    scale = float(1.0 / lat.std())
    return lat * scale, torch.tensor(d.target, dtype=torch.long), scale, d


def unfold(latents, scale):
    """Latents back to 8x8 digits on the data set's 0..16 scale."""
    up = F.pixel_shuffle(latents / scale, 2)
    return ((F.avg_pool2d(up, 2)[:, 0] + 1.0) * 8.0).clamp(0, 16)


def write_features(folder, latents, labels):
    """A features folder in the pack's format (what ``fpdm features`` writes), from ready latents."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({"latents": latents.contiguous(), "labels": labels.contiguous()}, os.path.join(folder, shard_name(0)),
              metadata={"files": "[]", "skipped": "[]"})
    manifest = {"format": FORMAT, "count": len(labels), "image_size": 64, "latent_shape": list(latents.shape[1:]),
                "scaling_factor": 1.0, "vae": "none: scikit-learn digits", "flip": False, "seed": 0,
                "classes": [str(c) for c in range(10)], "num_classes": 10, "shard_size": len(labels),
                "shards": [{"file": shard_name(0), "count": len(labels)}], "skipped": []}
    with open(os.path.join(folder, MANIFEST), "w") as fh:
        json.dump(manifest, fh)


def train(features, run, width, steps, batch, fixed_point):
    arch = (["--sampling-iterations", str(DEFAULT_ITERS)] if fixed_point
            else ["--no-fixed-point", "--depth", "6"])
    argv = ["fpdm", "train", "--features", features, "--out", run, "--model", "DiT-S/2", "--hidden-size", str(width),
            "--num-heads", "4", "--steps", str(steps), "--global-batch-size", str(batch), "--lr", "1e-3",
            "--ema-decay", "0.995", "--no-grad-checkpointing", "--log-every", str(max(steps // 10, 1)),
            "--ckpt-every", str(steps), "--device", "cpu", "--engine", "torch", *arch]
    t0 = time.perf_counter()
    cli(argv)
    with open(os.path.join(run, "metrics.csv")) as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh)]
    model, _ = load_fpdm(os.path.join(run, "checkpoints", f"{steps:07d}.pt"))  # the EMA weights
    return model.eval(), time.perf_counter() - t0, losses


# ----------------------------------------------------------------------------- measuring


def sample(model, noise, labels, steps, settings=None):
    opts = SampleOptions(steps=steps, method="ddim", eta=0.0, cfg_scale=1.0)
    lat, run = generate(model, labels, noise, opts, settings)
    return lat, (run.evaluations / noise.shape[0] if run is not None else 0.0)


def rel_error(x, ref):
    return float((x - ref).norm() / ref.norm())


def evals_to_reach(points, target):
    """Evaluations at which a policy's error curve (evals, error), log-log interpolated, reaches
    ``target``; None if it never does within the measured budgets."""
    pts = sorted(points)
    for (e0, r0), (e1, r1) in zip(pts, pts[1:]):
        if r0 >= target >= r1 and r0 > r1:
            w = (math.log(r0) - math.log(target)) / (math.log(r0) - math.log(r1))
            return math.exp(math.log(e0) + w * (math.log(e1) - math.log(e0)))
    if pts and pts[0][1] <= target:
        return pts[0][0]  # already there at the smallest budget measured: an upper bound
    return None


def digit_accuracy(classifier, latents, labels, scale):
    x = unfold(latents, scale).reshape(len(labels), -1).numpy()
    return float((classifier.predict(x) == labels.numpy()).mean())


# ----------------------------------------------------------------------------- output


def plot(path, curves, target, default_evals):
    """Error vs evaluations per image, log-log; matplotlib when installed, else drawn with PIL."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for name, pts in curves.items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
        ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.axvline(default_evals, color="grey", ls=":", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="fixed-point block evaluations per image",
               ylabel="relative error vs 64 iterations/step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
        return
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 760, 480, 70, 170, 20, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = [p[0] for pts in curves.values() for p in pts]
    ys = [p[1] for pts in curves.values() for p in pts if p[1] > 0]
    lx0, lx1 = math.log10(min(xs)), math.log10(max(xs))
    ly0, ly1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))

    def px(e, r):
        return (L + (math.log10(e) - lx0) / (lx1 - lx0) * (W - L - R),
                T + (ly1 - math.log10(max(r, 10 ** ly0))) / (ly1 - ly0) * (H - T - B))

    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(ly0, ly1 + 1):
        y = px(min(xs), 10 ** k)[1]
        d.line([L - 4, y, L, y], fill="black")
        d.text((8, y - 6), f"1e{k}", fill="black")
    for e in (20, 40, 80, 160, 320, 640):
        if min(xs) <= e <= max(xs):
            x = px(e, 10 ** ly0)[0]
            d.line([x, H - B, x, H - B + 4], fill="black")
            d.text((x - 10, H - B + 8), str(e), fill="black")
    d.text((L + 120, H - 22), "fixed-point block evaluations per image (log)", fill="black")
    d.text((L + 4, T + 4), "relative error vs 64 iterations/step (log)", fill="black")
    d.line([L, px(min(xs), target)[1], W - R, px(min(xs), target)[1]], fill=(150, 150, 150))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194)]
    for (name, pts), c in zip(curves.items(), colours):
        pts = [px(e, r) for e, r in sorted(pts)]
        d.line(pts, fill=c, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        k = list(curves).index(name)
        d.line([W - R + 10, T + 12 + 18 * k, W - R + 30, T + 12 + 18 * k], fill=c, width=3)
        d.text((W - R + 34, T + 6 + 18 * k), name, fill="black")
    img.save(path)


def digit_strip(path, rows, data_row, n=20, zoom=4):
    """The first ``n`` samples of each row as 8x8 digits (white on black), under a row of data digits."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(r[:n].float()), dim=1) for r in [data_row.float(), *rows]], dim=0)
    img = Image.fromarray((grid / 16 * 255).clamp(0, 255).byte().numpy())
    img.resize((img.width * zoom, img.height * zoom), Image.NEAREST).save(path)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=96, help="hidden size of both models")
    p.add_argument("--train-steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32, help="training batch")
    p.add_argument("--samples", type=int, default=40, help="images sampled per policy and budget")
    p.add_argument("--steps", type=int, default=20, help="DDIM sampling steps")
    p.add_argument("--budgets", default="1,2,3,4,6,8", help="iterations per step for the budgeted policies")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default=str(HERE / "fpdm_budget"), help="writes OUT.csv and OUT.png")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny training, few samples")
    args = p.parse_args(argv)
    if args.quick:
        args.train_steps, args.samples, args.budgets = 30, 8, "1,2,4"
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    t_start = time.perf_counter()
    latents, labels, scale, raw = digits()
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=2000).fit(raw.images.reshape(len(raw.images), -1), raw.target)

    with tempfile.TemporaryDirectory() as tmp:
        write_features(os.path.join(tmp, "features"), latents, labels)
        fpdm, t_fpdm, loss_fpdm = train(os.path.join(tmp, "features"), os.path.join(tmp, "fpdm"), args.width,
                                        args.train_steps, args.batch, True)
        dit, t_dit, loss_dit = train(os.path.join(tmp, "features"), os.path.join(tmp, "dit"), args.width,
                                     args.train_steps, args.batch, False)

    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(args.samples, 4, 8, 8, generator=g)
    y = [i % 10 for i in range(args.samples)]
    t0 = time.perf_counter()
    ref, _ = sample(fpdm, noise, y, args.steps, SolverSettings(iterations=64))
    dit_lat, _ = sample(dit, noise, y, args.steps)
    rows, curves = [], {}
    for name, extra in POLICIES.items():
        for b in budgets:
            lat, ev = sample(fpdm, noise, y, args.steps, SolverSettings(iterations=b, **extra))
            rows.append((name, f"{b}/step", ev, rel_error(lat, ref), digit_accuracy(classifier, lat, torch.tensor(y), scale)))
            curves.setdefault(name, []).append((ev, rows[-1][3]))
    for tol in TOLERANCES:
        lat, ev = sample(fpdm, noise, y, args.steps, SolverSettings(iterations=26, tolerance=tol))
        rows.append(("tolerance", f"{tol:g}", ev, rel_error(lat, ref), digit_accuracy(classifier, lat, torch.tensor(y), scale)))
        curves.setdefault("tolerance", []).append((ev, rows[-1][3]))
    t_sampling = time.perf_counter() - t0

    base = next(r for r in rows if r[0] == "fixed" and r[1] == f"{DEFAULT_ITERS}/step")
    target, base_evals = base[3], base[2]
    needs = {name: evals_to_reach(pts, target) for name, pts in curves.items()}
    total = time.perf_counter() - t_start

    print(f"\nFPDM width {args.width} (1 pre + fixed point + 1 post) and DiT width {args.width} depth 6, trained "
          f"{args.train_steps} steps on scikit-learn digits (loss {loss_fpdm[0]:.3f} -> {loss_fpdm[-1]:.3f} and "
          f"{loss_dit[0]:.3f} -> {loss_dit[-1]:.3f}); {args.samples} samples, {args.steps} DDIM steps, no guidance; "
          f"{torch.get_num_threads()} torch threads")
    print(f"digit acc.: FPDM at 64 iterations/step {digit_accuracy(classifier, ref, torch.tensor(y), scale):.2f}, "
          f"DiT {digit_accuracy(classifier, dit_lat, torch.tensor(y), scale):.2f} "
          f"(a classifier on the data set's own digits: {classifier.score(raw.images.reshape(len(raw.images), -1), raw.target):.2f})")
    print("\n| policy | budget | evals/image | rel. error | digit acc. |\n|---|---|---:|---:|---:|")
    for name, budget, ev, err, acc in rows:
        print(f"| {name} | {budget} | {ev:.0f} | {err:.4f} | {acc:.2f} |")
    print(f"\nevaluations per image to reach fixed's error at the default budget ({DEFAULT_ITERS}/step: "
          f"{base_evals:.0f} evals, error {target:.4f}):\n\n| policy | evals/image | fixed / policy |\n|---|---:|---:|")
    for name, ev in needs.items():
        print(f"| {name} | {'not reached' if ev is None else f'{ev:.0f}'} | "
              f"{'-' if ev is None else f'{base_evals / ev:.2f}x'} |")
    best = min((ev, name) for name, ev in needs.items() if ev is not None)
    verdict = "met" if best[0] <= base_evals / 2 else f"missed: {base_evals / best[0]:.3f}x < 2x"
    print(f"\nbest: {best[1]}, {base_evals / best[0]:.2f}x fewer evaluations than fixed at equal error "
          f"(target >= 2x: {verdict})")
    print(f"time: training FPDM {t_fpdm:.0f} s, DiT {t_dit:.0f} s, sampling {t_sampling:.0f} s, total {total:.0f} s")

    with open(args.out + ".csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["policy", "budget", "evals_per_image", "rel_error", "digit_accuracy"])
        w.writerows(rows)
    plot(args.out + ".png", curves, target, base_evals)
    fixed_default, _ = sample(fpdm, noise, y, args.steps, SolverSettings(iterations=DEFAULT_ITERS))
    digit_strip(args.out + "_samples.png", [unfold(x, scale) for x in (ref, fixed_default, dit_lat)],
                torch.stack([torch.tensor(raw.images[raw.target == c][0]) for c in y[:20]]))
    print(f"wrote {args.out}.csv, {args.out}.png and {args.out}_samples.png (rows: the data set's first digit of "
          f"each class, FPDM at 64 and at {DEFAULT_ITERS} iterations/step, DiT)")


if __name__ == "__main__":
    main()
