"""Masks read inside a block's own joint attention (DESIGN.md, "Backend protocol": the read).

A mask is the head-averaged probability an image query gives a word's text tokens in the joint
softmax over all keys: p = Σ_t w_t · exp(q·k_t / √d − lse), where lse is the query's log-sum-exp
over every key the block attends to. The block's attention computes exactly that normaliser, so a
read block's attention runs through ComfyUI's ``optimized_attention_override`` (transformer_options)
on a fused kernel that also returns it (``attention_with_lse``); the read is then a product of the
image queries with the few target tokens' keys, nothing the size of the attention. The q / k are the
ones the model attends with (after its norms and RoPE, grouped heads repeated), the mask the one it
passes. Where no such kernel takes the call (not a CPU tensor) or another override is already set
(another node's attention, kept), that attention runs and the read recomputes the normaliser
(comfy_dit.joint_item_attention, about one attention more).

A family arms the read around one attention call of each read block (``reading``: a context manager
for a ``dit`` replace patch, ``arm``: module hooks), with the joint sequence's layout per captured
row: which keys are the prompt's text and where the image queries start.
"""

from contextlib import contextmanager
from typing import Callable, Optional, Tuple

import torch

from .comfy_call import Forward
from .comfy_dit import joint_item_attention, keep_token_maps

OVERRIDE = "optimized_attention_override"
ARGS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
# row → (the prompt's text keys, the first image query) in the joint sequence
Layout = Callable[[int], Tuple[slice, int]]


def attention_with_lse(q, k, v, mask=None) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """q, k, v (B, H, L, d) → (out (B, H, L, d), lse (B, H, L) float32) from the fused kernel a CPU
    ``scaled_dot_product_attention`` runs (the same output), or None where it does not apply."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if mask is not None:  # as ComfyUI's attention_pytorch: (L, L) / (B, L, L) → (B, H, L, L); booleans additive
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
        mask = mask.unsqueeze(1) if mask.ndim == 3 else mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        mask = mask.to(q.dtype)
    try:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)
    except RuntimeError:  # shapes or a mask this kernel does not take
        return None
    return out, lse


def lse_item_attention(q, k_txt, lse, weights):
    """q (b, H, n, d), k_txt (b, H, Lt, d), lse (b, H, n), weights (Lt, N) → (b, n, N): each item's
    head-averaged probability mass, Σ_t w_t exp(q·k_t/√d − lse), over the tokens that carry weight."""
    w = weights.to(q.device, torch.float32)
    cols = (w != 0).any(dim=1).nonzero().flatten()
    logits = q.float() @ k_txt[:, :, cols].float().transpose(-1, -2) * q.shape[-1] ** -0.5
    return (torch.exp(logits - lse[..., None].float()) @ w[cols]).mean(dim=1)


def item_maps(fwd: Forward, layout: Layout, q, k, lse=None, mask=None, offset: int = 0):
    """The captured rows' maps from a joint attention's q / k (B, H, L, d), kept on the call."""
    n, maps = fwd.tokens.shape[1], []
    for b in fwd.capture_rows:
        text, start = layout(b)
        text = slice(text.start, text.stop - fwd.text_tail)  # tokens after the prompt's: never a target
        qb, kb = q[b:b + 1, :, start:start + n], k[b:b + 1]
        w = fwd.weights(text.stop - text.start, offset)
        if lse is not None:
            maps.append(lse_item_attention(qb, kb[:, :, text], lse[b:b + 1, :, start:start + n], w))
            continue
        mb = None
        if mask is not None:  # the key order below: [text | the rest]
            mb = mask if mask.ndim == 4 else mask.view(*([1] * (4 - mask.ndim)), *mask.shape)
            mb = mb[b:b + 1] if mb.shape[0] > 1 else mb
            mb = torch.cat([mb[..., text], mb[..., :text.start], mb[..., text.stop:]], dim=-1)
            mb = mb[..., start:start + n, :] if mb.shape[-2] > 1 else mb
        rest = torch.cat([kb[:, :, :text.start], kb[:, :, text.stop:]], dim=2)
        maps.append(joint_item_attention(qb, kb[:, :, text], rest, w, mask=mb))
    keep_token_maps(fwd, torch.cat(maps))


def _heads(t, heads, skip_reshape):
    return t if skip_reshape else t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def install(fwd: Forward, transformer_options: dict) -> dict:
    """The forward's transformer_options with the read's override (any earlier one chained):
    attention calls run as before unless a read is armed."""
    previous = transformer_options.get(OVERRIDE)

    def stock(func, *args, **kwargs):
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

    def override(func, *args, **kwargs):
        armed = fwd.reading
        if armed is None:
            return stock(func, *args, **kwargs)
        fwd.reading = None  # one joint attention per read block
        layout, offset = armed
        a = dict(zip(ARGS, args), **kwargs)  # ComfyUI's attention signature, by position or name
        mask, skip_reshape = a.get("mask"), a.get("skip_reshape", False)
        qh, kh, vh = (_heads(a[n], a["heads"], skip_reshape) for n in ("q", "k", "v"))
        fused = None if previous is not None else attention_with_lse(qh, kh, vh, mask)
        if fused is None:
            out = stock(func, *args, **kwargs)
            item_maps(fwd, layout, qh, kh, mask=mask, offset=offset)
            return out
        out, lse = fused
        item_maps(fwd, layout, qh, kh, lse=lse, offset=offset)
        if a.get("skip_output_reshape", False):
            return out
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    return dict(transformer_options, **{OVERRIDE: override})


@contextmanager
def reading(fwd: Forward, layout: Layout, offset: int = 0):
    """Arm the read for the next attention call inside this block (a ``dit`` replace patch)."""
    fwd.reading = (layout, offset)
    try:
        yield
    finally:
        missed, fwd.reading = fwd.reading is not None, None
    if missed:
        raise RuntimeError("AsynDM: a block whose attention the masks read ran without ComfyUI's attention "
                           "override (another node replaced the attention function, or this ComfyUI passes no "
                           "transformer_options to it), so no mask could be read. Remove that attention patch, or "
                           "set mask_source to 'mask input' with a MASK.")


def arm(fwd: Forward, module: torch.nn.Module, layout_of) -> list:
    """Module hooks that arm the read around ``module``'s forward; ``layout_of(args, kwargs)`` →
    (layout, offset) from its inputs."""
    state = []

    def pre(m, args, kwargs):
        state[:] = [reading(fwd, *layout_of(args, kwargs))]
        state[0].__enter__()

    def post(m, args, kwargs, output):
        state.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True)]
