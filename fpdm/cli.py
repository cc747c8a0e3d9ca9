"""``python -m asyndm_fpdm fpdm ...``: sample an FPDM/DiT checkpoint from the command line."""

from __future__ import annotations

import argparse
import os
import time


def add_parser(subparsers):
    p = subparsers.add_parser(
        "fpdm", help="sample a fixed point diffusion model (or plain DiT) checkpoint",
        description="Class-conditional sampling of an FPDM / DiT checkpoint (train.py .pt, raw state dict or "
                    ".safetensors). Writes PNGs through a local diffusers AutoencoderKL folder (--vae), else latents.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file; args.json beside it (or one folder up) is read")
    p.add_argument("--classes", default="207", help="comma-separated ImageNet classes (indices or names), one per image")
    p.add_argument("--steps", type=int, default=50, help="respaced sampling steps (reference: 250)")
    p.add_argument("--method", choices=["ddpm", "ddim"], default="ddpm", help="ddpm = learned-variance ancestral (reference default)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale (1 = off)")
    p.add_argument("--guidance", choices=["reference", "standard"], default="reference",
                   help="reference = CFG on the first 3 channels (as the reference samples); standard = all channels")
    p.add_argument("--iterations", type=int, default=None, help="fixed-point iterations per step (default: 28 - pre - post)")
    p.add_argument("--reuse", action="store_true", help="reuse the previous step's fixed-point solution")
    p.add_argument("--allocation", choices=["fixed", "increasing", "decreasing"], default="fixed",
                   help="spread steps x iterations over the steps (increasing = more at the noisy start, as the reference names it)")
    p.add_argument("--tolerance", type=float, default=0.0, help="stop a step's iterations once the relative residual is below this")
    p.add_argument("--anderson", type=int, default=0, help="Anderson acceleration history (0 = off)")
    p.add_argument("--reference-double-count", action="store_true", help="spend the budget like the reference sampler (asks twice per step)")
    p.add_argument("--image-size", type=int, default=None, help="image size in pixels (latent = size/8); default: the training size")
    p.add_argument("--seed", type=int, default=0, help="image i uses noise seed + i")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads, if args.json does not say")
    p.add_argument("--timestep-conditioning", choices=["on", "off"], default=None,
                   help="pre/post blocks get the timestep (train.py's fixed_point_pre_post_timestep_conditioning)")
    p.add_argument("--prediction", choices=["eps", "v"], default=None, help="if args.json does not say")
    p.add_argument("--zero-snr", choices=["on", "off"], default=None, help="if args.json does not say")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-mse) for PNG output")
    p.add_argument("--out", default="fpdm_samples", help="output folder")
    p.add_argument("--device", default="cpu", help="torch device")
    p.set_defaults(run=run)
    return p


def _options(args) -> dict:
    opts = {"num_heads": args.num_heads, "prediction": args.prediction}
    if args.timestep_conditioning:
        opts["pre_post_timestep_conditioning"] = args.timestep_conditioning == "on"
    if args.zero_snr:
        opts["zero_terminal_snr"] = args.zero_snr == "on"
    return opts


def load_vae(path: str, device="cpu"):
    """A local diffusers AutoencoderKL folder, or a clear error."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"error: --vae {path!r} is not a diffusers AutoencoderKL folder (config.json + weights), e.g. a "
                         "local copy of stabilityai/sd-vae-ft-mse. Leave --vae out to write latents only.")
    from diffusers.models import AutoencoderKL

    return AutoencoderKL.from_pretrained(path).to(device).eval()


def run(args) -> int:
    import torch

    from ..seeding import seeded_noise
    from .classes import imagenet_classes, parse_classes
    from .loading import CheckpointError, load_fpdm
    from .pipeline import SampleOptions, generate
    from .solver import SolverSettings

    vae = load_vae(args.vae, args.device) if args.vae else None  # fail before the long part
    try:
        model, info = load_fpdm(args.checkpoint, _options(args), device=args.device)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}")
    labels = parse_classes(args.classes)
    bad = [c for c in labels if not 0 <= c < model.config.num_classes]
    if bad:
        raise SystemExit(f"error: classes {bad} are outside 0..{model.config.num_classes - 1}")
    size = (args.image_size or model.config.input_size * 8) // 8
    noise = seeded_noise(args.seed, (len(labels), model.config.in_channels, size, size)).to(args.device)
    settings = SolverSettings(iterations=args.iterations, reuse=args.reuse, allocation=args.allocation,
                              tolerance=args.tolerance, anderson=args.anderson,
                              reference_double_count=args.reference_double_count)
    opts = SampleOptions(steps=args.steps, method=args.method, eta=args.eta, cfg_scale=args.cfg, guidance=args.guidance)
    t0 = time.perf_counter()
    latents, fp_run = generate(model, labels, noise, opts, settings, generator=torch.Generator().manual_seed(args.seed))
    took = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    names = imagenet_classes() if model.config.num_classes == 1000 else None
    stem = [f"{i:03d}--{c:03d}" + (f"--{names[c].lower().replace(' ', '-')}" if names else "") for i, c in enumerate(labels)]
    if vae is None:
        from safetensors.torch import save_file

        path = os.path.join(args.out, "latents.safetensors")
        save_file({"latents": latents.float().cpu().contiguous()}, path, metadata={"classes": ",".join(map(str, labels))})
        print(f"wrote {path} (no --vae given: latents only, unscaled; decode with vae.decode(latents / 0.18215))")
    else:
        from PIL import Image

        with torch.no_grad():
            images = vae.decode(latents / vae.config.scaling_factor).sample
        images = torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()
        for s, img in zip(stem, images):
            Image.fromarray(img).save(os.path.join(args.out, s + ".png"))
        print(f"wrote {len(images)} PNGs to {args.out}")
    msg = f"{len(labels)} image(s), {args.steps} steps, {took:.1f}s"
    if fp_run is not None:
        msg += (f"; fixed-point block evaluations per image: {fp_run.evaluations / len(labels):.0f} "
                f"(schedule sum {sum(fp_run.schedule)}, CFG doubles it)")
    print(msg)
    return 0
