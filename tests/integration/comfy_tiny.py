"""Tiny stand-ins for real checkpoints, built from ComfyUI's own model classes (needs ComfyUI imported).

Each family uses ComfyUI's real model config class (``comfy.supported_models.SD15``, ``SD20``,
``SDXL``), its real ``BaseModel``/``SDXL`` wrapper and UNet, its real CLIP tokenizers (the vocab
files ComfyUI ships) and its real text-encoder classes — only the sizes are tiny, and the weights
are random with a fixed seed. A 64×64 image (8×8 latent) samples in a few milliseconds per step.

    model = tiny_model("sd15")            # ModelPatcher (MODEL)
    clip = tiny_clip("sdxl")              # comfy.sd.CLIP (CLIP), real tokenizer
    vae = tiny_vae()                      # comfy.sd.VAE (VAE), TAESD-shaped, ×8 up/down-scale
    model, clip, vae = tiny_checkpoint("sd21v")
    with stand_ins():                     # core loader nodes return the tiny objects for any name
        run_workflow("workflows/x.json")

Families: ``sd15`` (eps), ``sd20`` (eps), ``sd21v`` (SD2.x, v-prediction), ``sdxl`` (eps).
``family_for_filename`` maps public file names to families (``sd_xl_*``/``*xl*`` → sdxl,
``v2-1_768*``/``768-v`` → sd21v, other ``v2*``/``sd2*`` → sd20, anything else → sd15).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

FAMILIES = ("sd15", "sd20", "sd21v", "sdxl")
SEED = 20240607

# Tiny text encoders: real CLIPTextModel class, overridden sizes (vocab/positions stay real so the
# real tokenizer's ids are valid).
TINY_CLIP_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                    "num_hidden_layers": 3, "projection_dim": 32}
TINY_TE_OPTIONS = {f"{name}_model_config": dict(TINY_CLIP_CONFIG) for name in ("clip_l", "clip_h", "clip_g")}
CONTEXT_DIM = {"sd15": 32, "sd20": 32, "sd21v": 32, "sdxl": 64}  # sdxl: clip_l (32) ‖ clip_g (32)
SDXL_ADM_IN = TINY_CLIP_CONFIG["projection_dim"] + 6 * 256       # pooled clip_g + 6 size embeddings


def _unet_config(family):
    base = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "in_channels": 4,
        "use_spatial_transformer": True, "legacy": False, "model_channels": 32,
        "num_res_blocks": [1, 1], "channel_mult": [1, 2], "context_dim": CONTEXT_DIM[family],
        "use_temporal_resblock": False, "use_temporal_attention": False, "adm_in_channels": None,
    }
    if family == "sd15":
        base.update(transformer_depth=[1, 1], transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1],
                    use_linear_in_transformer=False)
    elif family in ("sd20", "sd21v"):
        base.update(transformer_depth=[1, 1], transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1],
                    use_linear_in_transformer=True)
    elif family == "sdxl":
        # like SDXL: no attention at the first level
        base.update(transformer_depth=[0, 1], transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1],
                    use_linear_in_transformer=True, adm_in_channels=SDXL_ADM_IN, num_classes="sequential")
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return base


def _model_config(family):
    import comfy.supported_models as sm
    cls = {"sd15": sm.SD15, "sd20": sm.SD20, "sd21v": sm.SD20, "sdxl": sm.SDXL}[family]
    config = cls(_unet_config(family))
    if family == "sd15":
        config.unet_config.update(num_heads=4, num_head_channels=-1)   # real: 8 heads
    else:
        config.unet_config.update(num_heads=-1, num_head_channels=16)  # real: 64 channels per head
    config.set_inference_dtype(torch.float32, None)
    return config


def _randomize_(module, seed):
    """Deterministic, well-scaled random weights (ComfyUI's ops skip weight init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return module


def _normalize_output_(model, family, seed):
    """Scale the UNet's last conv so that its output has unit std on unit-variance input: random
    weights otherwise predict eps/v hundreds of times too large and samples blow up."""
    unet = model.diffusion_model
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = torch.randn(2, 77, CONTEXT_DIM[family], generator=gen)
    kwargs = {}
    if family == "sdxl":
        kwargs["y"] = torch.randn(2, SDXL_ADM_IN, generator=gen)
    with torch.no_grad():
        out = unet(x, timesteps=torch.tensor([500.0, 500.0]), context=ctx, **kwargs)
        last = unet.out[-1]
        scale = 1.0 / max(float(out.std()), 1e-6)
        last.weight.mul_(scale)
        last.bias.mul_(scale)


def tiny_model(family="sd15", seed=SEED):
    """A MODEL (``comfy.model_patcher.ModelPatcher``) of the family, fp32 on CPU."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    config = _model_config(family)
    if family == "sd21v":
        model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION, device="cpu")
    else:
        model = config.get_model({}, "", device="cpu")
    _randomize_(model.diffusion_model, seed)
    model.eval()
    _normalize_output_(model, family, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_clip(family="sd15", seed=SEED + 1):
    """A CLIP (``comfy.sd.CLIP``) with ComfyUI's real tokenizer(s) and a tiny text encoder."""
    import comfy.sd
    config = _model_config(family)
    target = config.clip_target()
    options = {k: dict(v) for k, v in TINY_TE_OPTIONS.items()}
    options["dtype"] = torch.float32
    clip = comfy.sd.CLIP(target, model_options=options)
    _randomize_(clip.cond_stage_model, seed)
    return clip


def tiny_vae(seed=SEED + 2, channels=4):
    """A VAE (``comfy.sd.VAE``) built from a random TAESD-shaped state dict: 4 latent channels (16
    for Flux / SD3, as their TAESD variants), ×8."""
    import comfy.sd
    import comfy.taesd.taesd
    net = comfy.taesd.taesd.TAESD(latent_channels=channels)
    _randomize_(net, seed)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    vae = comfy.sd.VAE(sd=sd)
    return vae


@functools.lru_cache(maxsize=None)
def _cached(kind, family):
    dit = family in DIT_FAMILIES
    if kind == "model":
        return tiny_dit(family) if dit else tiny_model(family)
    if kind == "clip":
        return tiny_dit_clip(family) if dit else tiny_clip(family)
    if family in ("wan", "qwen_image"):  # Qwen-Image decodes with a Wan 2.1-style VAE
        return wan_vae()
    if family == "chroma_radiance":  # pixel space: ComfyUI's own weightless VAE (VAELoader "pixel_space")
        return pixel_space_vae()
    if family == "hunyuan_image":
        return hunyuan_image_vae()
    return tiny_vae(channels=16) if dit else tiny_vae()


def wan_vae(seed=SEED + 4):
    """ComfyUI's Wan 2.1 video VAE with random weights (its size is fixed by ComfyUI's detection)."""
    import comfy.ldm.wan.vae
    import comfy.sd
    net = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True])
    _randomize_(net, seed)
    return comfy.sd.VAE(sd={k: v.clone() for k, v in net.state_dict().items()})


