"""AsynDM dynamic against ComfyUI's own KSampler at each family's published width and a realistic
token count (issue 16: ≤ 1.05× per step), extrapolated over depth from timed blocks.

Every family is built from ComfyUI's own model class at its published hidden size, heads, MLP,
patch and RoPE axes, in bfloat16 as the checkpoints ship, with random weights, 4096 image tokens
(1024² px; HunyuanImage 2.1: 2048², its 32× latent). Its published depth does not fit this CPU
(Flux dev: 12B parameters, minutes a step), so it runs at a stand-in depth of ``n`` units (a unit:
one block; Flux-like families one double + two single blocks, as their 19 + 38) that holds the
three blocks whose attention AsynDM reads for masks and some it does not read. Each block is timed
inside the run (the wall time from its start to the next block's, whatever patch or hook runs it),
so a step splits into the measured whole and the time of one unread unit, t (from the unread
blocks after each list's first, which also carries a forward's one-off work, over all rounds); each
side extrapolates to the published depth D:

    T(D) = T(n) + (D − n) · t

and the ratio at D is AsynDM's T(D) over ComfyUI's. Two estimates: from each side's fastest step and
block (min: the uncontended time — on a shared CPU interference only adds time, and a block's time
swings by ±15% from run to run while the two sides' unread blocks run the same matmuls and differ
by a few elementwise modulation ops), and from the medians. The ratio of the stand-in itself is
printed too: it carries the three reads and the per-step bookkeeping over a few blocks, well above
what the full model pays. One euler step (simple schedule), cfg 1 for every family (one row per
model call: the read, on the conditional row only, is the largest share it can be), the text as the
transformer benchmark's (64 tokens, 512 wide). Rounds interleave both sides (benchmarks/interleaved.py)
after a warm-up of each at full size.

    COMFYUI_PATH=/path/to/ComfyUI OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_comfy_asyndm_real_width.py \
        [--families flux,sd3,...] [--size 1024] [--depth 6] [--repeats 3]
"""

import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402  (after the OpenMP setting)

# family: published width, depth in units, and what one unit holds
PUBLISHED = {
    "flux": ("Flux.1 dev", 3072, 19, "1 double + 2 single blocks"),
    "chroma": ("Chroma", 3072, 19, "1 double + 2 single blocks"),
    "sd3": ("SD3.5 Large", 2432, 37, "1 joint block (+ the last, context pre-only, in every depth)"),
    "wan": ("Wan 2.2 A14B (one frame)", 5120, 40, "1 block"),
    "qwen_image": ("Qwen-Image", 3072, 60, "1 dual-stream block"),
    "hidream": ("HiDream-I1 full (MoE)", 2560, 16, "1 double + 2 single blocks"),
    "lumina2": ("Lumina 2", 2304, 26, "1 block (its 2 + 2 refiner blocks in every depth)"),
    "hunyuan_image": ("HunyuanImage 2.1 (2048² px)", 3584, 20, "1 double + 2 single blocks"),
}
# the block lists a unit adds to: (attribute, blocks per unit)
LISTS = {"flux": [("double_blocks", 1), ("single_blocks", 2)], "chroma": [("double_blocks", 1), ("single_blocks", 2)],
         "hunyuan_image": [("double_blocks", 1), ("single_blocks", 2)],
         "hidream": [("double_stream_blocks", 1), ("single_stream_blocks", 2)],
         "sd3": [("joint_blocks", 1)], "wan": [("blocks", 1)], "qwen_image": [("transformer_blocks", 1)],
         "lumina2": [("layers", 1)]}


