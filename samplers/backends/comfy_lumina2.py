"""AsynDM backend for ComfyUI's Lumina 2 (NextDiT: single-stream, Gemma 2 2B text tokens).

Time: NextDiT embeds ``1 − timesteps`` (its flow time runs the other way; ComfyUI passes
``timestep(σ) = σ``) once per image, ``adaln_input``, which every modulated block — the image-only
``noise_refiner`` blocks, the joint ``layers`` over [caption | image] tokens — and the final layer
turn into scales and tanh gates; ``context_refiner`` (caption only) has none. The embedder runs
on the distinct timesteps of a call beside ComfyUI's own call; each block's ``adaLN_modulation``
on those rows, its output handed back as a comfy_dit.Gathered: the block's ``chunk(4, dim=1)``, each
part's per-image ``unsqueeze(1)``, ``1 + scale`` and ``tanh(gate)`` run on the rows, the per-token
gather happens in the block's own product, so
NextDiT's own block and final-layer code does the rest (LoRA patches on the same modules) at the
stock cost of one pass per part. Caption tokens, and the padding after shorter captions, read their
image's stock (background) row.

Masks: joint self-attention (after the q/k norms and RoPE, as the model attends) of the image
queries to the target words' Gemma tokens, softmax over [caption | image] keys, in the three
middle joint blocks, read inside the block's own attention (attention_read.py: its q / k after the
norms, RoPE and grouped heads, its caption-padding mask). No patches_replace exist for NextDiT's blocks: everything is module hooks
alive inside one forward.
"""

from .attention_read import arm
from .comfy_dit import Gathered, time_rows, token_rows
from .protocol import PixelBackend, register


def caption_lengths(inputs: dict, batch: int):
    """Each image's caption length, as NextDiT.patchify_and_embed counts it: its image tokens start
    there in the joint sequence."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return [int(n) for n in mask.sum(dim=1).tolist()]
    return [int(inputs["num_tokens"])] * batch

@register
class ComfyLumina2Backend(PixelBackend):
    FAMILY = "Lumina 2 (NextDiT)"
    MODEL = "comfy.ldm.lumina.model.NextDiT"
    TEXT = "gemma2_2b"
    BLOCKS = "layers"
    per_image_rows = False  # adaln_input is the time embedding alone

    def hooks(self, dm, fwd, transformer_options):
        starts = []  # each image's caption length: where its tokens start in the joint sequence

        def inputs(module, args, kwargs):  # ComfyUI passes x positionally, the text inputs by name
            starts[:] = caption_lengths(kwargs, args[0].shape[0])

        def modulation(joint):
            def hook(module, args, output):
                return Gathered(*token_rows(fwd, module.forward(fwd.rows()), output, before=starts if joint else 0))
            return hook

        handles = [dm.register_forward_pre_hook(inputs, with_kwargs=True),
                   dm.t_embedder.register_forward_hook(time_rows(fwd, lambda t: 1.0 - t), with_kwargs=True),
                   dm.final_layer.adaLN_modulation.register_forward_hook(modulation(True))]
        for joint, blocks in ((False, dm.noise_refiner), (True, dm.layers)):
            handles += [b.adaLN_modulation.register_forward_hook(modulation(joint)) for b in blocks]
        if fwd.call.capture and fwd.capture_rows:
            def caption_first(args, kwargs):  # each image's [caption | image] sequence
                return (lambda b: (slice(0, starts[b]), starts[b])), 0

            handles += [h for i in self.capture_blocks for h in arm(fwd, dm.layers[i].attention, caption_first)]
        return handles
