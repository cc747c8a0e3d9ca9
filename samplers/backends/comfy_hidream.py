"""AsynDM backend for ComfyUI's HiDream-I1 (dev, full, fast): double-stream then single-stream blocks
with MoE feed-forwards; CLIP-L/G pooled, T5 and Llama 3.1 hidden states as text.

Per-token time: ``adaln_input = t_embedder(t) + p_embedder(pooled)`` is every block's only time
input. A hook on ``t_embedder`` runs it beside ComfyUI's call on the distinct (image, timestep)
rows; the pooled embedding is added per image (Forward.rows, the stock order). HiDream offers no
``patches_replace`` for its blocks, so module hooks do the rest, alive inside one forward: each
block's ``adaLN_modulation`` is applied to the rows and its output replaced by the parts the block
reads (``mod(x)[:, None].chunk(k, dim=-1)``, comfy_dit.Modulation / Gathered): the image tokens'
shift / scale / gate gathered per token where the block uses them, the text tokens' (double blocks: their own chunks; single blocks: the tokens after the
image's) the stock per-image values, the background's. The final layer's modulation likewise. The
stock block code runs unchanged (attention, MoE routing, LoRA patches on the same modules).

Masks: joint attention (after RoPE, softmax over [image | T5 | Llama | Llama] keys, as the model
attends) of image queries to the target words' *Llama* tokens, in the three middle double-stream
blocks. A double block's text is [T5 | Llama, last layer (carried through the blocks) | Llama, the
block's own layer]: a word's probability is summed over both Llama copies. Llama rather than T5:
its hidden states are what HiDream conditions on most (a fresh layer enters every block and it
holds half of the carried text stream), and HiDream's T5 keeps only the prompt's first 128 tokens,
so a late word of a long prompt is not in T5 at all. CLIP gives only the pooled vector. The text
encode node resolves words on the Llama tokenizer (comfyui/tokens.py).
"""

import torch

from .comfy_dit import Gathered, Modulation, keep_outputs, record_maps, time_rows, token_rows
from .protocol import PixelBackend, register, unsupported


def _rope(q, k, pe):
    """RoPE as HiDream's attention applies it: over the whole head, or its first half."""
    from comfy.ldm.flux.math import apply_rope

    d = pe.shape[-3] * 2
    q1, k1 = apply_rope(q[..., :d], k[..., :d], pe)
    return torch.cat([q1, q[..., d:]], dim=-1), torch.cat([k1, k[..., d:]], dim=-1)


@register
class ComfyHiDreamBackend(PixelBackend):
    FAMILY = "HiDream-I1"
    MODEL = "comfy.ldm.hidream.model.HiDreamImageTransformer2DModel"
    TEXT = "llama"
    BLOCKS = "double_stream_blocks"

    def validate(self, model_patcher, dm):
        if not len(dm.double_stream_blocks):
            raise unsupported("this HiDream MODEL has no double-stream blocks")

    def hooks(self, dm, fwd, transformer_options):
        seen = {}

        def image_rows(module, args, output):  # image tokens only: an image_cond (E1) widens the stream
            if output.shape[1] != fwd.tokens.shape[1]:
                raise unsupported("image conditioning (HiDream E1 editing) is not covered; use HiDream-I1")

        def double(module, args, output):  # (Bm, 12·D): 6 image parts, then the text's 6 (stock)
            d = output.shape[-1] // 12
            img = Gathered(*token_rows(fwd, module.forward(fwd.rows())[:, :6 * d], output[:, :6 * d])).chunk(6)
            return Modulation(*img, *output[:, None, 6 * d:].chunk(6, dim=-1))

        def single(module, args, output):  # (Bm, 6·D) for the [image | text] stream
            after = seen["length"] - fwd.tokens.shape[1]
            return Gathered(*token_rows(fwd, module.forward(fwd.rows()), output, after=after))

        def final(module, args, output):  # (Bm, 1, 2·D) → per image token
            return Gathered(*token_rows(fwd, module.forward(fwd.rows()), output))

        handles = [dm.t_embedder.register_forward_hook(time_rows(fwd), with_kwargs=True),
                   dm.p_embedder.register_forward_hook(fwd.keep_per_image),
                   dm.x_embedder.register_forward_hook(image_rows),
                   dm.final_layer.adaLN_modulation.register_forward_hook(final)]
        handles += [b.block.adaLN_modulation.register_forward_hook(double) for b in dm.double_stream_blocks]
        for b in dm.single_stream_blocks:
            handles += [b.block.register_forward_pre_hook(lambda m, a: seen.update(length=a[0].shape[1])),
                        b.block.adaLN_modulation.register_forward_hook(single)]
        return handles + (self._capture(dm, fwd) if fwd.capture_rows else [])

    def _capture(self, dm, fwd):
        """Hooks that read the middle double blocks' own q / k (after their RMS norms) and RoPE."""
        t5 = {}
        handles = [dm.caption_projection[-1].register_forward_hook(lambda m, a, o: t5.update(length=o.shape[1]))]
        for i in self.capture_blocks:
            attn, seen = dm.double_stream_blocks[i].block.attn1, {}
            handles += keep_outputs(seen, q=attn.q_rms_norm, k=attn.k_rms_norm, k_txt=attn.k_rms_norm_t)
            handles.append(attn.register_forward_hook(
                lambda m, a, kw, o, seen=seen: _record(fwd, m.heads, seen, kw["rope"], t5["length"]), with_kwargs=True))
        return handles


def _record(fwd, heads, seen, pe, t5_length):
    q_img, k_img, k_txt = (seen.pop(k) for k in ("q", "k", "k_txt"))  # popped: not held past the block
    b, n = q_img.shape[:2]
    q_img, k_img, k_txt = (t.view(b, t.shape[1], heads, -1) for t in (q_img, k_img, k_txt))
    # RoPE per position of the joint [image | text] sequence (the text ids are 0: identity)
    q, k = _rope(torch.cat([q_img, k_txt], dim=1), torch.cat([k_img, k_txt], dim=1), pe)
    # text keys [T5 | Llama | Llama]: the T5 part carries no weight, both Llama copies count
    # (Forward.weights repeats a context over the length it is given)
    record_maps(fwd, *(t.transpose(1, 2) for t in (q[:, :n], k[:, n:], k[:, :n])), context_len_offset=t5_length)
