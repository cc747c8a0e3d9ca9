"""The plan's time axis in a real ComfyUI (issue 14; DESIGN.md, "AsynDM in sigma space").

1. Property: for every ComfyUI model sampling (the classes, and the ModelSampling* override nodes
   at several shifts) the axis' σ → u → σ round-trips within float32 round-off, on the model's
   own sigmas and between them, and the axis is the model's own sigma table (its sigma(t) with the
   shift applied; its table).
2. Invariant: the timestep every pixel (UNet) or token (Flux, SD3, SD3.5) really receives — read
   from the model's first time-modulated layer by forward hooks, decoded against the model's own
   embeddings of candidate timesteps, never from the plan's bookkeeping — is the model's
   timestep(σ) of the plan's σ for it, at every model call, for AsynDM dynamic, mask input and
   DMconcave; and the run's ``timestep_maps`` (what the preview nodes draw) report exactly that.
   Caught on the old code (positions taken as ``timestep(σ)`` and turned back into sigmas with the
   model's ``sigma(t)``, which applies the shift again): on Flux dev the lagging tokens received
   0.769 where the run reported 0.513, on SD3 750 where it reported 500 (schnell and UNets pass).
"""

import pytest
import torch

from asyndm_helpers import PROMPT, empty_latent, encode, sampler_node

EPS32 = torch.finfo(torch.float32).eps
DIT_TARGETS = {"words": ["rabbit", "ball"], "ks": [0.7, 0.5], "positions": [[2], [5]], "context_len": 12}
UNET_TARGETS = "rabbit:0.7, basketball:0.5"


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


# ----------------------------------------------------------------------------------- 1. property
def _samplings(tiny_models):
    """(name, model_sampling) for every ComfyUI model sampling: the classes and the override nodes."""
    import types

    import comfy.model_sampling as cms
    import comfy_extras.nodes_model_advanced as adv

    def config(**settings):
        return types.SimpleNamespace(sampling_settings=settings)

    class Flow(cms.ModelSamplingDiscreteFlow, cms.CONST):
        pass

    class Flux(cms.ModelSamplingFlux, cms.CONST):
        pass

    out = [("discrete sd", cms.ModelSamplingDiscrete()),
           ("discrete zsnr", cms.ModelSamplingDiscrete(zsnr=True)),
           ("discrete cosine", cms.ModelSamplingDiscrete(config(beta_schedule="cosine"))),
           ("discrete sqrt_linear", cms.ModelSamplingDiscrete(config(beta_schedule="sqrt_linear"))),
           ("discrete edm", cms.ModelSamplingDiscreteEDM()),
           ("continuous edm", cms.ModelSamplingContinuousEDM()),
           ("continuous v", cms.ModelSamplingContinuousV(config(sigma_max=500.0, sigma_min=0.03))),
           ("cascade", cms.StableCascadeSampling(config(shift=2.0))),
           ("cosmos", cms.ModelSamplingCosmosRFlow(config(sigma_max=80.0, sigma_min=0.002)))]
    for shift in (1.0, 1.73, 3.0, 6.0):
        out.append((f"flow shift {shift}", Flow(config(shift=shift))))
        out.append((f"flow shift {shift} multiplier 1", Flow(config(shift=shift, multiplier=1.0))))
    for shift in (0.5, 1.0, 1.15, 2.0):
        out.append((f"flux shift {shift}", Flux(config(shift=shift))))
    model = tiny_models.tiny_model("sd15")
    ms = lambda m: m.get_model_object("model_sampling")  # noqa: E731
    for sampling in ("eps", "v_prediction", "lcm", "x0", "img_to_img"):
        for zsnr in (False, True):
            out.append((f"node discrete {sampling} zsnr={zsnr}", ms(adv.ModelSamplingDiscrete().patch(model, sampling, zsnr)[0])))
    for shift in (0.5, 3.0, 6.0):
        out.append((f"node SD3 {shift}", ms(adv.ModelSamplingSD3().patch(model, shift)[0])))
        out.append((f"node AuraFlow {shift}", ms(adv.ModelSamplingAuraFlow().patch_aura(model, shift)[0])))
        out.append((f"node Cascade {shift}", ms(adv.ModelSamplingStableCascade().patch(model, shift)[0])))
    for max_shift, size in ((1.15, 1024), (2.0, 1024), (1.15, 512)):
        out.append((f"node Flux {max_shift} {size}", ms(adv.ModelSamplingFlux().patch(model, max_shift, 0.5, size, size)[0])))
    for sampling in ("v_prediction", "edm", "edm_playground_v2.5", "eps", "cosmos_rflow"):
        out.append((f"node EDM {sampling}", ms(adv.ModelSamplingContinuousEDM().patch(model, sampling, 120.0, 0.002)[0])))
    out.append(("node continuous V", ms(adv.ModelSamplingContinuousV().patch(model, "v_prediction", 500.0, 0.03)[0])))
    return out


