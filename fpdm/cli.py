"""``python -m asyndm_fpdm fpdm ...``: sample an FPDM/DiT checkpoint from the command line."""

from __future__ import annotations

import argparse
import os
import time


def add_parser(subparsers):
    p = subparsers.add_parser(
        "fpdm", help="sample a fixed point diffusion model (or plain DiT) checkpoint; `fpdm features` / `fpdm train` train one",
        description="Class-conditional sampling of an FPDM / DiT checkpoint (train.py .pt, raw state dict or "
                    ".safetensors). Writes PNGs through a local diffusers AutoencoderKL folder (--vae), else latents. "
                    "Sharded over processes under torchrun / accelerate launch. To make a checkpoint: "
                    "`fpdm features --help`, then `fpdm train --help`.")
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
    p.add_argument("--seed", type=int, default=0, help="image i draws all its noise from a generator seeded seed + i")
    p.add_argument("--batch-size", type=int, default=8, help="images per network batch (processes share the batches)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads, if args.json does not say")
    p.add_argument("--timestep-conditioning", choices=["on", "off"], default=None,
                   help="pre/post blocks get the timestep (train.py's fixed_point_pre_post_timestep_conditioning)")
    p.add_argument("--prediction", choices=["eps", "v"], default=None, help="if args.json does not say")
    p.add_argument("--zero-snr", choices=["on", "off"], default=None, help="if args.json does not say")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-mse) for PNG output")
    p.add_argument("--out", default="fpdm_samples", help="output folder")
    p.add_argument("--device", default="auto", help="torch device; auto = this process's GPU (cuda:LOCAL_RANK), else cpu")
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

    from .. import distributed
    from ..seeding import image_generators, per_image_randn
    from .classes import imagenet_classes, parse_classes
    from .loading import CheckpointError, load_fpdm
    from .pipeline import SampleOptions, generate
    from .solver import SolverSettings

    if args.batch_size < 1:
        raise SystemExit("error: --batch-size must be >= 1")
    ctx = distributed.init(args.device)
    device = ctx.device
    vae = load_vae(args.vae, device) if args.vae else None  # fail before the long part
    try:
        model, info = load_fpdm(args.checkpoint, _options(args), device=device)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}")
    labels = parse_classes(args.classes)
    bad = [c for c in labels if not 0 <= c < model.config.num_classes]
    if bad:
        raise SystemExit(f"error: classes {bad} are outside 0..{model.config.num_classes - 1}")
    size = (args.image_size or model.config.input_size * 8) // 8
    settings = SolverSettings(iterations=args.iterations, reuse=args.reuse, allocation=args.allocation,
                              tolerance=args.tolerance, anderson=args.anderson,
                              reference_double_count=args.reference_double_count)
    opts = SampleOptions(steps=args.steps, method=args.method, eta=args.eta, cfg_scale=args.cfg, guidance=args.guidance)
    names = imagenet_classes() if model.config.num_classes == 1000 else None
    stem = [f"{i:03d}--{c:03d}" + (f"--{names[c].lower().replace(' ', '-')}" if names else "") for i, c in enumerate(labels)]
    os.makedirs(args.out, exist_ok=True)
    # Work in fixed chunks of --batch-size images, dealt to the processes: a chunk is computed the same way
    # whatever the number of processes, and image i draws all its noise from its own generator (seed + i).
    chunks = [list(range(i, min(i + args.batch_size, len(labels)))) for i in range(0, len(labels), args.batch_size)]
    done, evaluations, allocated_sum = {}, 0, None
    t0 = time.perf_counter()
    for chunk in distributed.shard(chunks, ctx.rank, ctx.world):
        gens = image_generators(args.seed + chunk[0], len(chunk))
        shape = (len(chunk), model.config.in_channels, size, size)
        noise = per_image_randn(gens, shape).to(device)
        latents, fp_run = generate(model, [labels[i] for i in chunk], noise, opts, settings,
                                   step_noise=lambda k, shp: per_image_randn(gens, shp).to(device))
        if fp_run is not None:
            evaluations, allocated_sum = evaluations + fp_run.evaluations, sum(fp_run.allocated)
        if vae is None:
            done.update({i: lat for i, lat in zip(chunk, latents.float().cpu())})
            continue
        from PIL import Image

        with torch.no_grad():
            images = vae.decode(latents / vae.config.scaling_factor).sample
        images = torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()
        for i, img in zip(chunk, images):
            Image.fromarray(img).save(os.path.join(args.out, stem[i] + ".png"))
            done[i] = None
    took = time.perf_counter() - t0
    parts = distributed.gather_objects((done, evaluations, allocated_sum))
    if ctx.is_main:
        merged = {i: v for part in parts for i, v in part[0].items()}
        if vae is None:
            from safetensors.torch import save_file

            path = os.path.join(args.out, "latents.safetensors")
            stacked = torch.stack([merged[i] for i in range(len(labels))]).contiguous()
            save_file({"latents": stacked}, path, metadata={"classes": ",".join(map(str, labels))})
            print(f"wrote {path} (no --vae given: latents only, unscaled; decode with vae.decode(latents / 0.18215))")
        else:
            print(f"wrote {len(merged)} PNGs to {args.out}")
        msg = f"{len(labels)} image(s), {args.steps} steps, {took:.1f}s" + (f" on {ctx.world} processes" if ctx.world > 1 else "")
        if any(p[2] is not None for p in parts):
            total = sum(p[1] for p in parts)
            msg += (f"; fixed-point block evaluations per image: {total / len(labels):.0f} "
                    f"(allocation sum {next(p[2] for p in parts if p[2] is not None)}, CFG doubles it)")
        print(msg)
    distributed.finish()
    return 0


