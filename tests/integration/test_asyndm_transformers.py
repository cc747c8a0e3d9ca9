"""AsynDM on diffusion transformers inside a real ComfyUI: tiny random Flux (dev, schnell) and SD3
MMDiT stand-ins built from ComfyUI's own model configs (issue 11). Invariants 1–6 as for the UNet.

Run: COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/integration/test_asyndm_transformers.py
"""

import pytest
import torch

from asyndm_helpers import core_ksampler, empty_latent, sampler_node

FAMILIES = ["flux", "flux_schnell", "sd3"]
TARGETS = {"words": ["rabbit", "ball"], "ks": [0.7, 0.5], "positions": [[2], [5]], "context_len": 12}
# same formulas with maps in place of scalars, the denoised latent assembled per pixel: fp32 round-off
TOL_SAME_SAMPLER = 1e-5
SAMPLERS = [("euler", "simple"), ("heun", "simple"), ("dpmpp_2m", "simple"), ("euler_ancestral", "simple"),
            ("dpmpp_2m_sde", "simple"), ("dpmpp_sde", "simple"), ("euler", "beta"), ("lcm", "simple")]


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


def dit_setups(tiny_models, families):
    """{family: (MODEL, positive with TARGETS, negative)} of tiny random DiTs."""
    out = {}
    for fam in families:
        model = tiny_models.tiny_dit(fam)
        pos = tiny_models.dit_conditioning(fam)
        pos[0][1]["asyndm_targets"] = dict(TARGETS)
        neg = tiny_models.dit_conditioning(fam, length=7, seed=99)
        out[fam] = (model, pos, neg)
    return out


@pytest.fixture(scope="module")
def dits(comfy_env, tiny_models):
    return dit_setups(tiny_models, FAMILIES)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _kwargs(fam, pos, batch, gen):
    kw = {"c_crossattn": pos[0][0].expand(batch, -1, -1), "y": pos[0][1]["pooled_output"].expand(batch, -1)}
    if fam == "flux":
        kw["guidance"] = torch.full((batch,), 3.5)
    return kw


def _sigma(model, frac):
    ms = model.get_model_object("model_sampling")
    return ms.sigmas.float()[int(frac * (len(ms.sigmas) - 1))]


def _attention_log():
    """An optimized_attention_override that records every attention's (q, k) as the model
    computes it (after RoPE), for a reference that does not use the backend."""
    log = []

    def override(func, *args, **kwargs):
        q, k = args[0], args[1]
        log.append((q.detach().clone(), k.detach().clone(), args[3] if len(args) > 3 else kwargs.get("heads"),
                    kwargs.get("skip_reshape", False)))
        return func(*args, **kwargs)

    return log, override


def _reference_maps(log, blocks, n_txt, positions):
    maps = []
    for i in blocks:
        q, k, heads, skip = log[i]
        if not skip:  # (B, L, H·d) → (B, H, L, d)
            q, k = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k))
        probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(dim=1)
        maps.append(torch.stack([probs[:, n_txt:, p].mean(-1) for p in positions], dim=1))
    return torch.stack(maps).mean(dim=0)  # (B, N, tokens)


