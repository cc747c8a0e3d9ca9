"""Curves and the paper's per-pixel states (DESIGN.md invariant 3), checked against hand-derived values."""

import math

import pytest
import torch

from asyndm_fpdm.samplers.curves import concave_prev, linear_prev
from asyndm_fpdm.samplers.curves import PaperCurves, timesteps_of
from numeric import EPS32

# The curves run in float32 (as the reference does) on states near 1000: a handful of roundings,
# each half an ulp of the state.
CURVE_ROUNDING = 4 * EPS32

S = torch.tensor([1001.0])


def ddim_leading_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list:
    """Oracle: diffusers' DDIM 'leading' spacing, as the reference's vanilla run uses it, ending at 0."""
    ratio = num_train_timesteps // num_steps
    ts = [i * ratio + steps_offset for i in range(num_steps)][::-1]
    return ts + [0]


def test_linear_curve_is_ddim_leading_plus_offset():
    for steps in (10, 20, 25, 50):
        plan = PaperCurves(steps).plan(None, (), 1, 1, 1)
        assert timesteps_of(plan).flatten().tolist() == ddim_leading_timesteps(steps)
    assert ddim_leading_timesteps(50)[:3] == [981, 961, 941]


def test_linear_prev_hand_values():
    assert linear_prev(S, 50, 1).item() == pytest.approx(981.0)
    assert linear_prev(torch.tensor([21.0]), 1, 1).item() == pytest.approx(1.0)
    assert linear_prev(torch.tensor([21.0]), 0, 1).item() == 0.0


def test_bin_is_the_parabola_through_state_and_target():
    # y(x) = s + (g - s - kk r^2)/r x + kk x^2 with kk = -k T / N^2; next state = y(1)
    s, g, r, k, n, big_t = 1001.0, 1.0, 50, 0.7, 50, 1000
    kk = -k * big_t / n**2
    expected = s + (g - s - kk * r**2) / r + kk
    assert expected == pytest.approx(994.72)
    got = concave_prev(S, r, k, curve="bin", target=g, num_steps=n, num_train_timesteps=big_t)
    assert got.item() == pytest.approx(expected, rel=CURVE_ROUNDING)


def test_lin_is_the_lower_of_two_lines():
    # early slope -(1-k)T/N, late slope -(1+k)T/N through the target in r steps
    got = concave_prev(S, 50, 0.7, curve="lin", target=1, num_steps=50)
    assert got.item() == pytest.approx(1001 - 6)
    late = concave_prev(torch.tensor([100.0]), 3, 0.7, curve="lin", target=1, num_steps=50)
    assert late.item() == pytest.approx(1 + 34 * 3 - 34)


def test_exp_is_the_exponential_through_state_and_target():
    # y(x) = A e^{x/N} + b x + C, A = (g - s - b r)/(e^{r/N} - 1), b = -(1-k)T/N; next = y(1)
    s, g, r, k, n = 1001.0, 1.0, 50, 0.7, 50
    b = -(1 - k) * 1000 / n
    a_coef = (g - s - b * r) / (math.exp(r / n) - 1)
    expected = s + a_coef * (math.exp(1 / n) - 1) + b
    got = concave_prev(S, r, k, curve="exp", target=g, num_steps=n)
    assert got.item() == pytest.approx(expected, rel=CURVE_ROUNDING)


def test_k_zero_is_linear_and_unknown_curve_is_refused():
    for curve in ("bin", "lin", "exp"):
        assert torch.equal(concave_prev(S, 7, 0.0, curve=curve, target=1), linear_prev(S, 7, 1))
    with pytest.raises(ValueError, match="bin, lin, exp"):
        concave_prev(S, 7, 0.5, curve="cubic")
    with pytest.raises(ValueError, match="bin, lin, exp"):
        PaperCurves(10, curve="cubic")


@pytest.mark.parametrize("curve", ["bin", "lin", "exp"])
@pytest.mark.parametrize("steps", [5, 20, 50])
@pytest.mark.parametrize("k", [0.1, 0.5, 0.7, 1.0])
def test_invariant3_start_end_monotone_and_items_lag(curve, steps, k):
    curves = PaperCurves(steps, curve=curve)
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :2] = 1  # item 0 strength k on the top half
    masks[0, 1, 2:, :2] = 1  # item 1 strength k/2 bottom-left; the rest is background
    plan = curves.plan(masks, [k, k / 2], 1, 4, 4)
    t = timesteps_of(plan)
    assert curves.initial_state(1, 4, 4).eq(1001).all()
    assert (t[-1] == 0).all(), "every pixel reaches the end of the schedule"
    assert (t[1:] <= t[:-1]).all(), "a pixel's timestep never increases"
    bg_max = t[:, 0, 2:, 2:].amax(dim=(-1, -2)).view(-1, 1, 1)
    assert (t[:, 0, :2] >= bg_max).all(), "a prompt-region pixel is never ahead of the background"
    assert (t[:, 0, 2:, :2] >= bg_max).all()
    assert (t[:-1, 0, 0, 0] > t[:-1, 0, 3, 3]).any(), "an item pixel lags somewhere"
