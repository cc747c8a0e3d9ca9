"""The change of clock (samplers/clock.py) against the Gaussian closed form, with ComfyUI's own,
unmodified samplers (comfy.k_diffusion.sampling).

Data x0 ~ N(μ, sd²) per pixel: the exact denoiser is D(x, σ) = μ + sd²/(sd² + σ²)(x − μ) and the
probability-flow ODE keeps (x − μ)/sqrt(sd² + σ²) constant, so a pixel that goes from σ_a to σ_b
lands on μ + (x_a − μ)·sqrt(sd² + σ_b²)/sqrt(sd² + σ_a²) whatever path its sigma took. Every
pixel's path here is its own (on the background, lagging at a constant rate, lagging at a varying
rate, restarted mid-run like a dynamic mask); the sampler only ever sees the background's sigmas.
On a flow model (CONST: x = (1 − σ)x0 + σε, every pixel pure noise at σ = 1) the same holds for
(x − (1 − σ)μ)/sqrt((1 − σ)²sd² + σ²), with D = μ + (1 − σ)sd²/((1 − σ)²sd² + σ²)(x − (1 − σ)μ).

The CFG++ samplers read the unconditional prediction from a post-CFG hook: the fake model calls
the hooks (CFG at scale 1); with the hook's prediction left untransformed (mutation tried once)
the CFG++ samplers' lagging pixels diverge (errors 1e2 to 1e8).

Mutations caught (tried once): r = 1 everywhere (D returned unchanged: lagging pixels land ~4.7
off and stop converging; the stochastic means are off by 0.6); noise not scaled per pixel (the
lagging pixels' mean drifts by 0.09, 20 standard errors); a piecewise log-linear lag with r
jumping at the knots (heun's end point at a knot then takes the next interval's r: on the
curved lags heun's error stalls near 0.05 instead of falling at order 2).
"""

import inspect
import math

import pytest
import torch

from asyndm_fpdm.samplers.clock import ClockModel

DETERMINISTIC = ["euler", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "deis",
                 "res_multistep", "gradient_estimation", "uni_pc", "uni_pc_bh2", "dpm_fast", "euler_cfg_pp",
                 "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp", "gradient_estimation_cfg_pp"]
S_MAX, S_MIN = 20.0, 0.05


def _sigmas(n, flow=False):
    """EDM: log-uniform from S_MAX to S_MIN. Flow: uniform in σ from 1 (pure noise) to 0.05, like
    the simple schedule at shift 1."""
    if flow:
        return torch.linspace(1, 0.05, n + 1, dtype=torch.float64)
    return torch.linspace(math.log(S_MAX), math.log(S_MIN), n + 1, dtype=torch.float64).exp()


def _fake_inner(comfy, flow=False):
    import comfy.model_sampling as ms

    if flow:
        class Flow(ms.ModelSamplingDiscreteFlow, ms.CONST):  # SD3's sampling at shift 1
            pass

        sampling = Flow()
    else:
        sampling = ms.EPS()
        # sa_solver reads where its stochastic window starts and ends: log-uniform over the test's range
        sampling.percent_to_sigma = lambda p: math.exp(math.log(S_MAX) + p * (math.log(S_MIN) - math.log(S_MAX)))

    class Patcher:
        def get_model_object(self, name):
            return sampling

    class Inner:
        model_sampling = sampling

    class Wrap:
        inner_model = Inner()
        model_patcher = Patcher()

    return Wrap()


