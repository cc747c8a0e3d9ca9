"""AsynDM as a ComfyUI sampler: one KSAMPLER subclass serves the Asynchronous KSampler node, the
SAMPLER node (SamplerCustom / SamplerCustomAdvanced with any guider and SIGMAS) and the mask
extractor.

ComfyUI does what it does for every sampler (model loading, conditioning with areas, masks,
ControlNet and timestep ranges, CFG or the guider, model wrappers, progress, previews). Our
``sample`` builds the run's sigma plan from the SIGMAS it is given, asks the guider for a
denoised latent with a per-pixel sigma map riding in transformer_options (the backend turns it
into per-pixel timesteps), and steps with the per-pixel sampler of the chosen name.

- Start: from pure noise every pixel starts at its own first sigma (the paper's start); a
  partly noised latent (denoise < 1) starts every pixel at the first sigma.
- Inpainting: the latent's noise mask is applied per pixel — outside it the input latent is
  re-noised to each pixel's own sigma, as ComfyUI does with the image's sigma.
- Noise: ComfyUI's own noise samplers (seeded default / Brownian tree), driven by the
  background's sigmas (pixel_samplers.py).
"""

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from ..clock import ClockModel, NoiseRule, PixelNoise, make_clock, noise_rule
from ..engine import initial_latent, plan_model, run as engine_run, sample as engine_sample
from ..pixel_samplers import ETA_SAMPLERS, SAMPLERS, SamplerInfo
from ..plan import DEFAULT_K, SigmaPlan
from .conditioning import external_item_masks, resolve_ks, targets_of

MODE_NAMES = {"AsynDM": "asyn", "DMconcave": "concave", "vanilla": "vanilla"}
MASK_NAMES = {"dynamic": "dynamic", "static": "static", "mask input": "external"}
LAST_STEPS = ("timestep 0 (paper)", "clean (sigma 0, like ComfyUI)")
PAPER_SCHEDULER = "asyndm_paper"
# ComfyUI 0.3.64's KSampler.SAMPLERS, for node schemas read without ComfyUI (tests, docs)
COMFY_SAMPLERS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
    "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc",
    "uni_pc_bh2")
NO_NATIVE_FLOW = ("dpmpp_2s_ancestral",)  # native samplers without a flow form: ComfyUI's RF one, clocked
DISCARD_PENULTIMATE = ("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2")  # as the core KSampler does


def sampler_names() -> List[str]:
    """Every sampler ComfyUI lists: the native per-pixel ones (SAMPLERS) and, for the rest,
    ComfyUI's own function through the change of clock (clock.py). Read from ComfyUI when it is
    loaded (never imported here: the pack imports cheaply)."""
    import sys

    comfy_samplers = sys.modules.get("comfy.samplers")
    if comfy_samplers is not None:
        return list(comfy_samplers.KSampler.SAMPLERS)
    return list(COMFY_SAMPLERS)


def sampler_info(name: str, function: Optional[Callable] = None) -> SamplerInfo:
    """The record of a sampler: the native per-pixel one of that name (pixel_samplers.SAMPLERS), or
    for any other function (ComfyUI's, another pack's) one read from ComfyUI's naming: Brownian tree
    ("dpmpp_*sde*"), tree on the device ("_gpu"). Nothing to add for a sampler without a native
    version; its noise rule is clock.noise_rule's."""
    if function is None and name in SAMPLERS:
        return SAMPLERS[name]
    brownian = name.startswith(("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"))
    return SamplerInfo(function, brownian, not name.endswith("_gpu"))


def _function_name(fn) -> str:
    """sample_euler → euler, dpm_fast_function → dpm_fast (ComfyUI's naming)."""
    name = getattr(fn, "__name__", type(fn).__name__)
    name = name[len("sample_"):] if name.startswith("sample_") else name
    return name[:-len("_function")] if name.endswith("_function") else name


# ComfyUI 0.3.6x's schedulers, for node schemas read without ComfyUI (tests, docs)
COMFY_SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                    "linear_quadratic", "kl_optimal")


def scheduler_names() -> List[str]:
    try:
        import comfy.samplers

        names = list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:
        names = list(COMFY_SCHEDULERS)
    return [PAPER_SCHEDULER] + names


