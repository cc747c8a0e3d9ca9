"""FPDM nodes: load an FPDM/DiT checkpoint as a MODEL, class conditioning, fixed-point settings,
the reference's learned-variance DDPM sampler (node + SAMPLER) and its respaced SIGMAS.

Forms only: the work is in ``fpdm/``. ComfyUI modules are imported inside the functions.
"""

from .common import CATEGORY_FPDM

FOLDER = "fpdm"
AUTO = "auto"


def _register_folder():
    """Add models/fpdm to ComfyUI's folder_paths (once)."""
    import os

    import folder_paths

    if FOLDER not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, FOLDER)
        folder_paths.folder_names_and_paths[FOLDER] = ([path], set(folder_paths.supported_pt_extensions))
    return folder_paths


def _checkpoint_choices():
    try:
        fp = _register_folder()
    except ImportError:  # outside ComfyUI (library use, schema checks): no models folder to list
        return ["(put FPDM/DiT checkpoints in models/fpdm)"]
    names = list(fp.get_filename_list(FOLDER))
    names += [n for n in fp.get_filename_list("checkpoints") if n not in names]
    return names or ["(put FPDM/DiT checkpoints in models/fpdm)"]


def _checkpoint_path(name):
    fp = _register_folder()
    path = fp.get_full_path(FOLDER, name) or fp.get_full_path("checkpoints", name)
    if path is None:
        raise FileNotFoundError(f"checkpoint {name!r} not found in models/{FOLDER} or models/checkpoints")
    return path


class FPDMCheckpointLoader:
    DESCRIPTION = ("Load a Fixed Point Diffusion Model or a plain DiT (train.py .pt with 'ema'/'model', a raw state dict, "
                   "or .safetensors) as a MODEL for KSampler/SamplerCustom. Loads without running code from the file. "
                   "What tensor shapes cannot tell comes from train.py's args.json beside the checkpoint, or from the options here.")
    CATEGORY = CATEGORY_FPDM
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The class-conditional DiT/FPDM: DiT noise schedule (linear betas 1e-4..0.02), SD latent format.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (_checkpoint_choices(), {"tooltip": "Checkpoint from models/fpdm (or models/checkpoints)."}),
            "num_heads": ("INT", {"default": 0, "min": 0, "max": 128,
                                  "tooltip": "Attention heads. 0 = auto: from args.json's model name (e.g. DiT-XL/2) or the DiT size table."}),
            "timestep_conditioning": ([AUTO, "pre/post blocks get timestep", "pre/post blocks class only"], {
                "tooltip": "train.py's fixed_point_pre_post_timestep_conditioning. auto = from args.json (FPDM needs it)."}),
            "prediction": ([AUTO, "eps", "v"], {"tooltip": "What the network predicts. auto = args.json's predict_v (plain DiT: eps)."}),
            "zero_terminal_snr": ([AUTO, "on", "off"], {"tooltip": "Zero-terminal-SNR schedule (v-prediction only). auto = args.json."}),
            "weight_dtype": (["default", "fp32", "fp16", "bf16"], {"tooltip": "Weight precision. default = ComfyUI's choice for this device."}),
        }}

    def load(self, ckpt_name, num_heads=0, timestep_conditioning=AUTO, prediction=AUTO, zero_terminal_snr=AUTO,
             weight_dtype="default"):
        import torch

        from ..fpdm.comfy_model import build_model_patcher
        from ..fpdm.loading import load_fpdm

        options = {"num_heads": num_heads or None}
        if timestep_conditioning != AUTO:
            options["pre_post_timestep_conditioning"] = timestep_conditioning.startswith("pre/post blocks get")
        if prediction != AUTO:
            options["prediction"] = prediction
        if zero_terminal_snr != AUTO:
            options["zero_terminal_snr"] = zero_terminal_snr == "on"
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(weight_dtype)
        model, _info = load_fpdm(_checkpoint_path(ckpt_name), options)
        return (build_model_patcher(model, dtype=dtype),)


