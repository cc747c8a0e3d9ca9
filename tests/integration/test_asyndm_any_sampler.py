"""Every sampler ComfyUI lists, asynchronously (samplers/clock.py, DESIGN.md "Any sampler by a change
of clock"), in a real ComfyUI with the tiny SD1.5 stand-in.

- vanilla mode equals the core KSampler of the same sampler, scheduler and seed at its default
  options (relative 1e-4): every pixel on the background gets σ = s, r = 1 and D̃ = D exactly, and
  the noise is ComfyUI's own;
- AsynDM with a dynamic mask runs and is finite;
- with a fixed mask, at every model call (read at the UNet's input through a function wrapper on
  a clone: the per-pixel sigma map the call carries), no object pixel is below the background's
  sigma, the background is the sigma the sampler passes, and the objects do lag somewhere.

Mutations caught (tried once): D̃ = D + (r − 1 + 1e-3)(D − x) (background pixels no longer
exactly D: vanilla off by 4.6e-4 for every wrapped sampler); the lag's sign flipped (objects below
the background). Whether the lagging pixels are *right* is the Gaussian oracle's job
(test_asyndm_clock_oracle.py).
"""

import pytest
import torch

from asyndm_helpers import PROMPT, core_ksampler, empty_latent, encode, sampler_node
from numeric import rel_err

TARGETS = "rabbit:0.7, basketball:0.5"
TOL = 1e-4
STEPS = 3


def _names():
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def sd15(comfy_env, tiny_models):
    model, clip, _ = tiny_models.tiny_checkpoint("sd15")
    return model, encode(clip, PROMPT, TARGETS), encode(clip, "")


def _recording(model):
    """A clone whose UNet wrapper records (timestep passed, per-pixel sigma map) of every call."""
    from asyndm_fpdm.samplers.backends.comfy_unet import KEY

    seen = []

    def wrapper(apply_model, args):
        call = args["c"].get("transformer_options", {}).get(KEY)
        seen.append((args["timestep"].clone(), None if call is None else call.sigma_map.clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    return m, seen


@pytest.mark.parametrize("scheduler", ["karras", "simple"])
def test_every_comfyui_sampler_vanilla_equals_core_ksampler(sd15, scheduler):
    model, pos, neg = sd15
    lat = empty_latent(1)
    bad = []
    for name in _names():
        ours, _ = sampler_node(model, pos, neg, lat, mode="vanilla", sampler_name=name, scheduler=scheduler,
                               steps=STEPS)
        core = core_ksampler(model, pos, neg, lat, steps=STEPS, sampler=name, scheduler=scheduler)
        err = rel_err(ours, core)
        if not err <= TOL:
            bad.append((name, err))
    assert not bad, f"vanilla vs the core KSampler above {TOL}: {bad}"


def test_every_comfyui_sampler_runs_dynamic_and_keeps_objects_behind(sd15):
    model, pos, neg = sd15
    lat = empty_latent(1)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1  # objects: the left half
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[:, :4] = True
    problems = []
    for name in _names():
        dyn, _ = sampler_node(model, pos, neg, lat, sampler_name=name, scheduler="karras", steps=STEPS)
        if not torch.isfinite(dyn).all():
            problems.append((name, "dynamic not finite"))
        rec, seen = _recording(model)
        fixed, _ = sampler_node(rec, pos, neg, lat, mask_source="mask input", mask=mask, sampler_name=name,
                                scheduler="karras", steps=STEPS)
        if not torch.isfinite(fixed).all():
            problems.append((name, "fixed mask not finite"))
        lags = False
        for t, sigma in seen:
            sig = sigma[0, 0]
            bg = sig[~region]
            if float(sig[region].min()) < float(bg.max()) * (1 - 1e-6):
                problems.append((name, "object below background", float(sig[region].min()), float(bg.max())))
                break
            if float(bg.max() - bg.min()) > 1e-6 * float(bg.max()):
                problems.append((name, "background not uniform"))
                break
            lags = lags or float(sig[region].max()) > float(bg.max()) * (1 + 1e-3)
        if not seen or not lags:
            problems.append((name, "no call" if not seen else "objects never lag"))
    assert not problems, problems


def _wrap(sampler, mode, mask_source="dynamic", mask=None):
    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMSamplerFromSampler

    return AsynDMSamplerFromSampler().get_sampler(sampler, mode, mask_source, "bin", "", 1.0, mask)[0]


def test_wrapper_node_around_custom_sampling_samplers_in_samplercustomadvanced(sd15):
    """KSamplerSelect and the custom-sampling sampler nodes with non-default options, made
    asynchronous: vanilla is the plain sampler's run (its options kept: eta 0.5 / s_noise 0.8 are
    not 3M SDE's defaults, order 3 is not LMS's), AsynDM dynamic runs and changes the image. A
    wrapper that dropped the KSAMPLER's extra options would fail the 3M SDE comparison."""
    from asyndm_helpers import custom_nodes, unwrap
    from numeric import FAR_ABOVE_ROUNDOFF, assert_differs

    cs = custom_nodes()
    model, pos, neg = sd15
    lat = empty_latent(1)
    sigmas = unwrap(cs.BasicScheduler().get_sigmas(model, "karras", STEPS + 1, 1.0))[0]
    noise = unwrap(cs.RandomNoise().get_noise(3))[0]
    guider = unwrap(cs.CFGGuider().get_guider(model, pos, neg, 2.0))[0]
    plain = {
        "select euler_ancestral": unwrap(cs.KSamplerSelect().get_sampler("euler_ancestral"))[0],
        "select uni_pc": unwrap(cs.KSamplerSelect().get_sampler("uni_pc"))[0],
        "3M SDE": unwrap(cs.SamplerDPMPP_3M_SDE().get_sampler(0.5, 0.8, "cpu"))[0],
        "LMS": unwrap(cs.SamplerLMS().get_sampler(3))[0],
    }

    def run(sampler):
        return unwrap(cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, lat))[0]["samples"]

    default = run(unwrap(cs.SamplerDPMPP_3M_SDE().get_sampler(1.0, 1.0, "cpu"))[0])
    for label, sampler in plain.items():
        ref = run(sampler)
        vanilla = run(_wrap(sampler, "vanilla"))
        assert rel_err(vanilla, ref) <= TOL, (label, rel_err(vanilla, ref))
        dyn = run(_wrap(sampler, "AsynDM"))
        assert torch.isfinite(dyn).all(), label
        assert_differs(dyn, ref, FAR_ABOVE_ROUNDOFF, f"{label}: AsynDM vs plain")
    assert_differs(run(_wrap(plain["3M SDE"], "vanilla")), default, FAR_ABOVE_ROUNDOFF, "3M SDE options kept")


def test_wrapper_node_names_what_is_not_a_ksampler(sd15):
    import comfy.samplers

    class OtherSampler(comfy.samplers.Sampler):
        def sample(self, *args, **kwargs):
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="OtherSampler, not a KSAMPLER"):
        _wrap(OtherSampler(), "AsynDM")
    once = _wrap(comfy.samplers.sampler_object("euler"), "AsynDM")
    with pytest.raises(ValueError, match="already asynchronous"):
        _wrap(once, "AsynDM")


