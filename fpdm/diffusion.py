"""Gaussian diffusion as DiT/FPDM train and sample it: linear betas, respacing, DDPM with learned
variance, DDIM (eta), epsilon- or v-prediction, zero terminal SNR, and the training side:
``q_sample`` and ``training_losses`` (MSE + the variational bound for the learned variance, the
reference's weighted x0 loss for v-prediction, and its flow-matching option).

Tables are float64 numpy (like the reference), read out as float32 per step; every update
is a small pure function of (diffusion, step index, x, model output, noise). The posterior and
learned-variance formulas are written once (``posterior``, ``learned_log_variance``) and used by
the diffusion's tables, the library sampler, the ComfyUI sampler and the training loss.
"""

from __future__ import annotations

import math
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


def posterior(ab, ab_prev, beta=None):
    """q(x_prev | x_t, x0) for alpha_bar ``ab`` -> ``ab_prev`` (floats or numpy arrays, float64):
    (beta, variance, coef1, coef2) with mean = coef1 * x0 + coef2 * x_t."""
    if beta is None:
        beta = 1.0 - ab / ab_prev
    variance = beta * (1.0 - ab_prev) / (1.0 - ab)
    coef1 = beta * np.sqrt(ab_prev) / (1.0 - ab)
    coef2 = (1.0 - ab_prev) * np.sqrt(1.0 - beta) / (1.0 - ab)
    return beta, variance, coef1, coef2


def learned_log_variance(values, min_log, max_log):
    """The learned-range variance: network values in [-1, 1] interpolate the log-variance between
    the clipped posterior (``min_log``, at -1) and beta (``max_log``, at +1)."""
    frac = (values + 1) / 2
    return frac * max_log + (1 - frac) * min_log


