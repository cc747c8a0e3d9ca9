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

Noise: a stochastic step takes the state down to v_d by its deterministic part, then adds
noise of variance v'² − v_d² (v = σ, or τ on flow models). The pixel's deterministic part goes to
v_p(v_d), so ``PixelNoise`` scales the sampler's own noise by sqrt(v_p(v')² − v_p(v_d)²)/
sqrt(v'² − v_d²), with v_d from the sampler's own rule (``noise_rule``); 1 exactly on the
background.

Flow models (x = α x0 + σ ε, α = 1 − σ): samplers with flow forms rescale x by the background's
α between steps, so they run on the τ clock (``tau=True``): the sampler's x is α(s)·(x0 + τ_p ε),
τ = σ/α, the model is fed β·x with β = α(σ_p)/α(s), and D̃ = D + k (α(s) D − x),
k = d(logit σ_p − logit s)/d log s (``terms``; DESIGN.md, "Any sampler by a change of clock").
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

    def __init__(self, sigmas: torch.Tensor, knots: Callable[[int], Tuple[torch.Tensor, torch.Tensor]],
                 tau: bool = False):
        self.tau = tau  # flow models: the sampler's x in VE coordinates τ = σ/(1 − σ) (``terms``)
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

    def lag(self, s: float, i: Optional[int] = None):
        """(lag w, its slope dw/d log s) maps at background sigma s (interval i, from s if not given)."""
        i = self.interval(s) if i is None else i
        w_a, secant, start, end, flat = self._piece(i)
        if flat:
            return w_a, torch.zeros_like(w_a)
        du = self._u(i + 1) - self._u(i)
        t = (math.log(s) - self._u(i)) / du
        tc = min(max(t, 0.0), 1.0)
        edge = start if t < 0 else end  # beyond the knots: straight on with the end slope
        return w_a + du * _rise(tc, secant, start, end) + (t - tc) * du * edge, _slope(tc, secant, start, end)

    def at(self, s: float, i: Optional[int] = None):
        """(σ_p map, r map) at background sigma s, σ clock (in interval i, found from s when not given)."""
        w, slope = self.lag(s, i)
        return torch.as_tensor(s, dtype=w.dtype, device=w.device) * w.exp(), 1 + slope

    def terms(self, s: float):
        """What the sampler's model call at background sigma s needs, per pixel: (σ_p, input scale β
        (None: 1), k, c) with D̃ = D + k (c·D − x) (``tilde``) and the model fed β·x.

        σ clock: the sampler's x is the pixel's latent; k = r − 1, c = 1. τ clock (flow models,
        x = α(σ)·x0 + σ·ε, α = 1 − σ): the sampler's x is α(s)·(x0 + τ_p ε), the pixel's VE state
        scaled by the background's α, so β = α(σ_p)/α(s); the background's flow ODE with D̃
        integrates the pixel's VE ODE dy/dτ_p = (y − D)/τ_p when k = d(logit σ_p − logit s)/d log s
        = r/α(σ_p) − 1/α(s) and c = α(s). On the background σ_p = s, r = 1: β = 1, k = 0 exactly.
        At s = 1 (every pixel pure noise, 0/0) β and k are their limits, taken at 1 − 1e-7."""
        w, slope = self.lag(s)
        s_t = torch.as_tensor(s, dtype=w.dtype, device=w.device)
        sigma = s_t * w.exp()
        if not self.tau:
            return sigma, None, slope, None
        beta, k = self._tau_terms(min(s, 1 - 1e-7))
        return sigma, beta, k, 1 - s_t

    def _tau_terms(self, s: float):
        w, slope = self.lag(s)
        w, slope = w.double(), slope.double()
        a_s = 1 - torch.as_tensor(s, dtype=torch.float64)
        a_p = (1 - s * w.exp()).clamp(min=1e-12)  # a pixel held at σ = 1 while s < 1 cannot be represented
        return a_p / a_s, (1 + slope) / a_p - 1 / a_s

    def v(self, s: float) -> float:
        """The clock's noise coordinate of a background sigma: σ, or τ = σ/(1 − σ)."""
        if not self.tau:
            return s
        return math.inf if s >= 1 else s / (1 - s)

    def sigma_of_v(self, v: float) -> float:
        return v if not self.tau else (1.0 if math.isinf(v) else v / (1 + v))

    def scale(self, sampler_x: torch.Tensor, s: float) -> torch.Tensor:
        """The pixels' latents from the sampler's x at background sigma s (identity on the σ clock)."""
        return sampler_x if not self.tau else sampler_x * self.terms(s)[1].to(sampler_x)

    def unscale(self, latent: torch.Tensor, s: float) -> torch.Tensor:
        """The sampler's x from the pixels' latents at background sigma s."""
        return latent if not self.tau else latent / self.terms(s)[1].to(latent)

    def pixel_v(self, v: float, i: int):
        """(the pixel's coordinate v_p, its lag) where the background's is v (sigma σ(v)), in interval i."""
        if v <= 0:
            zero = torch.zeros_like(self._piece(i)[0])
            return zero, zero
        s = self.sigma_of_v(v)
        w, _ = self.lag(s, i)
        sigma = s * w.double().exp()
        return (sigma if not self.tau else sigma / (1 - sigma).clamp(min=1e-12)), w

    def noise_scale(self, s: float, s_next: float, s_down: float) -> torch.Tensor:
        """Per-pixel factor on noise of std sqrt(v_next² − v_down²) added after the background's
        deterministic step s → s_down (in the clock's coordinate v: σ, or τ on the τ clock), so
        that the pixel's variance reaches v_p(s_next)². 1 exactly where the pixel is on the
        background at both ends."""
        return self.noise_scale_v(s, self.v(s_next), self.v(s_down) if s_down > 0 else 0.0)

    def noise_scale_v(self, s: float, v_next: float, v_down: float) -> torch.Tensor:
        i = self.interval(s)
        w_a = self._piece(i)[0]
        up2 = v_next**2 - v_down**2
        if v_next <= 0 or up2 <= 0 or math.isinf(v_next):
            return torch.ones_like(w_a)
        p_next, w_next = self.pixel_v(v_next, i)
        p_down, w_down = self.pixel_v(v_down, i)
        factor = ((p_next.double()**2 - p_down.double()**2).clamp(min=0) / up2).sqrt()
        return torch.where((w_next == 0) & (w_down == 0), torch.ones_like(factor), factor)


def _rise(t, secant, start, end):
    """Cubic Hermite lag minus w_a, in units of the interval's length in u: exactly 0 when all
    slopes are 0 (a pixel on the background)."""
    return secant * t + (start - secant) * (t - 2 * t**2 + t**3) + (end - secant) * (t**3 - t**2)


def _slope(t, secant, start, end):
    """d lag / d log s of the cubic."""
    return secant + (start - secant) * (1 - 4 * t + 3 * t**2) + (end - secant) * (3 * t**2 - 2 * t)


def ancestral_down(s: float, s_next: float, eta: float) -> float:
    """k-diffusion's get_ancestral_step: the level the deterministic part goes down to. From an
    infinite level (τ at σ = 1) ComfyUI's formula gives σ_up = s_next (nan compares false): 0."""
    if not eta or s_next <= 0:
        return s_next
    if math.isinf(s):
        return 0.0
    up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
    return (s_next**2 - up**2) ** 0.5


def sde_down(s: float, s_next: float, eta: float) -> float:
    """DPM-Solver++ SDE steps: x scales by (s'/s)·e^(−ηh), h = log(s/s'), i.e. down to s'^(1+η)/s^η."""
    if s_next <= 0:
        return s_next
    return s_next * (s_next / s) ** eta


def rf_down(s: float, s_next: float, eta: float) -> float:
    """The RF ancestral samplers' flow sigma of the deterministic part (k-diffusion's *_RF)."""
    return s_next * (1 + (s_next / s - 1) * eta)


def er_sde_down(s: float, s_next: float, scaler: Callable) -> float:
    """ER-SDE's first stage x ← r·x + (1 − r)·D in VE form, r = scaler(v')/scaler(v): down to r·v."""
    if s_next <= 0 or math.isinf(s):
        return 0.0 if s_next > 0 else s_next  # from v = ∞: v/scaler(v) → 0
    ratio = scaler(torch.tensor(s_next, dtype=torch.float64)) / scaler(torch.tensor(s, dtype=torch.float64))
    return s * float(ratio)


# How each ComfyUI sampler's noise is added (k-diffusion's sampling.py), on EDM-type models / on
# flow models (CONST), and the clock a flow model then needs (DESIGN.md, "Noise"). Samplers that
# step flow models with their half-log-SNR or RF forms add noise in VE coordinates τ = σ/(1 − σ);
# those that apply k-diffusion's σ formulas to a flow model's sigmas stay in σ.
_RF = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral")
_TAU_ANCESTRAL = ("dpmpp_sde", "dpmpp_sde_gpu", "euler_ancestral_cfg_pp")
_SIGMA_ANCESTRAL = ("dpmpp_2s_ancestral_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
                    "ddpm", "dpm_fast", "dpm_adaptive")
_SDE = ("dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde",
        "dpmpp_3m_sde_gpu")


def noise_rule(name: str, flow: bool) -> Tuple[Optional[str], bool]:
    """(rule of the sampler's noise, whether it needs the τ clock) for a ComfyUI sampler name;
    rule None: deterministic (or unknown: its own noise, not per pixel)."""
    if name in _RF:
        return ("rf", True) if flow else ("ancestral", False)
    if name in _TAU_ANCESTRAL:
        return "ancestral", flow
    if name in _SIGMA_ANCESTRAL:
        return "ancestral", False
    if name in _SDE:
        return "sde", flow
    if name in ("seeds_2", "seeds_3"):
        return "seeds", flow
    if name in ("sa_solver", "sa_solver_pece"):
        return "sa_solver", flow
    if name == "er_sde":
        return "er_sde", flow
    if name == "lcm":
        return "renoise", flow
    return None, False


def default_er_sde_scaler(v):
    return v * ((v**0.3).exp() + 10.0)


class PixelNoise:
    """The sampler's noise sampler scaled per pixel (``Clock.noise_scale``): each call (a, b) adds
    noise after a deterministic part that the sampler's own ``rule`` sends down to v_d:

    - ancestral: k-diffusion's get_ancestral_step(v_a, v_b, η); rf: the RF samplers' σ_d;
    - sde, sa_solver: v_b·(v_b/v_a)^η (sa_solver: η = tau_func(b)²); er_sde: v_a·scaler(v_b)/scaler(v_a);
    - renoise (lcm): 0;
    - seeds: SEEDS reuses each draw in the next stage, N_k = N_(k−1)·(v_b/v_a)^η + sqrt(1 − (v_b/v_a)^2η)·n_k,
      and the full step from the step's start v_0 is an sde step: the factor on n_k makes each
      pixel's N_k have the variance (v_p(b)² − v_p(d_k)²)/v_b², d_k = v_b·(v_b/v_0)^η.
    """

    def __init__(self, clock: Clock, base: Callable, rule: str, eta: float = 1.0, tau_func: Optional[Callable] = None,
                 scaler: Optional[Callable] = None):
        self.clock, self.base, self.rule, self.eta = clock, base, rule, eta
        self.tau_func, self.scaler = tau_func, scaler or default_er_sde_scaler
        self._knots = set(clock.sigmas)
        self._v0, self._want = None, None

    def __call__(self, a, b):
        n = self.base(a, b)
        return n * self.factor(float(a), float(b)).to(n)

    def factor(self, a: float, b: float) -> torch.Tensor:
        clock, v_a, v_b = self.clock, self.clock.v(a), self.clock.v(b)
        if self.rule == "rf":
            return clock.noise_scale(a, b, rf_down(a, b, self.eta))
        if self.rule == "seeds":
            return self._seeds(a, v_a, v_b)
        if self.rule == "renoise":
            v_d = 0.0
        elif self.rule == "ancestral":
            v_d = ancestral_down(v_a, v_b, self.eta)
        elif self.rule == "er_sde":
            v_d = er_sde_down(v_a, v_b, self.scaler)
        else:
            eta = float(self.tau_func(b)) ** 2 if self.rule == "sa_solver" else self.eta
            v_d = sde_down(v_a, v_b, eta)
        return clock.noise_scale_v(a, v_b, v_d)

    def _seeds(self, a, v_a, v_b):
        clock = self.clock
        if a in self._knots or self._v0 is None:  # a step's first stage starts on a knot
            self._v0, self._want = v_a, None
        i = clock.interval(a)
        v_d = sde_down(self._v0, v_b, self.eta)
        p_b, w_b = clock.pixel_v(v_b, i)
        p_d, w_d = clock.pixel_v(v_d, i)
        want = (p_b.double()**2 - p_d.double()**2).clamp(min=0) / v_b**2
        carry = (v_b / v_a) ** (2 * self.eta)
        prev = torch.zeros_like(want) if self._want is None else self._want
        factor = ((want - prev * carry).clamp(min=0) / (1 - carry)).sqrt()
        on_bg = (w_b == 0) & (w_d == 0) & (self._on_bg if self._want is not None else True)
        self._want, self._on_bg = want, on_bg
        return torch.where(on_bg, torch.ones_like(factor), factor)


class ClockModel:
    """``model(x, sigma_map, **extra) -> D`` as a sampler's ``model(x, s, **extra) -> D̃``.

    ``inner_model`` is what samplers read through ``model.inner_model`` (ComfyUI's samplers look up
    the model sampling there). The CFG++ samplers' post-CFG functions — those in the model options
    a call brings that were not in ``base_options`` — see the unconditional prediction transformed
    the same way as D. On the τ clock the model is fed each pixel's own latent β·x."""

    def __init__(self, model: Callable, clock: Clock, inner_model=None, base_options: Optional[Dict] = None):
        self.model, self.clock, self.inner_model = model, clock, inner_model
        self._base_hooks = tuple((base_options or {}).get("sampler_post_cfg_function") or ())

    def __call__(self, x, s, **extra):
        sigma, beta, k, c = self.clock.terms(float(torch.as_tensor(s).flatten()[0]))
        sigma, k = sigma.to(x.dtype), k.to(x.dtype)
        c = None if c is None else c.to(x.dtype)
        if extra.get("model_options") is not None:
            extra["model_options"] = _transform_post_cfg(extra["model_options"], self._base_hooks, x, k, c)
        return tilde(x, self.model(x if beta is None else x * beta.to(x.dtype), sigma, **extra), k, c)


def tilde(x: torch.Tensor, denoised: torch.Tensor, k: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
    """D̃ = D + k (c·D − x) (c None: 1), so that k = 0 (a pixel on the background) gives D exactly.
    σ clock: k = r − 1, i.e. D̃ = x + r (D − x)."""
    return denoised + k * ((denoised if c is None else c * denoised) - x)


def _transform_post_cfg(options: Dict, base_hooks, x, k, c):
    fns = options.get("sampler_post_cfg_function") or []
    if not fns:
        return options

    def wrap(fn):
        def hook(args):
            args = dict(args)
            if args.get("uncond_denoised") is not None:
                args["uncond_denoised"] = tilde(x, args["uncond_denoised"], k, c)
            return fn(args)

        return hook

    out = dict(options)
    out["sampler_post_cfg_function"] = [fn if any(fn is b for b in base_hooks) else wrap(fn) for fn in fns]
    return out
