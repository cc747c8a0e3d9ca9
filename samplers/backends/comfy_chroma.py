"""AsynDM backend for ComfyUI's Chroma (Flux-derived, no CLIP, distilled modulations).

Per-token time: Chroma has no per-block modulation Linear; all its modulations come at once
from a small network (``distilled_guidance_layer``, the approximator) fed the timestep and
guidance embeddings beside a modulation index. Hooks on it run it once, on the distinct
(image, timestep) rows only — the stock input of the row's image with its timestep embedding
swapped (so the guidance embedding is the stock one) — and hand the stock per-image output back
as the rows of each image's own timestep (one of the rows); the double / single blocks
(``dit`` replace patches) and the final layer read their image tokens' modulation from those rows,
sliced with the model's own ``get_modulations``; text tokens keep the stock (background) values.

Masks: as Flux (comfy_flux.FluxLike): joint attention of image queries to the target words' T5
tokens in the three middle double-stream blocks.
"""

import torch

from .comfy_call import FORWARD_KEY
from .comfy_dit import per_token
from .comfy_flux import FluxLike
from .protocol import chain_blocks, register


def _rows_of(fwd, mod, stock, before=0):
    """A ModulationOut-like (R, 1, D) triple of rows and the stock one → per-token tensors."""
    from comfy.ldm.flux.layers import ModulationOut

    rows = torch.cat([mod.shift, mod.scale, mod.gate], dim=-1).squeeze(1)
    ref = torch.cat([stock.shift, stock.scale, stock.gate], dim=-1)
    return ModulationOut(*per_token(fwd, rows, ref, before=before, parts=3))


def _double(dm, index):
    def patch(args, original_block):
        fwd = (args.get("transformer_options") or {}).get(FORWARD_KEY)
        if fwd is None:
            return original_block(args)
        (img1, img2), txt = args["vec"]
        r1, r2 = dm.get_modulations(fwd.time, "double_img", idx=index)
        return original_block(dict(args, vec=((_rows_of(fwd, r1, img1), _rows_of(fwd, r2, img2)), txt)))

    return patch


def _single(dm, index):
    def patch(args, original_block):
        fwd = (args.get("transformer_options") or {}).get(FORWARD_KEY)
        if fwd is None:
            return original_block(args)
        before = args["img"].shape[1] - fwd.tokens.shape[1]  # [text | image] tokens
        mod = _rows_of(fwd, dm.get_modulations(fwd.time, "single", idx=index), args["vec"], before=before)
        return original_block(dict(args, vec=mod))

    return patch


@register
class ComfyChromaBackend(FluxLike):
    FAMILY = "Chroma"
    MODEL = "comfy.ldm.chroma.model.Chroma"

    def hooks(self, dm, fwd, transformer_options):
        from comfy.ldm.flux.layers import timestep_embedding

        own = {}

        def rows_in(module, args):  # stock input (B, 344, 16 + 16 + 32): [timestep | guidance | index]
            stock_in = args[0]
            own["rows"] = fwd.image_rows()  # the stock per-image input is one of the rows
            t_emb = timestep_embedding(fwd.uniq_t.to(stock_in.device), 16).to(stock_in.dtype)
            rows = stock_in[fwd.row_img.to(stock_in.device)].clone()
            rows[:, :, :16] = t_emb[:, None]
            return (rows,)

        def mod_rows(module, args, output):  # one run on the distinct rows; the stock output read from them
            fwd.time = output  # (R, 344, D)
            return output[own["rows"].to(output.device)]

        def final(module, args, output):
            x = args[0]
            shift, scale = dm.get_modulations(fwd.time, "final")
            mod = per_token(fwd, torch.cat([shift, scale], dim=-1).squeeze(1), x[:, :1, :1].new_zeros(
                x.shape[0], 1, 2 * x.shape[-1]))  # every token is an image token: no stock value is read
            shift, scale = mod.chunk(2, dim=-1)
            return module.linear(torch.addcmul(shift, 1 + scale, module.norm_final(x)))

        handles = [dm.distilled_guidance_layer.register_forward_pre_hook(rows_in),
                   dm.distilled_guidance_layer.register_forward_hook(mod_rows)]
        if hasattr(dm, "final_layer"):  # Chroma Radiance has none (its NeRF head takes no timestep)
            handles.append(dm.final_layer.register_forward_hook(final))
        return handles

    def patch_replace(self, call, replace):
        chain_blocks(replace, "double_block", range(len(self.dm.double_blocks)), lambda i: _double(self.dm, i))
        chain_blocks(replace, "single_block", range(len(self.dm.single_blocks)), lambda i: _single(self.dm, i))
        super().patch_replace(call, replace)
