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
only in calls that capture, and reads the block's own q/k through hooks on its QK norms.
"""

import torch

from .comfy_dit import DiTBackend, middle_blocks, per_token, record_maps, unsupported
from .comfy_unet import FORWARD_KEY


class ComfyFluxBackend(DiTBackend):
    def __init__(self, model_patcher, capture_blocks=None):
        super().__init__(model_patcher)
        self.capture_blocks = list(capture_blocks) if capture_blocks is not None else middle_blocks(
            len(self.dm.double_blocks))

    def check_supported(self, model_patcher):
        import comfy.model_sampling as ms
        from comfy.ldm.flux.model import Flux

        dm = getattr(model_patcher.model, "diffusion_model", None)
        if type(dm) is not Flux:
            raise unsupported(f"this MODEL is {type(dm).__name__}, not Flux")
        if not isinstance(model_patcher.get_model_object("model_sampling"), ms.CONST):
            raise unsupported("this Flux MODEL's sampling is not flow matching (remove model-sampling patches)")
        if not len(dm.double_blocks) or not hasattr(dm, "final_layer"):
            raise unsupported("this Flux MODEL has no double-stream blocks or final layer")
        return dm

    def patch_size(self, dm):
        return dm.patch_size

    def hooks(self, dm, fwd):
        from comfy.ldm.flux.layers import ModulationOut, timestep_embedding

        cache = fwd.cache

        def keep(name):
            def hook(module, args, output):
                cache[name] = output
            return hook

        def time_rows(module, args, output):
            t = cache["uniq_t"].to(output.device)
            cache["time"] = module.forward(timestep_embedding(t, 256).to(output.dtype))

        def rows():
            r = cache.get("rows")
            if r is None:  # the order of the stock sum: time, + guidance, + pooled text
                img = cache["row_img"].to(cache["time"].device)
                r = cache["time"]
                if "guidance" in cache:
                    r = r + cache["guidance"][img]
                r = cache["rows"] = r + cache["vector"][img]
            return r

        def extra_tokens():  # Kontext: reference-image tokens after the image's own (background)
            return cache["img"].shape[1] - cache["tokens"].shape[1]

        def double(module, args, output):
            stock = torch.cat([output[0].shift, output[0].scale, output[0].gate,
                               output[1].shift, output[1].scale, output[1].gate], dim=-1)
            c = per_token(fwd, module.lin(torch.nn.functional.silu(rows())), stock, after=extra_tokens(), parts=6)
            return ModulationOut(*c[:3]), ModulationOut(*c[3:])

        def single(module, args, output):
            stock = torch.cat([output[0].shift, output[0].scale, output[0].gate], dim=-1)
            c = per_token(fwd, module.lin(torch.nn.functional.silu(rows())), stock,
                          before=cache["txt"].shape[1], after=extra_tokens(), parts=3)
            return ModulationOut(*c), None

        def final(module, args, output):
            return per_token(fwd, module.forward(rows()), output, after=extra_tokens())

        handles = [dm.time_in.register_forward_hook(time_rows), dm.vector_in.register_forward_hook(keep("vector")),
                   dm.img_in.register_forward_hook(keep("img")), dm.txt_in.register_forward_hook(keep("txt"))]
        if dm.params.guidance_embed:  # called only when the conditioning has a guidance value
            handles.append(dm.guidance_in.register_forward_hook(keep("guidance")))
        handles += [b.img_mod.register_forward_hook(double) for b in dm.double_blocks]
        handles += [b.modulation.register_forward_hook(single) for b in dm.single_blocks]
        handles.append(dm.final_layer.adaLN_modulation.register_forward_hook(final))
        return handles

    def block_patches(self, call):
        if not call.capture:
            return {}
        return {("double_block", i): _capture(i) for i in self.capture_blocks}


def _capture(index):
    def patch(args, original_block):
        fwd = (args.get("transformer_options") or {}).get(FORWARD_KEY)
        if fwd is None or not fwd.capture_rows:
            return original_block(args)
        from comfy.ldm.flux.math import apply_rope1

        block = fwd.cache["dm"].double_blocks[index]
        seen = {}

        def grab(name):
            def hook(module, a, output):
                seen[name] = output  # (q, k) after the QK norm, (B, H, L, d)
            return hook

        handles = [block.img_attn.norm.register_forward_hook(grab("img")),
                   block.txt_attn.norm.register_forward_hook(grab("txt"))]
        try:
            out = original_block(args)
        finally:
            for h in handles:
                h.remove()
        if "img" not in seen or "txt" not in seen:
            return out
        (q_img, k_img), (_, k_txt) = seen["img"], seen["txt"]
        pe = args.get("pe")
        if pe is not None:  # RoPE as the block's attention applies it: text first, then image
            n_txt = k_txt.shape[2]
            q_img, k_img = apply_rope1(q_img, pe[:, :, n_txt:]), apply_rope1(k_img, pe[:, :, n_txt:])
            k_txt = apply_rope1(k_txt, pe[:, :, :n_txt])
        record_maps(fwd, q_img, k_txt, k_img)
        return out

    return patch
