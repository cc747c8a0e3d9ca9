"""One selection point for the ComfyUI backends (DESIGN.md, "Backend protocol").

``backend_for(model_patcher)`` → the registered family backend (protocol.py) that accepts the
MODEL's diffusion model; anything else gets an UnsupportedModelError naming what is supported
(``protocol.supported()``, the one message). ComfyUI is imported only when a backend is built.
"""

from .pixel_math import UnsupportedModelError

FAMILY_MODULES = ("comfy_unet", "comfy_flux", "comfy_mmdit", "comfy_chroma", "comfy_wan", "comfy_qwen_image",
                  "comfy_chroma_radiance", "comfy_lumina2")
FAMILY_MODULES += ("comfy_hidream",)
FAMILY_MODULES += ("comfy_hunyuan_image",)


def backend_for(model_patcher, **kwargs):
    import importlib

    from .protocol import FAMILIES, supported

    for name in FAMILY_MODULES:
        importlib.import_module(f"{__name__}.{name}")  # registers its families
    dm = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    for family in FAMILIES:
        if family.accepts(dm):
            return family(model_patcher, **kwargs)
    raise UnsupportedModelError(
        f"AsynDM supports {supported()}; this MODEL is {type(dm).__name__} "
        f"({type(getattr(model_patcher, 'model', None)).__name__}). Load one of those models.")
