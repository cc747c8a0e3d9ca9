"""AsynDM nodes inside a real ComfyUI (tiny SD1.5 / SD2.1-v / SDXL stand-ins): DESIGN.md invariants 1–6.

Run: COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/integration -k asyndm
"""

import pytest
import torch

from asyndm_helpers import (
    custom_nodes,
    unwrap,
    PROMPT,
    control_stand_in,
    core_custom_euler_like_paper,
    core_ksampler,
    empty_latent,
    encode,
    lora_like,
    sampler_node,
    with_control,
)
from numeric import FAR_ABOVE_ROUNDOFF, ROUNDOFF_ONE_PASS, ROUNDOFF_SAMPLING, assert_close, assert_differs
from numeric import rel_err as _rel

FAMILIES = ["sd15", "sd21v", "sdxl"]
TARGETS = "rabbit:0.7, basketball:0.5"
# Per-pixel samplers with every pixel on the background against ComfyUI's own sampler of the
# same name, same sigmas and noise: the same formulas with maps in place of scalars and the
# model's output assembled per pixel; fp32 rounding only (measured ≤ 1e-6 relative).
TOL_SAME_SAMPLER = ROUNDOFF_SAMPLING
# The paper's schedule against core Euler on the same sigmas from the same start.
TOL_CORE_EULER = ROUNDOFF_SAMPLING  # measured ≤ 7.2e-7 relative (SD1.5, SD2.1-v, SDXL; 5 and 50 steps)
# Against the core KSampler (ddim, ddim_uniform) with last_step='clean': the same timesteps and
# end (sigma 0), but ComfyUI starts from noise·σ₀ where DDIM starts from pure noise
# (noise·sqrt(1+σ₀²) in sigma space), a start smaller by sqrt(1-ᾱ_t0) (1.4% at t0=801 for
# 5 steps, 0.26% at 981 for 50 steps). That is the only difference, so the tolerance is loose:
TOL_CORE_KSAMPLER_REL = 2e-2  # measured 1.2e-2 at 5 steps, 1.9e-3 at 50
SAMPLER_SCHEDULERS = [("ddim", "normal"), ("euler", "karras"), ("euler_ancestral", "normal"), ("heun", "karras"),
                      ("dpm_2", "karras"), ("dpmpp_2m", "karras"), ("dpmpp_2m_sde", "karras"),
                      ("dpmpp_sde", "exponential"), ("dpmpp_2s_ancestral", "normal"), ("lcm", "sgm_uniform")]


@pytest.fixture(autouse=True)
def _inference_mode():
    """As ComfyUI's executor runs nodes."""
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def setup(comfy_env, tiny_models):
    out = {}
    for fam in FAMILIES:
        model, clip, _ = tiny_models.tiny_checkpoint(fam)
        pos = encode(clip, PROMPT, TARGETS)
        neg = encode(clip, "")
        out[fam] = (model, clip, pos, neg)
    return out


