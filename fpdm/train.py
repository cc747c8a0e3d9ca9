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
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np
import torch

from .. import distributed
from .config import RESUME_FIELDS, TrainConfig, reference_key
from .diffusion import make_diffusion, q_sample, training_losses
from .model import DiT, drop_labels, initialize_weights, model_config
from .solver import draw_iterations, stochastic_solver

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


# ----------------------------------------------------------------------------- model, config, randomness


def build_model(cfg: TrainConfig) -> DiT:
    overrides = {k: getattr(cfg, k) for k in ("hidden_size", "depth", "num_heads", "patch_size") if getattr(cfg, k)}
    net = model_config(cfg.model, fixed_point=bool(cfg.fixed_point), pre_depth=cfg.pre_depth, post_depth=cfg.post_depth,
                       pre_post_timestep_conditioning=bool(cfg.timestep_conditioning),
                       prediction="v" if cfg.predict_v else "eps", zero_terminal_snr=bool(cfg.zero_snr),
                       learn_sigma=not cfg.flow, num_classes=int(cfg.num_classes), in_channels=int(cfg.latent_channels),
                       input_size=int(cfg.latent_size), default_iterations=cfg.sampling_iterations, **overrides)
    if net.hidden_size % net.num_heads or net.hidden_size % 4:
        raise TrainError(f"hidden size {net.hidden_size} must be divisible by 4 and by the {net.num_heads} heads")
    if net.input_size % net.patch_size:
        raise TrainError(f"latent size {net.input_size} is not divisible by the patch size {net.patch_size}")
    return DiT(net)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW as the reference; plain SGD on request (its step is proportional to the gradient, which
    AdamW's scale invariance hides: the multi-process tests use it to see a summed gradient)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def validate(cfg: TrainConfig) -> None:
    if cfg.zero_snr and not cfg.predict_v:
        raise TrainError("zero terminal SNR needs v-prediction: add --predict-v (the reference refuses it with epsilon)")
    if cfg.flow and (cfg.predict_v or cfg.zero_snr):
        raise TrainError("--flow trains a velocity x0 - noise on a straight path: leave out --predict-v / --zero-snr")
    for key in ("global_batch_size", "steps"):
        if int(getattr(cfg, key)) < 1:
            raise TrainError(f"--{key.replace('_', '-')} must be >= 1")
    if cfg.fixed_point:
        try:
            draw_iterations(torch.Generator(), tuple(cfg.no_grad_iters), tuple(cfg.with_grad_iters))
        except ValueError as exc:
            raise TrainError(f"{exc} (--no-grad-iters / --with-grad-iters MIN MAX)") from None


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch, 1)))


def step_draws(cfg: TrainConfig, step: int, n: int, shape) -> dict:
    """Every random number of one training step, for the whole global batch (all ranks agree)."""
    g = torch.Generator().manual_seed(_seed(cfg.seed, step, 2))
    d = {"no_grad": 0, "with_grad": 0}
    if cfg.fixed_point:
        d["no_grad"], d["with_grad"] = draw_iterations(g, tuple(cfg.no_grad_iters), tuple(cfg.with_grad_iters))
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
    """``args``: the config's reference-named dict (``TrainConfig.to_args``)."""
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


@dataclass
class Session:
    """Everything a training run holds between steps (``setup`` makes it)."""

    cfg: TrainConfig
    engine: TorchEngine
    latents: torch.Tensor
    labels: torch.Tensor
    model: torch.nn.Module  # as the engine wraps it (DDP)
    net: DiT  # the bare network
    ema: DiT
    opt: torch.optim.Optimizer
    diffusion: object
    start: int
    logs: Optional["Logs"]

    @property
    def ctx(self) -> distributed.Context:
        return self.engine.ctx


