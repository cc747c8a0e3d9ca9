"""AsynDM backend for ComfyUI's HunyuanImage 2.1 (a HunyuanVideo DiT on 2-D patches, Qwen2.5-VL text).

The model is Flux's layout with the joint sequence flipped ([image | text] in every block) and no
pooled vector (``vector_in`` is None); ``txt_in`` is a token refiner that takes the timestep too —
it keeps the stock per-image one, so the text tokens stay on the background's timestep, as every
family's text stream does. Per forward (hooks alive inside one APPLY_MODEL call):

- ``time_in`` (``time_factor`` 1, as the model embeds it): the rows ``time_in(t) + guidance`` of
  the distinct (image, timestep) pairs only; ``guidance_in`` (guidance-distilled checkpoints) is
  the stock per-image embedding, added in the stock order.
- every double block's ``img_mod``, every single block's ``modulation`` (image tokens only: the
  text and byT5 glyph tokens after them keep the stock vector) and the final layer's
  ``adaLN_modulation``: the block's own Linear on those rows, gathered per token (LoRA applies).

Masks: as Flux (comfy_flux.FluxLike, the ``dit`` replace patch on the three middle double blocks
arming the read inside the block's attention, its q/k after the QK norm and RoPE), with the image first: the joint
attention of image queries to the target words' Qwen2.5 tokens after ``txt_in``, softmax over all
[image | text | glyph] keys. The text encoder drops its chat template as Qwen-Image's does
(comfyui/tokens.locate_targets). The glyph tokens (quoted text, byT5) follow the Qwen2.5 ones in
the text stream: they enter the maps' softmax normaliser as the model attends, never a target's
columns (``Forward.text_tail``), however many there are. A text attention mask (padding) is never
passed for one prompt (ComfyUI drops an all-ones mask); were one passed, padded keys would enter
the maps' normaliser.

Refused: HunyuanVideo (3-D patches: its I2V token-replace modulation and a second text encoder's
word positions are not covered), the HunyuanImage 2.1 refiner (3-D patches, a concatenated image
latent) and meanflow (distilled) checkpoints, whose time embedding averages in the next step's
sigma — a per-image schedule value a per-token plan does not have.
"""

import torch

from .comfy_dit import per_token
from .comfy_flux import FluxLike
from .protocol import register, unsupported


@register
class ComfyHunyuanImageBackend(FluxLike):
    FAMILY = "HunyuanImage 2.1"
    TEXT = "qwen25_7b (the prompt after the chat template)"
    MODEL = "comfy.ldm.hunyuan_video.model.HunyuanVideo"
    IMG_FIRST = True  # cell: the last of its (p, p) square patches on the latent

    def validate(self, model_patcher, dm):
        if len(dm.patch_size) != 2:
            raise unsupported("this MODEL is HunyuanVideo or the HunyuanImage 2.1 refiner (3-D patches), which "
                              "AsynDM does not cover; load the HunyuanImage 2.1 base model")
        if dm.patch_size[0] != dm.patch_size[1]:
            raise unsupported(f"this HunyuanImage MODEL has non-square patches {dm.patch_size}")
        if dm.time_r_in is not None:
            raise unsupported("this HunyuanImage 2.1 MODEL is a meanflow (distilled) checkpoint: its time embedding "
                              "averages in the next step's sigma, which a per-token plan does not have; load the "
                              "non-distilled HunyuanImage 2.1")
        if dm.vector_in is not None:
            raise unsupported("this HunyuanVideo-type MODEL takes a pooled text vector (HunyuanVideo), which AsynDM "
                              "does not cover; load HunyuanImage 2.1")
        super().validate(model_patcher, dm)

    def hooks(self, dm, fwd, transformer_options):
        from comfy.ldm.flux.layers import ModulationOut, timestep_embedding

        seq = {}

        def time_rows(module, args, output):  # the stock embedding: time_factor 1 (guidance uses 1000)
            fwd.time = module.forward(timestep_embedding(fwd.uniq_t.to(output.device), 256, time_factor=1.0)
                                      .to(output.dtype))

        def image_only(n):
            if n != fwd.tokens.shape[1]:
                raise unsupported("reference latents / guiding frames (image or video conditioning) are not covered; "
                                  "use HunyuanImage 2.1 text-to-image")

        def double(module, args, output):
            stock = torch.cat([output[0].shift, output[0].scale, output[0].gate,
                               output[1].shift, output[1].scale, output[1].gate], dim=-1)
            c = per_token(fwd, module.lin(torch.nn.functional.silu(fwd.rows())), stock, parts=6)
            return ModulationOut(*c[:3]), ModulationOut(*c[3:])

        def seq_len(module, args):  # a single block's [image | text | glyph] length
            seq["n"] = args[0].shape[1]

        def single(module, args, output):
            stock = torch.cat([output[0].shift, output[0].scale, output[0].gate], dim=-1)
            c = per_token(fwd, module.lin(torch.nn.functional.silu(fwd.rows())), stock,
                          after=seq["n"] - fwd.tokens.shape[1], parts=3)
            return ModulationOut(*c), None

        def final(module, args, output):
            return per_token(fwd, module.forward(fwd.rows()), output)

        handles = [dm.time_in.register_forward_hook(time_rows)]
        if dm.params.guidance_embed:  # called only when the conditioning has a guidance value
            handles.append(dm.guidance_in.register_forward_hook(fwd.keep_per_image))
        handles += [b.img_mod.register_forward_hook(double) for b in dm.double_blocks]
        handles.append(dm.double_blocks[0].register_forward_pre_hook(  # its image stream's length: the layout
            lambda m, a, kw: image_only(kw["img"].shape[1]), with_kwargs=True))
        handles += [b.register_forward_pre_hook(seq_len) for b in dm.single_blocks]
        handles += [b.modulation.register_forward_hook(single) for b in dm.single_blocks]
        handles.append(dm.final_layer.adaLN_modulation.register_forward_hook(final))
        if dm.byt5_in is not None:  # glyph tokens follow the prompt's: the masks never read them
            handles.append(dm.byt5_in.register_forward_hook(
                lambda m, a, out: setattr(fwd, "text_tail", out.shape[1])))
        return handles
