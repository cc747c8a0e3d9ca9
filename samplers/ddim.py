"""DDIM step with a timestep per pixel (DDIM paper eqs. 12 and 16, ᾱ gathered per pixel).

Works in the variance-preserving parametrisation x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε.
``t`` and ``t_prev`` are integer tensors broadcastable to the sample, e.g. (B, 1, H, W);
scalars give the ordinary synchronous step.
"""

from typing import Optional, Tuple

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def predict_x0_eps(model_output, sample, alpha_prod_t, prediction_type="epsilon"):
    """(x0, ε) from the model output, for each prediction type."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5), model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_prod_t ** (0.5) * model_output) / beta_prod_t ** (0.5)
    if prediction_type == "v_prediction":
        return (
            (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output,
            (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample,
        )
    raise ValueError(f"prediction type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    t,
    t_prev,
    alphas_cumprod: torch.Tensor,
    *,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    noise: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step from t to t_prev. Returns (x_{t_prev}, predicted x0)."""
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    t_prev = torch.as_tensor(t_prev, device=alphas_cumprod.device)
    alpha_prod_t = alphas_cumprod[t].to(sample.device)
    alpha_prod_t_prev = alphas_cumprod[t_prev].to(sample.device)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev

    pred_x0, pred_eps = predict_x0_eps(model_output, sample, alpha_prod_t, prediction_type)

    # σ_t(η) = η sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)) sqrt(1 − ᾱ_t/ᾱ_prev)
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_eps
    prev_sample = alpha_prod_t_prev ** (0.5) * pred_x0 + direction
    if eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor for the stochastic part of the step")
        prev_sample = prev_sample + std_dev_t * noise
    return prev_sample.type(sample.dtype), pred_x0.type(sample.dtype)