def config(family, units):
    """ComfyUI's model config at the published width and ``units`` depth units."""
    import comfy.supported_models as sm

    flux_axes = [16, 56, 56]
    if family in ("flux", "chroma"):
        unet = dict(sm.Flux.unet_config if family == "flux" else sm.Chroma.unet_config, in_channels=16 if family == "flux" else 64,
                    out_channels=16 if family == "flux" else 64, context_in_dim=512, hidden_size=3072,
                    mlp_ratio=4.0, num_heads=24, depth=units, depth_single_blocks=2 * units, axes_dim=flux_axes,
                    theta=10000, patch_size=2, qkv_bias=True)
        if family == "flux":
            unet["vec_in_dim"] = 768
        if family == "chroma":  # Chroma's distilled approximator: 64 → 5120 → 3072, 5 layers
            unet.update(in_dim=64, out_dim=3072, hidden_dim=5120, n_layers=5)
            return sm.Chroma(unet)
        return sm.Flux(unet)
    if family == "hunyuan_image":
        return sm.HunyuanImage21(dict(
            sm.HunyuanImage21.unet_config, in_channels=64, out_channels=64, context_in_dim=512, hidden_size=3584,
            mlp_ratio=4.0, num_heads=28, depth=units, depth_single_blocks=2 * units, axes_dim=[64, 64], theta=256,
            patch_size=[1, 1], qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False))
    if family == "hidream":
        return sm.HiDream(dict(sm.HiDream.unet_config, patch_size=2, in_channels=16, out_channels=16, num_layers=units,
                               num_single_layers=2 * units, attention_head_dim=128, num_attention_heads=20,
                               caption_channels=[512, 512], text_emb_dim=2048, num_routed_experts=4,
                               num_activated_experts=2, axes_dims_rope=(64, 32, 32), llama_layers=[0] * (3 * units)))
    if family == "wan":
        return sm.WAN21_T2V(dict(sm.WAN21_T2V.unet_config, patch_size=(1, 2, 2), in_dim=16, out_dim=16, dim=5120,
                                 ffn_dim=13824, freq_dim=256, text_dim=512, num_heads=40, num_layers=units))
    if family == "qwen_image":
        return sm.QwenImage(dict(sm.QwenImage.unet_config, patch_size=2, in_channels=64, out_channels=16,
                                 num_layers=units, attention_head_dim=128, num_attention_heads=24,
                                 joint_attention_dim=512, axes_dims_rope=(16, 56, 56)))
    if family == "lumina2":
        return sm.Lumina2(dict(sm.Lumina2.unet_config, patch_size=2, in_channels=16, dim=2304, n_layers=units,
                               n_refiner_layers=2, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None,
                               norm_eps=1e-5, qk_norm=True, cap_feat_dim=512, axes_dims=[32, 32, 32],
                               axes_lens=[300, 512, 512]))
    # SD3.5 Large: MMDiT's width is 64 · depth, so it is built at its 38 blocks (weights not yet
    # allocated by ComfyUI's skip-init layers) and pruned to ``units`` + the pre-only last before the fill
    c = sm.SD3(dict(sm.SD3.unet_config, patch_size=2, out_channels=16, depth=38, num_patches=192 * 192,
                    pos_embed_max_size=192, adm_in_channels=2048, qk_norm="rms",
                    context_embedder_config={"target": "torch.nn.Linear",
                                             "params": {"in_features": 512, "out_features": 2432}}))
    c.prune = lambda dm: setattr(dm, "joint_blocks", type(dm.joint_blocks)([*dm.joint_blocks[:units],
                                                                           dm.joint_blocks[-1]]))
    return c


class TimedBlocks(torch.nn.ModuleList):
    """A block list that, while the diffusion model's forward runs (``watch``), stamps each block's
    start the first time the forward reaches it — by the model's loop or by index from a replace
    patch (MMDiT, Qwen-Image) — and the loop's end; block i's time runs from its start to block
    i + 1's (the last one's to the loop's end, when looped)."""

    def __init__(self, blocks):
        super().__init__(blocks)
        self.times, self.starts, self.active = {}, {}, False

    def _stamp(self, i):
        if not self.active or i in self.starts:
            return
        self.starts[i] = time.perf_counter()
        if i - 1 in self.starts:
            self.times.setdefault(i - 1, []).append(self.starts[i] - self.starts[i - 1])

    def __iter__(self):
        for i, block in enumerate(super().__iter__()):
            self._stamp(i)
            yield block
        self._stamp(len(self))

    def __getitem__(self, idx):
        if isinstance(idx, int):
            self._stamp(idx % len(self))
        return super().__getitem__(idx)

    @staticmethod
    def watch(dm, lists):
        """Stamp only inside ``dm``'s forward: a backend's own walks over the blocks (hooks set up
        per call) happen before it."""
        def on(flag):
            def hook(*_):
                for timed in lists:
                    timed.active, timed.starts = flag, {}
            return hook
        dm.register_forward_pre_hook(on(True))
        dm.register_forward_hook(on(False))


def unread_blocks(lists, family, read):
    """Per block list: the seconds of each block the masks do not read (``read``: the first list's,
    as the backend picks them), per model call, over the run (one sample a block and call)."""
    out = []
    for (name, _), blocks in zip(LISTS[family], lists):
        n = len(blocks)
        skip = read if name == LISTS[family][0][0] else []
        # not the first block of a list: it carries the forward's lazy per-call work (token index,
        # rows) that the full model pays once too; SD3's pre-only last is fixed
        unread = [i for i in range(1, n - (family == "sd3")) if i not in skip]
        out.append([t for i in unread for t in blocks.times.get(i, [])])
    return out


def unit_seconds(samples, family, calls, stat=statistics.median):
    """One unread unit's seconds per step: each list's block time (``stat`` over ``samples``, one list
    of block times per block list) times the blocks a unit holds and the model calls of a step."""
    return sum(per * stat(s) for (_, per), s in zip(LISTS[family], samples)) * calls