# ---------------------------------------------------------------------------------------- inv. 1, 6
@pytest.mark.parametrize("fam", FAMILIES)
def test_dit_constant_map_is_stock_forward_with_the_models_own_attention(dits, fam):
    import comfy.model_management

    from asyndm_fpdm.samplers.backends import backend_for
    from asyndm_fpdm.samplers.backends.comfy_unet import PixelCall

    model, pos, neg = dits[fam]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=gen)
    kw = _kwargs(fam, pos, 2, gen)
    s = _sigma(model, 0.6)
    sigma = s.expand(2)
    comfy.model_management.load_models_gpu([model])
    dm = model.model.diffusion_model
    log, override = _attention_log()
    stock = model.model.apply_model(x, sigma, transformer_options={"optimized_attention_override": override}, **kw)
    backend = backend_for(model)
    assert backend.cell == 2
    embedder = dm.time_in.in_layer if fam.startswith("flux") else dm.t_embedder.mlp[0]  # the time MLP
    rows = []
    hook = embedder.register_forward_hook(lambda m, a, o: rows.append(o.shape[0]))
    try:
        base = {"transformer_options": {"cond_or_uncond": [0]}}
        call = PixelCall(s.expand(2, 1, 8, 8), capture=True, positions=TARGETS["positions"], context_len=12)
        to = backend.model_options(base, call)["transformer_options"]
        const = model.model.apply_model(x, sigma, transformer_options=to, **kw)
        maps = call.item_maps()
        rows.clear()
        sig_map = s.expand(2, 1, 8, 8).clone()
        sig_map[:, :, :4] = _sigma(model, 0.9)
        sig_map[1, :, :, :2] = _sigma(model, 0.1)
        to2 = backend.model_options(base, PixelCall(sig_map))["transformer_options"]
        mixed = model.model.apply_model(x, sig_map.flatten(1).amin(1), transformer_options=to2, **kw)
        distinct = list(rows)
    finally:
        hook.remove()
    assert _rel(const, stock) <= 1e-5, _rel(const, stock)  # invariant 1
    # invariant 6: the time MLP ran on the 5 distinct (image, timestep) pairs beside ComfyUI's own
    # per-image call (2 rows, kept for the text stream); never on the 32 tokens
    assert distinct == [2, 5]
    assert float((mixed - const).abs().max()) > 1e-3
    # tokens on the background's sigma in the mixed map give the same output as there
    bg = model.model.apply_model(x, sig_map.flatten(1).amin(1), transformer_options={}, **kw)
    assert float((mixed - bg)[0, :, 4:].abs().max()) < float((mixed - bg)[0, :, :4].abs().max())
    # masks: the model's own joint attention of image queries to the target tokens (captured blocks)
    assert maps.shape == (2, 2, 4, 4)
    ref = _reference_maps(log, backend.capture_blocks if fam.startswith("flux") else sorted(backend.capture_blocks),
                          12, TARGETS["positions"])
    assert _rel(maps.flatten(2), ref) <= 1e-4, _rel(maps.flatten(2), ref)


# ---------------------------------------------------------------------------------------- inv. 2
@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("sampler,scheduler", SAMPLERS)
def test_dit_empty_mask_equals_comfyui_sampler(dits, fam, sampler, scheduler):
    model, pos, neg = dits[fam]
    lat = empty_latent(1, 8, 16)
    empty = torch.zeros(1, 64, 64)
    cfg = 1.0 if fam == "flux" else 2.0
    steps = 4
    ours, info = sampler_node(model, pos, neg, lat, mask_source="mask input", mask=empty, sampler_name=sampler,
                              scheduler=scheduler, eta=1.0, steps=steps, cfg=cfg)
    core = core_ksampler(model, pos, neg, lat, steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler)
    assert _rel(ours, core) <= TOL_SAME_SAMPLER, (sampler, _rel(ours, core))
    # a fixed half mask lags its tokens (whole 2×2 patches) and the run still ends clean
    mask = torch.zeros(1, 64, 64)
    mask[:, :28] = 1  # 3.5 latent rows: token row 1 is 3/4 covered, so the plan puts 4 rows in
    lagged, linfo = sampler_node(model, pos, neg, lat, mask_source="mask input", mask=mask, sampler_name=sampler,
                                 scheduler=scheduler, eta=1.0, steps=steps, cfg=cfg)
    assert torch.isfinite(lagged).all() and float((lagged - ours).abs().max()) > 1e-4
    t = torch.stack(linfo.timestep_maps)[:, 0]
    grid = 1.0 if fam == "sd3" else 1e-3  # items' timesteps are rounded to the model's grid
    assert (t[:, :4] >= t[:, 4:].amax(dim=(1, 2), keepdim=True) - grid).all()
    assert bool((t[:, :4].amin(dim=(1, 2)) > t[:, 4:].amax(dim=(1, 2))).any())  # it lags
    assert torch.equal(t[:, 2:4], t[:, 0:2])  # one sigma per token


def test_dit_flux_schnell_few_step_schedule(dits):
    model, pos, neg = dits["flux_schnell"]
    lat = empty_latent(1, 8, 16)
    ours, info = sampler_node(model, pos, neg, lat, mask_source="mask input", mask=torch.zeros(1, 64, 64),
                              sampler_name="euler", scheduler="simple", steps=4, cfg=1.0)
    core = core_ksampler(model, pos, neg, lat, steps=4, cfg=1.0, sampler="euler", scheduler="simple")
    assert _rel(ours, core) <= TOL_SAME_SAMPLER
    dyn, dinfo = sampler_node(model, pos, neg, lat, sampler_name="euler", scheduler="simple", steps=4, cfg=1.0)
    assert len(dinfo.timestep_maps) == 4 and torch.isfinite(dyn).all()
    # schnell's timesteps are flow time (multiplier 1): every map within [0, 1]
    assert all(float(t.max()) <= 1.0 for t in dinfo.timestep_maps)


