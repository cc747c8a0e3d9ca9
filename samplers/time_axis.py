"""The sigma plan's time axis (DESIGN.md, "AsynDM in sigma space"): pure math, no ComfyUI.

Three things are kept apart:

- **σ**, the noise level: what the samplers step and the model's input scaling uses;
- **u**, the plan's *position*: the axis on which prompt items lag (the paper's virtual timesteps
  are mapped onto it). u counts the steps of the model's own grid, 0 (clean end) … ``u_max``,
  and items' positions are rounded to whole steps;
- **the model timestep**, what the model is fed: the model's own ``timestep(σ)``. It is not a
  position: on shifted flow models (SD3, Flux dev, AuraFlow) ``timestep(σ)`` is σ times a
  multiplier while ``sigma(t)`` applies the shift, so the two are not inverses.

An axis is the exact pair ``position(σ)`` / ``sigma(u)``:

- ``TableAxis``: u is the index into the model's ascending table of sigmas, log σ linear
  between entries — ComfyUI's ``ModelSamplingDiscrete.sigma`` formula, so on SD-family models u
  *is* the model's timestep and the paper's configuration is the reference's bit for bit. Every
  sampling without a closed form below uses its table this way (EDM, continuous-V, Cascade, LCM).
- ``FlowAxis`` (``ModelSamplingDiscreteFlow``: SD3/SD3.5, AuraFlow, the ModelSamplingSD3 /
  AuraFlow nodes): σ = s·τ / (1 + (s − 1)·τ), u = 1000·τ.
- ``FluxAxis`` (``ModelSamplingFlux``): σ = e^μ·τ / (e^μ·τ + 1 − τ), u = 1000·τ.

Flow positions count 1000 steps of the unshifted flow time τ whatever the multiplier, so the
plan's rounding grid is one step on every axis.
"""

import math

import torch


class TableAxis:
    """u = continuous index into an ascending sigma table (log σ linear between entries)."""

    def __init__(self, sigmas, log_sigmas=None):
        """``log_sigmas``: the model's own float32 logs, where it keeps them (ComfyUI takes them in
        float64 before rounding), so that sigma(u) is the model's bit for bit."""
        table = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
        logs = table.log() if log_sigmas is None else torch.as_tensor(log_sigmas, dtype=torch.float32).flatten().cpu()
        if len(table) < 2 or not bool((table[1:] >= table[:-1]).all()) or not bool(table[0] > 0):
            raise ValueError("a sigma table must hold at least 2 positive, ascending sigmas")
        keep = torch.cat([torch.tensor([True]), table[1:] > table[:-1]])  # a clamped end's plateau counts once
        table, logs = table[keep], logs[keep]
        self.table, self.log_sigmas = table, logs
        self.u_max = float(len(table) - 1)
        self.steps = len(table)

    def sigma(self, u: torch.Tensor) -> torch.Tensor:
        # ModelSamplingDiscrete.sigma, operation for operation (float32), so that σ(t) is the model's own
        u = torch.as_tensor(u, dtype=torch.float32).clamp(0, self.u_max)
        low, high, w = u.floor().long(), u.ceil().long(), u.frac()
        ls = self.log_sigmas.to(u.device)
        return ((1 - w) * ls[low] + w * ls[high]).exp()

    def position(self, sigma: torch.Tensor) -> torch.Tensor:
        """σ ≤ 0 is position 0 (the clean end); σ outside the table is clamped to its ends."""
        s = torch.as_tensor(sigma, dtype=torch.float32)
        ls = self.log_sigmas.double().to(s.device)
        log_s = s.double().clamp(min=float(self.log_sigmas[0].exp())).log().clamp(float(ls[0]), float(ls[-1]))
        j = (torch.searchsorted(ls, log_s.contiguous(), right=True) - 1).clamp(0, len(ls) - 2)
        u = j + (log_s - ls[j]) / (ls[j + 1] - ls[j])
        # a sigma that is the table's entry k or σ(k) is exactly position k (float32 log/exp
        # round-off would otherwise put it a hair off, and the paper's timestep maps must be exact)
        k = u.round()
        exact = (self.sigma(k.float()) == s) | (self.table.to(s.device)[k.long()] == s)
        u = torch.where(exact, k, u)
        return torch.where(s > 0, u, torch.zeros_like(u)).float()


class _FlowTime:
    """Axes on 1000 steps of a flow time τ ∈ [0, 1], σ = shifted(τ)."""

    u_max = 1000.0
    steps = 1000

    def sigma(self, u: torch.Tensor) -> torch.Tensor:
        u = torch.as_tensor(u)
        tau = u.double().clamp(0, self.u_max) / self.u_max
        return self.shifted(tau).to(u.dtype if u.is_floating_point() else torch.float32)

    def position(self, sigma: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma)
        tau = self.unshifted(s.double().clamp(0, 1))
        return (tau * self.u_max).to(s.dtype if s.is_floating_point() else torch.float32)


class FlowAxis(_FlowTime):
    """ComfyUI's time_snr_shift: σ = s·τ / (1 + (s − 1)·τ)."""

    def __init__(self, shift: float):
        if not shift > 0:
            raise ValueError(f"a flow model's shift must be above 0, got {shift}: set the ModelSampling node's "
                             "shift to a positive value")
        self.shift = float(shift)

    def shifted(self, tau):
        return self.shift * tau / (1 + (self.shift - 1) * tau)

    def unshifted(self, sigma):
        return sigma / (self.shift - (self.shift - 1) * sigma)


class FluxAxis(_FlowTime):
    """ComfyUI's flux_time_shift(μ, 1, τ) = e^μ / (e^μ + 1/τ − 1), written without 1/τ."""

    def __init__(self, mu: float):
        self.mu = float(mu)
        self._a = math.exp(self.mu)

    def shifted(self, tau):
        return self._a * tau / (self._a * tau + 1 - tau)

    def unshifted(self, sigma):
        return sigma / (sigma + self._a * (1 - sigma))
