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

``PaperCurves`` steps a whole run's per-pixel states along these curves.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence

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


@dataclass(frozen=True)
class PaperCurves:
    """Per-pixel timestep state of an asynchronous run, in the paper's virtual timesteps: every
    pixel starts at ``num_train_timesteps + steps_offset``; each step moves the background (pixels
    in no mask) along the linear curve and each prompt item's pixels along its concave curve with
    its own strength k. Masks are (B, N, H, W) 0/1 tensors with at most one item per pixel
    (masks.resolve_priority)."""

    num_steps: int
    num_train_timesteps: int = 1000
    steps_offset: int = 1
    curve: str = "bin"

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {self.num_steps}")
        if self.curve not in CURVE_TYPES:
            raise ValueError(f"unknown curve type {self.curve!r}: use one of {', '.join(CURVE_TYPES)}")

    @property
    def start_value(self) -> int:
        return self.num_train_timesteps + self.steps_offset

    def initial_state(self, batch: int, height: int, width: int, device=None) -> torch.Tensor:
        start = torch.tensor(float(self.start_value), dtype=torch.float32, device=device)
        return start[None, None, None].expand(batch, height, width)

    def step(
        self,
        state: torch.Tensor,
        rest_step: int,
        masks: Optional[torch.Tensor] = None,
        ks: Sequence[float] = (),
    ) -> torch.Tensor:
        """Next state: background on the linear curve, item j's pixels on its concave curve."""
        linear = linear_prev(state, rest_step, self.steps_offset)
        if masks is None or masks.shape[1] == 0:
            return linear
        if masks.shape[1] != len(ks):
            raise ValueError(f"{masks.shape[1]} masks but {len(ks)} strengths k")
        background = 1 - (masks > 0.5).any(dim=1).float()
        concave = torch.stack(
            [
                masks[:, j]
                * concave_prev(
                    state,
                    rest_step,
                    float(k),
                    curve=self.curve,
                    target=self.steps_offset,
                    num_steps=self.num_steps,
                    num_train_timesteps=self.num_train_timesteps,
                )
                for j, k in enumerate(ks)
            ],
            dim=1,
        ).sum(dim=1)
        return background * linear + concave

    def first_state(self, batch, height, width, masks=None, ks=(), device=None) -> torch.Tensor:
        """The state of the first model evaluation (one step away from the start)."""
        return self.step(self.initial_state(batch, height, width, device), self.num_steps, masks, ks)

    def plan(self, masks, ks, batch, height, width, device=None) -> torch.Tensor:
        """All states of a run with fixed masks: (num_steps + 1, B, H, W), the last one all 0."""
        states = [self.first_state(batch, height, width, masks, ks, device)]
        for i in range(self.num_steps):
            states.append(self.step(states[-1], self.num_steps - i - 1, masks, ks))
        return torch.stack(states)


def timesteps_of(state: torch.Tensor) -> torch.Tensor:
    """The integer timesteps a state is evaluated at."""
    return state.round().long()
