"""AsynDM backend for ComfyUI's UNet (SD1.x, SD2.x epsilon and v, SDXL) through ModelPatcher.

Everything is applied to a *clone* of the MODEL with ComfyUI's own patch mechanisms, so LoRA
weight patches, ControlNet, and other nodes' patches keep working and nothing leaks into the
input MODEL:

- ``APPLY_MODEL`` wrapper: ComfyUI's samplers call the model with one sigma per image (that is
  what ControlNet, timestep-ranged conds and CFG see: the *background* sigma, i.e. the smallest
  sigma of the image's map). Inside, the wrapper rescales the input so the UNet sees
  ``x / sqrt(sigma_pixel² + 1)`` and converts the raw output to a denoised latent per pixel.
- ``DIFFUSION_MODEL`` wrapper: computes time embeddings only for the distinct
  (image, timestep) pairs of the call (a handful per step, invariant 6), adds SDXL's per-image
  ADM vector, and keeps the per-pixel row index for the ResBlocks.
- object patches on every ResBlock's ``emb_layers``: the same SiLU+Linear modules (so LoRA
  keys still resolve), projecting the handful of rows and gathering them per pixel. A feature
  map at stride f takes the timestep of the top-left latent pixel of each f×f block (the
  reference's choice: ``map[:, ::f, ::f]``).
- ``attn2`` replace patches on the cross-attention layers at stride ``capture_factor`` only:
  the layer's output is ComfyUI's own attention (unchanged); when capturing, the softmax
  probabilities of the item tokens are computed beside it for the conditional half only.

Outside an active per-pixel call every patch defers to the stock code, so a constant map is
the stock forward (invariant 1) and a plain KSampler with the patched clone is stock too.
"""

from contextlib import contextmanager
from typing import List, Optional, Sequence

import torch

WRAPPER_KEY = "asyndm_pixel_timesteps"


class UnsupportedModelError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# structure
# --------------------------------------------------------------------------------------------
def unet_layout(diffusion_model):
    """Walk ComfyUI's UNetModel once: stride of every ResBlock's output and of every
    cross-attention transformer block.

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


def pick_capture_stride(attentions, wanted: int = 4) -> int:
    """The reference reads attention at latent/4 (16×16 for 512 px); small test models may not
    have that level, then the nearest coarser-or-equal level with cross-attention is used."""
    strides = sorted({a[3] for a in attentions})
    if not strides:
        raise UnsupportedModelError("this UNet has no cross-attention layers: AsynDM needs a text-conditioned model")
    if wanted in strides:
        return wanted
    lower = [s for s in strides if s <= wanted]
    return lower[-1] if lower else strides[0]


def check_supported(model_patcher):
    """Clear errors for models the per-pixel machinery does not cover."""
    import comfy.model_sampling as ms
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = model_patcher.model
    dm = getattr(base, "diffusion_model", None)
    if not isinstance(dm, UNetModel):
        raise UnsupportedModelError(
            f"AsynDM needs a Stable Diffusion UNet (SD1.x, SD2.x, SDXL); this MODEL is {type(dm).__name__}. "
            "Load an SD1.5/SD2.x/SDXL checkpoint."
        )
    sampling = model_patcher.get_model_object("model_sampling")
    if not isinstance(sampling, ms.ModelSamplingDiscrete) or isinstance(sampling, (ms.EDM, ms.X0, ms.CONST)):
        raise UnsupportedModelError(
            "AsynDM runs DDIM on the model's 1000 discrete training timesteps: it needs an epsilon- or "
            f"v-prediction discrete model, not {type(sampling).__name__}. Remove model-sampling patches "
            "(e.g. ModelSamplingDiscrete set to lcm/x0/edm) before this node."
        )
    if getattr(dm, "num_classes", None) not in (None, "sequential"):
        raise UnsupportedModelError("class-conditional UNets (integer labels) are not supported by AsynDM")
    return dm, sampling


def sigma_table(model_patcher) -> torch.Tensor:
    """σ(t) = sqrt((1 - ᾱ_t)/ᾱ_t) for t = 0..999, exactly as the model's sampling uses them."""
    return model_patcher.get_model_object("model_sampling").sigmas.detach().float().cpu()


