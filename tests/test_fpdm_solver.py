"""Fixed-point solver: allocation budgets, reuse/reset semantics, tolerance, Anderson."""

import pytest
import torch

from asyndm_fpdm.fpdm.solver import (FixedPointRun, SolverSettings, allocate_iterations, make_solver,
                                     reference_budget_list)
from fpdm_tiny import tiny_model
from numeric import FAR_ABOVE_ROUNDOFF, ROUNDOFF_ONE_PASS, assert_close, assert_differs


@pytest.mark.parametrize("kind", ["fixed", "increasing", "decreasing"])
@pytest.mark.parametrize("iters,steps", [(26, 20), (4, 10), (7, 13), (12, 250), (3, 1)])
def test_allocation_never_exceeds_budget_one_entry_per_step(kind, iters, steps):
    alloc = allocate_iterations(iters, steps, kind)
    assert len(alloc) == steps
    assert sum(alloc) <= iters * steps
    assert sum(alloc) >= iters * steps - steps  # rounding loses at most one per step
    assert min(alloc) >= 1


def test_allocation_shapes_and_reference_rounding():
    inc = allocate_iterations(26, 20, "increasing")
    dec = allocate_iterations(26, 20, "decreasing")
    assert inc[0] > inc[-1] and dec[0] < dec[-1]  # "increasing" in t: most at the noisy start
    assert allocate_iterations(5, 8, "fixed") == [5] * 8
    # the reference's list is read from its end; values printed by the reference LinearController
    assert reference_budget_list(40, 10, "increasing") == [3, 3, 4, 4, 4, 4, 4, 4, 5, 5]
    assert reference_budget_list(37, 7, "increasing") == [4, 4, 5, 5, 6, 6, 7]
    assert reference_budget_list(520, 20, "decreasing") == [39, 38, 36, 35, 34, 32, 31, 30, 28, 27, 25, 24,
                                                            22, 21, 20, 18, 17, 16, 14, 13]
    assert inc == list(reversed(reference_budget_list(520, 20, "increasing")))


def test_reference_double_count_spends_about_twice():
    once = allocate_iterations(4, 10, "increasing")
    twice = allocate_iterations(4, 10, "increasing", reference_double_count=True)
    assert sum(twice) > 1.8 * sum(once)
    lst = reference_budget_list(40, 10, "increasing")
    assert twice[0] == lst[-1] + lst[-2]


def _within_contraction_bound(z, star, lipschitz, tolerance):
    """A solver output z = f(z_k) whose relative residual ||f(z_k) - z_k|| / ||f(z_k)|| is below
    ``tolerance`` lies within L/(1-L) · tolerance · ||z|| of the fixed point (per sample, L2 norm),
    since ||f(z_k) - z*|| <= L ||z_k - z*|| <= L/(1-L) ||f(z_k) - z_k||."""
    err = (z - star).flatten(1).norm(dim=1)
    bound = lipschitz / (1 - lipschitz) * tolerance * z.flatten(1).norm(dim=1) * (1 + ROUNDOFF_ONE_PASS)
    assert (err <= bound).all(), (err.tolist(), bound.tolist())


def _contractive_map(n=3, d=6, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, d, generator=g)
    A = scale * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    b = torch.randn(n, d, 1, generator=g)
    star = torch.linalg.solve(torch.eye(d) - A, b)  # z* = A z* + b

    def f(z, index=None):
        Ai, bi = (A, b) if index is None else (A[index], b[index])
        return Ai @ z + bi

    return f, star, torch.zeros(n, d, 1)


def test_plain_iterations_count_and_tolerance_stops_early():
    f, star, z0 = _contractive_map()
    z, info = make_solver(5)(f, z0)
    assert info["iterations"] == [5, 5, 5] and info["evaluations"] == 15
    z, info = make_solver(200, tolerance=1e-5)(f, z0)
    assert all(i < 200 for i in info["iterations"]) and max(info["residual"]) < 1e-5
    assert info["evaluations"] == sum(info["iterations"])
    _within_contraction_bound(z, star, 0.5, 1e-5)


def test_tolerance_is_per_sample_so_batch_mates_do_not_matter():
    f, star, z0 = _contractive_map(n=4, scale=0.9, seed=1)
    z_all, info = make_solver(100, tolerance=1e-3)(f, z0)

    def f_one(z, index=None):
        return f(z, torch.tensor([2]))

    z_one, info_one = make_solver(100, tolerance=1e-3)(f_one, z0[2:3])
    assert info_one["iterations"][0] == info["iterations"][2]
    assert_close(z_one[0], z_all[2], ROUNDOFF_ONE_PASS, "sample 2 solved alone vs in a batch of 4")


def test_anderson_converges_in_fewer_evaluations():
    f, star, z0 = _contractive_map(scale=0.95, seed=2)
    _, plain = make_solver(300, tolerance=1e-3)(f, z0)
    z, anderson = make_solver(300, tolerance=1e-3, anderson=5)(f, z0)
    assert anderson["evaluations"] < plain["evaluations"]
    _within_contraction_bound(z, star, 0.95, 1e-3)


def test_reuse_state_per_half_and_reset_per_run():
    model = tiny_model()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500, 500, 500])
    y = torch.tensor([1, 2, 10, 10])
    xin = torch.cat([x, x])
    run = FixedPointRun(SolverSettings(iterations=2, reuse=True), steps=3, default_iterations=3)
    assert run.state == {} and run.init_for([0, 1]) == [None, None]

    out1 = run.evaluate(model, xin, t, y, 0, halves=[0, 1])
    assert set(run.state) == {0, 1}
    assert not torch.equal(run.state[0], run.state[1])  # halves keep their own solution
    cond_solution = run.state[0].clone()

    # Evaluate the halves in the opposite order: each still gets its own previous solution.
    init = run.init_for([1, 0])
    assert torch.equal(init[1], cond_solution) and not torch.equal(init[0], cond_solution)
    run.evaluate(model, torch.cat([x, x]), t, torch.cat([y[2:], y[:2]]), 1, halves=[1, 0])
    assert not torch.equal(run.state[0], cond_solution)  # the next step's solution replaced it

    # A new run starts from scratch: same result as the very first call.
    fresh = FixedPointRun(SolverSettings(iterations=2, reuse=True), steps=3, default_iterations=3)
    assert fresh.state == {}
    assert torch.equal(fresh.evaluate(model, xin, t, y, 0, halves=[0, 1]), out1)


def test_reuse_changes_the_second_step_only():
    model = tiny_model()
    x, t, y = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300]), torch.tensor([4])
    outs = {}
    for reuse in (False, True):
        run = FixedPointRun(SolverSettings(iterations=2, reuse=reuse), steps=2, default_iterations=2)
        outs[reuse] = [run.evaluate(model, x, t, y, k) for k in range(2)]
    assert torch.equal(outs[False][0], outs[True][0])
    assert_differs(outs[True][1], outs[False][1], FAR_ABOVE_ROUNDOFF, "second step with and without reuse")


def test_run_counts_block_evaluations_from_the_schedule():
    model = tiny_model()
    run = FixedPointRun(SolverSettings(iterations=3, allocation="increasing"), steps=4, default_iterations=9)
    x, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    for k in range(4):
        run.evaluate(model, x, torch.tensor([999 - k * 250] * 2), y, k)
    assert run.evaluations == 2 * sum(run.allocated) and sum(run.allocated) <= 12
    assert [u[0] for u in run.iterations_used] == run.allocated
