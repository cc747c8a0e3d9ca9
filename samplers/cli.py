"""``python -m asyndm_fpdm asyn``: AsynDM with a local diffusers Stable Diffusion folder.

For every prompt it writes, per image j (names as the reference's base/base2/tgt):
  {j:05}_vanilla.png   all pixels on the scheduler's sigmas        (reference: _base)
  {j:05}_concave.png   DMconcave: all pixels on the concave curve  (reference: _base2)
  {j:05}_asyn.png      AsynDM                                      (reference: _tgt)
  {j:05}_compare.png   the generated modes side by side
  {j:05}_masks.png     AsynDM's item masks at a few steps (rows: items)
  {j:05}_timesteps.png AsynDM's per-pixel timestep maps at the same steps (white = 1000)
and prompts.json (the prompt of every image) and progress.json (finished batches, for --resume).
"""

import json
import os
import sys

MODES = {"vanilla": "vanilla", "concave": "concave", "asyn": "asyn"}


class CliError(Exception):
    pass


def add_parser(sub):
    from .pixel_samplers import SAMPLERS
    from .schedulers import SCHEDULERS

    p = sub.add_parser(
        "asyn",
        help="AsynDM sampling with a local diffusers Stable Diffusion folder",
        description="Vanilla / DMconcave / AsynDM images side by side, with masks and timestep maps.",
    )
    p.add_argument("--model", required=True, help="local diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    p.add_argument("--prompt", help="the prompt (or use --prompt-file)")
    p.add_argument("--targets", help="prompt words that lag and their strengths, e.g. 'rabbit:0.7, basketball:0.7'")
    p.add_argument("--item-idx", type=int, nargs="+", help="reference style: word indices of the items (0 = first word)")
    p.add_argument("--item-k", type=float, nargs="+", help="reference style: strength k of each --item-idx item")
    p.add_argument("--prompt-file", help="reference format: a JSON list of prompts")
    p.add_argument("--item-file", help="reference format: JSON {'item_idx': {prompt: [...]}, 'item_k': {prompt: [...]}}")
    p.add_argument("--negative", default="", help="negative prompt (the reference uses '')")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim",
                   help="per-pixel sampler (default ddim, the paper's)")
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default="paper",
                   help="sigma schedule of the background (default paper: DDIM leading timesteps ending at 0)")
    p.add_argument("--eta", type=float, default=None,
                   help="noise of ddim and the ancestral/SDE samplers (default 1.0, the reference's; 0 = deterministic)")
    p.add_argument("--curve", choices=["bin", "lin", "exp"], default="bin")
    p.add_argument("--mask", choices=["dynamic", "static"], default="dynamic")
    p.add_argument("--mask-thr", type=float, default=1.0, help="mask threshold as a multiple of the mean attention")
    p.add_argument("--capture-stride", "--attn-fraction", dest="capture_stride", type=int, default=4,
                   help="read the masks' attention from the layers whose grid is latent/N (--attn-fraction: "
                        "its former name)")
    p.add_argument("--modes", default="vanilla,concave,asyn", help="comma list of vanilla, concave, asyn")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-batches", type=int, default=1, help="batches per prompt")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--out", default="outputs/asyn")
    p.add_argument("--resume", action="store_true", help="skip batches already finished in --out")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    try:
        return _run(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def load_pipeline(folder, device, dtype):
    if not os.path.isdir(folder):
        raise CliError(f"model folder not found: {folder}. Give a local diffusers Stable Diffusion folder (with model_index.json).")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise CliError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json). Expected model_index.json, unet/, vae/, "
            "text_encoder/, tokenizer/ and scheduler/; for a single .safetensors checkpoint use the ComfyUI nodes."
        )
    import torch
    from diffusers import DiffusionPipeline

    try:
        kwargs = {} if dtype == torch.float32 else {"torch_dtype": dtype}
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None, **kwargs)
    except Exception as e:  # diffusers raises many types for broken folders
        raise CliError(f"could not load the pipeline in {folder}: {e}") from None
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise CliError(f"{folder} has no {part}: AsynDM needs a Stable Diffusion pipeline (SD1.x/SD2.x)")
    if getattr(pipe, "tokenizer_2", None) is not None:
        raise CliError(
            f"{folder} is an SDXL pipeline: the CLI encodes SD1.x/SD2.x prompts. For SDXL use the ComfyUI nodes, "
            "or the Python API (asyn_generate with added_cond=...)."
        )
    return pipe.to(device)


def jobs_from_args(args):
    """[(prompt, [(word_or_None, positions_or_None, k)])] in the order they are generated."""
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts = json.load(f)
    elif args.prompt:
        prompts = [args.prompt]
    else:
        raise CliError("give --prompt or --prompt-file")
    item_file = None
    if args.item_file:
        with open(args.item_file) as f:
            item_file = json.load(f)
    jobs = []
    for prompt in prompts:
        if item_file is not None:
            if prompt not in item_file.get("item_idx", {}):
                raise CliError(f"--item-file has no entry for the prompt {prompt!r}")
            items = [(None, [i + 1], k) for i, k in zip(item_file["item_idx"][prompt], item_file["item_k"][prompt])]
        elif args.targets:
            from .tokens import parse_targets

            items = [(w, None, k) for w, k in parse_targets(args.targets)]
        elif args.item_idx:
            ks = args.item_k or [0.7] * len(args.item_idx)
            if len(ks) != len(args.item_idx):
                raise CliError("--item-k needs one strength per --item-idx")
            items = [(None, [i + 1], k) for i, k in zip(args.item_idx, ks)]
        else:
            raise CliError("name the prompt's key objects with --targets 'word:k, ...' (or --item-idx/--item-k)")
        jobs.append((prompt, items))
    return jobs


