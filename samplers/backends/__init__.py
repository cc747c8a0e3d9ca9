"""One selection point for the ComfyUI backends (DESIGN.md, "One backend interface").

``backend_for(model_patcher)`` → the backend of the MODEL's family: ComfyUNetBackend (SD1.x,
SD2.x, SDXL), ComfyFluxBackend (Flux dev/schnell and fine-tunes), ComfyMMDiTBackend (SD3/SD3.5);
anything else (video models, other DiTs) gets an UnsupportedModelError naming what is supported.
ComfyUI is imported only when a backend is built.
"""

from .pixel_math import UnsupportedModelError

SUPPORTED = "Stable Diffusion UNets (SD1.x, SD2.x, SDXL), Flux (dev, schnell and fine-tunes) and SD3/SD3.5 (MMDiT)"


def backend_for(model_patcher, **kwargs):
    dm = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if type(dm) is Flux:
        from .comfy_flux import ComfyFluxBackend

        return ComfyFluxBackend(model_patcher, **kwargs)
    if type(dm) is OpenAISignatureMMDITWrapper:
        from .comfy_mmdit import ComfyMMDiTBackend

        return ComfyMMDiTBackend(model_patcher, **kwargs)
    if isinstance(dm, UNetModel):
        from .comfy_unet import ComfyUNetBackend

        return ComfyUNetBackend(model_patcher, **kwargs)
    raise UnsupportedModelError(
        f"AsynDM supports {SUPPORTED}; this MODEL is {type(dm).__name__} "
        f"({type(getattr(model_patcher, 'model', None)).__name__}). Load one of those models.")
