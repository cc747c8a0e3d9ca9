"""Parity with the AsynDM reference's own functions (opt-in).

Set ASYNDM_REFERENCE_PATH to a checkout of github.com/hu-zijing/AsynDM to run these: they
import the reference's per-pixel UNet forward and asynchronous DDIM step from there (nothing
of it is copied here) and compare them with ours on the same tiny random UNet.
"""

import os
import sys

import pytest
import torch

from asyndm_fpdm import tiny
from asyndm_fpdm.samplers.backends.diffusers_unet import DiffusersDenoiser, pixel_forward, model_sampling_of
from asyndm_fpdm.samplers.pixel_samplers import sample_ddim
from numeric import ROUNDOFF_ONE_PASS, assert_close

REF = os.environ.get("ASYNDM_REFERENCE_PATH")
pytestmark = pytest.mark.skipif(
    not REF, reason="set ASYNDM_REFERENCE_PATH=/path/to/AsynDM (a reference checkout) to compare with it"
)


@pytest.fixture(scope="module")
def ref():
    sys.path.insert(0, REF)
    try:
        from diffusion.asyn_ddim_with_logprob import asyn_ddim_step_with_logprob
        from model.unet_2d_condition import unet_asyn_forward
    finally:
        sys.path.remove(REF)
    return unet_asyn_forward, asyn_ddim_step_with_logprob


def random_map(batch, size, seed):
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 1000, (batch, 1, size // 4, size // 4), generator=gen).float()
    return torch.nn.functional.interpolate(coarse, size=(size, size))[:, 0].long()  # few distinct values


def test_per_pixel_forward_and_attention_maps_match_reference(ref):
    unet_asyn_forward, _ = ref
    unet = tiny.tiny_unet()
    x = tiny.latents(2)
    ctx = torch.cat([tiny.embeds(1, seed=3), tiny.embeds(1)])  # [uncond; cond] as the reference batches CFG
    x2 = torch.cat([x[:1], x[:1]])
    tmap = random_map(1, 16, 0).repeat(2, 1, 1)
    with torch.no_grad():
        (theirs,), extra = unet_asyn_forward(
            unet, x2, tmap.reshape(2, -1), encoder_hidden_states=ctx, return_dict=False,
            extra_input={"used_layer_size": 4, "item_idx": [1, 3]}, return_extra_inf=True,
        )
    ours, maps = pixel_forward(unet, x2, tmap, ctx, positions=[[2], [4]], capture_slice=slice(1, 2))
    assert_close(ours, theirs, ROUNDOFF_ONE_PASS, "per-pixel UNet forward vs the reference's")
    their_maps = extra["cross_mask"].permute(0, 2, 1).reshape(1, 2, 4, 4)
    assert_close(maps, their_maps, ROUNDOFF_ONE_PASS, "attention maps vs the reference's")


class _FixedOutput(DiffusersDenoiser):
    """The backend's sigma-space conversion around a given raw model output."""

    def __init__(self, model_sampling, out, prediction_type):
        super().__init__(None, model_sampling, None, prediction_type=prediction_type)
        self.out, self.seen_t = out, []

    def raw(self, x_in, timesteps, capture=False):
        self.seen_t.append(timesteps)
        return self.out, None


class _OneStep:
    """A plan of one step between two per-pixel sigma maps."""

    def __init__(self, model_sampling, sigma, sigma_next):
        self.model_sampling, self.maps = model_sampling, (sigma, sigma_next)

    def __len__(self):
        return 1

    def step(self, i):
        return self.maps

    def background(self, i):
        return self.maps[i].min()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_asynchronous_ddim_step_matches_reference(ref, prediction_type):
    from diffusers import DDIMScheduler

    _, asyn_step = ref
    config = tiny.sd_scheduler_config(prediction_type)
    sched = DDIMScheduler.from_config(config)
    x, out = tiny.latents(2, seed=4), tiny.latents(2, seed=5)
    t = random_map(2, 16, 1)[:, None].expand(2, 4, 16, 16)
    t_prev = (t - 37).clamp(min=0)
    theirs, _, _ = asyn_step(sched, out, t, t_prev, x, eta=0.0)

    model_sampling = model_sampling_of(config)
    sigma, sigma_next = (model_sampling.sigma(m[:, :1].float()) for m in (t, t_prev))
    model = _FixedOutput(model_sampling, out, prediction_type)
    one_step = _OneStep(model_sampling, sigma, sigma_next)
    x_ve = sample_ddim(lambda v, s: model(v, s)[0], x * (1 + sigma**2) ** 0.5, one_step)
    ours = x_ve / (1 + sigma_next**2) ** 0.5
    assert torch.equal(model.seen_t[0], t[:, 0]), "sigma -> timestep gives back the reference's timesteps"
    assert_close(ours, theirs, ROUNDOFF_ONE_PASS, f"asynchronous DDIM step ({prediction_type}) vs the reference's")
