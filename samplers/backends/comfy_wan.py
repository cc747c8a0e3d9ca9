"""AsynDM backend for ComfyUI's Wan 2.1 / Wan 2.2 (A14B) text-to-video DiT, and its one-frame
text-to-image use.

Tokens: patches of (1, 2, 2) latent cells over frames × height × width. The sampler folds a video
latent into one tall image, frames stacked along the height (comfy_call.fold), so the plan lives
on the (frame, patch) grid with no frame axis of its own: a token is a 2×2 cell of that image and
Wan's patch order (frame, row, column) is the tall image's row-major token order.

Per-token time: Wan's blocks and head already accept a modulation per token (Wan 2.2 5B feeds
them one). ``time_embedding`` runs on the distinct (image, timestep) rows beside ComfyUI's own
call; ``time_projection``'s stock output is replaced by its rows gathered per token
(B, L, 6·dim), and the head's ``e`` by the time rows gathered per token: the per-token tensors
are gathers of R rows, never an MLP per token.

Masks: the cross-attention of the image tokens to the target words' UMT5 tokens (softmax over the
text keys, after Wan's q/k RMS norms), from the three middle blocks, in query blocks
(comfy_dit.joint_item_attention with no image keys); per frame, since every frame's tokens are
rows of the tall token grid.
"""

import torch

from .comfy_dit import joint_item_attention, keep_token_maps, per_token
from .protocol import PixelBackend, register, unsupported


@register
class ComfyWanBackend(PixelBackend):
    FAMILY = "Wan 2.1 / 2.2 A14B text-to-video (and one-frame text-to-image)"
    MODEL = "comfy.ldm.wan.model.WanModel"
    TEXT = "umt5xxl"
    BLOCKS = "blocks"

    def validate(self, model_patcher, dm):
        from comfy.ldm.wan.model import WanT2VCrossAttention

        p = tuple(dm.patch_size)
        if p[0] != 1 or p[1] != p[2]:
            raise unsupported(f"this Wan MODEL's patch {p} is not (1, p, p)")
        if dm.model_type != "t2v" or type(dm.blocks[0].cross_attn) is not WanT2VCrossAttention:
            raise unsupported(f"this Wan MODEL is {dm.model_type}, not text-to-video")

    def hooks(self, dm, fwd, transformer_options):
        from comfy.ldm.wan.model import sinusoidal_embedding_1d

        if fwd.frames > 1 and (fwd.index.shape[-2] // fwd.frames) % self.cell:
            raise unsupported(f"a video latent's height must be a multiple of {self.cell} (Wan's patch)")

        def time_rows(module, args, output):
            fwd.time = module.forward(sinusoidal_embedding_1d(dm.freq_dim, fwd.uniq_t.to(output.device)).to(
                args[0].dtype))

        def projection(module, args, output):  # (B, 1, 6·dim) per image → (B, L, 6·dim) per token
            return per_token(fwd, module.forward(fwd.time.to(output.dtype)), output)

        def head(module, args):
            x, e = args
            return x, per_token(fwd, fwd.time.to(e.dtype), e)

        handles = [dm.time_embedding.register_forward_hook(time_rows),
                   dm.time_projection.register_forward_hook(projection),
                   dm.head.register_forward_pre_hook(head)]
        if fwd.call.capture and fwd.capture_rows:
            handles += [h for i in self.capture_blocks for h in _capture(dm.blocks[i].cross_attn, fwd)]
        return handles


def _capture(attn, fwd):
    """Hooks on one cross-attention's q / k norms that record the items' attention maps."""
    seen = {}

    def q_hook(module, args, output):
        seen["q"] = output

    def k_hook(module, args, output):
        q, k = seen.pop("q"), output
        sel = torch.tensor(fwd.capture_rows, device=q.device)
        heads = attn.num_heads

        def split(t):  # (B, L, H·d) → (B, H, L, d)
            return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        q, k = split(q.index_select(0, sel)), split(k.index_select(0, sel))
        keep_token_maps(fwd, joint_item_attention(q, k, k[:, :, :0], fwd.weights(k.shape[2])))

    return [attn.norm_q.register_forward_hook(q_hook), attn.norm_k.register_forward_hook(k_hook)]
