"""AsynDM backend for ComfyUI's Chroma Radiance (Chroma's transformer in pixel space).

The "latent" is the RGB image itself: a token is a patch_size × patch_size patch of pixels
(``img_in_patch``, a strided conv), so the plan, its masks and the timestep maps live on that
patch grid (``cell`` = the patch size; masks snap to whole patches). Per-token time is Chroma's:
the approximator on the distinct (image, timestep) rows, the double / single blocks reading their
image tokens' modulations from those rows (comfy_chroma.py). There is no final layer: the NeRF
head decodes each patch's pixels from its own token's hidden state and the noisy pixels, with no
timestep input, so it needs nothing per token. Masks as Chroma (T5 tokens, middle double blocks).
"""

from .comfy_chroma import ComfyChromaBackend
from .protocol import register, unsupported


@register
class ComfyChromaRadianceBackend(ComfyChromaBackend):
    FAMILY = "Chroma Radiance (pixel space)"
    MODEL = "comfy.ldm.chroma_radiance.model.ChromaRadiance"

    def validate(self, model_patcher, dm):
        if not len(dm.double_blocks) or hasattr(dm, "final_layer"):
            raise unsupported(f"this {self.FAMILY} MODEL has no double-stream blocks, or a final layer the NeRF "
                              "head would bypass")