def pixel_space_vae():
    """The VAE that VAELoader's "pixel_space" gives (no weights: the latent is the image)."""
    import comfy.sd
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


def hunyuan_image_vae(seed=SEED + 6):
    """HunyuanImage 2.1's VAE — ComfyUI's own ``hunyuan_video.vae`` encoder/decoder, 64 latent
    channels, ×32 — at narrow widths with random weights. ComfyUI's detection fixes the real widths
    (128…1024, far too large for a test), so the VAE is made as ComfyUI makes one and its network
    swapped for the narrow one (widths multiples of 32 for the group norms; the encoder's last a
    multiple of 128 = 2 × 64 channels for its mean/log-variance skip)."""
    import comfy.model_patcher
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencodingEngine
    ddconfig = {"block_out_channels": [32, 32, 32, 32, 128, 128], "in_channels": 3, "out_channels": 3,
                "num_res_blocks": 1, "ffactor_spatial": 32, "downsample_match_channel": True,
                "upsample_match_channel": True, "z_channels": 64}
    net = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.hunyuan_video.vae.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.hunyuan_video.vae.Decoder", "params": ddconfig})
    _randomize_(net, seed)
    vae = pixel_space_vae()
    vae.first_stage_model = net.eval().to(torch.float32)
    vae.vae_dtype = torch.float32
    vae.latent_channels, vae.downscale_ratio, vae.upscale_ratio = 64, 32, 32
    vae.memory_used_encode = lambda shape, dtype: 700 * shape[2] * shape[3] * 4
    vae.memory_used_decode = lambda shape, dtype: 700 * shape[2] * shape[3] * 32 * 32 * 4
    vae.process_input = lambda image: image * 2.0 - 1.0
    vae.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
    vae.patcher = comfy.model_patcher.ModelPatcher(net, load_device=vae.device,
                                                   offload_device=vae.patcher.offload_device)
    return vae


def tiny_checkpoint(family="sd15", cached=True):
    """(MODEL, CLIP, VAE) like CheckpointLoaderSimple. Cached objects are shared: clone before patching
    (every ComfyUI node does)."""
    if cached:
        return _cached("model", family), _cached("clip", family), _cached("vae", family if family in DIT_FAMILIES else None)
    return tiny_model(family), tiny_clip(family), tiny_vae()


def family_for_filename(name: str, default="sd15") -> str:
    low = (name or "").lower().replace("\\", "/").rsplit("/", 1)[-1]
    if "hidream" in low or "llama" in low:
        return "hidream"
    if "radiance" in low:
        return "chroma_radiance"
    if "chroma" in low:
        return "chroma"
    if low.startswith(("hunyuanimage", "hunyuan_image")) or "byt5" in low:
        return "hunyuan_image"
    if low.startswith("qwen"):  # qwen_image_*, qwen_2.5_vl_7b* (its text encoder)
        return "qwen_image"
    if low.startswith("wan") or "umt5" in low:
        return "wan"
    if "lumina" in low or "gemma" in low:
        return "lumina2"
    if "flux" in low or low in ("ae.safetensors", "ae.sft"):
        return "flux_schnell" if "schnell" in low else "flux"
    if "sd3" in low:
        return "sd3"
    if "xl" in low:
        return "sdxl"
    if "768" in low and ("v2" in low or "sd2" in low or "2-1" in low or "2_1" in low or "-v" in low):
        return "sd21v"
    if low.startswith(("v2", "sd2", "sd_2", "stable-diffusion-2")) or "v2-" in low or "2-1" in low or "2_1" in low:
        return "sd20"
    if "1-5" in low or "1_5" in low or "sd15" in low or "v1" in low:
        return "sd15"
    return default


