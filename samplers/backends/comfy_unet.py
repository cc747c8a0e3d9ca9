"""AsynDM backend for ComfyUI's UNet (SD1.x, SD2.x epsilon and v, SDXL).

Nothing is patched on the MODEL, so LoRA weight patches, ControlNet and other nodes' patches
keep working and nothing can leak into it (DESIGN.md invariant 4). Everything travels with
the call: the sampler puts a ``PixelCall`` into ``transformer_options[KEY]`` and
``ComfyUNetBackend.model_options`` adds this run's wrappers and capture patches to a copy of
the call's model options. Without a PixelCall every wrapper is the stock code (a constant map
is the stock forward, invariant 1).

- ``APPLY_MODEL`` wrapper: ComfyUI calls the model with one sigma per image (what ControlNet,
  timestep ranges and CFG see: the image's background sigma). The wrapper finds each batch
  chunk's per-pixel sigmas (following an area crop), pre-scales the input so the UNet sees
  ``calculate_input(σ_pixel)``, and turns the raw output into a denoised latent per pixel
  with the model's own ``calculate_denoised`` (pixels flattened into the batch), so epsilon
  and v models need no formulas of ours.
- ``DIFFUSION_MODEL`` wrapper: time embeddings for the distinct (image, timestep) pairs only
  (invariant 6), SDXL's per-image ADM vector added, and, for that one forward, hooks on every
  ResBlock's ``emb_layers`` that apply the same modules (LoRA patches included) to those rows
  and gather them per pixel at the block's stride.
- ``attn2`` replace patches at the capture stride, only in calls that capture: ComfyUI's own
  attention is the output; the items' attention probabilities are computed beside it for the
  chunk of the conditioning that carries the targets.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from .pixel_math import (UnsupportedModelError, distinct_rows, gather_rows, item_attention, pick_capture_stride,
                         strided_index, token_weights)

KEY = "asyndm_pixel_call"
FORWARD_KEY = "asyndm_pixel_forward"
WRAPPER_KEY = "asyndm_pixel_timesteps"

__all__ = ["KEY", "ComfyUNetBackend", "PixelCall", "UnsupportedModelError", "check_supported", "unet_layout"]


@dataclass
class PixelCall:
    """One model call of an asynchronous run (lives in transformer_options[KEY])."""

    sigma_map: torch.Tensor  # (B, 1, H, W): every latent pixel's sigma
    capture: bool = False
    items: Sequence[Sequence[int]] = ()  # token positions of each item in the targets' context
    context_len: int = 77
    target_uuids: Optional[set] = None  # conds that carry the targets (None: the first cond)
    x: Optional[torch.Tensor] = None  # the full latent, to place area crops
    areas: Sequence[tuple] = ()  # (h, w, y, x) of area conds, latent units
    maps: List[torch.Tensor] = field(default_factory=list)

    def item_maps(self) -> Optional[torch.Tensor]:
        return torch.stack(self.maps).mean(dim=0) if self.maps else None


@dataclass
class _Forward:
    call: PixelCall
    sigma: torch.Tensor  # (Bm, 1, h, w) per model-batch row
    capture_rows: List[int]
    place: tuple  # (y, x) of the captured chunk in the latent (an area crop), else (0, 0)
    t_map: Optional[torch.Tensor] = None  # (Bm, h, w) model timesteps, as BaseModel computes them
    rows: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    raw: Optional[torch.Tensor] = None
    cache: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# structure
# --------------------------------------------------------------------------------------------
def unet_layout(diffusion_model):
    """Stride of every ResBlock's output and of every cross-attention block of ComfyUI's UNet.

    Returns (resblocks: {module path: stride}, attentions: [(block_name, id, index, stride)]).
    """
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    res, attn = {}, []
    stride = 1

    def visit(prefix, block_name, block_id, module):
        nonlocal stride
        for j, layer in enumerate(module):
            if isinstance(layer, ResBlock):
                if layer.updown:  # resblock_updown: h is resampled before the embedding is added
                    stride = stride * 2 if isinstance(layer.h_upd, Downsample) else stride // 2
                if layer.emb_layers is not None:
                    res[f"{prefix}.{j}.emb_layers"] = stride
            elif isinstance(layer, Downsample):
                stride *= 2
            elif isinstance(layer, Upsample):
                stride //= 2
            elif isinstance(layer, SpatialTransformer):
                for index, tb in enumerate(layer.transformer_blocks):
                    if getattr(tb, "attn2", None) is not None:
                        attn.append((block_name, block_id, index, stride))

    for i, module in enumerate(diffusion_model.input_blocks):
        visit(f"diffusion_model.input_blocks.{i}", "input", i, module)
    if diffusion_model.middle_block is not None:
        visit("diffusion_model.middle_block", "middle", 0, diffusion_model.middle_block)
    for i, module in enumerate(diffusion_model.output_blocks):
        visit(f"diffusion_model.output_blocks.{i}", "output", i, module)
    return res, attn


def check_supported(model_patcher):
    """Clear errors for models the per-pixel UNet machinery does not cover."""
    import comfy.model_sampling as ms
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    dm = getattr(model_patcher.model, "diffusion_model", None)
    if not isinstance(dm, UNetModel):
        raise UnsupportedModelError(
            f"AsynDM supports Stable Diffusion UNets (SD1.x, SD2.x, SDXL); this MODEL is {type(dm).__name__}. "
            "Load an SD1.5/SD2.x/SDXL checkpoint.")
    sampling = model_patcher.get_model_object("model_sampling")
    if not isinstance(sampling, (ms.EPS, ms.V_PREDICTION)) or isinstance(sampling, (ms.EDM, ms.X0, ms.CONST)):
        raise UnsupportedModelError(
            f"AsynDM needs an epsilon- or v-prediction model, not {type(sampling).__name__}. Remove model-sampling "
            "patches (e.g. ModelSamplingDiscrete set to lcm/x0/edm) before this node.")
    if getattr(dm, "num_classes", None) not in (None, "sequential"):
        raise UnsupportedModelError("class-conditional UNets (integer labels) are not supported by AsynDM")
    return dm, sampling


# --------------------------------------------------------------------------------------------
# per-pixel helpers
# --------------------------------------------------------------------------------------------
def pixelwise(fn, sigma, *tensors):
    """Apply a model_sampling function that takes one sigma per batch row to a per-pixel sigma
    map, by flattening the pixels into the batch: fn(σ (P,), (P, C) ...) → (B, C, H, W)."""
    b, c, h, w = tensors[0].shape
    flat = [t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in tensors]
    s = sigma.expand(b, 1, h, w).reshape(-1)
    return fn(s, *flat).reshape(b, h, w, -1).permute(0, 3, 1, 2)


def _chunk_place(call: PixelCall, chunk: torch.Tensor):
    """Where one batch chunk (B, C, h, w) sits in the latent: (y, x) of its area crop, or (0, 0)."""
    full = call.sigma_map
    h, w = chunk.shape[-2:]
    if (h, w) == tuple(full.shape[-2:]):
        return 0, 0
    if call.x is not None:
        for ah, aw, ay, ax in call.areas:
            if (ah, aw) == (h, w) and torch.equal(call.x[:, :, ay:ay + h, ax:ax + w].to(chunk), chunk):
                return ay, ax
    raise UnsupportedModelError(
        f"AsynDM could not place a {h}x{w} crop of the {tuple(full.shape[-2:])} latent (an area condition it does "
        "not know, or a model patch that resizes the latent). Use full-size conditioning instead.")


def begin_forward(call: PixelCall, sampling, x, t, transformer_options):
    """The per-pixel state of one model forward (x: ComfyUI's batch of cond/uncond chunks, each an
    area crop or the whole latent) and the input scale that turns the model's calculate_input(σ_image)
    into calculate_input(σ_pixel). Shared by every ComfyUI backend's APPLY_MODEL wrapper."""
    batch = call.sigma_map.shape[0]
    chunks = x.shape[0] // batch
    if chunks * batch != x.shape[0]:
        raise RuntimeError(f"model batch {x.shape[0]} is not a multiple of the latent batch {batch}")
    h, w = x.shape[-2:]
    places = [_chunk_place(call, x[j * batch:(j + 1) * batch]) for j in range(chunks)]
    sig = torch.cat([call.sigma_map[:, :, y:y + h, x0:x0 + w] for y, x0 in places]).to(x.device, torch.float32)
    ones = torch.ones(x.shape[0], 1, h, w, device=x.device)
    scale = pixelwise(sampling.calculate_input, sig, ones) / sampling.calculate_input(
        t.to(x.device, torch.float32).view(-1, 1, 1, 1), ones)  # identity for flow (CONST) models
    rows = _capture_rows(call, transformer_options, batch, chunks)
    fwd = _Forward(call, sig, rows, place=places[rows[0] // batch] if rows else (0, 0),
                   t_map=sampling.timestep(sig.reshape(-1)).float().view(sig.shape[0], h, w))
    return fwd, scale.to(x.dtype)


def _apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                         **kwargs):
    call = transformer_options.get(KEY)
    if call is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    sampling = executor.class_obj.model_sampling
    fwd, scale = begin_forward(call, sampling, x, t, transformer_options)
    executor(x * scale, t, c_concat, c_crossattn, control, dict(transformer_options, **{FORWARD_KEY: fwd}), **kwargs)
    if fwd.raw is None:
        raise RuntimeError("AsynDM: the diffusion model wrapper did not run (another patch bypassed the UNet)")
    return pixelwise(sampling.calculate_denoised, fwd.sigma, fwd.raw.float(), x.float()).to(x.dtype)


