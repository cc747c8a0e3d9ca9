"""AsynDM nodes that generate: targets text-encode, Asynchronous KSampler, mask extractor."""

from ..samplers.comfyui.conditioning import parse_ks
from ..samplers.comfyui.sampler import (LAST_STEPS, MASK_NAMES, MODE_NAMES, PAPER_SCHEDULER, AsynOptions, asyn_sampler,
                                        asyndm_sample, extract_masks, from_ksampler, sampler_names, scheduler_names)
from ..samplers.curves import CURVE_TYPES
from .common import CATEGORY_ASYNDM

RUN_TYPE = "ASYNDM_RUN"

TIPS = {
    "seed": "Random seed of the starting noise (per batch index, as the core KSampler: image i of a batch is the "
            "same whatever the batch size).",
    "steps": "Number of sampling steps. Every pixel starts noisy at the first step and is clean after the last one.",
    "cfg": "Classifier-free guidance scale, as in the core KSampler.",
    "eta": "The paper's DDIM's noise (sampler ddim only): 0 = deterministic DDIM as in the paper, 1 = fully "
           "stochastic (identical to euler_ancestral). Every other sampler uses ComfyUI's defaults, as the core "
           "KSampler does (euler_ancestral and the SDE samplers: eta 1, s_noise 1); for other values use the AsynDM "
           "Sampler (SAMPLER) node with SamplerCustom.",
    "sampler_name": "Any of ComfyUI's samplers, every latent pixel on its own sigma. ddim is the paper's sampler "
                    "(with eta). euler, heun, dpm_2, dpmpp_2m, the ancestral/SDE ones and lcm have per-pixel "
                    "versions; every other sampler is ComfyUI's own, run in the background's clock with each "
                    "pixel's denoiser rescaled to its own noise level (same result when every pixel is on the "
                    "background).",
    "scheduler": "Where the background's noise levels go: asyndm_paper = the paper's DDIM timesteps (981, 961, ... "
                 "for 50 steps; see last_step), or any of ComfyUI's schedulers (karras, normal, ...). The key "
                 "objects lag behind this schedule on the concave curve.",
    "denoise": "As in the core KSampler: below 1, the input latent is noised to the matching point of the schedule "
               "(img2img, hires fix) and only the rest of the schedule is run; the key objects lag from there.",
    "mode": "AsynDM: the prompt's key objects are denoised more slowly than the background, so they form while "
            "looking at an already-clear scene (better text-image alignment). DMconcave: every pixel follows the "
            "slow curve. vanilla: every pixel follows the usual schedule (for comparison).",
    "mask_source": "Which pixels count as the key objects (AsynDM mode). dynamic: re-read from the model's "
                   "cross-attention after every step. static: a plain run first, its attention averaged over the "
                   "steps (costs one extra run). mask input: the MASK connected below (painted, segmentation, "
                   "or the mask extractor's output).",
    "curve": "Shape of the slow (concave) timestep curve of the key objects: bin = parabola (paper default), "
             "lin = two line segments, exp = exponential.",
    "strengths": "How much each key object lags behind the background, 0..1 (the paper's k; 0 = no lag). Blank: "
                 "the strengths written in the targets of the text-encode node. One number: all targets. Or one "
                 "per target, comma-separated.",
    "mask_threshold": "A pixel belongs to an object when its attention to the object's word is at least this "
                      "times the object's average attention (the paper uses 1.0). Higher = smaller regions.",
    "last_step": "Where the last step of the asyndm_paper schedule lands. 'timestep 0 (paper)': DDIM's final "
                 "timestep 0 as the reference (a trace of noise, sigma ≈ 0.03, remains). 'clean': sigma 0 like "
                 "ComfyUI's own schedulers (which always end at sigma 0).",
    "start_at_step": "The first step this pass runs (KSamplerAdvanced's). 0: the run starts from noise (seed). "
                     "Later: the latent is the previous pass's output, whose per-token plan this pass continues "
                     "(give both passes the same seed, steps, scheduler and AsynDM settings).",
    "end_at_step": "The step this pass stops at; the latent keeps its leftover noise (every token at its own "
                   "noise level) and the plan for the next pass. 10000: to the end.",
    "mask": "Optional MASK for mask source 'mask input': white = key-object region (lags behind). One frame "
            "for all images, one per image, one per target, or one per image and target. Resized to the latent.",
}


