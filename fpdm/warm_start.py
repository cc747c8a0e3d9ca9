"""Warm start: initialise an FPDM from a plain DiT checkpoint (e.g. the public DiT-XL/2-256), then fine-tune.

Which DiT layers go where (a choice, documented here and in the README):
- embedders (patch, timestep, label) and the final layer: copied;
- ``blocks_pre``: DiT's first ``pre_depth`` blocks; ``blocks_post``: its last ``post_depth`` blocks;
- the fixed-point block: DiT's middle block among the rest (index pre + (depth - pre - post) // 2).
- The injection projection starts as an exact identity on the iterate: fc1 = [[I, 0], [-I, 0]],
  fc2 = [I, -I], because GELU(x) - GELU(-x) = x (exactly, for the tanh approximation too); the
  injection enters fc1 with zero weight and ``block_pre_projection`` is the identity, so the injection
  starts silent but carries the pre-block output, and gradients reach its fc1 columns from step one.

So before fine-tuning, the FPDM with k iterations is DiT's pre blocks, its middle block applied k
times, and its post blocks: with k = 1 exactly the DiT truncated to those blocks, when the pre/post
blocks see the timestep as DiT's do (train with ``--timestep-conditioning``; without it they start
from DiT weights but see the class only, and fine-tuning has more to adapt). Parts whose shapes
differ (another class count, learned sigma on/off) keep their fresh initialisation and are reported.
"""

from __future__ import annotations

import re

import torch

from .loading import CheckpointError, read_checkpoint
from .model import DiT

SHARED = ("x_embedder.", "t_embedder.", "y_embedder.", "final_layer.")


def _dit_depth(sd: dict) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def fixed_point_source_block(depth: int, pre: int, post: int) -> int:
    return pre + (depth - pre - post) // 2


@torch.no_grad()
def warm_start_from_dit(model: DiT, path: str) -> dict:
    """Fill ``model`` from the DiT checkpoint at ``path`` (loaded safely). Returns what was taken/left."""
    sd, _args, _entry = read_checkpoint(path)
    if "block_fixed_point.attn.qkv.weight" in sd:
        raise CheckpointError(f"{path} is already an FPDM checkpoint: continue it with --resume (training checkpoint) "
                              "or warm-start from a plain DiT")
    depth = _dit_depth(sd)
    if depth == 0:
        raise CheckpointError(f"{path} has no DiT blocks (blocks.0...): --warm-start needs a plain DiT checkpoint")
    own = model.state_dict()
    cfg = model.config
    mapping = {k: k for k in sd if k.startswith(SHARED)}
    if cfg.fixed_point:
        if cfg.pre_depth + cfg.post_depth + 1 > depth:
            raise CheckpointError(f"the DiT has {depth} blocks, too few for {cfg.pre_depth} pre + 1 fixed-point + "
                                  f"{cfg.post_depth} post blocks")
        middle = fixed_point_source_block(depth, cfg.pre_depth, cfg.post_depth)
        sources = {**{f"blocks_pre.{i}.": f"blocks.{i}." for i in range(cfg.pre_depth)},
                   **{f"blocks_post.{i}.": f"blocks.{depth - cfg.post_depth + i}." for i in range(cfg.post_depth)},
                   "block_fixed_point.": f"blocks.{middle}."}
        for dst, src in sources.items():
            mapping.update({dst + k[len(src):]: k for k in sd if k.startswith(src)})
    else:
        if depth != cfg.depth:
            raise CheckpointError(f"the DiT has {depth} blocks, the model to train {cfg.depth}: use --depth {depth}")
        mapping.update({k: k for k in sd if k.startswith("blocks.")})
    taken, left = [], []
    for dst, src in mapping.items():  # state_dict tensors share the parameters' storage: copy_ fills the model
        if dst in own and own[dst].shape == sd[src].shape:
            own[dst].copy_(sd[src].to(own[dst].dtype))
            taken.append(dst)
        elif dst in own:
            left.append(f"{dst} {tuple(sd[src].shape)} -> {tuple(own[dst].shape)}")
    if "x_embedder.proj.weight" not in taken:
        raise CheckpointError(f"{path}'s patch embedding does not fit this model ({left[:2]}): match --model / "
                              "--hidden-size / --patch-size to the DiT")
    if cfg.fixed_point:
        d = cfg.hidden_size
        eye = torch.eye(d)
        fc1 = torch.zeros(2 * d, 2 * d)
        fc1[:d, :d], fc1[d:, :d] = eye, -eye
        model.block_fixed_point_projection_fc1.weight.copy_(fc1)
        model.block_fixed_point_projection_fc1.bias.zero_()
        model.block_fixed_point_projection_fc2.weight.copy_(torch.cat([eye, -eye], dim=1))
        model.block_fixed_point_projection_fc2.bias.zero_()
        model.block_pre_projection.weight.copy_(eye)
        model.block_pre_projection.bias.zero_()
        return {"taken": len(taken), "left": left, "depth": depth, "fixed_point_block": middle}
    return {"taken": len(taken), "left": left, "depth": depth}