# --------------------------------------------------------------------------------------------
# per-call state
# --------------------------------------------------------------------------------------------
class PixelContext:
    """What one asynchronous model call needs, shared by the patches of one cloned MODEL.

    ``items``: token positions of each prompt item in the positive context, ``context_len``:
    that context's length in tokens (ComfyUI repeats shorter contexts to a common length when
    it batches cond and uncond; repeated keys are summed back).
    """

    def __init__(self, items: Sequence[Sequence[int]] = (), context_len: int = 77):
        self.items = [list(p) for p in items]
        self.context_len = int(context_len)
        self.active = False
        self.capture = False
        self.batch = 0
        self.t_map = None  # (B, H, W) long
        self.sigma_map = None  # (B, H, W) float
        self._reset_call_state()

    def _reset_call_state(self):
        self.rows = None  # (R, D) embeddings of distinct (image, timestep) pairs
        self.index = None  # (Bk, H, W) row of every pixel
        self._index_cache = {}
        self.raw_output = None
        self._weights = {}

    @contextmanager
    def call(self, t_map: torch.Tensor, sigma_map: torch.Tensor, capture: bool = False):
        """Make the patches per-pixel for the model calls inside the block."""
        self.active, self.capture = True, bool(capture) and bool(self.items)
        self.batch = t_map.shape[0]
        self.t_map, self.sigma_map = t_map, sigma_map
        self.map_sum, self.map_count = None, 0
        try:
            yield self
        finally:
            self.active = False
            self.t_map = self.sigma_map = None
            self._reset_call_state()

    def item_maps(self) -> Optional[torch.Tensor]:
        """(B, N, h, w) attention of each item, averaged over captured layers and calls."""
        if not self.map_count:
            return None
        return self.map_sum / self.map_count

    # embeddings ---------------------------------------------------------------------------
    def tiled(self, tensor, batch):
        reps = batch // self.batch
        if reps * self.batch != batch:
            raise RuntimeError(f"model batch {batch} is not a multiple of the latent batch {self.batch}")
        return tensor.repeat(reps, *([1] * (tensor.ndim - 1))) if reps > 1 else tensor

    def prepare_embeddings(self, dm, x, y, transformer_options):
        from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

        if "emb_patch" in transformer_options.get("patches", {}):
            raise UnsupportedModelError("AsynDM cannot combine per-pixel timesteps with 'emb_patch' model patches")
        t_map = self.tiled(self.t_map.to(x.device), x.shape[0])
        uniq, inverse = torch.unique(t_map, return_inverse=True)
        emb = dm.time_embed(timestep_embedding(uniq.float(), dm.model_channels, repeat_only=False).to(x.dtype))
        if dm.num_classes is not None:  # SDXL: the ADM vector stays per image
            label = dm.label_emb(y)
            k = emb.shape[0]
            self.rows = (emb[None] + label[:, None]).reshape(-1, emb.shape[-1])
            self.index = inverse + (torch.arange(x.shape[0], device=x.device) * k).view(-1, 1, 1)
        else:
            self.rows, self.index = emb, inverse
        self._index_cache = {}

    def index_at(self, stride: int):
        idx = self._index_cache.get(stride)
        if idx is None:
            idx = self.index[:, ::stride, ::stride]
            self._index_cache[stride] = idx
        return idx

    # attention ----------------------------------------------------------------------------
    def _token_weights(self, length, device):
        """(L, N) matrix: mean over an item's tokens of the summed repeats of each token."""
        w = self._weights.get((length, device))
        if w is None:
            w = torch.zeros(length, len(self.items), device=device)
            reps = max(length // self.context_len, 1)
            for j, positions in enumerate(self.items):
                for p in positions:
                    for m in range(reps):
                        q = p + m * self.context_len
                        if q < length:
                            w[q, j] += 1.0 / len(positions)
            self._weights[(length, device)] = w
        return w

    def record_attention(self, q, k, extra_options, stride):
        flags = list(extra_options.get("cond_or_uncond", [0]))
        per = q.shape[0] // max(len(flags), 1)
        rows = [c * per + i for c, flag in enumerate(flags) if flag == 0 for i in range(per)]
        if not rows:
            return
        heads = extra_options["n_heads"]
        dim_head = q.shape[-1] // heads
        sel = torch.tensor(rows, device=q.device)
        qc = q.index_select(0, sel).float().view(len(rows), -1, heads, dim_head).transpose(1, 2)
        kc = k.index_select(0, sel).float().view(len(rows), -1, heads, dim_head).transpose(1, 2)
        probs = torch.softmax(qc @ kc.transpose(-1, -2) * dim_head**-0.5, dim=-1).mean(dim=1)  # (b, Nq, L)
        maps = probs @ self._token_weights(kc.shape[-2], q.device)  # (b, Nq, items)
        height, width = extra_options["original_shape"][-2:]
        h, w = -(-height // stride), -(-width // stride)
        if h * w != maps.shape[1]:
            return  # an unexpected grid (e.g. a patch changed the resolution): skip this layer
        maps = maps.view(len(rows), h, w, -1).permute(0, 3, 1, 2)
        maps = maps.view(-1, per, *maps.shape[1:]).mean(dim=0)  # average several cond chunks
        if per != self.batch:
            return
        self.map_sum = maps if self.map_sum is None else self.map_sum + maps
        self.map_count += 1


# --------------------------------------------------------------------------------------------
# patches
# --------------------------------------------------------------------------------------------
class PixelEmbLayers(torch.nn.Sequential):
    """A ResBlock's ``emb_layers`` (same child modules) that returns a per-pixel (B, C, h, w)
    projection during an active AsynDM call and the stock (B, C) one otherwise."""

    def __init__(self, original: torch.nn.Sequential, ctx: PixelContext, stride: int):
        super().__init__(*original.children())
        object.__setattr__(self, "_asyndm_ctx", ctx)  # plain attribute, not a submodule
        self.stride = stride

    def forward(self, emb):
        ctx = self._asyndm_ctx
        if not ctx.active or ctx.rows is None:
            return super().forward(emb)
        proj = super().forward(ctx.rows)  # a handful of rows, never one per pixel
        return proj[ctx.index_at(self.stride)].permute(0, 3, 1, 2)


def _per_pixel_denoised(sampling, sigma, model_output, model_input):
    """ComfyUI's calculate_denoised with a (B, 1, H, W) sigma (same formulas, broadcast)."""
    import comfy.model_sampling as ms

    sd = sampling.sigma_data
    if isinstance(sampling, ms.V_PREDICTION):
        return model_input * sd**2 / (sigma**2 + sd**2) - model_output * sigma * sd / (sigma**2 + sd**2) ** 0.5
    return model_input - model_output * sigma


def _apply_model_wrapper(ctx: PixelContext):
    def wrapper(executor, x, t, *args, **kwargs):
        if not ctx.active:
            return executor(x, t, *args, **kwargs)
        if tuple(x.shape[-2:]) != tuple(ctx.sigma_map.shape[-2:]):
            raise UnsupportedModelError(
                f"AsynDM got a {tuple(x.shape[-2:])} crop of the {tuple(ctx.sigma_map.shape[-2:])} latent: area "
                "conditioning (Conditioning Set Area, or Set Mask with set_cond_area 'mask bounds') crops the latent "
                "and is not supported. Use Conditioning (Set Mask) with set_cond_area 'default' instead."
            )
        sampling = executor.class_obj.model_sampling
        sd2 = sampling.sigma_data**2
        sigma_pix = ctx.tiled(ctx.sigma_map.to(x.device, torch.float32), x.shape[0])[:, None]
        sigma_img = t.to(x.device, torch.float32).view(-1, 1, 1, 1)
        # BaseModel divides by sqrt(σ_img² + σd²); pre-scale so the UNet sees x / sqrt(σ_pix² + σd²)
        scale = (sigma_img**2 + sd2) ** 0.5 / (sigma_pix**2 + sd2) ** 0.5
        ctx.raw_output = None
        executor(x * scale.to(x.dtype), t, *args, **kwargs)
        out = ctx.raw_output
        ctx.raw_output = None
        if out is None:
            raise RuntimeError("AsynDM: the diffusion model wrapper did not run (another patch bypassed the UNet)")
        return _per_pixel_denoised(sampling, sigma_pix, out.float(), x)

    return wrapper


def _diffusion_model_wrapper(ctx: PixelContext):
    def wrapper(executor, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kwargs):
        if not ctx.active:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        ctx.prepare_embeddings(executor.class_obj, x, y, transformer_options)
        try:
            out = executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            ctx.rows = ctx.index = None
            ctx._index_cache = {}
        ctx.raw_output = out
        return out

    return wrapper


def _attn2_capture(ctx: PixelContext, stride: int, previous=None):
    def attn2(q, k, v, extra_options):
        if previous is not None:
            out = previous(q, k, v, extra_options)
        else:
            from comfy.ldm.modules import attention

            out = attention.optimized_attention(
                q, k, v, extra_options["n_heads"],
                attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options,
            )
        if ctx.active and ctx.capture:
            ctx.record_attention(q, k, extra_options, stride)
        return out

    return attn2


def patch_model(model_patcher, ctx: PixelContext, capture_stride: int = 4):
    """A clone of ``model_patcher`` that evaluates per-pixel timesteps while ``ctx.call`` is
    active. Returns (clone, chosen capture stride)."""
    import comfy.patcher_extension as pe

    dm, _ = check_supported(model_patcher)
    resblocks, attentions = unet_layout(dm)
    stride = pick_capture_stride(attentions, capture_stride)
    m = model_patcher.clone()
    for path, s in resblocks.items():
        original = m.get_model_object(path)
        if isinstance(original, PixelEmbLayers):  # a clone of an already patched MODEL
            original = torch.nn.Sequential(*original.children())
        m.add_object_patch(path, PixelEmbLayers(original, ctx, s))
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model_wrapper(ctx))
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _diffusion_model_wrapper(ctx))
    replace = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for block_name, block_id, index, s in attentions:
        if s != stride:
            continue
        previous = replace.get((block_name, block_id, index)) or replace.get((block_name, block_id))
        m.set_model_attn2_replace(_attn2_capture(ctx, s, previous), block_name, block_id, index)
    return m, stride