def test_every_comfyui_model_sampling_round_trips(comfy_env, tiny_models):
    """σ → u → σ within float32 round-off on the model's sigmas, between them and (flow) at 0 and 1.
    Caught: u taken as the model's timestep(σ) and σ(u) as its sigma(t) (the old maps) on every
    shifted flow sampling."""
    import comfy.model_sampling as cms

    from asyndm_fpdm.samplers.comfyui.sampler import time_axis
    from asyndm_fpdm.samplers.time_axis import FlowAxis, FluxAxis, TableAxis

    seen = set()
    for name, ms in _samplings(tiny_models):
        axis = time_axis(ms)
        seen.add(type(axis))
        table = torch.unique_consecutive(ms.sigmas.float())  # Cascade clamps its ends: plateaus count once
        between = (table[1:] * table[:-1]).sqrt()  # geometric midpoints
        sig = torch.cat([table, between])
        if isinstance(axis, (FlowAxis, FluxAxis)):
            sig = torch.cat([sig, torch.tensor([0.0, 1.0])])
        u = axis.position(sig)
        assert bool((u >= 0).all() and (u <= axis.u_max).all()), name
        back = axis.sigma(u).float()
        err = ((back - sig).abs() / sig.abs().clamp(min=1e-30)).max()
        assert float(err) <= 2 ** 5 * EPS32, (name, float(err))
        assert bool((u[1:len(table)] > u[:len(table) - 1]).all()), f"{name}: positions ascend with sigma"
        # the axis is the model's own sigma(t), not only some pair of inverses
        if isinstance(axis, TableAxis):
            k = torch.arange(len(table)).float()
            assert torch.equal(axis.position(table), k), name  # the table's σ(k) is exactly position k
            if type(ms).sigma is cms.ModelSamplingDiscrete.sigma:  # SD family: the model's own sigma(t) and
                assert torch.equal(axis.sigma(k), ms.sigma(k).float()), name  # timestep(σ), bit for bit
                assert torch.equal(axis.position(table).long(), ms.timestep(table).long()), name
        else:
            mult = getattr(ms, "multiplier", 1.0)
            grid = torch.arange(0, 1001).float()
            own = ms.sigma(grid / 1000 * mult).float()  # the model's sigma(t): the shift applied
            assert float(((axis.sigma(grid) - own).abs() / own.clamp(min=1e-30)).max()) <= 2 ** 4 * EPS32, name
            if ms.shift != 1.0:  # the trap: the model's timestep is not the position on shifted flows
                mid = torch.tensor([0.5])
                assert abs(float(ms.timestep(ms.sigma(mid * mult))) / mult - 0.5) > 1e-2, name
    assert seen == {TableAxis, FlowAxis, FluxAxis}


def test_positions_do_not_depend_on_the_shift(comfy_env, tiny_models):
    """A flow model's shift reparameterises σ only: on the same grid positions (ComfyUI's 'simple'
    scheduler picks the same table indices for any shift), every pixel of a DMconcave / fixed-mask
    plan is at the same position whatever the shift. Caught: the double shift of the old maps."""
    import comfy.samplers
    import comfy_extras.nodes_model_advanced as adv

    from asyndm_fpdm.samplers.comfyui.sampler import ComfyModelSampling
    from asyndm_fpdm.samplers.plan import SigmaPlan

    model = tiny_models.tiny_dit("sd3")
    masks = torch.zeros(1, 1, 8, 8)
    masks[..., 2:6, 2:6] = 1
    for steps in (4, 9):
        runs = []
        for shift in (1.0, 3.0, 6.0):
            ms = adv.ModelSamplingSD3().patch(model, shift)[0].get_model_object("model_sampling")
            sigmas = comfy.samplers.calculate_sigmas(ms, "simple", steps).float()
            model_sampling = ComfyModelSampling(ms)
            per_mode = []
            for mode, m in (("concave", None), ("asyn", masks)):
                plan = SigmaPlan(sigmas, model_sampling, 1, (8, 8), mode=mode, ks=[0.7], masks=m, cell=2)
                maps = [plan.step(i)[0] for i in range(steps)] + [plan.step(steps - 1)[1]]
                per_mode.append(torch.stack([model_sampling.axis.position(s) for s in maps]))
            runs.append(per_mode)
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert float((a - b).abs().max()) <= 1e-3, float((a - b).abs().max())
        assert float((runs[0][0][1:-1] - runs[0][1][1:-1]).abs().max()) > 1.0  # concave lags more than bg


