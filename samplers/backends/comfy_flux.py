"""AsynDM backend for ComfyUI's Flux (dev, schnell, their fine-tunes; Kontext's reference tokens).

Per forward (hooks that live only inside one APPLY_MODEL call, comfy_dit.py):

- ``time_in`` / ``guidance_in`` / ``vector_in``: the stock per-image ``vec`` is kept for the text
  stream (the background timestep); beside it the rows ``time_in(t) + guidance + vector_in(y)``
  are built for the distinct (image, timestep) pairs only — the guidance embedding of
  guidance-distilled models is the stock one, untouched.
- every DoubleStreamBlock's ``img_mod``, every SingleStreamBlock's ``modulation`` (image tokens
  only; the text tokens keep the stock vector) and the final layer's ``adaLN_modulation``:
  the block's own Linear applied to those rows, gathered per token (LoRA patches apply, they
  are the same modules).

Masks: the joint attention of image queries (after RoPE, as the model attends) to the target
words' T5 tokens, softmax over all [text | image] keys, from the three middle double-stream
blocks (``middle_blocks``): in Flux the text keys are separate projections only in the
double-stream blocks, and the middle ones localise nouns best, while the first still mostly
see layout and the last specialise on detail. Resolution: the token grid (latent / 2), the
only one a DiT has. Conditional rows only, captured steps only: the ``dit`` replace patch exists
only in calls that capture, and arms the read inside the block's own attention (attention_read.py).
"""

from dataclasses import dataclass
from typing import Optional

import torch

from .comfy_call import FORWARD_KEY
from .attention_read import reading
from .comfy_dit import per_token
from .protocol import PixelBackend, chain_blocks, register, unsupported


@dataclass
class _Streams:  # the image and text token streams of one forward, as the model embedded them
    img: Optional[torch.Tensor] = None
    txt: Optional[torch.Tensor] = None


class FluxLike(PixelBackend):
    """Flux's stream layout and capture, shared by the Flux-derived families."""

    TEXT = "t5xxl"
    BLOCKS = "double_blocks"
    IMG_FIRST = False  # the joint sequence's order: Flux [text | image], HunyuanVideo's blocks [image | text]

    def validate(self, model_patcher, dm):
        if not len(dm.double_blocks) or not hasattr(dm, "final_layer"):
            raise unsupported(f"this {self.FAMILY} MODEL has no double-stream blocks or final layer")

    def patch_replace(self, call, replace):
        if call.capture:
            chain_blocks(replace, "double_block", self.capture_blocks, lambda i: _capture(self.IMG_FIRST))


@register
class ComfyFluxBackend(FluxLike):
    FAMILY = "Flux (dev, schnell and fine-tunes)"
    MODEL = "comfy.ldm.flux.model.Flux"

    def hooks(self, dm, fwd, transformer_options):
        from comfy.ldm.flux.layers import ModulationOut, timestep_embedding

        streams = _Streams()

        def time_rows(module, args, output):
            fwd.time = module.forward(timestep_embedding(fwd.uniq_t.to(output.device), 256).to(output.dtype))

        def keep(name):
            def hook(module, args, output):
                setattr(streams, name, output)
            return hook

        def extra_tokens():  # Kontext: reference-image tokens after the image's own (background)
            return streams.img.shape[1] - fwd.tokens.shape[1]

        def double(module, args, output):
            stock = torch.cat([output[0].shift, output[0].scale, output[0].gate,
                               output[1].shift, output[1].scale, output[1].gate], dim=-1)
            c = per_token(fwd, module.lin(torch.nn.functional.silu(fwd.rows())), stock, after=extra_tokens(), parts=6)
            return ModulationOut(*c[:3]), ModulationOut(*c[3:])

        def single(module, args, output):
            stock = torch.cat([output[0].shift, output[0].scale, output[0].gate], dim=-1)
            c = per_token(fwd, module.lin(torch.nn.functional.silu(fwd.rows())), stock,
                          before=streams.txt.shape[1], after=extra_tokens(), parts=3)
            return ModulationOut(*c), None

        def final(module, args, output):
            return per_token(fwd, module.forward(fwd.rows()), output, after=extra_tokens())

        handles = [dm.time_in.register_forward_hook(time_rows), dm.img_in.register_forward_hook(keep("img")),
                   dm.txt_in.register_forward_hook(keep("txt"))]
        if dm.params.guidance_embed:  # called only when the conditioning has a guidance value
            handles.append(dm.guidance_in.register_forward_hook(fwd.keep_per_image))
        handles.append(dm.vector_in.register_forward_hook(fwd.keep_per_image))  # after guidance: the stock order
        handles += [b.img_mod.register_forward_hook(double) for b in dm.double_blocks]
        handles += [b.modulation.register_forward_hook(single) for b in dm.single_blocks]
        handles.append(dm.final_layer.adaLN_modulation.register_forward_hook(final))
        return handles


def _capture(img_first=False):
    def patch(args, original_block):
        fwd = (args.get("transformer_options") or {}).get(FORWARD_KEY)
        if fwd is None or not fwd.capture_rows:
            return original_block(args)
        n_txt, n_img = args["txt"].shape[1], args["img"].shape[1]  # the image stream: Kontext's reference tokens too
        text, start = (slice(n_img, n_img + n_txt), 0) if img_first else (slice(0, n_txt), n_txt)
        with reading(fwd, lambda b: (text, start)):
            return original_block(args)

    return patch
