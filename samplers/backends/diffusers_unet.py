"""AsynDM backend for diffusers' UNet2DConditionModel (SD1.x, SD2.x incl. v-prediction, SDXL).

Per-pixel timesteps without copying the UNet's forward: the stock forward runs, and for the
duration of one call hooks make every ResnetBlock2D add a per-pixel time embedding instead of
its per-image one. Embeddings are computed only for the distinct (image, timestep) pairs of
the step and gathered per pixel (a feature map at a coarser level takes the top-left latent
pixel of each block, as the AsynDM reference does). Attention capture hooks the cross-attention
layers whose query grid is latent/``attn_fraction`` and computes probabilities only there, only
for the conditional half of the CFG batch and only for the item tokens.
"""

import math
from contextlib import contextmanager
from typing import List, Optional, Sequence

import torch


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


def _cross_attentions(unet):
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_q"):
            yield module


def _pixel_embedding_rows(unet, sample, timestep_map, encoder_hidden_states, added_cond_kwargs, class_labels):
    """Embedding rows for the distinct (image, timestep) pairs and the row index of every pixel."""
    b = timestep_map.shape[0]
    span = int(timestep_map.max().item()) + 1
    key = torch.arange(b, device=timestep_map.device).view(b, 1, 1) * span + timestep_map
    uniq, inverse = torch.unique(key, return_inverse=True)
    row_t, row_b = uniq % span, uniq // span
    emb = unet.time_embedding(unet.time_proj(row_t).to(dtype=sample.dtype), None)
    per_image = 0
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        if unet.config.class_embeddings_concat:
            raise NotImplementedError("per-pixel timesteps do not support class_embeddings_concat")
        per_image = per_image + class_emb
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {})
    if isinstance(aug, tuple):
        raise NotImplementedError("per-pixel timesteps do not support image_hint conditioning")
    if aug is not None:
        per_image = per_image + aug
    if torch.is_tensor(per_image):
        emb = emb + per_image[row_b]
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb, inverse.view_as(timestep_map)


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
            idx = index_map[:, :: max(height // h, 1), :: max(width // w, 1)][:, :h, :w]
            return output + rows[idx].permute(0, 3, 1, 2).to(output.dtype)

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
def _attention_capture(unet, query_len, batch_slice, token_groups, store: List):
    """Record, per hooked layer, (b, Q, N) head-averaged probabilities of each token group."""
    positions = sorted({p for group in token_groups for p in group})
    column = {p: i for i, p in enumerate(positions)}
    group_cols = [[column[p] for p in group] for group in token_groups]

    def hook(attn, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        if context is None or hidden.ndim != 3 or hidden.shape[1] != query_len:
            return
        hidden, context = hidden[batch_slice], context[batch_slice]
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k = attn.to_q(hidden), attn.to_k(context)
        b, heads = q.shape[0], attn.heads
        q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.view(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1])), dim=-1)
        probs = probs[..., positions].mean(dim=1)  # (b, Q, P)
        store.append(torch.stack([probs[..., cols].mean(dim=-1) for cols in group_cols], dim=-1))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in _cross_attentions(unet)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def pixel_forward(
    unet,
    sample: torch.Tensor,
    timestep_map: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    added_cond_kwargs: Optional[dict] = None,
    class_labels=None,
    capture_tokens: Optional[Sequence[Sequence[int]]] = None,
    capture_slice=slice(None),
    attn_fraction: int = 4,
    force_per_pixel: bool = False,
):
    """UNet output for per-pixel timesteps ``timestep_map`` (B, H, W).

    With ``capture_tokens`` (one list of token positions per item) also returns the item maps
    (b, N, H/attn_fraction, W/attn_fraction) of the ``capture_slice`` images, else None.
    """
    _, _, height, width = sample.shape
    timestep_map = timestep_map.to(sample.device).long()
    if timestep_map.shape != (sample.shape[0], height, width):
        raise ValueError(f"timestep map {tuple(timestep_map.shape)} does not match the sample {tuple(sample.shape)}")
    flat = timestep_map.flatten(1)
    constant = bool((flat == flat[:, :1]).all())
    per_image_t = flat[:, 0]

    store: List[torch.Tensor] = []
    gh, gw = height // attn_fraction, width // attn_fraction
    with torch.no_grad():
        capture = (
            _attention_capture(unet, gh * gw, capture_slice, capture_tokens, store)
            if capture_tokens
            else _nullcontext()
        )
        with capture:
            if constant and not force_per_pixel:
                out = unet(sample, per_image_t, encoder_hidden_states=encoder_hidden_states,
                           added_cond_kwargs=added_cond_kwargs, class_labels=class_labels, return_dict=False)[0]
            else:
                rows, index_map = _pixel_embedding_rows(
                    unet, sample, timestep_map, encoder_hidden_states, added_cond_kwargs, class_labels
                )
                with _pixel_timestep_hooks(unet, rows, index_map):
                    out = unet(sample, per_image_t, encoder_hidden_states=encoder_hidden_states,
                               added_cond_kwargs=added_cond_kwargs, class_labels=class_labels, return_dict=False)[0]
    maps = None
    if capture_tokens:
        if not store:
            raise ValueError(
                f"no cross-attention layer has a {gh}x{gw} query grid (latent/{attn_fraction}); "
                "choose another attention fraction for this model and latent size"
            )
        maps = torch.stack(store, dim=0).mean(dim=0)  # (b, Q, N)
        maps = maps.permute(0, 2, 1).reshape(maps.shape[0], maps.shape[2], gh, gw)
    return out, maps