# ------------------------------------------------------------------ FPDM / DiT checkpoints (the pack's own)
TINY_FPDM = dict(hidden_size=48, patch_size=2, in_channels=4, num_classes=1000, input_size=8, num_heads=6)
TINY_FPDM_MODEL_NAME = "DiT-S/2"  # args 'model' → 6 heads, as the loader infers for DiT-S


def is_plain_dit_name(name: str) -> bool:
    low = (name or "").lower()
    return "dit" in low and "fpdm" not in low and "fixed" not in low


def _pack_module(sub, anchor=None):
    """``<pack>.<sub>`` from the copy of the pack ComfyUI loaded (anchor: one of its classes), else
    from the ``asyndm_fpdm`` package."""
    import importlib
    if anchor is not None and ".nodes." in anchor.__module__:
        root = anchor.__module__.rsplit(".nodes.", 1)[0]
        try:
            return importlib.import_module(f"{root}.{sub}")
        except ImportError:
            pass
    return importlib.import_module(f"asyndm_fpdm.{sub}")


def write_tiny_fpdm_checkpoint(path, fixed_point=True, seed=SEED + 3, anchor=None):
    """Write a train.py-style checkpoint ({'model', 'ema', 'args'}) of a tiny FPDM (or plain DiT when
    ``fixed_point`` is False) built with the pack's own ``fpdm.model``; 1000 classes, 64 px."""
    fm = _pack_module("fpdm.model", anchor)
    DiT, FPDMConfig, init_random_ = fm.DiT, fm.FPDMConfig, fm.init_random_
    cfg = FPDMConfig(**TINY_FPDM, fixed_point=fixed_point, depth=3, pre_depth=1, post_depth=1)
    model = init_random_(DiT(cfg), seed).eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = {"model": TINY_FPDM_MODEL_NAME, "num_classes": cfg.num_classes, "image_size": cfg.input_size * 8,
            "fixed_point": fixed_point, "fixed_point_pre_depth": 1, "fixed_point_post_depth": 1,
            "fixed_point_pre_post_timestep_conditioning": False, "predict_v": False,
            "use_zero_terminal_snr": False}
    torch.save({"model": sd, "ema": sd, "args": args}, str(path))
    return path


def _fpdm_file_for(ckpt_name):
    """The file the pack's FPDM loader will open for ``ckpt_name`` (its folder, then checkpoints)."""
    import folder_paths
    for key in ("fpdm", "checkpoints"):
        if key in folder_paths.folder_names_and_paths:
            path = folder_paths.get_full_path(key, ckpt_name)
            if path:
                return path
    return None


class StandInRegistry:
    """What ``stand_ins`` patched and every load it answered (for assertions)."""

    def __init__(self, family=None):
        self.family = family
        self.loads = []  # (node class name, file name, family)

    def family_for(self, name):
        return self.family or family_for_filename(name)


