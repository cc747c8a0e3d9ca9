"""Samplers with a sigma per latent pixel, after k-diffusion's ``sampling.py``.

Each sampler is one function ``sample_x(model, x, plan, extra_args, callback, disable, ...)``:
``model(x, sigma, **extra_args)`` returns the denoised latent for a per-pixel sigma map
(B, 1, H, W); ``plan.step(i)`` gives step i's maps (σ, σ_next) (plan.py). Every update of the
k-diffusion family is elementwise in sigma, so the formulas are k-diffusion's with maps in place
of scalars; multistep history (previous denoised, step sizes) is per pixel. With all pixels on
the background the results equal ComfyUI's samplers of the same name (tests pin this).

Noise: ``noise_sampler(s, s_next)`` is called with the *background* sigmas (0-dim tensors) of
the interval, so ComfyUI's own samplers can be passed in: its default sampler (fresh Gaussian
noise per call) and its Brownian-tree sampler for the SDE samplers. A per-pixel Brownian tree
would need a tree per distinct sigma path; the background tree gives every pixel standard
Gaussian increments, independent between steps, which is what the per-pixel SDE update needs,
and equals ComfyUI's noise exactly when every pixel is on the background (DESIGN.md).

Flow-matching models (``plan.model_sampling.flow``): euler, heun, dpm_2, dpmpp_2m, lcm need nothing
more; the ancestral/SDE samplers use their flow (RF) forms.
"""

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

DEFAULT_ETA = 1.0


def _last(sigma_next):
    return bool((sigma_next == 0).all())


def _d(x, sigma, denoised):
    return (x - denoised) / sigma


def _noise(noise_sampler, plan, i, x, s_next_bg=None, s_bg=None):
    if noise_sampler is None:
        return torch.randn_like(x)
    a = plan.background(i) if s_bg is None else s_bg
    return noise_sampler(a, plan.background(i + 1) if s_next_bg is None else s_next_bg)


def _report(callback, plan, i, x, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": plan.background(i), "sigma_hat": plan.background(i),
                  "sigma_map": sigma, "denoised": denoised})