def setup(cfg: TrainConfig) -> Session:
    """Features, derived settings, engine, model (fresh, resumed or warm-started), EMA, optimizer, logs."""
    from .features import load_features

    cfg = replace(cfg, log_with=list(cfg.log_with))
    latents, labels, manifest = load_features(cfg.features)
    cfg.num_classes = int(cfg.num_classes or manifest["num_classes"])
    cfg.image_size = int(manifest["image_size"])
    cfg.latent_channels, cfg.latent_size = int(manifest["latent_shape"][0]), int(manifest["latent_shape"][-1])
    if int(labels.max()) >= cfg.num_classes:
        raise TrainError(f"the features have labels up to {int(labels.max())} but --num-classes is {cfg.num_classes}")
    if cfg.fixed_point and not cfg.sampling_iterations:  # sampling default: the most seen in training
        cfg.sampling_iterations = cfg.no_grad_iters[1] + cfg.with_grad_iters[1]
    validate(cfg)
    engine = make_engine(cfg.engine, cfg.device, cfg.mixed_precision)
    ctx = engine.ctx
    G = int(cfg.global_batch_size)
    if G % ctx.world:
        raise TrainError(f"global batch size {G} is not divisible by the {ctx.world} processes")
    if G > len(latents):
        raise TrainError(f"global batch size {G} is larger than the dataset ({len(latents)} latents): lower "
                         "--global-batch-size or add images (--flip doubles them)")
    if ctx.is_main:
        print(f"fpdm train: engine {engine.name}, world size {ctx.world}, device {engine.device}, "
              f"per-process batch {G // ctx.world} (global {G})", flush=True)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    initialize_weights(model)
    start, ckpt, resume = 0, None, cfg.resume
    if resume == "auto":
        resume, ckpt = newest_readable_checkpoint(cfg.out, lambda msg: ctx.is_main and print(msg, file=sys.stderr, flush=True))
    elif resume:
        ckpt = read_training_checkpoint(resume)
    if ckpt is not None:
        saved_args = ckpt.get("args") or {}
        saved = TrainConfig.from_args(saved_args)  # absent optimizer: AdamW, as runs before --optimizer
        diff = [k for k in RESUME_FIELDS if (k in saved.stored(saved_args) or k == "optimizer")
                and getattr(saved, k) != getattr(cfg, k)]
        if diff:
            names = [reference_key(k) for k in diff]
            raise TrainError(f"--resume: {resume} was trained with other settings for {names} "
                             f"({', '.join(f'{n}={getattr(saved, k)!r}' for n, k in zip(names, diff))}): use the same "
                             "options or a new --out")
        start = int(ckpt["train_steps"])
    elif cfg.warm_start:
        from .warm_start import warm_start_from_dit

        warm_start_from_dit(model, cfg.warm_start)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    model.gradient_checkpointing = bool(cfg.grad_checkpointing)
    model.train()
    opt = make_optimizer(model.parameters(), cfg)
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
    logs = None
    if ctx.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "args.json"), "w") as fh:
            json.dump(cfg.to_args(), fh, indent=1)
        logs = Logs(cfg.out, cfg.to_args(), cfg.log_with, start)
    distributed.barrier()
    return Session(cfg, engine, latents, labels, model, engine.unwrap(model), ema, opt,
                   make_diffusion(None, zero_snr=bool(cfg.zero_snr)), start, logs)