def _run(args) -> int:
    import torch
    from tqdm import tqdm

    from ..seeding import seeded_noise
    from .api import asyn_generate, token_positions
    from .images import chosen_steps, grid, map_to_pil, to_pil
    from .tokens import UnknownWordError

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise CliError(f"unknown mode(s) {bad}: use vanilla, concave, asyn")
    from .pixel_samplers import ETA_SAMPLERS

    if args.eta is None:
        args.eta = 1.0 if args.sampler in ETA_SAMPLERS else 0.0
    elif args.eta and args.sampler not in ETA_SAMPLERS:
        raise CliError(f"--sampler {args.sampler} takes no --eta: drop it, or use one of {', '.join(ETA_SAMPLERS)}")
    jobs = jobs_from_args(args)
    from .. import distributed  # under torchrun / accelerate launch: this process's share of the batches

    ctx = distributed.init(args.device)
    device = ctx.device
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = load_pipeline(args.model, device, dtype)
    tok = pipe.tokenizer
    os.makedirs(args.out, exist_ok=True)
    progress_path = os.path.join(args.out, "progress.json")
    prompts_path = os.path.join(args.out, "prompts.json")
    done = set()
    prompts_log = []
    if args.resume and os.path.exists(progress_path):
        with open(progress_path) as f:
            done = set(json.load(f))
        if os.path.exists(prompts_path):
            with open(prompts_path) as f:
                prompts_log = json.load(f)

    def encode(texts):
        ids = tok(texts, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids.to(device))[0]

    latent_size = (args.size // pipe.vae_scale_factor) if args.size else pipe.unet.config.sample_size
    sched_cfg = dict(pipe.scheduler.config)
    total = len(jobs) * args.num_batches
    batches = tqdm(distributed.shard(range(total), ctx.rank, ctx.world), desc="batches", disable=total == 1)
    for idx in batches:
        prompt, items = jobs[idx // args.num_batches]
        first_image = idx * args.batch_size
        if str(idx) in done:
            continue
        resolved = []
        for word, positions, k in items:
            if positions is None:
                try:
                    positions = token_positions(tok, prompt, word)
                except UnknownWordError as e:
                    raise CliError(str(e)) from None
            resolved.append((positions, k))
        cond = encode([prompt] * args.batch_size)
        uncond = encode([args.negative] * args.batch_size)
        seed = args.seed + (idx % args.num_batches) * args.batch_size  # the reference's per-prompt seeds
        shape = (args.batch_size, pipe.unet.config.in_channels, latent_size, latent_size)
        latents = seeded_noise(seed, shape, device).to(dtype)
        images, results = {}, {}
        for mode in modes:
            bar = tqdm(total=args.steps, desc=mode, leave=False)
            res = asyn_generate(
                pipe.unet, sched_cfg, cond, uncond, items=resolved, latents=latents,
                seed=seed, steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler, scheduler=args.scheduler,
                eta=args.eta, curve=args.curve,
                mode=MODES[mode], mask_source=args.mask, mask_thr=args.mask_thr, capture_stride=args.capture_stride,
                callback=lambda *a: bar.update(1),
            )
            bar.close()
            with torch.no_grad():
                decoded = pipe.vae.decode(res.latents.to(dtype) / pipe.vae.config.scaling_factor).sample
            images[mode] = [to_pil(d) for d in decoded]
            results[mode] = res
        for b in range(args.batch_size):
            j = first_image + b
            for mode in modes:
                images[mode][b].save(os.path.join(args.out, f"{j:05}_{mode}.png"))
            grid([images[m][b] for m in modes], cols=len(modes)).save(os.path.join(args.out, f"{j:05}_compare.png"))
            if "asyn" in results:
                res = results["asyn"]
                steps = chosen_steps(args.steps)
                if res.masks[0] is not None:
                    n = res.masks[0].shape[1]
                    tiles = [map_to_pil(res.masks[s][b, i], size=128) for i in range(n) for s in steps]
                    grid(tiles, cols=len(steps)).save(os.path.join(args.out, f"{j:05}_masks.png"))
                tiles = [map_to_pil(res.timestep_maps[s][b], scale=1000.0, size=128) for s in steps]
                grid(tiles, cols=len(steps)).save(os.path.join(args.out, f"{j:05}_timesteps.png"))
            prompts_log += [None] * (j + 1 - len(prompts_log))
            prompts_log[j] = prompt
        done.add(str(idx))
        with open(prompts_path, "w") as f:
            json.dump(prompts_log, f, indent=1)
        with open(progress_path, "w") as f:
            json.dump(sorted(done, key=int), f)
        print(f"[{idx + 1}/{total}] {prompt!r} → {args.out}/{first_image:05}_*.png", file=sys.stderr)
    return 0


def main_args(argv) -> int:
    """Run ``asyn`` with a list of arguments (for the demo and scripts)."""
    import argparse

    parser = argparse.ArgumentParser(prog="asyn")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(parser.parse_args(["asyn", *argv]))
