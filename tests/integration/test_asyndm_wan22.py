"""Wan 2.2's two experts in one AsynDM run (DESIGN.md, "Runs split over step ranges"), inside a real
ComfyUI on two tiny random Wan stand-ins (different weights: the high-noise and the low-noise expert).

- vanilla: two Asynchronous KSampler (Advanced) passes equal ComfyUI's two KSamplerAdvanced passes
  (the official Wan 2.2 template's graph), after each pass;
- dynamic: the per-token sigmas the models receive continue across the switch — the low-noise
  expert's first step gets exactly what a one-pass run of the high-noise expert gets at that step
  (the independent oracle), so the lagging tokens keep their lag;
- a later pass without the first pass's plan, or with other settings, is refused with the fix.
"""

import pytest
import torch

from asyndm_helpers import TARGETS_KEY
from numeric import ROUNDOFF_SAMPLING, assert_close

STEPS, SPLIT, CFG, SEED = 6, 3, 1.0, 11
TARGETS = {"words": ["rabbit", "ball"], "ks": [0.7, 0.5], "positions": [[2], [5]], "context_len": 12}
TOL_TWO_PASS = 1e-4  # measured 0: the same operations in the same order


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def experts(comfy_env, tiny_models):
    high = tiny_models.tiny_dit("wan")
    low = tiny_models.tiny_dit("wan", seed=tiny_models.SEED + 100)
    pos = tiny_models.dit_conditioning("wan")
    pos[0][1][TARGETS_KEY] = dict(TARGETS)
    neg = tiny_models.dit_conditioning("wan", length=7, seed=99)
    return high, low, pos, neg


def _latent():
    return {"samples": torch.zeros(1, 16, 2, 8, 8)}  # two latent frames of a video


def _asyn(model, pos, neg, latent, start, end, sampler="euler", mode="AsynDM", cfg=CFG, steps=STEPS):
    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMKSamplerAdvanced

    return AsynDMKSamplerAdvanced().sample(model, SEED, steps, cfg, sampler, "simple", mode, "dynamic", "bin", "", 1.0,
                                           start, end, pos, neg, latent)


def _core(model, pos, neg, latent, start, end, sampler="euler", cfg=CFG):
    import nodes

    first = start == 0
    return nodes.KSamplerAdvanced().sample(model, "enable" if first else "disable", SEED, STEPS, cfg, sampler, "simple",
                                           pos, neg, latent, start, end,
                                           "enable" if end < STEPS else "disable")[0]


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral", "deis"])
def test_vanilla_two_experts_equal_the_core_two_ksampler_advanced_graph(experts, sampler):
    """Mutation caught: the second pass drawing fresh noise from the seed (as step 0 does) instead of
    continuing the first pass's latent."""
    high, low, pos, neg = experts
    core1 = _core(high, pos, neg, _latent(), 0, SPLIT, sampler, cfg=2.0)
    core2 = _core(low, pos, neg, core1, SPLIT, 10000, sampler, cfg=2.0)
    ours1, run1 = _asyn(high, pos, neg, _latent(), 0, SPLIT, sampler, mode="vanilla", cfg=2.0)
    ours2, run2 = _asyn(low, pos, neg, ours1, SPLIT, 10000, sampler, mode="vanilla", cfg=2.0)
    assert_close(ours1["samples"], core1["samples"], TOL_TWO_PASS, f"{sampler}: after the high-noise expert")
    assert_close(ours2["samples"], core2["samples"], TOL_TWO_PASS, f"{sampler}: after the low-noise expert")
    assert len(run1.timestep_maps) == SPLIT and len(run2.timestep_maps) == STEPS  # the whole run's record


def _recording(model):
    """A clone whose model wrapper records the per-token sigma map each call receives."""
    from asyndm_fpdm.samplers.backends.comfy_call import KEY

    seen = []

    def wrapper(apply_model, args):
        seen.append(args["c"]["transformer_options"][KEY].sigma_map.clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    return m, seen


def test_dynamic_lag_continues_across_the_expert_switch(experts):
    """The oracle is a one-pass run of the high-noise expert: its model calls receive the same per-token
    sigmas as the two-expert run's up to step SPLIT + 1 (a step's next sigmas follow the masks read in
    the step before, so step SPLIT + 1 still follows the high-noise expert's last attention; later
    steps follow the low-noise expert's). Mutations caught: resume() keeping the fresh plan's initial
    masks instead of the first pass's, or restarting the per-token states y at the switch."""
    high, low, pos, neg = experts
    one, seen_one = _recording(high)
    _asyn(one, pos, neg, _latent(), 0, 10000)
    h, seen_high = _recording(high)
    lo, seen_low = _recording(low)
    first, run1 = _asyn(h, pos, neg, _latent(), 0, SPLIT)
    second, run2 = _asyn(lo, pos, neg, first, SPLIT, 10000)
    assert len(seen_one) == STEPS and len(seen_high) == SPLIT and len(seen_low) == STEPS - SPLIT  # cfg 1: one call
    for i, got in enumerate(seen_high + seen_low[:2]):
        assert torch.equal(got, seen_one[i]), f"step {i}: the two-expert run's sigmas differ from the one-pass run's"
    import comfy.samplers

    background = comfy.samplers.calculate_sigmas(low.get_model_object("model_sampling"), "simple", STEPS).float()
    assert (seen_low[0] > background[SPLIT] * (1 + 1e-3)).any(), "no token lags at the switch: a lost lag goes unseen"
    for j, sig in enumerate(seen_low):  # under the low-noise expert no token is ahead of the background
        assert float(sig.min()) >= float(background[SPLIT + j]) * (1 - 1e-6)
    # the second pass's run holds the whole run (what the previews show), the first pass's steps unchanged
    assert len(run2.timestep_maps) == STEPS
    for a, b in zip(run1.timestep_maps, run2.timestep_maps[:SPLIT]):
        assert_close(b, a, ROUNDOFF_SAMPLING, "the first pass's timesteps in the second pass's record")
    assert torch.isfinite(second["samples"]).all()
    # the carried plan is not consumed: ComfyUI may rerun the second pass on the cached first one
    again, _ = _asyn(lo, pos, neg, first, SPLIT, 10000)
    assert torch.equal(again["samples"], second["samples"])


def test_a_later_pass_needs_the_first_pass_plan_and_its_settings(experts):
    high, low, pos, neg = experts
    first, _ = _asyn(high, pos, neg, _latent(), 0, SPLIT)
    bare = {"samples": first["samples"]}
    with pytest.raises(ValueError, match="carries no AsynDM plan"):
        _asyn(low, pos, neg, bare, SPLIT, 10000)
    with pytest.raises(ValueError, match="steps 8 here vs 6 in the first pass"):
        _asyn(low, pos, neg, first, SPLIT, 10000, steps=8)
    with pytest.raises(ValueError, match="set start_at_step to 3"):
        _asyn(low, pos, neg, first, SPLIT - 1, 10000)
    vanilla, _ = _asyn(low, pos, neg, bare, SPLIT, 10000, mode="vanilla")  # vanilla continues any latent
    assert torch.isfinite(vanilla["samples"]).all()
