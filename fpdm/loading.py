"""Safe checkpoint loading for FPDM and plain DiT.

Nothing here can execute code from a file: ``.safetensors`` are plain tensors and pickles are
opened with ``torch.load(weights_only=True)``, which refuses anything but tensors and
containers of primitives. The architecture comes from tensor shapes; what shapes cannot tell
(heads, pre/post timestep conditioning, v-prediction, zero-SNR) from explicit options, the
``args`` dict train.py stores in its checkpoints, or an ``args.json`` beside the file (or
one folder up: train.py writes it to the run folder, checkpoints to run/checkpoints/).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from typing import Optional, Tuple

import torch

from .config import reference_key
from .model import DIT_CONFIGS, DiT, FPDMConfig

PREFIXES = ("module.", "_orig_mod.", "model.diffusion_model.")
IGNORED_KEYS = ("pos_embed",)  # fixed sin-cos table; we regenerate it for every grid
_HEADS_BY_HIDDEN = {hidden: heads for _, hidden, heads in DIT_CONFIGS.values()}


class CheckpointError(ValueError):
    """A file that is not a usable FPDM/DiT checkpoint, with what is wrong and how to fix it."""


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: str) -> Tuple[dict, Optional[dict], str]:
    """-> (state dict, args stored in the file or None, which entry was used)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        sd, meta = {}, {}
        with safe_open(path, framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            for key in fh.keys():
                sd[key] = fh.get_tensor(key)
        args = json.loads(meta["args"]) if "args" in meta else None
        return _strip_prefixes(sd), args, "safetensors"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {os.path.basename(path)}: it is a pickle that contains objects other than "
            f"tensors (such a file can run code when opened). Re-save its state dict with torch.save(model."
            f"state_dict()) or as .safetensors. Detail: {str(exc).splitlines()[0]}"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"could not read {os.path.basename(path)} as a torch checkpoint: {exc}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{os.path.basename(path)} holds a {type(obj).__name__}, not a state dict")
    args = obj.get("args") if isinstance(obj.get("args"), dict) else None
    for entry in ("ema", "model", "state_dict"):  # train.py: prefer the EMA weights
        if isinstance(obj.get(entry), dict):
            return _strip_prefixes(obj[entry]), args, entry
    tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not tensors:
        raise CheckpointError(
            f"{os.path.basename(path)} has no 'ema', 'model' or 'state_dict' entry and no tensors "
            f"(top-level keys: {sorted(obj)[:10]})"
        )
    return _strip_prefixes(tensors), args, "raw"


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for p in PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def find_args_json(path: str) -> Optional[dict]:
    folder = os.path.dirname(os.path.abspath(path))
    for candidate in (os.path.join(folder, "args.json"), os.path.join(os.path.dirname(folder), "args.json")):
        if os.path.isfile(candidate):
            with open(candidate) as fh:
                return json.load(fh)
    return None


# ----------------------------------------------------------------------------- inference