@dataclass
class Diffusion:
    """A (possibly respaced) discrete diffusion: the tables of its beta schedule. Index i = 0..n-1,
    sampled from n-1 down to 0; ``timesteps[i]`` is the training timestep the network is given."""

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
        _, self.posterior_variance, self.posterior_mean_coef1, self.posterior_mean_coef2 = posterior(
            ab, self.alphas_cumprod_prev, b)
        # The posterior variance is 0 at the last step; like DDPM, clip its log to the next one.
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.log(b)
        self.log_betas = np.log(b)

    def __len__(self):
        return len(self.betas)

    def at(self, name: str, i: int, like: torch.Tensor) -> torch.Tensor:
        """Table value at index i as a float32 scalar tensor on like's device (reference numerics)."""
        return torch.tensor(getattr(self, name)[i], dtype=torch.float64).float().to(like.device)

    def gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table values at the batch of indices ``t`` as float32, shaped to broadcast over ``like``
        (the reference's _extract_into_tensor)."""
        table = getattr(self, name) if isinstance(name, str) else name
        values = torch.from_numpy(np.asarray(table, dtype=np.float64)).to(t.device)[t].float()
        return values.reshape(-1, *([1] * (like.dim() - 1)))


def make_diffusion(steps: Union[int, str, None] = None, zero_snr: bool = False,
                  num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Diffusion:
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
    return Diffusion(np.array(new_betas), sorted(keep))


# ----------------------------------------------------------------------------- predictions


def split_output(out: torch.Tensor, channels: int):
    """Network output -> (prediction, variance values in [-1, 1] or None)."""
    if out.shape[1] == 2 * channels:
        return out[:, :channels], out[:, channels:]
    if out.shape[1] == channels:
        return out, None
    raise ValueError(f"model output has {out.shape[1]} channels, expected {channels} or {2 * channels}")


def predict_x0(s: Diffusion, i: int, x, pred, prediction: str = "eps"):
    if prediction == "v":  # x0 = sqrt(ab) x - sqrt(1-ab) v
        return s.at("sqrt_alphas_cumprod", i, x) * x - s.at("sqrt_one_minus_alphas_cumprod", i, x) * pred
    if prediction == "eps":  # x0 = (x - sqrt(1-ab) eps) / sqrt(ab)
        return s.at("sqrt_recip_alphas_cumprod", i, x) * x - s.at("sqrt_recipm1_alphas_cumprod", i, x) * pred
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


def ddpm_step(s: Diffusion, i: int, x, out, noise, prediction: str = "eps"):
    """One ancestral DDPM step x_i -> x_{i-1}; learned variance when out has 2x channels
    (log-variance interpolated between the clipped posterior and beta), else beta ("fixed large").
    Returns (x_prev, x0)."""
    pred, var = split_output(out, x.shape[1])
    x0 = predict_x0(s, i, x, pred, prediction)
    mean = s.at("posterior_mean_coef1", i, x) * x0 + s.at("posterior_mean_coef2", i, x) * x
    if var is not None:
        log_var = learned_log_variance(var, s.at("posterior_log_variance_clipped", i, x), s.at("log_betas", i, x))
    else:
        fixed_large = np.append(s.posterior_variance[1], s.betas[1:]) if len(s) > 1 else s.betas
        log_var = torch.tensor(np.log(fixed_large)[i]).float().to(x.device)
    if i == 0:
        return mean, x0
    return mean + torch.exp(0.5 * log_var) * noise, x0


def ddim_step(s: Diffusion, i: int, x, out, noise=None, eta: float = 0.0, prediction: str = "eps"):
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


# ----------------------------------------------------------------------------- training


def q_sample(s: Diffusion, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, flow: bool = False):
    """x_t ~ q(x_t | x0) for training timesteps ``t``: sqrt(ab) x0 + sqrt(1 - ab) noise, or with
    ``flow`` the reference's straight path x0 (1 - t/T) + noise t/T."""
    if flow:
        frac = (t.float() / len(s)).reshape(-1, *([1] * (x0.dim() - 1)))
        return x0 * (1 - frac) + frac * noise
    return s.gather("sqrt_alphas_cumprod", t, x0) * x0 + s.gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of data in [-1, 1] discretised to 256 bins (the DDPM decoder term)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _x0_from(s: Diffusion, x_t, t, pred, prediction):
    if prediction == "v":
        return s.gather("sqrt_alphas_cumprod", t, x_t) * x_t - s.gather("sqrt_one_minus_alphas_cumprod", t, x_t) * pred
    if prediction == "eps":
        return s.gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - s.gather("sqrt_recipm1_alphas_cumprod", t, x_t) * pred
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


def variational_bound(s: Diffusion, x0, x_t, t, pred, var_values, prediction="eps"):
    """The learned variance's loss term in bits per dimension: KL(q(x_prev|x_t,x0) || p(x_prev|x_t))
    for t > 0, the decoder NLL at t = 0. ``pred`` should be detached (the reference lets only the
    variance learn from this term)."""
    true_mean = s.gather("posterior_mean_coef1", t, x_t) * x0 + s.gather("posterior_mean_coef2", t, x_t) * x_t
    true_log_var = s.gather("posterior_log_variance_clipped", t, x_t)
    x0_pred = _x0_from(s, x_t, t, pred, prediction)
    mean = s.gather("posterior_mean_coef1", t, x_t) * x0_pred + s.gather("posterior_mean_coef2", t, x_t) * x_t
    log_var = learned_log_variance(var_values, true_log_var, s.gather("log_betas", t, x_t))
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def v_loss_weights(s: Diffusion, kind: str = "p2") -> np.ndarray:
    """Per-timestep weights of the reference's v-prediction loss (an x0 error). Its default "p2" is
    snr * sqrt(1 - alpha_bar), kept as the reference has it."""
    snr = s.alphas_cumprod / s.sqrt_one_minus_alphas_cumprod**2
    table = {"p2": lambda: snr * s.sqrt_one_minus_alphas_cumprod, "snr": lambda: snr, "snr+1": lambda: snr + 1,
             "sqrt_snr": lambda: np.sqrt(snr), "truncated_snr": lambda: np.maximum(snr, 1.0)}
    if kind not in table:
        raise ValueError(f"v-prediction weights must be one of {sorted(table)}, got {kind!r}")
    return table[kind]()


def training_losses(s: Diffusion, model_output: torch.Tensor, x0, x_t, t, noise, prediction: str = "eps",
                    flow: bool = False, v_weights: str = "p2") -> dict:
    """Per-sample training losses of one network output at x_t = q_sample(x0, t, noise).

    eps: MSE to the noise; v: the reference's weighted x0 error; learned variance (2x channels):
    plus the variational bound on the variance channels, with the mean frozen (the hybrid loss of
    Improved DDPM); flow: MSE to the velocity x0 - noise (no learned variance, as in the reference).
    Returns {"loss", "mse" | "flow", "vb" when learned}; each of shape (N,)."""
    c = x0.shape[1]
    if flow:
        if model_output.shape[1] != c:
            raise ValueError("flow matching has no learned variance: build the model with learn_sigma=False")
        terms = {"flow": mean_flat((model_output - (x0 - noise)) ** 2)}
        terms["loss"] = terms["flow"]
        return terms
    pred, var_values = split_output(model_output, c)
    terms = {}
    if var_values is not None:
        terms["vb"] = variational_bound(s, x0, x_t, t, pred.detach(), var_values, prediction)
    if prediction == "v":
        weights = s.gather(v_loss_weights(s, v_weights), t, x0)
        terms["mse"] = mean_flat(weights * (x0 - _x0_from(s, x_t, t, pred, "v")) ** 2)
    elif prediction == "eps":
        terms["mse"] = mean_flat((noise - pred) ** 2)
    else:
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    return terms