@contextlib.contextmanager
def stand_ins(family=None):
    """Make core loader nodes return tiny models for any file name, restoring them on exit.

    Patched: CheckpointLoaderSimple, CheckpointLoader, LoraLoader / LoraLoaderModelOnly (return
    clones: a LoRA is a no-op on a stand-in), VAELoader, UNETLoader, CLIPLoader (family from the
    file name, or ``family`` for all), and the pack's FPDMCheckpointLoader (its real loader runs on a
    tiny FPDM — or plain DiT for ``*DiT*`` names — written over the empty placeholder file).
    QuadrupleCLIPLoader gives HiDream's tiny text encoder (any four names).
    Yields a ``StandInRegistry`` recording every load.
    """
    import nodes
    reg = StandInRegistry(family)
    patches = []

    def patch(cls_name, method, fn):
        cls = nodes.NODE_CLASS_MAPPINGS.get(cls_name)
        if cls is None:
            return
        patches.append((cls, method, cls.__dict__.get(method, None)))
        setattr(cls, method, fn)

    def load_checkpoint(self, ckpt_name, *args, **kwargs):
        fam = reg.family_for(ckpt_name)
        reg.loads.append(("checkpoint", ckpt_name, fam))
        model, clip, vae = tiny_checkpoint(fam)
        return (model.clone(), clip.clone(), vae)

    def load_lora(self, model, clip, lora_name, strength_model, strength_clip):
        reg.loads.append(("lora", lora_name, None))
        return (model.clone() if model is not None else None, clip.clone() if clip is not None else None)

    def load_lora_model_only(self, model, lora_name, strength_model):
        reg.loads.append(("lora", lora_name, None))
        return (model.clone(),)

    def load_vae(self, vae_name):
        fam = "chroma_radiance" if vae_name == "pixel_space" else family_for_filename(vae_name)
        reg.loads.append(("vae", vae_name, fam if fam in DIT_FAMILIES else None))
        return (_cached("vae", fam if fam in DIT_FAMILIES else None),)

    def load_dual_clip(self, clip_name1, clip_name2, type, *args, **kwargs):
        fam = {"flux": "flux", "sd3": "sd3", "hunyuan_image": "hunyuan_image"}.get(type, "sdxl")
        reg.loads.append(("clip", f"{clip_name1}+{clip_name2}", fam))
        return (_cached("clip", fam).clone(),)

    def load_triple_clip(cls, clip_name1, clip_name2, clip_name3):
        from comfy_api.latest import io
        reg.loads.append(("clip", f"{clip_name1}+{clip_name2}+{clip_name3}", "sd3"))
        return io.NodeOutput(_cached("clip", "sd3").clone())

    def load_quadruple_clip(cls, clip_name1, clip_name2, clip_name3, clip_name4):  # HiDream's four encoders
        from comfy_api.latest import io
        reg.loads.append(("clip", "+".join((clip_name1, clip_name2, clip_name3, clip_name4)), "hidream"))
        return io.NodeOutput(_cached("clip", "hidream").clone())

    def load_unet(self, unet_name, *args, **kwargs):
        fam = reg.family_for(unet_name)
        reg.loads.append(("unet", unet_name, fam))
        return (_cached("model", fam).clone(),)

    def load_clip(self, clip_name, type="stable_diffusion", *args, **kwargs):
        fam = type if type in ("chroma", "wan", "qwen_image") and not reg.family else reg.family_for(clip_name)
        reg.loads.append(("clip", clip_name, fam))
        return (_cached("clip", fam).clone(),)

    fpdm_loader = nodes.NODE_CLASS_MAPPINGS.get("FPDMCheckpointLoader")
    if fpdm_loader is not None:
        fpdm_fn_name = fpdm_loader.FUNCTION
        fpdm_original = getattr(fpdm_loader, fpdm_fn_name)

        def load_fpdm(self, ckpt_name, *args, **kwargs):
            # the pack's real loader runs, on a tiny checkpoint written over the harness's empty
            # placeholder (never over a real file)
            import os
            path = _fpdm_file_for(ckpt_name)
            plain = is_plain_dit_name(ckpt_name)
            if path and os.path.isfile(path) and os.path.getsize(path) == 0:
                write_tiny_fpdm_checkpoint(path, fixed_point=not plain, anchor=fpdm_loader)
            reg.loads.append(("fpdm", ckpt_name, "dit" if plain else "fpdm"))
            return fpdm_original(self, ckpt_name, *args, **kwargs)

        patch("FPDMCheckpointLoader", fpdm_fn_name, load_fpdm)

    patch("CheckpointLoaderSimple", "load_checkpoint", load_checkpoint)
    patch("CheckpointLoader", "load_checkpoint", lambda self, config_name, ckpt_name: load_checkpoint(self, ckpt_name))
    patch("LoraLoader", "load_lora", load_lora)
    patch("LoraLoaderModelOnly", "load_lora_model_only", load_lora_model_only)
    patch("VAELoader", "load_vae", load_vae)
    patch("UNETLoader", "load_unet", load_unet)
    patch("CLIPLoader", "load_clip", load_clip)
    patch("DualCLIPLoader", "load_clip", load_dual_clip)
    patch("TripleCLIPLoader", "execute", classmethod(load_triple_clip))
    patch("QuadrupleCLIPLoader", "execute", classmethod(load_quadruple_clip))
    try:
        yield reg
    finally:
        for cls, method, original in reversed(patches):
            if original is None:
                delattr(cls, method)
            else:
                setattr(cls, method, original)


# ---------------------------------------------------------------------------------------------
# Diffusion transformers: Flux (dev / schnell) and SD3's MMDiT, from ComfyUI's own model configs
# ---------------------------------------------------------------------------------------------
DIT_FAMILIES = ("flux", "flux_schnell", "sd3", "sd35", "chroma", "wan", "qwen_image", "lumina2")
DIT_FAMILIES += ("chroma_radiance",)
FLUX_CONTEXT, FLUX_VEC = 32, 32       # tiny T5's d_model / tiny CLIP-L's pooled width
LUMINA_CAP = 32                       # tiny Gemma's hidden width
SD3_CONTEXT, SD3_ADM = 4096, 64       # SD3's CLIP-L‖G context zero-padded to 4096 / pooled L‖G
TINY_T5_CONFIG = {"d_ff": 32, "d_kv": 16, "d_model": FLUX_CONTEXT, "num_heads": 2, "num_layers": 1,
                  "num_decoder_layers": 1}


