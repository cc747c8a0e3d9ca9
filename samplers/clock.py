"""Any sampler, per pixel, by a change of clock (DESIGN.md, "Any sampler by a change of clock").

The sampler steps the background's sigma s through the run's sigmas S_0 > ... > S_N. Each pixel
p follows its own sigma σ_p = f_p(s) through the plan's knot maps σ_p,i = f_p(S_i). Its
probability-flow ODE dx/dσ_p = (x − D)/σ_p, written in the background's clock, is

    dx/ds = (x − D̃)/s,   D̃ = x + r (D − x),   r = d log σ_p / d log s,

the background's own ODE with D̃ in place of D. So a model that evaluates the denoiser at
σ_p = f_p(s) and returns D̃ lets an unmodified sampler integrate every pixel's own ODE.

f_p between knots: the pixel's lag w = log σ_p − log s, a cubic in log s on each interval
[S_{i+1}, S_i] through the knots' lags, whose slope (r − 1) is continuous at the knots: a sampler
evaluating at a knot may be finishing the interval above (heun's end point) or starting the one
below (the next step), and cannot say which, so r must not depend on it; and a smooth r keeps
multistep samplers at their order where a pixel's rate changes from step to step. The slope at
a knot is the one of the parabola through the last three knots' lags (only knots already known:
a dynamic plan decides the next knot one step ahead); where the cubic would let σ_p rise or pass
below the background the interval is linear in log s (r constant). Every quantity is computed
from the lag, so a pixel on the background (lag 0) gets σ_p = s and r = 1 exactly: D̃ = D bit for
bit. A pixel held at one sigma has r = 0 (D̃ = x: it does not move). Into a last sigma of 0 the
lag stays at the last knot's, σ_p = σ_p,N−1·s/S_{N−1}: r = 1 and the final latent is the
denoised one.

Noise: ancestral/SDE samplers add noise sized for the background's step s → s' (deterministic
part down to s_d, then noise of variance s'² − s_d²). The pixel's deterministic part goes down
to σ_p(s_d), so it needs noise of variance σ_p(s')² − σ_p(s_d)² to sit at its own σ_p(s');
``noise_scale`` is that per-pixel factor on the sampler's noise (s_d from k-diffusion's
get_ancestral_step for ancestral steps, s'^(1+η)/s^η for DPM-Solver++'s SDE steps). Where the lag
is linear in log s this is the pixel's own ancestral / SDE step with the same η; background
pixels get factor 1 exactly.
"""

import bisect
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch


class Clock:
    """Each pixel's sigma as a function of the background's, from a plan's knot maps.

    ``knots(i)`` returns step i's maps (σ_p,i, σ_p,i+1), shape (B, 1, H, W); it is called in
    order, once per interval, when a sampler first evaluates inside that interval (a dynamic plan
    decides σ_p,i+1 only then).
    """

    def __init__(self, sigmas: torch.Tensor, knots: Callable[[int], Tuple[torch.Tensor, torch.Tensor]]):
        self.sigmas = [float(s) for s in torch.as_tensor(sigmas).flatten()]
        if len(self.sigmas) < 2:
            raise ValueError("a clock needs at least two sigmas (one step)")
        self._neg = [-s for s in self.sigmas]  # ascending, for bisect
        self._knots = knots
        self._tensor = torch.as_tensor(sigmas).flatten()
        self._pieces: List[tuple] = []  # per interval: (w_a, secant, slope at S_i, slope at S_i+1)
        self._secants: List[torch.Tensor] = []
        self.steps = len(self.sigmas) - 1

    def interval(self, s: float) -> int:
        """The interval [S_{i+1}, S_i] holding s; a knot S_i belongs to interval i (the lag's
        slope is continuous there, so the one above would give the same σ_p and r)."""
        i = bisect.bisect_left(self._neg, -s)  # first index with S_i <= s
        if i < len(self.sigmas) and self.sigmas[i] == s:
            return min(i, self.steps - 1)
        return min(max(i - 1, 0), self.steps - 1)

    def _u(self, j):
        return math.log(self.sigmas[j])

    def _piece(self, i: int):
        while len(self._pieces) <= i:
            self._pieces.append(self._build(len(self._pieces)))
        return self._pieces[i]

    def _build(self, j: int):
        """Interval j's lag: a cubic in u = log s through the knots' lags, its slope at S_j the
        previous interval's end slope (r continuous), at S_j+1 the slope of the parabola through
        the last three knots; linear where that would let σ_p rise or pass below the background."""
        a, b = self._knots(j)
        s_a, s_b = self._tensor[j].to(a), self._tensor[j + 1].to(b)
        w_a = a.log() - s_a.log()
        zero = torch.zeros_like(w_a)
        if self.sigmas[j + 1] <= 0 or self.sigmas[j] == self.sigmas[j + 1]:
            self._secants.append(zero)  # into σ = 0 (or a repeated sigma): the lag stays
            return w_a, zero, zero, zero, True
        w_b = b.log() - s_b.log()
        secant = (w_b - w_a) / (s_b.log() - s_a.log())
        start = self._pieces[j - 1][3] if j > 0 else secant
        if j + 2 <= self.steps and self.sigmas[j + 2] <= 0:
            end = zero  # the last interval keeps its lag (r = 1): meet it with slope 0
        elif j > 0 and self.sigmas[j - 1] != self.sigmas[j]:
            h0, h1 = self._u(j) - self._u(j - 1), self._u(j + 1) - self._u(j)
            end = secant + (secant - self._secants[j - 1]) * h1 / (h0 + h1)
        else:
            end = secant
        self._secants.append(secant)
        # keep the cubic only where r >= 0 and the lag >= 0 all along the interval
        du = self._u(j + 1) - self._u(j)
        t = torch.linspace(0, 1, 9, dtype=w_a.dtype, device=w_a.device).view(-1, *([1] * w_a.ndim))
        ok = ((1 + _slope(t, secant, start, end)) >= 0).all(0) & ((w_a + du * _rise(t, secant, start, end)) >= 0).all(0)
        start, end = torch.where(ok, start, secant), torch.where(ok, end, secant)
        return w_a, secant, start, end, False

    def at(self, s: float, i: Optional[int] = None):
        """(σ_p map, r map) at background sigma s (in interval i, found from s when not given)."""
        i = self.interval(s) if i is None else i
        w_a, secant, start, end, flat = self._piece(i)
        s_t = torch.as_tensor(s, dtype=w_a.dtype, device=w_a.device)
        if flat:
            return s_t * w_a.exp(), torch.ones_like(w_a)
        du = self._u(i + 1) - self._u(i)
        t = (math.log(s) - self._u(i)) / du
        tc = min(max(t, 0.0), 1.0)
        edge = start if t < 0 else end  # beyond the knots: straight on with the end slope
        w = w_a + du * _rise(tc, secant, start, end) + (t - tc) * du * edge
        slope = _slope(tc, secant, start, end)
        return s_t * w.exp(), 1 + slope

    def noise_scale(self, s: float, s_next: float, s_down: float) -> torch.Tensor:
        """Per-pixel factor on noise of std sqrt(s_next² − s_down²) added after the background's
        deterministic step s → s_down, so that the pixel's variance reaches σ_p(s_next)²."""
        i = self.interval(s)
        w_a = self._piece(i)[0]
        up2 = s_next**2 - s_down**2
        if s_next <= 0 or up2 <= 0:
            return torch.ones_like(w_a)
        sig_next, _ = self.at(s_next, i)
        sig_down = self.at(s_down, i)[0] if s_down > 0 else torch.zeros_like(sig_next)
        return ((sig_next**2 - sig_down**2).clamp(min=0) / up2).sqrt()


