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

Noise: a stochastic step takes the state down to a level d by its deterministic part, then adds
noise up to s'. The pixel's deterministic part goes to σ_p(d), so ``PixelNoise`` scales the
sampler's own noise by sqrt(the pixel's variance / the background's) (``Clock.variance``), with d
from the sampler's own rule (``NoiseRule``, ``noise_rule``); 1 exactly on the background.

Flow models (x = α x0 + σ ε, α = 1 − σ): samplers with flow forms rescale x by the background's
α'/α_d between steps, so they run on the ``FlowClock``: the sampler's x at a pixel is κ·x_p with
κ = α(s)/max(α(σ_p), q·α(s)) — the pixel's VE state x0 + τ_p ε (τ = σ/α) scaled by the
background's α wherever the pixel is not near pure noise (DESIGN.md, "Any sampler by a change of
clock").
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

    tau = False  # the noise rules' coordinate v is σ (FlowClock: τ)

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
        """What the sampler's model call at background sigma s needs, per pixel: (σ_p, input scale
        (None: 1), a, b) with D̃ = a·D + b·x (``tilde``) and the model fed the scaled x. Here the
        sampler's x is the pixel's latent, a = r, b = 1 − r: 1 and 0 exactly on the background."""
        w, slope = self.lag(s)
        r = 1 + slope
        return torch.as_tensor(s, dtype=w.dtype, device=w.device) * w.exp(), None, r, 1 - r

    def v(self, s: float) -> float:
        """The noise coordinate of a background sigma (σ here, τ on the FlowClock)."""
        return s

    def sigma_of_v(self, v: float) -> float:
        return v

    def scale(self, sampler_x: torch.Tensor, s: float) -> torch.Tensor:
        """The pixels' latents from the sampler's x at background sigma s (identity here)."""
        return sampler_x

    def unscale(self, latent: torch.Tensor, s: float) -> torch.Tensor:
        """The sampler's x from the pixels' latents at background sigma s (identity here)."""
        return latent

    def variance(self, i: int, b: float, d: float):
        """(pixel's, background's) variance of the noise that tops the step's deterministic part
        (in interval i, down to d) up to each one's own sigma at b; and where the pixel is on the
        background at both."""
        w_b, _ = self.lag(b, i)
        sig_b = b * w_b.double().exp()
        if d > 0:
            w_d, _ = self.lag(d, i)
            sig_d = d * w_d.double().exp()
        else:
            w_d, sig_d = torch.zeros_like(w_b), torch.zeros_like(sig_b)
        return (sig_b**2 - sig_d**2).clamp(min=0), b**2 - d**2, (w_b == 0) & (w_d == 0)


