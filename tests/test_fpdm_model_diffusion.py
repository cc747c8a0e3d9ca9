"""FPDM network and diffusion math against closed forms."""

import math

import numpy as np
import pytest
import torch

from asyndm_fpdm.fpdm import diffusion as D
from asyndm_fpdm.fpdm.model import sincos_2d
from asyndm_fpdm.fpdm.pipeline import SampleOptions, generate
from asyndm_fpdm.fpdm.solver import SolverSettings, make_solver
from fpdm_tiny import tiny_model
from numeric import EPS32, EPS64, ROUNDOFF_ELEMENTWISE, ROUNDOFF_SAMPLING, assert_close


# ----------------------------------------------------------------------------- model


def test_sincos_table_closed_form():
    dim, gh, gw = 16, 3, 5
    table = sincos_2d(dim, gh, gw)
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    r, c = 2, 4
    tok = table[r * gw + c].double().numpy()
    expect = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
    assert_close(torch.from_numpy(tok), torch.from_numpy(expect), ROUNDOFF_ELEMENTWISE, "float32 sin/cos table")


def test_any_latent_grid_works_and_regenerates_position_embedding():
    model = tiny_model()  # trained grid 8x8
    y, t = torch.tensor([1]), torch.tensor([100])
    out = model(torch.randn(1, 4, 6, 12), t, y)
    assert out.shape == (1, 8, 6, 12)
    assert model.pos_embed(3, 6, "cpu", torch.float32).shape == (1, 18, 32)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model(torch.randn(1, 4, 7, 8), t, y)


def test_fixed_point_block_runs_exactly_the_asked_iterations():
    model = tiny_model()
    calls = []
    h = model.block_fixed_point.register_forward_hook(lambda *a: calls.append(1))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 5]), torch.tensor([0, 1])
    model(x, t, y, solver=make_solver(7))
    assert len(calls) == 7
    calls.clear()
    model(x, t, y)  # default: config.default_iterations
    assert len(calls) == 3
    h.remove()


def test_more_iterations_approach_a_fixed_point():
    model = tiny_model()
    x, t, y = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5]), torch.tensor([0])
    res = model.solve(x, t, y, make_solver(60, tolerance=1e-4))
    assert res.info["iterations"][0] < 60 and res.info["residual"][0] < 1e-4
    assert res.solution.shape == (1, 16, 32)  # tokens of the 8x8 latent at patch 2, hidden 32


def test_plain_dit_has_no_fixed_point_parts():
    dit = tiny_model(fixed_point=False)
    assert not any(k.startswith("block_fixed_point") for k in dit.state_dict())
    assert sum(1 for k in dit.state_dict() if k.endswith("attn.qkv.weight")) == 3


# ----------------------------------------------------------------------------- schedules


def test_linear_betas_are_truly_linear():
    b = D.linear_betas()
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    steps = torch.from_numpy(np.diff(b))
    # differences of values up to 0.02 that are 1000x smaller: 1000 eps of cancellation, bounded by 2^12 eps
    assert_close(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), 2**12 * EPS64, "float64 beta increments")


def test_respacing():
    assert D.space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert D.space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    s, full = D.make_diffusion(10), D.make_diffusion(None)
    assert_close(torch.from_numpy(s.alphas_cumprod), torch.from_numpy(full.alphas_cumprod[s.timesteps]),
                 2**6 * EPS64, "respaced alpha_bar vs the full schedule's (float64)")


def test_zero_terminal_snr():
    s, base = D.make_diffusion(None, zero_snr=True), D.make_diffusion(None)
    assert s.alphas_cumprod[-1] == pytest.approx(0, abs=1e-12)
    assert s.alphas_cumprod[0] == pytest.approx(base.alphas_cumprod[0])


# ----------------------------------------------------------------------------- samplers


