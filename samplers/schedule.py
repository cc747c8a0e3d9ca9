"""Per-pixel timestep state of an asynchronous run.

Every pixel starts at ``num_train_timesteps + steps_offset``; each step moves the background
(pixels in no mask) along the linear curve and each prompt item's pixels along its concave
curve with its own strength k. Masks are (B, N, H, W) 0/1 tensors with at most one item per
pixel (see masks.resolve_priority).
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .curves import CURVE_TYPES, concave_prev, linear_prev


@dataclass(frozen=True)
class AsyncSchedule:
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
