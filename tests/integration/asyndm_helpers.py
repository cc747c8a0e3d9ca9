"""Helpers for the AsynDM integration tests (need ComfyUI imported by the ``comfy_env`` fixture)."""

import torch

TARGETS_KEY = "asyndm_targets"
PROMPT = "a rabbit playing basketball"


def encode(clip, text, targets=None):
    """CONDITIONING through the pack's text-encode node (targets) or the core CLIPTextEncode."""
    if targets:
        from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMTextEncode

        return AsynDMTextEncode().encode(clip, text, targets)[0]
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def empty_latent(batch=1, size=8, channels=4):
    return {"samples": torch.zeros(batch, channels, size, size)}


def sampler_node(model, pos, neg, latent, **kw):
    """Run the Asynchronous KSampler node; returns (latent tensor, run info)."""
    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMKSampler

    args = dict(seed=3, steps=5, cfg=2.0, eta=0.0, mode="AsynDM", mask_source="dynamic", curve="bin", sampler_name="ddim",
                scheduler="asyndm_paper", denoise=1.0,
                strengths="", mask_threshold=1.0, last_step="timestep 0 (paper)")
    args.update(kw)
    mask = args.pop("mask", None)
    out, info = AsynDMKSampler().sample(model, positive=pos, negative=neg, latent_image=latent, mask=mask, **args)
    return out["samples"], info


def core_ksampler(model, pos, neg, latent, seed=3, steps=5, cfg=2.0, sampler="ddim", scheduler="ddim_uniform",
                  denoise=1.0):
    import nodes

    return nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent,
                                   denoise=denoise)[0]["samples"]


def custom_nodes():
    import comfy_extras.nodes_custom_sampler as cs

    return cs


def unwrap(res):
    return res.result if hasattr(res, "result") else res


def core_custom_euler_like_paper(model, pos, neg, latent, seed=3, steps=5, cfg=2.0):
    """The core sampler equivalent to the paper's DDIM (eta 0) schedule: Euler on the sigmas of
    the DDIM 'leading' timesteps (981..1 for 50 steps, what ddim_uniform gives) ending at σ(t=0)
    instead of 0, started from pure noise at the first timestep (x = noise·sqrt(1+σ₀²)). Uses the
    core SamplerCustom node with add_noise off and that start latent."""
    import comfy.sample
    import comfy_extras.nodes_custom_sampler as cs

    sig = model.get_model_object("model_sampling").sigmas.float()
    ratio = 1000 // steps
    ts = [i * ratio + 1 for i in range(steps)][::-1]
    sigmas = torch.cat([sig[ts], sig[:1]])
    noise = comfy.sample.prepare_noise(latent["samples"], seed, latent.get("batch_index"))
    # ComfyUI scales LATENT inputs by the latent format (process_latent_in): undo it for the start
    start = {"samples": model.model.process_latent_out(noise * (1 + sigmas[0] ** 2) ** 0.5)}
    sampler = cs.KSamplerSelect().get_sampler("euler")[0]
    res = cs.SamplerCustom().sample(model, False, seed, cfg, pos, neg, sampler, sigmas, start)
    res = res.result if hasattr(res, "result") else res
    return res[0]["samples"]


def control_stand_in(scale=0.3):
    """A ControlNet-shaped control: adds a constant, sigma-dependent residual to the middle block
    and records the timesteps it was asked for."""
    from comfy.controlnet import ControlBase

    class ControlStandIn(ControlBase):
        def __init__(self):
            super().__init__()
            self.seen = []

        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            self.seen.append(t.detach().clone())
            b, _, h, w = x_noisy.shape
            value = scale * (1.0 + t.float().view(-1, 1, 1, 1) / 10.0)
            return {"middle": [value.to(x_noisy.dtype).expand(b, 64, (h + 1) // 2, (w + 1) // 2).clone()],
                    "input": [], "output": []}

        def copy(self):
            c = ControlStandIn()
            self.copy_to(c)
            c.seen = self.seen
            return c

        def inference_memory_requirements(self, dtype):
            return 0

    return ControlStandIn()


def with_control(cond, control):
    return [[c, dict(d, control=control)] for c, d in cond]


def lora_like(model, strength=1.0, seed=5):
    """A clone with LoRA-style weight patches (add_patches diffs) on an emb_layers Linear, a
    cross-attention projection and a conv."""
    gen = torch.Generator().manual_seed(seed)
    sd = model.model_state_dict()
    keys = [k for k in sd if k.endswith(("emb_layers.1.weight", "attn2.to_k.weight", "in_layers.2.weight"))][:6]
    patches = {k: (0.2 * torch.randn(sd[k].shape, generator=gen),) for k in keys}
    m = model.clone()
    m.add_patches(patches, strength)
    return m, keys