def _dit_config(family, depth=2, hidden=64):
    import comfy.supported_models as sm
    if family == "hidream":
        return _hidream_config(depth, hidden)
    if family == "hunyuan_image":
        return _hunyuan_image_config(depth, hidden)
    if family in ("flux", "flux_schnell"):
        cls = sm.Flux if family == "flux" else sm.FluxSchnell
        unet = dict(cls.unet_config, in_channels=16, out_channels=16, vec_in_dim=FLUX_VEC,
                    context_in_dim=FLUX_CONTEXT, hidden_size=hidden, mlp_ratio=4.0, num_heads=2, depth=depth,
                    depth_single_blocks=depth, axes_dim=[8, (hidden // 2 - 8) // 2, (hidden // 2 - 8) // 2],
                    theta=10000, patch_size=2, qkv_bias=True)
    elif family == "chroma":  # img_in takes the patched channels (16·2·2); a 2-layer approximator
        cls = sm.Chroma
        unet = dict(cls.unet_config, in_channels=64, out_channels=64, context_in_dim=FLUX_CONTEXT, hidden_size=hidden,
                    mlp_ratio=4.0, num_heads=2, depth=depth, depth_single_blocks=depth,
                    axes_dim=[8, (hidden // 2 - 8) // 2, (hidden // 2 - 8) // 2], theta=10000, patch_size=2,
                    qkv_bias=True, in_dim=64, out_dim=hidden, hidden_dim=32, n_layers=2)
    elif family == "chroma_radiance":  # pixel space: RGB in and out; patch 2 here (16 in the real model)
        cls = sm.ChromaRadiance
        unet = dict(cls.unet_config, in_channels=3, out_channels=3, context_in_dim=FLUX_CONTEXT, hidden_size=hidden,
                    mlp_ratio=4.0, num_heads=2, depth=depth, depth_single_blocks=depth,
                    axes_dim=[8, (hidden // 2 - 8) // 2, (hidden // 2 - 8) // 2], theta=10000, patch_size=2,
                    qkv_bias=True, in_dim=64, out_dim=hidden, hidden_dim=32, n_layers=2, nerf_hidden_size=16,
                    nerf_mlp_ratio=2, nerf_depth=2, nerf_max_freqs=4, nerf_tile_size=0,
                    nerf_final_head_type="linear", nerf_embedder_dtype=None)
    elif family == "wan":  # Wan 2.1 / 2.2 A14B t2v layout; head dim 32 for Wan's 3-axis RoPE
        cls = sm.WAN21_T2V
        unet = dict(cls.unet_config, patch_size=(1, 2, 2), in_dim=16, out_dim=16, dim=hidden, ffn_dim=2 * hidden,
                    freq_dim=32, text_dim=FLUX_CONTEXT, num_heads=2, num_layers=depth + 1)
    elif family == "qwen_image":  # head dim 32 = RoPE axes 8 + 12 + 12
        cls = sm.QwenImage
        unet = dict(cls.unet_config, patch_size=2, in_channels=64, out_channels=16, num_layers=depth + 1,
                    attention_head_dim=32, num_attention_heads=hidden // 32, joint_attention_dim=FLUX_CONTEXT,
                    axes_dims_rope=(8, 12, 12))
    elif family == "lumina2":  # NextDiT; head dim 16 = RoPE axes 4 + 6 + 6; 4 query heads on 2 key heads
        cls = sm.Lumina2
        unet = dict(cls.unet_config, patch_size=2, in_channels=16, dim=hidden, n_layers=depth + 1, n_refiner_layers=1,
                    n_heads=hidden // 16, n_kv_heads=hidden // 32, multiple_of=16, ffn_dim_multiplier=None,
                    norm_eps=1e-5, qk_norm=True, cap_feat_dim=LUMINA_CAP, axes_dims=[4, 6, 6], axes_lens=[300, 64, 64])
    elif family in ("sd3", "sd35"):
        cls = sm.SD3
        size = 32  # the position-embedding grid: latents up to 64×64
        unet = dict(cls.unet_config, patch_size=2, out_channels=16, depth=depth, num_patches=size * size,
                    pos_embed_max_size=size, adm_in_channels=SD3_ADM,
                    context_embedder_config={"target": "torch.nn.Linear",
                                             "params": {"in_features": SD3_CONTEXT, "out_features": 64 * depth}})
        if family == "sd35":  # SD3.5 medium: extra x self-attention in the first blocks, RMS QK norm
            unet.update(x_block_self_attn_layers=[0], qk_norm="rms")
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {DIT_FAMILIES}")
    config = cls(unet)
    config.set_inference_dtype(torch.float32, None)
    return config


def tiny_dit(family="flux", seed=SEED, depth=2, hidden=64):
    """A MODEL (ModelPatcher) of a tiny random Flux / Flux-schnell / SD3 / SD3.5-medium MMDiT, fp32 on CPU
    (SD3: hidden = 64·depth, heads = depth, as MMDiT fixes them)."""
    import comfy.model_management
    import comfy.model_patcher
    config = _dit_config(family, depth, hidden)
    model = config.get_model({}, "", device="cpu")
    dm = model.diffusion_model
    _randomize_(dm, seed)
    if getattr(dm, "pos_embed", None) is not None:  # a buffer: ComfyUI leaves it uninitialised
        dm.pos_embed.copy_(0.1 * torch.randn(dm.pos_embed.shape, generator=torch.Generator().manual_seed(seed)))
    if family == "chroma_radiance":  # its NeRF head's RMS norms (a "scale", not a "weight") near 1, as trained
        gen = torch.Generator().manual_seed(seed + 5)
        with torch.no_grad():
            for name, p in dm.named_parameters():
                if name.startswith("nerf_") and name.endswith("norm.scale"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def dit_conditioning(family, length=12, seed=SEED + 9, batch=1):
    """Random CONDITIONING for a tiny DiT, as its text encoders would give it: [[context, {pooled}]]."""
    if family == "hidream":
        return hidream_conditioning(length, seed, batch)
    if family == "hunyuan_image":
        return hunyuan_image_conditioning(length, seed, batch)
    gen = torch.Generator().manual_seed(seed)
    flux_like = family.startswith(("flux", "chroma"))
    width, pooled = (FLUX_CONTEXT, FLUX_VEC) if flux_like else (SD3_CONTEXT, SD3_ADM)
    if family in ("wan", "qwen_image"):
        width = FLUX_CONTEXT
    if family == "lumina2":  # Gemma's hidden states and their attention mask (all ones: num_tokens)
        return [[torch.randn(batch, length, LUMINA_CAP, generator=gen),
                 {"attention_mask": torch.ones(batch, length, dtype=torch.long)}]]
    no_pooled = ("chroma", "chroma_radiance", "wan", "qwen_image")
    extra = {"pooled_output": torch.randn(batch, pooled, generator=gen) if family not in no_pooled else None}
    if family == "flux":
        extra["guidance"] = 3.5
    return [[torch.randn(batch, length, width, generator=gen), extra]]


UMT5_STANDIN_VOCAB = 64
GEMMA_STANDIN_VOCAB = 64
STANDIN_CORPUS = ("a rabbit playing basketball beside a rabbit", "a green field under a blue sky",
                  "a cat and a dog on a red sofa", "a photo of a tree by the river")


@functools.lru_cache(maxsize=None)
def umt5_standin_spiece() -> bytes:
    """A tiny sentencepiece model with UMT5's special ids (pad 0, eos 1, unk 2), trained in memory
    on a few sentences: Wan's real tokenizer lives inside its text-encoder file (no download)."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(STANDIN_CORPUS * 4), model_writer=out,
                                   vocab_size=UMT5_STANDIN_VOCAB, hard_vocab_limit=False, model_type="word",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return out.getvalue()


@functools.lru_cache(maxsize=None)
def gemma_standin_spiece() -> bytes:
    """A tiny sentencepiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3), trained in
    memory: Lumina 2's real Gemma 2 tokenizer lives inside its text-encoder file (no download)."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(STANDIN_CORPUS * 4), model_writer=out,
                                   vocab_size=GEMMA_STANDIN_VOCAB, hard_vocab_limit=False, model_type="word",
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    return out.getvalue()


def _tiny_lumina2_clip(seed):
    """ComfyUI's Lumina 2 text encoder classes (Gemma 2 2B, LuminaTokenizer), tiny, on the stand-in
    tokenizer."""
    import comfy.sd
    import comfy.supported_models as sm

    target = sm.Lumina2({"image_model": "lumina2"}).clip_target()
    config = dict(vocab_size=GEMMA_STANDIN_VOCAB, hidden_size=LUMINA_CAP, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1)
    clip = comfy.sd.CLIP(target, model_options={"gemma2_2b_model_config": config, "dtype": torch.float32},
                         tokenizer_data={"spiece_model": gemma_standin_spiece()})
    _randomize_(clip.cond_stage_model, seed)
    return clip


def tiny_dit_clip(family="flux", seed=SEED + 1):
    """The family's real text-encoder classes and tokenizers, tiny: Flux = CLIP-L + a 1-layer T5
    (ComfyUI's T5 class, its T5 tokenizer); SD3 = CLIP-L + CLIP-G without T5 (a real SD3 text
    encoder configuration: a 4096-wide T5 stand-in would weigh hundreds of MB)."""
    import comfy.sd
    import comfy.supported_models_base as smb
    from comfy.text_encoders import flux, sd3_clip
    if family == "hidream":
        return tiny_hidream_clip(seed)
    if family == "hunyuan_image":  # Qwen-Image's stand-in encoder behind HunyuanImage's tokenizer and template
        return tiny_qwen_image_clip(seed, hunyuan=True)
    if family.startswith("flux"):
        target = smb.ClipTarget(flux.FluxTokenizer, flux.flux_clip())
    elif family == "chroma":  # T5 only, as ComfyUI's Chroma config loads it
        from comfy.text_encoders import pixart_t5
        target = smb.ClipTarget(pixart_t5.PixArtTokenizer, pixart_t5.pixart_te())
    elif family == "qwen_image":  # ComfyUI's Qwen2.5 tokenizer; a 1-layer language model, no vision tower
        return tiny_qwen_image_clip(seed)
    elif family == "lumina2":
        return _tiny_lumina2_clip(seed)
    elif family == "wan":  # UMT5 with a stand-in sentencepiece model (the real one ships inside the TE file)
        from comfy.text_encoders import wan
        target = smb.ClipTarget(wan.WanT5Tokenizer, wan.te())
        options = {"umt5xxl_model_config": dict(TINY_T5_CONFIG, vocab_size=UMT5_STANDIN_VOCAB), "dtype": torch.float32}
        clip = comfy.sd.CLIP(target, model_options=options, tokenizer_data={"spiece_model": umt5_standin_spiece()})
        _randomize_(clip.cond_stage_model, seed)
        return clip
    else:
        target = smb.ClipTarget(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False))
    options = {k: dict(v) for k, v in TINY_TE_OPTIONS.items()}
    options["t5xxl_model_config"] = dict(TINY_T5_CONFIG)
    options["dtype"] = torch.float32
    clip = comfy.sd.CLIP(target, model_options=options)
    _randomize_(clip.cond_stage_model, seed)
    return clip


# ---------------------------------------------------------------------------------------------
# A family the per-pixel backends do not cover (vanilla mode runs on it): AuraFlow's MMDiT
# ---------------------------------------------------------------------------------------------
def tiny_auraflow(seed=SEED):
    """A MODEL of a tiny random AuraFlow (flow, shift 1.73, 4 latent channels) from ComfyUI's own
    ``supported_models.AuraFlow`` config, fp32 on CPU."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm
    unet = dict(sm.AuraFlow.unet_config, cond_seq_dim=FLUX_CONTEXT, dim=64, n_layers=2, n_double_layers=1,
                n_heads=2, global_conddim=64, max_seq=64)
    config = sm.AuraFlow(unet)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device="cpu")
    _randomize_(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def auraflow_conditioning(length=9, seed=SEED + 9):
    """CONDITIONING as AuraFlow's Pile-T5 encoder gives it: [[hidden states, {}]]."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, FLUX_CONTEXT, generator=gen), {}]]


# ---------------------------------------------------------------------------------------------
# HiDream-I1: ComfyUI's own config and text encoders (CLIP-L/G pooled, T5, Llama 3.1), tiny
# ---------------------------------------------------------------------------------------------
DIT_FAMILIES += ("hidream",)
HIDREAM_T5_LENGTH = 10  # the T5 context of the stand-in conditioning (real: 128); not the Llama length
HIDREAM_LLAMA_LAYERS = 2  # the tiny Llama's hidden states the model reads (real: 32)
TINY_LLAMA_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": HIDREAM_LLAMA_LAYERS,
                     "num_attention_heads": 2, "num_key_value_heads": 2}


def _hidream_config(depth=2, hidden=64):
    """comfy.supported_models.HiDream with tiny sizes: ``depth`` double and single blocks, 3 routed
    experts (2 active), head dim 32 = RoPE axes 8 + 12 + 12, T5 / Llama widths of the tiny encoders."""
    import comfy.supported_models as sm
    unet = dict(sm.HiDream.unet_config, patch_size=2, in_channels=16, out_channels=16, num_layers=depth,
                num_single_layers=depth, attention_head_dim=32, num_attention_heads=hidden // 32,
                caption_channels=[FLUX_CONTEXT, TINY_LLAMA_CONFIG["hidden_size"]], text_emb_dim=2 * FLUX_VEC,
                num_routed_experts=3, num_activated_experts=2, axes_dims_rope=(8, 12, 12), max_resolution=(64, 64),
                llama_layers=[min(i, HIDREAM_LLAMA_LAYERS - 1) for i in range(2 * depth)])
    config = sm.HiDream(unet)
    config.set_inference_dtype(torch.float32, None)
    return config


def hidream_conditioning(length=12, seed=SEED + 9, batch=1):
    """CONDITIONING as HiDream's text encoder gives it: T5 context, pooled CLIP-L‖G, and the Llama
    hidden states (B, layers, ``length``, D) under ``conditioning_llama3``."""
    gen = torch.Generator().manual_seed(seed)
    t5 = torch.randn(batch, HIDREAM_T5_LENGTH, FLUX_CONTEXT, generator=gen)
    extra = {"pooled_output": torch.randn(batch, 2 * FLUX_VEC, generator=gen),
             "conditioning_llama3": torch.randn(batch, HIDREAM_LLAMA_LAYERS, length, TINY_LLAMA_CONFIG["hidden_size"],
                                                generator=gen)}
    return [[t5, extra]]


@functools.lru_cache(maxsize=None)
def llama_standin_dir() -> str:
    """A tiny byte-level BPE tokenizer with Llama 3's special ids (128000 begin, 128009 eot), trained
    in memory on a few sentences, in a temporary folder: the Llama tokenizer JSON HiDream uses is
    not in the ComfyUI checkout the tests run against (ComfyUI ships it; no download here)."""
    import json
    import os
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(STANDIN_CORPUS) * 4, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    spec = json.loads(tok.to_str())
    specials = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|eot_id|>": 128009}
    spec["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for c, i in specials.items()]
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                                       "tokens": ["<|begin_of_text|>"]}}}
    folder = tempfile.mkdtemp(prefix="llama_standin_")
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "model_max_length": 131072}, f)
    return folder


