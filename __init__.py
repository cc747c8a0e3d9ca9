"""AsynDM & FPDM for ComfyUI.

The repository root is both a ComfyUI custom-node folder and the Python package
``asyndm_fpdm``. Only relative imports are used below so that either name works, and
nothing from ComfyUI (or diffusers) is imported here: those load when a node first runs.
"""

__version__ = "0.1.0"

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