def _paths(kind, shape, generator, flow=False, held=False):
    """Per-pixel lag paths: f(S, i) -> σ_p at background sigma S (knot index i), shape (1,1,H,W).
    Flow: σ_p = S^a from σ = 1, where every pixel is pure noise; with ``held`` the last lagging
    kind stays at σ = 1 for the first ~15% of the run (σ_p = min(1, 1.15·S^0.9)), as the paper's
    curves hold objects at pure noise for the first steps on Flux."""
    h, w = shape
    group = torch.arange(h * w).view(1, 1, h, w) % 4  # 0: background, 1-3: lagging kinds
    a = torch.tensor([1.0, 0.5, 0.75, 0.9], dtype=torch.float64)[group]  # rate d log σ / d log S
    c = torch.tensor([1.0, 1.0, 1.4, 2.0], dtype=torch.float64)[group]  # start above the background

    def const(S, i):
        if flow:
            return torch.where((group == 3) & held, (1.15 * S**a).clamp(max=1), S**a)
        return c * S_MAX * (S / S_MAX) ** a

    def curved(S, i):  # the rate changes along the run (as the paper's concave curves do)
        if flow:
            return S ** (a * (1 + 0.5 * (1 - a) * S))
        u = math.log(S / S_MAX)
        return const(S, i) * torch.exp((group > 0) * 0.02 * u * u)

    def restart(S, i, n):  # the lag rule changes at the middle knot, as a dynamic mask does
        k = n // 2
        if i <= k:
            return const(S, i)
        Sk = float(_sigmas(n, flow)[k])
        b = torch.where(group == 1, torch.tensor(1.0, dtype=torch.float64), 1.3 - a)
        return const(Sk, k) * (S / Sk) ** b

    return group, {"const": const, "curved": curved, "restart": restart}[kind]


def _run(comfy, name, kind, n, seed=0, stochastic=False, eta=None, size=(8, 8), flow=False, batch=1, noise=None,
         held=False):
    """One run of ComfyUI's sampler ``name`` through the clock. EDM: x = x0 + σε; flow (CONST):
    x = (1 − σ)x0 + σε with the lag paths in τ = σ/(1 − σ), every pixel pure noise at σ = 1.
    ``noise``: the per-pixel noise sampler (default the clock's PixelNoise); ``eta`` passed where the
    sampler takes one (1 by default when stochastic). Returns (out, exact, group, mean and std of
    the data at each pixel's last sigma)."""
    import comfy.samplers

    from asyndm_fpdm.samplers.clock import NoiseRule, PixelNoise, make_clock, noise_rule

    g = torch.Generator().manual_seed(seed)
    group, path = _paths(kind, size, g, flow, held)
    sig = _sigmas(n, flow)
    f_sig = (lambda S, i: path(S, i, n)) if kind == "restart" else path
    mu = torch.randn((1, 2, *size), generator=g, dtype=torch.float64)
    sd = 0.5 + torch.rand((1, 2, *size), generator=g, dtype=torch.float64)
    s_a, s_b = f_sig(float(sig[0]), 0), f_sig(float(sig[-1]), n)
    z = torch.randn((batch, 2, *size), generator=g, dtype=torch.float64)

    def alpha(sigma):
        return 1 - sigma if flow else torch.ones_like(sigma)

    def marginal(sigma):  # mean, std of x at sigma
        return alpha(sigma) * mu, (alpha(sigma) ** 2 * sd**2 + sigma**2).sqrt()

    m_a, d_a = marginal(s_a)
    x_a = m_a + d_a * z

    def denoiser(x, sigma, model_options=None, **_):
        a = alpha(sigma)
        d = mu + a * sd**2 / (a**2 * sd**2 + sigma**2) * (x - a * mu)
        # CFG at scale 1 (cond = uncond = D), with ComfyUI's post-CFG hooks as the CFG++ samplers use them
        for fn in (model_options or {}).get("sampler_post_cfg_function", []):
            d = fn({"denoised": d, "cond_denoised": d, "uncond_denoised": d, "input": x, "sigma": sigma})
        return d

    fn = comfy.samplers.sampler_object(name).sampler_function
    inner = _fake_inner(comfy, flow)
    rule_name, tau = noise_rule(name, flow)
    eta = 1.0 if eta is None and stochastic else eta
    rule = None
    if rule_name:
        tau_func = None
        if rule_name == "sa_solver":
            from comfy.k_diffusion import sa_solver

            ms = inner.inner_model.model_sampling
            tau_func = sa_solver.get_tau_interval_func(ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8), eta=1.0)
        rule = NoiseRule(rule_name, eta=1.0 if eta is None else eta, tau_func=tau_func, tau=tau)
    clock = make_clock(sig, lambda i: (f_sig(float(sig[i]), i), f_sig(float(sig[i + 1]), i + 1)), rule)
    model = ClockModel(denoiser, clock, inner_model=inner)
    extra = {}
    if eta is not None and "eta" in inspect.signature(fn).parameters:
        extra["eta"] = eta
    if stochastic:
        from comfy.k_diffusion import sampling as kd

        base = kd.default_noise_sampler(x_a, seed=seed)
        extra["noise_sampler"] = PixelNoise(clock, base, rule) if noise is None else noise(base)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # uni_pc builds its coefficients in the default dtype
    try:
        x = clock.unscale(x_a.clone(), float(sig[0]))
        out = fn(model, x, sig, extra_args={"seed": seed}, callback=None, disable=True, **extra)
        out = clock.scale(out, float(sig[-1]))
    finally:
        torch.set_default_dtype(default)
    m_b, d_b = marginal(s_b)
    exact = m_b + (x_a - m_a) * d_b / d_a
    return out, exact, group, m_b, d_b


