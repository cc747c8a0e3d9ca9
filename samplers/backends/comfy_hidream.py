"""AsynDM backend for ComfyUI's HiDream-I1 (dev, full, fast): double-stream then single-stream blocks
with MoE feed-forwards; CLIP-L/G pooled, T5 and Llama 3.1 hidden states as text.

Per-token time: ``adaln_input = t_embedder(t) + p_embedder(pooled)`` is every block's only time
input. A hook on ``t_embedder`` runs it beside ComfyUI's call on the distinct (image, timestep)
rows; the pooled embedding is added per image (Forward.rows, the stock order). HiDream offers no
``patches_replace`` for its blocks, so module hooks do the rest, alive inside one forward: each
block's ``adaLN_modulation`` is applied to the rows and its output replaced by the parts the block
reads (``mod(x)[:, None].chunk(k, dim=-1)``): the image tokens' shift / scale / gate gathered per
token, the text tokens' (double blocks: their own chunks; single blocks: the tokens after the
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

from .comfy_dit import middle_blocks, per_token, record_maps
from .protocol import PixelBackend, register, unsupported


class _Parts:
    """What a HiDream block reads from its ``adaLN_modulation`` output, ``out[:, None].chunk(k, -1)``:
    the given per-token / per-image parts, already in shape. (HiDream has no block replace patch; this
    keeps its own block code running instead of a copy of it.)"""

    def __init__(self, parts):
        self.parts = tuple(parts)

    def __getitem__(self, index):
        return self

    def chunk(self, chunks, dim=-1):
        if chunks != len(self.parts):
            raise RuntimeError(f"AsynDM: a HiDream block read {chunks} modulation parts, expected {len(self.parts)}")
        return self.parts


def _rope(q, k, pe):
    """RoPE as HiDream's attention applies it: over the whole head, or its first half."""
    from comfy.ldm.flux.math import apply_rope

    if q.shape[-1] == pe.shape[-3] * 2:
        return apply_rope(q, k, pe)
    (q1, q2), (k1, k2) = q.chunk(2, dim=-1), k.chunk(2, dim=-1)
    q1, k1 = apply_rope(q1, k1, pe)
    return torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)


@register
class ComfyHiDreamBackend(PixelBackend):
    FAMILY = "HiDream-I1"
    TEXT = "llama"

    def __init__(self, model_patcher, capture_blocks=None):
        super().__init__(model_patcher)
        self.cell = self.dm.patch_size
        self.capture_blocks = list(capture_blocks) if capture_blocks is not None else middle_blocks(
            len(self.dm.double_stream_blocks))

    @classmethod
    def accepts(cls, dm):
        from comfy.ldm.hidream.model import HiDreamImageTransformer2DModel

        return type(dm) is HiDreamImageTransformer2DModel

    def validate(self, model_patcher, dm):
        if not len(dm.double_stream_blocks):
            raise unsupported("this HiDream MODEL has no double-stream blocks")

    def hooks(self, dm, fwd, transformer_options):
        seen = {}

        def time_rows(module, args, output):
            fwd.time = module.forward(fwd.uniq_t.to(output.device), args[1])

        def pooled(module, args, output):
            fwd.per_image.append(output)

        def image_rows(module, args, output):  # image tokens only: an image_cond (E1) widens the stream
            if output.shape[1] != fwd.tokens.shape[1]:
                raise unsupported("image conditioning (HiDream E1 editing) is not covered; use HiDream-I1")

        def stream_length(module, args):  # a single block's [image | text] token count
            seen["length"] = args[0].shape[1]

        def double(module, args, output):  # (Bm, 12·D): 6 image parts, then 6 text parts
            d = output.shape[-1] // 12
            img = per_token(fwd, module.forward(fwd.rows())[:, :6 * d], output[:, None, :6 * d], parts=6)
            return _Parts(img + list(output[:, None, 6 * d:].chunk(6, dim=-1)))

        def single(module, args, output):  # (Bm, 6·D) for [image | text] tokens
            after = seen["length"] - fwd.tokens.shape[1]
            return _Parts(per_token(fwd, module.forward(fwd.rows()), output[:, None], after=after, parts=6))

        def final(module, args, output):  # (Bm, 1, 2·D) → per image token
            return per_token(fwd, module.forward(fwd.rows()), output)

        handles = [dm.t_embedder.register_forward_hook(time_rows), dm.p_embedder.register_forward_hook(pooled),
                   dm.x_embedder.register_forward_hook(image_rows)]
        handles += [b.block.adaLN_modulation.register_forward_hook(double) for b in dm.double_stream_blocks]
        for b in dm.single_stream_blocks:
            handles += [b.block.register_forward_pre_hook(stream_length),
                        b.block.adaLN_modulation.register_forward_hook(single)]
        handles.append(dm.final_layer.adaLN_modulation.register_forward_hook(final))
        if fwd.capture_rows:
            handles += self._capture(dm, fwd)
        return handles

    def _capture(self, dm, fwd):
        """Hooks that read the middle double blocks' own q / k (after their RMS norms) and RoPE."""
        t5 = {}
        handles = [dm.caption_projection[-1].register_forward_hook(lambda m, a, o: t5.update(length=o.shape[1]))]
        for i in self.capture_blocks:
            attn, seen = dm.double_stream_blocks[i].block.attn1, {}
            for name in ("q_rms_norm", "k_rms_norm", "k_rms_norm_t"):
                handles.append(getattr(attn, name).register_forward_hook(
                    lambda m, a, o, name=name, seen=seen: seen.__setitem__(name, o)))

            def read(module, args, kwargs, output, seen=seen):
                _record(fwd, module.heads, seen, kwargs.get("rope", args[3] if len(args) > 3 else None), t5["length"])

            handles.append(attn.register_forward_hook(read, with_kwargs=True))
        return handles


def _record(fwd, heads, seen, pe, t5_length):
    b = seen["q_rms_norm"].shape[0]
    q_img, k_img, k_txt = (seen[k].view(b, seen[k].shape[1], heads, -1)
                           for k in ("q_rms_norm", "k_rms_norm", "k_rms_norm_t"))
    n = q_img.shape[1]
    # RoPE per position of the joint [image | text] sequence (the text ids are 0: identity)
    q, k = _rope(torch.cat([q_img, k_txt], dim=1), torch.cat([k_img, k_txt], dim=1), pe)
    q_img, k_img, k_txt = (t.transpose(1, 2) for t in (q[:, :n], k[:, :n], k[:, n:]))
    # text keys [T5 | Llama | Llama]: the T5 part carries no weight, both Llama copies count
    # (Forward.weights repeats a context over the length it is given)
    record_maps(fwd, q_img, k_txt, k_img, context_len_offset=t5_length)