def _capture_rows(call, transformer_options, batch, chunks):
    if not call.capture:
        return []
    uuids = list(transformer_options.get("uuids", []))
    flags = list(transformer_options.get("cond_or_uncond", []))
    if call.target_uuids:
        picked = [j for j, u in enumerate(uuids) if u in call.target_uuids]
    else:
        picked = [j for j, f in enumerate(flags) if f == 0]
    return [j * batch + i for j in picked[:1] for i in range(batch)]


def _attn2_capture(stride: int, previous=None):
    def attn2(q, k, v, extra_options):
        if previous is not None:
            out = previous(q, k, v, extra_options)
        else:
            from comfy.ldm.modules import attention

            out = attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                attn_precision=extra_options.get("attn_precision"),
                                                transformer_options=extra_options)
        fwd = extra_options.get(FORWARD_KEY)
        if fwd is not None and fwd.capture_rows:
            _record(fwd, q, k, extra_options, stride)
        return out

    return attn2


def _record(fwd: _Forward, q, k, extra_options, stride):
    call = fwd.call
    sel = torch.tensor(fwd.capture_rows, device=q.device)
    key = ("w", k.shape[1], q.device)
    weights = fwd.cache.get(key)
    if weights is None:
        weights = fwd.cache[key] = token_weights(call.items, k.shape[1], call.context_len, q.device)
    maps = item_attention(q.index_select(0, sel), k.index_select(0, sel), extra_options["n_heads"], weights)
    height, width = extra_options["original_shape"][-2:]
    h, w = -(-height // stride), -(-width // stride)
    if h * w != maps.shape[1]:
        return  # an unexpected grid (a patch changed the resolution): skip this layer
    maps = maps.view(len(fwd.capture_rows), h, w, -1).permute(0, 3, 1, 2)
    full_h, full_w = (-(-n // stride) for n in call.sigma_map.shape[-2:])
    if (h, w) != (full_h, full_w):  # an area crop: its attention, placed in the full grid (0 elsewhere)
        y, x = (v // stride for v in fwd.place)
        placed = maps.new_zeros(maps.shape[0], maps.shape[1], full_h, full_w)
        placed[:, :, y:y + h, x:x + w] = maps[:, :, :full_h - y, :full_w - x]
        maps = placed
    call.maps.append(maps)


def _emb_hooks(dm, resblocks, fwd):
    """Forward hooks, for one forward, that replace each ResBlock's (B, C) embedding projection
    by the per-pixel (B, C, h, w) one: the same modules applied to the handful of rows."""
    def hook(stride):
        def replace(module, args, output):
            rows = fwd.rows
            for layer in module:  # the children: calling the module itself would re-enter the hook
                rows = layer(rows)
            idx = fwd.cache.get(stride)
            if idx is None:
                idx = fwd.cache[stride] = strided_index(fwd.index, stride)
            return gather_rows(rows, idx).to(output.dtype)

        return replace

    return [dm.get_submodule(path.split(".", 1)[1]).register_forward_hook(hook(stride))
            for path, stride in resblocks.items()]


class ComfyUNetBackend:
    """Per-pixel evaluation of one ComfyUI UNet MODEL for one sampling run.

    Nothing is patched on the MODEL: ``model_options(base, call)`` returns a copy of the call's
    model options with this run's APPLY_MODEL / DIFFUSION_MODEL wrappers and attn2 capture
    patches added, and the ResBlock hooks exist only inside one forward (so a SAMPLER node can
    work with whatever MODEL SamplerCustom was given).
    """

    def __init__(self, model_patcher, capture_stride: int = 4):
        dm, _ = check_supported(model_patcher)
        self.resblocks, attentions = unet_layout(dm)
        self.stride = pick_capture_stride([a[3] for a in attentions], capture_stride)
        self.capture_blocks = [a[:3] for a in attentions if a[3] == self.stride]
        resblocks = self.resblocks

        def diffusion_model_wrapper(executor, x, timesteps, context=None, y=None, control=None,
                                    transformer_options={}, **kwargs):
            fwd = transformer_options.get(FORWARD_KEY)
            if fwd is None:
                return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
            from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

            if "emb_patch" in transformer_options.get("patches", {}):
                raise UnsupportedModelError("AsynDM cannot combine per-pixel timesteps with 'emb_patch' model patches")
            dm = executor.class_obj
            per_image = dm.num_classes is not None  # SDXL: the ADM vector stays per image
            uniq_t, row_img, fwd.index = distinct_rows(fwd.t_map, per_image)
            emb = dm.time_embed(timestep_embedding(uniq_t.float(), dm.model_channels, repeat_only=False).to(x.dtype))
            fwd.rows = emb + dm.label_emb(y)[row_img] if per_image else emb
            handles = _emb_hooks(dm, resblocks, fwd)
            try:
                fwd.raw = executor(x, timesteps, context, y, control, transformer_options, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            return fwd.raw

        self._diffusion_model_wrapper = diffusion_model_wrapper

    def model_options(self, base: dict, call: PixelCall) -> dict:
        import comfy.patcher_extension as pe

        opts = dict(base)
        to = dict(opts.get("transformer_options", {}))
        to[KEY] = call
        wrappers = {kind: {k: list(v) for k, v in d.items()} for kind, d in to.get("wrappers", {}).items()}
        for kind, fn in ((pe.WrappersMP.APPLY_MODEL, _apply_model_wrapper),
                         (pe.WrappersMP.DIFFUSION_MODEL, self._diffusion_model_wrapper)):
            wrappers.setdefault(kind, {}).setdefault(WRAPPER_KEY, []).append(fn)
        to["wrappers"] = wrappers
        if call.capture:
            replace = {k: dict(v) for k, v in to.get("patches_replace", {}).items()}
            attn2 = replace.setdefault("attn2", {})
            for block_name, block_id, index in self.capture_blocks:
                previous = attn2.get((block_name, block_id, index)) or attn2.get((block_name, block_id))
                attn2[(block_name, block_id, index)] = _attn2_capture(self.stride, previous)
            to["patches_replace"] = replace
        opts["transformer_options"] = to
        return opts
