"""FPDM / DiT as a ComfyUI MODEL (imported only inside ComfyUI, when a node runs).

- The network is wrapped as ``diffusion_model`` of a ``comfy.model_base.BaseModel`` with DiT's
  schedule: linear betas 1e-4 -> 0.02 over 1000 steps. ComfyUI calls that "sqrt_linear" (its
  "linear" is linear in sqrt(beta), SD's scaled-linear). Epsilon or v, optional zero-SNR, SD
  latent format (0.18215) so the core VAE Decode works.
- Class labels travel in CONDITIONING as ``fpdm_class`` and reach the network as ``y``.
- The wrapper returns the prediction channels to ComfyUI and keeps the learned-variance channels
  (per CFG half) on the run, where the FPDM DDPM sampler reads them.
- Fixed-point state (reuse, allocation, counters) belongs to one sampling run: an OUTER_SAMPLE
  wrapper, installed by the loader, puts a fresh ``ComfyRun`` into the run's transformer options.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .model import DiT
from .solver import FixedPointRun, SolverSettings

WRAPPER_KEY = "asyndm_fpdm.fpdm_run"
SETTINGS_KEY = "fpdm_settings"
RUN_KEY = "fpdm_run"

log = logging.getLogger(__name__)


class ComfyRun:
    """Per-sampling-run holder (a plain object so ComfyUI's option copies share it)."""

    def __init__(self, settings: Optional[SolverSettings]):
        self.settings = settings or SolverSettings()
        self.run: Optional[FixedPointRun] = None
        self.variance = {}  # CFG half -> learned-variance channels of the latest call
        self.step: Optional[int] = None  # set by samplers that know it (the FPDM sampler); else from sigmas

    def fixed_point_run(self, steps: int, default_iterations: int) -> FixedPointRun:
        if self.run is None or self.run.steps != steps:
            self.run = FixedPointRun(self.settings, steps, default_iterations)
        return self.run


def _step_index(transformer_options, batch_sigma, known: Optional[int] = None) -> tuple:
    """(step index, number of steps) of this call within the run's sigma schedule.

    ``known``: the index from a sampler that tells it (the FPDM sampler). Other samplers (core
    KSampler) do not, so the step is the schedule entry nearest to this call's sigma: exact for
    one-evaluation-per-step samplers; multi-evaluation ones (heun, dpm2) count their in-between
    evaluations to the nearest step."""
    sample_sigmas = transformer_options.get("sample_sigmas")
    if sample_sigmas is None or len(sample_sigmas) < 2:
        return 0, 1
    sched = sample_sigmas[:-1].float().cpu()
    if known is not None:
        return min(known, len(sched) - 1), len(sched)
    sigma = float(batch_sigma.flatten()[0]) if batch_sigma is not None else float(sched[0])
    return int((sched - sigma).abs().argmin()), len(sched)


class ComfyDiT(torch.nn.Module):
    """``diffusion_model`` for ComfyUI: (x, timesteps, y=labels, transformer_options) -> prediction."""

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit

    @property
    def dtype(self):
        return self.dit.dtype

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kwargs):
        dit = self.dit
        cfg = dit.config
        if y is None:
            labels = torch.full((x.shape[0],), dit.null_class, dtype=torch.long, device=x.device)
        else:
            labels = y.reshape(-1).long().to(x.device)
            labels = torch.where(labels < 0, torch.full_like(labels, dit.null_class), labels)  # -1: null class
            if int(labels.max()) > dit.null_class:
                raise ValueError(f"class index {int(labels.max())} is out of range: this model has "
                                 f"{dit.null_class} classes (0..{dit.null_class - 1})")
            if labels.numel() != x.shape[0]:
                raise ValueError(f"got {labels.numel()} class labels for a batch of {x.shape[0]}")
        holder: Optional[ComfyRun] = transformer_options.get(RUN_KEY)
        halves = list(transformer_options.get("cond_or_uncond") or [0])
        x = x.to(dit.dtype)
        if cfg.fixed_point:
            if holder is None:  # no run wrapper (model built by hand): run settings, no reuse
                s = transformer_options.get(SETTINGS_KEY) or SolverSettings()
                holder = ComfyRun(SolverSettings(**{**s.__dict__, "reuse": False}))
            step, steps = _step_index(transformer_options, transformer_options.get("sigmas"), holder.step)
            run = holder.fixed_point_run(steps, cfg.iterations)
            out = run.evaluate(dit, x, timesteps, labels, step, halves)
        else:
            out = dit(x, timesteps, labels)
        c = cfg.in_channels
        if out.shape[1] == 2 * c and holder is not None:
            for key, chunk in zip(halves, out[:, c:].chunk(len(halves))):
                holder.variance[key] = chunk.detach()
        return out[:, :c]


