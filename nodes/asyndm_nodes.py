"""AsynDM nodes: collects the node families of nodes/asyndm_*.py."""

from . import asyndm_preview_nodes, asyndm_sampler_nodes

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (asyndm_sampler_nodes, asyndm_preview_nodes):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
