"""Backend math without ComfyUI: the joint-attention read for masks against a naive full softmax."""

import torch

from asyndm_fpdm.samplers.backends.comfy_dit import joint_item_attention
from numeric import assert_close


def test_joint_item_attention_blockwise_equals_the_full_softmax():
    """Blocks of queries, one head at a time, image keys only through a logsumexp = the full joint
    softmax's text columns, head-averaged and weighted per item (naive oracle).
    Caught: a block's result overwriting the previous heads' (``=`` for ``+=``)."""
    gen = torch.Generator().manual_seed(0)
    b, heads, nq, lt, d = 2, 3, 10, 5, 4
    q = torch.randn(b, heads, nq, d, generator=gen)
    k_txt = torch.randn(b, heads, lt, d, generator=gen)
    k_img = torch.randn(b, heads, nq, d, generator=gen)
    weights = torch.zeros(lt, 2)
    weights[1, 0] = 1.0
    weights[[2, 4], 1] = 0.5
    probs = torch.softmax(q @ torch.cat([k_txt, k_img], dim=2).transpose(-1, -2) * d ** -0.5, dim=-1)
    naive = probs[..., :lt].mean(dim=1) @ weights
    for block in (3, 1024):
        assert_close(joint_item_attention(q, k_txt, k_img, weights, block=block), naive, 1e-5, f"block {block}")
