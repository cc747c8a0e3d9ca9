"""AsynDM backend for ComfyUI's MMDiT (SD3, SD3.5 medium/large/turbo).

Per-token time: the vector rows ``t_embedder(t) + y_embedder(pooled)`` for the distinct (image,
timestep) pairs only. Every joint block's x-stream ``adaLN_modulation`` and the final layer's run on
those rows, handed back as a comfy_dit.Gathered: MMDiT's own block code (``pre_attention``,
``modulate``, ``post_attention``, SD3.5 medium's extra x self-attention and ``gate_cat``) splits it
and broadcasts it per image as the stock vector and gathers it per token where used (same modules
and order, LoRA patches included). The context stream's modulation is left alone: it stays on the
stock per-image vector, the background timestep.

Masks: joint attention (softmax over [context | image] keys) of the image queries to the
targets' tokens in the three middle joint blocks, read inside the block's own attention
(attention_read.py; the registers before the context an offset without weight), on the CLIP part
of the context. The joint context is [registers | CLIP-L ‖ CLIP-G
(77 per chunk, zero-padded to 4096 channels) | T5]; the CLIP part always starts right after the
registers whether or not T5 is loaded (SD3 runs without it), and CLIP-L and CLIP-G place every word
identically, so one set of positions (tokens.py) reads both.
"""

from .attention_read import arm
from .comfy_dit import Gathered, time_rows, token_rows
from .protocol import PixelBackend, register, unsupported


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
        def modulation(module, args, output):  # (Bm, k·D) → per image token
            return Gathered(*token_rows(fwd, module.forward(fwd.rows()), output))

        handles = [dm.t_embedder.register_forward_hook(time_rows(fwd), with_kwargs=True),
                   dm.final_layer.adaLN_modulation.register_forward_hook(modulation)]
        handles += [b.x_block.adaLN_modulation.register_forward_hook(modulation) for b in dm.joint_blocks]
        if dm.y_embedder is not None:
            handles.append(dm.y_embedder.register_forward_hook(fwd.keep_per_image))
        if fwd.call.capture and fwd.capture_rows:
            registers = getattr(dm, "register_length", 0)

            def context_first(args, kwargs):  # joint_block(context, x, ...): [context | x]
                n_ctx = args[0].shape[1]
                return (lambda b: (slice(0, n_ctx), n_ctx)), registers

            handles += [h for i in self.capture_blocks for h in arm(fwd, dm.joint_blocks[i], context_first)]
        return handles