class _LlamaStandIn:
    """Stands for ``LlamaTokenizerFast`` in ComfyUI's LLAMA3Tokenizer: the stand-in folder, read as
    the byte-level tokenizer.json it is (as transformers 4.x reads Llama 3's)."""

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(llama_standin_dir(), **kwargs)


def tiny_hidream_clip(seed=SEED + 1):
    """HiDream's text encoder (ComfyUI's HiDreamTokenizer / HiDreamTEModel: CLIP-L, CLIP-G, T5, Llama
    3.1, all tiny), with the Llama stand-in tokenizer above."""
    import comfy.sd
    import comfy.supported_models_base as smb
    from comfy.text_encoders import hidream, hunyuan_video

    class Tokenizer(hidream.HiDreamTokenizer):
        def __init__(self, *args, **kwargs):
            real = hunyuan_video.LlamaTokenizerFast
            hunyuan_video.LlamaTokenizerFast = _LlamaStandIn
            try:
                super().__init__(*args, **kwargs)
            finally:
                hunyuan_video.LlamaTokenizerFast = real

    options = {k: dict(v) for k, v in TINY_TE_OPTIONS.items()}
    options.update(t5xxl_model_config=dict(TINY_T5_CONFIG), llama_model_config=dict(TINY_LLAMA_CONFIG),
                   dtype=torch.float32)
    clip = comfy.sd.CLIP(smb.ClipTarget(Tokenizer, hidream.hidream_clip()), model_options=options)
    _randomize_(clip.cond_stage_model, seed)
    return clip