def time_axis(model_sampling):
    """The plan's time axis of a ComfyUI model sampling (time_axis.py), chosen by the ``sigma``
    function the object really uses (a subclass that overrides it gets its table)."""
    import comfy.model_sampling as ms

    from ..time_axis import FluxAxis, FlowAxis, TableAxis

    sigma_fn = type(model_sampling).sigma
    if sigma_fn is ms.ModelSamplingDiscreteFlow.sigma:  # SD3/SD3.5, AuraFlow, ModelSamplingSD3/AuraFlow nodes
        return FlowAxis(model_sampling.shift)
    if sigma_fn is ms.ModelSamplingFlux.sigma:  # Flux, the ModelSamplingFlux node
        return FluxAxis(model_sampling.shift)
    sigmas = getattr(model_sampling, "sigmas", None)
    if sigmas is None:
        raise ValueError(f"AsynDM needs the model sampling's table of sigmas; {type(model_sampling).__name__} has "
                         "none. Remove the model-sampling patch or use a model ComfyUI ships a sampling for.")
    logs = getattr(model_sampling, "log_sigmas", None)
    return TableAxis(sigmas.float().cpu(), None if logs is None else logs.float().cpu())


def max_timestep(model_sampling) -> float:
    """The top of the model's timestep scale, what the previews draw as white: the paper's 1001
    on table models (timesteps are table indices, SD images unchanged), else the model's timestep
    of its largest sigma (flow models: σ = 1 → Flux 1, SD3 and Wan 1000)."""
    import comfy.model_sampling as ms

    if isinstance(model_sampling, ms.ModelSamplingDiscrete):
        return 1001.0
    top = float(model_sampling.timestep(torch.as_tensor(float(model_sampling.sigma_max)).reshape(1))[0])
    return top if top > 0 else 1001.0


# Image pixels per latent pixel of the latent formats of ComfyUI 0.3.64 that are not an 8× VAE's
# (later ComfyUI versions declare it on the format as ``spacial_downscale_ratio``, read first).
IMAGE_SCALES = {"ChromaRadiance": 1, "HunyuanImage21": 32, "HunyuanImage21Refiner": 16, "Wan22": 16}


def image_scale(latent_format) -> int:
    """Image pixels per latent pixel along a side (the VAE's spatial downscale) of a model's latent
    format: what the previews enlarge a run's maps by, so that they have the image's size. 8 where
    the format says nothing (a preview is cosmetic: never an error)."""
    ratio = getattr(latent_format, "spacial_downscale_ratio", None)
    if ratio is None:
        names = [c.__name__ for c in type(latent_format).__mro__]
        ratio = next((IMAGE_SCALES[n] for n in names if n in IMAGE_SCALES), 8)
    return int(ratio) if isinstance(ratio, (int, float)) and ratio >= 1 else 8


class ComfyModelSampling:
    """ComfyUI's model_sampling seen as the plan's model sampling: the time ``axis`` (σ ↔ position),
    what the model is fed (``timestep``: the model's own), noise scaling."""

    def __init__(self, model_sampling):
        import comfy.model_sampling as ms

        from ..backends.comfy_call import pixelwise

        self.ms, self._pixelwise = model_sampling, pixelwise
        self.flow = isinstance(model_sampling, ms.CONST)
        self.sigma_min, self.sigma_max = model_sampling.sigma_min, model_sampling.sigma_max
        self.sigmas = model_sampling.sigmas
        self.axis = time_axis(model_sampling)
        self.max_timestep = max_timestep(model_sampling)

    def timestep(self, sigma):
        """The model's timestep for σ: what the model is fed (not a position on the axis)."""
        return self.ms.timestep(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)).float().view(
            torch.as_tensor(sigma).shape)

    def percent_to_sigma(self, percent):  # flow SDE samplers' first-sigma offset (pixel_samplers._snr_safe)
        return self.ms.percent_to_sigma(percent)

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        if not torch.is_tensor(sigma) or sigma.numel() == 1:
            return self.ms.noise_scaling(torch.as_tensor(sigma).reshape(-1)[:1], noise, latent, max_denoise)
        return self._pixelwise(lambda s, n, l: self.ms.noise_scaling(s, n, l, max_denoise), sigma, noise,
                               latent.expand_as(noise).to(noise.dtype))


@dataclass
class AsynOptions:
    mode: str = "asyn"  # asyn | concave | vanilla
    mask_source: str = "dynamic"  # dynamic | static | external
    curve: str = "bin"
    strengths: Sequence[float] = ()
    mask: Optional[torch.Tensor] = None  # a ComfyUI MASK for mask_source "external"
    static_masks: Optional[torch.Tensor] = None  # (B, N, H, W): skip the static pre-pass
    mask_thr: float = 1.0
    capture_all: bool = False  # record attention at every step (the mask extractor)


