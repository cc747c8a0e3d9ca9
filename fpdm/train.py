"""FPDM / DiT training (``python -m asyndm_fpdm fpdm train``), beside the model as DiT's train.py is.

One step, as the reference trains: a global batch of cached latents (``features.py``), timesteps
uniform in [0, 1000), x_t = q_sample(x0, t, noise), label dropout for guidance, the network with the
stochastic fixed-point solver (no-grad iterations drawn from [min, max], then with-grad iterations
drawn from [min, max]), the hybrid loss (``diffusion.training_losses``), AdamW, EMA.

Data-parallel and exact: every random draw of a step (the data order of each epoch, timesteps, noise,
label dropout, iteration counts) is made for the whole global batch from a generator seeded by
(seed, step); each process takes its slice. So N processes compute the same step as one process with
the same global batch (up to float round-off in the gradient average), and ``--resume`` from step k
repeats the uninterrupted run exactly (the checkpoint holds model, EMA, optimizer and step).

Engines: accelerate when installed (``--engine accelerate``; mixed precision, device placement, DDP)
or torch.distributed DDP (``--engine torch``). Both run under ``torchrun`` and ``accelerate launch``
(they read the launcher's RANK/WORLD_SIZE); gloo on CPU, NCCL on GPUs.

Checkpoints are the reference train.py's format (``model``, ``ema``, ``opt``, ``args``, ``train_steps``;
``args`` a plain dict with the reference's key names) in ``OUT/checkpoints/NNNNNNN.pt`` with
``OUT/args.json``, so ``load_fpdm``, the sampling CLI and the ComfyUI loader open them as they are.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import os
import pickle
import sys
import time
from typing import Optional, Tuple

import numpy as np
import torch

from .. import distributed
from .diffusion import make_schedule, q_sample, training_losses
from .model import DiT, drop_labels, initialize_weights, model_config
from .solver import draw_iterations, stochastic_solver

# args that define the network: a resumed run must agree on them
ARCH_KEYS = ("model", "hidden_size", "depth", "num_heads", "patch_size", "fixed_point", "fixed_point_pre_depth",
             "fixed_point_post_depth", "fixed_point_pre_post_timestep_conditioning", "predict_v",
             "use_zero_terminal_snr", "flow", "num_classes", "image_size")
CSV_FIELDS = ("step", "loss", "mse", "vb", "flow", "steps_per_sec", "no_grad_iters", "with_grad_iters", "lr", "elapsed_s")


class TrainError(ValueError):
    """Bad training input, with what is wrong and how to fix it."""


# ----------------------------------------------------------------------------- engines


class TorchEngine:
    """torch.distributed + DistributedDataParallel (one process: plain torch)."""

    name = "torch"

    def __init__(self, device: str = "auto", mixed_precision: str = "no"):
        self.ctx = distributed.init(device)
        self.device = torch.device(self.ctx.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if mixed_precision == "fp16" else None

    def prepare(self, model, opt):
        model = model.to(self.device)
        if self.ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        return model, opt

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, opt):
        if self.scaler:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def unwrap(self, model):
        return getattr(model, "module", model)

    def finish(self):
        distributed.finish()


class AccelerateEngine(TorchEngine):
    """HF accelerate: it owns the process group, device placement, DDP and mixed precision."""

    name = "accelerate"

    def __init__(self, device: str = "auto", mixed_precision: str = "no"):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        # The launcher's environment says how many processes there are; CUDA's presence only picks the
        # device. accelerate without cpu=True on a machine without CUDA ignores WORLD_SIZE (one process each).
        launched = distributed.env_context(device)
        distributed.warn_lone_launch()
        self.acc = Accelerator(mixed_precision=mixed_precision, cpu=launched.device == "cpu",
                               kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
        check_world(launched.world, self.acc.num_processes, self.name)
        self.device = self.acc.device
        self.ctx = distributed.Context(self.acc.process_index, self.acc.num_processes, self.acc.local_process_index,
                                       str(self.device))
        self.scaler = None

    def prepare(self, model, opt):
        return self.acc.prepare(model, opt)

    def autocast(self):
        return self.acc.autocast()

    def backward(self, loss):
        self.acc.backward(loss)

    def step(self, opt):
        opt.step()

    def unwrap(self, model):
        return self.acc.unwrap_model(model)

    def finish(self):
        self.acc.wait_for_everyone()
        self.acc.end_training()
        distributed.finish()


def check_world(launched: int, engine_world: int, engine: str) -> None:
    """A launcher's world size the engine does not share would train N copies alone: refuse it."""
    if launched != engine_world:
        raise TrainError(f"the launcher started {launched} processes (WORLD_SIZE={launched}) but the {engine} engine "
                         f"runs {engine_world}: every process would train alone. Use --device auto (cpu with gloo "
                         "where there is no CUDA) or a device every process has, or --engine torch")


