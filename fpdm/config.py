"""The training configuration: one typed record shared by the CLI (its flags and defaults), ``train()``,
the checkpoint's ``args`` and the loader.

Checkpoints keep the reference train.py's ``args``: a plain dict under the reference's key names, so the
reference's tools and every loader path read them. ``REFERENCE_NAMES`` is the one mapping between our
field names and those keys (``to_args`` / ``from_args`` / ``reference_key`` use nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import List, Optional, Tuple

REFERENCE_NAMES = {  # field -> the reference train.py's args key (fields not listed keep their name)
    "pre_depth": "fixed_point_pre_depth",
    "post_depth": "fixed_point_post_depth",
    "timestep_conditioning": "fixed_point_pre_post_timestep_conditioning",
    "sampling_iterations": "fixed_point_iters",
    "zero_snr": "use_zero_terminal_snr",
    "seed": "global_seed",
    # (MIN, MAX) pairs: two keys each
    "no_grad_iters": ("fixed_point_no_grad_min_iters", "fixed_point_no_grad_max_iters"),
    "with_grad_iters": ("fixed_point_with_grad_min_iters", "fixed_point_with_grad_max_iters"),
}

# fields a resumed run must agree on (the network, and the optimizer whose state it reloads)
RESUME_FIELDS = ("model", "hidden_size", "depth", "num_heads", "patch_size", "fixed_point", "pre_depth", "post_depth",
               "timestep_conditioning", "predict_v", "zero_snr", "flow", "num_classes", "image_size", "optimizer")


def reference_key(name: str) -> str:
    """The args key of a (scalar) field."""
    key = REFERENCE_NAMES.get(name, name)
    if not isinstance(key, str):
        raise KeyError(f"{name} is stored as two keys: {key}")
    return key


@dataclass
class TrainConfig:
    """What `fpdm train` is asked to do (defaults: the reference's recipe), plus what the features tell."""

    features: str = ""
    out: str = ""
    model: str = "DiT-XL/2"
    hidden_size: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    fixed_point: bool = True
    pre_depth: int = 1
    post_depth: int = 1
    no_grad_iters: Tuple[int, int] = (0, 10)
    with_grad_iters: Tuple[int, int] = (1, 12)
    timestep_conditioning: bool = False
    sampling_iterations: Optional[int] = None
    predict_v: bool = False
    zero_snr: bool = False
    flow: bool = False
    num_classes: Optional[int] = None
    label_dropout: float = 0.1
    steps: int = 400_000
    global_batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    seed: int = 0
    grad_checkpointing: bool = True
    mixed_precision: str = "auto"
    engine: str = "auto"
    device: str = "auto"
    log_every: int = 100
    ckpt_every: int = 10_000
    log_with: List[str] = field(default_factory=lambda: ["csv"])
    resume: Optional[str] = None
    warm_start: Optional[str] = None
    # from the features folder (train() fills them in)
    image_size: Optional[int] = None
    latent_channels: Optional[int] = None
    latent_size: Optional[int] = None

    def to_args(self) -> dict:
        """The checkpoint's ``args``: the reference's key names, plain JSON values."""
        out = {}
        for f in fields(self):
            value, key = getattr(self, f.name), REFERENCE_NAMES.get(f.name, f.name)
            if isinstance(key, tuple):
                out.update(zip(key, (int(v) for v in value)))
            else:
                out[key] = list(value) if isinstance(value, (list, tuple)) else value
        return out

    @classmethod
    def from_args(cls, args: dict) -> "TrainConfig":
        """From a checkpoint's ``args`` (ours or the reference's): unknown keys are ignored, absent ones default."""
        kw = {}
        for f in fields(cls):
            key = REFERENCE_NAMES.get(f.name, f.name)
            if isinstance(key, tuple):
                if all(k in args for k in key):
                    kw[f.name] = tuple(int(args[k]) for k in key)
            elif key in args:
                kw[f.name] = list(args[key]) if f.name == "log_with" else args[key]
        return cls(**kw)

    def stored(self, args: dict) -> List[str]:
        """The fields whose reference keys ``args`` holds (what a checkpoint says about itself)."""
        out = []
        for f in fields(self):
            key = REFERENCE_NAMES.get(f.name, f.name)
            if all(k in args for k in (key if isinstance(key, tuple) else (key,))):
                out.append(f.name)
        return out