def _ancestral(sigma, sigma_next, eta):
    """k-diffusion's get_ancestral_step per pixel: (σ_down, σ_up)."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).clamp(min=0) ** 0.5)
    return (sigma_next**2 - up**2).clamp(min=0) ** 0.5, up


def _half_log_snr(sigma, flow):
    return sigma.logit().neg() if flow else sigma.log().neg()


def _sigma_of_half_log_snr(lam, flow):
    return lam.neg().sigmoid() if flow else lam.neg().exp()


def _snr_safe(sigma, plan):
    """ComfyUI's offset_first_sigma_for_snr: a flow sigma of 1 has no finite log-SNR, so it becomes
    the model's sigma at 1e-4 of its schedule (shift included) — for the model call and the noise
    interval too, as ComfyUI evaluates the offset sigma; per pixel, wherever a pixel is at 1."""
    if not plan.model_sampling.flow:
        return sigma
    to_sigma = getattr(plan.model_sampling, "percent_to_sigma", None)
    offset = float(to_sigma(1e-4)) if to_sigma is not None else 1 - 1e-4
    return torch.where(sigma >= 1, torch.as_tensor(offset, dtype=sigma.dtype, device=sigma.device), sigma)


@torch.no_grad()
def sample_euler(model, x, plan, extra_args=None, callback=None, disable=None, s_noise=1.0):
    extra_args = extra_args or {}
    for i in range(len(plan)):
        sigma, sigma_next = plan.step(i)
        denoised = model(x, sigma, **extra_args)
        _report(callback, plan, i, x, sigma, denoised)
        x = x + _d(x, sigma, denoised) * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, plan, extra_args=None, callback=None, disable=None, eta=DEFAULT_ETA,
                           s_noise=1.0, noise_sampler=None):
    extra_args = extra_args or {}
    for i in range(len(plan)):
        sigma, sigma_next = plan.step(i)
        denoised = model(x, sigma, **extra_args)
        _report(callback, plan, i, x, sigma, denoised)
        if _last(sigma_next):
            x = denoised
            continue
        if plan.model_sampling.flow:  # k-diffusion's euler_ancestral_RF
            down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
            a_next, a_down = 1 - sigma_next, 1 - down
            renoise = (sigma_next**2 - down**2 * a_next**2 / a_down**2).clamp(min=0) ** 0.5
            ratio = down / sigma
            x = ratio * x + (1 - ratio) * denoised
            if eta > 0:
                x = (a_next / a_down) * x + _noise(noise_sampler, plan, i, x) * s_noise * renoise
            continue
        down, up = _ancestral(sigma, sigma_next, eta)
        x = x + _d(x, sigma, denoised) * (down - sigma)
        if eta > 0:
            x = x + _noise(noise_sampler, plan, i, x) * s_noise * up
    return x


@torch.no_grad()
def sample_heun(model, x, plan, extra_args=None, callback=None, disable=None, s_noise=1.0):
    extra_args = extra_args or {}
    for i in range(len(plan)):
        sigma, sigma_next = plan.step(i)
        denoised = model(x, sigma, **extra_args)
        _report(callback, plan, i, x, sigma, denoised)
        d = _d(x, sigma, denoised)
        dt = sigma_next - sigma
        if _last(sigma_next):
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = _d(x_2, sigma_next, model(x_2, sigma_next, **extra_args))
        x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(model, x, plan, extra_args=None, callback=None, disable=None, s_noise=1.0):
    extra_args = extra_args or {}
    for i in range(len(plan)):
        sigma, sigma_next = plan.step(i)
        denoised = model(x, sigma, **extra_args)
        _report(callback, plan, i, x, sigma, denoised)
        d = _d(x, sigma, denoised)
        if _last(sigma_next):
            x = x + d * (sigma_next - sigma)
            continue
        sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigma)
        d_2 = _d(x_2, sigma_mid, model(x_2, sigma_mid, **extra_args))
        x = x + d_2 * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, plan, extra_args=None, callback=None, disable=None):
    extra_args = extra_args or {}
    old_denoised, h_last = None, None
    for i in range(len(plan)):
        sigma, sigma_next = plan.step(i)
        denoised = model(x, sigma, **extra_args)
        _report(callback, plan, i, x, sigma, denoised)
        t, t_next = sigma.log().neg(), sigma_next.log().neg()
        h = t_next - t
        first_order = (sigma_next / sigma) * x - (-h).expm1() * denoised
        if old_denoised is None or _last(sigma_next):
            x = first_order
        else:
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            # a pixel held at one sigma (a lagging item clamped at σ_max) has no step size: first order
            x = torch.where((h != 0) & (h_last != 0), (sigma_next / sigma) * x - (-h).expm1() * denoised_d,
                            first_order)
        old_denoised, h_last = denoised, h  # per pixel: each pixel's own last step size
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, plan, extra_args=None, callback=None, disable=None, eta=DEFAULT_ETA,
                        s_noise=1.0, noise_sampler=None, solver_type="midpoint"):
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    extra_args = extra_args or {}
    flow = plan.model_sampling.flow
    old_denoised, h_last, h = None, None, None
    for i in range(len(plan)):
        sigma, sigma_next = plan.step(i)
        s = _snr_safe(sigma, plan)
        denoised = model(x, s, **extra_args)
        _report(callback, plan, i, x, s, denoised)
        if _last(sigma_next):
            x = denoised
        else:
            lam_s, lam_t = _half_log_snr(s, flow), _half_log_snr(sigma_next, flow)
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * lam_t.exp()
            x = sigma_next / s * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    corr = alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    corr = 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
                # a pixel held at one sigma has no step size: no second-order correction
                x = x + torch.where((h != 0) & (h_last != 0), corr, torch.zeros_like(corr))
            if eta > 0 and s_noise > 0:
                x = x + _noise(noise_sampler, plan, i, x, s_bg=_snr_safe(plan.background(i), plan)) * sigma_next * (
                    -2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, plan, extra_args=None, callback=None, disable=None, eta=DEFAULT_ETA, s_noise=1.0,
                     noise_sampler=None, r=1 / 2):
    extra_args = extra_args or {}
    flow = plan.model_sampling.flow
    fac = 1 / (2 * r)
    for i in range(len(plan)):
        sigma, sigma_next = plan.step(i)
        s = _snr_safe(sigma, plan)
        denoised = model(x, s, **extra_args)
        _report(callback, plan, i, x, s, denoised)
        if _last(sigma_next):
            x = denoised
            continue
        lam_s, lam_t = _half_log_snr(s, flow), _half_log_snr(sigma_next, flow)
        h = lam_t - lam_s
        lam_s1 = lam_s + r * h
        sigma_s1 = _sigma_of_half_log_snr(lam_s1, flow)
        alpha_s, alpha_s1, alpha_t = s * lam_s.exp(), sigma_s1 * lam_s1.exp(), sigma_next * lam_t.exp()
        # the noise interval of the background's own sub-step
        bg_s = _snr_safe(plan.background(i), plan)
        bg_lam_s, bg_lam_t = _half_log_snr(bg_s, flow), _half_log_snr(plan.background(i + 1), flow)
        bg_s1 = _sigma_of_half_log_snr(bg_lam_s + r * (bg_lam_t - bg_lam_s), flow)

        sd, su = _ancestral(lam_s.neg().exp(), lam_s1.neg().exp(), eta)
        h_ = sd.log().neg() - lam_s
        x_2 = (alpha_s1 / alpha_s) * (-h_).exp() * x - alpha_s1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s1 * _noise(noise_sampler, plan, i, x, bg_s1, s_bg=bg_s) * s_noise * su
        denoised_2 = model(x_2, sigma_s1, **extra_args)

        sd, su = _ancestral(lam_s.neg().exp(), lam_t.neg().exp(), eta)
        h_ = sd.log().neg() - lam_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * _noise(noise_sampler, plan, i, x, s_bg=bg_s) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, plan, extra_args=None, callback=None, disable=None, eta=DEFAULT_ETA,
                              s_noise=1.0, noise_sampler=None):
    if plan.model_sampling.flow:
        raise ValueError("dpmpp_2s_ancestral per pixel is implemented for epsilon/v models only; "
                         "use euler_ancestral or dpmpp_2m_sde with flow models")
    extra_args = extra_args or {}
    for i in range(len(plan)):
        sigma, sigma_next = plan.step(i)
        denoised = model(x, sigma, **extra_args)
        _report(callback, plan, i, x, sigma, denoised)
        down, up = _ancestral(sigma, sigma_next, eta)
        if _last(down):
            x = x + _d(x, sigma, denoised) * (down - sigma)
        else:
            t, t_next = sigma.log().neg(), down.log().neg()
            h = t_next - t
            s = t + h / 2
            x_2 = ((-s).exp() / sigma) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, (-s).exp(), **extra_args)
            x = (down / sigma) * x - (-h).expm1() * denoised_2
        if not _last(sigma_next):
            x = x + _noise(noise_sampler, plan, i, x) * s_noise * up
    return x


@torch.no_grad()
def sample_lcm(model, x, plan, extra_args=None, callback=None, disable=None, noise_sampler=None):
    extra_args = extra_args or {}
    for i in range(len(plan)):
        sigma, sigma_next = plan.step(i)
        denoised = model(x, sigma, **extra_args)
        _report(callback, plan, i, x, sigma, denoised)
        x = denoised
        if not _last(sigma_next):
            x = plan.model_sampling.noise_scaling(sigma_next, _noise(noise_sampler, plan, i, x), x)
    return x


@torch.no_grad()
def sample_ddim(model, x, plan, extra_args=None, callback=None, disable=None, eta=0.0, s_noise=1.0,
                noise_sampler=None):
    """The paper's sampler: DDIM (eqs. 12 and 16 of the DDIM paper) with ᾱ = 1 / (1 + σ²) per pixel.

    In sigma space DDIM(η) is Euler ancestral(η): the same update, written in the variance-
    preserving form the reference uses, so its latents are matched to float32 round-off.
    """
    if plan.model_sampling.flow:
        return sample_euler_ancestral(model, x, plan, extra_args, callback, disable, eta, s_noise, noise_sampler)
    extra_args = extra_args or {}
    for i in range(len(plan)):
        sigma, sigma_next = plan.step(i)
        denoised = model(x, sigma, **extra_args)
        _report(callback, plan, i, x, sigma, denoised)
        a_t, a_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        x_vp = x * a_t**0.5
        eps = (x_vp - a_t**0.5 * denoised) / (1 - a_t) ** 0.5
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0) ** 0.5
        x_vp = a_prev**0.5 * denoised + (1 - a_prev - std**2).clamp(min=0) ** 0.5 * eps
        if eta > 0 and not _last(sigma_next):
            x_vp = x_vp + std * s_noise * _noise(noise_sampler, plan, i, x)
        x = x_vp / a_prev**0.5
    return x


@dataclass(frozen=True)
class SamplerInfo:
    """What the pack knows of one sampler. ``function``: the per-pixel version (None for a sampler
    that runs through the change of clock, clock.py, whose noise rule is clock.noise_rule's);
    ``brownian``: its noise is ComfyUI's Brownian tree (on the CPU unless ``tree_on_cpu`` is off),
    else fresh Gaussian noise per call.
    Whether it takes eta (and its default) and s_noise is read from the function's signature."""

    function: Optional[Callable] = None
    brownian: bool = False
    tree_on_cpu: bool = True

    def _params(self):
        try:
            return inspect.signature(self.function).parameters
        except (TypeError, ValueError):
            return {}

    @property
    def eta(self) -> Optional[float]:
        """The function's default eta; None when it takes no eta."""
        p = self._params().get("eta")
        return None if p is None or p.default is p.empty else float(p.default)

    @property
    def s_noise(self) -> bool:
        return "s_noise" in self._params()


# a new per-pixel sampler: its function above and one line here
SAMPLERS = {
    "ddim": SamplerInfo(sample_ddim),
    "euler": SamplerInfo(sample_euler),
    "euler_ancestral": SamplerInfo(sample_euler_ancestral),
    "heun": SamplerInfo(sample_heun),
    "dpm_2": SamplerInfo(sample_dpm_2),
    "dpmpp_2m": SamplerInfo(sample_dpmpp_2m),
    "dpmpp_2m_sde": SamplerInfo(sample_dpmpp_2m_sde, brownian=True),
    "dpmpp_sde": SamplerInfo(sample_dpmpp_sde, brownian=True),
    "dpmpp_2s_ancestral": SamplerInfo(sample_dpmpp_2s_ancestral),
    "lcm": SamplerInfo(sample_lcm),
}
ETA_SAMPLERS = tuple(name for name, info in SAMPLERS.items() if info.eta is not None)


def get_sampler(name: str):
    """The per-pixel sampler function of that name."""
    try:
        return SAMPLERS[name].function
    except KeyError:
        raise ValueError(f"the sampler {name!r} has no per-pixel version: use one of {', '.join(SAMPLERS)}") from None
