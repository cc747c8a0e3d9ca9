"""The ComfyUI call of an asynchronous run, shared by every family backend (DESIGN.md, "Backend protocol").

The sampler puts a ``PixelCall`` into ``transformer_options[KEY]``; the family's APPLY_MODEL
wrapper (protocol.py) turns it, for one model forward, into a typed ``Forward``: each batch
chunk's per-pixel sigmas (an area crop placed by its cond's uuid), the model timestep per pixel,
the distinct (image, timestep) rows and the row index per pixel and per token. Nothing here
knows a model family.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .pixel_math import UnsupportedModelError, distinct_rows, strided_index, token_weights

KEY = "asyndm_pixel_call"
FORWARD_KEY = "asyndm_pixel_forward"
WRAPPER_KEY = "asyndm_pixel_timesteps"


@dataclass
class PixelCall:
    """One model call of an asynchronous run (lives in transformer_options[KEY])."""

    sigma_map: torch.Tensor  # (B, 1, H, W): every latent pixel's sigma
    capture: bool = False
    positions: Sequence[Sequence[int]] = ()  # token positions of each item in the targets' context
    context_len: int = 77
    target_uuids: Optional[set] = None  # conds that carry the targets (None: the first cond)
    areas: Mapping = field(default_factory=dict)  # cond uuid → (y, x) of its area crop, latent units
    maps: List[torch.Tensor] = field(default_factory=list)

    def item_maps(self) -> Optional[torch.Tensor]:
        return torch.stack(self.maps).mean(dim=0) if self.maps else None


@dataclass
class Forward:
    """The per-pixel state of one model forward (a batch of cond/uncond chunks)."""

    call: PixelCall
    dm: torch.nn.Module  # the diffusion model
    sigma: torch.Tensor  # (Bm, 1, h, w) per model-batch row
    t_map: torch.Tensor  # (Bm, h, w) model timesteps, as BaseModel computes them
    uniq_t: torch.Tensor  # (R,) timestep of each distinct row
    row_img: torch.Tensor  # (R,) image (model-batch row) of each distinct row
    index: torch.Tensor  # (Bm, h, w) row of every latent pixel
    cell: int  # latent pixels per token side
    capture_rows: List[int]
    place: Tuple[int, int]  # (y, x) of the captured chunk in the latent (an area crop), else (0, 0)
    frames: int = 1  # a video's frames, stacked along the height (fold)
    text_tail: int = 0  # text-stream tokens after the prompt's (HunyuanImage's byT5 glyphs): never a target
    t_image: Optional[torch.Tensor] = None  # (Bm,) each row's own model timestep, the one ComfyUI passes
    raw: Optional[torch.Tensor] = None  # the diffusion model's output
    reading: Optional[tuple] = None  # (layout, offset) of the read armed for the next attention (attention_read.py)
    time: Optional[torch.Tensor] = None  # (R, D) time embedding of the rows
    per_image: List[torch.Tensor] = field(default_factory=list)  # (Bm, D) vectors added to it, stock order
    _rows: Optional[torch.Tensor] = None
    _strided: Dict[int, torch.Tensor] = field(default_factory=dict)
    _weights: Dict[Tuple[int, int], torch.Tensor] = field(default_factory=dict)
    _index: Dict[tuple, torch.Tensor] = field(default_factory=dict)

    @property
    def grid(self) -> Tuple[int, int]:
        h, w = self.index.shape[-2:]
        return -(-h // self.cell), -(-w // self.cell)

    def strided(self, stride: int) -> torch.Tensor:
        """Row index (Bm, h/s, w/s) of a feature map at ``stride`` (its cells' top-left pixel)."""
        if stride not in self._strided:
            self._strided[stride] = strided_index(self.index, stride)
        return self._strided[stride]

    @property
    def tokens(self) -> torch.Tensor:
        """Row of every token (Bm, n), row-major like a patchify."""
        return self.strided(self.cell).flatten(1)

    def token_index(self, starts: Sequence[int], length: int) -> torch.Tensor:
        """(Bm, length) row of every position of a token sequence in which image b's tokens start
        at ``starts[b]``; every other position (text, padding, reference tokens) reads row R + b:
        image b's stock per-image row, appended after the R rows."""
        key = (tuple(starts), length)
        if key not in self._index:
            tokens = self.tokens
            bm, n = tokens.shape
            index = (len(self.uniq_t) + torch.arange(bm, device=tokens.device)).view(bm, 1).repeat(1, length)
            for b, s in enumerate(starts):
                index[b, s:s + n] = tokens[b]
            self._index[key] = index
        return self._index[key]

    def keep_per_image(self, module, args, output):
        """A forward hook for an embedder whose per-image output joins the time embedding (pooled
        text, guidance): kept in the stock sum's order (``rows``)."""
        self.per_image.append(output)

    def rows(self) -> torch.Tensor:
        """(R, D) conditioning vector of each row: its time embedding plus its image's per-image
        vectors, added in the stock order."""
        if self._rows is None:
            r = self.time
            for v in self.per_image:
                r = r + v[self.row_img.to(v.device)]
            self._rows = r
        return self._rows

    def image_rows(self) -> torch.Tensor:
        """(Bm,) the row of each model-batch row's own (image, timestep) pair — the stock per-image
        conditioning — appending rows (to ``uniq_t`` / ``row_img``) for pairs no pixel has (an
        area crop away from the background). Call before any rows are built."""
        match = (self.row_img[None, :] == torch.arange(len(self.t_image), device=self.row_img.device)[:, None]) & (
            self.uniq_t[None, :] == self.t_image[:, None].to(self.uniq_t))
        found = match.any(dim=1)
        if not bool(found.all()):
            missing = (~found).nonzero().flatten()
            self.uniq_t = torch.cat([self.uniq_t, self.t_image[missing].to(self.uniq_t)])
            self.row_img = torch.cat([self.row_img, missing.to(self.row_img)])
            return self.image_rows()
        return match.float().argmax(dim=1)

    def weights(self, length: int, offset: int = 0) -> torch.Tensor:
        """(length, N) item weights over a text sequence of ``length`` with ``offset`` model-side
        tokens (registers) before the text."""
        key = (length, offset)
        if key not in self._weights:
            w = token_weights(self.call.positions, length - offset, self.call.context_len, self.sigma.device)
            if offset:
                w = torch.cat([w.new_zeros(offset, w.shape[1]), w])
            self._weights[key] = w
        return self._weights[key]

    def place_maps(self, maps: torch.Tensor, stride: int) -> torch.Tensor:
        """(b, N, h, w) maps of the captured chunk at ``stride`` → the full latent's grid (an area
        crop's maps placed where it sits, 0 elsewhere)."""
        h, w = maps.shape[-2:]
        full_h, full_w = (-(-n // stride) for n in self.call.sigma_map.shape[-2:])
        if (h, w) == (full_h, full_w):
            return maps
        y, x = (v // stride for v in self.place)
        placed = maps.new_zeros(maps.shape[0], maps.shape[1], full_h, full_w)
        placed[:, :, y:y + h, x:x + w] = maps[:, :, :full_h - y, :full_w - x]
        return placed


def fold(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A video latent (B, C, T, H, W) as one tall image (B, C, T·H, W), frames stacked along the
    height: the plan, masks and per-pixel samplers then need no frame axis, a token of patch
    (1, p, p) stays a p×p cell (H a multiple of p), and a frame's tokens keep their order."""
    return t.reshape(*t.shape[:2], -1, t.shape[-1]) if t is not None and t.ndim == 5 else t


def unfold(t: torch.Tensor, frames: int) -> torch.Tensor:
    """The inverse of ``fold`` for ``frames`` frames."""
    return t.reshape(*t.shape[:2], frames, -1, t.shape[-1])


def pixelwise(fn, sigma, *tensors):
    """Apply a model_sampling function that takes one sigma per batch row to a per-pixel sigma
    map, by flattening the pixels into the batch: fn(σ (P,), (P, C) ...) → (B, C, H, W)."""
    b, c, h, w = tensors[0].shape
    flat = [t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in tensors]
    s = sigma.expand(b, 1, h, w).reshape(-1)
    return fn(s, *flat).reshape(b, h, w, -1).permute(0, 3, 1, 2)


def _chunk_places(call: PixelCall, uuids: Sequence, chunks: int, size) -> List[Tuple[int, int]]:
    """(y, x) of each batch chunk in the latent: (0, 0) for a full-size chunk, else its cond's area."""
    full = tuple(call.sigma_map.shape[-2:])
    if tuple(size) == full:
        return [(0, 0)] * chunks
    places = [call.areas.get(u) for u in list(uuids)[:chunks]]
    if len(places) != chunks or any(p is None for p in places):
        raise UnsupportedModelError(
            f"AsynDM could not place a {size[0]}x{size[1]} crop of the {full} latent (an area condition it does "
            "not know, or a model patch that resizes the latent). Use full-size conditioning instead.")
    return places


def _capture_rows(call, transformer_options, batch):
    if not call.capture:
        return []
    uuids = list(transformer_options.get("uuids", []))
    flags = list(transformer_options.get("cond_or_uncond", []))
    if call.target_uuids:
        picked = [j for j, u in enumerate(uuids) if u in call.target_uuids]
    else:
        picked = [j for j, f in enumerate(flags) if f == 0]
    return [j * batch + i for j in picked[:1] for i in range(batch)]


def begin_forward(call: PixelCall, sampling, dm, x, t, transformer_options, cell: int, per_image: bool):
    """The Forward of one model call and the input scale that turns the model's
    calculate_input(σ_image) into calculate_input(σ_pixel) (identity for flow models)."""
    batch = call.sigma_map.shape[0]
    chunks = x.shape[0] // batch
    if chunks * batch != x.shape[0]:
        raise RuntimeError(f"model batch {x.shape[0]} is not a multiple of the latent batch {batch}")
    h, w = x.shape[-2:]
    places = _chunk_places(call, transformer_options.get("uuids", ()), chunks, (h, w))
    sig = torch.cat([call.sigma_map[:, :, y:y + h, x0:x0 + w] for y, x0 in places]).to(x.device, torch.float32)
    ones = torch.ones(x.shape[0], 1, h, w, device=x.device)
    scale = pixelwise(sampling.calculate_input, sig, ones) / sampling.calculate_input(
        t.to(x.device, torch.float32).view(-1, 1, 1, 1), ones)
    rows = _capture_rows(call, transformer_options, batch)
    t_map = sampling.timestep(sig.reshape(-1)).float().view(sig.shape[0], h, w)
    uniq_t, row_img, index = distinct_rows(t_map, per_image)
    fwd = Forward(call, dm, sig, t_map, uniq_t, row_img, index, cell, rows,
                  place=places[rows[0] // batch] if rows else (0, 0),
                  t_image=sampling.timestep(t.to(x.device, torch.float32)).float())
    return fwd, scale.to(x.dtype)


def denoised_per_pixel(sampling, fwd: Forward, x, t, scale, stock):
    """The per-pixel denoised latent from ComfyUI's own (``stock``: calculate_denoised at the
    image's sigma, of the scaled input). Every model sampling's denoiser is linear in (input,
    output), D = a(σ)·x + b(σ)·raw, so D_pixel = stock + (a(σ_p) − a(σ_i)·scale)·x + (b(σ_p) − b(σ_i))·raw:
    exactly ComfyUI's where a pixel sits at its image's sigma."""
    ones = torch.ones_like(fwd.sigma)
    zeros = torch.zeros_like(fwd.sigma)
    t = t.to(x.device, torch.float32).view(-1, 1, 1, 1)
    a_p = pixelwise(sampling.calculate_denoised, fwd.sigma, zeros, ones)
    b_p = pixelwise(sampling.calculate_denoised, fwd.sigma, ones, zeros)
    a_i = sampling.calculate_denoised(t, zeros[:, :, :1, :1], ones[:, :, :1, :1])
    b_i = sampling.calculate_denoised(t, ones[:, :, :1, :1], zeros[:, :, :1, :1])
    out = stock.float() + (a_p - a_i * scale.float()) * x.float() + (b_p - b_i) * fwd.raw.float()
    return out.to(stock.dtype)