def test_old_api_prompts_without_sampler_scheduler_denoise_run_with_the_papers_values(comfy_env, pack_nodes,
                                                                                      stand_ins):
    """API prompts saved before sampler_name / scheduler / denoise existed pass ComfyUI's validator
    and run with the paper's ddim, asyndm_paper schedule and denoise 1. (With those inputs required,
    as before, the validator refuses it: "Required input is missing: scheduler" — tried once.)"""
    import pathlib

    import comfy_workflows as cw

    root = pathlib.Path(__file__).resolve().parents[2]
    api = cw.ui_to_api_prompt(cw.load_ui_workflow(root / "workflows" / "asyndm_sd15_dynamic_vs_vanilla.json"))
    cw.shrink_prompt(api, size=64)
    ks = [k for k, v in api.items() if v["class_type"] == "AsynDMKSampler"]
    for k in ks:
        api[k]["inputs"]["steps"] = 3
    explicit = {k: dict(api[k]["inputs"], sampler_name="ddim", scheduler="asyndm_paper", denoise=1.0) for k in ks}
    for k in ks:
        for name in ("sampler_name", "scheduler", "denoise"):
            api[k]["inputs"].pop(name, None)
    checked = cw.validate_prompt(api)
    assert checked.ok, cw.format_node_errors(checked.node_errors)
    old = cw.run_workflow(api, outputs=ks).outputs
    for k in ks:
        api[k]["inputs"] = explicit[k]
    new = cw.run_workflow(api, outputs=ks).outputs
    for k in ks:
        assert torch.equal(old[k][0]["samples"], new[k][0]["samples"])