# ---------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("fam", ["flux", "sd3"])
def test_dit_dynamic_masks_follow_the_target_tokens_attention(dits, fam):
    model, pos, neg = dits[fam]
    lat = empty_latent(1, 16, 16)
    cfg = 1.0 if fam == "flux" else 2.0
    out, info = sampler_node(model, pos, neg, lat, sampler_name="euler", scheduler="simple", steps=4, cfg=cfg)
    maps = [m for m in info.item_maps if m is not None]
    assert len(maps) == 4 and maps[0].shape == (1, 2, 8, 8)  # the token grid of a 16×16 latent
    from asyndm_fpdm.samplers.masks import build_item_masks

    for m, mask in zip(info.item_maps[:-1], info.masks[1:]):  # step i's masks come from step i−1's attention
        expect = build_item_masks(m, info.ks, (16, 16), 1.0)
        expect = expect[..., ::2, ::2].repeat_interleave(2, -2).repeat_interleave(2, -1)
        assert torch.equal(mask, expect)
    # other target tokens (other attention) → other masks
    moved = [[[p[0] + 1] for p in TARGETS["positions"]]]
    pos2 = [[pos[0][0], dict(pos[0][1], asyndm_targets=dict(TARGETS, positions=moved[0]))]]
    _, info2 = sampler_node(model, pos2, neg, lat, sampler_name="euler", scheduler="simple", steps=4, cfg=cfg)
    assert not torch.equal(info2.item_maps[1], info.item_maps[1])
    assert any(not torch.equal(a, b) for a, b in zip(info.masks[1:], info2.masks[1:]))


# ---------------------------------------------------------------------------------------- previews
@pytest.mark.parametrize("fam, top", [("flux", 1.0), ("sd3", 1000.0)])
def test_dit_previews_draw_on_the_models_timestep_scale(dits, fam, top):
    """The preview nodes scale a run's timesteps by the model's own top timestep (σ = 1 is timestep
    σ × multiplier: 1 on Flux, 1000 on SD3), so a flow run is drawn from white (noisy) to black
    (clean) like an SD run on its 1001. Broken variant caught: the paper's fixed 1001 for every
    model (Flux's maps, all ≤ 1, drew almost black: gray levels up to 0.001)."""
    from asyndm_fpdm.nodes.asyndm_preview_nodes import AsynDMCurvePreview, AsynDMMaskStepsPreview
    from asyndm_fpdm.samplers.comfyui.previews import PALETTE
    from png_content import assert_curves_drawn, assert_mask_steps_preview_shows, mean_timesteps

    model, pos, neg = dits[fam]
    cfg = 1.0 if fam == "flux" else 2.0
    _, info = sampler_node(model, pos, neg, empty_latent(1, 16, 16), sampler_name="euler", scheduler="simple",
                           steps=4, cfg=cfg)
    regions, times = AsynDMMaskStepsPreview().preview(info, "0, 1, 2, 3", 0)
    assert_mask_steps_preview_shows(regions, times, info, [0, 1, 2, 3], 0, PALETTE, max_t=top)
    first, last = float(times[0].min()), float(times[-1].min())  # step 0 is near pure noise, step 3 far below
    assert first >= 0.9 and last <= first - 0.3, f"the grays do not span noisy → clean ({first:.3f} → {last:.3f})"
    (curves,) = AsynDMCurvePreview().plot(4, "bin", "0.7", run=info)
    assert_curves_drawn(curves[0], mean_timesteps(info), PALETTE, max_t=top)


