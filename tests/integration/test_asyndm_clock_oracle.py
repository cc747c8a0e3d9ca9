"""The change of clock (samplers/clock.py) against the Gaussian closed form, with ComfyUI's own,
unmodified samplers (comfy.k_diffusion.sampling).

Data x0 ~ N(μ, sd²) per pixel: the exact denoiser is D(x, σ) = μ + sd²/(sd² + σ²)(x − μ) and the
probability-flow ODE keeps (x − μ)/sqrt(sd² + σ²) constant, so a pixel that goes from σ_a to σ_b
lands on μ + (x_a − μ)·sqrt(sd² + σ_b²)/sqrt(sd² + σ_a²) whatever path its sigma took. Every
pixel's path here is its own (on the background, lagging at a constant rate, lagging at a varying
rate, restarted mid-run like a dynamic mask); the sampler only ever sees the background's sigmas.

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

from asyndm_fpdm.samplers.clock import NOISE_DOWN, Clock, ClockModel

DETERMINISTIC = ["euler", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "deis",
                 "res_multistep", "gradient_estimation", "uni_pc", "uni_pc_bh2", "dpm_fast", "euler_cfg_pp",
                 "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp", "gradient_estimation_cfg_pp"]
S_MAX, S_MIN = 20.0, 0.05


def _sigmas(n):
    return torch.linspace(math.log(S_MAX), math.log(S_MIN), n + 1, dtype=torch.float64).exp()


def _fake_inner(comfy):
    import comfy.model_sampling as ms

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


def _paths(kind, shape, generator):
    """Per-pixel lag paths: f(S, i) -> σ_p at background sigma S (knot index i), shape (1,1,H,W)."""
    h, w = shape
    group = torch.arange(h * w).view(1, 1, h, w) % 4  # 0: background, 1-3: lagging kinds
    a = torch.tensor([1.0, 0.5, 0.75, 0.9], dtype=torch.float64)[group]  # rate d log σ / d log S
    c = torch.tensor([1.0, 1.0, 1.4, 2.0], dtype=torch.float64)[group]  # start above the background

    def const(S, i):
        return c * S_MAX * (S / S_MAX) ** a

    def curved(S, i):  # the rate changes along the run (as the paper's concave curves do)
        u = math.log(S / S_MAX)
        return const(S, i) * torch.exp((group > 0) * 0.02 * u * u)

    def restart(S, i, n):  # the lag rule changes at the middle knot, as a dynamic mask does
        k = n // 2
        if i <= k:
            return const(S, i)
        Sk = float(_sigmas(n)[k])
        b = torch.where(group == 1, torch.tensor(1.0, dtype=torch.float64), 1.3 - a)
        return const(Sk, k) * (S / Sk) ** b

    return group, {"const": const, "curved": curved, "restart": restart}[kind]


def _run(comfy, name, kind, n, seed=0, stochastic=False, eta=1.0, size=(8, 8)):
    import comfy.samplers

    g = torch.Generator().manual_seed(seed)
    group, path = _paths(kind, size, g)
    sig = _sigmas(n)
    f = (lambda S, i: path(S, i, n)) if kind == "restart" else path
    mu = torch.randn((1, 2, *size), generator=g, dtype=torch.float64)
    sd = 0.5 + torch.rand((1, 2, *size), generator=g, dtype=torch.float64)
    s_a, s_b = f(float(sig[0]), 0), f(float(sig[-1]), n)
    z = torch.randn((1, 2, *size), generator=g, dtype=torch.float64)
    x_a = mu + (sd**2 + s_a**2).sqrt() * z

    def denoiser(x, sigma, model_options=None, **_):
        d = mu + sd**2 / (sd**2 + sigma**2) * (x - mu)
        # CFG at scale 1 (cond = uncond = D), with ComfyUI's post-CFG hooks as the CFG++ samplers use them
        for fn in (model_options or {}).get("sampler_post_cfg_function", []):
            d = fn({"denoised": d, "cond_denoised": d, "uncond_denoised": d, "input": x, "sigma": sigma})
        return d

    clock = Clock(sig, lambda i: (f(float(sig[i]), i), f(float(sig[i + 1]), i + 1)))
    model = ClockModel(denoiser, clock, inner_model=_fake_inner(comfy))
    fn = comfy.samplers.sampler_object(name).sampler_function
    extra = {}
    if stochastic:
        from comfy.k_diffusion import sampling as kd

        base = kd.default_noise_sampler(x_a, seed=seed)
        from asyndm_fpdm.samplers.comfyui.sampler import sampler_info

        down = NOISE_DOWN[sampler_info(name).rule]
        extra["noise_sampler"] = lambda s, t: base(s, t) * clock.noise_scale(float(s), float(t), down(float(s), float(t), eta))
        if "eta" in inspect.signature(fn).parameters:
            extra["eta"] = eta
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # uni_pc builds its coefficients in the default dtype
    try:
        out = fn(model, x_a.clone(), sig, extra_args={"seed": seed}, callback=None, disable=True, **extra)
    finally:
        torch.set_default_dtype(default)
    exact = mu + (x_a - mu) * (sd**2 + s_b**2).sqrt() / (sd**2 + s_a**2).sqrt()
    return out, exact, group, mu, sd, s_b


def _errors(comfy, name, kind, ns):
    bg, lag = [], []
    for n in ns:
        out, exact, group, *_ = _run(comfy, name, kind, n)
        err = (out - exact).abs().amax(dim=1, keepdim=True)
        bg.append(float(err[group == 0].max()))
        lag.append(float(err[group > 0].max()))
    return bg, lag


def _order(errs):
    return math.log2(errs[-2] / errs[-1])


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_lagging_pixels_converge_at_the_samplers_own_order(comfy_env, name):
    """Lagging pixels at a constant rate: the ODE in the background's clock is smooth, so every
    sampler converges on them at the order it has on the background's pixels (capped at 2: lms and
    deis, of order 3-4 on the background, reach about 2.2-2.5 on lagging pixels here)."""
    bg, lag = _errors(comfy_env, name, "const", (12, 24, 48))
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
    out, exact, group, mu, sd, s_b = _run(comfy_env, name, "const", 40, seed=3, stochastic=True, size=(64, 64))
    z = (out - mu) / (sd**2 + s_b**2).sqrt()
    zb, zl = z[(group == 0).expand_as(z)], z[(group > 0).expand_as(z)]
    n = zl.numel()
    bias = abs(float(zb.var()) - 1)
    assert abs(float(zl.mean())) < 4 / n**0.5 + 0.02, name
    assert abs(float(zl.var()) - 1) < 4 * (2 / n) ** 0.5 + bias + 0.02, (name, float(zl.var()), float(zb.var()))