@contextmanager
def _nullcontext():
    yield


class DiffusersDenoiser:
    """A loop.sample denoiser for a diffusers UNet with classifier-free guidance.

    ``cond``/``uncond`` are prompt embeddings (B, L, D); the CFG batch is [uncond; cond] as in
    the reference, and attention is captured from the cond half.
    """

    def __init__(self, unet, cond, uncond=None, *, guidance_scale=5.0, token_groups=(), attn_fraction=4,
                 added_cond=None, uncond_added_cond=None, force_per_pixel=False):
        self.unet, self.cond, self.uncond = unet, cond, uncond
        self.guidance_scale = guidance_scale
        self.token_groups = [list(g) for g in token_groups]
        self.attn_fraction = attn_fraction
        self.added_cond, self.uncond_added_cond = added_cond, uncond_added_cond
        self.force_per_pixel = force_per_pixel

    def _use_cfg(self):
        return self.uncond is not None and self.guidance_scale != 1.0

    def __call__(self, x, timesteps, capture):
        b = x.shape[0]
        dtype = next(self.unet.parameters()).dtype
        if self._use_cfg():
            x_in, t_in = torch.cat([x, x]), torch.cat([timesteps, timesteps])
            context = torch.cat([self.uncond, self.cond])
            added = _cat_added(self.uncond_added_cond, self.added_cond)
            cond_slice = slice(b, 2 * b)
        else:
            x_in, t_in, context, added, cond_slice = x, timesteps, self.cond, self.added_cond, slice(None)
        out, maps = pixel_forward(
            self.unet, x_in.to(dtype), t_in, context.to(dtype), added_cond_kwargs=added,
            capture_tokens=self.token_groups if (capture and self.token_groups) else None,
            capture_slice=cond_slice, attn_fraction=self.attn_fraction, force_per_pixel=self.force_per_pixel,
        )
        out = out.to(x.dtype)
        if self._use_cfg():
            uncond_out, cond_out = out.chunk(2)
            out = uncond_out + self.guidance_scale * (cond_out - uncond_out)
        return out, (maps.float() if maps is not None else None)


def _cat_added(uncond, cond):
    if cond is None:
        return None
    return {key: torch.cat([uncond[key], cond[key]]) for key in cond}