def _rise(t, secant, start, end):
    """Cubic Hermite lag minus w_a, in units of the interval's length in u: exactly 0 when all
    slopes are 0 (a pixel on the background)."""
    return secant * t + (start - secant) * (t - 2 * t**2 + t**3) + (end - secant) * (t**3 - t**2)


def _slope(t, secant, start, end):
    """d lag / d log s of the cubic."""
    return secant + (start - secant) * (1 - 4 * t + 3 * t**2) + (end - secant) * (3 * t**2 - 2 * t)


def ancestral_down(s: float, s_next: float, eta: float) -> float:
    """k-diffusion's get_ancestral_step: the sigma the deterministic part goes down to."""
    if not eta or s_next <= 0:
        return s_next
    up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
    return (s_next**2 - up**2) ** 0.5


def sde_down(s: float, s_next: float, eta: float) -> float:
    """DPM-Solver++ SDE steps: x scales by (s'/s)·e^(−ηh), h = log(s/s'), i.e. down to s'^(1+η)/s^η."""
    if s_next <= 0:
        return s_next
    return s_next * (s_next / s) ** eta


NOISE_DOWN = {"ancestral": ancestral_down, "sde": sde_down}


class ClockModel:
    """``model(x, sigma_map, **extra) -> D`` as a sampler's ``model(x, s, **extra) -> D̃``.

    ``inner_model`` is what samplers read through ``model.inner_model`` (ComfyUI's samplers look up
    the model sampling there). The CFG++ samplers' post-CFG functions — those in the model options
    a call brings that were not in ``base_options`` — see the unconditional prediction transformed
    the same way as D."""

    def __init__(self, model: Callable, clock: Clock, inner_model=None, base_options: Optional[Dict] = None):
        self.model, self.clock, self.inner_model = model, clock, inner_model
        self._base_hooks = tuple((base_options or {}).get("sampler_post_cfg_function") or ())

    def __call__(self, x, s, **extra):
        sigma, r = self.clock.at(float(torch.as_tensor(s).flatten()[0]))
        sigma, r = sigma.to(x.dtype), r.to(x.dtype)
        if extra.get("model_options") is not None:
            extra["model_options"] = _transform_post_cfg(extra["model_options"], self._base_hooks, x, r)
        return tilde(x, self.model(x, sigma, **extra), r)


def tilde(x: torch.Tensor, denoised: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """D̃ = x + r (D − x), written so that r = 1 gives D exactly."""
    return denoised + (r - 1) * (denoised - x)


def _transform_post_cfg(options: Dict, base_hooks, x, r):
    fns = options.get("sampler_post_cfg_function") or []
    if not fns:
        return options

    def wrap(fn):
        def hook(args):
            args = dict(args)
            if args.get("uncond_denoised") is not None:
                args["uncond_denoised"] = tilde(x, args["uncond_denoised"], r)
            return fn(args)

        return hook

    out = dict(options)
    out["sampler_post_cfg_function"] = [fn if any(fn is b for b in base_hooks) else wrap(fn) for fn in fns]
    return out