def _exact_predictor(s, i, x, x0_star, prediction):
    ab = float(s.alphas_cumprod[i])
    eps = (x - math.sqrt(ab) * x0_star) / math.sqrt(1 - ab)
    return eps if prediction == "eps" else math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0_star


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction,zsnr", [("eps", False), ("v", False), ("v", True)])
def test_exact_predictor_recovers_the_data_point(method, prediction, zsnr):
    """One-point data: the true denoiser is known, and both samplers must land on the point."""
    s = D.make_diffusion(20, zero_snr=zsnr)
    # The steps take their schedule coefficients as float32 scalars (the reference's numerics), so on
    # float64 tensors a step is exact only up to float32 rounding of those coefficients, amplified by
    # 1/sqrt(alpha_bar) at the noisiest step (about 160 for t=999).
    coef_rounding = EPS32 / math.sqrt(s.alphas_cumprod[s.alphas_cumprod > 0].min())
    g = torch.Generator().manual_seed(0)
    x0_star = torch.randn(1, 4, 4, 4, generator=g).double()
    x = torch.randn(1, 4, 4, 4, generator=g).double()
    for i in reversed(range(len(s))):
        pred = _exact_predictor(s, i, x, x0_star, prediction)
        if method == "ddim":
            x, x0 = D.ddim_step(s, i, x, pred, prediction=prediction)
        else:
            x, x0 = D.ddpm_step(s, i, x, pred, torch.randn(x.shape, generator=g).double(), prediction)
        assert_close(x0, x0_star, coef_rounding, f"x0 prediction at index {i}")
    assert_close(x, x0_star, coef_rounding, "final sample")


def test_ddpm_step_matches_the_posterior_formula():
    s = D.make_diffusion(10)
    i = 5
    x, x0, noise = torch.randn(3, 1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    ab, abp, beta = s.alphas_cumprod[i], s.alphas_cumprod_prev[i], s.betas[i]
    eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    mean = math.sqrt(abp) * beta / (1 - ab) * x0 + math.sqrt(1 - beta) * (1 - abp) / (1 - ab) * x
    for v, var in ((1.0, beta), (-1.0, beta * (1 - abp) / (1 - ab))):
        out = torch.cat([eps, torch.full_like(eps, v)], 1)
        x_prev, _ = D.ddpm_step(s, i, x, out, noise)
        assert_close(x_prev, mean + math.sqrt(var) * noise, ROUNDOFF_ELEMENTWISE, f"DDPM step, v={v}")


def test_ddim_eta_one_uses_the_ddpm_posterior_variance():
    s = D.make_diffusion(10)
    i = 4
    x, x0, noise = torch.randn(3, 1, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    ab, abp = s.alphas_cumprod[i], s.alphas_cumprod_prev[i]
    eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    var = s.posterior_variance[i]  # eta=1: sigma^2 = (1-ab_prev)/(1-ab) * (1-ab/ab_prev)
    a, _ = D.ddim_step(s, i, x, eps, noise, eta=1.0)
    assert_close(a, math.sqrt(abp) * x0 + math.sqrt(1 - abp - var) * eps + math.sqrt(var) * noise, ROUNDOFF_ELEMENTWISE,
                 "DDIM eta 1")
    b, _ = D.ddim_step(s, i, x, eps, noise, eta=0.0)
    assert_close(b, math.sqrt(abp) * x0 + math.sqrt(1 - abp) * eps, ROUNDOFF_ELEMENTWISE, "DDIM eta 0")


def test_guidance_modes():
    cond, uncond = torch.ones(1, 8, 2, 2), torch.zeros(1, 8, 2, 2)
    ref = D.guide(cond, uncond, 4.0, "reference")
    std = D.guide(cond, uncond, 4.0, "standard")
    assert ref[:, :3].eq(4).all() and ref[:, 3:].eq(1).all()
    assert std[:, :4].eq(4).all() and std[:, 4:].eq(1).all()


def test_generate_is_seeded_and_batch_independent():
    model = tiny_model()
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    opts = SampleOptions(steps=4, method="ddim", cfg_scale=3.0)
    a, run = generate(model, [1, 2, 3], noise, opts, SolverSettings(iterations=2, reuse=True))
    b, _ = generate(model, [2], noise[1:2], opts, SolverSettings(iterations=2, reuse=True))
    assert_close(a[1:2], b, ROUNDOFF_SAMPLING, "image 1 of a batch of 3 vs alone")
    assert run.evaluations == 2 * 3 * 2 * 4  # cond+uncond halves x 3 images x 2 iterations x 4 steps