def _outer_sample_wrapper(executor, *args, **kwargs):
    """Give every sampling run its own fixed-point state: the reset of invariant 8."""
    import comfy.model_patcher

    guider = executor.class_obj
    original = guider.model_options
    options = comfy.model_patcher.create_model_options_clone(original)
    to = options.setdefault("transformer_options", {})
    to[RUN_KEY] = ComfyRun(to.get(SETTINGS_KEY))
    guider.model_options = options
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original


def reference_cfg_function(args):
    """CFG on the first 3 channels only, the rest from the conditional prediction (the reference's
    default, for exact reproduction). ComfyUI passes x - denoised, linear in eps per channel."""
    cond, uncond, scale = args["cond"], args["uncond"], args["cond_scale"]
    out = cond.clone()
    out[:, :3] = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
    return out


def sampling_settings(config) -> dict:
    return {"beta_schedule": "sqrt_linear", "linear_start": 1e-4, "linear_end": 0.02, "timesteps": 1000,
            "zsnr": bool(config.zero_terminal_snr)}


def build_model_patcher(dit: DiT, dtype=None):
    """A ComfyUI ModelPatcher whose model samples like DiT/FPDM."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.supported_models_base

    cfg = dit.config

    class FPDMComfyConfig(comfy.supported_models_base.BASE):
        unet_config = {}
        unet_extra_config = {}
        latent_format = comfy.latent_formats.SD15
        memory_usage_factor = 1.0

    FPDMComfyConfig.sampling_settings = sampling_settings(cfg)
    model_config = FPDMComfyConfig({"disable_unet_model_creation": True})
    model_type = comfy.model_base.ModelType.V_PREDICTION if cfg.prediction == "v" else comfy.model_base.ModelType.EPS
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    if dtype is None:
        dtype = mm.unet_dtype(supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
    base = __getattr__("FPDMBaseModel")(model_config, model_type=model_type, device=offload_device)
    base.diffusion_model = ComfyDiT(dit.to(device=offload_device, dtype=dtype))
    base.fpdm_config = cfg
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload_device)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper)
    return patcher


def _base_model_class():
    import comfy.conds
    import comfy.model_base

    class _FPDMBaseModel(comfy.model_base.BaseModel):
        def extra_conds(self, **kwargs):
            out = {}
            labels = kwargs.get("fpdm_class")
            if labels is None:  # e.g. a text conditioning: treat as unconditional
                labels = torch.tensor([-1])
            out["y"] = comfy.conds.CONDRegular(torch.as_tensor(labels).reshape(-1).long())
            return out

        def extra_conds_shapes(self, **kwargs):
            return {}

    return _FPDMBaseModel


def __getattr__(name):
    if name == "FPDMBaseModel" and "FPDMBaseModel" in globals():
        return globals()["FPDMBaseModel"]
    if name == "FPDMBaseModel":  # defined lazily: comfy is importable only inside ComfyUI
        cls = _base_model_class()
        globals()["FPDMBaseModel"] = cls
        return cls
    raise AttributeError(name)


def fpdm_config_of(model_patcher):
    cfg = getattr(model_patcher.model, "fpdm_config", None)
    if cfg is None:
        raise ValueError("this MODEL is not an FPDM/DiT model: load it with the 'Load FPDM / DiT Checkpoint' node")
    return cfg