def main():
    from bench_comfy_asyndm import comfy_args, comfy_parser

    ap = comfy_parser(__doc__)
    ap.add_argument("--families", default=",".join(PUBLISHED))
    ap.add_argument("--size", type=int, default=1024, help="image size in pixels (8× latent; HunyuanImage: 2×)")
    ap.add_argument("--depth", type=int, default=6, help="stand-in depth in units (≥ 4: three read, one not)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--blocks", action="store_true", help="also print every block's median seconds per side")
    args = comfy_args(ap)
    from bench_comfy_asyndm_transformers import bootstrap, inputs

    bootstrap(args.comfyui, threads=args.threads)
    import comfy.utils
    import nodes

    from bench_comfy_asyndm import patcher
    from interleaved import median

    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMKSampler
    from asyndm_fpdm.samplers.backends import backend_for

    comfy.utils.PROGRESS_BAR_ENABLED = False
    print(f"{args.size}² px, bf16, {args.steps} euler step(s), cfg 1, threads {torch.get_num_threads()}, stand-in "
          f"depth {args.depth} units, {args.repeats} interleaved rounds after a full-size warm-up (s per step; "
          "ratios from each side's fastest and median)",
          flush=True)
    print(f"  {'model':30s} {'width':>5s} {'D':>3s} {'core s (n)':>8s} {'ratio (n)':>9s} {'unit s':>7s} "
          f"{'unit s':>7s} {'unit ratio':>9s} {'at D':>9s} {'unit ratio':>9s} {'at D':>9s}", flush=True)
    print(f"  {'':30s} {'':>5s} {'':>3s} {'min':>8s} {'min':>9s} {'core min':>7s} {'AsynDM':>7s} "
          f"{'(min)':>9s} {'(min)':>9s} {'(median)':>9s} {'(median)':>9s}", flush=True)
    for family in args.families.split(","):
        name, width, depth, _ = PUBLISHED[family]
        model = patcher(config(family, args.depth), dtype=torch.bfloat16)
        dm = model.model.diffusion_model
        read = backend_for(model).capture_blocks  # SD3: the middle of its full blocks, the pre-only last left out
        lists = [TimedBlocks(getattr(dm, attr)) for attr, _ in LISTS[family]]
        for (attr, _), timed in zip(LISTS[family], lists):
            setattr(dm, attr, timed)
        TimedBlocks.watch(dm, lists)
        gen = torch.Generator().manual_seed(1)
        _, pos, neg, latent = inputs(family, args.size, gen)

        def run(asyn, lat, model=model):
            if asyn:
                return AsynDMKSampler().sample(
                    model, 7, args.steps, 1.0, 0.0, "AsynDM", "dynamic", "bin", "", 1.0,
                    "clean (sigma 0, like ComfyUI)", pos, neg, lat, sampler_name="euler", scheduler="simple",
                    denoise=1.0, mask=None)
            return nodes.KSampler().sample(model, 7, args.steps, 1.0, "euler", "simple", pos, neg, lat)

        # per side: seconds per step of each round, and every unread block's seconds, per list
        steps = {"core": [], "asyn": []}
        blocks = {side: [[] for _ in LISTS[family]] for side in steps}
        with torch.inference_mode():
            for side in steps:  # warm-up at full size: the first run's page faults and allocator growth
                run(side == "asyn", latent)
            for _ in range(args.repeats):
                for side in steps:
                    for timed in lists:
                        timed.times = {}
                    t0 = time.perf_counter()
                    run(side == "asyn", latent)
                    steps[side].append((time.perf_counter() - t0) / args.steps)
                    for pool, got in zip(blocks[side], unread_blocks(lists, family, read)):
                        pool.extend(got)
                    if args.blocks:
                        print(f"    {side}: " + "; ".join(
                            f"{attr} " + " ".join(f"{median(t.times.get(i, [0])):.2f}" for i in range(len(t)))
                            for (attr, _), t in zip(LISTS[family], lists)), flush=True)
        calls = max(len(t) for t in lists[0].times.values()) / args.steps
        ratio_at_d = {}
        for stat in (min, statistics.median):
            unit = {side: unit_seconds(blocks[side], family, calls, stat) for side in steps}
            at_d = {side: stat(steps[side]) + (depth - args.depth) * unit[side] for side in steps}
            ratio_at_d[stat] = (unit["asyn"] / unit["core"], at_d["asyn"] / at_d["core"])
        fastest = {side: unit_seconds(blocks[side], family, calls, min) for side in steps}
        print(f"  {name:30s} {width:5d} {depth:3d} {min(steps['core']):8.1f} "
              f"{min(steps['asyn']) / min(steps['core']):9.3f} {fastest['core']:7.2f} {fastest['asyn']:7.2f} "
              + " ".join(f"{r:9.3f}" for r in (*ratio_at_d[min], *ratio_at_d[statistics.median])), flush=True)
        del model, dm, lists


if __name__ == "__main__":
    main()
