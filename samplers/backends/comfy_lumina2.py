"""AsynDM backend for ComfyUI's Lumina 2 (NextDiT: single-stream, Gemma 2 2B text tokens).

Time: NextDiT embeds ``1 − timesteps`` (its flow time runs the other way; ComfyUI passes
``timestep(σ) = σ``) once per image, ``adaln_input``, which every modulated block — the image-only
``noise_refiner`` blocks, the joint ``layers`` over [caption | image] tokens — and the final layer
turn into scales and tanh gates; ``context_refiner`` (caption only) has none. The embedder runs
on the distinct timesteps of a call beside ComfyUI's own call; each block's ``adaLN_modulation``
on those rows, its output handed back as per-token parts (comfy_dit.Modulation: the block's
``chunk(4, dim=1)`` and per-image ``unsqueeze(1)`` yield the (B, L, D) parts gathered per token),
so NextDiT's own block and final-layer code does the rest (LoRA patches on the same modules):
caption tokens, and the padding after shorter captions, read their image's stock (background) row.

Masks: joint self-attention (after the q/k norms and RoPE, as the model attends) of the image
queries to the target words' Gemma tokens, softmax over [caption | image] keys, in the three
middle joint blocks, read blockwise (comfy_dit.joint_item_attention) from the block's own q / k
(its norms' outputs). No patches_replace exist for NextDiT's blocks: everything is module hooks
alive inside one forward.
"""

import torch

from .comfy_dit import Modulation, joint_item_attention, keep_token_maps, per_token, time_rows
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

        def modulation(joint, parts):
            def hook(module, args, output):
                mod = per_token(fwd, module.forward(fwd.rows()), output, before=starts if joint else 0, parts=parts)
                return Modulation(*map(Modulation, mod)) if parts > 1 else Modulation(mod)
            return hook

        handles = [dm.register_forward_pre_hook(inputs, with_kwargs=True),
                   dm.t_embedder.register_forward_hook(time_rows(fwd, lambda t: 1.0 - t), with_kwargs=True),
                   dm.final_layer.adaLN_modulation.register_forward_hook(modulation(True, 1))]
        for joint, blocks in ((False, dm.noise_refiner), (True, dm.layers)):
            handles += [b.adaLN_modulation.register_forward_hook(modulation(joint, 4)) for b in blocks]
        if fwd.call.capture and fwd.capture_rows:
            handles += [h for i in self.capture_blocks for h in _capture(dm.layers[i].attention, fwd, starts)]
        return handles


def _capture(attn, fwd, starts):
    """Hooks on one joint block's attention that record the items' maps from its own q / k."""
    from comfy.ldm.lumina.model import JointAttention

    seen = []

    def record(module, args, output):  # the captured rows; RoPE and grouped-query heads as the model applies them
        (q, k), rope, n = seen, args[2], fwd.tokens.shape[1]
        seen.clear()
        maps = []
        for b in fwd.capture_rows:
            s, r = starts[b], rope[b:b + 1]
            qb = JointAttention.apply_rotary_emb(q[b:b + 1, s:s + n], r[:, s:s + n]).transpose(1, 2)
            kb = JointAttention.apply_rotary_emb(k[b:b + 1], r).repeat_interleave(attn.n_rep, dim=2).transpose(1, 2)
            maps.append(joint_item_attention(qb, kb[:, :, :s], kb[:, :, s:], fwd.weights(s)))
        keep_token_maps(fwd, torch.cat(maps))

    # q, then k (B, L, H, d) after the norms: one shared Identity without qk_norm
    return [n.register_forward_hook(lambda m, a, out: seen.append(out)) for n in {attn.q_norm, attn.k_norm}] + [
        attn.register_forward_hook(record)]
