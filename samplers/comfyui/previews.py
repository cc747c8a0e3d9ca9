"""The preview nodes' drawings, torch only: IMAGE tensors (N, H, W, 3) in 0..1 (no algorithm of the engine).

- ``curves_image``: timestep against step for the background and each item.
- ``region_images`` / ``timestep_images``: which item owns each latent pixel, and each pixel's
  timestep, at chosen steps, enlarged ×scale (the caller's image pixels per latent pixel).
"""

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

PALETTE = [
    (0.25, 0.25, 0.25),  # background
    (0.90, 0.30, 0.20),
    (0.20, 0.55, 0.90),
    (0.25, 0.75, 0.30),
    (0.95, 0.70, 0.10),
    (0.65, 0.35, 0.85),
    (0.10, 0.80, 0.80),
]


def color(j: int):
    return PALETTE[j % len(PALETTE)] if j == 0 else PALETTE[1 + (j - 1) % (len(PALETTE) - 1)]


def _draw_line(img, x0, y0, x1, y1, rgb, width=2):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = torch.linspace(x0, x1, n).round().long()
    ys = torch.linspace(y0, y1, n).round().long()
    h, w, _ = img.shape
    c = torch.tensor(rgb, dtype=img.dtype)
    for dy in range(-(width // 2), width - width // 2):
        for dx in range(-(width // 2), width - width // 2):
            yy, xx = (ys + dy).clamp(0, h - 1), (xs + dx).clamp(0, w - 1)
            img[yy, xx] = c


def curves_image(series: Sequence[Sequence[float]], labels_count: int, max_t: float = 1001.0,
                 height: int = 256, width: int = 384) -> torch.Tensor:
    """series[0] = background, series[j] = item j; values per step (NaN where absent)."""
    img = torch.ones(height, width, 3)
    pad = 24
    x_lo, x_hi, y_lo, y_hi = pad, width - pad, pad, height - pad
    grey = (0.6, 0.6, 0.6)
    _draw_line(img, x_lo, y_hi, x_hi, y_hi, grey, 1)  # step axis
    _draw_line(img, x_lo, y_lo, x_lo, y_hi, grey, 1)  # timestep axis
    for frac in (0.25, 0.5, 0.75):
        y = y_hi - frac * (y_hi - y_lo)
        _draw_line(img, x_lo, y, x_lo + 6, y, grey, 1)
    steps = max(len(s) for s in series) if series else 1
    for j, values in enumerate(series):
        pts = [
            (x_lo + (x_hi - x_lo) * i / max(steps - 1, 1), y_hi - (y_hi - y_lo) * float(v) / max_t)
            for i, v in enumerate(values)
            if v == v  # skip NaN
        ]
        for (a, b), (c, d) in zip(pts, pts[1:]):
            _draw_line(img, a, b, c, d, color(j))
        # legend swatch
        _draw_line(img, x_hi - 60, y_lo + 10 * j, x_hi - 40, y_lo + 10 * j, color(j), 3)
    return img[None]


def mean_curves(timestep_maps: List[torch.Tensor], masks: List[Optional[torch.Tensor]], n_items: int,
                image: int = 0) -> List[List[float]]:
    """Per step: the mean timestep of image ``image``'s background and of each item's pixels."""
    nan = float("nan")
    series = [[] for _ in range(n_items + 1)]
    for t, m in zip(timestep_maps, masks):
        t = t[image].float()
        if m is None or m.shape[1] == 0:
            series[0].append(float(t.mean()))
            for j in range(n_items):
                series[j + 1].append(nan)
            continue
        m = m[min(image, m.shape[0] - 1)] > 0.5
        bg = ~m.any(dim=0)
        series[0].append(float(t[bg].mean()) if bg.any() else nan)
        for j in range(n_items):
            sel = m[j] if j < m.shape[0] else torch.zeros_like(bg)
            series[j + 1].append(float(t[sel].mean()) if sel.any() else nan)
    return series


def region_images(masks: List[Optional[torch.Tensor]], steps: Sequence[int], image: int = 0,
                  scale: int = 8) -> torch.Tensor:
    """Colored item regions (background dark) of the chosen steps, upscaled ×scale."""
    out = []
    for i in steps:
        m = masks[i]
        if m is None:
            raise ValueError(f"step {i} has no mask (vanilla run, or no targets)")
        m = m[min(image, m.shape[0] - 1)] > 0.5
        h, w = m.shape[-2:]
        img = torch.tensor(color(0)).view(1, 1, 3).expand(h, w, 3).clone()
        for j in range(m.shape[0]):
            img[m[j]] = torch.tensor(color(j + 1))
        out.append(img)
    return _upscale(torch.stack(out), scale)


def timestep_images(timestep_maps: List[torch.Tensor], steps: Sequence[int], image: int = 0,
                    max_t: float = 1001.0, scale: int = 8) -> torch.Tensor:
    """Each pixel's timestep (white = noisy, black = clean) at the chosen steps."""
    out = [(timestep_maps[i][image].float() / max_t).clamp(0, 1)[..., None].expand(-1, -1, 3) for i in steps]
    return _upscale(torch.stack(out), scale)


def _upscale(imgs, scale):
    if scale == 1:
        return imgs
    return imgs.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def parse_step_list(text: str) -> List[Union[int, float]]:
    """``"0, 0.5, -1"`` → [0, 0.5, -1]: whole numbers are step indices (negative counts from the
    end), numbers with a point or a ``%`` are fractions of the run. Blank → []. Only the format is
    checked here, so a list written for a long run stays valid for a short one."""
    out: List[Union[int, float]] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if part.endswith("%"):
                out.append(float(part[:-1]) / 100)
            elif "." in part or "e" in part.lower():
                out.append(float(part))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"at_steps: {part!r} is not a step; write step indices and fractions of the run, "
                             "e.g. '0, 0.5, -1' (first, halfway, last) or leave it blank") from None
        if not math.isfinite(out[-1]):
            raise ValueError(f"at_steps: {part!r} is not a finite number; write e.g. '0, 0.5, -1'")
    return out


def pick_steps(text: str, total: int) -> Tuple[List[int], List[int], List[str]]:
    """The run's step indices to show, for a run of ``total`` steps.

    Returns (steps, clamped, notes): ``clamped`` are the shown steps that stand in for a wish
    outside the run (the nearest step of the run), ``notes`` say so in words. Never raises for a
    step that the run does not have: a preview must not fail a generation because its list was
    written for more steps. Blank: 4 evenly spaced steps (fewer for a shorter run). Repeats are
    shown once."""
    wishes = parse_step_list(text)
    if not wishes:
        return sorted({round(i * (total - 1) / 3) for i in range(4)}), [], []
    last = total - 1
    steps, clamped, notes = [], [], []
    for wish in wishes:
        if isinstance(wish, float):
            i = round(min(max(wish, 0.0), 1.0) * last)
            off = not 0.0 <= wish <= 1.0
            said = f"fraction {wish:g}"
        else:
            i = wish + total if wish < 0 else wish
            off = not 0 <= i <= last
            i = min(max(i, 0), last)
            said = f"step {wish}"
        if off:
            notes.append(f"{said} is outside the run's {total} steps (0..{last}): showing step {i}")
        if i not in steps:
            steps.append(i)
            if off:
                clamped.append(i)
    return steps, clamped, notes


def mark_frames(imgs: torch.Tensor, frames: Sequence[int], rgb=(0.95, 0.1, 0.1), width: int = 3) -> torch.Tensor:
    """A coloured border on the chosen frames of an IMAGE batch (N, H, W, 3), in place."""
    c = torch.tensor(rgb, dtype=imgs.dtype)
    for f in frames:
        img = imgs[f]
        img[:width], img[-width:], img[:, :width], img[:, -width:] = c, c, c, c
    return imgs
