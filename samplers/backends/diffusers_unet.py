"""AsynDM backend for diffusers' UNet2DConditionModel (SD1.x, SD2.x incl. v-prediction, SDXL).

``DiffusersDenoiser`` is the engine's ``model_fn(x, sigma_map, capture) -> (denoised, item_maps)``
(engine.py): x is in sigma space (x = x0 + σ·ε), σ a per-pixel map (B, 1, H, W). The UNet sees
x / sqrt(1 + σ²) at the per-pixel integer timesteps ``model_sampling.timestep(σ)``, as ComfyUI's
discrete models do, and its output becomes a denoised latent per pixel.

Per-pixel timesteps without copying the UNet's forward: the stock forward runs, and for the
duration of one call hooks make every ResnetBlock2D add a per-pixel time embedding instead of
its per-image one. Embeddings are computed only for the distinct timesteps of the call (per
image only where a per-image vector such as SDXL's size embedding is added) and gathered per
pixel (pixel_math.py). Attention capture hooks the cross-attention layers at one stride
(``pick_capture_stride``) and computes probabilities only there, only for the conditional half
of the CFG batch and only for the item tokens.
"""

from contextlib import contextmanager, nullcontext
from typing import List, Optional, Sequence

import torch

from .pixel_math import distinct_rows, gather_rows, item_attention, pick_capture_stride, strided_index, token_weights

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _resnets(unet):
    from diffusers.models.resnet import ResnetBlock2D

    for module in unet.modules():
        if isinstance(module, ResnetBlock2D) and module.time_emb_proj is not None:
            if module.time_embedding_norm != "default":
                raise NotImplementedError(
                    f"per-pixel timesteps support ResNet blocks with time_embedding_norm='default', "
                    f"not {module.time_embedding_norm!r}"
                )
            yield module


def cross_attention_strides(unet) -> dict:
    """{cross-attention module: its stride (latent pixels per feature pixel)}.

    Down block i runs at stride 2^i, the mid block at the deepest stride, up block j at
    2^(n-1-j) (each up block upsamples only at its end)."""
    n = len(unet.down_blocks)
    levels = [(block, 2**i) for i, block in enumerate(unet.down_blocks)]
    levels += [(block, 2 ** (n - 1 - j)) for j, block in enumerate(unet.up_blocks)]
    if unet.mid_block is not None:
        levels.append((unet.mid_block, 2 ** (n - 1)))
    found = {}
    for block, stride in levels:
        for name, module in block.named_modules():
            if name.endswith("attn2") and hasattr(module, "to_q"):
                found[module] = stride
    return found


def _per_image_vector(unet, sample, dtype, encoder_hidden_states, added_cond_kwargs, class_labels):
    """The (B, D) vector the stock forward adds to every image's time embedding, or None."""
    vec = None
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        if unet.config.class_embeddings_concat:
            raise NotImplementedError("per-pixel timesteps do not support class_embeddings_concat")
        vec = class_emb
    probe = torch.zeros(1, dtype=dtype, device=sample.device)  # get_aug_embed reads only emb's dtype
    aug = unet.get_aug_embed(emb=probe, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added_cond_kwargs or {})
    if isinstance(aug, tuple):
        raise NotImplementedError("per-pixel timesteps do not support image_hint conditioning")
    if aug is not None:
        vec = aug if vec is None else vec + aug
    return vec


def _pixel_embedding_rows(unet, sample, timestep_map, encoder_hidden_states, added_cond_kwargs, class_labels):
    """Embedding rows and the row index (B, H, W) of every pixel (DESIGN.md invariant 6): the time
    MLP runs once per distinct timestep; rows are (image, timestep) pairs only where a per-image
    vector is added."""
    dtype = sample.dtype
    uniq, _, _ = distinct_rows(timestep_map, per_image=False)
    emb = unet.time_embedding(unet.time_proj(uniq).to(dtype=dtype), None)
    vec = _per_image_vector(unet, sample, dtype, encoder_hidden_states, added_cond_kwargs, class_labels)
    if vec is None:
        _, _, index = distinct_rows(timestep_map, per_image=False)
    else:
        row_t, row_img, index = distinct_rows(timestep_map, per_image=True)
        emb = emb[torch.searchsorted(uniq, row_t.contiguous())] + vec[row_img]
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb, index


