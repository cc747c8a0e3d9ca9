"""AsynDM sampling inside ComfyUI's sampling pipeline.

The engine's loop (samplers/loop.py) runs as a ComfyUI ``KSAMPLER`` function, so ComfyUI does
what it does for every sampler: loads the models through model management, prepares the
conditioning (areas, masks, ControlNet, timestep ranges), applies CFG and the model's
wrappers, reports progress and previews. Our loop works in VP/timestep space; for each model
call it converts x to sigma space per pixel, hands ComfyUI's model one sigma per image (the
smallest sigma of the image's map — the background on the normal schedule) and lets the
backend patches (backends/comfy_unet.py) evaluate the UNet per pixel. The model returns the
guided denoised latent per pixel; DDIM then takes it as an x0 prediction.

Samplers: DDIM with eta exactly as the paper. In sigma space DDIM(eta=0) *is* Euler, and
DDIM(eta) is Euler ancestral(eta) (k-diffusion's σ_up/σ_down equal DDIM's σ_t(η) after the
change of variables), per pixel — so those are the same sampler here.

Start and end: as the reference, x at the first evaluated timestep is pure noise (ComfyUI's
``max_denoise`` scaling, sqrt(1 + σ²)), and the last step lands on timestep 0 (ᾱ_0, σ ≈ 0.029)
rather than on sigma 0 where ComfyUI's samplers end; ``last_step="clean"`` ends on sigma 0.
The returned latent is in ComfyUI's (sigma-space) convention.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from .backends.comfy_unet import PixelContext, patch_model, sigma_table
from .loop import sample as loop_sample
from .schedule import AsyncSchedule, ddim_leading_timesteps
from .tokens import parse_strength

MODE_NAMES = {"AsynDM": "asyn", "DMconcave": "concave", "vanilla": "vanilla"}
MASK_NAMES = {"dynamic": "dynamic", "static": "static", "mask input": "external"}
LAST_STEPS = ("timestep 0 (paper)", "clean (sigma 0, like ComfyUI)")
TARGETS_KEY = "asyndm_targets"
DEFAULT_K = 0.7


@dataclass
class Targets:
    words: List[str] = field(default_factory=list)
    ks: List[float] = field(default_factory=list)
    positions: List[List[int]] = field(default_factory=list)
    context_len: int = 77

    @property
    def anchors(self):
        return [p[0] for p in self.positions]


@dataclass
class RunInfo:
    """What a run leaves for the preview nodes."""

    ks: List[float]
    words: List[str]
    timestep_maps: List[torch.Tensor]
    masks: List[Optional[torch.Tensor]]
    item_maps: List[Optional[torch.Tensor]]
    latents: Optional[torch.Tensor] = None


def targets_of(conditioning) -> Optional[Targets]:
    """The targets attached by the AsynDM text-encode node (first entry that carries any)."""
    for _, d in conditioning or []:
        t = d.get(TARGETS_KEY)
        if t:
            return Targets(list(t["words"]), [float(k) for k in t["ks"]], [list(p) for p in t["positions"]],
                           int(t.get("context_len", 77)))
    return None


def parse_ks(text: str) -> List[float]:
    """``"0.7, 0.5"`` → [0.7, 0.5]; blank → []."""
    return [parse_strength(p, "strengths") for p in (text or "").split(",") if p.strip()]


def resolve_ks(targets: Optional[Targets], override: Sequence[float], n_needed: Optional[int] = None) -> List[float]:
    """Strengths: the override (one value for all, or one per target) else the targets' own."""
    n = len(targets.ks) if targets else (n_needed or 0)
    if not override:
        return list(targets.ks) if targets else []
    if len(override) == 1:
        return [override[0]] * max(n, 1)
    if targets and len(override) != n:
        raise ValueError(f"strengths: {len(override)} values for {n} targets ({', '.join(targets.words)}); "
                         "give one value, or one per target")
    return list(override)


