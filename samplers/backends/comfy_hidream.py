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

from .attention_read import arm
from .comfy_dit import Gathered, Modulation, time_rows, token_rows
from .protocol import PixelBackend, register, unsupported


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
        """The read armed in the middle double blocks' joint attention, [image | T5 | Llama | Llama]:
        the T5 part carries no weight (the offset), both Llama copies count (Forward.weights repeats
        a context over the length it is given)."""
        t5 = {}

        def image_first(args, kwargs):  # attn1(image, masks, text, rope=...)
            n_img, n_txt = args[0].shape[1], args[2].shape[1]
            return (lambda b: (slice(n_img, n_img + n_txt), 0)), t5["length"]

        handles = [dm.caption_projection[-1].register_forward_hook(lambda m, a, o: t5.update(length=o.shape[1]))]
        return handles + [h for i in self.capture_blocks for h in arm(fwd, dm.double_stream_blocks[i].block.attn1,
                                                                         image_first)]
