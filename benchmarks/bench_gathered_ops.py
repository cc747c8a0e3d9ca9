"""What an unread transformer block does beyond ComfyUI's own under AsynDM: its modulation applied
per token (comfy_dit.Gathered) instead of broadcast per image, and its modulation Linear run once
more on the few distinct timestep rows (issue 16).

Everything else in such a block — its matmuls, attention, norms — runs on the same inputs in the
same code either way, so this difference *is* the block's overhead; timed here alone, in many short
interleaved repeats (the whole block's time swings by ±15% between runs on a shared CPU, more than
the difference). The ops are a dual-stream image block's (Qwen-Image, Flux's double and MMDiT's
joint blocks read theirs alike): two ``addcmul(shift, x, 1 + scale)``, the gated residuals
``x + gate · attn`` and ``addcmul(x, gate, mlp)``, at a published width, 4096 image tokens, bfloat16,
with three distinct timestep rows.

``--reads`` also times the attention read for masks at each family's published heads and head size,
4096 image queries and 64 text tokens (as the real-width benchmark), beside the block's own
attention over the same joint sequence (Wan: its cross-attention; one ``scaled_dot_product_attention``,
bfloat16): a dynamic run reads three blocks a step. Two reads: "inside" (attention_read.py: the
block's attention on the kernel that also returns the log-sum-exp, then the target columns — its
extra over the attention is what a read block adds) and "recomputed" (comfy_dit.joint_item_attention,
the read where another attention override is set or no such kernel runs: a second pass).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_gathered_ops.py [--widths 2432,3072,3584] [--repeats 40] [--reads]
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402  (after the OpenMP setting)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import conftest  # noqa: E402,F401  (imports this checkout as asyndm_fpdm)


def modulated_residuals(x, attn, mod):
    """A block's elementwise modulation as ComfyUI's blocks write it; ``mod`` (Bm, 6·D) per image or
    a Gathered per token."""
    def modulate(h, part):
        shift, scale, gate = torch.chunk(part, 3, dim=-1)
        return torch.addcmul(shift.unsqueeze(1), h, 1 + scale.unsqueeze(1)), gate.unsqueeze(1)

    m1, m2 = mod.chunk(2, dim=-1)
    _, g1 = modulate(x, m1)
    h = x + g1 * attn
    _, g2 = modulate(h, m2)
    return torch.addcmul(h, g2, attn)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="2432,3072,3584,5120")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--reads", action="store_true", help="also time the attention read per family")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from asyndm_fpdm.samplers.backends.comfy_dit import Gathered

    print(f"{args.tokens} image tokens, bf16, 3 timestep rows, {args.repeats} interleaved repeats, threads "
          f"{torch.get_num_threads()}; ms per block, fastest and median")
    print(f"  {'width':>5s} {'broadcast':>10s} {'per token':>10s} {'rows Linear':>11s} {'extra, fastest':>14s} "
          f"{'extra, median':>13s}")
    gen = torch.Generator().manual_seed(0)
    for width in map(int, args.widths.split(",")):
        x, attn = (torch.randn(1, args.tokens, width, generator=gen).bfloat16() for _ in range(2))
        lin = torch.nn.Linear(width, 6 * width, dtype=torch.bfloat16)
        vec = torch.randn(3, width, generator=gen).bfloat16()
        index = torch.zeros(1, args.tokens, dtype=torch.long)
        index[:, args.tokens // 4:args.tokens // 2] = 1
        index[:, 3 * args.tokens // 4:] = 2
        with torch.inference_mode():
            rows = lin(vec)
            runs = {"broadcast": lambda: modulated_residuals(x, attn, rows[:1]),
                    "per token": lambda: modulated_residuals(x, attn, Gathered(rows, index)),
                    "rows": lambda: lin(vec)}
            times = {k: [] for k in runs}
            for fn in runs.values():
                fn()
            for _ in range(args.repeats):
                for k, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(1000 * (time.perf_counter() - t0))
        fast = {k: min(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"  {width:5d} {fast['broadcast']:10.1f} {fast['per token']:10.1f} {fast['rows']:11.1f} "
              f"{fast['per token'] - fast['broadcast'] + fast['rows']:14.1f} "
              f"{med['per token'] - med['broadcast'] + med['rows']:13.1f}", flush=True)
    if args.reads:
        reads(args.tokens, max(3, args.repeats // 8))


# family: heads, head size, whether the read's softmax also covers the image keys (Wan: cross-attention)
READS = {"Flux / Chroma": (24, 128, True), "SD3.5 Large": (38, 64, True), "Qwen-Image": (24, 128, True),
         "Wan 2.2 A14B": (40, 128, False), "HiDream-I1": (20, 128, True), "Lumina 2": (24, 96, True),
         "HunyuanImage 2.1": (28, 128, True)}


def reads(tokens, repeats):
    """Seconds of one read against the block's own attention, fastest of ``repeats`` interleaved."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from asyndm_fpdm.samplers.backends.attention_read import attention_with_lse, lse_item_attention
    from asyndm_fpdm.samplers.backends.comfy_dit import joint_item_attention

    def inside(q, k, k_txt, weights):  # the attention with its log-sum-exp, then the target columns
        out, lse = attention_with_lse(q, k, k)
        return out, lse_item_attention(q[:, :, k_txt.shape[2]:], k_txt, lse[:, :, k_txt.shape[2]:], weights)

    print(f"  {'family':18s} {'heads x d':>9s} {'attention s':>11s} {'inside s':>8s} {'recomputed s':>12s}")
    gen = torch.Generator().manual_seed(0)
    weights = torch.zeros(64, 2)
    weights[3:5, 0] = 0.5
    weights[9, 1] = 1.0
    for name, (heads, d, joint) in READS.items():
        q = torch.randn(1, heads, tokens, d, generator=gen).bfloat16()
        k_img = torch.randn(1, heads, tokens if joint else 0, d, generator=gen).bfloat16()
        k_txt = torch.randn(1, heads, 64, d, generator=gen).bfloat16()
        k = torch.cat([k_txt, k_img], dim=2)
        # the block's queries: a joint block's text queries too
        qj = torch.cat([torch.randn(1, heads, 64, d, generator=gen).bfloat16(), q], dim=2) if joint else q
        runs = {"attention": lambda: sdpa(qj, k, k), "recomputed": lambda: joint_item_attention(q, k_txt, k_img, weights)}
        if joint:  # Wan's cross-attention read has no normaliser to share
            runs["inside"] = lambda: inside(qj, k, k_txt, weights)
        times = {n: [] for n in runs}
        with torch.inference_mode():
            for _ in range(repeats):
                for n, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[n].append(time.perf_counter() - t0)
        best = {n: f"{min(t):.2f}" for n, t in times.items()}
        print(f"  {name:18s} {f'{heads}x{d}':>9s} {best['attention']:>11s} {best.get('inside', '-'):>8s} "
              f"{best['recomputed']:>12s}", flush=True)


if __name__ == "__main__":
    main()