# ---------------------------------------------------------------------------------------- inv. 1, 6
@pytest.mark.parametrize("fam", FAMILIES)
def test_asyndm_constant_map_is_stock_forward_and_embeddings_per_distinct_value(setup, fam):
    import comfy.model_management

    from asyndm_fpdm.samplers.backends.comfy_unet import ComfyUNetBackend, PixelCall

    model, clip, pos, neg = setup[fam]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    cond = pos[0][0].expand(2, -1, -1)
    kwargs = {"c_crossattn": cond}
    if fam == "sdxl":
        kwargs["y"] = torch.randn(2, model.model.diffusion_model.label_emb[0][0].in_features, generator=gen)
    ms = model.get_model_object("model_sampling")
    sig = ms.sigmas.float()
    sigma = sig[537].expand(2)
    comfy.model_management.load_models_gpu([model])
    base = {"transformer_options": {"cond_or_uncond": [0]}}
    with torch.no_grad():
        stock = model.model.apply_model(x, sigma, transformer_options={}, **kwargs)
    backend = ComfyUNetBackend(model)
    rows = []
    hook = model.model.diffusion_model.time_embed.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    try:
        with torch.no_grad():
            call = PixelCall(sig[537].expand(2, 1, 8, 8), capture=True, positions=[[2], [4]], context_len=77)
            to = backend.model_options(base, call)["transformer_options"]
            const = model.model.apply_model(x, sigma, transformer_options=to, **kwargs)
            maps = call.item_maps()
            rows.clear()
            sig_map = sig[537].expand(2, 1, 8, 8).clone()
            sig_map[:, :, :4] = sig[801]
            sig_map[1, :, :, :2] = sig[12]
            call2 = PixelCall(sig_map)
            to2 = backend.model_options(base, call2)["transformer_options"]
            mixed = model.model.apply_model(x, sig_map.flatten(1).amin(1), transformer_options=to2, **kwargs)
            distinct = list(rows)
            plain = model.model.apply_model(x, sigma, transformer_options={"wrappers": to["wrappers"]}, **kwargs)
    finally:
        hook.remove()
    assert_close(const, stock, ROUNDOFF_ONE_PASS, "constant map vs stock forward")  # invariant 1
    assert torch.equal(plain, stock)  # without a PixelCall the wrappers are the stock code
    assert maps is not None and maps.shape == (2, 2, 8 // backend.capture_stride, 8 // backend.capture_stride)
    assert torch.isfinite(maps).all() and float(maps.min()) >= 0
    # invariant 6: the time MLP ran on the 3 distinct timesteps (SDXL: the 5 distinct (image,
    # timestep) pairs, its size embedding being per image), plus ComfyUI's own per-image call
    # (2 rows, whose result the per-pixel ResBlocks replace); never on the 128 pixels
    assert distinct == [5 if fam == "sdxl" else 3, 2]
    # a pixel at 801 sees a different embedding from one at 537: the mixed map changes the output
    assert_differs(mixed, const, FAR_ABOVE_ROUNDOFF, "mixed map vs constant map")


def _naive_pixel_denoised(model, x, sig_map, cond, y=None):
    """Oracle for the per-pixel forward through ComfyUI's UNet, slow and written out (eps models):
    the input scaled per pixel by 1/sqrt(σ²+1); the UNet run with each ResBlock's embedding
    projection (``emb_layers``) replaced by a (B, C, h, w) map whose every pixel is computed alone,
    by a Python loop through the model's own time MLP at the ComfyUI timestep of the latent pixel at
    the top-left of that feature pixel's block (plus SDXL's label embedding of that image); the
    output combined per pixel, denoised = x − σ·eps."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    dm, ms = model.model.diffusion_model, model.get_model_object("model_sampling")
    height = x.shape[-2]
    sizes = {}

    def pixel_embedding(b, sigma):
        t = ms.timestep(sigma.view(1)).float()
        emb = dm.time_embed(timestep_embedding(t, dm.model_channels).to(x.dtype))[0]
        return emb + dm.label_emb(y[b:b + 1])[0] if y is not None else emb

    def replace(block):
        def hook(module, args, out):
            h, w = sizes[block]
            s = max(height // h, 1)
            per_pixel = out.new_zeros(out.shape[0], out.shape[1], h, w)
            for b in range(out.shape[0]):
                for i in range(h):
                    for j in range(w):
                        v = pixel_embedding(b, sig_map[b, 0, i * s, j * s])
                        for layer in module:  # emb_layers' own layers (calling it would re-enter this hook)
                            v = layer(v)
                        per_pixel[b, :, i, j] = v
            return per_pixel
        return hook

    handles = []
    for block in dm.modules():
        if isinstance(block, ResBlock):
            handles.append(block.register_forward_pre_hook(
                lambda m, args: sizes.__setitem__(m, tuple(args[0].shape[-2:]))))
            handles.append(block.emb_layers.register_forward_hook(replace(block)))
    try:
        eps = dm(x / (sig_map**2 + 1).sqrt(), torch.zeros(x.shape[0]), context=cond, y=y).float()
    finally:
        for h in handles:
            h.remove()
    return x - sig_map * eps


@pytest.mark.parametrize("fam", ["sd15", "sdxl"])
def test_asyndm_mixed_map_matches_a_naive_per_pixel_forward(setup, fam):
    """A sigma map that differs from pixel to pixel (4 values at random, so the coarser level's
    top-left sampling matters) through the backend's wrappers against the slow oracle above.

    Broken variants caught: feature pixels of the coarser level taking the block's centre pixel
    (``strided_index`` with ``index[:, stride // 2::stride, stride // 2::stride]``), and the input
    scaled by the image's sigma instead of the pixel's (``begin_forward`` returning a scale of 1)."""
    import comfy.model_management

    from asyndm_fpdm.samplers.backends.comfy_unet import ComfyUNetBackend, PixelCall

    model, clip, pos, neg = setup[fam]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    cond = pos[0][0].expand(2, -1, -1)
    kwargs = {"c_crossattn": cond}
    if fam == "sdxl":
        kwargs["y"] = torch.randn(2, model.model.diffusion_model.label_emb[0][0].in_features, generator=gen)
    sig = model.get_model_object("model_sampling").sigmas.float()
    sig_map = sig[torch.tensor([12, 300, 537, 801])][torch.randint(0, 4, (2, 1, 8, 8), generator=gen)]
    comfy.model_management.load_models_gpu([model])
    backend = ComfyUNetBackend(model)
    to = backend.model_options({"transformer_options": {"cond_or_uncond": [0]}}, PixelCall(sig_map))
    with torch.no_grad():
        fast = model.model.apply_model(x, sig_map.flatten(1).amin(1), transformer_options=to["transformer_options"],
                                       **kwargs)
        naive = _naive_pixel_denoised(model, x, sig_map, cond, kwargs.get("y"))
    assert_close(fast, naive, ROUNDOFF_ONE_PASS, "per-pixel forward through the nodes' wrappers vs naive oracle")


# ---------------------------------------------------------------------------------------- inv. 2
@pytest.mark.parametrize("fam", FAMILIES)
def test_asyndm_empty_mask_equals_vanilla_and_core_samplers(setup, fam):
    model, clip, pos, neg = setup[fam]
    lat = empty_latent(2 if fam == "sd15" else 1)
    empty = torch.zeros(1, 64, 64)
    asyn, info = sampler_node(model, pos, neg, lat, mask_source="mask input", mask=empty)
    vanilla, _ = sampler_node(model, pos, neg, lat, mode="vanilla")
    assert torch.equal(asyn, vanilla)  # an empty mask takes the vanilla path: same kernels, same batch
    assert all(float(m.sum()) == 0 for m in info.masks)

    core = core_custom_euler_like_paper(model, pos, neg, lat)
    assert_close(vanilla, core, TOL_CORE_EULER, "vanilla vs core Euler on the same sigmas")

    clean, _ = sampler_node(model, pos, neg, lat, mode="vanilla", last_step="clean (sigma 0, like ComfyUI)")
    ks = core_ksampler(model, pos, neg, lat)
    assert_close(clean, ks, TOL_CORE_KSAMPLER_REL, "vanilla 'clean' vs core KSampler ddim")


@pytest.mark.parametrize("fam", ["sd15", "sdxl"])
@pytest.mark.parametrize("sampler,scheduler", SAMPLER_SCHEDULERS)
def test_asyndm_every_sampler_with_empty_mask_equals_comfyui_sampler(setup, fam, sampler, scheduler):
    model, clip, pos, neg = setup[fam]
    lat = empty_latent(1)
    empty = torch.zeros(1, 64, 64)
    ours, info = sampler_node(model, pos, neg, lat, mask_source="mask input", mask=empty, sampler_name=sampler,
                              scheduler=scheduler, eta=1.0 if sampler != "ddim" else 0.0, steps=4)
    core = core_ksampler(model, pos, neg, lat, steps=4, sampler=sampler, scheduler=scheduler)
    assert_close(ours, core, TOL_SAME_SAMPLER, f"{fam} {sampler}/{scheduler}, empty mask vs ComfyUI's {sampler}")
    # with a fixed mask the same sampler lags the region and still ends clean
    mask = torch.zeros(1, 64, 64)
    mask[:, :32] = 1
    lagged, linfo = sampler_node(model, pos, neg, lat, mask_source="mask input", mask=mask, sampler_name=sampler,
                                 scheduler=scheduler, eta=1.0 if sampler != "ddim" else 0.0, steps=4)
    assert torch.isfinite(lagged).all() and float((lagged - ours).abs().max()) > 1e-4
    t = torch.stack(linfo.timestep_maps)[:, 0]
    assert (t[:, :4] >= t[:, 4:].amax(dim=(1, 2), keepdim=True)).all()


def test_asyndm_denoise_and_inpainting_with_empty_mask_equal_core(setup):
    model, clip, pos, neg = setup["sd15"]
    gen = torch.Generator().manual_seed(7)
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=gen)}
    empty = torch.zeros(1, 64, 64)
    ours, _ = sampler_node(model, pos, neg, lat, mask_source="mask input", mask=empty, sampler_name="euler",
                           scheduler="normal", denoise=0.5, steps=4)
    core = core_ksampler(model, pos, neg, lat, steps=4, sampler="euler", scheduler="normal", denoise=0.5)
    assert_close(ours, core, TOL_SAME_SAMPLER, "denoise 0.5, empty mask vs the core KSampler")
    # items lag from the partly noised start, and the run differs from the plain img2img
    lagged, info = sampler_node(model, pos, neg, lat, sampler_name="euler", scheduler="normal", denoise=0.5, steps=4)
    assert float((lagged - ours).abs().max()) > 1e-4
    first = info.timestep_maps[0][0]
    assert float(first.max()) == float(first.min())  # img2img: every pixel starts at the first sigma

    inpaint = dict(lat, noise_mask=torch.zeros(1, 1, 64, 64))
    inpaint["noise_mask"][..., 16:48, 16:48] = 1
    ours, _ = sampler_node(model, pos, neg, inpaint, mask_source="mask input", mask=empty, sampler_name="euler",
                           scheduler="normal", steps=4)
    core = core_ksampler(model, pos, neg, inpaint, steps=4, sampler="euler", scheduler="normal")
    assert_close(ours, core, TOL_SAME_SAMPLER, "inpainting, empty mask vs the core KSampler")
    dyn, _ = sampler_node(model, pos, neg, inpaint, sampler_name="euler", scheduler="normal", steps=4)
    assert torch.isfinite(dyn).all()
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:6, 2:6] = False
    assert _rel(dyn[0, :, outside], lat["samples"][0, :, outside]) <= 1e-5  # kept where the mask is 0
    assert float((dyn - ours).abs().max()) > 1e-4


def test_asyndm_sampler_node_in_samplercustom_and_every_guider(setup):
    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMSampler

    cs = custom_nodes()
    model, clip, pos, neg = setup["sd15"]
    lat = empty_latent(1)
    sigmas = unwrap(cs.BasicScheduler().get_sigmas(model, "karras", 4, 1.0))[0]
    sampler = AsynDMSampler().get_sampler("dpmpp_2m", 1.0, 1.0, "AsynDM", "dynamic", "bin", "", 1.0)[0]
    custom = unwrap(cs.SamplerCustom().sample(model, True, 3, 2.0, pos, neg, sampler, sigmas, lat))[0]["samples"]
    node, _ = sampler_node(model, pos, neg, lat, sampler_name="dpmpp_2m", scheduler="karras", steps=4)
    assert _rel(custom, node) <= 1e-6  # the SAMPLER in SamplerCustom is the KSampler node's run
    noise = unwrap(cs.RandomNoise().get_noise(3))[0]
    guiders = {
        "cfg": unwrap(cs.CFGGuider().get_guider(model, pos, neg, 2.0))[0],
        "dual": unwrap(cs.DualCFGGuider().get_guider(model, pos, encode(clip, "a rabbit"), neg, 2.0, 1.5,
                                                       "regular"))[0],
        "basic": unwrap(cs.BasicGuider().get_guider(model, pos))[0],
    }
    outs = {k: unwrap(cs.SamplerCustomAdvanced().sample(noise, g, sampler, sigmas, lat))[0]["samples"]
            for k, g in guiders.items()}
    assert _rel(outs["cfg"], custom) <= 1e-6
    for k, v in outs.items():
        assert torch.isfinite(v).all(), k
    assert float((outs["dual"] - outs["cfg"]).abs().max()) > 1e-4
    assert float((outs["basic"] - outs["cfg"]).abs().max()) > 1e-4


def test_asyndm_sampler_refuses_the_second_half_of_split_sigmas_and_names_the_step_range_node(setup):
    """SamplerCustomAdvanced over SplitSigmas (first half with RandomNoise, second with DisableNoise).
    Before: the second half ran a new AsynDM plan from the split sigma (6 karras steps split at 3:
    2.3% from the unsplit run), the lag lost; neither half sees the whole schedule and no plan
    rides on the node's LATENT, so AsynDM refuses it, naming the step-range node. Vanilla still
    equals the unsplit run (ComfyUI's own split), and the low half with added noise (img2img) runs.
    Caught: the check removed (the second half runs)."""
    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMSampler

    cs = custom_nodes()
    model, clip, pos, neg = setup["sd15"]
    lat = empty_latent(1)
    sigmas = unwrap(cs.BasicScheduler().get_sigmas(model, "karras", 6, 1.0))[0]
    hi, lo = unwrap(cs.SplitSigmas().get_sigmas(sigmas, 3))
    guider = unwrap(cs.CFGGuider().get_guider(model, pos, neg, 2.0))[0]
    noise, off = unwrap(cs.RandomNoise().get_noise(3))[0], unwrap(cs.DisableNoise().get_noise())[0]

    def run(sampler, n, sig, latent):
        return unwrap(cs.SamplerCustomAdvanced().sample(n, guider, sampler, sig, latent))[0]

    plain = AsynDMSampler().get_sampler("euler", 1.0, 1.0, "vanilla", "dynamic", "bin", "", 1.0)[0]
    whole = run(plain, noise, sigmas, lat)["samples"]
    assert _rel(run(plain, off, lo, run(plain, noise, hi, lat))["samples"], whole) <= 1e-6
    asyn = AsynDMSampler().get_sampler("euler", 1.0, 1.0, "AsynDM", "dynamic", "bin", "", 1.0)[0]
    first = run(asyn, noise, hi, lat)
    with pytest.raises(ValueError, match=r"second half of SplitSigmas.*Asynchronous KSampler \(Advanced, step range\)"):
        run(asyn, off, lo, first)
    assert torch.isfinite(run(asyn, noise, lo, first)["samples"]).all()  # noise added: img2img from the split


def test_asyndm_bad_input_names_the_fix(setup):
    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMSampler

    cs = custom_nodes()
    model, clip, pos, neg = setup["sd15"]
    with pytest.raises(ValueError, match="unknown sampler 'uni_pcc': use one of"):
        AsynDMSampler().get_sampler("uni_pcc", 1.0, 1.0, "AsynDM", "dynamic", "bin", "", 1.0)
    sampler = AsynDMSampler().get_sampler("euler", 1.0, 1.0, "AsynDM", "dynamic", "bin", "", 1.0)[0]
    short = torch.tensor([1.0])
    with pytest.raises(ValueError, match="at least 2"):
        unwrap(cs.SamplerCustom().sample(model, True, 3, 2.0, pos, neg, sampler, short, empty_latent(1)))
    with pytest.raises(ValueError, match="frames"):
        sampler_node(model, pos, neg, empty_latent(2), mask_source="mask input", mask=torch.ones(3, 64, 64))


# ---------------------------------------------------------------------------------------- inv. 3
def test_asyndm_fixed_mask_orders_timesteps_and_every_pixel_runs_the_schedule(setup):
    model, clip, pos, neg = setup["sd15"]
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 8:40] = 1.0
    steps = 10
    _, info = sampler_node(model, pos, neg, empty_latent(1), mask_source="mask input", mask=mask, steps=steps)
    maps = torch.stack(info.timestep_maps)  # (steps, B, 8, 8) evaluated timesteps
    region = torch.nn.functional.interpolate(mask[None], size=(8, 8), mode="nearest")[0] > 0.5
    assert len(info.timestep_maps) == steps
    assert (maps[1:] <= maps[:-1]).all()  # never increases
    assert int(maps[0, 0][~region[0]].max()) == 901  # background: DDIM's leading timesteps 901, 801, ...
    assert int(maps[-1].max()) <= 200 and int(maps[-1].min()) >= 1
    for t in maps:
        assert int(t[0][region[0]].min()) >= int(t[0][~region[0]].max())  # region lags
    assert int(maps[3, 0][region[0]].min()) > int(maps[3, 0][~region[0]].max())


def test_asyndm_dynamic_and_static_modes_run_and_differ(setup):
    model, clip, pos, neg = setup["sd15"]
    lat = empty_latent(1)
    dyn, dinfo = sampler_node(model, pos, neg, lat)
    van, _ = sampler_node(model, pos, neg, lat, mode="vanilla")
    sta, sinfo = sampler_node(model, pos, neg, lat, mask_source="static")
    conc, _ = sampler_node(model, pos, neg, lat, mode="DMconcave")
    for a in (dyn, sta, conc):
        assert torch.isfinite(a).all()
        assert_differs(a, van, FAR_ABOVE_ROUNDOFF, "AsynDM / static / DMconcave vs vanilla")
    assert dinfo.item_maps[0] is not None and len(dinfo.masks) == 5
    assert all(m is not None and m.shape[1] == 2 for m in dinfo.masks)
    first = [m for m in sinfo.masks]
    assert all(torch.equal(first[0], m) for m in first)  # static: fixed for the whole run


# ---------------------------------------------------------------------------------------- inv. 4
def test_asyndm_leaves_the_input_model_untouched(setup):
    model, clip, pos, neg = setup["sd15"]
    lat = empty_latent(1)
    options_before = repr(model.model_options)
    before = core_ksampler(model, pos, neg, lat, sampler="euler", scheduler="normal")
    sampler_node(model, pos, neg, lat)
    sampler_node(model, pos, neg, lat, mask_source="static")
    after = core_ksampler(model, pos, neg, lat, sampler="euler", scheduler="normal")
    assert torch.equal(before, after)
    assert repr(model.model_options) == options_before
    assert not any("asyndm" in str(k) for k in model.object_patches)
    assert all(not w for w in model.wrappers.values())


# ---------------------------------------------------------------------------------------- inv. 5
def test_asyndm_same_seed_same_image_and_batch_independent(setup):
    model, clip, pos, neg = setup["sd15"]
    one, _ = sampler_node(model, pos, neg, empty_latent(1), eta=0.5)
    again, _ = sampler_node(model, pos, neg, empty_latent(1), eta=0.5)
    three, _ = sampler_node(model, pos, neg, empty_latent(3), eta=0.5)
    assert torch.equal(one, again)
    assert_close(three[:1], one, ROUNDOFF_SAMPLING, "image 0 of 3 vs alone")  # batched kernels round differently
    assert_differs(three[1], three[0], FAR_ABOVE_ROUNDOFF, "image 1 vs image 0 of a batch")


# ---------------------------------------------------------------------------------------- citizenship
def test_asyndm_lora_weight_patches_are_honoured(setup):
    model, clip, pos, neg = setup["sd15"]
    lat = empty_latent(1)
    lora, keys = lora_like(model)
    assert any("emb_layers" in k for k in keys) and any("attn2" in k for k in keys)
    plain, _ = sampler_node(model, pos, neg, lat, mode="vanilla")
    ours, _ = sampler_node(lora, pos, neg, lat, mode="vanilla")
    core = core_custom_euler_like_paper(lora, pos, neg, lat)
    assert_differs(ours, plain, FAR_ABOVE_ROUNDOFF, "with the LoRA vs without")
    assert_close(ours, core, TOL_CORE_EULER, "vanilla with the LoRA vs core Euler")
    dyn, _ = sampler_node(lora, pos, neg, lat)
    assert torch.isfinite(dyn).all()


def test_asyndm_controlnet_style_control_is_honoured(setup):
    model, clip, pos, neg = setup["sd15"]
    lat = empty_latent(1)
    control = control_stand_in()
    cpos = with_control(pos, control)
    plain, _ = sampler_node(model, pos, neg, lat, mode="vanilla")
    ours, _ = sampler_node(model, cpos, neg, lat, mode="vanilla")
    core = core_custom_euler_like_paper(model, cpos, neg, lat)
    assert_differs(ours, plain, FAR_ABOVE_ROUNDOFF, "with the control vs without")
    assert_close(ours, core, TOL_CORE_EULER, "vanilla with the control vs core Euler")
    control.seen.clear()
    dyn, info = sampler_node(model, cpos, neg, lat)
    assert torch.isfinite(dyn).all() and control.seen
    control.seen.clear()
    half = torch.zeros(1, 64, 64)
    half[:, :32] = 1
    sampler_node(model, cpos, neg, lat, mask_source="mask input", mask=half)
    # ControlNet sees one sigma per image, the least noisy pixel's: with a background, the
    # schedule's own sigma at every step
    from asyndm_fpdm.samplers.comfyui.sampler import node_sigmas

    sigmas = node_sigmas(model, "asyndm_paper", 5)
    seen = torch.stack([s.float().cpu()[0] for s in control.seen])
    assert len(seen) == 5 and float(((seen - sigmas[:-1]).abs() / sigmas[:-1]).max()) <= 1e-6, (seen, sigmas)


def test_asyndm_missing_targets_named(setup):
    model, clip, pos, neg = setup["sd15"]
    plain_pos = encode(clip, PROMPT)
    with pytest.raises(ValueError, match="AsynDM Text Encode"):
        sampler_node(model, plain_pos, neg, empty_latent(1))
    # a painted mask needs no targets
    out, _ = sampler_node(model, plain_pos, neg, empty_latent(1), mask_source="mask input",
                          mask=torch.ones(64, 64), strengths="0.6")
    assert torch.isfinite(out).all()


def test_asyndm_extractor_and_previews(setup):
    from asyndm_fpdm.nodes.asyndm_preview_nodes import AsynDMCurvePreview, AsynDMMaskStepsPreview
    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMMaskExtractor
    from asyndm_fpdm.samplers.comfyui.previews import PALETTE
    from png_content import assert_curves_drawn, assert_mask_steps_preview_shows, mean_timesteps

    model, clip, pos, neg = setup["sdxl"]
    lat = empty_latent(2)
    items, prio, soft, vlat, run = AsynDMMaskExtractor().extract(model, 3, 5, 2.0, "", 1.0, pos, neg, lat)
    assert items.shape == (4, 64, 64) and prio.shape == (2, 64, 64) and soft.shape == (4, 64, 64)
    assert set(torch.unique(items).tolist()) <= {0.0, 1.0}
    assert all(min(abs(v - k) for k in (0.0, 0.5, 0.7)) < 1e-6 for v in torch.unique(prio).tolist())
    vanilla, _ = sampler_node(model, pos, neg, lat, mode="vanilla")
    assert torch.equal(vlat["samples"], vanilla)  # capture only records attention: same run, same bits
    # extractor → sampler (mask input) is the paper's static mode
    via_mask, _ = sampler_node(model, pos, neg, lat, mask_source="mask input", mask=items)
    static, _ = sampler_node(model, pos, neg, lat, mask_source="static")
    assert torch.equal(via_mask, static)  # the same masks (nearest up, then down again), the same run

    # the previews show the sampler's run (content, read back independently: png_content)
    _, info = sampler_node(model, pos, neg, lat)
    (curves,) = AsynDMCurvePreview().plot(5, "bin", "0.7", run=info)
    (theory,) = AsynDMCurvePreview().plot(20, "exp", "0.3, 0.9")
    regions, times = AsynDMMaskStepsPreview().preview(info, "0, 2, -1", 1)
    assert curves.shape[0] == 1 and curves.shape[-1] == 3 and theory.shape == curves.shape
    assert regions.shape == (3, 64, 64, 3) and times.shape == (3, 64, 64, 3)
    last = len(info.timestep_maps) - 1
    assert_mask_steps_preview_shows(regions, times, info, [0, 2, last], 1, PALETTE)
    assert any(float(m[1].std()) > 0 for m in info.masks[1:]), "the run's masks are flat: nothing to see"
    assert_curves_drawn(curves[0], mean_timesteps(info), PALETTE)


def test_asyndm_cancel_stops_between_steps(setup):
    import comfy.model_management as mm

    model, clip, pos, neg = setup["sd15"]
    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMKSampler

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            AsynDMKSampler().sample(model, 3, 5, 2.0, 0.0, "AsynDM", "dynamic", "bin", "", 1.0,
                                    "timestep 0 (paper)", pos, neg, empty_latent(1))
    finally:
        mm.interrupt_current_processing(False)


def test_asyndm_area_conditioning_follows_the_crop(setup):
    import nodes

    model, clip, pos, neg = setup["sd15"]
    # the targets' prompt only on the left half (latent x 0..3), a plain prompt on the whole image
    area = nodes.ConditioningSetArea().append(pos, 32, 64, 0, 0, 1.0)[0]
    both = area + encode(clip, "a field")
    out, info = sampler_node(model, both, neg, empty_latent(1), steps=4)
    plain, _ = sampler_node(model, encode(clip, "a field"), neg, empty_latent(1), steps=4, mask_source="mask input",
                            mask=torch.zeros(1, 64, 64))
    assert torch.isfinite(out).all() and float((out - plain).abs().max()) > 1e-4
    maps = [m for m in info.item_maps if m is not None]
    assert maps and all(float(m[..., :, 2:].abs().max()) == 0 for m in maps)  # no attention outside the crop
    assert all(float(m[..., :, :1].sum()) > 0 for m in maps)


@pytest.mark.parametrize("fam", ["sd15", "sdxl"])
def test_asyndm_odd_latent_sizes(setup, fam):
    """Strided timestep maps and attention grids follow the UNet's ceil-sized feature maps."""
    model, clip, pos, neg = setup[fam]
    lat = {"samples": torch.zeros(1, 4, 9, 7)}
    out, info = sampler_node(model, pos, neg, lat, steps=3)
    assert out.shape == (1, 4, 9, 7) and torch.isfinite(out).all()
    assert info.masks[-1].shape[-2:] == (9, 7)