class FPDMClassConditioning:
    DESCRIPTION = "Class-label conditioning for DiT/FPDM: positive = the chosen ImageNet class(es), negative = the null class."
    CATEGORY = CATEGORY_FPDM
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("The class label(s).", "The null (unconditional) class, for classifier-free guidance.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        from ..fpdm.classes import choice_list

        return {"required": {
            "class_name": (choice_list(), {"default": "207: Golden Retriever", "tooltip": "ImageNet class by name."}),
            "class_index": ("INT", {"default": -1, "min": -1, "max": 100000,
                                    "tooltip": "Class by index (for models with other label sets). -1 = use class_name."}),
            "batch_classes": ("STRING", {"default": "", "tooltip": "Optional: comma-separated classes (indices or names), "
                                         "one per image of the batch, repeated to the batch size. Empty = one class."}),
        }}

    def encode(self, class_name, class_index=-1, batch_classes=""):
        import torch

        from ..fpdm.classes import NULL_CLASS, parse_class, parse_classes

        labels = parse_classes(batch_classes) if batch_classes.strip() else [class_index if class_index >= 0 else parse_class(class_name)]
        cond = torch.zeros((1, 1, 1))  # placeholder cross-attention tensor; DiT ignores it
        positive = [[cond, {"fpdm_class": torch.tensor(labels, dtype=torch.long)}]]
        negative = [[cond.clone(), {"fpdm_class": torch.full((len(labels),), NULL_CLASS, dtype=torch.long)}]]
        return (positive, negative)


class FPDMSettings:
    DESCRIPTION = ("Fixed-point settings for an FPDM MODEL (patches a clone; the input MODEL is untouched). The budget "
                   "is steps x iterations; every sampling step uses one entry of the allocation.")
    CATEGORY = CATEGORY_FPDM
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The same model with these fixed-point settings.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An FPDM/DiT MODEL from the FPDM loader."}),
            "iterations": ("INT", {"default": 0, "min": 0, "max": 1000,
                                   "tooltip": "Fixed-point iterations per sampling step (the mean when allocating). 0 = model default (28 - pre - post layers)."}),
            "reuse": ("BOOLEAN", {"default": False, "tooltip": "Start each step's fixed point from the previous step's solution (per CFG half; reset every run)."}),
            "allocation": (["fixed", "increasing", "decreasing"], {
                "tooltip": "Spread the budget over steps. Named as in the reference (by timestep): increasing = more iterations at the noisy start, decreasing = more at the end."}),
            "tolerance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0001,
                                    "tooltip": "Stop a step early once the relative residual |f(z)-z|/|f(z)| falls below this. 0 = off (exact reference)."}),
            "anderson": ("INT", {"default": 0, "min": 0, "max": 16, "tooltip": "Anderson acceleration history size. 0 = off (plain iteration, the reference)."}),
            "guidance": (["standard", "reference"], {"tooltip": "standard = CFG on all channels; reference = only the first 3 channels, as the reference samples (exact reproduction)."}),
            "reference_double_count": ("BOOLEAN", {"default": False, "tooltip": "Reproduce the reference sampler's allocation exactly: it asks its controller twice per step and spends about twice the budget."}),
        }}

    def patch(self, model, iterations=0, reuse=False, allocation="fixed", tolerance=0.0, anderson=0,
              guidance="standard", reference_double_count=False):
        from ..fpdm.comfy_model import SETTINGS_KEY, fpdm_config_of, reference_cfg_function
        from ..fpdm.solver import SolverSettings

        fpdm_config_of(model)
        settings = SolverSettings(iterations=iterations or None, reuse=reuse, allocation=allocation, tolerance=tolerance,
                                  anderson=anderson, reference_double_count=reference_double_count).validate()
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})[SETTINGS_KEY] = settings
        if guidance == "reference":
            m.set_model_sampler_cfg_function(reference_cfg_function)
        return (m,)


