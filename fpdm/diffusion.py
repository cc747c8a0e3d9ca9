"""Gaussian diffusion as DiT/FPDM sample it: linear betas, respacing, DDPM with learned
variance, DDIM (eta), epsilon- or v-prediction, zero terminal SNR.

Tables are float64 numpy (like the reference), read out as float32 per step; every update
is a small pure function of (schedule, step index, x, model output, noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Union

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """DDPM/DiT betas: linear (not sqrt-linear) from 1e-4 to 0.02, scaled for other lengths."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale so sqrt(alpha_bar) hits 0 at the last step and keeps its first value
    (Lin et al. 2023, 'Common diffusion noise schedules are flawed')."""
    sqrt_ab = torch.from_numpy(np.asarray(betas, dtype=np.float64))
    sqrt_ab = (1 - sqrt_ab).cumprod(0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return (1 - alphas).numpy()


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> List[int]:
    """Which of the training timesteps a respaced sampler visits (sorted ascending).

    "N" or [a, b, ...]: split the range into equal sections and take the given count from each,
    evenly with rounding; "ddimN": the integer stride that yields exactly N steps."""
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[4:])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot make exactly {want} steps from {num_timesteps} with an integer stride")
        section_counts = [int(v) for v in section_counts.split(",")]
    base, extra = divmod(num_timesteps, len(section_counts))
    start, taken = 0, []
    for i, count in enumerate(section_counts):
        size = base + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            taken.append(start + round(pos))
            pos += stride
        start += size
    return sorted(set(taken))


@dataclass
class Schedule:
    """A (possibly respaced) discrete schedule. Index i = 0..n-1, sampled from n-1 down to 0;
    ``timesteps[i]`` is the training timestep the network is given."""

    betas: np.ndarray
    timesteps: List[int]

    def __post_init__(self):
        b = np.asarray(self.betas, dtype=np.float64)
        if not ((b > 0).all() and (b <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = b
        ab = np.cumprod(1.0 - b)
        self.alphas_cumprod = ab
        self.alphas_cumprod_prev = np.append(1.0, ab[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(ab)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ab)
        with np.errstate(divide="ignore"):
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ab)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ab - 1)
        ab_prev = self.alphas_cumprod_prev
        self.posterior_variance = b * (1.0 - ab_prev) / (1.0 - ab)
        # The posterior variance is 0 at the last step; like DDPM, clip its log to the next one.
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.log(b)
        self.posterior_mean_coef1 = b * np.sqrt(ab_prev) / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * np.sqrt(1.0 - b) / (1.0 - ab)
        self.log_betas = np.log(b)

    def __len__(self):
        return len(self.betas)

    def at(self, name: str, i: int, like: torch.Tensor) -> torch.Tensor:
        """Table value at index i as a float32 scalar tensor on like's device (reference numerics)."""
        return torch.tensor(getattr(self, name)[i], dtype=torch.float64).float().to(like.device)


def make_schedule(steps: Union[int, str, None] = None, zero_snr: bool = False,
                  num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    """Linear DiT betas (optionally zero-terminal-SNR), respaced to ``steps`` (None: all)."""
    betas = linear_betas(num_timesteps)
    if zero_snr:
        betas = zero_terminal_snr(betas)
    use = list(range(num_timesteps)) if steps in (None, "") else space_timesteps(num_timesteps, str(steps))
    keep, new_betas, last = set(use), [], 1.0
    for i, ab in enumerate(np.cumprod(1.0 - betas)):
        if i in keep:  # respaced beta: ratio of retained alpha_bar values
            new_betas.append(1 - ab / last)
            last = ab
    return Schedule(np.array(new_betas), sorted(keep))


# ----------------------------------------------------------------------------- predictions


def split_output(out: torch.Tensor, channels: int):
    """Network output -> (prediction, variance values in [-1, 1] or None)."""
    if out.shape[1] == 2 * channels:
        return out[:, :channels], out[:, channels:]
    if out.shape[1] == channels:
        return out, None
    raise ValueError(f"model output has {out.shape[1]} channels, expected {channels} or {2 * channels}")


def predict_x0(s: Schedule, i: int, x, pred, prediction: str = "eps"):
    if prediction == "v":  # x0 = sqrt(ab) x - sqrt(1-ab) v
        return s.at("sqrt_alphas_cumprod", i, x) * x - s.at("sqrt_one_minus_alphas_cumprod", i, x) * pred
    if prediction == "eps":  # x0 = (x - sqrt(1-ab) eps) / sqrt(ab)
        return s.at("sqrt_recip_alphas_cumprod", i, x) * x - s.at("sqrt_recipm1_alphas_cumprod", i, x) * pred
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


def ddpm_step(s: Schedule, i: int, x, out, noise, prediction: str = "eps"):
    """One ancestral DDPM step x_i -> x_{i-1}; learned variance when out has 2x channels
    (log-variance interpolated between the clipped posterior and beta), else beta ("fixed large").
    Returns (x_prev, x0)."""
    pred, var = split_output(out, x.shape[1])
    x0 = predict_x0(s, i, x, pred, prediction)
    mean = s.at("posterior_mean_coef1", i, x) * x0 + s.at("posterior_mean_coef2", i, x) * x
    if var is not None:
        frac = (var + 1) / 2
        log_var = frac * s.at("log_betas", i, x) + (1 - frac) * s.at("posterior_log_variance_clipped", i, x)
    else:
        fixed_large = np.append(s.posterior_variance[1], s.betas[1:]) if len(s) > 1 else s.betas
        log_var = torch.tensor(np.log(fixed_large)[i]).float().to(x.device)
    if i == 0:
        return mean, x0
    return mean + torch.exp(0.5 * log_var) * noise, x0


def ddim_step(s: Schedule, i: int, x, out, noise=None, eta: float = 0.0, prediction: str = "eps"):
    """One DDIM step (eta=0: deterministic). Returns (x_prev, x0)."""
    pred, _ = split_output(out, x.shape[1])
    x0 = predict_x0(s, i, x, pred, prediction)
    if prediction == "v" and not np.isfinite(s.sqrt_recip_alphas_cumprod[i]):
        # zero-SNR first step: alpha_bar = 0, so eps comes from v directly
        eps = s.at("sqrt_alphas_cumprod", i, x) * pred + s.at("sqrt_one_minus_alphas_cumprod", i, x) * x
    else:
        eps = (s.at("sqrt_recip_alphas_cumprod", i, x) * x - x0) / s.at("sqrt_recipm1_alphas_cumprod", i, x)
    ab, ab_prev = s.at("alphas_cumprod", i, x), s.at("alphas_cumprod_prev", i, x)
    sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
    mean = x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
    if i == 0 or eta == 0 or noise is None:
        return mean, x0
    return mean + sigma * noise, x0


# ----------------------------------------------------------------------------- guidance


def guide(cond_out, uncond_out, scale: float, mode: str = "reference", channels: int = 4):
    """Classifier-free guidance on network outputs.

    "reference": only the first 3 channels are guided (what the reference ships, for exact
    reproduction of its samples); "standard": all ``channels`` prediction channels. The rest
    (remaining channels, learned variance) comes from the conditional output."""
    n = 3 if mode == "reference" else channels if mode == "standard" else None
    if n is None:
        raise ValueError(f"guidance mode must be 'reference' or 'standard', got {mode!r}")
    g = uncond_out[:, :n] + scale * (cond_out[:, :n] - uncond_out[:, :n])
    return torch.cat([g, cond_out[:, n:]], dim=1)
