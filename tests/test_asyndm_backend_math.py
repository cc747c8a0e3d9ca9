"""Backend math without ComfyUI: the joint-attention read for masks against a naive full softmax."""

import pytest
import torch

from asyndm_fpdm.samplers.backends.comfy_dit import joint_item_attention
from numeric import assert_close


@pytest.mark.parametrize("fused", [True, False], ids=["fused kernel", "math kernel fallback"])
def test_joint_item_attention_equals_the_full_softmax(fused, monkeypatch):
    """The fused read (attention whose values are the items' token weights) = the full joint
    softmax's text columns, head-averaged and weighted per item (naive oracle), for query blocks
    of any size and more items than the head size (items in groups of d); also where no fused
    kernel takes the call (the bounded math fallback).
    Caught: value weights left on the image keys too (probabilities summed over image keys), and
    a second item group overwriting the first."""
    if not fused:
        import contextlib

        @contextlib.contextmanager
        def no_fused_kernel(backends):
            raise RuntimeError("No available kernel.")
            yield

        monkeypatch.setattr("torch.nn.attention.sdpa_kernel", no_fused_kernel)
    gen = torch.Generator().manual_seed(0)
    b, heads, nq, lt, d = 2, 3, 10, 5, 4
    q = torch.randn(b, heads, nq, d, generator=gen)
    k_txt = torch.randn(b, heads, lt, d, generator=gen)
    k_img = torch.randn(b, heads, nq, d, generator=gen)
    weights = torch.rand(lt, 6, generator=gen)
    weights[1, 0] = 1.0
    probs = torch.softmax(q @ torch.cat([k_txt, k_img], dim=2).transpose(-1, -2) * d ** -0.5, dim=-1)
    naive = probs[..., :lt].mean(dim=1) @ weights
    for block in (3, 1024):
        assert_close(joint_item_attention(q, k_txt, k_img, weights, block=block), naive, 1e-5, f"block {block}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_joint_item_attention_reads_a_half_precision_model_in_its_precision(dtype):
    """A half-precision model's q / k are read in that precision: the result (float32) equals the
    float32 oracle on the same q / k within the dtype's rounding (measured: 2.2e-3 bfloat16, 1.8e-4
    float16), also for items with unequal token weights (values scaled to at most 1 and back).
    Caught: the scale not undone (off by each item's largest weight)."""
    gen = torch.Generator().manual_seed(1)
    b, heads, nq, lt, d = 1, 4, 64, 12, 16
    q, k_img = (torch.randn(b, heads, nq, d, generator=gen).to(dtype) for _ in range(2))
    k_txt = torch.randn(b, heads, lt, d, generator=gen).to(dtype)
    weights = torch.zeros(lt, 3)
    weights[2:5, 0] = 1 / 3
    weights[7, 1] = 0.25
    weights[8:11, 2] = torch.tensor([0.2, 0.5, 0.3])
    qf, kf = q.float(), torch.cat([k_txt, k_img], dim=2).float()
    naive = torch.softmax(qf @ kf.transpose(-1, -2) * d ** -0.5, dim=-1)[..., :lt].mean(dim=1) @ weights
    out = joint_item_attention(q, k_txt, k_img, weights)
    assert out.dtype == torch.float32
    assert_close(out, naive, 8e-3 if dtype == torch.bfloat16 else 1e-3, str(dtype))


def test_joint_item_attention_builds_no_attention_matrix():
    """At Flux's 1024² size (24 heads of 128, 4096 image + 256 text tokens) the read allocates far
    less than one head's (4096 × 4352) float32 logits (71 MB), let alone all heads' (1.7 GB):
    measured with the CPU allocator's peak through the profiler.
    Caught: a plain softmax over all keys (the full matrix)."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(0)
    q, k_img = torch.randn(2, 1, 24, 4096, 128, generator=gen)
    k_txt = torch.randn(1, 24, 256, 128, generator=gen)
    weights = torch.zeros(256, 2)
    weights[3, 0] = weights[7, 1] = 1.0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = joint_item_attention(q, k_txt, k_img, weights)
    peak = max(e.cpu_memory_usage for e in prof.key_averages())
    assert out.shape == (1, 4096, 2)
    assert peak < 71e6, f"the read allocated {peak / 1e6:.0f} MB in one op"


def _naive_items(q, k, text, weights, mask=None):
    """Oracle: the full joint softmax (float32, the mask added), its text columns head-averaged and
    weighted per item."""
    logits = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits + (mask.float() if mask.is_floating_point() else torch.where(mask, 0.0, float("-inf")))
    return torch.softmax(logits, dim=-1)[..., text].mean(dim=1) @ weights


@pytest.mark.parametrize("mask", [None, "additive", "boolean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_inside_the_attention_equals_the_full_softmax(dtype, mask):
    """The read that rides the block's own attention: the fused kernel's output is the attention's
    (``scaled_dot_product_attention`` on the same inputs, the kernel a CPU runs: identical), its
    log-sum-exp the normaliser, and the items' mass from it (the target columns only) equals the
    naive joint softmax, with no mask, ComfyUI's additive mask (large negative on padded keys) and
    a boolean one. Caught: the lse of another scale (1/d), the mask left out of the kernel (padded
    keys counted in the normaliser), a boolean mask passed as values."""
    from asyndm_fpdm.samplers.backends.attention_read import attention_with_lse, lse_item_attention

    gen = torch.Generator().manual_seed(2)
    b, heads, length, d, lt = 2, 3, 40, 16, 7
    q, k, v = (torch.randn(b, heads, length, d, generator=gen).to(dtype) for _ in range(3))
    m = None
    if mask is not None:  # the last 5 keys padded, as a caption's padding
        keep = torch.ones(b, 1, 1, length, dtype=torch.bool)
        keep[..., -5:] = False
        m = keep if mask == "boolean" else torch.zeros(keep.shape, dtype=dtype).masked_fill(
            ~keep, -torch.finfo(dtype).max)
    out, lse = attention_with_lse(q, k, v, m)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert_close(out.float(), ref.float(), 1e-6, "output")
    weights = torch.zeros(lt, 3)
    weights[1:3, 0] = 0.5
    weights[4, 1] = 1.0
    weights[5:7, 2] = torch.tensor([0.3, 0.7])
    start = 10  # image queries after the text (and 3 other tokens)
    got = lse_item_attention(q[:, :, start:], k[:, :, 2:2 + lt], lse[:, :, start:], weights)
    naive = _naive_items(q, k, slice(2, 2 + lt), weights, m)[:, start:]
    assert got.shape == (b, length - start, 3)
    assert_close(got, naive, 1e-5 if dtype == torch.float32 else 8e-3, f"{dtype} {mask}")


def test_joint_item_attention_takes_the_attention_mask():
    """Where the read recomputes the normaliser (another attention override set, not a CPU tensor),
    the attention's mask enters it too: padded keys carry no probability (naive oracle with the
    mask). Caught: the mask dropped."""
    gen = torch.Generator().manual_seed(3)
    b, heads, nq, lt, d = 1, 2, 12, 5, 8
    q, k_img = (torch.randn(b, heads, nq, d, generator=gen) for _ in range(2))
    k_txt = torch.randn(b, heads, lt, d, generator=gen)
    weights = torch.rand(lt, 2, generator=gen)
    mask = torch.zeros(1, 1, 1, lt + nq)
    mask[..., -4:] = -torch.finfo(torch.float32).max
    naive = _naive_items(q, torch.cat([k_txt, k_img], dim=2), slice(0, lt), weights, mask)
    assert_close(joint_item_attention(q, k_txt, k_img, weights, mask=mask), naive, 1e-5, "masked")
    assert (naive - _naive_items(q, torch.cat([k_txt, k_img], dim=2), slice(0, lt), weights)).abs().max() > 1e-3


def test_fold_stacks_frames_along_the_height_in_wan_token_order():
    """A (1, 2, 2)-patch token (frame, row, column) is a 2×2 cell of the folded image, row-major.
    Caught: frames stacked along the width (token order no longer frame-major)."""
    from asyndm_fpdm.samplers.backends.comfy_call import fold, unfold

    t, h, w = 3, 4, 6
    video = torch.arange(t * h * w, dtype=torch.float32).view(1, 1, t, h, w)
    tall = fold(video)
    assert tall.shape == (1, 1, t * h, w) and torch.equal(unfold(tall, t), video)
    # tokens as a (1, 2, 2) patchify orders them: frame, then row, then column
    tokens = video[0, 0, :, ::2, ::2].flatten()
    assert torch.equal(tall[0, 0, ::2, ::2].flatten(), tokens)
    assert fold(torch.zeros(1, 4, 8, 8)).shape == (1, 4, 8, 8)  # an image is left alone


def test_forward_image_rows_find_or_append_each_images_own_timestep():
    """The stock per-image conditioning is one of the rows (Chroma's approximator runs once); a
    pair no pixel has (an area crop away from the background) gets a row appended."""
    from asyndm_fpdm.samplers.backends.comfy_call import Forward, PixelCall
    from asyndm_fpdm.samplers.backends.pixel_math import distinct_rows

    t_map = torch.tensor([[[5.0, 7.0]], [[7.0, 7.0]]])  # (2 images, 1, 2)
    uniq, row_img, index = distinct_rows(t_map, per_image=True)
    fwd = Forward(PixelCall(torch.zeros(2, 1, 1, 2)), None, torch.zeros(2, 1, 1, 2), t_map, uniq, row_img, index, 1,
                  [], (0, 0), t_image=torch.tensor([5.0, 3.0]))
    rows = fwd.image_rows()
    assert float(fwd.uniq_t[rows[0]]) == 5.0 and int(fwd.row_img[rows[0]]) == 0
    assert float(fwd.uniq_t[rows[1]]) == 3.0 and int(fwd.row_img[rows[1]]) == 1  # appended
    assert len(fwd.uniq_t) == len(uniq) + 1


def test_lumina2_token_index_places_image_tokens_after_each_caption():
    """NextDiT's joint sequence is [caption | image | padding] per image, the caption as long as its
    attention mask's ones (else num_tokens): image tokens read their rows, every other position
    its image's stock row R + b (Forward.token_index, which comfy_dit.per_token gathers with).
    Caught: image tokens placed after the whole (masked) context."""
    from asyndm_fpdm.samplers.backends.comfy_call import Forward, PixelCall
    from asyndm_fpdm.samplers.backends.comfy_lumina2 import caption_lengths

    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert caption_lengths({"attention_mask": mask}, 2) == [2, 3]
    assert caption_lengths({"num_tokens": 5, "attention_mask": None}, 2) == [5, 5]
    index = torch.tensor([[[0, 1]], [[1, 0]]])  # 2 images of one 1×2 token row, cell 1
    fwd = Forward(PixelCall(torch.zeros(2, 1, 1, 2)), None, torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 2),
                  torch.tensor([0.1, 0.5]), torch.zeros(2, dtype=torch.long), index, 1, [], (0, 0))
    # rows 0, 1 are the timesteps; 2 is image 0's stock row, 3 image 1's
    assert fwd.token_index([2, 3], 6).tolist() == [[2, 2, 0, 1, 2, 2], [3, 3, 3, 1, 0, 3]]


def test_gathered_reads_like_the_per_token_modulation_it_stands_for():
    """comfy_dit.Gathered (rows + every token's row) read the ways stock block code reads a per-image
    modulation — ``[:, None]`` / ``unsqueeze(1)``, ``chunk`` and ``torch.chunk``, ``1 + scale``,
    ``tanh``, products on either side, ``addcmul`` — equals the same arithmetic on the (Bm, L, K)
    tensor built token by token (naive oracle; two text tokens first, on their image's stock value).
    Caught: ``1 + scale`` dropping the 1 (``__radd__`` returning the rows unchanged)."""
    from asyndm_fpdm.samplers.backends.comfy_call import Forward, PixelCall
    from asyndm_fpdm.samplers.backends.comfy_dit import Gathered, token_rows

    gen = torch.Generator().manual_seed(0)
    rows, stock = torch.randn(3, 6, generator=gen), torch.randn(2, 6, generator=gen)  # R = 3, Bm = 2, K = 6
    index = torch.tensor([[[0, 2, 1]], [[1, 1, 0]]])  # 2 images of one 1×3 token row, cell 1
    fwd = Forward(PixelCall(torch.zeros(2, 1, 1, 3)), None, torch.zeros(2, 1, 1, 3), torch.zeros(2, 1, 3),
                  torch.zeros(3), torch.zeros(3, dtype=torch.long), index, 1, [], (0, 0))
    g = Gathered(*token_rows(fwd, rows, stock, before=2))
    naive = torch.stack([torch.stack([stock[b]] * 2 + [rows[int(r)] for r in index[b, 0]]) for b in range(2)])
    x = torch.randn(2, 5, 2, generator=gen)

    shift, scale, gate = torch.chunk(g[:, None], 3, dim=-1)  # as the stock blocks read their modulation
    got = (x + gate.unsqueeze(1).tanh() * torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1)),
           x * (1 + scale), gate * x + shift)
    shift, scale, gate = naive.chunk(3, dim=-1)
    want = (x + gate.tanh() * torch.addcmul(shift, x, 1 + scale), x * (1 + scale), gate * x + shift)
    for k, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-6, f"read {k}")
    assert all(isinstance(p, Gathered) for p in g.chunk(3, dim=1))  # Lumina's chunk(4, dim=1) of (Bm, K)
