"""AsynDM backend for ComfyUI's Qwen-Image (dual-stream MMDiT, Qwen2.5-VL text tokens).

Per-token time: ``time_text_embed`` runs on the distinct (image, timestep) rows beside ComfyUI's
own call. Qwen-Image's blocks unsqueeze their modulation per image, so each block is run by a
``dit`` replace patch that performs the stock block (same modules and order, LoRA patches
included) with the image stream's ``img_mod`` applied to the rows and gathered per token; the text
stream keeps the stock per-image vector (the background). The final ``norm_out`` is recomputed
per token by a forward hook. The latent is a one-frame video (B, C, 1, H, W): the driver folds it.

Masks: joint attention (softmax over [text | image] keys, after RoPE, as the model attends) of the
image queries to the target words' tokens in the three middle blocks. The text encoder drops the
chat template before the prompt, so the text-encode node shifts the positions onto the context the
model receives (comfyui/tokens.fit_to_context).
"""

import torch

from .comfy_call import FORWARD_KEY
from .comfy_dit import per_token, record_maps, time_rows
from .protocol import PixelBackend, chain_blocks, register, unsupported


def _modulate(x, mod):  # per-token (B, L, 3·D) → modulated x, gate
    shift, scale, gate = mod.chunk(3, dim=-1)
    return torch.addcmul(shift, x, 1 + scale), gate


def _block(dm, index, capture):
    def patch(args, original_block):
        to = args.get("transformer_options") or {}
        fwd = to.get(FORWARD_KEY)
        if fwd is None:
            return original_block(args)
        block = dm.transformer_blocks[index]
        x, txt, temb = args["img"], args["txt"], args["vec"]
        if x.shape[1] != fwd.tokens.shape[1]:
            raise unsupported("reference latents (Qwen-Image Edit) are not covered; use Qwen-Image text-to-image")
        img_mod = per_token(fwd, block.img_mod(fwd.time), x[:, :1, :1].new_zeros(x.shape[0], 1, 6 * x.shape[-1]))
        img_mod1, img_mod2 = img_mod.chunk(2, dim=-1)
        txt_mod1, txt_mod2 = block.txt_mod(temb).chunk(2, dim=-1)
        img_modulated, img_gate1 = _modulate(block.img_norm1(x), img_mod1)
        txt_modulated, txt_gate1 = block._modulate(block.txt_norm1(txt), txt_mod1)
        seen, handles = {}, []
        if capture and fwd.capture_rows:
            for name in ("norm_q", "norm_k", "norm_added_k"):
                handles.append(getattr(block.attn, name).register_forward_hook(
                    lambda m, a, o, name=name: seen.__setitem__(name, o)))
        try:
            img_attn, txt_attn = block.attn(hidden_states=img_modulated, encoder_hidden_states=txt_modulated,
                                            image_rotary_emb=args["pe"], transformer_options=to)
        finally:
            for h in handles:
                h.remove()
        if seen:
            _record(fwd, seen, args["pe"])
        x = x + img_gate1 * img_attn
        txt = txt + txt_gate1 * txt_attn
        img_modulated2, img_gate2 = _modulate(block.img_norm2(x), img_mod2)
        x = torch.addcmul(x, img_gate2, block.img_mlp(img_modulated2))
        txt_modulated2, txt_gate2 = block._modulate(block.txt_norm2(txt), txt_mod2)
        txt = torch.addcmul(txt, txt_gate2, block.txt_mlp(txt_modulated2))
        return {"img": x, "txt": txt}

    return patch


def _record(fwd, seen, pe):
    from comfy.ldm.qwen_image.model import apply_rotary_emb

    k_txt, q_img, k_img = seen["norm_added_k"], seen["norm_q"], seen["norm_k"]  # (B, L, H, d)
    n_txt = k_txt.shape[1]
    # RoPE is per position: the text keys at the text positions, the image queries / keys after them
    k = apply_rotary_emb(torch.cat([k_txt, k_img], dim=1), pe)
    q_img = apply_rotary_emb(torch.cat([k_txt, q_img], dim=1), pe)[:, n_txt:]
    record_maps(fwd, q_img.transpose(1, 2), k[:, :n_txt].transpose(1, 2), k[:, n_txt:].transpose(1, 2))


@register
class ComfyQwenImageBackend(PixelBackend):
    FAMILY = "Qwen-Image"
    MODEL = "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel"
    TEXT = "qwen25_7b (the prompt after the chat template)"
    BLOCKS = "transformer_blocks"

    def hooks(self, dm, fwd, transformer_options):
        def final(module, args, output):
            x = args[0]
            emb = per_token(fwd, module.linear(module.silu(fwd.time)), x[:, :1, :1].new_zeros(x.shape[0], 1, 2 * x.shape[-1]))
            scale, shift = emb.chunk(2, dim=-1)
            return torch.addcmul(shift, module.norm(x), 1 + scale)

        return [dm.time_text_embed.register_forward_hook(time_rows(fwd), with_kwargs=True),
                dm.norm_out.register_forward_hook(final)]

    def patch_replace(self, call, replace):
        chain_blocks(replace, "double_block", range(len(self.dm.transformer_blocks)),
                     lambda i: _block(self.dm, i, i in self.capture_blocks and call.capture))
