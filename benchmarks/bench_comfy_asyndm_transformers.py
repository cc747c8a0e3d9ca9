"""Asynchronous KSampler (AsynDM, dynamic mask) against ComfyUI's own KSampler on Flux-, SD3- and
Chroma-shaped transformers (issues 11, 16): same model, sampler (euler), scheduler (simple), steps, latent
and conditioning, one process; every run warmed, then timed in interleaved rounds
(benchmarks/interleaved.py); prints per-step medians side by side and the median of the rounds'
ratios (target: AsynDM dynamic ≤ 1.05× core). Threads: torch's default, as ComfyUI runs.

Denormals: random weights drive some activations into float32 denormals, whose CPU cost depends
on the values (so on which pixels lag); trained weights rarely do. Flushing them is process-wide,
so it applies to both sides alike; ``--denormals both`` (default) reports the table without and
with it.

    COMFYUI_PATH=/path/to/ComfyUI OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_comfy_asyndm_transformers.py \
        [--size 512] [--steps 6] [--repeats 5] [--hidden 256] [--flux-depth 19] [--sd3-depth 4] \\
        [--families flux,sd3,chroma,wan,qwen_image]
        (HiDream-I1: --families hidream, double + 2x single blocks with MoE, cfg 5 as HiDream full)
        (Lumina 2: --families lumina2, NextDiT with 2 refiners and grouped key heads)

Models: ComfyUI's own Flux (dev: guidance embedding) and SD3 MMDiT classes and configs with random
weights — Flux with Flux dev's block structure (19 double and 38 single blocks, of which the masks
read three middle double blocks) at hidden ``hidden``, 4 heads; SD3 with ``sd3-depth`` joint
blocks (MMDiT fixes hidden = 64·blocks: 4 → 256); 512 px is a
64×64 latent, 1024 tokens — large enough that the transformer, not Python, dominates a step.
"""

import os
import pathlib
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def bootstrap(comfy_path, threads=0):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from bench_comfy_asyndm import bootstrap as bootstrap_comfyui

    bootstrap_comfyui(comfy_path, prefix="bench_asyndm_dit_", threads=threads)


def hidream_config(hidden, depth):
    """HiDream-I1's layout (``depth`` double + 2·``depth`` single blocks, MoE with 4 routed experts, 2
    active), head 64 = RoPE axes 32 + 16 + 16 as HiDream's 128 = 64 + 32 + 32; T5 / Llama width 512."""
    import comfy.supported_models as sm

    return sm.HiDream(dict(sm.HiDream.unet_config, patch_size=2, in_channels=16, out_channels=16, num_layers=depth,
                           num_single_layers=2 * depth, attention_head_dim=64, num_attention_heads=hidden // 64,
                           caption_channels=[512, 512], text_emb_dim=2048, num_routed_experts=4,
                           num_activated_experts=2, axes_dims_rope=(32, 16, 16), llama_layers=[0] * (3 * depth)))


