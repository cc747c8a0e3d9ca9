"""Tiny random FPDM / DiT builders shared by the FPDM tests (fixed seeds, CPU, milliseconds)."""

import json
import os

import torch

from asyndm_fpdm.fpdm.model import DiT, FPDMConfig, init_random_

TINY = dict(hidden_size=32, patch_size=2, in_channels=4, num_heads=2, num_classes=10, input_size=8)


def tiny_config(fixed_point=True, **kw) -> FPDMConfig:
    base = dict(TINY, fixed_point=fixed_point, depth=3, pre_depth=1, post_depth=1, default_iterations=3)
    base.update(kw)
    return FPDMConfig(**base)


def tiny_model(fixed_point=True, seed=0, **kw) -> DiT:
    return init_random_(DiT(tiny_config(fixed_point, **kw)), seed).eval()


def train_args(cfg: FPDMConfig) -> dict:
    """What train.py's args.json would hold for this config (the fields we read)."""
    return {
        "model": "tiny",
        "num_classes": cfg.num_classes,
        "image_size": cfg.input_size * 8,
        "fixed_point": cfg.fixed_point,
        "fixed_point_pre_depth": cfg.pre_depth,
        "fixed_point_post_depth": cfg.post_depth,
        "fixed_point_pre_post_timestep_conditioning": cfg.pre_post_timestep_conditioning,
        "predict_v": cfg.prediction == "v",
        "use_zero_terminal_snr": cfg.zero_terminal_snr,
    }


def save_train_checkpoint(folder, model: DiT, ema: DiT = None, heads_in_args=True, with_args_json=True):
    """Lay out a train.py run: run/args.json and run/checkpoints/0000100.pt with model/ema/opt/args."""
    ckpt_dir = os.path.join(folder, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    args = train_args(model.config)
    sd = dict(model.state_dict())
    ema_sd = dict((ema or model).state_dict())
    # train.py state dicts carry the pos_embed buffer
    from asyndm_fpdm.fpdm.model import sincos_2d

    g = model.config.input_size // model.config.patch_size
    for d in (sd, ema_sd):
        d["pos_embed"] = sincos_2d(model.config.hidden_size, g, g)[None]
    ckpt = {"model": sd, "ema": ema_sd, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "train_steps": 100}
    path = os.path.join(ckpt_dir, "0000100.pt")
    torch.save(ckpt, path)
    if with_args_json:
        with open(os.path.join(folder, "args.json"), "w") as fh:
            json.dump(args, fh)
    return path


HEADS = {"num_heads": TINY["num_heads"]}
