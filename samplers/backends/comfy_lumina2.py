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
middle joint blocks, read by one fused attention (comfy_dit.joint_item_attention) from the block's own q / k
(its norms' outputs). No patches_replace exist for NextDiT's blocks: everything is module hooks
alive inside one forward.
"""

import torch

from .comfy_dit import Gathered, joint_item_attention, keep_token_maps, time_rows, token_rows
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
            handles += [h for i in self.capture_blocks for h in _capture(dm.layers[i].attention, fwd, starts)]
        return handles


def _capture(attn, fwd, starts):
    """Hooks on one joint block's attention that record the items' maps from its own q / k, read as
    soon as k is normed (no q / k kept through the attention)."""
    from comfy.ldm.lumina.model import JointAttention

    seen = []

    def inputs(module, args):  # the RoPE table, the attention's third input
        seen[:] = [args[2]]

    def qk(module, args, output):  # q, then k (B, L, H, d) after the norms: one shared Identity without qk_norm
        seen.append(output)
        if len(seen) == 3:
            record(*seen)
            seen.clear()

    def record(rope, q, k):  # the captured rows; RoPE and grouped-query heads as the model applies them
        maps, n = [], fwd.tokens.shape[1]
        for b in fwd.capture_rows:
            s, r = starts[b], rope[b:b + 1]
            qb = JointAttention.apply_rotary_emb(q[b:b + 1, s:s + n], r[:, s:s + n]).transpose(1, 2)
            kb = JointAttention.apply_rotary_emb(k[b:b + 1], r).repeat_interleave(attn.n_rep, dim=2).transpose(1, 2)
            maps.append(joint_item_attention(qb, kb[:, :, :s], kb[:, :, s:], fwd.weights(s)))
        keep_token_maps(fwd, torch.cat(maps))

    return [attn.register_forward_pre_hook(inputs)] + [n.register_forward_hook(qk) for n in {attn.q_norm, attn.k_norm}]