class FlowClock(Clock):
    """The clock for flow models (x = α x0 + σ ε, α = 1 − σ) and samplers whose noise steps
    rescale x by the background's α'/α_d (their flow forms; DESIGN.md, "Noise").

    Pixels follow the σ clock's paths σ_p(s). The sampler's x at a pixel is κ·x_p, x_p the pixel's
    latent and κ = α(s)/α̃_p, α̃_p = max(α(σ_p), q·α(s)): where α̃_p = α(σ_p) the sampler's x is
    α(s)·(x0 + τ_p ε), τ = σ/α, and the background's rescale keeps every pixel's state exactly;
    pixels near pure noise (α(σ_p) < q·α(s), held at σ = 1 included) keep κ = 1/q, so their
    ODE stays as mild as on the σ clock (with κ = α(s)/α(σ_p) alone it is stiff there: their τ
    falls many times faster than the background's), at the price of a signal off by the ratio of
    the two α rescales while they are that noisy. The model is fed x/κ, and
    D̃ = κ r D + (1 − r − s·d log κ/ds) x makes the background's ODE the pixel's. On the
    background κ = 1, D̃ = D exactly. At s = 1 (0/0) the terms are their limits, taken at 1 − 1e-7."""

    tau = True

    def __init__(self, sigmas, knots, q: float = 0.5):
        super().__init__(sigmas, knots)
        self.q = q

    def v(self, s: float) -> float:
        return math.inf if s >= 1 else s / (1 - s)

    def sigma_of_v(self, v: float) -> float:
        return 1.0 if math.isinf(v) else v / (1 + v)

    def _kappa(self, s: float, i: Optional[int] = None):
        """(σ_p, r, κ, d log κ/ds, background mask) at s (double)."""
        s = min(s, 1 - 1e-7)
        w, slope = self.lag(s, i)
        w, r = w.double(), 1 + slope.double()
        sigma = s * w.exp()
        a_s, a_p = 1 - s, 1 - sigma
        free = a_p >= self.q * a_s
        a_t = torch.where(free, a_p, torch.full_like(a_p, self.q * a_s))
        da_t = torch.where(free, -r * sigma / s, torch.full_like(a_p, -self.q))
        kappa = a_s / a_t
        dlog = -1 / a_s - da_t / a_t
        return sigma, r, kappa, dlog, w == 0

    def terms(self, s: float):
        sigma, r, kappa, dlog, bg = self._kappa(s)
        if s >= 1:
            sigma = torch.ones_like(sigma)
        else:
            w, _ = self.lag(s)
            sigma = s * w.double().exp()
        a = torch.where(bg, torch.ones_like(r), kappa * r)
        b = torch.where(bg, torch.zeros_like(r), 1 - r - min(s, 1 - 1e-7) * dlog)
        return sigma.float(), torch.where(bg, torch.ones_like(kappa), 1 / kappa), a, b

    def scale(self, sampler_x, s):
        return sampler_x * self.terms(s)[1].to(sampler_x)

    def unscale(self, latent, s):
        return latent / self.terms(s)[1].to(latent)

    def variance(self, i: int, b: float, d: float):
        """(pixel's, background's) variance of the noise that tops the step's deterministic part
        (down to d, then rescaled by α(b)/α(d)) up to each one's own sigma at b."""
        sig_b, _, k_b, _, bg_b = self._kappa(b, i)
        sig_d, _, k_d, _, bg_d = self._kappa(d, i) if d > 0 else (torch.zeros_like(sig_b), None, k_b, None, bg_b)
        rescale = (1 - b) / (1 - d)
        nu = rescale * (k_d / k_b) * sig_d
        var = (k_b**2 * (sig_b**2 - nu**2)).clamp(min=0)
        return var, b**2 - (rescale * d) ** 2, bg_b & bg_d


def _rise(t, secant, start, end):
    """Cubic Hermite lag minus w_a, in units of the interval's length in u: exactly 0 when all
    slopes are 0 (a pixel on the background)."""
    return secant * t + (start - secant) * (t - 2 * t**2 + t**3) + (end - secant) * (t**3 - t**2)


def _slope(t, secant, start, end):
    """d lag / d log s of the cubic."""
    return secant + (start - secant) * (1 - 4 * t + 3 * t**2) + (end - secant) * (3 * t**2 - 2 * t)


def ancestral_down(s, s_next, eta):
    """k-diffusion's get_ancestral_step: the level the deterministic part goes down to (floats or
    tensors). From an infinite level (τ at σ = 1) ComfyUI's formula gives σ_up = s_next (nan
    compares false): 0."""
    if not eta:
        return s_next
    s, s_next = _t(s), _t(s_next)
    up = torch.minimum(s_next, eta * (s_next**2 * (1 - (s_next / s) ** 2)).clamp(min=0).sqrt())
    down = (s_next**2 - up**2).clamp(min=0).sqrt()
    return torch.where(torch.isinf(s), torch.zeros_like(down), down)


def sde_down(s, s_next, eta):
    """DPM-Solver++ SDE steps: x scales by (s'/s)·e^(−ηh), h = log(s/s'), i.e. down to s'^(1+η)/s^η."""
    s, s_next = _t(s), _t(s_next)
    return s_next * (s_next / s) ** eta


