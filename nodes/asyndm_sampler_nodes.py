"""AsynDM nodes that generate: targets text-encode, Asynchronous KSampler, mask extractor."""

from ..samplers.comfy_sampling import LAST_STEPS, MASK_NAMES, MODE_NAMES, asyndm_sample, extract_masks, parse_ks
from ..samplers.curves import CURVE_TYPES
from .common import CATEGORY_ASYNDM

RUN_TYPE = "ASYNDM_RUN"

TIPS = {
    "seed": "Random seed of the starting noise (per batch index, as the core KSampler: image i of a batch is the "
            "same whatever the batch size).",
    "steps": "Number of DDIM steps. Every pixel starts noisy at the first step and is clean after the last one.",
    "cfg": "Classifier-free guidance scale, as in the core KSampler.",
    "eta": "DDIM eta: 0 = deterministic DDIM (identical to Euler per pixel); 1 = fully stochastic (identical to "
           "Euler ancestral per pixel). The paper uses 0.",
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
    "last_step": "Where the last step lands. 'timestep 0 (paper)': DDIM's final timestep 0 as the reference "
                 "(a trace of noise, sigma ≈ 0.03, remains). 'clean': sigma 0 like ComfyUI's own samplers.",
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
        from ..samplers.comfy_sampling import TARGETS_KEY
        from ..samplers.comfy_tokens import locate_targets

        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None. If the clip is from a checkpoint loader node "
                               "your checkpoint does not contain a valid clip or text encoder model.")
        info = locate_targets(clip, text, targets)
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return ([[c, dict(d, **{TARGETS_KEY: info})] for c, d in cond],)


class AsynDMKSampler:
    @classmethod
    def INPUT_TYPES(cls):
        inputs = {
            "model": ("MODEL", {"tooltip": "An SD1.x, SD2.x (epsilon or v) or SDXL model; LoRAs and other patches "
                                           "are kept."}),
        }
        inputs.update(_common_inputs())
        inputs.update({
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": TIPS["eta"]}),
            "mode": (list(MODE_NAMES), {"default": "AsynDM", "tooltip": TIPS["mode"]}),
            "mask_source": (list(MASK_NAMES), {"default": "dynamic", "tooltip": TIPS["mask_source"]}),
            "curve": (list(CURVE_TYPES), {"default": "bin", "tooltip": TIPS["curve"]}),
            "strengths": ("STRING", {"default": "", "tooltip": TIPS["strengths"]}),
            "mask_threshold": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                         "tooltip": TIPS["mask_threshold"]}),
            "last_step": (list(LAST_STEPS), {"default": LAST_STEPS[0], "tooltip": TIPS["last_step"]}),
            "positive": ("CONDITIONING", {"tooltip": "Positive prompt; encode it with 'AsynDM Text Encode "
                                                     "(targets)' to name the key objects."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt (any CONDITIONING)."}),
            "latent_image": ("LATENT", {"tooltip": "The latent to denoise (e.g. Empty Latent Image). Latents with "
                                                   "a noise mask (inpainting) are refused."}),
        })
        return {"required": inputs, "optional": {"mask": ("MASK", {"tooltip": TIPS["mask"]})}}

    RETURN_TYPES = ("LATENT", RUN_TYPE)
    RETURN_NAMES = ("LATENT", "run")
    OUTPUT_TOOLTIPS = ("The denoised latent.",
                       "The run's per-pixel timesteps and masks, for the AsynDM preview nodes.")
    FUNCTION = "sample"
    CATEGORY = CATEGORY_ASYNDM
    DESCRIPTION = ("Asynchronous diffusion (AsynDM): every latent pixel has its own timestep; the prompt's key "
                   "objects are denoised more slowly than the background.")

    def sample(self, model, seed, steps, cfg, eta, mode, mask_source, curve, strengths, mask_threshold, last_step,
               positive, negative, latent_image, mask=None):
        callback, disable = _callback(model, steps)
        out, info = asyndm_sample(
            model, positive, negative, latent_image, seed=seed, steps=steps, cfg=cfg, eta=eta, curve=curve,
            mode=mode, mask_source=mask_source, strengths=parse_ks(strengths), mask=mask,
            mask_thr=mask_threshold, last_step=last_step, callback=callback, disable_pbar=disable,
        )
        info.latents = None  # keep only what previews need
        return (out, info)


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
        return {"required": inputs}

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

    def extract(self, model, seed, steps, cfg, strengths, mask_threshold, positive, negative, latent_image):
        import torch.nn.functional as F

        from ..samplers.masks import priority_map

        callback, disable = _callback(model, steps)
        masks, mean_maps, (out, info) = extract_masks(
            model, positive, negative, latent_image, seed=seed, steps=steps, cfg=cfg,
            strengths=parse_ks(strengths), mask_thr=mask_threshold, callback=callback, disable_pbar=disable,
        )
        b, n, h, w = masks.shape
        size = (h * 8, w * 8)
        item = F.interpolate(masks, size=size, mode="nearest").reshape(b * n, *size)
        prio = F.interpolate(priority_map(masks, info.ks)[:, None], size=size, mode="nearest")[:, 0]
        peak = mean_maps.flatten(2).amax(dim=2).clamp(min=1e-12)[..., None, None]
        soft = F.interpolate(mean_maps / peak, size=size, mode="bilinear", align_corners=False)
        info.latents = None
        return (item.cpu(), prio.cpu(), soft.reshape(b * n, *size).clamp(0, 1).cpu(), out, info)


NODE_CLASS_MAPPINGS = {
    "AsynDMTextEncode": AsynDMTextEncode,
    "AsynDMKSampler": AsynDMKSampler,
    "AsynDMMaskExtractor": AsynDMMaskExtractor,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AsynDMTextEncode": "AsynDM Text Encode (targets)",
    "AsynDMKSampler": "Asynchronous KSampler (AsynDM)",
    "AsynDMMaskExtractor": "AsynDM Prompt-Attention Mask Extractor",
}
