"""The reference's samplers as ComfyUI SAMPLER functions (k-diffusion style: model, x, sigmas).

ComfyUI integrates in sigma space (x = x_vp * sqrt(1 + sigma^2), alpha_bar = 1 / (1 + sigma^2)).
Each step maps to the variance-preserving form, takes the reference's DDPM step with the
learned variance the network predicted (kept by ``ComfyDiT``), and maps back. With the respaced
sigmas of ``respaced_sigmas`` this is the reference's p_sample_loop step for step.
"""

from __future__ import annotations

import math

import torch

from .diffusion import learned_log_variance, make_diffusion, posterior

RUN_KEY = "fpdm_run"


def respaced_sigmas(steps: int, zero_snr: bool = False) -> torch.Tensor:
    """The reference's respaced timesteps as ComfyUI sigmas (descending, ending in 0)."""
    s = make_diffusion(steps, zero_snr=zero_snr)
    ab = torch.tensor(s.alphas_cumprod, dtype=torch.float64).flip(0)
    ab = ab.clamp_min(4.8973451890853435e-08)  # ComfyUI's own floor for a zero-SNR last step
    sig = ((1 - ab) / ab).sqrt()
    return torch.cat([sig, sig.new_zeros(1)]).float()


def _interrupt():
    try:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
    except ImportError:
        pass


@torch.no_grad()
def sample_fpdm(model, x, sigmas, extra_args=None, callback=None, disable=None, method="ddpm", eta=0.0):
    """DDPM with the learned variance (method "ddpm"), or DDIM (method "ddim", eta)."""
    from tqdm.auto import trange

    extra_args = {} if extra_args is None else extra_args
    seed = extra_args.get("seed")
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed if seed is not None else 0)
    to = extra_args.get("model_options", {}).get("transformer_options", {})
    s_in = x.new_ones([x.shape[0]])
    prev_posterior = None
    for i in trange(len(sigmas) - 1, disable=disable):
        _interrupt()
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        holder = to.get(RUN_KEY)
        if holder is not None:
            holder.step = i  # the fixed-point allocation reads the step from here
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        ab, ab_prev = 1.0 / (1.0 + s * s), 1.0 / (1.0 + s_next * s_next)
        x_vp = x * math.sqrt(ab)
        beta, post_var, coef1, coef2 = (float(v) for v in posterior(ab, ab_prev))
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        if method == "ddim":
            eps = (x_vp - math.sqrt(ab) * denoised) / math.sqrt(1.0 - ab)
            sigma_t = eta * math.sqrt(post_var) if s_next > 0 else 0.0
            x_vp = math.sqrt(ab_prev) * denoised + math.sqrt(max(1.0 - ab_prev - sigma_t**2, 0.0)) * eps + sigma_t * noise
        else:
            mean = coef1 * denoised + coef2 * x_vp
            if s_next > 0:
                # log-variance clipped like the reference: at the last step use the previous posterior
                min_log = math.log(post_var if post_var > 0 else (prev_posterior or beta))
                max_log = math.log(beta)
                v = holder.variance.get(0) if holder is not None else None
                if v is not None and v.shape == x.shape:
                    log_var = learned_log_variance(v.to(x), min_log, max_log)
                else:  # no learned variance: "fixed large"
                    log_var = torch.full_like(x, max_log)
                x_vp = mean + torch.exp(0.5 * log_var) * noise
            else:
                x_vp = mean
        prev_posterior = post_var
        x = x_vp / math.sqrt(ab_prev)
    return x


def fpdm_sampler(method="ddpm", eta=0.0):
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sample_fpdm, extra_options={"method": method, "eta": eta})