# ---------------------------------------------------------------------------------------------
# Qwen-Image's text encoder: Qwen2.5-VL 7B, tiny, without its vision tower
# ---------------------------------------------------------------------------------------------
TINY_QWEN25_CONFIG = {"hidden_size": FLUX_CONTEXT, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "num_key_value_heads": 1}


def tiny_qwen_image_clip(seed=SEED + 1, hunyuan=False):
    """ComfyUI's Qwen-Image text encoder (its tokenizer with the Qwen2.5 files ComfyUI ships, its chat
    template, its template-dropping ``encode_token_weights``) on a 1-layer, 32-wide Qwen2.5 language
    model. Only the model class is swapped: ``Qwen25_7BVLI`` always builds the ~600M-parameter vision
    tower, which text-to-image never runs (it encodes reference images). ``hunyuan``: HunyuanImage 2.1's
    tokenizer (its own chat template) and encoder class on the same stand-in, without the byT5 glyph encoder."""
    import comfy.sd
    import comfy.supported_models_base as smb
    from comfy.text_encoders import llama, qwen_image

    class TinyQwen25VL(llama.Qwen25_7BVLI):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Qwen25_7BVLI_Config(**config_dict)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    class TinyQwen25VLModel(qwen_image.Qwen25_7BVLIModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True,
                     model_options={}):
            qwen_image.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=TinyQwen25VL,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                model_options=model_options)

    from comfy.text_encoders import hunyuan_image

    class TinyQwenImageTE(hunyuan_image.HunyuanImageTEModel if hunyuan else qwen_image.QwenImageTEModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            qwen_image.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=dtype, name="qwen25_7b",
                                                      clip_model=TinyQwen25VLModel, model_options=model_options)
            self.byt5_small = None

    tokenizer = hunyuan_image.HunyuanImageTokenizer if hunyuan else qwen_image.QwenImageTokenizer
    target = smb.ClipTarget(tokenizer, TinyQwenImageTE)
    options = {"qwen25_7b_model_config": dict(TINY_QWEN25_CONFIG), "dtype": torch.float32}
    clip = comfy.sd.CLIP(target, model_options=options)
    _randomize_(clip.cond_stage_model, seed)
    return clip