def external_item_masks(mask: torch.Tensor, n_items: int, batch: int) -> torch.Tensor:
    """A ComfyUI MASK (H,W) or (M,H,W) → engine masks (1 or B, N', H, W).

    M == items (> 1): one frame per target, shared by every image; M == batch × items: image-major
    frames as the mask extractor writes them; otherwise M == 1 or M == batch: one region per
    image, a single item.
    """
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    frames = m.shape[0]
    if n_items > 1 and frames == n_items:
        return m[None]
    if n_items > 1 and frames == batch * n_items:
        return m.view(batch, n_items, *m.shape[1:])
    if frames not in (1, batch):
        raise ValueError(f"the MASK has {frames} frames: give 1, one per image of the batch ({batch}), "
                         f"one per target ({n_items}) or one per image and target ({batch * n_items})")
    return m[:, None]


def _step_noise_sampler(seed: int, shape, batch_index, device, dtype):
    """eta > 0: fresh noise per step, one generator per batch index so image i never depends on
    the batch size."""
    inds = list(batch_index) if batch_index is not None else list(range(shape[0]))
    gens = [torch.Generator().manual_seed((seed + 0x5EED + 7919 * int(i)) % (2**63)) for i in inds]

    def noise(_step):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens]).to(device, dtype)

    return noise


