"""AsynDM backend for ComfyUI's UNet (SD1.x, SD2.x epsilon and v, SDXL), on the backend protocol
(protocol.py, DESIGN.md "Backend protocol").

- Per-pixel time: before the UNet runs (a forward pre-hook), its own ``time_embed`` on the
  distinct (image, timestep) rows (SDXL: its per-image ADM vector added, so a row is an
  (image, timestep) pair); every ResBlock's ``emb_layers`` then applies the same modules (LoRA
  patches included) to those rows, gathered per pixel at the block's stride (invariant 6).
- Masks: ``attn2`` replace patches at the capture stride, only in calls that capture: ComfyUI's
  own attention is the output; the items' attention probabilities are computed beside it for the
  chunk of the conditioning that carries the targets.
"""

import torch

from .comfy_call import FORWARD_KEY, KEY, Forward, PixelCall, pixelwise
from .pixel_math import UnsupportedModelError, gather_rows, item_attention, pick_capture_stride
from .protocol import PixelBackend, register, unsupported

__all__ = ["KEY", "ComfyUNetBackend", "PixelCall", "UnsupportedModelError", "pixelwise", "unet_layout"]


def unet_layout(diffusion_model):
    """Stride of every ResBlock's output and of every cross-attention block of ComfyUI's UNet.

    Returns (resblocks: {module path: stride}, attentions: [(block_name, id, index, stride)]).
    """
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    res, attn = {}, []
    stride = 1

    def visit(prefix, block_name, block_id, module):
        nonlocal stride
        for j, layer in enumerate(module):
            if isinstance(layer, ResBlock):
                if layer.updown:  # resblock_updown: h is resampled before the embedding is added
                    stride = stride * 2 if isinstance(layer.h_upd, Downsample) else stride // 2
                if layer.emb_layers is not None:
                    res[f"{prefix}.{j}.emb_layers"] = stride
            elif isinstance(layer, Downsample):
                stride *= 2
            elif isinstance(layer, Upsample):
                stride //= 2
            elif isinstance(layer, SpatialTransformer):
                for index, tb in enumerate(layer.transformer_blocks):
                    if getattr(tb, "attn2", None) is not None:
                        attn.append((block_name, block_id, index, stride))

    for i, module in enumerate(diffusion_model.input_blocks):
        visit(f"diffusion_model.input_blocks.{i}", "input", i, module)
    if diffusion_model.middle_block is not None:
        visit("diffusion_model.middle_block", "middle", 0, diffusion_model.middle_block)
    for i, module in enumerate(diffusion_model.output_blocks):
        visit(f"diffusion_model.output_blocks.{i}", "output", i, module)
    return res, attn



def _attn2_capture(stride: int, previous=None):
    def attn2(q, k, v, extra_options):
        if previous is not None:
            out = previous(q, k, v, extra_options)
        else:
            from comfy.ldm.modules import attention

            out = attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                attn_precision=extra_options.get("attn_precision"),
                                                transformer_options=extra_options)
        fwd = extra_options.get(FORWARD_KEY)
        if fwd is not None and fwd.capture_rows:
            _record(fwd, q, k, extra_options, stride)
        return out

    return attn2


def _record(fwd: Forward, q, k, extra_options, stride):
    sel = torch.tensor(fwd.capture_rows, device=q.device)
    maps = item_attention(q.index_select(0, sel), k.index_select(0, sel), extra_options["n_heads"],
                          fwd.weights(k.shape[1]))
    height, width = extra_options["original_shape"][-2:]
    h, w = -(-height // stride), -(-width // stride)
    if h * w != maps.shape[1]:
        return  # an unexpected grid (a patch changed the resolution): skip this layer
    fwd.call.maps.append(fwd.place_maps(maps.view(len(fwd.capture_rows), h, w, -1).permute(0, 3, 1, 2), stride))


@register
class ComfyUNetBackend(PixelBackend):
    """Per-pixel evaluation of one ComfyUI UNet MODEL for one sampling run."""

    FAMILY = "Stable Diffusion UNets (SD1.x, SD2.x, SDXL)"
    TEXT = "l / g / h (CLIP)"
    flow_only = False
    cell = 1

    def __init__(self, model_patcher, capture_stride: int = 4):
        super().__init__(model_patcher)
        self.per_image_rows = self.dm.num_classes is not None  # SDXL: the ADM vector stays per image
        self.resblocks, attentions = unet_layout(self.dm)
        self.capture_stride = pick_capture_stride([a[3] for a in attentions], capture_stride)
        self.capture_blocks = [a[:3] for a in attentions if a[3] == self.capture_stride]

    @classmethod
    def accepts(cls, dm):
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        return isinstance(dm, UNetModel)

    def validate(self, model_patcher, dm):
        import comfy.model_sampling as ms

        sampling = model_patcher.get_model_object("model_sampling")
        if not isinstance(sampling, (ms.EPS, ms.V_PREDICTION)) or isinstance(sampling, (ms.EDM, ms.X0, ms.CONST)):
            raise unsupported(
                f"a UNet needs an epsilon- or v-prediction model, not {type(sampling).__name__}. Remove "
                "model-sampling patches (e.g. ModelSamplingDiscrete set to lcm/x0/edm) before this node.")
        if getattr(dm, "num_classes", None) not in (None, "sequential"):
            raise unsupported("class-conditional UNets (integer labels) are not covered")

    def hooks(self, dm, fwd, transformer_options):
        if "emb_patch" in transformer_options.get("patches", {}):
            raise UnsupportedModelError("AsynDM cannot combine per-pixel timesteps with 'emb_patch' model patches")

        def time_rows(module, args, kwargs):  # the UNet's own time MLP on the rows, before its stock call
            from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

            fwd.time = dm.time_embed(timestep_embedding(fwd.uniq_t.float(), dm.model_channels,
                                                        repeat_only=False).to(args[0].dtype))
            if self.per_image_rows:
                fwd.per_image = [dm.label_emb(kwargs["y"] if "y" in kwargs else args[3])]

        def per_pixel(stride):
            def replace(module, args, output):
                rows = fwd.rows()
                for layer in module:  # the children: calling the module itself would re-enter the hook
                    rows = layer(rows)
                return gather_rows(rows, fwd.strided(stride)).to(output.dtype)

            return replace

        handles = [dm.register_forward_pre_hook(time_rows, with_kwargs=True)]
        handles += [dm.get_submodule(path.split(".", 1)[1]).register_forward_hook(per_pixel(stride))
                    for path, stride in self.resblocks.items()]
        return handles

    def patch_replace(self, call, replace):
        if not call.capture:
            return
        attn2 = replace.setdefault("attn2", {})
        for block_name, block_id, index in self.capture_blocks:
            previous = attn2.get((block_name, block_id, index)) or attn2.get((block_name, block_id))
            attn2[(block_name, block_id, index)] = _attn2_capture(self.capture_stride, previous)