def node_sigmas(model, scheduler: str, steps: int, denoise: float = 1.0, sampler_name: str = "ddim",
                last_step: str = LAST_STEPS[0]) -> torch.Tensor:
    """The core KSampler's sigmas (denoise → the tail of a longer schedule), plus the paper's
    schedule; ``last_step`` applies to the paper's schedule (other schedules end at sigma 0)."""
    import comfy.samplers

    from ..schedulers import paper_sigmas

    ms = model.get_model_object("model_sampling")

    def full(n):
        discard = sampler_name in DISCARD_PENULTIMATE
        n = n + 1 if discard else n
        if scheduler == PAPER_SCHEDULER:
            sig = paper_sigmas(ComfyModelSampling(ms), n, last_timestep_zero=last_step == LAST_STEPS[0])
        elif scheduler in comfy.samplers.KSampler.SCHEDULERS:
            sig = comfy.samplers.calculate_sigmas(ms, scheduler, n).float().cpu()
        else:
            raise ValueError(f"unknown scheduler {scheduler!r}: use one of {', '.join(scheduler_names())}")
        return torch.cat([sig[:-2], sig[-1:]]) if discard else sig

    if denoise is None or denoise > 0.9999:
        return full(steps)
    if denoise <= 0:
        raise ValueError("denoise must be above 0: at 0 nothing would be denoised")
    return full(int(steps / denoise))[-(steps + 1):]


def _areas(conds: dict) -> dict:
    """cond uuid → (y, x) of its area crop (latent units), for the backends to place each batch chunk."""
    out = {}
    for entries in (conds or {}).values():
        for c in entries or []:
            a = c.get("area") if isinstance(c, dict) else None
            if a is None or isinstance(a[0], str) or len(a) != 4 or "uuid" not in c:
                continue
            out[c["uuid"]] = (int(a[2]), int(a[3]))
    return out


def _sampler_class():
    import comfy.samplers

    class AsynKSAMPLER(comfy.samplers.KSAMPLER):
        """A KSAMPLER whose sampler steps every latent pixel on its own sigma: a native per-pixel
        sampler (``function`` None) or any k-diffusion-style function through the change of clock."""

        def __init__(self, name: str, options: AsynOptions, extra_options=None, function: Optional[Callable] = None,
                     inpaint_options=None, batch_index=None, records: Optional[list] = None):
            super().__init__(function, extra_options or {}, inpaint_options or {})
            self.name, self.options = name, options
            self.batch_index = batch_index  # the latent's batch_index, for per-image noise streams
            self.records = records  # where each run's RunRecord goes (the KSampler node's run output)

        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            return _sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                           disable_pbar)

    return AsynKSAMPLER


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def asyn_sampler(name: str, options: AsynOptions, eta: Optional[float] = None, s_noise: float = 1.0, *,
                 batch_index=None, records: Optional[list] = None):
    """The SAMPLER object (for SamplerCustom, or comfy.sample.sample_custom). A native per-pixel
    sampler where the pack has one (pixel_samplers.SAMPLERS), else ComfyUI's own function of that
    name through the change of clock; ``eta`` None keeps the sampler's own default."""
    if name in SAMPLERS:
        info, extra = SAMPLERS[name], {}
        if info.eta is not None and eta is not None:
            extra["eta"] = float(eta)
        if info.s_noise:
            extra["s_noise"] = float(s_noise)
        return _sampler_class()(name, options, extra, batch_index=batch_index, records=records)
    names = sampler_names()
    if name not in names:
        raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(names)}")
    import comfy.samplers

    return from_ksampler(comfy.samplers.sampler_object(name), options, eta=eta, s_noise=s_noise, name=name,
                         batch_index=batch_index, records=records)