def make_engine(kind: str = "auto", device: str = "auto", mixed_precision: str = "auto"):
    if mixed_precision == "auto":  # where the device has it: bf16 on GPUs that support it
        mixed_precision = "bf16" if (device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()) else "no"
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise TrainError(f"mixed precision must be auto, no, bf16 or fp16, got {mixed_precision!r}")
    if kind == "auto":
        try:
            import accelerate  # noqa: F401

            kind = "accelerate"
        except ImportError:
            kind = "torch"
    if kind == "accelerate":
        try:
            return AccelerateEngine(device, mixed_precision)
        except ImportError:
            raise TrainError("--engine accelerate needs accelerate: pip install 'asyndm-fpdm[train]' "
                             "(or use --engine torch)") from None
    if kind == "torch":
        return TorchEngine(device, mixed_precision)
    raise TrainError(f"engine must be auto, accelerate or torch, got {kind!r}")


# ----------------------------------------------------------------------------- model, args, randomness


def build_model(args: dict) -> DiT:
    overrides = {k: args[k] for k in ("hidden_size", "depth", "num_heads", "patch_size") if args.get(k)}
    cfg = model_config(args["model"], fixed_point=bool(args["fixed_point"]), pre_depth=args["fixed_point_pre_depth"],
                       post_depth=args["fixed_point_post_depth"],
                       pre_post_timestep_conditioning=bool(args["fixed_point_pre_post_timestep_conditioning"]),
                       prediction="v" if args["predict_v"] else "eps", zero_terminal_snr=bool(args["use_zero_terminal_snr"]),
                       learn_sigma=not args["flow"], num_classes=int(args["num_classes"]),
                       in_channels=int(args["latent_channels"]), input_size=int(args["latent_size"]),
                       default_iterations=args.get("fixed_point_iters"), **overrides)
    if cfg.hidden_size % cfg.num_heads or cfg.hidden_size % 4:
        raise TrainError(f"hidden size {cfg.hidden_size} must be divisible by 4 and by the {cfg.num_heads} heads")
    if cfg.input_size % cfg.patch_size:
        raise TrainError(f"latent size {cfg.input_size} is not divisible by the patch size {cfg.patch_size}")
    return DiT(cfg)


def make_optimizer(params, args: dict) -> torch.optim.Optimizer:
    """AdamW as the reference; plain SGD on request (its step is proportional to the gradient, which
    AdamW's scale invariance hides: the multi-process tests use it to see a summed gradient)."""
    if args.get("optimizer", "adamw") == "sgd":
        return torch.optim.SGD(params, lr=args["lr"], weight_decay=args["weight_decay"])
    return torch.optim.AdamW(params, lr=args["lr"], weight_decay=args["weight_decay"])