def _errors(comfy, name, kind, ns, flow=False, eta=None):
    bg, lag = [], []
    for n in ns:
        out, exact, group, *_ = _run(comfy, name, kind, n, flow=flow, eta=eta)
        err = (out - exact).abs().amax(dim=1, keepdim=True)
        bg.append(float(err[group == 0].max()))
        lag.append(float(err[group > 0].max()))
    return bg, lag


def _order(errs):
    return math.log2(errs[-2] / errs[-1])


@pytest.mark.parametrize("flow", [False, True], ids=["edm", "flow"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_lagging_pixels_converge_at_the_samplers_own_order(comfy_env, name, flow):
    """Lagging pixels at a constant rate: the ODE in the background's clock is smooth, so every
    sampler converges on them at the order it has on the background's pixels (capped at 2: lms and
    deis, of order 3-4 on the background, reach about 2.2-2.5 on lagging pixels here). On a flow
    model (σ clock, every pixel from pure noise at σ = 1) as on an EDM one."""
    bg, lag = _errors(comfy_env, name, "const", (12, 24, 48), flow=flow)
    assert lag[-1] < lag[0] / 2, (name, bg, lag)
    assert _order(lag) >= min(_order(bg), 2.0) - 0.3, (name, bg, lag)


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("kind", ["curved", "restart"])
def test_varying_and_restarted_lags_converge(comfy_env, name, kind):
    """Rates that change from interval to interval (the paper's curves) or jump mid-run (a dynamic
    mask): every sampler still converges to the exact per-pixel solution, at least at first order
    (samplers whose history or end point spans a change of rate drop to first order there)."""
    bg, lag = _errors(comfy_env, name, kind, (12, 24, 48))
    assert lag[-1] < lag[0] / 2, (name, bg, lag)
    assert _order(lag) >= min(_order(bg), 1.0) - 0.3, (name, bg, lag)


STOCHASTIC = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
              "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "res_multistep_ancestral", "ddpm", "er_sde", "seeds_2", "seeds_3",
              "sa_solver", "sa_solver_pece"]


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_give_the_data_distribution_per_pixel(comfy_env, name):
    """Final pixels are N(μ, sd² + σ_b²) on lagging pixels as on the background: the standardised
    values' variance is 1 within the sampling error (4 standard errors) plus the discretisation
    bias the background itself shows."""
    out, exact, group, mean, std = _run(comfy_env, name, "const", 40, seed=3, stochastic=True, size=(64, 64))
    z = (out - mean) / std
    zb, zl = z[(group == 0).expand_as(z)], z[(group > 0).expand_as(z)]
    n = zl.numel()
    bias = abs(float(zb.var()) - 1)
    assert abs(float(zl.mean())) < 4 / n**0.5 + 0.02, name
    assert abs(float(zl.var()) - 1) < 4 * (2 / n) ** 0.5 + bias + 0.02, (name, float(zl.var()), float(zb.var()))


# The FlowClock (flow models): ComfyUI's flow forms of the stochastic samplers, at eta 0, are ODE
# solvers of the background's flow ODE; with D̃ = κ r D + (1 − r − s·κ'/κ)·x and the model fed x/κ
# they must integrate each pixel's own ODE. (dpm_2_ancestral_RF is nan at eta 0 in ComfyUI itself.)
TAU_ODE = ["euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "seeds_2",
           "euler_ancestral_cfg_pp"]


@pytest.mark.parametrize("name", TAU_ODE)
@pytest.mark.parametrize("kind", ["const", "curved", "restart"])
def test_tau_clock_integrates_each_pixels_ode_on_flow_models(comfy_env, name, kind):
    """The FlowClock's reparameterisation against the closed form: the stochastic samplers' flow
    forms at eta 0 converge on lagging pixels (at their background order for constant rates, at
    least first order where the rate changes). Mutation caught (tried once): the s·κ'/κ term left
    out of D̃ (lagging errors 1.3-1.7, not falling)."""
    from asyndm_fpdm.samplers.clock import noise_rule

    assert noise_rule(name, True)[1], f"{name} should run on the FlowClock on flow models"
    bg, lag = _errors(comfy_env, name, kind, (12, 24, 48), flow=True, eta=0.0)
    assert lag[-1] < lag[0] / 2, (name, bg, lag)
    assert _order(lag) >= min(_order(bg), 2.0 if kind == "const" else 1.0) - 0.3, (name, bg, lag)


FLOW_STOCHASTIC = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
                   "dpmpp_3m_sde", "er_sde", "sa_solver", "seeds_2", "seeds_3", "euler_ancestral_cfg_pp"]


