"""What the diffusion-transformer backends (Flux, SD3's MMDiT) share (DESIGN.md, "Backend protocol", Transformers).

A transformer's tokens are its pixels: a token is one patch of the latent, and the timestep
enters every block through adaLN modulation computed from one conditioning vector per image.
Per-token timesteps therefore need, per forward, the vector of every distinct (image, timestep)
pair of the call (a handful, never one per token: invariant 6), each block's modulation Linear
applied to those rows, and the rows gathered per token.

Token grid: the plan itself lives on the token grid. The sampler builds its SigmaPlan with
``cell = patch size`` (a patch follows the share of it a mask covers: masks.cell_coverage), so the pixels of
one patch always share one sigma: the timestep the transformer sees for a token and the sigma
``calculate_denoised`` uses for each of its pixels (CONST: x − σ·v per pixel; its input scaling
is the identity) are the same. Should a patch ever carry several sigmas (a caller that builds
its own plan), the token takes its top-left pixel's timestep, the convention of the UNet's
strided feature maps (pixel_math.strided_index).

The families (comfy_flux.py, comfy_mmdit.py, ...) implement the backend protocol (protocol.py)
with these helpers: the time embedder on the rows (``time_rows``), modulation rows gathered per
token (``per_token``; ``Modulation`` and ``Gathered`` hand them to a stock block that has no replace
patch) and the attention read's kernel where it recomputes the normaliser (``joint_item_attention``;
the read itself: attention_read.py). Text tokens keep the stock per-image vector, whose timestep is the
image's passed sigma: the background's.
"""

from typing import List

import torch

from .comfy_call import Forward
from .pixel_math import take_rows

__all__ = ["Gathered", "Modulation", "joint_item_attention", "keep_token_maps", "middle_blocks", "per_token",
           "time_rows", "token_rows"]