def train_step(s: Session, step: int, order: torch.Tensor) -> Tuple[dict, dict]:
    """One optimizer step on this process's slice of the global batch ``step`` (``order``: the epoch's
    data order). -> (the loss terms as floats, the step's draws)."""
    cfg, ctx, G = s.cfg, s.ctx, int(s.cfg.global_batch_size)
    local = G // ctx.world
    lo, hi = ctx.rank * local, (ctx.rank + 1) * local
    b = step % (len(s.latents) // G)
    idx = order[b * G:(b + 1) * G][lo:hi]
    d = step_draws(cfg, step, G, s.latents.shape[1:])
    device = s.engine.device
    x0 = s.latents[idx].to(device)
    y = drop_labels(s.labels[idx], cfg.label_dropout, s.net.null_class, d["drop"][lo:hi]).to(device)
    t, noise = d["t"][lo:hi].to(device), d["noise"][lo:hi].to(device)
    xt = q_sample(s.diffusion, x0, t, noise, flow=bool(cfg.flow))
    solver = stochastic_solver(d["no_grad"], d["with_grad"]) if cfg.fixed_point else None
    with s.engine.autocast():
        out = s.model(xt, t, y, solver=solver)
    prediction = "v" if cfg.predict_v else "eps"
    terms = training_losses(s.diffusion, out.float(), x0, xt, t, noise, prediction, flow=bool(cfg.flow))
    loss = terms["loss"].mean()
    s.opt.zero_grad(set_to_none=True)
    s.engine.backward(loss)
    s.engine.step(s.opt)
    update_ema(s.ema, s.net, cfg.ema_decay)
    return {k: float(v.detach().mean()) for k, v in terms.items() if k in METRICS}, d


METRICS = ("loss", "mse", "vb", "flow")


class MetricWindow:
    """Loss terms summed since the last log row; ``row`` averages them over steps and processes."""

    def __init__(self):
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.sums, self.n, self.since = dict.fromkeys(METRICS, 0.0), 0, now

    def add(self, terms: dict) -> None:
        for k, v in terms.items():
            self.sums[k] += v
        self.n += 1

    def row(self, step: int, draws: dict, lr: float, t0: float) -> dict:
        stats = torch.tensor([self.sums[k] for k in METRICS], dtype=torch.float64) / self.n
        distributed.all_reduce_mean(stats)  # mean over processes = mean over the global batch
        now = time.perf_counter()
        row = {"step": step, "steps_per_sec": round(self.n / (now - self.since), 4), "no_grad_iters": draws["no_grad"],
               "with_grad_iters": draws["with_grad"], "lr": lr, "elapsed_s": round(now - t0, 2)}
        row.update({k: float(v) for k, v in zip(METRICS, stats) if self.sums[k] or k == "loss"})
        self.reset(now)
        return row


def train(cfg, progress: bool = True) -> dict:
    """Train as ``cfg`` (a TrainConfig, or a checkpoint-style args dict) says. Returns {"steps",
    "checkpoint", "losses"} on the main process (``losses``: the logged (step, loss) pairs of this call)."""
    if isinstance(cfg, dict):
        cfg = TrainConfig.from_args(cfg)
    s = setup(cfg)
    cfg, ctx = s.cfg, s.ctx
    from tqdm.auto import tqdm

    total, per_epoch = int(cfg.steps), len(s.latents) // int(cfg.global_batch_size)
    bar = tqdm(total=total, initial=s.start, desc="train", unit="step", disable=not (progress and ctx.is_main))
    window, t0, orders = MetricWindow(), time.perf_counter(), {}
    logged, path = [], None
    for step in range(s.start, total):
        epoch = step // per_epoch
        if epoch not in orders:
            orders = {epoch: epoch_order(cfg.seed, epoch, len(s.latents))}
        terms, draws = train_step(s, step, orders[epoch])
        window.add(terms)
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            row = window.row(done, draws, cfg.lr, t0)
            if s.logs:
                s.logs.write(row)
                logged.append((done, row["loss"]))
            bar.set_postfix(loss=f"{row['loss']:.4f}", steps_per_s=f"{row['steps_per_sec']:.2f}")
        bar.update(1)
        if done % cfg.ckpt_every == 0 or done == total:
            if ctx.is_main:
                path = save_checkpoint(cfg.out, s.net, s.ema, s.opt, cfg.to_args(), done)
            distributed.barrier()
    bar.close()
    if s.logs:
        s.logs.close()
    s.engine.finish()
    return {"steps": total, "checkpoint": path, "losses": logged}