# ---------------------------------------------------------------------------------------- inv. 4, 5
@pytest.mark.parametrize("fam", ["flux", "sd3"])
def test_dit_leaves_the_input_model_untouched_and_batch_independent(dits, fam):
    model, pos, neg = dits[fam]
    cfg = 1.0 if fam == "flux" else 2.0
    options_before = repr(model.model_options)
    before = core_ksampler(model, pos, neg, empty_latent(1, 8, 16), steps=3, cfg=cfg, sampler="euler",
                           scheduler="simple")
    one, _ = sampler_node(model, pos, neg, empty_latent(1, 8, 16), sampler_name="euler_ancestral",
                          scheduler="simple", steps=3, cfg=cfg, eta=0.5)
    three, _ = sampler_node(model, pos, neg, empty_latent(3, 8, 16), sampler_name="euler_ancestral",
                            scheduler="simple", steps=3, cfg=cfg, eta=0.5)
    after = core_ksampler(model, pos, neg, empty_latent(1, 8, 16), steps=3, cfg=cfg, sampler="euler",
                          scheduler="simple")
    assert torch.equal(before, after)
    assert repr(model.model_options) == options_before
    assert not any("asyndm" in str(k) for k in model.object_patches)
    assert all(not w for w in model.wrappers.values())
    dm = model.model.diffusion_model
    assert not any(m._forward_hooks for m in dm.modules())
    assert _rel(three[:1], one) <= 1e-5 and float((three[1] - three[0]).abs().max()) > 1e-3


def test_dit_unsupported_family_names_what_is_supported(comfy_env):
    import types

    from asyndm_fpdm.samplers.backends import UnsupportedModelError, backend_for

    class VideoDiT(torch.nn.Module):
        pass

    fake = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=VideoDiT()))
    with pytest.raises(UnsupportedModelError) as err:
        backend_for(fake)
    msg = str(err.value)
    assert "VideoDiT" in msg and "Flux" in msg and "SD3" in msg and "SDXL" in msg


# ---------------------------------------------------------------------------------------- targets
class _TokenizerClip:
    """A CLIP as the AsynDM Text Encode node sees it: ComfyUI's real Flux / SD3 tokenizers (their
    vocab files ship with ComfyUI); the encoder returns a context of the real layout's length."""

    def __init__(self, family, t5=True):
        import types

        from comfy.text_encoders import flux, sd3_clip

        self.tokenizer = flux.FluxTokenizer() if family == "flux" else sd3_clip.SD3Tokenizer()
        self.family = family
        self.cond_stage_model = types.SimpleNamespace(clip_l=object(), clip_g=object(), t5xxl=object() if t5 else None)

    def tokenize(self, text):
        return self.tokenizer.tokenize_with_weights(text)

    def encode_from_tokens_scheduled(self, tokens):
        n_t5 = sum(len(c) for c in tokens["t5xxl"])
        n = n_t5 if self.family == "flux" else sum(len(c) for c in tokens["g"]) + n_t5
        return [[torch.zeros(1, n, 8), {"pooled_output": torch.zeros(1, 8)}]]


def test_dit_targets_flux_read_t5_positions(comfy_env):
    from asyndm_fpdm.samplers.comfyui.tokens import locate_targets
    from asyndm_fpdm.samplers.tokens import UnknownWordError

    clip = _TokenizerClip("flux")
    prompt = "a (rabbit:1.3) playing basketball beside a rabbit"
    info = locate_targets(clip, prompt, "rabbit#2:0.6, basketball")
    ids = [t[0] for c in clip.tokenize(prompt)["t5xxl"] for t in c]
    rabbit = [t[0] for t in clip.tokenize("rabbit")["t5xxl"][0]][:1]
    assert [ids[p] for p in info["positions"][0]] == rabbit and info["ks"] == [0.6, 0.7]
    assert info["positions"][0][0] > info["positions"][1][-1]  # the second rabbit, after basketball
    assert info["context_len"] == len(ids) == 256  # Flux's T5 pads to 256 tokens
    long = locate_targets(clip, " ".join(["green"] * 300) + " rabbit", "rabbit")
    assert long["positions"][0][0] >= 300 and long["context_len"] > 300
    with pytest.raises(UnknownWordError) as err:
        locate_targets(clip, "a rabbit playing basketball", "dog")
    msg = str(err.value)
    assert "'dog'" in msg and "rabbit" in msg and "basketball" in msg and "\u2581" not in msg and "<pad>" not in msg


