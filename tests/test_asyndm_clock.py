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

from asyndm_fpdm.samplers.clock import Clock, ClockModel, FlowClock, NoiseRule, PixelNoise, ancestral_down, sde_down
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


def _flow_clock(steps=8):
    """A flow run (σ from 1 to 0) with lagging pixels σ_p = S^a (a < 1) beside background ones."""
    sig = torch.linspace(1, 0, steps + 1)
    a = torch.tensor([1.0, 0.5, 0.75, 0.9])[torch.arange(64).view(1, 1, 8, 8) % 4]

    def knot(i):
        return sig[i].clamp(min=0) ** a

    return sig, a, FlowClock(sig, lambda i: (knot(i), knot(i + 1)))


def test_flow_clock_background_is_exact_and_its_terms_are_the_derivatives_of_the_path():
    """FlowClock: on the background σ_p = s, input scale 1, D̃ = D bit for bit (model fed x
    itself), noise factor 1 for every rule. On lagging pixels D̃ = κ r D + (1 − r − s κ'/κ) x with
    r = d log σ_p/d log s and κ = 1/scale read by finite differences of what the clock reports."""
    sig, a, clock = _flow_clock()
    bg = a == 1
    x, d = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    fed = []
    model = ClockModel(lambda xin, sigma, **_: fed.append(xin) or d, clock)
    for s in [0.8, 0.62, 0.3, 0.07]:
        sigma, scale, ca, cb = clock.terms(s)
        assert bool((sigma[bg] == torch.tensor(s)).all()) and bool((scale[bg] == 1).all())
        out = model(x, torch.tensor([s]))
        assert torch.equal(out[bg.expand_as(out)], d[bg.expand_as(d)])
        assert torch.equal(fed[-1][bg.expand_as(x)], x[bg.expand_as(x)])
        h = 1e-3
        up, down = clock.terms(s * math.exp(h)), clock.terms(s * math.exp(-h))
        r = (up[0].double().log() - down[0].double().log()) / (2 * h)
        dlog_kappa = -(up[1].log() - down[1].log()) / (2 * h) / s  # d log κ / ds
        assert float((ca - r / scale).abs().max()) < 1e-3 * float(ca.abs().max()), s
        assert float((cb - (1 - r - s * dlog_kappa)).abs().max()) < 1e-3 * float(cb.abs().max() + 1), s
    for name in ("rf", "ancestral", "sde", "er_sde", "renoise", "seeds", "sa_solver"):
        noise = PixelNoise(clock, lambda *_: torch.ones(1, 4, 8, 8), NoiseRule(name, tau_func=lambda s: 1.0, tau=True))
        for i in range(len(sig) - 2):
            f = noise(sig[i], sig[i + 1])
            assert bool((f[bg.expand_as(f)] == 1).all()), name
            assert bool(torch.isfinite(f).all()) and bool((f[~bg.expand_as(f)] != 1).any()), name


def test_seeds_noise_adds_up_to_the_pixels_own_step():
    """SEEDS-2 reuses its first draw in the second stage (ComfyUI's coefficients written out here):
    the two scaled draws together give each pixel the variance of its own full SDE step, the one
    the single-call rule gives the step (s → s'). Mutation caught (tried once): each SEEDS call
    scaled by the single-call sde rule instead (the stage-2 variance off by 2.3%)."""
    sig, a, clock = _flow_clock()
    ones = lambda *_: torch.ones(1, 1, 8, 8)  # noqa: E731
    eta, r = 1.0, 0.5
    for i in (1, 3, 5):
        s, t = float(sig[i]), float(sig[i + 1])
        lam_s, lam_t = math.log((1 - s) / s), math.log((1 - t) / t)
        h = lam_t - lam_s
        s1 = 1 / (1 + math.exp(lam_s + r * h))
        seeds = PixelNoise(clock, ones, NoiseRule("seeds", eta=eta, tau=True))
        f1, f2 = seeds(s, s1), seeds(s1, t)
        seg = (r - 1) * h * eta
        first = (1 - math.exp(-2 * r * h * eta)) * math.exp(2 * seg)  # variance weights, stage 2's noise
        second = 1 - math.exp(2 * seg)
        full = PixelNoise(clock, ones, NoiseRule("sde", eta=eta, tau=True))(s, t) ** 2 * (1 - math.exp(-2 * h * eta))
        total = f1.double() ** 2 * first + f2.double() ** 2 * second
        assert float((total - full.double()).abs().max()) < 1e-5 * float(full.max()), i
