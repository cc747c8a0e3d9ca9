"""ComfyUI adapters of the AsynDM engine: the KSAMPLER/SAMPLER, conditioning glue, word → token
positions, the preview nodes' drawings. Imported only when a node runs (they import ComfyUI inside their functions)."""