@pytest.mark.parametrize("name", ["dpmpp_3m_sde", "er_sde"])
def test_wrapped_stochastic_sampler_image_does_not_depend_on_batch_size(sd15, name):
    """DESIGN.md invariant 5 for samplers through the change of clock: one noise stream per image
    (a Brownian tree for 3M SDE, fresh draws for er_sde). With ComfyUI's own batch-wide streams
    (the variant tried once) er_sde's image 0 of a batch of 2 differs from the single image by
    7.7e-4 relative (ComfyUI's batch-wide Brownian tree happens to give image 0 the same noise)."""
    from numeric import ROUNDOFF_SAMPLING, assert_close

    model, pos, neg = sd15
    one, _ = sampler_node(model, pos, neg, empty_latent(1), sampler_name=name, scheduler="karras", steps=STEPS)
    two, _ = sampler_node(model, pos, neg, empty_latent(2), sampler_name=name, scheduler="karras", steps=STEPS)
    assert_close(two[:1], one, ROUNDOFF_SAMPLING, f"{name}: image 0 of 2 vs alone")


# ------------------------------------------------------------------ stochastic samplers on flow models
def _stochastic_names():
    """Every ComfyUI sampler that draws noise (takes a noise sampler), read from ComfyUI itself."""
    import inspect

    import comfy.samplers

    return [n for n in _names()
            if "noise_sampler" in inspect.signature(comfy.samplers.sampler_object(n).sampler_function).parameters]


@pytest.fixture(scope="module")
def flow_dits(comfy_env, tiny_models):
    from test_asyndm_transformers import dit_setups

    return dit_setups(tiny_models, ["flux", "sd3"])


def _recording_inputs(model):
    """A clone whose model wrapper records (model input, per-pixel sigma map) of every call."""
    from asyndm_fpdm.samplers.backends.comfy_call import KEY

    seen = []

    def wrapper(apply_model, args):
        call = args["c"].get("transformer_options", {}).get(KEY)
        seen.append((args["input"].clone(), None if call is None else call.sigma_map.clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    return m, seen


@pytest.mark.parametrize("fam", ["flux", "sd3"])
def test_every_stochastic_sampler_runs_per_pixel_on_flow_models(flow_dits, fam):
    """Flow models (tiny Flux and SD3), every ComfyUI sampler that draws noise: vanilla equals the
    core KSampler (1e-4); AsynDM with a dynamic mask runs and is finite; with a fixed mask, at every
    model call, no object pixel is below the background's sigma, the objects lag somewhere, and the
    first call's input is the initial noise at every pixel (σ = 1: the FlowClock's sampler
    variable, κ·noise on lagging pixels, is handed back to the model as x/κ). Before this the
    stochastic samplers refused AsynDM on flow models; with the model fed the sampler's x itself
    (tried once) the first input of lagging pixels is off by κ (relative 1.0 on SD3)."""
    import comfy.sample

    model, pos, neg = flow_dits[fam]
    lat = empty_latent(1, 8, 16)
    noise = comfy.sample.prepare_noise(lat["samples"], 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1  # objects: the left half (whole 2×2 tokens)
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[:, :4] = True
    problems = []
    for name in _stochastic_names():
        kw = dict(sampler_name=name, scheduler="simple", steps=STEPS)
        ours, _ = sampler_node(model, pos, neg, lat, mode="vanilla", **kw)
        core = core_ksampler(model, pos, neg, lat, steps=STEPS, sampler=name, scheduler="simple")
        if not rel_err(ours, core) <= TOL:
            problems.append((name, "vanilla vs core", rel_err(ours, core)))
        dyn, _ = sampler_node(model, pos, neg, lat, **kw)
        if not torch.isfinite(dyn).all():
            problems.append((name, "dynamic not finite"))
        rec, seen = _recording_inputs(model)
        fixed, _ = sampler_node(rec, pos, neg, lat, mask_source="mask input", mask=mask, **kw)
        if not torch.isfinite(fixed).all():
            problems.append((name, "fixed mask not finite"))
        first = seen[0][0]
        for chunk in first.split(noise.shape[0]):
            if not rel_err(chunk, noise) <= 1e-3:  # 1e-4 offset of the first sigma (log-SNR samplers)
                problems.append((name, "first input is not the noise", rel_err(chunk, noise)))
        lags = False
        for _, sigma in seen:
            sig = sigma[0, 0]
            bg = sig[~region]
            if float(sig[region].min()) < float(bg.max()) * (1 - 1e-6):
                problems.append((name, "object below background", float(sig[region].min()), float(bg.max())))
                break
            lags = lags or float(sig[region].max()) > float(bg.max()) * (1 + 1e-3)
        if not lags:
            problems.append((name, "objects never lag"))
    assert not problems, problems
