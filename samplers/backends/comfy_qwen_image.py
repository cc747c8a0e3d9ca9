"""AsynDM backend for ComfyUI's Qwen-Image (dual-stream MMDiT, Qwen2.5-VL text tokens).

Per-token time: ``time_text_embed`` runs on the distinct (image, timestep) rows beside ComfyUI's
own call. Each block's ``img_mod`` and the final ``norm_out.linear`` run on those rows, their
output handed back as a comfy_dit.Gathered: the block's splits and per-image ``unsqueeze(1)`` read
it as they read the stock vector and gather it per token where it is used, so Qwen-Image's own
block code runs (same modules and order, LoRA patches included); ``txt_mod`` keeps the stock
per-image vector (the background). The latent is a one-frame video (B, C, 1, H, W): the driver
folds it. Reference latents (Qwen-Image Edit widen the image stream) are refused.

Masks: joint attention (softmax over [text | image] keys, after RoPE, as the model attends) of the
image queries to the target words' tokens in the three middle blocks, read inside the block's own
attention (attention_read.py). The text encoder drops the chat template before the prompt, so the
text-encode node shifts the positions onto the context the model receives
(comfyui/tokens.locate_targets).
"""

import torch

from .attention_read import arm
from .comfy_dit import Gathered, time_rows, token_rows
from .protocol import PixelBackend, register, unsupported


@register
class ComfyQwenImageBackend(PixelBackend):
    FAMILY = "Qwen-Image"
    MODEL = "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel"
    TEXT = "qwen25_7b (the prompt after the chat template)"
    BLOCKS = "transformer_blocks"

    def hooks(self, dm, fwd, transformer_options):
        def image_only(module, args, output):
            if output.shape[1] != fwd.tokens.shape[1]:
                raise unsupported("reference latents (Qwen-Image Edit) are not covered; use Qwen-Image text-to-image")

        def img_mod(module, args, output):  # (Bm, 6·D) → per image token
            return Gathered(*token_rows(fwd, module.forward(fwd.rows()), output))

        def final(module, args, output):  # norm_out.linear(silu(temb)): (Bm, 2·D) → per image token
            return Gathered(*token_rows(fwd, module.forward(torch.nn.functional.silu(fwd.rows())), output))

        handles = [dm.time_text_embed.register_forward_hook(time_rows(fwd), with_kwargs=True),
                   dm.img_in.register_forward_hook(image_only), dm.norm_out.linear.register_forward_hook(final)]
        handles += [b.img_mod.register_forward_hook(img_mod) for b in dm.transformer_blocks]
        if fwd.call.capture and fwd.capture_rows:
            handles += [h for i in self.capture_blocks for h in arm(fwd, dm.transformer_blocks[i].attn, _text_first)]
        return handles


def _text_first(args, kwargs):
    """The joint [text | image] layout from the attention's inputs (its text stream by name)."""
    n_txt = kwargs["encoder_hidden_states"].shape[1]
    return (lambda b: (slice(0, n_txt), n_txt)), 0
