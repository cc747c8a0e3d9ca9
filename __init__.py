"""AsynDM & FPDM for ComfyUI.

The repository root is both a ComfyUI custom-node folder and the Python package
``asyndm_fpdm``. Only relative imports are used so that either name works. Nothing heavy is
imported here: the node mappings load on first access (ComfyUI reads them right after import),
so library and CLI users don't pay for the node modules, and diffusers/ComfyUI load only when
a node or command first runs.
"""

__version__ = "0.1.0"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]


def __getattr__(name):
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