# ---------------------------------------------------------------------------------- 2. invariant
def _patched(model, node):
    import comfy_extras.nodes_model_advanced as adv

    if node is None:
        return model
    kind, *args = node
    if kind == "SD3":
        return adv.ModelSamplingSD3().patch(model, *args)[0]
    if kind == "AuraFlow":
        return adv.ModelSamplingAuraFlow().patch_aura(model, *args)[0]
    if kind == "Flux":
        return adv.ModelSamplingFlux().patch(model, *args)[0]
    if kind == "Discrete":
        return adv.ModelSamplingDiscrete().patch(model, *args)[0]
    raise ValueError(kind)


BACKENDS = {  # family, model-sampling node, sampler scheduler
    "sd15": ("sd15", None, "karras"),
    "sd15 v zsnr node": ("sd15", ("Discrete", "v_prediction", True), "asyndm_paper"),
    "flux dev": ("flux", None, "simple"),
    "flux schnell": ("flux_schnell", None, "simple"),
    "flux dev + ModelSamplingFlux 2.0": ("flux", ("Flux", 2.0, 0.5, 1024, 1024), "simple"),
    "sd3": ("sd3", None, "simple"),
    "sd3.5": ("sd35", None, "simple"),
    "sd3 + ModelSamplingSD3 6.0": ("sd3", ("SD3", 6.0), "simple"),
    "sd3 + ModelSamplingAuraFlow 1.73": ("sd3", ("AuraFlow", 1.73), "simple"),
}
BACKENDS["lumina2 + ModelSamplingAuraFlow 6.0"] = ("lumina2", ("AuraFlow", 6.0), "simple")  # NextDiT embeds 1 − t


class _Probe:
    """Forward hooks on the first time-modulated layer of the model, and an APPLY_MODEL wrapper
    that notes each call's plan (the PixelCall's σ map) and the per-image sigma it was passed."""

    def __init__(self, family, dm):
        self.family, self.dm, self.calls, self.handles = family, dm, [], []
        if family.startswith("sd1"):
            rb = dm.input_blocks[1][0]  # the first ResBlock, at latent resolution: h + emb_out
            self._on(rb.in_layers, "h")
            self._pre(rb.out_layers, "h_emb")
        elif family == "hidream":  # attn1.to_q(norm1_i(img)·(1 + scale_msa_i) + shift_msa_i)
            blk = dm.double_stream_blocks[0].block
            self._on(blk.norm1_i, "n")
            self._pre(blk.attn1.to_q, "m")
            self._on(dm.p_embedder, "y")
        elif family == "hunyuan_image":  # as Flux, without a pooled vector
            blk = dm.double_blocks[0]
            self._on(blk.img_norm1, "n")
            self._pre(blk.img_attn.qkv, "m")
            self._on(dm.guidance_in, "guidance")
        elif family.startswith("flux"):
            blk = dm.double_blocks[0]  # img_attn.qkv(norm1(img)·(1 + scale) + shift)
            self._on(blk.img_norm1, "n")
            self._pre(blk.img_attn.qkv, "m")
            self._on(dm.vector_in, "vector")
            if dm.params.guidance_embed:
                self._on(dm.guidance_in, "guidance")
        elif family == "lumina2":  # image-only refiner: attention.qkv(attention_norm1(x)·(1 + scale_msa))
            blk = dm.noise_refiner[0]
            self._on(blk.attention_norm1, "n")
            self._pre(blk.attention.qkv, "m")
        else:
            xb = dm.joint_blocks[0].x_block  # attn.qkv(norm1(x)·(1 + scale_msa) + shift_msa)
            self._on(xb.norm1, "n")
            self._pre(xb.attn.qkv, "m")
            self._on(dm.y_embedder, "y")

    def _on(self, module, key):
        self.handles.append(module.register_forward_hook(lambda m, a, o: self._put(key, o)))

    def _pre(self, module, key):
        self.handles.append(module.register_forward_pre_hook(lambda m, a: self._put(key, a[0])))

    def _put(self, key, value):
        if self.calls:
            self.calls[-1].setdefault(key, value.detach().float().clone())

    def wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                **kwargs):
        from asyndm_fpdm.samplers.backends.comfy_unet import KEY

        call = transformer_options.get(KEY)
        self.calls.append({"t": t.detach().clone(), "sigma_map": None if call is None else call.sigma_map.clone(),
                           "rows": x.shape[0]})
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def remove(self):
        for h in self.handles:
            h.remove()


