"""Small PNG helpers for the CLI and demo: latents/maps → PIL images, side-by-side grids."""

from typing import List, Sequence

import torch


def to_pil(image: torch.Tensor):
    """(3, H, W) in [-1, 1] or (H, W) in [0, 1] → PIL image."""
    from PIL import Image

    x = image.detach().float().cpu()
    if x.ndim == 3:
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(x, "RGB")
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().numpy(), "L")


def map_to_pil(values: torch.Tensor, scale: float = 1.0, size: int = 256):
    """A (h, w) map (e.g. timesteps / 1000 or a 0/1 mask) enlarged with nearest pixels."""
    from PIL import Image

    return to_pil(values.float() / scale).resize((size, size * values.shape[0] // values.shape[1]), Image.NEAREST)


def grid(images: Sequence, cols: int, pad: int = 4):
    from PIL import Image

    images = list(images)
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for n, im in enumerate(images):
        out.paste(im.convert("RGB"), ((n % cols) * (w + pad), (n // cols) * (h + pad)))
    return out


def chosen_steps(num_steps: int, count: int = 6) -> List[int]:
    """Evenly spread step indices, always including the first and the last."""
    if num_steps <= count:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / (count - 1)) for i in range(count)})