def test_dit_targets_quoted_words_are_ordinary_text_for_t5_and_clip(comfy_env):
    """Flux and SD3 keep quotes as ordinary text: a quoted word is T5's pieces without the
    sentencepiece space ('▁"', 'O', 'PEN', '"'; '"rabbit"' → 'rab', 'bit'), CLIP's the same word
    as unquoted. Oracle: each tokenizer's own decode of the prompt's tokens at the positions.
    Caught: the word's ids alone (the lookup before: '▁OPEN' is not in the quoted T5 prompt)."""
    from asyndm_fpdm.samplers.comfyui.tokens import locate_targets

    prompt = 'a sign that says "OPEN" beside a "rabbit" and a rabbit'
    for family, key in (("flux", "t5xxl"), ("sd3", "g")):
        clip = _TokenizerClip(family)
        sub = getattr(clip.tokenizer, "clip_g" if key == "g" else key)
        info = locate_targets(clip, prompt, "OPEN, rabbit#1, rabbit")
        ids = [t[0] for c in clip.tokenize(prompt)[key] for t in c]
        said = [sub.tokenizer.decode([ids[p] for p in ps]).strip(' "') for ps in info["positions"]]
        assert said[:2] == ["OPEN" if key == "t5xxl" else "open", "rabbit"], family
        assert sub.tokenizer.decode([ids[p] for p in info["positions"][2]]).split() == ["rabbit", "rabbit"]


def test_dit_targets_sd3_read_clip_positions_and_the_joint_length(comfy_env):
    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMTextEncode
    from asyndm_fpdm.samplers.comfyui.tokens import locate_targets

    clip = _TokenizerClip("sd3")
    prompt = "a rabbit playing basketball"
    info = locate_targets(clip, prompt, "rabbit, basketball")
    assert info["positions"] == [[2], [4]]  # CLIP-L/G: start token first, same positions in both
    cond = AsynDMTextEncode().encode(clip, prompt, "rabbit, basketball")[0]
    t5 = sum(len(c) for c in clip.tokenize(prompt)["t5xxl"])
    assert cond[0][1]["asyndm_targets"]["context_len"] == 77 + t5 == cond[0][0].shape[1]
    t5_only = _TokenizerClip("sd3")
    t5_only.cond_stage_model.clip_l = t5_only.cond_stage_model.clip_g = None
    ids = [t[0] for c in t5_only.tokenize(prompt)["t5xxl"] for t in c]
    p = locate_targets(t5_only, prompt, "rabbit")["positions"][0]
    assert ids[p[0]] == t5_only.tokenize("rabbit")["t5xxl"][0][0][0]


# ---------------------------------------------------------------------------------------- any model
def test_vanilla_runs_on_a_family_without_a_backend(comfy_env, tiny_models):
    """Vanilla has nothing per pixel, so it runs on any model ComfyUI loads: on a tiny AuraFlow
    (ComfyUI's own MMDiT from supported_models.AuraFlow, a family no backend covers) it equals the
    core KSampler; AsynDM and DMconcave still say what is supported and that vanilla runs.
    Caught: vanilla asking for a backend as the other modes do (an UnsupportedModelError)."""
    from asyndm_fpdm.samplers.backends import UnsupportedModelError

    model = tiny_models.tiny_auraflow()
    pos, neg = tiny_models.auraflow_conditioning(), tiny_models.auraflow_conditioning(5, 99)
    lat = empty_latent(1, 8, 4)
    for sampler, scheduler in (("euler", "simple"), ("dpmpp_2m", "beta")):
        ours, info = sampler_node(model, pos, neg, lat, mode="vanilla", sampler_name=sampler, scheduler=scheduler,
                                  steps=3, cfg=2.0)
        core = core_ksampler(model, pos, neg, lat, steps=3, cfg=2.0, sampler=sampler, scheduler=scheduler)
        assert _rel(ours, core) <= TOL_SAME_SAMPLER, (sampler, _rel(ours, core))
        assert len(info.timestep_maps) == 3
    for mode in ("AsynDM", "DMconcave"):
        with pytest.raises(UnsupportedModelError) as err:
            sampler_node(model, pos, neg, lat, mode=mode, mask_source="mask input", mask=torch.ones(1, 64, 64),
                         sampler_name="euler", scheduler="simple", steps=3, cfg=2.0)
        msg = str(err.value)
        assert "AuraFlow" in msg and "Flux" in msg and "'vanilla' runs on any model" in msg