def from_ksampler(ksampler, options: AsynOptions, eta: Optional[float] = None, s_noise: Optional[float] = None,
                  name: Optional[str] = None, batch_index=None, records: Optional[list] = None):
    """Any KSAMPLER (KSamplerSelect, the custom-sampling sampler nodes with their options, another
    pack's) made asynchronous: its own function and options, every pixel on its own clock."""
    import comfy.samplers

    if isinstance(ksampler, comfy.samplers.KSAMPLER) and hasattr(ksampler, "options"):
        raise ValueError("this SAMPLER is already asynchronous (an AsynDM sampler): connect the plain sampler")
    if not isinstance(ksampler, comfy.samplers.KSAMPLER) or not callable(getattr(ksampler, "sampler_function", None)):
        raise ValueError(
            f"the SAMPLER is a {type(ksampler).__module__}.{type(ksampler).__qualname__}, not a KSAMPLER: AsynDM can "
            "make asynchronous only samplers built on ComfyUI's KSAMPLER (KSamplerSelect, the sampling/custom_sampling/"
            "samplers nodes, and packs that return comfy.samplers.KSAMPLER); use the 'AsynDM Sampler' node instead")
    fn = ksampler.sampler_function
    extra = dict(ksampler.extra_options or {})
    if eta is not None and _accepts(fn, "eta"):
        extra["eta"] = float(eta)
    if s_noise is not None and _accepts(fn, "s_noise"):
        extra["s_noise"] = float(s_noise)
    return _sampler_class()(name or _function_name(fn), options, extra, fn, dict(ksampler.inpaint_options or {}),
                            batch_index=batch_index, records=records)


def _noise_sampler(info: SamplerInfo, x, sigmas, seed, batch_index=None):
    """ComfyUI's noise samplers, one stream per image (seed + batch index), so image i never
    depends on the batch size (DESIGN.md invariant 5); for one image they are ComfyUI's exactly."""
    from comfy.k_diffusion import sampling as kd

    seed = 0 if seed is None else int(seed)
    seeds = [seed + int(i) for i in (batch_index if batch_index is not None else range(x.shape[0]))]
    if info.brownian:
        positive = sigmas[sigmas > 0]
        return kd.BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=seeds, cpu=info.tree_on_cpu)
    gens = [torch.Generator(device=x.device).manual_seed(s) for s in seeds]

    def draw(sigma, sigma_next):
        return torch.cat([torch.randn((1, *x.shape[1:]), dtype=x.dtype, device=x.device, generator=g) for g in gens])

    return draw


def _clock_run(sampler, model_wrap, plan, model_fn, x, sigmas, extra_args, callback, disable, seed, flow,
               batch_index=None, fn=None):
    """ComfyUI's own sampler function (``fn``, default the sampler's), unmodified, stepping the
    background's sigmas; every pixel on its own sigma through the change of clock (clock.py), with
    its noise scaled per pixel."""
    fn = fn or sampler.sampler_function
    opts = dict(sampler.extra_options)
    name, tau = noise_rule(sampler.name, flow)
    per_pixel = plan.mode != "vanilla"
    rule = None
    if name and per_pixel:
        rule = NoiseRule(name, eta=float(opts.get("eta", _default(fn, "eta", 1.0))),
                         tau_func=opts.get("tau_func") or _sa_tau(model_wrap, name), scaler=opts.get("noise_scaler"),
                         tau=tau)
    clock = make_clock(sigmas, plan.step, rule)
    model = ClockModel(plan_model(model_fn, plan), clock, inner_model=model_wrap,
                       base_options=extra_args.get("model_options"))
    if name and "noise_sampler" not in opts and _accepts(fn, "noise_sampler"):
        base = _noise_sampler(sampler_info(sampler.name, fn), x, sigmas, seed, batch_index)
        opts["noise_sampler"] = base if rule is None else PixelNoise(clock, base, rule)
    x = clock.unscale(x, float(sigmas[0]))
    out = fn(model, x, sigmas, extra_args=dict(extra_args), callback=callback, disable=disable, **opts)
    return clock.scale(out, float(sigmas[-1]))


def _default(fn, name, fallback):
    try:
        p = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


def _sa_tau(model_wrap, rule):
    """sa_solver's default stochastic interval (its own: η 1 between 20% and 80% of the schedule)."""
    if rule != "sa_solver":
        return None
    from comfy.k_diffusion import sa_solver

    ms = model_wrap.inner_model.model_sampling
    return sa_solver.get_tau_interval_func(ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8), eta=1.0)


def _backend(model_patcher, per_pixel: bool):
    """The MODEL's per-pixel backend. Vanilla mode needs none — every pixel is on the background's
    sigma, ComfyUI's own model call is exact — so it runs on any model ComfyUI loads (None)."""
    from ..backends import UnsupportedModelError, backend_for

    try:
        return backend_for(model_patcher)
    except UnsupportedModelError as err:
        if per_pixel:
            raise UnsupportedModelError(f"{err} (Mode 'vanilla' runs on any model.)") from err
        return None