def build(family, hidden, depth):
    import comfy.supported_models as sm

    from bench_comfy_asyndm import patcher

    if family == "hidream":
        return patcher(hidream_config(hidden, depth))
    if family == "hunyuan_image":  # HunyuanImage 2.1: 64-channel latents (32× VAE), 1×1 patches, head 64
        return patcher(sm.HunyuanImage21(dict(
            sm.HunyuanImage21.unet_config, in_channels=64, out_channels=64, context_in_dim=512, hidden_size=hidden,
            mlp_ratio=4.0, num_heads=hidden // 64, depth=depth, depth_single_blocks=2 * depth, axes_dim=[32, 32],
            theta=256, patch_size=[1, 1], qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False)))
    if family == "flux":
        unet = dict(sm.Flux.unet_config, in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=512,
                    hidden_size=hidden, mlp_ratio=4.0, num_heads=4, depth=depth, depth_single_blocks=2 * depth,
                    theta=10000, patch_size=2, qkv_bias=True)
        head = hidden // 4  # RoPE axes like Flux's (16, 56, 56) of 128: even splits of the head
        unet["axes_dim"] = [head - 2 * (head * 3 // 8 // 2 * 2), head * 3 // 8 // 2 * 2, head * 3 // 8 // 2 * 2]
        config = sm.Flux(unet)
    elif family == "chroma":  # Flux's layout; the approximator at the hidden width, 5 layers as Chroma's
        unet = dict(sm.Chroma.unet_config, in_channels=64, out_channels=64, context_in_dim=512, hidden_size=hidden,
                    mlp_ratio=4.0, num_heads=4, depth=depth, depth_single_blocks=2 * depth, theta=10000,
                    patch_size=2, qkv_bias=True, in_dim=64, out_dim=hidden, hidden_dim=hidden, n_layers=5)
        head = hidden // 4
        unet["axes_dim"] = [head - 2 * (head * 3 // 8 // 2 * 2), head * 3 // 8 // 2 * 2, head * 3 // 8 // 2 * 2]
        config = sm.Chroma(unet)
    elif family == "wan":  # Wan 2.1 t2v layout, 4 heads; one frame (text-to-image)
        config = sm.WAN21_T2V(dict(sm.WAN21_T2V.unet_config, patch_size=(1, 2, 2), in_dim=16, out_dim=16, dim=hidden,
                                   ffn_dim=4 * hidden, freq_dim=256, text_dim=512, num_heads=4, num_layers=depth))
    elif family == "qwen_image":  # head 64 = RoPE axes 16 + 24 + 24
        config = sm.QwenImage(dict(sm.QwenImage.unet_config, patch_size=2, in_channels=64, out_channels=16,
                                   num_layers=depth, attention_head_dim=64, num_attention_heads=hidden // 64,
                                   joint_attention_dim=512, axes_dims_rope=(16, 24, 24)))
    elif family == "lumina2":  # NextDiT: head 64 = RoPE axes 16 + 24 + 24, 4 query heads on 2 key heads
        config = sm.Lumina2(dict(sm.Lumina2.unet_config, patch_size=2, in_channels=16, dim=hidden, n_layers=depth,
                                 n_refiner_layers=2, n_heads=hidden // 64, n_kv_heads=hidden // 128, multiple_of=256,
                                 ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True, cap_feat_dim=512,
                                 axes_dims=[16, 24, 24], axes_lens=[300, 512, 512]))
    else:
        unet = dict(sm.SD3.unet_config, patch_size=2, out_channels=16, depth=depth, num_patches=64 * 64,
                    pos_embed_max_size=64, adm_in_channels=2048,
                    context_embedder_config={"target": "torch.nn.Linear",
                                             "params": {"in_features": 512, "out_features": 64 * depth}})
        config = sm.SD3(unet)
    return patcher(config)


CFGS = {"flux": 1.0, "sd3": 4.5, "chroma": 4.0, "wan": 6.0, "qwen_image": 4.0, "hidream": 5.0, "lumina2": 4.0,
        "hunyuan_image": 3.5}


def inputs(family, size, gen):
    """(cfg, positive, negative, latent) as the family's text encoders and empty-latent node give
    them: a 64-token, 512-wide context, the family's pooled / extra conditioning, targets at
    tokens 2 and 4."""
    import torch

    targets = {"words": ["rabbit", "basketball"], "ks": [0.7, 0.7], "positions": [[2], [4]], "context_len": 64}
    lat = size // 8
    pooled = 768 if family == "flux" else 2048
    extra = {"pooled_output": torch.randn(1, pooled, generator=gen) if family in ("flux", "sd3") else None}
    if family == "flux":
        extra["guidance"] = 3.5
    if family == "hidream":  # pooled CLIP-L‖G (2048) and one Llama layer (the config reads layer 0)
        extra = {"pooled_output": torch.randn(1, 2048, generator=gen),
                 "conditioning_llama3": torch.randn(1, 1, 64, 512, generator=gen)}
    if family == "lumina2":  # Gemma's mask (all ones: the model gets num_tokens)
        extra["attention_mask"] = torch.ones(1, 64, dtype=torch.long)
    pos = [[torch.randn(1, 64, 512, generator=gen), dict(extra, asyndm_targets=targets)]]
    neg = [[torch.randn(1, 64, 512, generator=gen), dict(extra)]]
    latent = {"samples": torch.zeros(1, 16, 1, lat, lat) if family in ("wan", "qwen_image") else
              torch.zeros(1, 16, lat, lat)}
    if family == "hunyuan_image":  # its 32× latent with 1×1 patches: as many tokens as the others' 8× with 2×2
        latent = {"samples": torch.zeros(1, 64, lat // 2, lat // 2)}
    return CFGS[family], pos, neg, latent


def main():
    from bench_comfy_asyndm import comfy_args, comfy_parser

    ap = comfy_parser(__doc__)
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (latent = size/8)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256, help="Flux hidden size")
    ap.add_argument("--flux-depth", type=int, default=19,
                    help="Flux double blocks (2× as many single blocks): 19 is Flux dev's 19 + 38")
    ap.add_argument("--sd3-depth", type=int, default=4, help="SD3 joint blocks (MMDiT's hidden is 64·blocks)")
    ap.add_argument("--families", default="flux,sd3,chroma,wan,qwen_image,hidream,lumina2,hunyuan_image",
                    help="comma-separated: flux, sd3, chroma, wan, qwen_image, hidream, lumina2, hunyuan_image (Flux's depth: double blocks, "
                         "or all blocks for Wan / Qwen-Image)")
    ap.add_argument("--denormals", choices=("keep", "flush", "both"), default="both",
                    help="float32 denormals kept, flushed (process-wide: both sides), or a table for each")
    args = comfy_args(ap)
    bootstrap(args.comfyui, threads=args.threads)

    import nodes
    import torch

    from interleaved import flush_denormals, interleaved, median, ratio, spread

    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMKSampler

    gen = torch.Generator().manual_seed(1)
    settings = {"keep": [False], "flush": [True], "both": [False, True]}[args.denormals]
    rows = []
    for family in args.families.split(","):
        model = build(family, args.hidden, args.sd3_depth if family == "sd3" else args.flux_depth)
        cfg, pos, neg, latent = inputs(family, args.size, gen)

        def core():
            return nodes.KSampler().sample(model, 7, args.steps, cfg, "euler", "simple", pos, neg, latent)

        half = torch.zeros(1, args.size, args.size)
        half[:, :, : args.size // 2] = 1

        def asyn(source="dynamic", mask=None):
            return lambda: AsynDMKSampler().sample(
                model, 7, args.steps, cfg, 0.0, "AsynDM", source, "bin", "", 1.0, "clean (sigma 0, like ComfyUI)",
                pos, neg, latent, sampler_name="euler", scheduler="simple", denoise=1.0, mask=mask)

        # dynamic: per-token timesteps + attention read every step; mask input: per-token timesteps only
        runs = {"core": core, "asyn": asyn(), "tokens": asyn("mask input", half)}
        for flush in settings:
            if not flush_denormals(flush) and flush:
                print("this CPU cannot flush denormals: the 'flushed' rows equal the kept ones")
            with torch.inference_mode():
                times = interleaved(runs, args.repeats, per=args.steps)
            rows.append((family, flush, median(times["core"]), median(times["asyn"]), ratio(times, "asyn", "core"),
                         ratio(times, "tokens", "core"), spread(times, "asyn", "core")))
        flush_denormals(False)
    lat = args.size // 8
    print(f"latent {lat}x{lat} ({(lat // 2) ** 2} tokens), {args.steps} steps euler/simple, threads "
          f"{torch.get_num_threads()}, {args.repeats} interleaved rounds after a warm-up of each, median per step "
          "(ratios: median of the rounds' ratios)")
    print(f"  {'model':40s} {'denormals':>9s} {'ComfyUI':>10s} {'AsynDM dynamic':>15s} {'ratio':>6s} "
          f"{'no attention read':>18s} {'rounds':>11s}")
    names = {"flux": f"Flux-shaped ({args.flux_depth}+{2 * args.flux_depth} blocks, h{args.hidden}, cfg 1)",
             "sd3": f"SD3-shaped ({args.sd3_depth} blocks, h{64 * args.sd3_depth}, cfg 4.5)",
             "chroma": f"Chroma-shaped ({args.flux_depth}+{2 * args.flux_depth} blocks, h{args.hidden}, cfg 4)",
             "wan": f"Wan-shaped ({args.flux_depth} blocks, h{args.hidden}, 1 frame, cfg 6)",
             "qwen_image": f"Qwen-Image-shaped ({args.flux_depth} blocks, h{args.hidden}, cfg 4)"}
    names["hunyuan_image"] = f"HunyuanImage-2.1-shaped ({args.flux_depth}+{2 * args.flux_depth} blocks, h{args.hidden})"
    names["hidream"] = f"HiDream-shaped ({args.flux_depth}+{2 * args.flux_depth} blocks, MoE, h{args.hidden}, cfg 5)"
    names["lumina2"] = f"Lumina-2-shaped ({args.flux_depth} blocks, h{args.hidden}, cfg 4)"
    for family, flush, c, a, r, r_tokens, rounds in rows:
        print(f"  {names[family]:40s} {'flushed' if flush else 'kept':>9s} {c * 1000:7.1f} ms {a * 1000:12.1f} ms "
              f"{r:6.3f} {r_tokens:18.3f} {rounds:>11s}")


if __name__ == "__main__":
    main()
