"""Per-pixel math every backend shares (plain torch).

- ``distinct_rows`` / ``gather_rows``: time embeddings are computed for the distinct
  (image, timestep) pairs of a call — a handful per step — and gathered per pixel, never an MLP
  per pixel (DESIGN.md invariant 6). A feature map at stride f takes the timestep of the
  top-left latent pixel of each f×f block, the reference's ``map[:, ::f, ::f]``.
- ``token_weights`` / ``item_attention``: the items' attention maps, softmax probabilities of
  the image queries over the text keys, averaged over heads and over each item's tokens.
- ``pick_capture_stride``: which attention resolution the masks are read from.
"""

from typing import Sequence

import torch


class UnsupportedModelError(ValueError):
    pass


def distinct_rows(t_map: torch.Tensor, per_image: bool):
    """t_map (B, H, W) → (timesteps (R,), image of each row (R,), row index (B, H, W)).

    With ``per_image`` a row is an (image, timestep) pair (per-image vectors such as SDXL's
    size embedding get added to it), else one row per distinct timestep.
    """
    uniq, inverse = torch.unique(t_map, return_inverse=True)
    if not per_image:
        return uniq, torch.zeros_like(uniq, dtype=torch.long), inverse
    # (image, timestep) pairs as one integer key: a 1-D unique (a row-wise unique is far slower)
    n = len(uniq)
    key = torch.arange(t_map.shape[0], device=t_map.device).view(-1, 1, 1) * n + inverse
    pairs, inverse = torch.unique(key, return_inverse=True)
    return uniq[pairs % n], pairs // n, inverse


def strided_index(index: torch.Tensor, stride: int, h: int = None, w: int = None) -> torch.Tensor:
    idx = index[:, ::stride, ::stride] if stride > 1 else index
    return idx[:, :h, :w] if h is not None else idx


def take_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows (R, D) and a row index of any shape (...) → (..., D): ``rows[index]`` through the
    embedding kernel, which copies whole rows (4× faster on a CPU than advanced indexing at 4096
    tokens × 3072 channels in bfloat16, where the gathers were most of a block's per-token cost)."""
    return torch.nn.functional.embedding(index, rows.contiguous())


def gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows (R, D) and a row index (B, h, w) → (B, D, h, w)."""
    return take_rows(rows, index).permute(0, 3, 1, 2)


def token_weights(positions: Sequence[Sequence[int]], length: int, context_len: int, device=None) -> torch.Tensor:
    """(L, N): 1/len(item) on each item's token positions. ComfyUI repeats a shorter context to a
    common length when it batches cond and uncond; every repeat of a token counts (their
    probabilities add up to the token's share)."""
    w = torch.zeros(length, len(positions), device=device)
    reps = max(length // max(context_len, 1), 1)
    for j, item in enumerate(positions):
        for p in item:
            for m in range(reps):
                if p + m * context_len < length:
                    w[p + m * context_len, j] += 1.0 / len(item)
    return w


def item_attention(q: torch.Tensor, k: torch.Tensor, heads: int, weights: torch.Tensor) -> torch.Tensor:
    """q (b, Nq, H·d), k (b, L, H·d) → (b, Nq, N): head-averaged attention probabilities of each
    item (float32, computed beside the model's own attention)."""
    b, dim = q.shape[0], q.shape[-1] // heads
    qh = q.float().view(b, -1, heads, dim).transpose(1, 2)
    kh = k.float().view(b, -1, heads, dim).transpose(1, 2)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) * dim**-0.5, dim=-1).mean(dim=1)
    return probs @ weights.to(probs.device)


def pick_capture_stride(strides: Sequence[int], wanted: int = 4) -> int:
    """The reference reads attention at latent/4 (16×16 for 512 px). A model without that level
    (small test models) uses the nearest finer level with cross-attention, else the coarsest."""
    strides = sorted(set(strides))
    if not strides:
        raise UnsupportedModelError("this model has no cross-attention layers: AsynDM needs a text-conditioned model")
    if wanted in strides:
        return wanted
    lower = [s for s in strides if s <= wanted]
    return lower[-1] if lower else strides[0]
