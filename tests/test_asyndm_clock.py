"""The change of clock (samplers/clock.py) without ComfyUI: what it must keep exactly.

Independent checks: a pixel on the background gets σ = s, r = 1 and D̃ = D bit for bit (so vanilla
runs are ComfyUI's); r is d log σ_p / d log s (a finite difference of the σ_p it reports); r is
continuous at the knots (a sampler evaluating at a knot may be finishing the interval above or
starting the one below, and cannot say which); between knots no pixel's sigma rises and no
object pixel is below the background (DESIGN.md invariant 3) on a real plan; into σ = 0 r = 1.
Mutation caught: the end slope not handed on as the next start slope (r jumps at the knots by
0.41 on the plan's paths).
"""

import math

import torch

from asyndm_fpdm.samplers.clock import Clock, ClockModel, ancestral_down, sde_down
from asyndm_fpdm.samplers.plan import SigmaPlan
from asyndm_fpdm.samplers.schedulers import DiscreteModelSampling, make_sigmas


def _sd():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return DiscreteModelSampling(torch.cumprod(1 - betas, 0).float())


def _plan_clock(steps=12, scheduler="karras"):
    sd = _sd()
    sig = make_sigmas(sd, scheduler, steps)
    m = torch.zeros(1, 1, 8, 8)
    m[..., :4] = 1
    plan = SigmaPlan(sig, sd, 1, (8, 8), mode="asyn", ks=[0.7], masks=m)
    return sig, m, Clock(sig, plan.step)


def test_background_pixels_are_exactly_the_background():
    sig, m, clock = _plan_clock()
    x, d = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    bg = (m == 0).expand(1, 4, 8, 8)
    for s in [float(v) for v in sig[:-1]] + [float(sig[3] * 0.7 + sig[4] * 0.3)]:
        sigma, r = clock.at(s)
        assert bool((sigma[m == 0] == torch.tensor(s, dtype=sigma.dtype)).all())
        assert bool((r[m == 0] == 1).all())
        model = ClockModel(lambda x, sigma, **_: d, clock)
        assert torch.equal(model(x, torch.tensor([s]))[bg], d[bg])


def test_r_is_the_log_slope_continuous_at_knots_and_sigmas_keep_their_order():
    sig, m, clock = _plan_clock()
    last = len(sig) - 2
    prev = None
    for i in range(last):
        a, b = math.log(float(sig[i])), math.log(float(sig[i + 1]))
        for f in torch.linspace(0.02, 0.98, 9):
            s = math.exp(a + float(f) * (b - a))
            h = 3e-3  # float32 maps: a wider step keeps round-off below 1e-4
            up, _ = clock.at(s * math.exp(h), i)
            down, _ = clock.at(s * math.exp(-h), i)
            sigma, r = clock.at(s, i)
            fd = (up.log() - down.log()) / (2 * h)
            assert float((fd - r).abs().max()) < 1e-3
            assert bool((r >= -1e-6).all()), "a pixel's sigma would rise"
            assert bool((sigma >= s * (1 - 1e-6)).all()), "a pixel ahead of the background"
            if prev is not None:
                assert bool((sigma <= prev * (1 + 1e-6)).all())
            prev = sigma
        # the knot S_i+1 seen from both sides
        below = clock.at(float(sig[i + 1]), i + 1) if i + 1 < last else None
        above = clock.at(float(sig[i + 1]), i)
        if below is not None:
            assert float((below[0] - above[0]).abs().max()) <= 1e-5 * float(above[0].max())
            assert float((below[1] - above[1]).abs().max()) < 1e-4


def test_knot_maps_are_hit_and_the_last_interval_keeps_r_one():
    sd = _sd()
    sig = make_sigmas(sd, "karras", 8)  # ends at 0
    m = torch.zeros(1, 1, 8, 8)
    m[..., :4] = 1
    plan = SigmaPlan(sig, sd, 1, (8, 8), mode="asyn", ks=[0.7], masks=m)
    maps = [plan.step(i) for i in range(len(plan))]
    plan2 = SigmaPlan(sig, sd, 1, (8, 8), mode="asyn", ks=[0.7], masks=m)
    clock = Clock(sig, plan2.step)
    for i in range(len(plan) - 1):
        sigma, _ = clock.at(float(sig[i]))
        assert float((sigma - maps[i][0]).abs().max()) <= 1e-5 * float(maps[i][0].max())
    s_last = float(sig[-2])
    for f in (1.0, 0.5, 0.01):
        sigma, r = clock.at(s_last * f)
        assert bool((r == 1).all())
        assert float((sigma - maps[-1][0] * f).abs().max()) <= 1e-5 * float(maps[-1][0].max())


def test_noise_down_sigmas():
    s, t = 3.0, 2.0
    assert abs(ancestral_down(s, t, 1.0) - t * t / s) < 1e-12  # eta 1: s'^2 / s
    assert abs(sde_down(s, t, 1.0) - t * t / s) < 1e-12
    assert ancestral_down(s, t, 0.0) == t