def rf_down(s, s_next, eta):
    """The RF ancestral samplers' flow sigma of the deterministic part (k-diffusion's *_RF)."""
    return s_next * (1 + (s_next / s - 1) * eta)


def er_sde_down(s, s_next, scaler: Callable):
    """ER-SDE's first stage x ← r·x + (1 − r)·D in VE form, r = scaler(v')/scaler(v): down to r·v
    (from v = ∞: v/scaler(v) → 0)."""
    s, s_next = _t(s), _t(s_next)
    down = s * scaler(s_next) / scaler(s)
    return torch.where(torch.isinf(s), torch.zeros_like(down), down)


def _t(v):
    return torch.as_tensor(v, dtype=torch.float64)


# How each ComfyUI sampler's noise is added (k-diffusion's sampling.py), on EDM-type models / on
# flow models (CONST), and whether a flow model then needs the FlowClock (DESIGN.md, "Noise").
# Samplers that step flow models with their half-log-SNR or RF forms add noise in VE coordinates
# τ = σ/(1 − σ); those that apply k-diffusion's σ formulas to a flow model's sigmas stay in σ.
_RF = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral")
_TAU_ANCESTRAL = ("dpmpp_sde", "dpmpp_sde_gpu", "euler_ancestral_cfg_pp")
_SIGMA_ANCESTRAL = ("dpmpp_2s_ancestral_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
                    "ddpm", "dpm_fast", "dpm_adaptive")
_SDE = ("dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde",
        "dpmpp_3m_sde_gpu")


def noise_rule(name: str, flow: bool) -> Tuple[Optional[str], bool]:
    """(rule of the sampler's noise, whether it needs the FlowClock) for a ComfyUI sampler name
    (another pack's named "…ancestral…" / "…sde…": the σ forms); rule None: deterministic, or
    unknown (its own noise, not per pixel)."""
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
    if "ancestral" in name:  # another pack's, by ComfyUI's naming: its σ form
        return "ancestral", False
    if "sde" in name:
        return "sde", False
    return None, False


def default_er_sde_scaler(v):
    return v * ((v**0.3).exp() + 10.0)


class NoiseRule:
    """A sampler's rule for the level v_d its deterministic part goes down to before the noise
    of a call (a → b) tops it up to b (``level``, on floats or per-pixel tensors, in v):

    - ancestral: k-diffusion's get_ancestral_step(v_a, v_b, η); rf: the RF samplers' σ_d;
    - sde, seeds: v_b·(v_b/v_a)^η; sa_solver: the same with η = tau_func(σ_b)²;
    - er_sde: v_a·scaler(v_b)/scaler(v_a); renoise (lcm): 0.
    """

    def __init__(self, rule: str, eta: float = 1.0, tau_func: Optional[Callable] = None,
                 scaler: Optional[Callable] = None, tau: bool = False):
        self.rule, self.eta, self.tau_func = rule, eta, tau_func
        self.scaler, self.tau = scaler or default_er_sde_scaler, tau  # tau: the flow form (FlowClock)

    def level(self, v_a, v_b, sigma_b: float, tau: bool = False):
        """v_d for a step v_a → v_b (v: σ, or τ when ``tau``) whose background target is σ_b."""
        if self.rule == "renoise":
            return torch.zeros_like(_t(v_b))
        if self.rule == "ancestral":
            return ancestral_down(v_a, v_b, self.eta)
        if self.rule == "er_sde":
            return er_sde_down(v_a, v_b, self.scaler)
        if self.rule == "rf":  # in σ, then back to τ
            s_a, s_b = _t(v_a) / (1 + _t(v_a)), _t(v_b) / (1 + _t(v_b))
            s_a = torch.where(torch.isinf(_t(v_a)), torch.ones_like(s_a), s_a)
            s_d = rf_down(s_a, s_b, self.eta)
            return s_d / (1 - s_d) if tau else s_d
        eta = float(self.tau_func(sigma_b)) ** 2 if self.rule == "sa_solver" else self.eta
        return sde_down(v_a, v_b, eta)


