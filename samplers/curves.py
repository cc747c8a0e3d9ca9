"""Timestep curves of AsynDM: where a pixel's timestep goes in its next step.

A pixel's state is a float timestep. Each function maps the current state and the number of
steps still to go (``rest_step``) to the next state; ``rest_step == 0`` lands on timestep 0.
The formulas follow the AsynDM paper's reference sampler term by term, in float32, so the
rounded timesteps match it exactly:

- linear: the straight line from the state to ``target`` (``steps_offset``); started from
  ``num_train_timesteps + steps_offset`` it gives DDIM's "leading + offset" timesteps
  (981, 961, ..., 1 for 50 steps).
- concave curves make a pixel lag behind that line (denoised later), more for larger k:
  ``bin`` a parabola, ``lin`` two line segments, ``exp`` an exponential plus a line.
k = 0 means no lag: the linear curve.
"""

import math

import torch

CURVE_TYPES = ("bin", "lin", "exp")


def linear_prev(state: torch.Tensor, rest_step: int, target: float = 1.0) -> torch.Tensor:
    if rest_step == 0:
        return torch.zeros_like(state)
    target_t = torch.tensor(target, dtype=state.dtype, device=state.device)
    return state * (1 - 1 / rest_step) + target_t / rest_step


def concave_prev(
    state: torch.Tensor,
    rest_step: int,
    k: float,
    *,
    curve: str = "bin",
    target: float = 1.0,
    num_steps: int = 50,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    if curve not in CURVE_TYPES:
        raise ValueError(f"unknown curve type {curve!r}: use one of {', '.join(CURVE_TYPES)}")
    if rest_step == 0:
        return torch.zeros_like(state)
    if k == 0:
        return linear_prev(state, rest_step, target)
    x_scale, y_scale = num_steps, num_train_timesteps
    if curve == "bin":
        # parabola y = kk*(x - t0)^2 + y0 through the state now and the target in rest_step steps
        kk = -k * (y_scale / (x_scale * x_scale))
        target_t = torch.tensor(target, dtype=state.dtype, device=state.device)
        t0 = (kk * rest_step**2 - (target_t - state)) / (2 * kk * rest_step)
        y0 = state - kk * t0**2
        return kk * (1 - t0) ** 2 + y0
    if curve == "lin":
        # a shallow slope first, a steep one that still meets the target, whichever is lower
        slope_early = -(1 - k) * y_scale / x_scale
        slope_late = -(1 + k) * y_scale / x_scale
        late_line_now = target - slope_late * rest_step
        return (slope_early + state).clamp(max=slope_late + late_line_now)
    # exp: y = a*e^(x/num_steps) + b*x + c through the state and the target
    lamb = 1 / x_scale
    a = -k * y_scale / (math.e - 1)
    b = -(1 - k) * y_scale / x_scale
    exp_neg_lamb_x0 = (state - target + b * rest_step) / (a * (1 - math.e ** (lamb * rest_step)))
    return a * (math.e**lamb - 1) * exp_neg_lamb_x0 + b + state
