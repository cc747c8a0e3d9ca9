"""AsynDM data carried on ComfyUI CONDITIONING and MASK, and the strengths text of the nodes.

The text-encode node attaches ``{"words", "ks", "positions", "context_len"}`` under
``TARGETS_KEY`` to each conditioning entry; the sampler reads it from the positive
conditioning (also inside SamplerCustom's guiders, whose processed conds keep the key).
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from ..tokens import parse_strength

TARGETS_KEY = "asyndm_targets"


@dataclass
class Targets:
    words: List[str] = field(default_factory=list)
    ks: List[float] = field(default_factory=list)
    positions: List[List[int]] = field(default_factory=list)
    context_len: int = 77
    uuids: set = field(default_factory=set)  # processed conds (inside a guider) that carry them

    @property
    def anchors(self):
        return [p[0] for p in self.positions]


def targets_of(conditioning) -> Optional[Targets]:
    """The targets of the first entry that carries any. Accepts node CONDITIONING ([tensor, dict]
    pairs) or a guider's processed conds (dicts)."""
    found = None
    for entry in conditioning or []:
        d = entry[1] if isinstance(entry, (list, tuple)) else entry
        t = d.get(TARGETS_KEY)
        if not t:
            continue
        if found is None:
            found = Targets(list(t["words"]), [float(k) for k in t["ks"]], [list(p) for p in t["positions"]],
                            int(t.get("context_len", 77)))
        if "uuid" in d:
            found.uuids.add(d["uuid"])
    return found


def parse_ks(text: str) -> List[float]:
    """``"0.7, 0.5"`` → [0.7, 0.5]; blank → []."""
    return [parse_strength(p, "strengths") for p in (text or "").split(",") if p.strip()]


def resolve_ks(targets: Optional[Targets], override: Sequence[float], n_needed: Optional[int] = None) -> List[float]:
    """Strengths: the override (one value for all, or one per target) else the targets' own."""
    n = len(targets.ks) if targets else (n_needed or 0)
    if not override:
        return list(targets.ks) if targets else []
    if len(override) == 1:
        return [override[0]] * max(n, 1)
    if targets and len(override) != n:
        raise ValueError(f"strengths: {len(override)} values for {n} targets ({', '.join(targets.words)}); "
                         "give one value, or one per target")
    return list(override)


def external_item_masks(mask: torch.Tensor, n_items: int, batch: int) -> torch.Tensor:
    """A ComfyUI MASK (H,W) or (M,H,W) → engine masks (1 or B, N', H, W).

    M == items (> 1): one frame per target, shared by every image; M == batch × items: image-major
    frames as the mask extractor writes them; otherwise M == 1 or M == batch: one region per
    image, a single item.
    """
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    frames = m.shape[0]
    if n_items > 1 and frames == n_items:
        return m[None]
    if n_items > 1 and frames == batch * n_items:
        return m.view(batch, n_items, *m.shape[1:])
    if frames not in (1, batch):
        raise ValueError(f"the MASK has {frames} frames: give 1, one per image of the batch ({batch}), "
                         f"one per target ({n_items}) or one per image and target ({batch * n_items})")
    return m[:, None]