class PixelNoise:
    """The sampler's noise sampler scaled per pixel: each call (a, b) adds noise after a
    deterministic part that the sampler's ``NoiseRule`` sends down to d; the factor is
    sqrt(pixel's variance / background's) of ``clock.variance`` (1 exactly on the background).
    SEEDS reuses each draw in its next stage, N_k = N_(k−1)·(v_b/v_a)^η + sqrt(1 − (v_b/v_a)^2η)·n_k,
    and each stage is an sde step from the step's start v_0: the factor on n_k brings N_k to each
    pixel's own variance for that stage."""

    def __init__(self, clock: "Clock", base: Callable, rule: NoiseRule):
        self.clock, self.base, self.rule = clock, base, rule
        self._knots = set(clock.sigmas)
        self._v0, self._want = None, None

    def __call__(self, a, b):
        n = self.base(a, b)
        return n * self.factor(float(a), float(b)).to(n)

    def factor(self, a: float, b: float) -> torch.Tensor:
        clock = self.clock
        i = clock.interval(a)
        if b <= 0:
            return torch.ones_like(clock._piece(i)[0])
        v_a, v_b = clock.v(a), clock.v(b)
        if self.rule.rule == "seeds":
            return self._seeds(i, a, b, v_a, v_b)
        v_d = float(self.rule.level(v_a, v_b, b, clock.tau))
        var, var_bg, bg = clock.variance(i, b, clock.sigma_of_v(v_d) if v_d > 0 else 0.0)
        if var_bg <= 0:
            return torch.ones_like(var)
        return torch.where(bg, torch.ones_like(var), (var / var_bg).sqrt())

    def _seeds(self, i, a, b, v_a, v_b):
        eta = self.rule.eta
        if a in self._knots or self._v0 is None:  # a step's first stage starts on a knot
            self._v0, self._want = v_a, None
        v_d = float(sde_down(self._v0, v_b, eta))
        var, _, bg = self.clock.variance(i, b, self.clock.sigma_of_v(v_d) if v_d > 0 else 0.0)
        want = var / b**2
        carry = (v_b / v_a) ** (2 * eta)
        prev = torch.zeros_like(want) if self._want is None else self._want
        factor = ((want - prev * carry).clamp(min=0) / (1 - carry)).sqrt()
        on_bg = bg & (self._on_bg if self._want is not None else True)
        self._want, self._on_bg = want, on_bg
        return torch.where(on_bg, torch.ones_like(factor), factor)


def make_clock(sigmas, knots, rule: Optional[NoiseRule] = None) -> Clock:
    """The clock a sampler needs: the FlowClock where its noise rule is a flow form (``rule.tau``)."""
    return FlowClock(sigmas, knots) if rule is not None and rule.tau else Clock(sigmas, knots)


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
        sigma, scale, a, b = self.clock.terms(float(torch.as_tensor(s).flatten()[0]))
        sigma, a, b = sigma.to(x.dtype), a.to(x.dtype), b.to(x.dtype)
        if extra.get("model_options") is not None:
            extra["model_options"] = _transform_post_cfg(extra["model_options"], self._base_hooks, x, a, b)
        return tilde(x, self.model(x if scale is None else x * scale.to(x.dtype), sigma, **extra), a, b)


def tilde(x: torch.Tensor, denoised: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D̃ = a·D + b·x: a = 1, b = 0 (a pixel on the background) gives D exactly."""
    return a * denoised + b * x


def _transform_post_cfg(options: Dict, base_hooks, x, a, b):
    fns = options.get("sampler_post_cfg_function") or []
    if not fns:
        return options

    def wrap(fn):
        def hook(args):
            args = dict(args)
            if args.get("uncond_denoised") is not None:
                args["uncond_denoised"] = tilde(x, args["uncond_denoised"], a, b)
            return fn(args)

        return hook

    out = dict(options)
    out["sampler_post_cfg_function"] = [fn if any(fn is b for b in base_hooks) else wrap(fn) for fn in fns]
    return out