def _count(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def infer_config(sd: dict, args: Optional[dict] = None, options: Optional[dict] = None) -> Tuple[FPDMConfig, dict]:
    """Architecture from shapes, the rest from options > args. -> (config, where each came from)."""
    args, options = dict(args or {}), {k: v for k, v in (options or {}).items() if v is not None}
    source = {}
    try:
        w = sd["x_embedder.proj.weight"]
        hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
        out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
        classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
        fixed_point = "block_fixed_point.attn.qkv.weight" in sd
        block = "block_fixed_point." if fixed_point else "blocks.0."
        mlp_ratio = sd[block + "mlp.fc1.weight"].shape[0] / hidden
    except KeyError as exc:
        raise CheckpointError(
            f"this does not look like a DiT/FPDM state dict: key {exc} is missing "
            f"(first keys: {sorted(sd)[:8]})"
        ) from None
    if args.get("flow"):
        raise CheckpointError("this checkpoint was trained with the flow-matching objective (args flow=True); the "
                              "pack's samplers (DDPM/DDIM, ComfyUI's DiT schedule) serve diffusion checkpoints only: "
                              "train without --flow to sample it here")
    if "y_embedder.embedding_projection.weight" in sd:
        raise CheckpointError("continuous-label (DINO-supervised) checkpoints are not supported")
    grid = int(round((sd["pos_embed"].shape[1]) ** 0.5)) if "pos_embed" in sd else int(args.get("image_size", 256)) // 8 // patch
    cfg = FPDMConfig(hidden_size=hidden, patch_size=patch, in_channels=in_ch, mlp_ratio=mlp_ratio,
                     num_classes=classes, learn_sigma=(out == 2 * in_ch), input_size=grid * patch,
                     fixed_point=fixed_point, depth=_count(sd, "blocks."),
                     pre_depth=_count(sd, "blocks_pre."), post_depth=_count(sd, "blocks_post."))
    if out not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"final layer gives {out} channels for {in_ch} input channels")

    # heads: option > args 'model' name (e.g. DiT-XL/2) > the DiT family's size table
    name = str(options.get("model") or args.get("model") or "")
    if "num_heads" in options:
        cfg.num_heads, source["num_heads"] = int(options["num_heads"]), "option"
    elif args.get("num_heads"):  # our training writes it (custom sizes)
        cfg.num_heads, source["num_heads"] = int(args["num_heads"]), "args num_heads"
    elif name.split("/")[0] in DIT_CONFIGS:
        cfg.num_heads, source["num_heads"] = DIT_CONFIGS[name.split("/")[0]][2], f"args model {name}"
    elif hidden in _HEADS_BY_HIDDEN:
        cfg.num_heads, source["num_heads"] = _HEADS_BY_HIDDEN[hidden], f"DiT size table (hidden {hidden})"
    else:
        raise CheckpointError(
            f"cannot tell the number of attention heads of a hidden size {hidden} model: put train.py's "
            f"args.json beside the checkpoint or set num_heads (heads option)"
        )
    if hidden % cfg.num_heads:
        raise CheckpointError(f"hidden size {hidden} is not divisible by num_heads={cfg.num_heads}")

    missing = []

    def pick(field, arg_key, convert, required):
        if field in options:
            source[field] = "option"
            return convert(options[field])
        if arg_key in args:
            source[field] = "args"
            return convert(args[arg_key])
        if required:
            missing.append(field)
        return None

    pptc = pick("pre_post_timestep_conditioning", reference_key("timestep_conditioning"), bool, fixed_point)
    v = pick("prediction", reference_key("predict_v"), lambda a: ("v" if a is True or a == "v" else "eps"), fixed_point)
    zsnr = pick("zero_terminal_snr", reference_key("zero_snr"), bool, fixed_point)
    if missing:
        raise CheckpointError(
            "this FPDM checkpoint does not say " + ", ".join(missing) + ". Put the args.json that train.py "
            "wrote beside the checkpoint (or in its parent folder), or set these options explicitly "
            "(train.py defaults: pre_post_timestep_conditioning=False, prediction='eps', zero_terminal_snr=False)."
        )
    cfg.pre_post_timestep_conditioning = bool(pptc) if pptc is not None else False
    cfg.prediction = v or "eps"
    cfg.zero_terminal_snr = bool(zsnr) if zsnr is not None else False
    if cfg.zero_terminal_snr and cfg.prediction != "v":
        raise CheckpointError("zero terminal SNR needs v-prediction (the reference refuses it with epsilon)")
    its = options.get("iterations") or args.get(reference_key("sampling_iterations"))
    cfg.default_iterations = int(its) if its else None
    if "num_classes" in args and int(args["num_classes"]) != classes:
        raise CheckpointError(f"args.json says {args['num_classes']} classes, the weights have {classes}")
    return cfg, source


# ----------------------------------------------------------------------------- building


def build_model(sd: dict, cfg: FPDMConfig, dtype=torch.float32, device="cpu") -> DiT:
    model = DiT(cfg)
    sd = {k: v for k, v in sd.items() if k not in IGNORED_KEYS}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:12]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:12]}")
        if wrong:
            parts.append("wrong shapes: " + ", ".join(f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in wrong[:6]))
        raise CheckpointError(
            "checkpoint does not match the inferred " + ("FPDM" if cfg.fixed_point else "DiT") + " architecture — "
            + "; ".join(parts) + ". Is this a complete train.py / DiT checkpoint?"
        )
    model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_fpdm(path: str, options: Optional[dict] = None, dtype=torch.float32, device="cpu"):
    """Load a checkpoint -> (model, info). ``options`` overrides anything from args."""
    sd, args, entry = read_checkpoint(path)
    file_args = find_args_json(path)
    merged = {**(file_args or {}), **(args or {})}
    cfg, source = infer_config(sd, merged, options)
    model = build_model(sd, cfg, dtype=dtype, device=device)
    info = {"entry": entry, "args_json": file_args is not None, "args_in_file": args is not None,
            "source": source, "config": cfg.to_dict()}
    return model, info