def middle_blocks(depth: int, count: int = 3) -> List[int]:
    """``count`` consecutive blocks centred in the stack: early blocks still see mostly noise and
    layout, the last ones specialise on output detail; the middle joint blocks attend most
    selectively to the prompt's nouns (DESIGN.md, "Backend protocol": masks from a few middle blocks)."""
    count = max(1, min(count, depth))
    start = max(0, (depth - count) // 2)
    return list(range(start, start + count))


def joint_item_attention(q, k_txt, k_img, weights, block=1024, mask=None):
    """q (b, H, Nq, d), k_txt (b, H, Lt, d), k_img (b, H, Li, d), weights (Lt, N) → (b, Nq, N):
    the head-averaged probability each image query gives each item's text tokens in the *joint*
    softmax over [text | image] keys, as the model attends (float32); ``mask``: the attention's
    mask over those keys in that order (additive, or boolean: True attends), broadcastable to
    (b, H, Nq, Lt + Li).

    One fused attention (``scaled_dot_product_attention``) whose values are the items' token
    weights, zero on the image keys: its output is exactly that probability mass, normaliser
    included, and the flash / memory-efficient kernels never build the attention matrix. The values
    are padded to the head size (CPU flash wants v as wide as q), items in groups of d; ``block``
    queries at a time. A bfloat16 / float16 model's q / k are read in that precision (output within
    its rounding, 0.4% for bfloat16), others in float32. Where no fused kernel takes the call, the
    math kernel runs on query blocks sized to hold at most 64 MB of logits. One read costs about one attention of the block (3-4×
    less than a per-head logsumexp at 4096 image tokens)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    b, heads, nq, d = q.shape
    # a half-precision model's q / k are read in its own precision (the fused kernels accumulate in
    # float32 and round the output once; GPU flash kernels take only half precision), else float32
    dt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    k = torch.cat([k_txt, k_img], dim=2).to(dt)
    w = weights.to(q.device, torch.float32)
    top = w.abs().amax(dim=0).clamp_min(1e-30)  # values scaled to at most 1 (an item's equal weights: exactly 1)

    if mask is not None and mask.is_floating_point():
        mask = mask.to(dt)

    def part(m, s, size):
        return m if m is None or m.shape[-2] == 1 else m[..., s:s + size, :]

    def read(v, n, size, scale):
        return torch.cat([sdpa(q[:, :, s:s + size].to(dt), k, v, attn_mask=part(mask, s, size))[..., :n].float()
                          .mean(dim=1) * scale for s in range(0, nq, size)], dim=1)

    math_block = max(1, min(block, (1 << 24) // max(1, b * heads * k.shape[2])))  # 64 MB of float32 logits
    groups = []
    for i in range(0, w.shape[1], d):
        n = min(d, w.shape[1] - i)
        scale = top[i:i + n]
        v = k.new_zeros(1, 1, k.shape[2], d)
        v[..., :w.shape[0], :n] = w[:, i:i + n] / scale
        v = v.expand(b, heads, -1, -1)
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                              SDPBackend.CUDNN_ATTENTION]):
                groups.append(read(v, n, block, scale))
        except RuntimeError:  # no fused kernel for these inputs: bounded blocks of the math kernel
            groups.append(read(v, n, math_block, scale))
    return torch.cat(groups, dim=-1)


def token_rows(fwd: Forward, rows_out: torch.Tensor, stock: torch.Tensor, before=0, after: int = 0):
    """Modulation rows (R, K) → (table, index): the rows, and the (Bm, before + n_img + after) row of
    every token. Image tokens read their (image, timestep) row; the ``before`` (text) and ``after``
    (reference-image) tokens keep the stock per-image value ``stock`` (Bm, K), the background's,
    appended as row R + b. ``before`` may differ per image (a list: captions of their own lengths,
    the shorter sequences padded at the end)."""
    bm, n = fwd.tokens.shape
    starts = [before] * bm if isinstance(before, int) else list(before)
    length = max(starts) + n + after
    table = rows_out.to(stock.dtype)
    if length == n:
        return table, fwd.tokens
    return torch.cat([table, stock.reshape(bm, -1)]), fwd.token_index(starts, length)


def per_token(fwd: Forward, rows_out: torch.Tensor, stock: torch.Tensor, before=0, after: int = 0,
              parts: int = 1):
    """Modulation rows (R, K) gathered per token (``token_rows``) → (Bm, L, K). With ``parts`` > 1
    the K channels come back as that many contiguous (Bm, L, K/parts) tensors (shift, scale, gate...),
    so the block's elementwise modulation reads dense memory rather than strided chunk views.
    One gather per part: the per-token path costs one pass over the modulation tensor."""
    table, index = token_rows(fwd, rows_out, stock, before, after)
    if parts == 1:
        return take_rows(table, index)
    return Gathered(table, index).chunk(parts)


class Modulation:
    """What a stock block reads from its modulation module, in place of the per-image output, where
    its parts differ in kind (HiDream's double blocks: the image's per token, ``Gathered``, the
    text's per image): the per-image broadcast ``out[:, None]`` is the identity, ``chunk(k)`` returns
    the given parts."""

    def __init__(self, *parts):
        self.parts = parts

    def __getitem__(self, index):
        return self

    def chunk(self, chunks, dim=-1):
        if chunks != len(self.parts):
            raise RuntimeError(f"AsynDM: a block read {chunks} modulation parts, expected {len(self.parts)}")
        return self.parts


class Gathered:
    """A per-token modulation (Bm, L, K) held as its rows (R + Bm, K) and every token's row (Bm, L)
    (``token_rows``), for stock block code that reads the per-image modulation (Bm, K): its per-image
    broadcasts (``out[:, None]``, ``.unsqueeze(1)``) are the identity, its splits (``chunk``) and the
    maps a block applies to a modulation alone (``1 + scale``, ``tanh``) run on the rows, and any
    other torch operation (a product, ``addcmul``) gathers it first. So a part costs one gather
    where it is used, like the stock broadcast, and no (Bm, L, K) modulation outlives its use."""

    def __init__(self, rows, index):
        self.rows, self.index = rows, index

    def __getitem__(self, item):
        return self

    def unsqueeze(self, dim):
        return self

    def chunk(self, chunks, dim=-1):  # the channels: the last axis of the rows
        return [Gathered(r, self.index) for r in self.rows.chunk(chunks, dim=-1)]

    def tanh(self):
        return Gathered(self.rows.tanh(), self.index)

    def __radd__(self, number):  # 1 + scale (a tensor on the left is torch's: __torch_function__)
        return Gathered(number + self.rows, self.index)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.chunk:
            return args[0].chunk(*args[1:], **(kwargs or {}))

        def real(a):
            return take_rows(a.rows, a.index) if isinstance(a, Gathered) else a

        return func(*map(real, args), **{k: real(v) for k, v in (kwargs or {}).items()})


def time_rows(fwd: Forward, of=None):
    """A forward hook (``with_kwargs=True``) for a time embedder: beside its stock call, the same
    module on the distinct rows' timesteps (``of``: the model's map of ComfyUI's timestep, e.g.
    NextDiT's 1 − t), its other arguments and dtype as the stock call's, kept as ``fwd.time``."""
    def hook(module, args, kwargs, output):
        t = fwd.uniq_t if of is None else of(fwd.uniq_t)
        fwd.time = module.forward(t.to(args[0].device, args[0].dtype), *args[1:], **kwargs)

    return hook


def keep_token_maps(fwd: Forward, maps: torch.Tensor) -> None:
    """The captured rows' (b, h·w, N) item probabilities on the token grid → the call's maps
    (b, N, h, w), placed in the full grid for an area crop."""
    h, w = fwd.grid
    maps = maps.view(len(fwd.capture_rows), h, w, -1).permute(0, 3, 1, 2)
    fwd.call.maps.append(fwd.place_maps(maps, fwd.cell))
