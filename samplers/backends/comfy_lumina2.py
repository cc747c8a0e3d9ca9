"""AsynDM backend for ComfyUI's Lumina 2 (NextDiT: single-stream, Gemma 2 2B text tokens).

Time: NextDiT embeds ``1 − timesteps`` (its flow time runs the other way; ComfyUI passes
``timestep(σ) = σ``) once per image, ``adaln_input``, which every modulated block — the image-only
``noise_refiner`` blocks, the joint ``layers`` over [caption | image] tokens — and the final layer
turn into scales and tanh gates; ``context_refiner`` (caption only) has none. The embedder runs
on the distinct timesteps of a call beside ComfyUI's own call; each block's ``adaLN_modulation``
on those rows. The blocks unsqueeze their modulation per image, so a hook hands the block a
neutral one (scales 0, gates saturated: ``x·(1 + 0)`` and ``tanh(30)·y`` are exact in every float
dtype) and the per-token factors multiply the outputs of the norms the stock block multiplies:
``attention_norm1`` (1 + scale_msa), ``attention_norm2`` (tanh gate_msa), ``ffn_norm1``,
``ffn_norm2``, the final ``norm_final`` — the same products in the same dtype, so a constant map
is the stock forward bit for bit. Factors are gathered per token from the rows, one part at a
time; caption tokens read their image's stock (background) row.

Masks: joint self-attention (after the q/k norms and RoPE, as the model attends) of the image
queries to the target words' Gemma tokens, softmax over [caption | image] keys, in the three
middle joint blocks, read blockwise (comfy_dit.joint_item_attention). No patches_replace exist
for NextDiT's blocks: everything is module hooks alive inside one forward.
"""

import torch

from .comfy_dit import joint_item_attention, middle_blocks
from .protocol import PixelBackend, register

GATE_ON = 30.0  # tanh(30) == 1.0 exactly in float32, bfloat16 and float16
_INPUTS = ("x", "timesteps", "context", "num_tokens", "attention_mask")  # NextDiT.forward's arguments


def caption_lengths(inputs: dict, batch: int):
    """Each image's caption length, as NextDiT.patchify_and_embed counts it: its image tokens start
    there in the joint sequence."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return [int(n) for n in mask.sum(dim=1).tolist()]
    return [int(inputs["num_tokens"])] * batch


def token_index(fwd, starts, length):
    """(Bm, length) row of every position of a sequence whose image tokens start at ``starts``; the
    other positions (caption, padding) read row R + b, image b's stock row."""
    tokens = fwd.tokens
    bm, n = tokens.shape
    rows = len(fwd.uniq_t)
    index = (rows + torch.arange(bm, device=tokens.device)).view(bm, 1).repeat(1, length)
    for b, s in enumerate(starts):
        index[b, s:s + n] = tokens[b]
    return index


@register
class ComfyLumina2Backend(PixelBackend):
    FAMILY = "Lumina 2 (NextDiT)"
    TEXT = "gemma2_2b"
    per_image_rows = False  # adaln_input is the time embedding alone

    def __init__(self, model_patcher, capture_blocks=None):
        super().__init__(model_patcher)
        self.cell = self.dm.patch_size
        self.capture_blocks = list(capture_blocks) if capture_blocks is not None else middle_blocks(
            len(self.dm.layers))

    @classmethod
    def accepts(cls, dm):
        from comfy.ldm.lumina.model import NextDiT

        return type(dm) is NextDiT

    def hooks(self, dm, fwd, transformer_options):
        state = {}

        def inputs(module, args, kwargs):
            got = dict(zip(_INPUTS, args), **kwargs)
            state["starts"] = caption_lengths(got, got["x"].shape[0])

        def time_rows(module, args, kwargs, output):  # args[0] = 1 − timesteps, one per image
            t = (1.0 - fwd.uniq_t).to(args[0].device, args[0].dtype)
            fwd.time = module.forward(t, **kwargs)

        def index(joint, length):
            key = ("joint" if joint else "image", length)
            if key not in state:
                state[key] = token_index(fwd, state["starts"] if joint else [0] * len(state["starts"]), length)
            return state[key]

        handles = [dm.register_forward_pre_hook(inputs, with_kwargs=True),
                   dm.t_embedder.register_forward_hook(time_rows, with_kwargs=True)]
        for joint, blocks in ((False, dm.noise_refiner), (True, dm.layers)):
            for block in blocks:
                handles += _modulated(block, fwd, lambda length, joint=joint: index(joint, length))
        handles += _final(dm.final_layer, fwd, lambda length: index(True, length))
        if fwd.call.capture and fwd.capture_rows:
            for i in self.capture_blocks:
                handles += _capture(dm.layers[i].attention, fwd, state)
        return handles


