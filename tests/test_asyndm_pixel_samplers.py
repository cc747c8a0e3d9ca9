"""Per-pixel samplers are elementwise in sigma (DESIGN.md, "AsynDM in sigma space").

With an elementwise denoiser — the exact one for N(0, s²) data, denoised = x·s²/(s²+σ²) — a
run whose left half lags (fixed mask) must give, in each half, exactly what a run with every
pixel on that half's sigma path gives: the item half equals a DMconcave run, the background half
a vanilla run. That pins the per-pixel update and the per-pixel multistep history.
"""

import pytest
import torch

from asyndm_fpdm.samplers import engine
from asyndm_fpdm.samplers.pixel_samplers import SAMPLERS, get_sampler
from asyndm_fpdm.samplers.plan import SigmaPlan
from asyndm_fpdm.samplers.schedulers import DiscreteModelSampling, make_sigmas

DATA_STD = 0.8
SHAPE = (2, 3, 6, 8)


@pytest.fixture(scope="module")
def sd():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return DiscreteModelSampling(torch.cumprod(1 - betas, 0).float())


def exact_denoiser(x, sigma, capture=False):
    return x * DATA_STD**2 / (DATA_STD**2 + sigma**2), None


def counted_noise():
    """The n-th call gets the n-th fixed draw, whatever the plan: the same noise per pixel in every run."""
    calls = []

    def sample(s, s_next):
        calls.append((float(s), float(s_next)))
        return torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + len(calls)))

    return sample, calls


def sample_along(sd, sampler, scheduler, mode, steps=6, **options):
    sigmas = make_sigmas(sd, scheduler, steps)
    masks = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    masks[..., : SHAPE[-1] // 2] = 1
    plan = SigmaPlan(sigmas, sd, SHAPE[0], SHAPE[2:], mode=mode, ks=[0.7],
                     masks=masks if mode == "asyn" else None, from_noise=True)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    noise_sampler, calls = counted_noise()
    x = engine.run(exact_denoiser, engine.initial_latent(plan, noise), plan, sampler,
                   noise_sampler=noise_sampler, **options)
    return x, calls


def close(a, b, rel=1e-5):
    return (a - b).abs().max() <= rel * b.abs().max()


@pytest.mark.parametrize("scheduler", ["karras", "paper"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_each_half_follows_its_own_sigma_path(sd, sampler, scheduler):
    asyn, calls = sample_along(sd, sampler, scheduler, "asyn")
    lagging, _ = sample_along(sd, sampler, scheduler, "concave")
    vanilla, vanilla_calls = sample_along(sd, sampler, scheduler, "vanilla")
    half = SHAPE[-1] // 2
    assert torch.isfinite(asyn).all() and asyn.abs().max() > 0
    assert close(asyn[..., :half], lagging[..., :half]), "the lagging half is a run on the item's path"
    assert close(asyn[..., half:], vanilla[..., half:]), "the background half is a run on the scheduler's path"
    assert not close(lagging, vanilla, rel=1e-3), "the two paths differ, so the test can tell them apart"
    assert calls == vanilla_calls, "noise is drawn at the background's sigmas, the same calls as a vanilla run"


@pytest.mark.parametrize("scheduler", ["karras", "paper"])
def test_ddim_is_euler_and_euler_ancestral_per_pixel(sd, scheduler):
    ddim, _ = sample_along(sd, "ddim", scheduler, "asyn", eta=0.0)
    euler, _ = sample_along(sd, "euler", scheduler, "asyn")
    assert close(ddim, euler)
    for eta in (0.5, 1.0):
        ddim, ddim_calls = sample_along(sd, "ddim", scheduler, "asyn", eta=eta)
        ancestral, calls = sample_along(sd, "euler_ancestral", scheduler, "asyn", eta=eta)
        assert ddim_calls == calls and len(calls) > 0
        assert close(ddim, ancestral)
        assert not close(ddim, euler, rel=1e-3)


def test_unknown_sampler_names_the_available_ones():
    with pytest.raises(ValueError, match="'nope' has no per-pixel version: use one of ddim, euler, euler_ancestral"):
        get_sampler("nope")


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_a_pixel_held_at_one_sigma_stays_finite(sd, sampler):
    """k = 1 on karras clamps the items at σ_max for several steps (no step size, h = 0): the
    multistep samplers fall back to first order there instead of dividing by zero."""
    sigmas = make_sigmas(sd, "karras", 8)
    masks = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    masks[..., : SHAPE[-1] // 2] = 1
    plan = SigmaPlan(sigmas, sd, SHAPE[0], SHAPE[2:], mode="asyn", ks=[1.0], masks=masks, from_noise=True)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x = engine.run(exact_denoiser, engine.initial_latent(plan, noise), plan, sampler,
                   noise_sampler=counted_noise()[0])
    held = [float(s[0, 0, 0, 0]) for s in plan._sig[:3]]
    assert held[0] == held[1], "the test needs an item held at one sigma for two steps"
    assert torch.isfinite(x).all()