class FPDMRespacedSigmas:
    DESCRIPTION = "The reference's respaced timesteps (DDPM/DDIM 'N steps') as SIGMAS for SamplerCustom."
    CATEGORY = CATEGORY_FPDM
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The FPDM/DiT MODEL (its zero-SNR setting matters)."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Sampling steps, evenly respaced over 1000 like the reference."}),
        }}

    def sigmas(self, model, steps):
        from ..fpdm.comfy_model import fpdm_config_of
        from ..fpdm.comfy_sampler import respaced_sigmas

        return (respaced_sigmas(steps, fpdm_config_of(model).zero_terminal_snr),)


class FPDMSamplerSelect:
    DESCRIPTION = "The reference's sampler as a SAMPLER: DDPM with the learned variance, or DDIM."
    CATEGORY = CATEGORY_FPDM
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "method": (["ddpm", "ddim"], {"tooltip": "ddpm = ancestral with the model's learned variance (reference default); ddim = deterministic at eta 0."}),
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "DDIM noise (0 = deterministic). Ignored by ddpm."}),
        }}

    def get(self, method, eta=0.0):
        from ..fpdm.comfy_sampler import fpdm_sampler

        return (fpdm_sampler(method, eta),)


class FPDMSampler:
    DESCRIPTION = ("Sample an FPDM/DiT the way the reference does: respaced timesteps, DDPM with the learned variance "
                   "(or DDIM), classifier-free guidance. Progress, previews and Cancel work as in KSampler.")
    CATEGORY = CATEGORY_FPDM
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "FPDM/DiT MODEL (optionally through FPDM Settings)."}),
            "positive": ("CONDITIONING", {"tooltip": "Class conditioning."}),
            "negative": ("CONDITIONING", {"tooltip": "Null class (from the class node's negative output)."}),
            "latent_image": ("LATENT", {"tooltip": "Empty latent: 256x256 images are 32x32 latents."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True, "tooltip": "Noise seed."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Respaced sampling steps."}),
            "cfg": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip": "Guidance scale (reference default 4.0). 1 = no guidance."}),
            "method": (["ddpm", "ddim"], {"tooltip": "ddpm = learned-variance ancestral (reference default); ddim = deterministic at eta 0."}),
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "DDIM noise. Ignored by ddpm."}),
        }}

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg, method="ddpm", eta=0.0):
        import comfy.sample
        import latent_preview

        from ..fpdm.comfy_model import fpdm_config_of
        from ..fpdm.comfy_sampler import fpdm_sampler, respaced_sigmas

        sigmas = respaced_sigmas(steps, fpdm_config_of(model).zero_terminal_snr)
        latent = latent_image["samples"]
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        callback = latent_preview.prepare_callback(model, steps)
        samples = comfy.sample.sample_custom(model, noise, cfg, fpdm_sampler(method, eta), sigmas, positive, negative,
                                             latent, noise_mask=latent_image.get("noise_mask"), callback=callback,
                                             disable_pbar=True, seed=seed)
        out = latent_image.copy()
        out["samples"] = samples
        return (out,)


NODE_CLASS_MAPPINGS = {
    "FPDMCheckpointLoader": FPDMCheckpointLoader,
    "FPDMClassConditioning": FPDMClassConditioning,
    "FPDMSettings": FPDMSettings,
    "FPDMSampler": FPDMSampler,
    "FPDMSamplerSelect": FPDMSamplerSelect,
    "FPDMRespacedSigmas": FPDMRespacedSigmas,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FPDMCheckpointLoader": "Load FPDM / DiT Checkpoint",
    "FPDMClassConditioning": "FPDM Class Conditioning (ImageNet)",
    "FPDMSettings": "FPDM Fixed-Point Settings",
    "FPDMSampler": "FPDM Sampler (reference DDPM/DDIM)",
    "FPDMSamplerSelect": "FPDM Sampler Select (SAMPLER)",
    "FPDMRespacedSigmas": "FPDM Respaced Sigmas",
}
