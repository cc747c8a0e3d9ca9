"""What the diffusion-transformer backends (Flux, SD3's MMDiT) share (DESIGN.md, "Transformers").

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

Like the UNet backend nothing is patched on the MODEL: ``model_options`` adds an APPLY_MODEL
wrapper (and ``dit`` block replace patches) to a copy of the call's options; the module hooks that
swap stock modulation for per-token modulation exist only inside one forward. Text tokens keep
the stock per-image vector, whose timestep is the image's passed sigma: the background's.
"""

from typing import List

import torch

from .comfy_unet import FORWARD_KEY, KEY, WRAPPER_KEY, PixelCall, begin_forward, pixelwise
from .pixel_math import UnsupportedModelError, distinct_rows, strided_index, token_weights

__all__ = ["DiTBackend", "PixelCall", "joint_item_attention", "middle_blocks"]


def middle_blocks(depth: int, count: int = 3) -> List[int]:
    """``count`` consecutive blocks centred in the stack: early blocks still see mostly noise and
    layout, the last ones specialise on output detail; the middle joint blocks attend most
    selectively to the prompt's nouns (DESIGN.md)."""
    count = max(1, min(count, depth))
    start = max(0, (depth - count) // 2)
    return list(range(start, start + count))


def joint_item_attention(q, k_txt, k_img, weights):
    """q (b, H, Nq, d), k_txt (b, H, Lt, d), k_img (b, H, Li, d), weights (Lt, N) → (b, Nq, N):
    the head-averaged probability each image query gives each item's text tokens in the *joint*
    softmax over [text | image] keys, as the model attends. One head at a time (float32): the
    (Nq, Lt + Li) logits of all heads at once would be GBs at 1024 px. Only the softmax's
    normaliser needs the image keys (a logsumexp); the probabilities are read for the text keys."""
    scale = q.shape[-1] ** -0.5
    w = weights.to(q.device, torch.float32)
    out = None
    for h in range(q.shape[1]):
        qh = q[:, h].float() * scale
        txt = qh @ k_txt[:, h].float().transpose(-1, -2)
        lse = torch.logaddexp(txt.logsumexp(dim=-1), (qh @ k_img[:, h].float().transpose(-1, -2)).logsumexp(dim=-1))
        probs = (txt - lse[..., None]).exp() @ w
        out = probs if out is None else out + probs
    return out / q.shape[1]


class DiTBackend:
    """Per-token evaluation of one transformer MODEL for one sampling run (subclasses: the family's
    structure, hooks and capture)."""

    cell = 2  # the patch size: the plan's masks are snapped to it (plan.py)

    def __init__(self, model_patcher):
        self.dm = self.check_supported(model_patcher)
        self.cell = self.patch_size(self.dm)

    # --- family specifics ---------------------------------------------------------------------
    def check_supported(self, model_patcher):  # → diffusion model
        raise NotImplementedError

    def patch_size(self, dm) -> int:
        raise NotImplementedError

    def hooks(self, dm, fwd) -> list:
        """Forward hooks (handles) that make this forward per token."""
        raise NotImplementedError

    def block_patches(self, call) -> dict:
        """{("double_block", i): replace(args, extra, previous)} for this call."""
        return {}

    # --- shared -------------------------------------------------------------------------------
    def model_options(self, base: dict, call: PixelCall) -> dict:
        import comfy.patcher_extension as pe

        opts = dict(base)
        to = dict(opts.get("transformer_options", {}))
        to[KEY] = call
        wrappers = {kind: {k: list(v) for k, v in d.items()} for kind, d in to.get("wrappers", {}).items()}
        wrappers.setdefault(pe.WrappersMP.APPLY_MODEL, {}).setdefault(WRAPPER_KEY, []).append(self._apply_model)
        to["wrappers"] = wrappers
        patches = self.block_patches(call)
        if patches:
            replace = {k: dict(v) for k, v in to.get("patches_replace", {}).items()}
            dit = replace.setdefault("dit", {})
            for name, fn in patches.items():
                dit[name] = _chain(fn, dit.get(name))
            to["patches_replace"] = replace
        opts["transformer_options"] = to
        return opts

    def _apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                     **kwargs):
        call = transformer_options.get(KEY)
        if call is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        base = executor.class_obj
        sampling, dm = base.model_sampling, base.diffusion_model
        h, w = x.shape[-2:]
        fwd, scale = begin_forward(call, sampling, x, t, transformer_options)
        uniq_t, fwd.cache["row_img"], fwd.index = distinct_rows(fwd.t_map, per_image=True)
        fwd.cache["uniq_t"] = uniq_t
        p = self.cell
        fwd.cache["tokens"] = strided_index(fwd.index, p).flatten(1)  # (Bm, h/p · w/p), row-major like the patchify
        fwd.cache["grid"] = (-(-h // p), -(-w // p))
        fwd.cache["cell"] = p
        fwd.cache["dm"] = dm

        def keep_raw(module, args, output):
            fwd.raw = output

        handles = [dm.register_forward_hook(keep_raw)] + self.hooks(dm, fwd)
        try:
            executor(x * scale, t, c_concat, c_crossattn, control,
                     dict(transformer_options, **{FORWARD_KEY: fwd}), **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if fwd.raw is None:
            raise RuntimeError("AsynDM: the transformer did not run (another patch bypassed it)")
        return pixelwise(sampling.calculate_denoised, fwd.sigma, fwd.raw.float(), x.float()).to(x.dtype)


def per_token(fwd, rows_out: torch.Tensor, stock: torch.Tensor, before: int = 0, after: int = 0,
              parts: int = 1):
    """Modulation rows (R, K) → (Bm, before + n_img + after, K): image tokens gathered from their
    (image, timestep) row; the ``before`` (text) and ``after`` (reference-image) tokens keep the
    stock per-image value ``stock`` (Bm, 1, K), the background's. With ``parts`` > 1 the K
    channels come back as that many contiguous (Bm, L, K/parts) tensors (shift, scale, gate...),
    so the block's elementwise modulation reads dense memory rather than strided chunk views.
    One gather per part: the per-token path costs one pass over the modulation tensor."""
    tokens = fwd.cache["tokens"]
    bm, k = tokens.shape[0], rows_out.shape[-1]
    index = tokens
    table = rows_out.to(stock.dtype)
    if before or after:
        index = fwd.cache.get(("seq", before, after))
        if index is None:  # image b's text and reference tokens read row R + b: its stock vector
            own = (rows_out.shape[0] + torch.arange(bm, device=tokens.device)).view(bm, 1)
            index = fwd.cache[("seq", before, after)] = torch.cat(
                [own.expand(bm, before), tokens, own.expand(bm, after)], dim=1)
        table = torch.cat([table, stock.reshape(bm, k)])
    if parts == 1:
        return table[index]
    return [t[index] for t in table.view(table.shape[0], parts, -1).unbind(dim=1)]


def record_maps(fwd, q_img, k_txt, k_img, context_len_offset: int = 0):
    """Joint attention of the captured rows' image queries (b, H, n, d) to the items' text tokens,
    as (b, N, h/p, w/p) maps on the token grid, placed in the full grid for an area crop."""
    call = fwd.call
    sel = torch.tensor(fwd.capture_rows, device=q_img.device)
    q_img, k_txt, k_img = (t.index_select(0, sel) for t in (q_img, k_txt, k_img))
    lt = k_txt.shape[2]
    key = ("w", lt)
    weights = fwd.cache.get(key)
    if weights is None:
        weights = token_weights(call.items, lt - context_len_offset, call.context_len, q_img.device)
        if context_len_offset:  # model-side prefix tokens (registers) before the text
            weights = torch.cat([weights.new_zeros(context_len_offset, weights.shape[1]), weights])
        fwd.cache[key] = weights
    h, w = fwd.cache["grid"]
    maps = joint_item_attention(q_img[:, :, :h * w], k_txt, k_img, weights)
    maps = maps.view(len(fwd.capture_rows), h, w, -1).permute(0, 3, 1, 2)
    p = fwd.cache.get("cell", 2)
    full_h, full_w = (-(-n // p) for n in call.sigma_map.shape[-2:])
    if (h, w) != (full_h, full_w):  # an area crop: its attention placed in the full grid (0 elsewhere)
        y, x = (v // p for v in fwd.place)
        placed = maps.new_zeros(maps.shape[0], maps.shape[1], full_h, full_w)
        placed[:, :, y:y + h, x:x + w] = maps[:, :, :full_h - y, :full_w - x]
        maps = placed
    call.maps.append(maps)


def _chain(fn, previous):
    """Our block patch inside any earlier ``dit`` replace patch of the same block."""
    if previous is None:
        return lambda args, extra: fn(args, extra["original_block"])

    def chained(args, extra):
        return previous(args, dict(extra, original_block=lambda a: fn(a, extra["original_block"])))

    return chained


def unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"AsynDM supports Stable Diffusion UNets (SD1.x, SD2.x, SDXL), Flux (dev, schnell and fine-tunes) and "
        f"SD3/SD3.5 (MMDiT); {what}")