def _decode_unet(dm, rec):
    """Per pixel: which integer timestep's ResBlock embedding the pixel received (the model's own
    time_embed and emb_layers on all 1000 candidates), and how far the best match is."""
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    rb = dm.input_blocks[1][0]
    cand_t = torch.arange(1000).float()
    cand = rb.emb_layers(dm.time_embed(timestep_embedding(cand_t, dm.model_channels, repeat_only=False)))
    got = rec["h_emb"] - rec["h"]  # (Bm, C, H, W)
    bm, c, h, w = got.shape
    flat = got.permute(0, 2, 3, 1).reshape(-1, c)
    dist = (flat[:, None] - cand[None]).abs().amax(dim=-1)
    best = dist.min(dim=1)
    scale = max(float(rec["h_emb"].abs().max()), float(rec["h"].abs().max()))

    return cand_t[best.indices].view(bm, h, w), float(best.values.max() / scale)


def _decode_dit(family, dm, ms, rec, extra_sigmas):
    """Per token: which candidate model timestep's modulation the first block applied to it. The
    candidates are the model timesteps of the model's own sigma table and of the run's SIGMAS;
    the modulation rows are the model's own modules evaluated on them."""
    sig = torch.cat([ms.sigmas.float(), extra_sigmas[extra_sigmas > 0].float()])
    cand_t = ms.timestep(sig).float()
    n, m = rec["n"], rec["m"]  # (Bm, L, C)
    out, worst = [], 0.0
    for r in range(n.shape[0]):
        if family == "hidream":  # adaLN input t_embedder(t) + p_embedder(pooled); image parts first of 12
            mods = dm.double_stream_blocks[0].block.adaLN_modulation(dm.t_embedder(cand_t, torch.float32) + rec["y"][r])
            parts = 12
        elif family == "hunyuan_image":  # time_in embeds the timestep with time_factor 1
            from comfy.ldm.flux.layers import timestep_embedding

            vec = dm.time_in(timestep_embedding(cand_t, 256, time_factor=1.0)) + rec["guidance"][r]
            mods, parts = dm.double_blocks[0].img_mod.lin(torch.nn.functional.silu(vec)), 6
        elif family.startswith("flux"):
            from comfy.ldm.flux.layers import timestep_embedding

            vec = dm.time_in(timestep_embedding(cand_t, 256)) + rec["vector"][r]
            if "guidance" in rec:
                vec = vec + rec["guidance"][r]
            mods = dm.double_blocks[0].img_mod.lin(torch.nn.functional.silu(vec))
            parts = 6
        elif family == "lumina2":  # [scale_msa, gate_msa, ...] (no shift); the embedder takes 1 − timestep
            mod = dm.noise_refiner[0].adaLN_modulation(dm.t_embedder(1.0 - cand_t, dtype=torch.float32))
            scale_msa = mod.chunk(4, dim=-1)[0]
            mods, parts = torch.cat([torch.zeros_like(scale_msa), scale_msa], dim=-1), 2  # (shift 0, scale)
        else:
            c = dm.t_embedder(cand_t, dtype=torch.float32) + rec["y"][r]
            xb = dm.joint_blocks[0].x_block
            mods = xb.adaLN_modulation(c)
            parts = 9 if xb.x_block_self_attn else 6
        shift, scale = mods.chunk(parts, dim=-1)[:2]
        expect = n[r][:, None] * (1 + scale[None]) + shift[None]  # (L, K, C)
        err = (expect - m[r][:, None]).abs().amax(dim=-1) / m[r].abs().amax()
        best = err.min(dim=1)
        out.append(cand_t[best.indices])
        worst = max(worst, float(best.values.max()))
    return torch.stack(out), worst  # (Bm, L)