def validate_args(args: dict) -> None:
    if args["use_zero_terminal_snr"] and not args["predict_v"]:
        raise TrainError("zero terminal SNR needs v-prediction: add --predict-v (the reference refuses it with epsilon)")
    if args["flow"] and (args["predict_v"] or args["use_zero_terminal_snr"]):
        raise TrainError("--flow trains a velocity x0 - noise on a straight path: leave out --predict-v / --zero-snr")
    for key in ("global_batch_size", "steps"):
        if int(args[key]) < 1:
            raise TrainError(f"--{key.replace('_', '-')} must be >= 1")
    if args["fixed_point"]:
        try:
            draw_iterations(torch.Generator(), (args["fixed_point_no_grad_min_iters"], args["fixed_point_no_grad_max_iters"]),
                            (args["fixed_point_with_grad_min_iters"], args["fixed_point_with_grad_max_iters"]))
        except ValueError as exc:
            raise TrainError(f"{exc} (--no-grad-iters / --with-grad-iters MIN MAX)") from None


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch, 1)))


def step_draws(args: dict, step: int, n: int, shape) -> dict:
    """Every random number of one training step, for the whole global batch (all ranks agree)."""
    g = torch.Generator().manual_seed(_seed(args["global_seed"], step, 2))
    d = {"no_grad": 0, "with_grad": 0}
    if args["fixed_point"]:
        d["no_grad"], d["with_grad"] = draw_iterations(
            g, (args["fixed_point_no_grad_min_iters"], args["fixed_point_no_grad_max_iters"]),
            (args["fixed_point_with_grad_min_iters"], args["fixed_point_with_grad_max_iters"]))
    d["t"] = torch.randint(0, 1000, (n,), generator=g)
    d["noise"] = torch.randn((n, *shape), generator=g)
    d["drop"] = torch.rand(n, generator=g)  # label dropout draws
    return d


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


# ----------------------------------------------------------------------------- checkpoints and logs


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def _checkpoints(out: str):
    """(step checkpoints oldest first, leftover .tmp files) in the run's checkpoint folder."""
    folder = checkpoint_dir(out)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return ([os.path.join(folder, f) for f in names if f.endswith(".pt") and f[:-3].isdigit()],
            [os.path.join(folder, f) for f in names if f.endswith(".tmp")])


def save_checkpoint(out: str, model, ema, opt, args: dict, step: int) -> str:
    path = os.path.join(checkpoint_dir(out), f"{step:07d}.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": dict(args),
                "train_steps": step}, tmp)
    os.replace(tmp, path)
    return path


