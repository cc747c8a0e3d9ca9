"""Prompt-region masks from cross-attention maps, as AsynDM builds them.

``maps`` are (B, N, h, w) attention probabilities of N prompt items (each averaged over heads,
captured layers and the item's tokens). A pixel belongs to item j when its probability is at
least ``mask_thr`` times the item's spatial mean; where items overlap, the larger strength k
wins (the first item on ties); masks are then nearest-resized to the latent.
"""

from typing import Sequence

import torch
import torch.nn.functional as F


def threshold_maps(maps: torch.Tensor, mask_thr: float = 1.0) -> torch.Tensor:
    mean = mask_thr * maps.flatten(2).mean(dim=2)[..., None, None]
    return (maps >= mean).to(maps.dtype)


def resolve_priority(binary: torch.Tensor, ks: Sequence[float]) -> torch.Tensor:
    """Keep at most one item per pixel: the one with the largest k (first on ties)."""
    n = binary.shape[1]
    if n != len(ks):
        raise ValueError(f"{n} masks but {len(ks)} strengths k")
    k = torch.tensor(list(ks), dtype=torch.float32, device=binary.device).view(1, n, 1, 1)
    _, winner = (binary * k).max(dim=1)
    keep = winner[:, None] == torch.arange(n, device=binary.device).view(1, n, 1, 1)
    return keep.to(binary.dtype) * binary


def resize_masks(masks: torch.Tensor, size, mode: str = "nearest") -> torch.Tensor:
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks, size=tuple(size), mode=mode)


def cell_coverage(masks: torch.Tensor, cell: int = 1) -> torch.Tensor:
    """(B, N, H, W) masks, soft or binary → binary masks uniform on cell × cell blocks (a
    transformer's tokens): a block belongs to an item when the item covers more than half of it
    (the block's mean > 0.5, the threshold every mask input gets). Blocks cut by the edge average
    over the pixels they have."""
    if cell <= 1:
        return (masks > 0.5).to(masks.dtype)
    h, w = masks.shape[-2:]
    gh, gw = -(-h // cell), -(-w // cell)
    padded = F.pad(masks, (0, gw * cell - w, 0, gh * cell - h))
    ones = F.pad(torch.ones_like(masks[:1, :1]), (0, gw * cell - w, 0, gh * cell - h))
    share = F.avg_pool2d(padded, cell) / F.avg_pool2d(ones, cell)
    full = (share > 0.5).to(masks.dtype).repeat_interleave(cell, dim=-2).repeat_interleave(cell, dim=-1)
    return full[..., :h, :w]


def build_item_masks(maps: torch.Tensor, ks: Sequence[float], size, mask_thr: float = 1.0) -> torch.Tensor:
    """Attention maps (B, N, h, w) → binary item masks (B, N, H, W), one item per pixel."""
    return resize_masks(resolve_priority(threshold_maps(maps, mask_thr), ks), size)


def initial_dynamic_masks(batch: int, anchors: Sequence[int], size, device=None) -> torch.Tensor:
    """Mask before any attention is seen: the item whose token comes last covers the image.

    This is the reference's start for dynamic masks (it takes the item with the largest token
    index, the first on ties).
    """
    n = len(anchors)
    masks = torch.zeros(batch, n, *size, dtype=torch.float32, device=device)
    if n:
        last = max(range(n), key=lambda j: (anchors[j], -j))
        masks[:, last] = 1
    return masks


def priority_map(masks: torch.Tensor, ks: Sequence[float]) -> torch.Tensor:
    """(B, H, W): each pixel's strength k (0 for the background)."""
    k = torch.tensor(list(ks), dtype=masks.dtype, device=masks.device).view(1, -1, 1, 1)
    return (masks * k).amax(dim=1) if masks.shape[1] else masks.new_zeros(masks.shape[0], *masks.shape[2:])