BACKENDS.update({"hidream": ("hidream", None, "simple"),  # HiDream-I1 as loaded (shift 1); dev runs at 6.0
                 "hidream + ModelSamplingSD3 6.0": ("hidream", ("SD3", 6.0), "simple")})
BACKENDS["hunyuan_image"] = ("hunyuan_image", None, "simple")  # HunyuanImage 2.1 as loaded (shift 5)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_token_receives_the_plans_sigma_and_the_run_reports_it(comfy_env, tiny_models, name):
    import comfy.model_management
    import comfy.patcher_extension as pe

    family, node, scheduler = BACKENDS[name]
    dit = not family.startswith("sd1")
    base = tiny_models.tiny_dit(family) if dit else tiny_models.tiny_model(family)
    model = _patched(base, node).clone()
    if dit:
        pos = tiny_models.dit_conditioning(family)
        pos[0][1]["asyndm_targets"] = dict(DIT_TARGETS)
        neg = tiny_models.dit_conditioning(family, length=7, seed=99)
        lat, cfg = empty_latent(1, 8, 64 if family == "hunyuan_image" else 16), (1.0 if family == "flux" else 2.0)
    else:
        clip = tiny_models.tiny_clip(family)
        pos, neg = encode(clip, PROMPT, UNET_TARGETS), encode(clip, "")
        lat, cfg = empty_latent(1, 8), 2.0
    ms = model.get_model_object("model_sampling")
    dm = model.model.diffusion_model
    comfy.model_management.load_models_gpu([model])
    probe = _Probe(family, dm)
    model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_time_axis_probe", probe.wrapper)
    mask = torch.zeros(1, 64, 64)
    mask[:, 10:45, 5:37] = 1  # not aligned to the 2×2 token grid
    modes = {"dynamic": dict(mode="AsynDM", mask_source="dynamic"),
             "mask input": dict(mode="AsynDM", mask_source="mask input", mask=mask),
             "DMconcave": dict(mode="DMconcave")}
    steps = 4
    try:
        for mode, kw in modes.items():
            probe.calls.clear()
            _, info = sampler_node(model, pos, neg, lat, sampler_name="euler", scheduler=scheduler, steps=steps,
                                   cfg=cfg, **kw)
            assert len(info.timestep_maps) == steps
            calls = [c for c in probe.calls if c["sigma_map"] is not None]
            assert len(calls) >= steps, (mode, len(calls))
            from asyndm_fpdm.samplers.comfyui.sampler import node_sigmas

            run_sigmas = node_sigmas(model, scheduler, steps, 1.0, "euler")
            lagged = False
            per_step = len(calls) // steps  # euler: one evaluation per step (cond and uncond maybe apart)
            assert len(calls) == per_step * steps, (mode, len(calls))
            for index, rec in enumerate(calls):
                sig_map = rec["sigma_map"][:, 0]  # (B, H, W): the plan's σ for every pixel
                step = index // per_step
                if dit:
                    t_tok, worst = _decode_dit(family, dm, ms, rec, run_sigmas)
                    b, h, w = sig_map.shape
                    cells = sig_map.view(b, h // 2, 2, w // 2, 2)
                    assert torch.equal(cells, cells[:, :, :1, :, :1].expand_as(cells)), "one sigma per token"
                    received = t_tok.view(-1, h // 2, w // 2).repeat_interleave(2, 1).repeat_interleave(2, 2)
                else:
                    received, worst = _decode_unet(dm, rec)
                assert worst <= 1e-4, (mode, step, worst)  # the token really sits on a candidate
                expect = ms.timestep(sig_map.flatten()).float().view_as(sig_map)  # the plan's σ, as the model takes it
                expect = expect.repeat(rec["rows"] // sig_map.shape[0], 1, 1)
                tol = 1e-5 * float(ms.timestep(torch.tensor([float(ms.sigma_max)])))
                assert float((received - expect).abs().max()) <= tol, (mode, step, received.unique(), expect.unique())
                reported = info.timestep_maps[step].float().repeat(rec["rows"] // sig_map.shape[0], 1, 1)
                assert float((reported - received).abs().max()) <= tol, (mode, step, reported.unique(), received.unique())
                background = float(ms.timestep(run_sigmas[step:step + 1].float()))
                lagged = lagged or float(received.max()) > background + tol
            assert lagged, f"{mode}: some pixels lag (the check would be empty otherwise)"
    finally:
        probe.remove()