# ----------------------------------------------------------------------------- fpdm features / fpdm train

TOOLS = ("features", "train")


def tool_parser(tool: str) -> argparse.ArgumentParser:
    """``python -m asyndm_fpdm fpdm features|train``: their own parsers (``fpdm`` alone samples)."""
    prog = f"python -m asyndm_fpdm fpdm {tool}"
    if tool == "features":
        p = argparse.ArgumentParser(prog=prog, description=(
            "Cache VAE latents of an image folder for FPDM training: one sub-folder per class (or one class), "
            "ADM/DiT center crop, optional flipped copies, sharded safetensors + manifest.json. Resumable; "
            "data-parallel under torchrun / accelerate launch."))
        p.add_argument("--images", required=True, help="image folder: class sub-folders, or images directly (one class)")
        p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (e.g. a copy of stabilityai/sd-vae-ft-ema)")
        p.add_argument("--out", required=True, help="features folder to write (shards + manifest.json)")
        p.add_argument("--image-size", type=int, default=256, help="crop size in pixels (latents are size/8)")
        p.add_argument("--flip", action="store_true", help="also encode a horizontally flipped copy of every image")
        p.add_argument("--shard-size", type=int, default=1024, help="latents per shard file (the unit of resume)")
        p.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
        p.add_argument("--seed", type=int, default=0, help="latent draws use seed + image index")
        p.add_argument("--device", default="auto", help="auto = this process's GPU, else cpu")
        p.set_defaults(run=run_features)
        return p
    from .config import TrainConfig

    D = TrainConfig()  # the flags' defaults are the config's
    p = argparse.ArgumentParser(prog=prog, description=(
        "Train an FPDM (or a plain DiT) on cached latents: the reference's stochastic fixed-point training, learned "
        "sigma with the hybrid loss, EMA, AdamW. Checkpoints in the train.py format that the FPDM loader, the CLI and "
        "ComfyUI open. Multi-GPU / multi-node: the same command under `accelerate launch` or `torchrun`."))
    p.add_argument("--features", required=True, help="folder written by `fpdm features`")
    p.add_argument("--out", required=True, help="run folder: args.json, metrics.csv, checkpoints/NNNNNNN.pt")
    p.add_argument("--model", default=D.model, help="size from DiT's table: DiT-{S,B,L,XL}/{2,4,8}")
    p.add_argument("--hidden-size", type=int, default=None, help="custom width (overrides the table)")
    p.add_argument("--depth", type=int, default=None, help="custom depth of a plain DiT (overrides the table)")
    p.add_argument("--num-heads", type=int, default=None, help="custom attention heads (overrides the table)")
    p.add_argument("--patch-size", type=int, default=None, help="custom patch size (overrides the /N of --model)")
    p.add_argument("--fixed-point", action=argparse.BooleanOptionalAction, default=D.fixed_point,
                   help="FPDM (default) or, with --no-fixed-point, a plain DiT")
    p.add_argument("--pre-depth", type=int, default=D.pre_depth, help="explicit blocks before the fixed-point block")
    p.add_argument("--post-depth", type=int, default=D.post_depth, help="explicit blocks after it")
    p.add_argument("--no-grad-iters", type=int, nargs=2, default=D.no_grad_iters, metavar=("MIN", "MAX"),
                   help="fixed-point iterations without gradient, drawn per step from [MIN, MAX] (reference: 0 10)")
    p.add_argument("--with-grad-iters", type=int, nargs=2, default=D.with_grad_iters, metavar=("MIN", "MAX"),
                   help="iterations with gradient after them, drawn per step from [MIN, MAX] (reference: 1 12)")
    p.add_argument("--timestep-conditioning", action="store_true",
                   help="pre/post blocks see the timestep too (train.py's fixed_point_pre_post_timestep_conditioning)")
    p.add_argument("--sampling-iterations", type=int, default=None,
                   help="default fixed-point iterations when sampling (stored as fixed_point_iters; default no-grad max + with-grad max)")
    p.add_argument("--predict-v", action="store_true", help="v-prediction")
    p.add_argument("--zero-snr", action="store_true", help="zero-terminal-SNR schedule (needs --predict-v)")
    p.add_argument("--flow", action="store_true", help="the reference's flow-matching objective (no learned sigma)")
    p.add_argument("--num-classes", type=int, default=None, help="label count (default: from the features)")
    p.add_argument("--label-dropout", type=float, default=D.label_dropout, help="probability a label becomes the null class (guidance)")
    p.add_argument("--steps", type=int, default=D.steps, help="total training steps (a resumed run continues to this)")
    p.add_argument("--global-batch-size", type=int, default=D.global_batch_size, help="images per step over all processes")
    p.add_argument("--lr", type=float, default=D.lr, help="AdamW learning rate (constant, as the reference)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default=D.optimizer,
                   help="adamw (the reference) or plain SGD (its step is proportional to the gradient; used by tests)")
    p.add_argument("--weight-decay", type=float, default=D.weight_decay)
    p.add_argument("--ema-decay", type=float, default=D.ema_decay)
    p.add_argument("--seed", type=int, default=D.seed, help="global seed: data order, timesteps, noise, iteration counts")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=D.grad_checkpointing,
                   help="recompute explicit blocks in backward to save memory (the reference's default)")
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], default=D.mixed_precision,
                   help="auto = bf16 on GPUs that have it, else fp32")
    p.add_argument("--engine", choices=["auto", "accelerate", "torch"], default=D.engine,
                   help="auto = accelerate when installed, else torch.distributed")
    p.add_argument("--device", default=D.device, help="auto = this process's GPU, else cpu")
    p.add_argument("--log-every", type=int, default=D.log_every, help="metrics.csv row (and progress) every N steps")
    p.add_argument("--ckpt-every", type=int, default=D.ckpt_every, help="checkpoint every N steps (and at the end)")
    p.add_argument("--log-with", default=",".join(D.log_with), help="comma list: csv (always), tensorboard, wandb")
    p.add_argument("--resume", default=None, help="a training checkpoint, or 'auto' = the latest in --out")
    p.add_argument("--warm-start", default=None, help="initialise from a plain DiT checkpoint (see README: warm start)")
    p.set_defaults(run=run_train)
    return p