SPLIT_REFUSED = (
    "AsynDM cannot continue a run in this SAMPLER: these SIGMAS start below the model's highest noise and no noise is "
    "added (DisableNoise), so the latent is the rest of a run, e.g. the second half of SplitSigmas. An AsynDM plan "
    "is built over the whole schedule and its lagging tokens' progress does not ride on SamplerCustomAdvanced's "
    "LATENT, so this half would start a new plan at its first sigma. Use two 'Asynchronous KSampler (Advanced, step "
    "range)' nodes (start_at_step / end_at_step; the second continues the first's per-token plan), or run this half "
    "with mode vanilla or a plain SAMPLER, or add noise (img2img).")


def continues_a_run(noise, sigmas, model_sampling) -> bool:
    """A latent carried on from an earlier run's leftover noise: no noise added and the schedule
    starting below the model's highest sigma (a denoise < 1 run adds noise; a run from step 0
    starts at the top)."""
    top = float(getattr(model_sampling, "sigma_max", sigmas[0]))
    return not bool(noise.any()) and float(sigmas[0]) < top * (1 - 1e-3)


def _sample(sampler, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar=False):
    import comfy.model_management

    from ..backends.comfy_call import PixelCall, fold, unfold

    frames = noise.shape[2] if noise.ndim == 5 else None  # video: frames stacked along the height
    noise, latent_image, denoise_mask = fold(noise), fold(latent_image), fold(denoise_mask)

    opts = sampler.options
    ms = model_wrap.inner_model.model_sampling
    model_sampling = ComfyModelSampling(ms)
    sigmas = sigmas.float()
    batch, _, height, width = noise.shape
    size = (height, width)
    conds = getattr(model_wrap, "conds", {}) or {}
    targets = targets_of(conds.get("positive"))
    ks = resolve_ks(targets, opts.strengths)
    mode, source = opts.mode, opts.mask_source
    if ((mode == "asyn" and source in ("dynamic", "static")) or opts.capture_all) and not targets:
        raise ValueError(
            "AsynDM with a dynamic or static mask needs to know the prompt's key words: encode the positive prompt "
            "with 'AsynDM Text Encode (targets)', e.g. targets 'rabbit:0.7, basketball:0.7' (or use mask source "
            "'mask input' with a MASK).")
    external = None
    if mode == "asyn" and source == "external":
        if opts.mask is None:
            raise ValueError("mask source 'mask input' needs a MASK connected to the 'mask' input")
        ks = ks or [DEFAULT_K]
        external = external_item_masks(opts.mask, len(ks), batch)
        if external.shape[1] == 1 and len(ks) > 1:
            ks = [max(ks)]  # one painted region: it lags with the strongest strength
    backend = _backend(model_wrap.model_patcher, mode != "vanilla" or opts.capture_all)
    areas = _areas(conds)
    latent = torch.zeros_like(noise) if latent_image is None else latent_image
    seed = extra_args.get("seed")
    extra_args = dict(extra_args, denoise_mask=denoise_mask)  # as KSAMPLER passes it to its model
    batch_index = sampler.batch_index
    total = len(sigmas) - 1
    window = getattr(sampler, "window", None)  # split.StepWindow: this pass runs part of the schedule
    if window is None and mode != "vanilla" and continues_a_run(noise, sigmas, ms):
        raise ValueError(SPLIT_REFUSED)

    def model_fn(x, sigma, capture, model_options=None, seed=None, denoise_mask=None, **_):
        call = PixelCall(sigma, capture, targets.positions if targets else (), targets.context_len if targets else 77,
                         targets.uuids if targets else None, areas)
        if denoise_mask is not None:  # inpainting: outside the mask, the input re-noised to each pixel's sigma
            x = x * denoise_mask + model_sampling.noise_scaling(sigma, noise, latent) * (1 - denoise_mask)
        options = model_options or {}
        if backend is not None:
            options = backend.model_options(options, call)
        out = fold(model_wrap(unfold(x, frames) if frames else x, sigma.flatten(1).amin(dim=1), model_options=options,
                              seed=seed))
        if denoise_mask is not None:
            out = out * denoise_mask + latent * (1 - denoise_mask)
        maps = call.item_maps()
        if capture and maps is None:
            raise RuntimeError(
                "AsynDM captured no cross-attention of the positive prompt in this step (another patch may bypass the "
                "UNet's cross-attention, or the positive was not part of the model call). Use mask source 'mask input' "
                "instead of 'dynamic'/'static' with this model.")
        return out, maps

    def step_callback(d):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            shown = [unfold(d[k], frames) if frames else d[k] for k in ("denoised", "x")]
            callback(d["i"], *shown, total)

    def run(plan):
        if window is not None and window.start > 0:  # the previous pass's latent, as the core continues it
            x = ms.noise_scaling(sigmas[0], noise, latent, False)
        else:
            x = initial_latent(plan, noise, latent, model_sampling.noise_scaling)
        fn = sampler.sampler_function
        if fn is None and model_sampling.flow and sampler.name in NO_NATIVE_FLOW:
            import comfy.samplers

            fn = comfy.samplers.sampler_object(sampler.name).sampler_function
        if fn is not None:
            return _clock_run(sampler, model_wrap, plan, model_fn, x, sigmas, extra_args, step_callback, disable_pbar,
                              seed, model_sampling.flow, batch_index, fn)
        return engine_run(model_fn, x, plan, sampler.name, extra_args=dict(extra_args), callback=step_callback,
                          noise_sampler=_noise_sampler(SAMPLERS[sampler.name], x, sigmas, seed, batch_index),
                          **sampler.extra_options)

    def make_plan(mode, capture_all=False, masks=None, dynamic=False):
        plan = SigmaPlan(sigmas if window is None else window.sigmas, model_sampling, batch, size, mode=mode, ks=ks,
                         masks=masks, dynamic=dynamic, anchors=targets.anchors if targets else None, curve=opts.curve,
                         mask_thr=opts.mask_thr, capture_all=capture_all, cell=getattr(backend, "cell", 1))
        return plan if window is None else window.enter(plan)

    record = engine_sample(run, make_plan, mode=mode, mask_source=source, ks=ks, size=size, mask_thr=opts.mask_thr,
                           external=external, static=opts.static_masks, capture_all=opts.capture_all,
                           words=targets.words if targets else ())
    if window is not None:
        window.finish()
    if sampler.records is not None:
        def cpu(maps):
            return [m.cpu() if m is not None else None for m in maps]

        sampler.records.append(dataclasses.replace(
            record, latents=None, timestep_maps=cpu(record.timestep_maps), masks=cpu(record.masks),
            item_maps=cpu(record.item_maps), image_scale=image_scale(getattr(model_wrap.inner_model, "latent_format", None))))
    samples = ms.inverse_noise_scaling(sigmas[-1], record.latents)
    return unfold(samples, frames) if frames else samples


