"""FPDM training math: q_sample, the hybrid loss, v / flow losses, the stochastic fixed-point solver,
the model's explicit forward and DiT's training parts, against closed forms."""

import math

import pytest
import torch

from asyndm_fpdm.fpdm import diffusion as D
from asyndm_fpdm.fpdm.model import DiT, drop_labels, initialize_weights, model_config
from asyndm_fpdm.fpdm.solver import draw_iterations, stochastic_solver
from fpdm_tiny import tiny_config, tiny_model


def _batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 4, 4, generator=g), torch.randn(n, 4, 4, 4, generator=g)


def test_q_sample_is_the_forward_marginal_and_zero_snr_ends_in_noise():
    s = D.make_diffusion(None)
    x0, noise = _batch()
    t = torch.tensor([0, 10, 300, 700, 999])
    xt = D.q_sample(s, x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        ab = s.alphas_cumprod[ti]
        assert torch.allclose(xt[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i], atol=1e-6)
    z = D.make_diffusion(None, zero_snr=True)
    assert torch.allclose(D.q_sample(z, x0, torch.full((5,), 999), noise), noise, atol=1e-6)
    flow = D.q_sample(s, x0, torch.tensor([0, 250, 500, 750, 1000]), noise, flow=True)
    assert torch.allclose(flow[2], 0.5 * x0[2] + 0.5 * noise[2]) and torch.equal(flow[0], x0[0])


def _exact_output(s, x0, xt, t, noise, prediction, var_value):
    pred = noise if prediction == "eps" else (s.gather("sqrt_alphas_cumprod", t, x0) * noise
                                              - s.gather("sqrt_one_minus_alphas_cumprod", t, x0) * x0)
    return torch.cat([pred, torch.full_like(pred, var_value)], 1)


@pytest.mark.parametrize("prediction,zsnr", [("eps", False), ("v", False), ("v", True)])
def test_exact_prediction_has_zero_mse_and_zero_kl_at_the_posterior_variance(prediction, zsnr):
    s = D.make_diffusion(None, zero_snr=zsnr)
    x0, noise = _batch()
    t = torch.tensor([1, 50, 400, 800, 998])
    xt = D.q_sample(s, x0, t, noise)
    # var value -1 = the clipped posterior variance = the true one for t >= 1: KL is 0
    out = _exact_output(s, x0, xt, t, noise, prediction, -1.0)
    terms = D.training_losses(s, out, x0, xt, t, noise, prediction)
    assert terms["mse"].abs().max() < 1e-8 * max(1.0, float(D.v_loss_weights(s).max()))
    assert terms["vb"].abs().max() < 1e-4
    # var value +1 = beta: the KL of two Gaussians with equal means, in bits
    wrong = D.training_losses(s, _exact_output(s, x0, xt, t, noise, prediction, 1.0), x0, xt, t, noise, prediction)
    v1 = torch.tensor(s.posterior_log_variance_clipped[t.numpy()]).exp()
    v2 = torch.tensor(s.betas[t.numpy()])
    expect = 0.5 * (-1 + (v2 / v1).log() + v1 / v2) / math.log(2)
    assert torch.allclose(wrong["vb"].double(), expect, rtol=1e-3, atol=1e-6)
    assert wrong["vb"][0] > 1e-3 and torch.equal(wrong["loss"], wrong["mse"] + wrong["vb"])
    noisy = D.training_losses(s, out + 0.1, x0, xt, t, noise, prediction)
    assert (noisy["mse"] > 0).all()


def test_eps_mse_is_the_plain_noise_error_and_vb_does_not_reach_the_mean():
    s = D.make_diffusion(None)
    x0, noise = _batch()
    t = torch.tensor([0, 3, 30, 300, 999])
    xt = D.q_sample(s, x0, t, noise)
    out = torch.randn(5, 8, 4, 4, requires_grad=True)
    terms = D.training_losses(s, out, x0, xt, t, noise, "eps")
    assert torch.allclose(terms["mse"], ((out[:, :4] - noise) ** 2).mean(dim=(1, 2, 3)))
    terms["vb"].sum().backward()
    assert out.grad[:, :4].abs().max() == 0 and out.grad[:, 4:].abs().max() > 0  # hybrid loss: mean frozen


def test_flow_loss_targets_the_velocity_and_refuses_learned_variance():
    s = D.make_diffusion(None)
    x0, noise = _batch()
    t = torch.tensor([0, 250, 500, 750, 999])
    xt = D.q_sample(s, x0, t, noise, flow=True)
    assert D.training_losses(s, x0 - noise, x0, xt, t, noise, flow=True)["loss"].abs().max() == 0
    with pytest.raises(ValueError, match="learn_sigma=False"):
        D.training_losses(s, torch.zeros(5, 8, 4, 4), x0, xt, t, noise, flow=True)


def test_stochastic_solver_backpropagates_through_the_with_grad_iterations_only():
    a = torch.tensor(0.5, requires_grad=True)
    b = torch.tensor(1.0)

    def f(z, index=None):
        return a * z + b

    z0 = torch.tensor([[2.0]])
    n0, n1 = 3, 2
    z, info = stochastic_solver(n0, n1)(f, z0)
    # z_k = a z_{k-1} + b; the no-grad part is a constant c = z_3; z = a^2 c + a b + b
    c = z0.clone()
    for _ in range(n0):
        c = 0.5 * c + 1.0
    z.sum().backward()
    assert a.grad.item() == pytest.approx(2 * 0.5 * c.item() + 1.0)
    assert info["no_grad"] == 3 and info["with_grad"] == 2 and info["evaluations"] == 5


def test_iteration_draws_cover_inclusive_ranges_and_check_bounds():
    g = torch.Generator().manual_seed(0)
    draws = [draw_iterations(g, (0, 2), (1, 3)) for _ in range(200)]
    assert {d[0] for d in draws} == {0, 1, 2} and {d[1] for d in draws} == {1, 2, 3}
    with pytest.raises(ValueError, match="min <= max"):
        draw_iterations(g, (3, 1), (1, 2))
    with pytest.raises(ValueError, match="never learns"):
        draw_iterations(g, (0, 1), (0, 0))


def test_solve_gives_output_solution_and_counts():
    model = tiny_model()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])
    res = model.solve(x, t, y, stochastic_solver(2, 1))
    assert res.out.shape == (2, 8, 8, 8) and res.solution.shape == (2, 16, 32)
    assert res.info["evaluations"] == 6
    # the solution is the fixed-point block's output: one more solver run from it changes little
    # compared with starting from scratch
    again = model.solve(x, t, y, stochastic_solver(0, 1), init=[res.solution])
    scratch = model.solve(x, t, y, stochastic_solver(0, 1))
    assert (again.solution - res.solution).norm() < (scratch.solution - res.solution).norm()


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny_model(seed=4).train()
        model.gradient_checkpointing = ckpt
        x, t, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 500]), torch.tensor([0, 3])
        model(x, t, y, stochastic_solver(1, 2)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7 * grads[0].abs().max().item())


def test_size_table_and_dit_initialisation():
    cfg = model_config("FPDM-XL/2", pre_depth=1, post_depth=1)
    assert (cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.fixed_point) == (1152, 16, 2, True)
    assert model_config("DiT-S/8").depth == 12 and not model_config("DiT-S/8").fixed_point
    with pytest.raises(ValueError, match="unknown model"):
        model_config("DiT-M/2")
    model = initialize_weights(DiT(tiny_config()))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    assert model(x, t, y).abs().max() == 0  # adaLN-Zero: the output layer starts at zero
    assert model.block_fixed_point_projection_fc1.weight.abs().max() > 0


def test_label_dropout_rate_and_null_class():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(4000, dtype=torch.long)
    u = torch.rand(4000, generator=g)
    dropped = drop_labels(labels, 0.1, null_class=10, uniform=u)
    assert set(dropped.unique().tolist()) == {0, 10}
    assert abs((dropped == 10).float().mean().item() - 0.1) < 0.02
    assert torch.equal(dropped == 10, u < 0.1)
    assert torch.equal(drop_labels(labels, 0.0, 10, u), labels)