def asyndm_sample(
    model,
    positive,
    negative,
    latent: dict,
    *,
    seed: int,
    steps: int,
    cfg: float,
    eta: float = 0.0,
    curve: str = "bin",
    mode: str = "AsynDM",
    mask_source: str = "dynamic",
    strengths: Sequence[float] = (),
    mask: Optional[torch.Tensor] = None,
    static_masks: Optional[torch.Tensor] = None,
    mask_thr: float = 1.0,
    last_step: str = LAST_STEPS[0],
    capture_vanilla: bool = False,
    callback=None,
    disable_pbar: bool = False,
):
    """Run AsynDM with ComfyUI's machinery. Returns (latent dict, RunInfo)."""
    import comfy.model_management
    import comfy.sample
    import comfy.samplers

    mode_key = MODE_NAMES.get(mode, mode)
    source_key = MASK_NAMES.get(mask_source, mask_source)
    if "noise_mask" in latent:
        raise ValueError(
            "AsynDM cannot inpaint: this latent has a noise mask (from 'Set Latent Noise Mask' or an inpaint "
            "encoder). Each pixel already has its own schedule, which conflicts with keeping unmasked pixels "
            "at the image's sigma. Use a latent without a noise mask, or the core KSampler for inpainting."
        )
    targets = targets_of(positive)
    ks = resolve_ks(targets, strengths)
    needs_targets = (mode_key == "asyn" and source_key in ("dynamic", "static")) or capture_vanilla
    if needs_targets and not targets:
        raise ValueError(
            f"{mode} with a {mask_source} mask needs to know the prompt's key words: encode the positive prompt "
            "with 'AsynDM Text Encode (targets)', e.g. targets 'rabbit:0.7, basketball:0.7'."
        )
    if mode_key in ("concave",) and not ks:
        ks = [DEFAULT_K]
    external = None
    if mode_key == "asyn" and source_key == "external":
        if mask is None:
            raise ValueError("mask source 'mask input' needs a MASK connected to the 'mask' input")
        if not ks:
            ks = [DEFAULT_K]
        n_items = len(ks)
        external = external_item_masks(mask, n_items, latent["samples"].shape[0])
        if external.shape[1] == 1 and n_items > 1:
            ks = [max(ks)]  # one painted region: it lags with the strongest strength
    if mode_key == "asyn" and source_key == "static" and static_masks is None:
        # the reference's static mode: a vanilla pass first, its attention averaged over the steps
        static_masks, _, _ = extract_masks(
            model, positive, negative, latent, seed=seed, steps=steps, cfg=cfg, eta=eta, curve=curve,
            strengths=ks, mask_thr=mask_thr, last_step=last_step, callback=callback, disable_pbar=disable_pbar,
        )

    ctx = PixelContext(targets.positions if targets else (), targets.context_len if targets else 77)
    patched, _ = patch_model(model, ctx)

    latent_image = comfy.sample.fix_empty_latent_channels(patched, latent["samples"])
    batch_index = latent.get("batch_index")
    noise = comfy.sample.prepare_noise(latent_image, seed, batch_index)

    sig = sigma_table(patched)
    alphas = 1.0 / (1.0 + sig.double() ** 2)
    alphas = alphas.float()
    if last_step == LAST_STEPS[1]:
        alphas = alphas.clone()
        alphas[0] = 1.0  # the final DDIM step lands on the clean latent (σ = 0)
    schedule = AsyncSchedule(steps, num_train_timesteps=len(sig), steps_offset=1, curve=curve)
    ts = ddim_leading_timesteps(steps, len(sig), 1)
    sigmas = torch.cat([sig[ts[:-1]], (1.0 / alphas[0] - 1.0).clamp(min=0).sqrt()[None]])

    info = RunInfo(ks=list(ks), words=list(targets.words) if targets else [], timestep_maps=[], masks=[],
                   item_maps=[])

    def sampler_function(model_k, x, sigmas_in, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        device = x.device
        sig_d = sig.to(device)
        x_vp = x / (1.0 + sigmas_in[0].to(device) ** 2) ** 0.5

        def denoise(xv, t, capture):
            s = sig_d[t]
            x_ve = xv * ((1.0 + s**2) ** 0.5)[:, None]
            with ctx.call(t, s, capture):
                x0 = model_k(x_ve, s.flatten(1).amin(dim=1), **extra_args)
                maps = ctx.item_maps()
            if ctx.capture and maps is None:
                raise RuntimeError(
                    "AsynDM captured no cross-attention of the positive prompt in this step (another patch may "
                    "bypass the UNet's cross-attention, or the positive was not part of the model call). "
                    "Use mask source 'mask input' instead of 'dynamic'/'static' with this model."
                )
            return x0, maps

        def step_callback(i, x_i, x0, t):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if callback is not None:
                callback({"i": i, "denoised": x0, "x": x_i, "sigma": sigmas_in[min(i, len(sigmas_in) - 1)]})

        noise_sampler = None
        if eta > 0:
            noise_sampler = _step_noise_sampler(seed, x.shape, batch_index, device, x.dtype)
        result = loop_sample(
            denoise, x_vp, alphas.to(device), schedule, ks,
            mode=mode_key, mask_source=source_key if mode_key == "asyn" else "dynamic",
            external_masks=external, static_masks=static_masks,
            anchors=targets.anchors if targets else None, mask_thr=mask_thr, eta=eta,
            prediction_type="sample", noise_sampler=noise_sampler, callback=step_callback,
            capture_vanilla=capture_vanilla,
        )
        info.timestep_maps = [t.cpu() for t in result.timestep_maps]
        info.masks = [m.cpu() if m is not None else None for m in result.masks]
        info.item_maps = [m.cpu() if m is not None else None for m in result.item_maps]
        info.latents = result.latents
        return result.latents / alphas[0].to(device) ** 0.5  # every pixel ends at timestep 0

    class AsynKSampler(comfy.samplers.KSAMPLER):  # noqa: D401
        def max_denoise(self, model_wrap, sigmas):
            return True  # x at the first timestep is pure noise, as in the reference (DDIM)

    samples = comfy.sample.sample_custom(
        patched, noise, cfg, AsynKSampler(sampler_function), sigmas, positive, negative, latent_image,
        noise_mask=None, callback=callback, disable_pbar=disable_pbar, seed=seed,
    )
    out = latent.copy()
    out["samples"] = samples
    return out, info


def extract_masks(model, positive, negative, latent, *, seed, steps, cfg, strengths=(), mask_thr=1.0, **kwargs):
    """A vanilla run that records the items' attention at every step.

    Returns (binary item masks (B, N, H, W) at latent size, one item per pixel by priority k;
    mean attention maps (B, N, h, w); (latent dict, RunInfo) of the vanilla run).
    """
    from .masks import build_item_masks

    out, info = asyndm_sample(model, positive, negative, latent, seed=seed, steps=steps, cfg=cfg,
                              mode="vanilla", strengths=strengths, capture_vanilla=True, **kwargs)
    maps = [m for m in info.item_maps if m is not None]
    if not maps:
        raise RuntimeError("no attention was captured: the positive conditioning carries no targets")
    mean_maps = torch.stack(maps).mean(dim=0)
    size = latent["samples"].shape[-2:]
    masks = build_item_masks(mean_maps, info.ks, size, mask_thr)
    return masks, mean_maps, (out, info)
