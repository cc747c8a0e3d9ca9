"""Noise levels without ComfyUI: the model's sigma <-> timestep map and a few sigma schedules.

``DiscreteModelSampling`` is a variance-preserving model trained on discrete timesteps (the SD family)
seen in sigma space, with the same formulas as ComfyUI's ``ModelSamplingDiscrete``:
σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), ``timestep(σ)`` the nearest training timestep in log σ (what the
model is fed), ``sigma(t)`` log-linear between neighbours, and the plan's time ``axis`` (its
table: positions are the model's timesteps). Inside ComfyUI, ``comfyui.sampler.ComfyModelSampling``
offers the same members around the model's own sampling object.

Schedules return N + 1 descending sigmas ending at 0 (or at σ(0) for the paper's last step).
"""

import math

import torch

from .time_axis import TableAxis

SCHEDULERS = ("paper", "karras", "exponential", "leading", "trailing", "linspace")


class DiscreteModelSampling:
    flow = False  # x = x0 + σ·ε (VE form of a VP model), not flow matching
    max_timestep = 1001.0  # the paper's timestep scale (its virtual start), what previews draw as white

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.axis = TableAxis(self.sigmas)  # the plan's σ ↔ position (time_axis.py)

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log().reshape(-1)[None] - self.log_sigmas.to(sigma.device)[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32).clamp(0, len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        ls = self.log_sigmas.to(t.device)
        return ((1 - w) * ls[low] + w * ls[high]).exp()

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        scale = (1 + sigma**2) ** 0.5 if max_denoise else sigma
        return noise * scale + latent


def paper_sigmas(model_sampling, steps: int, steps_offset: int = 1, last_timestep_zero: bool = True) -> torch.Tensor:
    """The AsynDM reference's background timesteps as sigmas: its linear curve from 1001, rounded —
    981, 961, ..., 1 for 50 steps, which is diffusers' DDIM "leading" + offset whenever the step
    count divides 1000 (the reference's vanilla run uses that spacing; at other counts its AsynDM
    background and its vanilla run differ by a few timesteps, and this follows the AsynDM one).
    The last step lands on timestep 0 (σ(0) > 0), or on σ = 0. The timesteps are positions on the
    schedule's time axis (time_axis.py): the model's timesteps on SD-family models, 1000 steps of
    the unshifted flow time on flow models (whose σ(0) is 0)."""
    from .curves import PaperCurves, timesteps_of

    axis = model_sampling.axis
    curve = PaperCurves(steps, num_train_timesteps=axis.steps, steps_offset=steps_offset)
    ts = timesteps_of(curve.plan(None, [], 1, 1, 1)[:-1]).flatten().float()
    sig = axis.sigma(ts).float()
    end = axis.sigma(torch.zeros(1)).float() if last_timestep_zero else torch.zeros(1)
    return torch.cat([sig, end])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    sig = torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()
    return torch.cat([sig, torch.zeros(1)])


def spaced_sigmas(model_sampling, steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """diffusers' timestep spacings (DDIMScheduler.set_timesteps) as sigmas, ending at 0."""
    n_train = len(model_sampling.sigmas)
    if spacing == "leading":
        ts = (torch.arange(steps) * (n_train // steps)).flip(0) + steps_offset
    elif spacing == "trailing":
        ts = (torch.arange(n_train, 0, -n_train / steps).round() - 1).clamp(min=0)
    elif spacing == "linspace":
        ts = torch.linspace(0, n_train - 1, steps).round().flip(0)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}: use leading, trailing or linspace")
    return torch.cat([model_sampling.sigma(ts.float()), torch.zeros(1)])


def make_sigmas(model_sampling, name: str, steps: int, *, steps_offset: int = 1, last_timestep_zero: bool = True):
    """Sigmas of a named schedule for the library and the CLI (ComfyUI's own schedulers are used
    inside ComfyUI)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    smin, smax = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    if name == "paper":
        return paper_sigmas(model_sampling, steps, steps_offset, last_timestep_zero)
    if name == "karras":
        return karras_sigmas(steps, smin, smax)
    if name == "exponential":
        return exponential_sigmas(steps, smin, smax)
    if name in ("leading", "trailing", "linspace"):
        return spaced_sigmas(model_sampling, steps, name, steps_offset)
    raise ValueError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