def _distribution_ok(out, mean, std, group):
    """Standardised final pixels: mean 0 and variance 1 on lagging pixels within 4 standard errors
    plus the discretisation bias the background itself shows (+0.02)."""
    z = (out - mean) / std
    zb, zl = z[(group == 0).expand_as(z)], z[(group > 0).expand_as(z)]
    n = zl.numel()
    bias = abs(float(zb.var()) - 1)
    ok = abs(float(zl.mean())) < 4 / n**0.5 + 0.02 and abs(float(zl.var()) - 1) < 4 * (2 / n) ** 0.5 + bias + 0.02
    return ok, (round(float(zl.mean()), 3), round(float(zl.var()), 3), round(float(zb.var()), 3))


@pytest.mark.parametrize("name", FLOW_STOCHASTIC)
def test_flow_stochastic_samplers_give_the_data_distribution_per_pixel(comfy_env, name):
    """On a flow model (x = (1 − σ)x0 + σε, every pixel pure noise at σ = 1, objects lagging at
    fixed rates, 4 seeds in a batch): each pixel's final value is distributed as the data at its
    own last sigma, N((1 − σ_p)μ, (1 − σ_p)²sd² + σ_p²), on lagging pixels as on the background.
    One lagging group is held at σ = 1 for the first steps, as AsynDM's curves do on Flux. The
    same run with the sampler's noise unscaled (factor 1 on lagging pixels) fails the same
    criterion (variance about 0.1: their noise is sized for the background's much smaller τ);
    so does, for dpm_2_ancestral, the 2M/3M SDEs and SEEDS, the FlowClock with q = 1 (the
    background's α rescale on every pixel: variance 1.33-1.39)."""
    kw = dict(seed=3, stochastic=True, size=(32, 32), flow=True, batch=4, held=True)
    out, _, group, mean, std = _run(comfy_env, name, "const", 40, **kw)
    ok, stats = _distribution_ok(out, mean, std, group)
    assert ok, (name, stats)
    unscaled, *_ = _run(comfy_env, name, "const", 40, noise=lambda base: base, **kw)
    assert not _distribution_ok(unscaled, mean, std, group)[0], (name, "unscaled noise passes too")