def _factors(module, fwd, output, gates):
    """The block's modulation on the rows and the stock one → a (R + Bm, parts, D) table of the
    factors the stock block multiplies by: 1 + scale, tanh(gate)."""
    table = torch.cat([module.forward(fwd.time.to(output.dtype)), output]).unflatten(1, (len(gates), -1))
    return torch.stack([p.tanh() if g else 1 + p for p, g in zip(table.unbind(1), gates)], dim=1)


def _modulated(block, fwd, index):
    """Hooks that give a modulated JointTransformerBlock its per-token scales and gates."""
    own = {}
    gates = (False, True, False, True)  # scale_msa, gate_msa, scale_mlp, gate_mlp

    def modulation(module, args, output):
        own["table"] = _factors(module, fwd, output, gates)
        neutral = torch.zeros_like(output).unflatten(1, (4, -1))
        neutral[:, 1::2] = GATE_ON
        return neutral.flatten(1)

    def times(part):
        def hook(module, args, output):
            return output * own["table"][:, part][index(output.shape[1])]
        return hook

    norms = (block.attention_norm1, block.attention_norm2, block.ffn_norm1, block.ffn_norm2)
    return [block.adaLN_modulation.register_forward_hook(modulation)] + [
        norm.register_forward_hook(times(k)) for k, norm in enumerate(norms)]


def _final(layer, fwd, index):
    own = {}

    def modulation(module, args, output):
        own["table"] = _factors(module, fwd, output, (False,))
        return torch.zeros_like(output)

    def times(module, args, output):
        return output * own["table"][:, 0][index(output.shape[1])]

    return [layer.adaLN_modulation.register_forward_hook(modulation), layer.norm_final.register_forward_hook(times)]


def _capture(attn, fwd, state):
    """Hooks on one joint block's attention that record the items' maps from its own q / k."""
    from comfy.ldm.lumina.model import JointAttention

    seen = {"qk": []}

    def inputs(module, args, kwargs):
        seen["freqs"] = args[2] if len(args) > 2 else kwargs["freqs_cis"]

    def qk_hook(module, args, output):  # q, then k: (B, L, H, d) after the norms (one Identity without)
        seen["qk"].append(output)
        if len(seen["qk"]) == 2:
            (q, k), seen["qk"] = seen["qk"], []
            record(q, k, seen.pop("freqs"))

    def record(q, k, rope):  # the captured rows only; RoPE and grouped-query heads as the model applies them
        h, w = fwd.grid
        maps = []
        for b in fwd.capture_rows:
            s, r = state["starts"][b], rope[b:b + 1]
            qb = JointAttention.apply_rotary_emb(q[b:b + 1, s:s + h * w], r[:, s:s + h * w]).transpose(1, 2)
            kb = JointAttention.apply_rotary_emb(k[b:b + 1], r).repeat_interleave(attn.n_rep, dim=2).transpose(1, 2)
            maps.append(joint_item_attention(qb, kb[:, :, :s], kb[:, :, s:], fwd.weights(s)))
        maps = torch.cat(maps).view(len(fwd.capture_rows), h, w, -1).permute(0, 3, 1, 2)
        fwd.call.maps.append(fwd.place_maps(maps, fwd.cell))

    norms = [attn.q_norm] if attn.q_norm is attn.k_norm else [attn.q_norm, attn.k_norm]
    return [attn.register_forward_pre_hook(inputs, with_kwargs=True)] + [
        n.register_forward_hook(qk_hook) for n in norms]