@contextmanager
def _pixel_timestep_hooks(unet, emb_rows, index_map):
    handles, bypass = [], [False]
    height, width = index_map.shape[-2:]

    def add_pixel_temb(resnet):
        def hook(module, args, output):
            h, w = output.shape[-2:]
            rows = resnet.nonlinearity(emb_rows) if not resnet.skip_time_act else emb_rows
            bypass[0] = True
            try:
                rows = resnet.time_emb_proj(rows)
            finally:
                bypass[0] = False
            idx = strided_index(index_map, max(height // h, 1), h, w)
            return output + gather_rows(rows, idx).to(output.dtype)

        return hook

    def silence_image_temb(module, args, output):
        # the per-image embedding is replaced by the per-pixel one added after conv1
        return output if bypass[0] else torch.zeros_like(output)

    try:
        for resnet in _resnets(unet):
            handles.append(resnet.conv1.register_forward_hook(add_pixel_temb(resnet)))
            handles.append(resnet.time_emb_proj.register_forward_hook(silence_image_temb))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _attention_capture(layers, batch_slice, positions, store: List):
    """Record, per hooked layer, (b, Q, N) head-averaged probabilities of each item's token positions."""

    def hook(attn, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        if context is None or hidden.ndim != 3:
            return
        hidden, context = hidden[batch_slice], context[batch_slice]
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        length = context.shape[1]  # diffusers never repeats the context: every token once
        weights = token_weights(positions, length, length, hidden.device)
        store.append(item_attention(attn.to_q(hidden), attn.to_k(context), attn.heads, weights))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def unet_capture_stride(unet, size, wanted: int = 4) -> int:
    """The stride attention is read at for a latent of ``size`` (H, W): ``wanted`` if a
    cross-attention level has it, else pixel_math's one rule for a missing level."""
    strides = [s for s in cross_attention_strides(unet).values() if s <= min(size)]
    return pick_capture_stride(strides, wanted)


def pixel_forward(
    unet,
    sample: torch.Tensor,
    timestep_map: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    added_cond_kwargs: Optional[dict] = None,
    class_labels=None,
    positions: Optional[Sequence[Sequence[int]]] = None,
    capture_slice=slice(None),
    capture_stride: int = 4,
    force_per_pixel: bool = False,
):
    """Raw UNet output for integer per-pixel timesteps ``timestep_map`` (B, H, W).

    With ``positions`` (one list of token positions per item) also returns the item maps
    (b, N, ⌈H/s⌉, ⌈W/s⌉) of the ``capture_slice`` images, s = the capture stride for the wanted
    ``capture_stride`` (see ``unet_capture_stride``), else None.
    """
    _, _, height, width = sample.shape
    timestep_map = timestep_map.to(sample.device).long()
    if timestep_map.shape != (sample.shape[0], height, width):
        raise ValueError(f"timestep map {tuple(timestep_map.shape)} does not match the sample {tuple(sample.shape)}")
    flat = timestep_map.flatten(1)
    constant = bool((flat == flat[:, :1]).all())
    per_image_t = flat[:, 0]

    store: List[torch.Tensor] = []
    capture = nullcontext()
    if positions:
        stride = unet_capture_stride(unet, (height, width), capture_stride)
        layers = [m for m, s in cross_attention_strides(unet).items() if s == stride]
        capture = _attention_capture(layers, capture_slice, [list(g) for g in positions], store)
    kwargs = dict(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                  class_labels=class_labels, return_dict=False)
    with torch.no_grad(), capture:
        if constant and not force_per_pixel:
            out = unet(sample, per_image_t, **kwargs)[0]
        else:
            rows, index_map = _pixel_embedding_rows(
                unet, sample, timestep_map, encoder_hidden_states, added_cond_kwargs, class_labels
            )
            with _pixel_timestep_hooks(unet, rows, index_map):
                out = unet(sample, per_image_t, **kwargs)[0]
    maps = None
    if positions:
        if not store:
            raise RuntimeError("no cross-attention layer ran at the capture stride: another hook or processor "
                               "bypasses the UNet's attention modules")
        gh, gw = -(-height // stride), -(-width // stride)
        maps = torch.stack(store, dim=0).mean(dim=0)  # (b, Q, N)
        maps = maps.permute(0, 2, 1).reshape(maps.shape[0], maps.shape[2], gh, gw)
    return out, maps


def model_sampling_of(scheduler_config: dict):
    """The model's sigma <-> timestep map (schedulers.DiscreteModelSampling) from a diffusers scheduler
    config; ᾱ computed by diffusers' DDIMScheduler itself."""
    from diffusers import DDIMScheduler

    from ..schedulers import DiscreteModelSampling

    return DiscreteModelSampling(DDIMScheduler.from_config(dict(scheduler_config)).alphas_cumprod)


class DiffusersDenoiser:
    """The engine's ``model_fn`` for a diffusers UNet with classifier-free guidance.

    ``model_sampling`` is a ``DiscreteModelSampling`` (or a diffusers scheduler config); ``cond``/``uncond``
    are prompt embeddings (B, L, D); the CFG batch is [uncond; cond] as in the reference, and
    attention is captured from the cond half. ``capture_stride`` is the wanted capture stride.
    """

    def __init__(self, unet, model_sampling, cond, uncond=None, *, prediction_type="epsilon", guidance_scale=5.0,
                 positions=(), capture_stride=4, added_cond=None, uncond_added_cond=None, force_per_pixel=False):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction type {prediction_type!r} is not supported: use one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        if isinstance(model_sampling, dict):
            model_sampling = model_sampling_of(model_sampling)
        self.unet, self.model_sampling, self.cond, self.uncond = unet, model_sampling, cond, uncond
        self.prediction_type = prediction_type
        self.guidance_scale = guidance_scale
        self.positions = [list(g) for g in positions]
        self.capture_stride = capture_stride
        self.added_cond, self.uncond_added_cond = added_cond, uncond_added_cond
        self.force_per_pixel = force_per_pixel

    def _use_cfg(self):
        return self.uncond is not None and self.guidance_scale != 1.0

    def timesteps(self, sigma_map: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) sigmas → (B, H, W) nearest integer timesteps, looked up once per distinct sigma."""
        uniq, inverse = torch.unique(sigma_map[:, 0].float(), return_inverse=True)
        t = self.model_sampling.timestep(uniq.cpu()).to(sigma_map.device)
        t = torch.where(uniq.to(t.device) > 0, t, torch.zeros_like(t))  # σ = 0 is timestep 0
        return t[inverse].long()

    def raw(self, x_in, timesteps, capture=False):
        """Guided model output for the UNet input ``x_in`` (VP space) at integer timesteps (B, H, W)."""
        b = x_in.shape[0]
        dtype = next(self.unet.parameters()).dtype
        if self._use_cfg():
            x2, t2 = torch.cat([x_in, x_in]), torch.cat([timesteps, timesteps])
            context = torch.cat([self.uncond, self.cond])
            added = _cat_added(self.uncond_added_cond, self.added_cond)
            cond_slice = slice(b, 2 * b)
        else:
            x2, t2, context, added, cond_slice = x_in, timesteps, self.cond, self.added_cond, slice(None)
        out, maps = pixel_forward(
            self.unet, x2.to(dtype), t2, context.to(dtype), added_cond_kwargs=added,
            positions=self.positions if (capture and self.positions) else None,
            capture_slice=cond_slice, capture_stride=self.capture_stride, force_per_pixel=self.force_per_pixel,
        )
        out = out.to(x_in.dtype)
        if self._use_cfg():
            uncond_out, cond_out = out.chunk(2)
            out = uncond_out + self.guidance_scale * (cond_out - uncond_out)
        return out, (maps.float() if maps is not None else None)

    def __call__(self, x, sigma_map, capture=False):
        sigma = torch.as_tensor(sigma_map, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0 or sigma.numel() == x.shape[0]:  # one sigma per image: a constant map
            sigma = sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[-2:])
        if sigma.shape != (x.shape[0], 1, *x.shape[-2:]):
            raise ValueError(f"sigma map {tuple(sigma.shape)} does not match the latent {tuple(x.shape)}: "
                             "give (B, 1, H, W)")
        scale = (sigma**2 + 1) ** 0.5
        out, maps = self.raw(x / scale, self.timesteps(sigma), capture)
        if self.prediction_type == "epsilon":
            denoised = x - sigma * out
        elif self.prediction_type == "v_prediction":
            denoised = x / (sigma**2 + 1) - out * sigma / scale
        else:
            denoised = out
        return denoised, maps


def _cat_added(uncond, cond):
    if cond is None:
        return None
    return {key: torch.cat([uncond[key], cond[key]]) for key in cond}