def asyndm_sample(model, positive, negative, latent: dict, *, seed: int, steps: int, cfg: float,
                  sampler_name: str = "ddim", scheduler: str = PAPER_SCHEDULER, denoise: float = 1.0,
                  eta: float = 0.0, options: Optional[AsynOptions] = None, last_step: str = LAST_STEPS[0],
                  sigmas: Optional[torch.Tensor] = None, callback=None, disable_pbar: bool = False, window=None):
    """The Asynchronous KSampler: (latent dict, RunRecord without its latents, kept in the LATENT).
    ``window``: a split.StepWindow (this pass runs steps start..end-1 of the run over its sigmas,
    continuing its state; ``sigmas`` are that slice)."""
    import comfy.sample

    options = options or AsynOptions()
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    if window is not None and window.start > 0:  # a later pass of a split run: the latent holds its noise
        noise = torch.zeros_like(noise)
    if sigmas is None:
        sigmas = node_sigmas(model, scheduler, steps, denoise, sampler_name, last_step)
    # eta is the paper's DDIM's; every other sampler keeps its ComfyUI default, as in the core KSampler
    records = []
    sampler = asyn_sampler(sampler_name, options, eta if sampler_name == "ddim" else None,
                           batch_index=latent.get("batch_index"), records=records)
    sampler.window = window
    samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image,
                                         noise_mask=latent.get("noise_mask"), callback=callback,
                                         disable_pbar=disable_pbar, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out, records[-1]


def extract_masks(model, positive, negative, latent, *, seed, steps, cfg, strengths=(), mask_thr=1.0, **kwargs):
    """A vanilla run that records the items' attention at every step (the static pre-pass as a node).

    Returns (binary item masks (B, N, H, W) at latent size, one item per pixel by priority k;
    mean attention maps (B, N, h, w); (latent dict, RunRecord) of the vanilla run).
    """
    from ..engine import masks_from_attention

    options = AsynOptions(mode="vanilla", strengths=strengths, mask_thr=mask_thr, capture_all=True)
    out, info = asyndm_sample(model, positive, negative, latent, seed=seed, steps=steps, cfg=cfg, options=options,
                              **kwargs)
    masks, mean_maps = masks_from_attention(info.item_maps, info.ks, latent["samples"].shape[-2:], mask_thr)
    return masks, mean_maps, (out, info)