def _common_inputs():
    return {
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                         "tooltip": TIPS["seed"]}),
        "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": TIPS["steps"]}),
        "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": TIPS["cfg"]}),
    }


def _callback(model, steps):
    import comfy.utils
    import latent_preview

    return latent_preview.prepare_callback(model, steps), not comfy.utils.PROGRESS_BAR_ENABLED


class AsynDMTextEncode:
    """CLIP text encode that also records which words are the prompt's key objects."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP text encoder (from a checkpoint loader)."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "tooltip": "The prompt, as in CLIP Text Encode (weights like (rabbit:1.2) work)."}),
                "targets": ("STRING", {"default": "rabbit:0.7, basketball:0.7",
                                       "tooltip": "The prompt's key objects and how much each lags behind the "
                                                  "background (k, 0..1), comma-separated: 'rabbit:0.7, "
                                                  "basketball:0.7'. Words must appear in the prompt; 'cat#2' "
                                                  "picks the second 'cat'. Without ':k' the strength is 0.7."}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Ordinary CONDITIONING (usable by any node) that also carries the targets for the "
                       "AsynDM sampler and mask extractor.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY_ASYNDM
    DESCRIPTION = "Encode a prompt and name its key objects (targets) for AsynDM."

    def encode(self, clip, text, targets):
        from ..samplers.comfyui.conditioning import TARGETS_KEY
        from ..samplers.comfyui.tokens import context_length, locate_targets
        from ..samplers.tokens import parse_targets

        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None. If the clip is from a checkpoint loader node "
                               "your checkpoint does not contain a valid clip or text encoder model.")
        parse_targets(targets)  # a malformed strength is refused before the encoder runs
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        # words are found in the context the model receives: SD3's is CLIP's 77·k plus T5's tokens,
        # Qwen-Image's and HunyuanImage's drop their chat template
        info = locate_targets(clip, text, targets, context_length(cond) if cond else None)
        return ([[c, dict(d, **{TARGETS_KEY: info})] for c, d in cond],)


def _asyn_inputs():
    """The AsynDM controls shared by the KSampler and the SAMPLER node."""
    return {
        "mode": (list(MODE_NAMES), {"default": "AsynDM", "tooltip": TIPS["mode"]}),
        "mask_source": (list(MASK_NAMES), {"default": "dynamic", "tooltip": TIPS["mask_source"]}),
        "curve": (list(CURVE_TYPES), {"default": "bin", "tooltip": TIPS["curve"]}),
        "strengths": ("STRING", {"default": "", "tooltip": TIPS["strengths"]}),
        "mask_threshold": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                     "tooltip": TIPS["mask_threshold"]}),
    }


def _schedule_inputs():
    # appended after the original widgets, so workflows saved before they existed keep their values;
    # optional, so API prompts saved before they existed run with the paper's values
    return {
        "sampler_name": (sampler_names(), {"default": "ddim", "tooltip": TIPS["sampler_name"]}),
        "scheduler": (scheduler_names(), {"default": PAPER_SCHEDULER, "tooltip": TIPS["scheduler"]}),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": TIPS["denoise"]}),
    }


def _options(mode, mask_source, curve, strengths, mask_threshold, mask=None, **extra):
    return AsynOptions(mode=MODE_NAMES[mode], mask_source=MASK_NAMES[mask_source], curve=curve,
                       strengths=parse_ks(strengths), mask=mask, mask_thr=mask_threshold, **extra)


class AsynDMKSampler:
    @classmethod
    def INPUT_TYPES(cls):
        inputs = {
            "model": ("MODEL", {"tooltip": "An SD1.x, SD2.x (epsilon or v) or SDXL model; LoRAs and other patches "
                                           "are kept."}),
        }
        inputs.update(_common_inputs())
        inputs["eta"] = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": TIPS["eta"]})
        inputs.update(_asyn_inputs())
        inputs.update({
            "last_step": (list(LAST_STEPS), {"default": LAST_STEPS[0], "tooltip": TIPS["last_step"]}),
            "positive": ("CONDITIONING", {"tooltip": "Positive prompt; encode it with 'AsynDM Text Encode "
                                                     "(targets)' to name the key objects."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt (any CONDITIONING)."}),
            "latent_image": ("LATENT", {"tooltip": "The latent to denoise: Empty Latent Image, an encoded image "
                                                   "(with denoise < 1) or an inpainting latent with a noise mask."}),
        })
        return {"required": inputs, "optional": dict(_schedule_inputs(), mask=("MASK", {"tooltip": TIPS["mask"]}))}

    RETURN_TYPES = ("LATENT", RUN_TYPE)
    RETURN_NAMES = ("LATENT", "run")
    OUTPUT_TOOLTIPS = ("The denoised latent.",
                       "The run's per-pixel timesteps and masks, for the AsynDM preview nodes.")
    FUNCTION = "sample"
    CATEGORY = CATEGORY_ASYNDM
    DESCRIPTION = ("Asynchronous diffusion (AsynDM): every latent pixel has its own noise level; the prompt's key "
                   "objects are denoised more slowly than the background. Any per-pixel sampler and scheduler.")

    def sample(self, model, seed, steps, cfg, eta, mode, mask_source, curve, strengths, mask_threshold, last_step,
               positive, negative, latent_image, sampler_name="ddim", scheduler=PAPER_SCHEDULER, denoise=1.0,
               mask=None):
        callback, disable = _callback(model, steps)
        out, info = asyndm_sample(
            model, positive, negative, latent_image, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
            scheduler=scheduler, denoise=denoise, eta=eta, last_step=last_step, callback=callback, disable_pbar=disable,
            options=_options(mode, mask_source, curve, strengths, mask_threshold, mask),
        )
        return (out, info)


class AsynDMKSamplerAdvanced:
    """KSamplerAdvanced's step ranges for AsynDM: one run split over several samplers and models
    (Wan 2.2's high-noise and low-noise experts), continuing one per-token plan."""

    @classmethod
    def INPUT_TYPES(cls):
        inputs = {"model": ("MODEL", {"tooltip": "The model for this pass's steps (Wan 2.2: the high-noise expert "
                                                 "for the first range, the low-noise expert for the rest)."})}
        inputs.update(_common_inputs())
        inputs.update({
            "sampler_name": (sampler_names(), {"default": "euler", "tooltip": TIPS["sampler_name"]}),
            "scheduler": (scheduler_names(), {"default": "simple", "tooltip": TIPS["scheduler"]}),
        })
        inputs.update(_asyn_inputs())
        inputs.update({
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": TIPS["start_at_step"]}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000, "tooltip": TIPS["end_at_step"]}),
            "positive": ("CONDITIONING", {"tooltip": "Positive prompt; encode it with 'AsynDM Text Encode "
                                                     "(targets)' to name the key objects."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt (any CONDITIONING)."}),
            "latent_image": ("LATENT", {"tooltip": "Step 0: an empty latent. A later start: the LATENT of the pass "
                                                   "that ran the steps before (it carries the leftover noise and "
                                                   "the run's per-token plan)."}),
        })
        return {"required": inputs, "optional": {"mask": ("MASK", {"tooltip": TIPS["mask"]})}}

    RETURN_TYPES = ("LATENT", RUN_TYPE)
    RETURN_NAMES = ("LATENT", "run")
    OUTPUT_TOOLTIPS = ("The latent after end_at_step, with its leftover noise when the run goes on, and the run's "
                       "per-token plan for the next pass.",
                       "The run's per-token timesteps and masks up to end_at_step (from step 0, across passes).")
    FUNCTION = "sample"
    CATEGORY = CATEGORY_ASYNDM
    DESCRIPTION = ("Asynchronous KSampler over a range of steps, like KSamplerAdvanced: chain two (Wan 2.2's "
                   "high-noise then low-noise expert) and the second continues the first's per-token plan, the "
                   "key objects keeping their lag across the switch.")

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, mode, mask_source, curve, strengths,
               mask_threshold, start_at_step, end_at_step, positive, negative, latent_image, mask=None):
        from ..samplers.comfyui.split import sample_range

        callback, disable = _callback(model, max(1, min(end_at_step, steps) - start_at_step))
        return sample_range(model, positive, negative, latent_image, seed=seed, steps=steps, start=start_at_step,
                            end=end_at_step, options=_options(mode, mask_source, curve, strengths, mask_threshold,
                                                              mask),
                            scheduler=scheduler, sampler_name=sampler_name, cfg=cfg, callback=callback,
                            disable_pbar=disable)


class AsynDMSampler:
    @classmethod
    def INPUT_TYPES(cls):
        inputs = {
            "sampler_name": (sampler_names(), {"default": "euler", "tooltip": TIPS["sampler_name"]}),
            "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": TIPS["eta"]}),
            "s_noise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                  "tooltip": "Noise multiplier of the stochastic samplers, as in ComfyUI's own."}),
        }
        inputs.update(_asyn_inputs())
        return {"required": inputs, "optional": {"mask": ("MASK", {"tooltip": TIPS["mask"]})}}

    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("A SAMPLER for SamplerCustom / SamplerCustomAdvanced: any SIGMAS, any guider (CFGGuider, "
                       "DualCFGGuider, BasicGuider); the targets come from the positive conditioning.",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY_ASYNDM
    DESCRIPTION = "AsynDM as a SAMPLER: every latent pixel on its own sigma, key objects lagging behind the SIGMAS."

    def get_sampler(self, sampler_name, eta, s_noise, mode, mask_source, curve, strengths, mask_threshold, mask=None):
        return (asyn_sampler(sampler_name, _options(mode, mask_source, curve, strengths, mask_threshold, mask),
                             eta=eta, s_noise=s_noise),)


class AsynDMSamplerFromSampler:
    @classmethod
    def INPUT_TYPES(cls):
        inputs = {"sampler": ("SAMPLER", {"tooltip": "Any sampler built on ComfyUI's KSAMPLER: KSamplerSelect, the "
                                                     "sampling/custom_sampling/samplers nodes with their options, or "
                                                     "another pack's SAMPLER. Its function and options are kept."})}
        inputs.update(_asyn_inputs())
        return {"required": inputs, "optional": {"mask": ("MASK", {"tooltip": TIPS["mask"]})}}

    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("The same sampler, asynchronous: every latent pixel on its own sigma, the key objects "
                       "lagging behind the SIGMAS. For SamplerCustom / SamplerCustomAdvanced.",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY_ASYNDM
    DESCRIPTION = ("Make any SAMPLER asynchronous (AsynDM): the sampler's own code runs in the background's clock "
                   "and each pixel's denoiser is rescaled to the pixel's own noise level.")

    def get_sampler(self, sampler, mode, mask_source, curve, strengths, mask_threshold, mask=None):
        return (from_ksampler(sampler, _options(mode, mask_source, curve, strengths, mask_threshold, mask)),)


class AsynDMPaperSigmas:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model whose noise levels are used."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": TIPS["steps"]}),
            "last_step": (list(LAST_STEPS), {"default": LAST_STEPS[0], "tooltip": TIPS["last_step"]}),
        }}

    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The paper's DDIM timesteps (981, 961, ... for 50 steps) as SIGMAS.",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY_ASYNDM
    DESCRIPTION = "The AsynDM paper's schedule as SIGMAS, for SamplerCustom with the AsynDM Sampler."

    def get_sigmas(self, model, steps, last_step):
        from ..samplers.comfyui.sampler import node_sigmas

        return (node_sigmas(model, PAPER_SCHEDULER, steps, 1.0, "ddim", last_step),)