def _try_read(path: str) -> Tuple[Optional[dict], str]:
    """(the training checkpoint, "") or (None, why ``path`` cannot be one)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return None, "it holds objects other than tensors (refused: such a file can run code when opened)"
    except Exception as exc:  # truncated, empty, not a torch file: torch's readers raise many kinds
        if os.path.getsize(path) == 0:
            return None, "it is empty (0 bytes)"
        return None, f"it is damaged or not a torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    if not isinstance(ckpt, dict):
        return None, f"it holds a {type(ckpt).__name__}, not a training checkpoint"
    missing = [k for k in ("model", "ema", "opt", "train_steps") if k not in ckpt]
    if missing:
        return None, (f"it lacks {missing}: resume needs a training checkpoint of `fpdm train` (model, ema, opt, "
                      "train_steps); to start from other weights use --warm-start")
    return ckpt, ""


def read_training_checkpoint(path: str) -> dict:
    """The checkpoint ``--resume FILE`` names, or one clear error that names the file and what to do."""
    if not os.path.isfile(path):
        raise TrainError(f"--resume: checkpoint not found: {path} (--resume auto takes the newest in --out)")
    ckpt, why = _try_read(path)
    if why:
        raise TrainError(f"--resume: cannot resume from {path}: {why}. Pass another checkpoint of the run, "
                         "--resume auto (the newest readable one in --out), or leave out --resume to start over")
    return ckpt


def newest_readable_checkpoint(out: str, warn) -> Tuple[Optional[str], Optional[dict]]:
    """``--resume auto``: the newest checkpoint in ``out`` that reads, warning about each one skipped and
    about leftovers of an interrupted save; (None, None) when the run has none yet."""
    paths, leftovers = _checkpoints(out)
    for tmp in leftovers:
        warn(f"warning: ignoring {tmp}: an interrupted save left it (the next save of that step replaces it)")
    for path in reversed(paths):
        ckpt, why = _try_read(path)
        if ckpt is not None:
            return path, ckpt
        warn(f"warning: --resume auto skips {path}: {why}")
    if paths:
        raise TrainError(f"--resume auto: no checkpoint in {checkpoint_dir(out)} can be read (see the warnings): "
                         "move them away to start over, or use a new --out")
    return None, None


class Logs:
    """metrics.csv always; TensorBoard and W&B when asked (main process only)."""

    def __init__(self, out: str, args: dict, kinds, resume_step: int):
        self.path = os.path.join(out, "metrics.csv")
        rows = []
        if resume_step and os.path.isfile(self.path):  # drop what a crashed run logged after the checkpoint
            with open(self.path) as fh:
                rows = [r for r in csv.DictReader(fh) if (r.get("step") or "").isdigit() and int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as fh:
            w = csv.DictWriter(fh, CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.tb = self.wandb = None
        if "tensorboard" in kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainError("--log-with tensorboard needs tensorboard: pip install 'asyndm-fpdm[train]'") from None
            self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if "wandb" in kinds:
            try:
                import wandb
            except ImportError:
                raise TrainError("--log-with wandb needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project="fpdm", name=os.path.basename(os.path.abspath(out)), config=args, resume="allow")

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})
        scalars = {f"train/{k}": v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb:
            self.wandb.log(scalars, step=row["step"])

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


# ----------------------------------------------------------------------------- the loop


def train(args: dict, progress: bool = True) -> dict:
    """Train as ``args`` says (the CLI's options as a dict). Returns {"steps", "checkpoint", "losses"}
    on the main process (``losses``: the logged (step, loss) pairs of this call)."""
    from .features import load_features

    args = dict(args)
    latents, labels, manifest = load_features(args["features"])
    args.setdefault("num_classes", None)
    args["num_classes"] = int(args["num_classes"] or manifest["num_classes"])
    args["image_size"] = int(manifest["image_size"])
    args["latent_channels"], args["latent_size"] = int(manifest["latent_shape"][0]), int(manifest["latent_shape"][-1])
    if int(labels.max()) >= args["num_classes"]:
        raise TrainError(f"the features have labels up to {int(labels.max())} but --num-classes is {args['num_classes']}")
    if args["fixed_point"] and not args.get("fixed_point_iters"):  # sampling default: the most seen in training
        args["fixed_point_iters"] = args["fixed_point_no_grad_max_iters"] + args["fixed_point_with_grad_max_iters"]
    validate_args(args)
    engine = make_engine(args["engine"], args["device"], args["mixed_precision"])
    ctx = engine.ctx
    G = int(args["global_batch_size"])
    if G % ctx.world:
        raise TrainError(f"global batch size {G} is not divisible by the {ctx.world} processes")
    if G > len(latents):
        raise TrainError(f"global batch size {G} is larger than the dataset ({len(latents)} latents): lower "
                         "--global-batch-size or add images (--flip doubles them)")
    local = G // ctx.world
    out = args["out"]
    if ctx.is_main:
        print(f"fpdm train: engine {engine.name}, world size {ctx.world}, device {engine.device}, "
              f"per-process batch {local} (global {G})", flush=True)

    torch.manual_seed(args["global_seed"])
    model = build_model(args)
    initialize_weights(model)
    start, ckpt = 0, None
    resume = args.get("resume")
    if resume == "auto":
        resume, ckpt = newest_readable_checkpoint(out, lambda msg: ctx.is_main and print(msg, file=sys.stderr, flush=True))
    elif resume:
        ckpt = read_training_checkpoint(resume)
    if ckpt is not None:
        saved = {"optimizer": "adamw", **(ckpt.get("args") or {})}  # runs before --optimizer used AdamW
        diff = [k for k in (*ARCH_KEYS, "optimizer") if k in saved and saved.get(k) != args.get(k)]
        if diff:
            raise TrainError(f"--resume: {resume} was trained with other settings for {diff} "
                             f"({', '.join(f'{k}={saved[k]!r}' for k in diff)}): use the same options or a new --out")
        start = int(ckpt["train_steps"])
    elif args.get("warm_start"):
        from .warm_start import warm_start_from_dit

        warm_start_from_dit(model, args["warm_start"])
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    model.gradient_checkpointing = bool(args["grad_checkpointing"])
    model.train()
    opt = make_optimizer(model.parameters(), args)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
        except (RuntimeError, ValueError, KeyError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise TrainError(f"--resume: the weights in {resume} do not fit this model ({detail}): it is another "
                             "model's checkpoint; use that run's options (its args.json) or a new --out") from None
    model, opt = engine.prepare(model, opt)
    ema.to(engine.device)
    net = engine.unwrap(model)
    sched = make_schedule(None, zero_snr=bool(args["use_zero_terminal_snr"]))
    prediction = "v" if args["predict_v"] else "eps"
    null = net.null_class

    logs = None
    if ctx.is_main:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "args.json"), "w") as fh:
            json.dump(args, fh, indent=1)
        logs = Logs(out, args, args["log_with"], start)
    distributed.barrier()

    from tqdm.auto import tqdm

    total = int(args["steps"])
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not (progress and ctx.is_main))
    per_epoch = len(latents) // G
    order_cache = {}
    window = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "flow": 0.0, "n": 0}
    t_window, t0 = time.perf_counter(), time.perf_counter()
    logged, path = [], None
    lo, hi = ctx.rank * local, (ctx.rank + 1) * local
    for step in range(start, total):
        epoch, b = divmod(step, per_epoch)
        if epoch not in order_cache:
            order_cache = {epoch: epoch_order(args["global_seed"], epoch, len(latents))}
        idx = order_cache[epoch][b * G:(b + 1) * G][lo:hi]
        d = step_draws(args, step, G, latents.shape[1:])
        x0 = latents[idx].to(engine.device)
        y = drop_labels(labels[idx], args["label_dropout"], null, d["drop"][lo:hi]).to(engine.device)
        t, noise = d["t"][lo:hi].to(engine.device), d["noise"][lo:hi].to(engine.device)
        xt = q_sample(sched, x0, t, noise, flow=bool(args["flow"]))
        solver = stochastic_solver(d["no_grad"], d["with_grad"]) if args["fixed_point"] else None
        with engine.autocast():
            out_ = model(xt, t, y, solver=solver)
        terms = training_losses(sched, out_.float(), x0, xt, t, noise, prediction, flow=bool(args["flow"]))
        loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        engine.backward(loss)
        engine.step(opt)
        update_ema(ema, net, args["ema_decay"])

        for k in ("loss", "mse", "vb", "flow"):
            if k in terms:
                window[k] += float(terms[k].detach().mean())
        window["n"] += 1
        done = step + 1
        if done % args["log_every"] == 0 or done == total:
            stats = torch.tensor([window[k] for k in ("loss", "mse", "vb", "flow")], dtype=torch.float64) / window["n"]
            distributed.all_reduce_mean(stats)  # mean over processes = mean over the global batch
            now = time.perf_counter()
            row = {"step": done, "steps_per_sec": round(window["n"] / (now - t_window), 4),
                   "no_grad_iters": d["no_grad"], "with_grad_iters": d["with_grad"], "lr": args["lr"],
                   "elapsed_s": round(now - t0, 2)}
            row.update({k: float(v) for k, v in zip(("loss", "mse", "vb", "flow"), stats) if window[k] or k == "loss"})
            if logs:
                logs.write(row)
                logged.append((done, row["loss"]))
            bar.set_postfix(loss=f"{row['loss']:.4f}", steps_per_s=f"{row['steps_per_sec']:.2f}")
            window = {k: 0.0 for k in window}
            window["n"] = 0
            t_window = now
        bar.update(1)
        if done % args["ckpt_every"] == 0 or done == total:
            if ctx.is_main:
                path = save_checkpoint(out, net, ema, opt, args, done)
            distributed.barrier()
    bar.close()
    if logs:
        logs.close()
    engine.finish()
    return {"steps": total, "checkpoint": path, "losses": logged}
