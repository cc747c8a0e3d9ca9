"""AsynDM backend for ComfyUI's MMDiT (SD3, SD3.5 medium/large/turbo).

MMDiT's blocks chunk the modulation along dim 1 and unsqueeze it per image, so a forward hook
cannot hand them per-token values; each JointBlock is instead run by a ``dit`` replace patch
that performs the stock block mixing (same modules and order, LoRA patches included) with the
x stream's adaLN gathered per token, and the context stream on the stock per-image vector (the
background timestep). SD3.5 medium's extra x self-attention (``x_block_self_attn``) is covered.
The final layer's output is recomputed per token by a forward hook. The vector rows are
``t_embedder(t) + y_embedder(pooled)`` for the distinct (image, timestep) pairs only.

Masks: joint attention (softmax over [context | image] keys) of the image queries to the
targets' tokens in the three middle joint blocks, read on the CLIP part of the context. The
joint context is [CLIP-L ‖ CLIP-G (77 per chunk, zero-padded to 4096 channels) | T5]; the CLIP
part always starts at position 0 whether or not T5 is loaded (SD3 runs without it), and CLIP-L
and CLIP-G place every word identically, so one set of positions (tokens.py) reads both.
"""

import torch

from .comfy_call import FORWARD_KEY
from .comfy_dit import per_token, record_maps, time_rows
from .protocol import PixelBackend, chain_blocks, register, unsupported


@register
class ComfyMMDiTBackend(PixelBackend):
    FAMILY = "SD3/SD3.5 (MMDiT)"
    MODEL = "comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper"
    TEXT = "l / g (CLIP part of the joint context)"
    BLOCKS = "joint_blocks"

    def capture_depth(self):  # the last block's context stream is pre-only: it still attends, but keep to full blocks
        return max(len(self.dm.joint_blocks) - 1, 1)

    def validate(self, model_patcher, dm):
        if dm.context_processor is not None or not hasattr(dm, "final_layer"):
            raise unsupported("this MMDiT variant (context processor / no final layer) is not covered")

    def hooks(self, dm, fwd, transformer_options):
        def final(module, args, output):
            x = args[0]
            shift, scale = per_token(fwd, module.adaLN_modulation.forward(fwd.rows()), x).chunk(2, dim=-1)
            return module.linear(torch.addcmul(shift, module.norm_final(x), 1 + scale))

        handles = [dm.t_embedder.register_forward_hook(time_rows(fwd), with_kwargs=True),
                   dm.final_layer.register_forward_hook(final)]
        if dm.y_embedder is not None:
            handles.append(dm.y_embedder.register_forward_hook(fwd.keep_per_image))
        return handles

    def patch_replace(self, call, replace):
        chain_blocks(replace, "double_block", range(len(self.dm.joint_blocks)),
                     lambda i: _joint_block(self.dm, i, i in self.capture_blocks and call.capture))


def _mod(x, shift, scale):
    return x * (1 + scale) if shift is None else torch.addcmul(shift, x, 1 + scale)


def _joint_block(dm, index, capture):
    def patch(args, original_block):
        to = args.get("transformer_options") or {}
        fwd = to.get(FORWARD_KEY)
        if fwd is None:
            return original_block(args)
        from comfy.ldm.modules.attention import optimized_attention

        block = dm.joint_blocks[index]
        cb, xb = block.context_block, block.x_block
        context, x, c = args["txt"], args["img"], args["vec"]
        context_qkv, context_inter = cb.pre_attention(context, c)  # the context on the background
        mods = per_token(fwd, xb.adaLN_modulation.forward(fwd.rows()), x[:, :1])
        if xb.x_block_self_attn:
            (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
             shift_msa2, scale_msa2, gate_msa2) = mods.chunk(9, dim=-1)
            x_norm = xb.norm1(x)
            x_qkv = xb.attn.pre_attention(_mod(x_norm, shift_msa, scale_msa))
            x_qkv2 = xb.attn2.pre_attention(_mod(x_norm, shift_msa2, scale_msa2))
        elif xb.scale_mod_only:
            shift_msa = shift_mlp = None
            scale_msa, gate_msa, scale_mlp, gate_mlp = mods.chunk(4, dim=-1)
            x_qkv = xb.attn.pre_attention(_mod(xb.norm1(x), shift_msa, scale_msa))
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=-1)
            x_qkv = xb.attn.pre_attention(_mod(xb.norm1(x), shift_msa, scale_msa))
        qkv = [torch.cat((context_qkv[t], x_qkv[t]), dim=1) for t in range(3)]
        attn = optimized_attention(qkv[0], qkv[1], qkv[2], heads=xb.attn.num_heads, transformer_options=to)
        n_ctx = context_qkv[0].shape[1]
        context_attn, x_attn = attn[:, :n_ctx], attn[:, n_ctx:]
        if capture and fwd.capture_rows:
            heads = xb.attn.num_heads

            def split(t):  # (B, L, H·d) → (B, H, L, d)
                return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

            record_maps(fwd, split(x_qkv[0]), split(context_qkv[1]), split(x_qkv[1]),
                        context_len_offset=getattr(dm, "register_length", 0))
        context = None if cb.pre_only else cb.post_attention(context_attn, *context_inter)
        if xb.x_block_self_attn:
            attn2 = optimized_attention(x_qkv2[0], x_qkv2[1], x_qkv2[2], heads=xb.attn2.num_heads,
                                        transformer_options=to)
            out1, out2 = gate_msa * xb.attn.post_attention(x_attn), gate_msa2 * xb.attn2.post_attention(attn2)
            x = torch.stack([x, out1, out2], dim=0).sum(dim=0)  # gate_cat's order
        else:
            x = x + gate_msa * xb.attn.post_attention(x_attn)
        x = x + gate_mlp * xb.mlp(_mod(xb.norm2(x), shift_mlp, scale_mlp))
        return {"txt": context, "img": x}

    return patch