class AsynDMMaskExtractor:
    @classmethod
    def INPUT_TYPES(cls):
        inputs = {"model": ("MODEL", {"tooltip": "The model whose cross-attention is read."})}
        inputs.update(_common_inputs())
        inputs.update({
            "strengths": ("STRING", {"default": "", "tooltip": TIPS["strengths"] + " Used for the priority mask "
                                                                                   "where objects overlap."}),
            "mask_threshold": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                         "tooltip": TIPS["mask_threshold"]}),
            "positive": ("CONDITIONING", {"tooltip": "Positive prompt from 'AsynDM Text Encode (targets)'."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt."}),
            "latent_image": ("LATENT", {"tooltip": "The latent of the plain (vanilla) run; use the same seed and "
                                                   "latent as the sampler to reproduce the paper's static mode."}),
        })
        return {"required": inputs, "optional": dict(_schedule_inputs(), sigmas=(
            "SIGMAS", {"tooltip": "Optional SIGMAS (e.g. from a scheduler node): used instead of steps, scheduler "
                                  "and denoise."}))}

    RETURN_TYPES = ("MASK", "MASK", "MASK", "LATENT", RUN_TYPE)
    RETURN_NAMES = ("item_masks", "priority_mask", "attention", "vanilla_latent", "run")
    OUTPUT_TOOLTIPS = (
        "One binary mask per target (image-major: image 0's targets, then image 1's...), at image size; where "
        "targets overlap the stronger k wins. Feed it to the sampler's 'mask' with mask source 'mask input'.",
        "One mask per image: each pixel's strength k (0 = background).",
        "One soft map per image and target: the attention averaged over the steps, scaled to 0..1.",
        "The vanilla run's latent (same seed): decode it to compare with the AsynDM result.",
        "The vanilla run's timesteps, for the preview nodes.",
    )
    FUNCTION = "extract"
    CATEGORY = CATEGORY_ASYNDM
    DESCRIPTION = ("Run a plain sampling and read which pixels attend to each target word (averaged over the "
                   "steps): AsynDM's static masks.")

    def extract(self, model, seed, steps, cfg, strengths, mask_threshold, positive, negative, latent_image,
                sampler_name="ddim", scheduler=PAPER_SCHEDULER, denoise=1.0, sigmas=None):
        import torch.nn.functional as F

        from ..samplers.masks import priority_map

        callback, disable = _callback(model, steps if sigmas is None else max(len(sigmas) - 1, 1))
        masks, mean_maps, (out, info) = extract_masks(
            model, positive, negative, latent_image, seed=seed, steps=steps, cfg=cfg,
            strengths=parse_ks(strengths), mask_thr=mask_threshold, sampler_name=sampler_name, scheduler=scheduler,
            denoise=denoise, sigmas=sigmas, callback=callback, disable_pbar=disable,
        )
        b, n, h, w = masks.shape
        size = (h * 8, w * 8)
        item = F.interpolate(masks, size=size, mode="nearest").reshape(b * n, *size)
        prio = F.interpolate(priority_map(masks, info.ks)[:, None], size=size, mode="nearest")[:, 0]
        peak = mean_maps.flatten(2).amax(dim=2).clamp(min=1e-12)[..., None, None]
        soft = F.interpolate(mean_maps / peak, size=size, mode="bilinear", align_corners=False)
        return (item.cpu(), prio.cpu(), soft.reshape(b * n, *size).clamp(0, 1).cpu(), out, info)


NODE_CLASS_MAPPINGS = {
    "AsynDMTextEncode": AsynDMTextEncode,
    "AsynDMKSampler": AsynDMKSampler,
    "AsynDMKSamplerAdvanced": AsynDMKSamplerAdvanced,
    "AsynDMMaskExtractor": AsynDMMaskExtractor,
    "AsynDMSampler": AsynDMSampler,
    "AsynDMSamplerFromSampler": AsynDMSamplerFromSampler,
    "AsynDMPaperSigmas": AsynDMPaperSigmas,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AsynDMTextEncode": "AsynDM Text Encode (targets)",
    "AsynDMKSampler": "Asynchronous KSampler (AsynDM)",
    "AsynDMKSamplerAdvanced": "Asynchronous KSampler (Advanced, step range)",
    "AsynDMMaskExtractor": "AsynDM Prompt-Attention Mask Extractor",
    "AsynDMSampler": "AsynDM Sampler (SAMPLER)",
    "AsynDMSamplerFromSampler": "AsynDM Sampler from SAMPLER",
    "AsynDMPaperSigmas": "AsynDM Paper Sigmas (DDIM leading)",
}