DIT_FAMILIES += ("hunyuan_image",)
BYT5_WIDTH, BYT5_LENGTH = 1472, 5  # the byT5 glyph encoder's width (ByT5Mapper's fixed input); a short glyph context


def _hunyuan_image_config(depth=2, hidden=64):
    """comfy.supported_models.HunyuanImage21 with tiny sizes: 64-channel latents, ``depth`` double and
    single blocks, head dim 32 = RoPE axes 16 + 16, guidance embedding and the byT5 glyph mapper on.
    Patch 2 here (the real checkpoint's is 1, detected from img_in) so that tokens are 2×2 cells."""
    import comfy.supported_models as sm
    unet = dict(sm.HunyuanImage21.unet_config, in_channels=64, out_channels=64, context_in_dim=FLUX_CONTEXT,
                hidden_size=hidden, mlp_ratio=4.0, num_heads=hidden // 32, depth=depth, depth_single_blocks=depth,
                axes_dim=[16, 16], theta=256, patch_size=[2, 2], qkv_bias=True, guidance_embed=True, byt5=True,
                meanflow=False)
    config = sm.HunyuanImage21(unet)
    config.set_inference_dtype(torch.float32, None)
    return config


def hunyuan_image_conditioning(length=12, seed=SEED + 9, batch=1):
    """CONDITIONING as HunyuanImage 2.1's text encoder gives it for a prompt with quoted text: the
    Qwen2.5 context (after the template) and the byT5 glyph states under ``conditioning_byt5small``."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, length, FLUX_CONTEXT, generator=gen),
             {"pooled_output": None,
              "conditioning_byt5small": torch.randn(batch, BYT5_LENGTH, BYT5_WIDTH, generator=gen)}]]