def run_features(args) -> int:
    from .. import distributed
    from .features import FeatureError, extract, write_manifest

    ctx = distributed.init(args.device)
    if ctx.is_main:
        print(f"fpdm features: world size {ctx.world}, device {ctx.device}", flush=True)
    try:
        vae = load_vae(args.vae, ctx.device)
        summary = extract(args.images, args.out, vae, args.image_size, args.flip, args.shard_size, args.batch_size,
                          args.seed, ctx.rank, ctx.world, progress=True)
        distributed.barrier()
        if ctx.is_main:
            m = write_manifest(args.images, args.out, args.vae, float(vae.config.scaling_factor), args.image_size,
                               args.flip, args.shard_size, args.seed)
            print(f"{m['count']} latents of {m['num_classes']} class(es) in {len(m['shards'])} shard(s) in {args.out} "
                  f"({len(summary.reused)} reused by this process)")
            for s in m["skipped"]:
                print(f"skipped (unreadable): {s['file']}: {s['error']}")
        distributed.finish()
    except FeatureError as exc:
        raise SystemExit(f"error: {exc}")
    return 0


def train_config(args):
    """CLI options -> the TrainConfig (the flags' dest names are its field names)."""
    from dataclasses import fields

    from .config import TrainConfig

    kw = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    kw["log_with"] = [k.strip() for k in args.log_with.split(",") if k.strip()]
    kw["no_grad_iters"], kw["with_grad_iters"] = tuple(args.no_grad_iters), tuple(args.with_grad_iters)
    return TrainConfig(**kw)


def run_train(args) -> int:
    from .features import FeatureError
    from .loading import CheckpointError
    from .train import TrainError, train

    try:
        result = train(train_config(args))
    except (TrainError, FeatureError, CheckpointError) as exc:
        raise SystemExit(f"error: {exc}")
    if result.get("checkpoint"):
        print(f"trained to step {result['steps']}; checkpoint {result['checkpoint']}")
    return 0
