"""AsynDM on the families added on the backend protocol (issue 16), inside a real ComfyUI: tiny random
stand-ins built from ComfyUI's own model configs (comfy_tiny.py). Per family the invariants of
DESIGN.md: a constant map is the stock forward; the time conditioning runs on the distinct
(image, timestep) rows only and equals, per token, a naive loop over tokens; the captured attention
equals the attention recomputed from the model's own q/k; with an empty mask every sampler is
ComfyUI's; image 0 of a batch equals itself alone; the input MODEL is unchanged; weight patches
(LoRA) reach the per-token path.

Run: COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/integration/test_asyndm_families.py
"""

import pytest
import torch

from asyndm_helpers import core_ksampler, empty_latent, sampler_node
from test_asyndm_transformers import TARGETS, _attention_log, _reference_maps, _rel, _sigma, dit_setups

FAMILIES = ["chroma", "wan", "qwen_image"]
FAMILIES += ["chroma_radiance"]  # pixel space: the "latent" is the RGB image, a token a patch of pixels
FAMILIES += ["lumina2"]
TOL_SAME_SAMPLER = 1e-5  # same formulas with maps in place of scalars: fp32 round-off
SAMPLERS = [("euler", "simple"), ("heun", "simple"), ("dpmpp_2m", "simple"), ("euler_ancestral", "simple"),
            ("dpmpp_2m_sde", "simple")]
FAMILIES += ["hidream"]
FAMILIES += ["hunyuan_image"]


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def fams(comfy_env, tiny_models):
    return dit_setups(tiny_models, FAMILIES)


def _latent(fam, batch=1, size=8, frames=1):
    """A family's empty latent: Wan's is a video (B, 16, frames, size, size); one frame is text-to-image."""
    if fam in ("wan", "qwen_image"):  # Qwen-Image: a one-frame video latent (Wan's VAE)
        return {"samples": torch.zeros(batch, 16, frames, size, size)}
    if fam == "hunyuan_image":  # 64-channel latents (its VAE downsamples 32×)
        return empty_latent(batch, size, 64)
    if fam == "chroma_radiance":  # pixels (the tiny stand-in's patch is 2 pixels, the real one 16)
        return empty_latent(batch, size, 3)
    return empty_latent(batch, size, 16)


def _chroma_kwargs(pos, batch):
    return {"c_crossattn": pos[0][0].expand(batch, -1, -1), "guidance": torch.zeros(batch)}


def _naive_chroma_img_mod(dm, stock_in, t_tokens, block):
    """Every image token's first double-block image modulation, one token at a time: the stock
    approximator input of its image with the token's own timestep embedding (a slow loop)."""
    from comfy.ldm.flux.layers import timestep_embedding

    out = torch.empty(t_tokens.shape[0], t_tokens.shape[1], dm.hidden_size)
    for b in range(t_tokens.shape[0]):
        for j in range(t_tokens.shape[1]):
            v = stock_in[b:b + 1].clone()
            v[:, :, :16] = timestep_embedding(t_tokens[b, j:j + 1], 16).to(v.dtype)
            out[b, j] = dm.get_modulations(dm.distilled_guidance_layer(v), "double_img", idx=block)[0].shift[0, 0]
    return out


def _forwards(model, x, kw, hooks, counters):
    """The stock forward at one sigma (its attention logged), the constant map of that sigma with
    capture (maps), and a mixed map (rows 0–3 at a later sigma, image 1's first columns at an
    earlier one), with ``hooks`` (module, kind, fn) active; ``counters`` are cleared before the
    mixed forward. Returns a dict of stock, const, maps, mixed, sig_map, backend, log."""
    import comfy.model_management

    from asyndm_fpdm.samplers.backends import backend_for
    from asyndm_fpdm.samplers.backends.comfy_call import PixelCall

    s = _sigma(model, 0.6)
    sigma = s.expand(2)
    comfy.model_management.load_models_gpu([model])
    log, override = _attention_log()
    stock = model.model.apply_model(x, sigma, transformer_options={"optimized_attention_override": override}, **kw)
    backend = backend_for(model)
    register = {"hook": lambda m, fn: m.register_forward_hook(fn),
                "pre_hook": lambda m, fn: m.register_forward_pre_hook(fn),
                "pre_hook_kw": lambda m, fn: m.register_forward_pre_hook(fn, with_kwargs=True)}
    handles = [register[kind](m, fn) for m, kind, fn in hooks]
    try:
        base = {"transformer_options": {"cond_or_uncond": [0]}}
        call = PixelCall(s.expand(2, 1, 8, 8), capture=True, positions=TARGETS["positions"], context_len=12)
        const = model.model.apply_model(x, sigma, transformer_options=backend.model_options(base, call)[
            "transformer_options"], **kw)
        for c in counters:
            c.clear()
        sig_map = s.expand(2, 1, 8, 8).clone()
        sig_map[:, :, :4] = _sigma(model, 0.9)
        sig_map[1, :, :, :2] = _sigma(model, 0.1)
        to2 = backend.model_options(base, PixelCall(sig_map))["transformer_options"]
        mixed = model.model.apply_model(x, sig_map.flatten(1).amin(1), transformer_options=to2, **kw)
    finally:
        for h in handles:
            h.remove()
    return dict(stock=stock, const=const, maps=call.item_maps(), mixed=mixed, sig_map=sig_map, backend=backend,
                log=log)


# ---------------------------------------------------------------------------------------- inv. 1, 6
@pytest.mark.parametrize("fam", ["chroma", "chroma_radiance"])
def test_chroma_constant_map_is_stock_forward_modulations_per_row_and_the_models_own_attention(fams, fam):
    """Chroma, and Chroma Radiance on its pixel-patch grid (its NeRF head takes no timestep). Caught:
    timestep embedding of the image's sigma instead of the row's (naive-loop oracle); the
    approximator run per token (row count); Radiance: its blocks left on the per-image modulation
    (Flux's replace patches only: naive-loop oracle)."""
    model, pos, neg = fams[fam]
    x = torch.randn(2, _latent(fam)["samples"].shape[1], 8, 8, generator=torch.Generator().manual_seed(0))
    dm = model.model.diffusion_model
    rows, seen = [], {}
    r = _forwards(model, x, _chroma_kwargs(pos, 2), [
        (dm.distilled_guidance_layer.in_proj, "hook", lambda m, a, o: rows.append(a[0].shape[0])),
        (dm.distilled_guidance_layer, "pre_hook", lambda m, a: seen.update(stock_in=a[0])),
        (dm.double_blocks[0], "pre_hook_kw", lambda m, a, k: seen.update(vec=k["vec"]))], [rows])
    stock, const, mixed, maps, sig_map, backend, log = (r[k] for k in ("stock", "const", "mixed", "maps", "sig_map",
                                                                       "backend", "log"))
    distinct = list(rows)
    assert type(backend).__name__ == {"chroma": "ComfyChromaBackend",
                                      "chroma_radiance": "ComfyChromaRadianceBackend"}[fam] and backend.cell == 2
    assert _rel(const, stock) <= 1e-5, _rel(const, stock)  # invariant 1
    # invariant 6: the approximator ran once, on the 5 distinct (image, timestep) rows (344
    # modulation slots each; the stock per-image rows are among them), never on the 32 tokens
    assert distinct == [5]
    assert float((mixed - const).abs().max()) > 1e-3
    # the per-token modulation the first double block receives = a naive loop over tokens
    t_tokens = sig_map[:, 0, ::2, ::2].flatten(1)  # flow time = sigma (multiplier 1)
    naive = _naive_chroma_img_mod(dm, seen["stock_in"], t_tokens, 0)
    got = seen["vec"][0][0].shift
    got = got.rows[got.index] if hasattr(got, "rows") else got  # a Gathered part: its rows taken per token
    assert got.shape == naive.shape and _rel(got, naive) <= 1e-5, _rel(got, naive)
    # masks: the model's own joint attention of image queries to the target tokens (captured blocks)
    assert maps.shape == (2, 2, 4, 4)
    ref = _reference_maps(log, backend.capture_blocks, 12, TARGETS["positions"])
    assert _rel(maps.flatten(2), ref) <= 1e-4, _rel(maps.flatten(2), ref)


def test_wan_constant_map_is_stock_forward_time_rows_per_row_and_its_own_cross_attention(fams):
    """Wan (one frame here; frames are rows of the folded grid, test below). Caught: the stock
    per-image projection left in place of the per-token one (naive loop)."""
    from comfy.ldm.wan.model import sinusoidal_embedding_1d

    model, pos, neg = fams["wan"]
    x = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    dm = model.model.diffusion_model
    emb_rows, proj_rows, seen = [], [], {}
    r = _forwards(model, x, {"c_crossattn": pos[0][0].expand(2, -1, -1)}, [
        (dm.time_embedding[0], "hook", lambda m, a, o: emb_rows.append(a[0].shape[0])),
        (dm.time_projection[1], "hook", lambda m, a, o: proj_rows.append(a[0].shape[:-1])),
        (dm.blocks[0], "pre_hook_kw", lambda m, a, k: seen.update(e=k["e"]))], [emb_rows, proj_rows])
    stock, const, mixed, maps, sig_map, backend, log = (r[k] for k in ("stock", "const", "mixed", "maps", "sig_map",
                                                                       "backend", "log"))
    assert type(backend).__name__ == "ComfyWanBackend" and backend.cell == 2
    assert _rel(const, stock) <= 1e-5, _rel(const, stock)  # invariant 1
    # invariant 6: the time MLP and the projection ran on ComfyUI's 2 images and the 5 distinct
    # (image, timestep) rows, never on the 32 tokens
    assert emb_rows == [2, 5] and [tuple(r) for r in proj_rows] == [(2, 1), (5,)]
    assert float((mixed - const).abs().max()) > 1e-3
    # the per-token modulation block 0 receives = each token through the time MLPs alone (a loop)
    ms = model.get_model_object("model_sampling")
    t_tokens = ms.timestep(sig_map[:, 0, ::2, ::2].flatten(1)).float()
    naive = torch.stack([torch.stack([dm.time_projection(dm.time_embedding(
        sinusoidal_embedding_1d(dm.freq_dim, t_tokens[b, j:j + 1]))).view(6, -1) for j in range(t_tokens.shape[1])])
        for b in range(2)])
    assert seen["e"].shape == naive.shape and _rel(seen["e"], naive) <= 1e-5, _rel(seen["e"], naive)
    # masks: softmax of the image queries over the text keys of the captured blocks' cross-attention
    cross = [entry for entry in log if entry[1].shape[1] == 12]  # keys = the 12 text tokens
    assert len(cross) == len(dm.blocks)
    ref = _reference_maps(cross, backend.capture_blocks, 0, TARGETS["positions"])
    assert maps.shape == (2, 2, 4, 4) and _rel(maps.flatten(2), ref) <= 1e-4, _rel(maps.flatten(2), ref)


def test_qwen_image_constant_map_is_stock_forward_per_token_modulation_and_its_own_attention(fams):
    """Caught: the image stream modulated with the stock per-image vector (naive per-token oracle of
    block 0's modulated attention input)."""
    model, pos, neg = fams["qwen_image"]
    x = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    dm = model.model.diffusion_model
    rows, seen = [], {}
    block = dm.transformer_blocks[0]
    r = _forwards(model, x, {"c_crossattn": pos[0][0].expand(2, -1, -1)}, [
        (dm.time_text_embed.timestep_embedder.linear_1, "hook", lambda m, a, o: rows.append(a[0].shape[0])),
        (dm.img_in, "hook", lambda m, a, o: seen.update(img=o)),
        (block.attn.to_q, "hook", lambda m, a, o: seen.setdefault("q_in", []).append(a[0]))], [rows])
    stock, const, mixed, maps, sig_map, backend, log = (r[k] for k in ("stock", "const", "mixed", "maps", "sig_map",
                                                                       "backend", "log"))
    assert type(backend).__name__ == "ComfyQwenImageBackend" and backend.cell == 2
    assert _rel(const, stock) <= 1e-5, _rel(const, stock)  # invariant 1
    assert rows == [2, 5]  # ComfyUI's 2 images, then the 5 distinct (image, timestep) rows; never 32 tokens
    assert float((mixed - const).abs().max()) > 1e-3
    ms = model.get_model_object("model_sampling")
    t_tokens = ms.timestep(sig_map[:, 0, ::2, ::2].flatten(1)).float()
    img, q_in = seen["img"], seen["q_in"][-1]  # the mixed forward's block 0
    naive = torch.empty_like(q_in)
    for b in range(2):
        for j in range(t_tokens.shape[1]):
            temb = dm.time_text_embed(t_tokens[b, j:j + 1], img)
            shift, scale, _ = block.img_mod(temb).chunk(2, dim=-1)[0].chunk(3, dim=-1)
            naive[b, j] = block.img_norm1(img[b:b + 1, j:j + 1])[0, 0] * (1 + scale[0]) + shift[0]
    assert _rel(q_in, naive) <= 1e-5, _rel(q_in, naive)
    n_txt = pos[0][0].shape[1]
    ref = _reference_maps(log, sorted(backend.capture_blocks), n_txt, TARGETS["positions"])
    assert maps.shape == (2, 2, 4, 4) and _rel(maps.flatten(2), ref) <= 1e-4, _rel(maps.flatten(2), ref)


def test_qwen_image_edit_reference_latents_are_refused_with_what_is_supported(fams):
    """Qwen-Image Edit widens the image stream with reference-latent tokens: a clear refusal. Caught:
    without the check, a tensor-size error deep inside the first block."""
    from asyndm_fpdm.samplers.backends import backend_for
    from asyndm_fpdm.samplers.backends.comfy_call import PixelCall
    from asyndm_fpdm.samplers.backends.pixel_math import UnsupportedModelError

    model, pos, neg = fams["qwen_image"]
    x = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = _sigma(model, 0.6)
    opts = backend_for(model).model_options({"transformer_options": {"cond_or_uncond": [0]}},
                                            PixelCall(s.expand(1, 1, 8, 8)))
    with pytest.raises(UnsupportedModelError, match="Qwen-Image Edit"):
        model.model.apply_model(x, s.expand(1), transformer_options=opts["transformer_options"],
                                c_crossattn=pos[0][0], ref_latents=[torch.zeros_like(x)])


def test_wan_video_plan_on_the_frame_patch_grid_with_masks_per_frame(fams):
    """A 2-frame video: maps, masks and timesteps per frame, frames stacked along the height; frame
    1 of a video is not frame 0 (each frame reads its own attention)."""
    model, pos, neg = fams["wan"]
    out, info = sampler_node(model, pos, neg, _latent("wan", 1, 8, frames=2), sampler_name="euler",
                             scheduler="simple", steps=4, cfg=2.0)
    assert out.shape == (1, 16, 2, 8, 8) and torch.isfinite(out).all()
    maps = [m for m in info.item_maps if m is not None]
    assert len(maps) == 4 and maps[0].shape == (1, 2, 8, 4)  # (frames · 8/2, 8/2) token grid
    assert not torch.equal(maps[1][..., :4, :], maps[1][..., 4:, :])
    assert info.timestep_maps[0].shape[-2:] == (16, 8)
    # a constant (vanilla) run equals ComfyUI's own sampler on the video
    van, _ = sampler_node(model, pos, neg, _latent("wan", 1, 8, frames=2), mode="vanilla", sampler_name="euler",
                          scheduler="simple", steps=4, cfg=2.0)
    core = core_ksampler(model, pos, neg, _latent("wan", 1, 8, frames=2), steps=4, cfg=2.0, sampler="euler",
                         scheduler="simple")
    assert _rel(van, core) <= TOL_SAME_SAMPLER


# ---------------------------------------------------------------------------------------- inv. 2
@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("sampler,scheduler", SAMPLERS)
def test_family_empty_mask_equals_comfyui_sampler_and_a_mask_lags_whole_tokens(fams, fam, sampler, scheduler):
    model, pos, neg = fams[fam]
    lat = _latent(fam)
    empty = torch.zeros(1, 64, 64)
    ours, _ = sampler_node(model, pos, neg, lat, mask_source="mask input", mask=empty, sampler_name=sampler,
                           scheduler=scheduler, eta=1.0, steps=4, cfg=2.0)
    core = core_ksampler(model, pos, neg, lat, steps=4, cfg=2.0, sampler=sampler, scheduler=scheduler)
    assert _rel(ours, core) <= TOL_SAME_SAMPLER, (sampler, _rel(ours, core))
    mask = torch.zeros(1, 64, 64)
    mask[:, :28] = 1  # 3.5 latent rows: token row 1 is 3/4 covered, so the plan puts 4 rows in
    lagged, info = sampler_node(model, pos, neg, lat, mask_source="mask input", mask=mask, sampler_name=sampler,
                                scheduler=scheduler, eta=1.0, steps=4, cfg=2.0)
    assert torch.isfinite(lagged).all() and float((lagged - ours).abs().max()) > 1e-4
    t = torch.stack(info.timestep_maps)[:, 0]
    assert t.shape[-2:] == (8, 8)
    assert bool((t[:, :4].amin(dim=(1, 2)) > t[:, 4:].amax(dim=(1, 2))).any())  # it lags
    assert torch.equal(t[:, 2:4], t[:, 0:2])  # one sigma per token


# ---------------------------------------------------------------------------------------- inv. 4, 5
@pytest.mark.parametrize("fam", FAMILIES)
def test_family_dynamic_run_batch_independent_and_leaves_the_model_untouched(fams, fam):
    model, pos, neg = fams[fam]
    options_before = repr(model.model_options)
    one, info = sampler_node(model, pos, neg, _latent(fam), sampler_name="euler_ancestral",
                             scheduler="simple", steps=3, cfg=2.0, eta=0.5)
    three, _ = sampler_node(model, pos, neg, _latent(fam, 3), sampler_name="euler_ancestral",
                            scheduler="simple", steps=3, cfg=2.0, eta=0.5)
    assert len([m for m in info.item_maps if m is not None]) == 3  # masks from its own attention
    assert _rel(three[:1], one) <= 1e-5 and float((three[1] - three[0]).abs().max()) > 1e-3
    assert repr(model.model_options) == options_before
    assert all(not w for w in model.wrappers.values())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.model.diffusion_model.modules())


@pytest.mark.parametrize("fam", FAMILIES)
def test_family_weight_patches_reach_the_per_token_path(fams, fam):
    """A LoRA-like weight patch on the time-conditioning network: the per-token path (constant map)
    still equals ComfyUI's sampler on the patched model, and the patch changes the result.
    Caught: rows computed from a copy of the unpatched module."""
    model, pos, neg = fams[fam]
    key = {"chroma": "diffusion_model.distilled_guidance_layer.out_proj.weight",
           "chroma_radiance": "diffusion_model.distilled_guidance_layer.out_proj.weight",
           "wan": "diffusion_model.time_projection.1.weight",
           "qwen_image": "diffusion_model.transformer_blocks.0.img_mod.1.weight",
           "hidream": "diffusion_model.double_stream_blocks.0.block.adaLN_modulation.1.weight",
           "lumina2": "diffusion_model.layers.0.adaLN_modulation.1.weight",
           "hunyuan_image": "diffusion_model.double_blocks.0.img_mod.lin.weight",
           }[fam]
    weight = model.model.get_parameter(key)
    patched = model.clone()
    patched.add_patches({key: (0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)),)}, 1.0)
    lat = _latent(fam)
    empty = torch.zeros(1, 64, 64)
    ours, _ = sampler_node(patched, pos, neg, lat, mask_source="mask input", mask=empty, sampler_name="euler",
                           scheduler="simple", steps=3, cfg=2.0)
    core = core_ksampler(patched, pos, neg, lat, steps=3, cfg=2.0, sampler="euler", scheduler="simple")
    plain = core_ksampler(model, pos, neg, lat, steps=3, cfg=2.0, sampler="euler", scheduler="simple")
    assert _rel(ours, core) <= TOL_SAME_SAMPLER
    assert float((core - plain).abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------- targets
def test_chroma_targets_read_t5_positions_of_the_context_the_model_gets(comfy_env, tiny_models):
    """Chroma's text encoder (ComfyUI's PixArt T5 config, tiny T5, the real T5 tokenizer): the text
    encode node's positions index the context Chroma attends to, no padding."""
    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMTextEncode

    clip = tiny_models.tiny_dit_clip("chroma")
    prompt = "a rabbit playing basketball beside a rabbit"
    cond = AsynDMTextEncode().encode(clip, prompt, "rabbit#2:0.6, basketball")[0]
    info = cond[0][1]["asyndm_targets"]
    ids = [t[0] for c in clip.tokenize(prompt)["t5xxl"] for t in c]
    rabbit = clip.tokenize("rabbit")["t5xxl"][0][0][0]
    assert info["context_len"] == len(ids) == cond[0][0].shape[1] < 77  # T5 unpadded: the context's length
    assert [ids[p] for p in info["positions"][0]] == [rabbit] and info["positions"][0][0] > info["positions"][1][-1]


def test_wan_targets_read_umt5_positions_of_the_padded_context(comfy_env, tiny_models):
    """Wan's text encoder (ComfyUI's UMT5 classes, tiny; a stand-in sentencepiece model, since the
    real one ships inside the text-encoder file): positions index the 512-token padded context."""
    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMTextEncode

    clip = tiny_models.tiny_dit_clip("wan")
    prompt = "a rabbit playing basketball beside a rabbit"
    cond = AsynDMTextEncode().encode(clip, prompt, "rabbit#2:0.6, basketball")[0]
    info = cond[0][1]["asyndm_targets"]
    ids = [t[0] for c in clip.tokenize(prompt)["umt5xxl"] for t in c]
    rabbit = clip.tokenize("rabbit")["umt5xxl"][0][0][0]
    assert info["context_len"] == len(ids) == cond[0][0].shape[1] == 512  # UMT5 pads to 512
    assert [ids[p] for p in info["positions"][0]] == [rabbit] and info["positions"][0][0] > info["positions"][1][-1]


def _qwen_ids_clip(monkeypatch, encoder_class, tokenizer, **encoder_attrs):
    """A CLIP of ComfyUI's ``tokenizer`` and ``encoder_class``'s own template trimming, its Qwen2.5
    model replaced by one whose hidden state is each token's id: the context names its tokens."""
    from comfy import sd1_clip

    def ids_as_states(self, token_weight_pairs):
        ids = torch.tensor([[float(t[0]) for c in token_weight_pairs["qwen25_7b"] for t in c]])
        return ids[..., None], None, {"attention_mask": torch.ones_like(ids)}

    monkeypatch.setattr(sd1_clip.SD1ClipModel, "encode_token_weights", ids_as_states)
    encoder = object.__new__(encoder_class)
    for k, v in encoder_attrs.items():
        setattr(encoder, k, v)

    class Clip:
        cond_stage_model = None

        def __init__(self):
            self.tokenizer = tokenizer

        def tokenize(self, text):
            return tokenizer.tokenize_with_weights(text)

        def encode_from_tokens_scheduled(self, tokens):
            return [[encoder.encode_token_weights(tokens)[0], {}]]

    return Clip()


def test_qwen_image_targets_follow_the_context_after_the_chat_template(comfy_env, monkeypatch):
    """ComfyUI's Qwen-Image tokenizer (its Qwen2.5 files ship with ComfyUI) and the text encoder's
    own template trimming (QwenImageTEModel.encode_token_weights, a 7B model replaced by a stand-in
    whose hidden state is each token's id): the positions index the context the model receives.
    Caught: positions left on the templated token list."""
    from comfy.text_encoders import qwen_image

    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMTextEncode

    tokenizer = qwen_image.QwenImageTokenizer()
    clip = _qwen_ids_clip(monkeypatch, qwen_image.QwenImageTEModel, tokenizer)

    prompt = "a rabbit playing basketball beside a rabbit"
    cond = AsynDMTextEncode().encode(clip, prompt, "rabbit#2:0.6, basketball")[0]
    info, context = cond[0][1]["asyndm_targets"], cond[0][0][0, :, 0]
    rabbit = tokenizer.qwen25_7b.tokenizer(" rabbit", add_special_tokens=False)["input_ids"]  # "Ġrabbit"
    assert info["context_len"] == context.shape[0] < len(clip.tokenize(prompt)["qwen25_7b"][0])
    assert [int(context[p]) for p in info["positions"][0]] == rabbit
    assert info["positions"][0][0] > info["positions"][1][-1]


# ---------------------------------------------------------------------------------------- HiDream
def _hidream_kwargs(pos, batch):
    return {"c_crossattn": pos[0][0].expand(batch, -1, -1), "y": pos[0][1]["pooled_output"].expand(batch, -1),
            "encoder_hidden_states_llama3": pos[0][1]["conditioning_llama3"].expand(batch, -1, -1, -1)}


def _hidream_reference_maps(log, blocks, n_img, n_t5, n_llama, positions):
    """Maps from the logged attention of the double blocks (q / k after RoPE, keys [image | T5 |
    Llama last layer | Llama block layer]): an item's probability summed over both Llama copies of
    its tokens, averaged over its tokens, heads and the blocks."""
    maps = []
    for i in blocks:
        q, k, heads, _ = log[i]
        q, k = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k))
        probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(dim=1)
        first = n_img + n_t5
        maps.append(torch.stack([(probs[:, :n_img, [first + p for p in ps]]
                                  + probs[:, :n_img, [first + n_llama + p for p in ps]]).mean(-1) for ps in positions],
                                dim=1))
    return torch.stack(maps).mean(dim=0)


def _hidream_naive(dm, t_tokens, t_images, y, img, stream, block):
    """One token at a time (a slow loop): block ``block``'s attention input with every token's own
    adaLN input ``t_embedder(t) + p_embedder(y)`` — image tokens at their own timestep, the rest of
    the stream at their image's passed one. ``img`` / ``stream``: what the block's norms read."""
    def mods(t, b, k):
        adaln = dm.t_embedder(t.view(1), torch.float32) + dm.p_embedder(y[b:b + 1])
        return block.adaLN_modulation(adaln).chunk(k, dim=-1)

    k = 12 if not block.attn1.single else 6
    out = torch.empty_like(stream)
    for b in range(stream.shape[0]):
        for j in range(stream.shape[1]):
            t = t_tokens[b, j] if j < t_tokens.shape[1] else t_images[b]
            shift, scale = mods(t, b, k)[:2]
            out[b, j] = block.norm1_i(stream[b:b + 1, j:j + 1])[0, 0] * (1 + scale[0]) + shift[0]
    return out


def test_hidream_constant_map_is_stock_forward_modulations_per_row_and_its_own_attention(fams):
    """HiDream-I1 (double + single-stream blocks, MoE). Caught: the image tokens' modulation left on
    the stock per-image row (naive double-block oracle); the single block's text tokens put on the
    token rows (naive single-block oracle); the masks reading the T5 positions instead of the Llama
    ones (the model's own attention); the adaLN Linear run per token (row counts)."""
    model, pos, neg = fams["hidream"]
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    dm = model.model.diffusion_model
    emb_rows, mod_rows, seen = [], [], {}
    double, single = dm.double_stream_blocks[0].block, dm.single_stream_blocks[0].block
    kw = _hidream_kwargs(pos, 2)
    r = _forwards(model, x, kw, [
        (dm.t_embedder.timestep_embedder.linear_1, "hook", lambda m, a, o: emb_rows.append(a[0].shape[0])),
        (double.adaLN_modulation[1], "hook", lambda m, a, o: mod_rows.append(tuple(a[0].shape))),
        (dm.x_embedder, "hook", lambda m, a, o: seen.update(img=o)),
        (double.attn1.to_q, "pre_hook", lambda m, a: seen.update(q_in=a[0])),
        (double.attn1.to_q_t, "pre_hook", lambda m, a: seen.update(q_t_in=a[0])),
        (double, "pre_hook", lambda m, a: seen.update(text=a[2])),
        (single, "pre_hook", lambda m, a: seen.update(stream=a[0])),
        (single.attn1.to_q, "pre_hook", lambda m, a: seen.update(single_in=a[0]))], [emb_rows, mod_rows])
    stock, const, mixed, maps, sig_map, backend, log = (r[k] for k in ("stock", "const", "mixed", "maps", "sig_map",
                                                                       "backend", "log"))
    assert type(backend).__name__ == "ComfyHiDreamBackend" and backend.cell == 2
    assert _rel(const, stock) <= 1e-5, _rel(const, stock)  # invariant 1
    # invariant 6: the time MLP and a block's adaLN Linear ran on ComfyUI's 2 images and on the 5
    # distinct (image, timestep) rows, never on the 32 tokens
    assert emb_rows == [2, 5] and mod_rows == [(2, 64), (5, 64)]
    assert float((mixed - const).abs().max()) > 1e-3
    ms = model.get_model_object("model_sampling")
    t_tokens = ms.timestep(sig_map[:, 0, ::2, ::2].flatten(1)).float()
    t_images = ms.timestep(sig_map.flatten(1).amin(1)).float()  # the sigma ComfyUI passes: the background's
    y = kw["y"]
    naive = _hidream_naive(dm, t_tokens, t_images, y, seen["img"], seen["img"], double)
    assert _rel(seen["q_in"], naive) <= 1e-5, _rel(seen["q_in"], naive)
    # the text stream keeps its image's stock modulation (the background's)
    shift_t, scale_t = [double.adaLN_modulation(dm.t_embedder(t_images, torch.float32) + dm.p_embedder(y)).chunk(
        12, dim=-1)[i][:, None] for i in (6, 7)]
    text = double.norm1_t(seen["text"]) * (1 + scale_t) + shift_t
    assert _rel(seen["q_t_in"], text) <= 1e-5, _rel(seen["q_t_in"], text)
    naive = _hidream_naive(dm, t_tokens, t_images, y, seen["img"], seen["stream"], single)
    assert _rel(seen["single_in"], naive) <= 1e-5, _rel(seen["single_in"], naive)
    # masks: the model's own joint attention of image queries to the targets' Llama tokens
    n_llama = pos[0][1]["conditioning_llama3"].shape[2]
    ref = _hidream_reference_maps(log, backend.capture_blocks, 16, pos[0][0].shape[1], n_llama, TARGETS["positions"])
    assert maps.shape == (2, 2, 4, 4) and _rel(maps.flatten(2), ref) <= 1e-4, _rel(maps.flatten(2), ref)


def test_hidream_targets_read_llama_positions_of_the_context_the_model_gets(comfy_env, tiny_models, monkeypatch):
    """HiDream's tokenizer and text encoder (ComfyUI's HiDreamTokenizer / HiDreamTEModel, tiny; the
    Llama 3.1 tokenizer JSON is not in the checkout, so a byte-level BPE stand-in with Llama 3's
    special ids, comfy_tiny.llama_standin_dir). The Llama model is replaced by one whose hidden state
    is each token's id, so the context the model receives names its tokens: the positions index it
    (the encoder drops its first *layer*, not a token). Caught: positions on the T5 tokens (the
    first key ``_key`` found before); a word at the prompt's start (no leading space) with the
    tokenizer's padding kept in its ids."""
    from comfy.text_encoders import hunyuan_video

    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMTextEncode

    def ids_as_states(self, token_weight_pairs):  # (1, layers + 1, L, 1): every layer holds the ids
        ids = torch.tensor([[float(t[0]) for c in token_weight_pairs for t in c]])
        return ids[:, None, :, None].expand(1, 3, -1, 1), None

    monkeypatch.setattr(hunyuan_video.LLAMAModel, "encode_token_weights", ids_as_states)
    clip = tiny_models.tiny_dit_clip("hidream")
    tok = clip.tokenizer.llama.tokenizer
    for prompt, targets, spelled in (("a rabbit playing basketball beside a rabbit", "rabbit#2:0.6, basketball",
                                      (" rabbit", " basketball")),
                                     ("rabbit beside a basketball", "rabbit, basketball", ("rabbit", " basketball"))):
        cond = AsynDMTextEncode().encode(clip, prompt, targets)[0]
        info, context = cond[0][1]["asyndm_targets"], cond[0][1]["conditioning_llama3"][0, 0, :, 0]
        assert info["context_len"] == context.shape[0] >= 128  # Llama: padded to at least 128 tokens
        for positions, word in zip(info["positions"], spelled):
            assert [int(context[p]) for p in positions] == tok(word, add_special_tokens=False)["input_ids"], word
    assert info["positions"][0][0] == 1  # right after <|begin_of_text|>
    monkeypatch.setattr(clip.cond_stage_model, "llama", None)
    with pytest.raises(Exception, match="no Llama text encoder: load llama_3.1_8b_instruct"):
        AsynDMTextEncode().encode(clip, "a rabbit", "rabbit")


def test_hidream_e1_image_condition_is_refused_with_what_is_supported(fams):
    """HiDream E1 widens the image stream with its image condition: a clear refusal. Caught: without
    the check, a tensor-size error deep inside the first block."""
    from asyndm_fpdm.samplers.backends import backend_for
    from asyndm_fpdm.samplers.backends.comfy_call import PixelCall
    from asyndm_fpdm.samplers.backends.pixel_math import UnsupportedModelError

    model, pos, neg = fams["hidream"]
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    s = _sigma(model, 0.6)
    opts = backend_for(model).model_options({"transformer_options": {"cond_or_uncond": [0]}},
                                            PixelCall(s.expand(1, 1, 8, 8)))
    with pytest.raises(UnsupportedModelError, match="HiDream E1"):
        model.model.apply_model(x, s.expand(1), transformer_options=opts["transformer_options"],
                                image_cond=torch.zeros_like(x), **_hidream_kwargs(pos, 1))
# ---------------------------------------------------------------------------------------- Lumina 2
def _lumina_kwargs(pos, batch):
    return {"c_crossattn": pos[0][0].expand(batch, -1, -1), "num_tokens": pos[0][0].shape[1]}


def _naive_lumina_raw(dm, seen, t_tokens, t_images, n_cap):
    """NextDiT's forward after its embeddings, with every token's own modulation: each block's
    adaLN Linear run on every token's time embedding (B, L, ·), caption tokens on their image's
    passed timestep (a slow reference that never builds rows). ``seen``: the image embedding,
    the refined caption, masks and RoPE tables the model built (none depends on time)."""
    def emb(t):  # NextDiT embeds 1 − timestep
        return dm.t_embedder(1.0 - t.flatten(), dtype=torch.float32).view(*t.shape, -1)

    def block(layer, x, mask, freqs, temb):
        s1, g1, s2, g2 = layer.adaLN_modulation(temb).chunk(4, dim=-1)
        x = x + g1.tanh() * layer.attention_norm2(layer.attention(layer.attention_norm1(x) * (1 + s1), mask, freqs))
        return x + g2.tanh() * layer.ffn_norm2(layer.feed_forward(layer.ffn_norm1(x) * (1 + s2)))

    img, cap = seen["img"], seen["cap"][:, :n_cap]
    for layer in dm.noise_refiner:
        img = block(layer, img, seen["img_mask"], seen["img_freqs"], emb(t_tokens))
    temb = torch.cat([emb(t_images[:, None].expand(-1, n_cap)), emb(t_tokens)], dim=1)
    x = torch.cat([cap, img], dim=1)
    for layer in dm.layers:
        x = block(layer, x, seen["mask"], seen["freqs"], temb)
    fl = dm.final_layer
    out = fl.linear(fl.norm_final(x) * (1 + fl.adaLN_modulation(temb)))[:, n_cap:]
    b, (h, w), p = out.shape[0], seen["grid"], dm.patch_size
    out = out.view(b, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(b, -1, h * p, w * p)
    return -out


def test_lumina2_constant_map_is_stock_forward_modulation_per_row_and_its_own_attention(fams):
    """Lumina 2 (NextDiT, 4 query heads on 2 key heads). Caught: the time rows embedded at
    ``timestep`` instead of NextDiT's ``1 − timestep`` (constant map ≠ stock); the gates left on the
    image's stock row (naive-forward oracle); the Linear run per token (row count); RoPE or the
    grouped key heads' order left out of the read (model's own attention)."""
    model, pos, neg = fams["lumina2"]
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    dm = model.model.diffusion_model
    kw = _lumina_kwargs(pos, 2)
    emb_rows, mod_rows, seen = [], [], {"grid": (4, 4)}
    r = _forwards(model, x, kw, [
        (dm.t_embedder.mlp[0], "hook", lambda m, a, o: emb_rows.append(a[0].shape[0])),
        (dm.layers[0].adaLN_modulation[1], "hook", lambda m, a, o: mod_rows.append(a[0].shape[0])),
        (dm.x_embedder, "hook", lambda m, a, o: seen.update(img=o)),
        (dm.context_refiner[-1], "hook", lambda m, a, o: seen.update(cap=o)),
        (dm.noise_refiner[0], "pre_hook", lambda m, a: seen.update(img_mask=a[1], img_freqs=a[2])),
        (dm.layers[0], "pre_hook", lambda m, a: seen.update(mask=a[1], freqs=a[2]))], [emb_rows, mod_rows])
    stock, const, mixed, maps, sig_map, backend, log = (r[k] for k in ("stock", "const", "mixed", "maps", "sig_map",
                                                                       "backend", "log"))
    assert type(backend).__name__ == "ComfyLumina2Backend" and backend.cell == 2
    assert _rel(const, stock) <= 1e-5, _rel(const, stock)  # invariant 1
    # invariant 6: ComfyUI's 2 images, then the 3 distinct timesteps (one row each: no per-image
    # vector joins Lumina's time embedding), never the 32 tokens
    assert emb_rows == [2, 3] and mod_rows == [2, 3]
    assert float((mixed - const).abs().max()) > 1e-3
    ms = model.get_model_object("model_sampling")
    t_tokens = ms.timestep(sig_map[:, 0, ::2, ::2].flatten(1)).float()
    t_images = ms.timestep(sig_map.flatten(1).amin(1)).float()
    raw = _naive_lumina_raw(dm, seen, t_tokens, t_images, kw["num_tokens"])
    naive = x - sig_map * raw  # flow matching: denoised = x − σ·v per pixel
    assert _rel(mixed, naive) <= 1e-5, _rel(mixed, naive)
    # masks: the model's own joint attention, after the caption and image refiners (log: context
    # refiner, noise refiner, then the joint layers)
    n_txt, offset = kw["num_tokens"], len(dm.context_refiner) + len(dm.noise_refiner)
    ref = _reference_maps(log, [offset + i for i in backend.capture_blocks], n_txt, TARGETS["positions"])
    assert maps.shape == (2, 2, 4, 4) and _rel(maps.flatten(2), ref) <= 1e-4, _rel(maps.flatten(2), ref)


def test_lumina2_targets_read_gemma_positions_of_the_context_the_model_gets(comfy_env, tiny_models):
    """Lumina 2's text encoder (ComfyUI's Gemma 2 2B classes, tiny; a stand-in sentencepiece model
    with Gemma's special ids, since the real one ships inside the text-encoder file): BOS first, no
    padding, the positions index the hidden states the model attends to."""
    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMTextEncode

    clip = tiny_models.tiny_dit_clip("lumina2")
    prompt = "a rabbit playing basketball beside a rabbit"
    cond = AsynDMTextEncode().encode(clip, prompt, "rabbit#2:0.6, basketball")[0]
    info = cond[0][1]["asyndm_targets"]
    ids = [t[0] for c in clip.tokenize(prompt)["gemma2_2b"] for t in c]
    rabbit, basketball = (clip.tokenize(w)["gemma2_2b"][0][1][0] for w in ("rabbit", "basketball"))
    assert ids[0] == 2 and len(ids) == 8  # Gemma's BOS, then one stand-in token per word
    assert info["context_len"] == len(ids) == cond[0][0].shape[1]
    assert [ids[p] for p in info["positions"][0]] == [rabbit] and [ids[p] for p in info["positions"][1]] == [basketball]
    assert info["positions"][0] == [7] and info["positions"][1] == [4]


# ---------------------------------------------------------------------------------------- HunyuanImage 2.1
def _hunyuan_naive_vec(dm, t, guidance):
    """The model's own conditioning vector for timesteps ``t`` (R,): time_in (time_factor 1) + guidance."""
    from comfy.ldm.flux.layers import timestep_embedding

    return dm.time_in(timestep_embedding(t, 256, time_factor=1.0)) + dm.guidance_in(timestep_embedding(guidance, 256))


def _hunyuan_naive(dm, t_tokens, t_images, guidance, x, mod, norm, n_img):
    """A block's modulated input, one token at a time: image tokens (the first ``n_img``) from their
    own timestep's vector, the text / glyph tokens after them from their image's (the background's)."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for j in range(x.shape[1]):
            t = t_tokens[b, j:j + 1] if j < n_img else t_images[b:b + 1]
            shift, scale = mod(_hunyuan_naive_vec(dm, t, guidance[b:b + 1]))[:2]
            out[b, j] = norm(x[b:b + 1, j:j + 1])[0, 0] * (1 + scale.flatten()) + shift.flatten()
    return out


def test_hunyuan_image_constant_map_is_stock_forward_modulation_per_row_and_its_own_attention(fams):
    """HunyuanImage 2.1 ([image | text | glyph] joint sequence, no pooled vector). Caught: the double
    block's image modulation left on the stock vector (naive double-block oracle); the single
    block's image tokens left on the stock vector (naive single-block oracle); the time rows embedded
    with Flux's time_factor 1000 (constant map ≠ stock); the maps read with Flux's [text | image]
    RoPE order (the model's own attention); the time MLP run per token (row counts)."""
    model, pos, neg = fams["hunyuan_image"]
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(0))
    dm = model.model.diffusion_model
    guidance = torch.full((2,), 6.0)
    kw = {"c_crossattn": pos[0][0].expand(2, -1, -1), "guidance": guidance,
          "txt_byt5": pos[0][1]["conditioning_byt5small"].expand(2, -1, -1)}
    emb_rows, mod_rows, seen = [], [], {}
    double, single = dm.double_blocks[0], dm.single_blocks[0]
    r = _forwards(model, x, kw, [
        (dm.time_in.in_layer, "hook", lambda m, a, o: emb_rows.append(a[0].shape[0])),
        (double.img_mod.lin, "hook", lambda m, a, o: mod_rows.append(tuple(a[0].shape))),
        (double, "pre_hook_kw", lambda m, a, k: seen.update(img=k["img"], txt=k["txt"].clone())),  # txt: updated in place
        (double.img_attn.qkv, "pre_hook", lambda m, a: seen.update(q_in=a[0])),
        (double.txt_attn.qkv, "pre_hook", lambda m, a: seen.update(q_t_in=a[0])),
        (single, "pre_hook", lambda m, a: seen.update(stream=a[0].clone())),
        (single.linear1, "pre_hook", lambda m, a: seen.update(single_in=a[0])),
        (dm.final_layer, "pre_hook", lambda m, a: seen.update(final=a[0])),
        (dm.final_layer.linear, "pre_hook", lambda m, a: seen.update(final_in=a[0]))], [emb_rows, mod_rows])
    stock, const, mixed, maps, sig_map, backend, log = (r[k] for k in ("stock", "const", "mixed", "maps", "sig_map",
                                                                       "backend", "log"))
    assert type(backend).__name__ == "ComfyHunyuanImageBackend" and backend.cell == 2
    assert _rel(const, stock) <= 1e-5, _rel(const, stock)  # invariant 1
    # invariant 6: time_in and a block's modulation Linear ran on ComfyUI's 2 images and on the 5
    # distinct (image, timestep) rows, never on the 32 tokens (txt_in's own timestep embedder aside)
    assert emb_rows == [2, 5] and mod_rows == [(2, 1, 64), (5, 64)]
    assert float((mixed - const).abs().max()) > 1e-3
    ms = model.get_model_object("model_sampling")
    t_tokens = ms.timestep(sig_map[:, 0, ::2, ::2].flatten(1)).float()
    t_images = ms.timestep(sig_map.flatten(1).amin(1)).float()  # the sigma ComfyUI passes: the background's
    n_img = t_tokens.shape[1]

    def parts(block_mod):  # the (shift, scale) a block's first modulated input uses
        return lambda vec: (lambda m: (m.shift, m.scale))(block_mod(vec)[0])

    naive = _hunyuan_naive(dm, t_tokens, t_images, guidance, seen["img"], parts(double.img_mod),
                           double.img_norm1, n_img)
    assert _rel(seen["q_in"], naive) <= 1e-5, _rel(seen["q_in"], naive)
    text = _hunyuan_naive(dm, t_tokens, t_images, guidance, seen["txt"], parts(double.txt_mod),
                          double.txt_norm1, 0)  # every text token on the background
    assert _rel(seen["q_t_in"], text) <= 1e-5, _rel(seen["q_t_in"], text)
    assert seen["stream"].shape[1] == n_img + pos[0][0].shape[1] + pos[0][1]["conditioning_byt5small"].shape[1]
    naive = _hunyuan_naive(dm, t_tokens, t_images, guidance, seen["stream"], parts(single.modulation),
                           single.pre_norm, n_img)
    got = seen["single_in"][..., :naive.shape[-1]]  # linear1's input is the modulated stream itself
    assert _rel(got, naive) <= 1e-5, _rel(got, naive)

    def final_mod(vec):
        return dm.final_layer.adaLN_modulation(vec).chunk(2, dim=-1)

    naive = _hunyuan_naive(dm, t_tokens, t_images, guidance, seen["final"], final_mod, dm.final_layer.norm_final, n_img)
    assert _rel(seen["final_in"], naive) <= 1e-5, _rel(seen["final_in"], naive)
    # masks: the model's own joint attention (after RoPE) of image queries to the targets' Qwen2.5
    # tokens, [image | text | glyph] keys; txt_in's two refiner attentions come first in the log
    ref = []
    for i in sorted(backend.capture_blocks):
        q, k, heads, skip = log[2 + i]
        assert skip and q.shape[2] == seen["stream"].shape[1]
        probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(dim=1)
        ref.append(torch.stack([probs[:, :n_img, [n_img + j for j in p]].mean(-1)
                                for p in TARGETS["positions"]], dim=1))
    ref = torch.stack(ref).mean(dim=0)
    assert maps.shape == (2, 2, 4, 4) and _rel(maps.flatten(2), ref) <= 1e-4, _rel(maps.flatten(2), ref)


def test_hunyuan_image_refuses_video_refiner_and_meanflow_with_what_is_supported(comfy_env, tiny_models):
    """HunyuanVideo-type models other than HunyuanImage 2.1 get a clear refusal, not a wrong run."""
    from asyndm_fpdm.samplers.backends import backend_for
    from asyndm_fpdm.samplers.backends.pixel_math import UnsupportedModelError

    for name, value, words in (("patch_size", [1, 2, 2], "HunyuanVideo"), ("time_r_in", torch.nn.Identity(), "meanflow")):
        model = tiny_models.tiny_dit("hunyuan_image")  # a fresh one: its diffusion model is changed here
        setattr(model.model.diffusion_model, name, value)
        with pytest.raises(UnsupportedModelError, match=words):
            backend_for(model)


def test_hunyuan_image_targets_follow_the_context_after_its_chat_template(comfy_env, monkeypatch):
    """ComfyUI's HunyuanImage tokenizer (Qwen2.5 with its own template, byT5 tokens for quoted text) and
    its encoder's template trimming (a stand-in whose hidden state is each token's id): the positions
    index the Qwen2.5 context the model receives, whatever the glyph tokens. Caught: positions left
    on the templated token list."""
    from comfy.text_encoders import hunyuan_image

    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMTextEncode

    tokenizer = hunyuan_image.HunyuanImageTokenizer()
    clip = _qwen_ids_clip(monkeypatch, hunyuan_image.HunyuanImageTEModel, tokenizer, byt5_small=None)

    prompt = 'a rabbit holding a sign that says "hello" beside a rabbit'
    assert "byt5" in clip.tokenize(prompt)  # quoted text: glyph tokens beside the Qwen2.5 ones
    cond = AsynDMTextEncode().encode(clip, prompt, "rabbit#2:0.6, sign")[0]
    info, context = cond[0][1]["asyndm_targets"], cond[0][0][0, :, 0]
    rabbit = tokenizer.qwen25_7b.tokenizer(" rabbit", add_special_tokens=False)["input_ids"]  # "Ġrabbit"
    assert info["context_len"] == context.shape[0] < len(clip.tokenize(prompt)["qwen25_7b"][0])
    assert [int(context[p]) for p in info["positions"][0]] == rabbit
    assert info["positions"][0][0] > info["positions"][1][-1]


# ---------------------------------------------------------------------------------------- previews
STAND_IN_PATCH = 2  # the stand-ins' patch (comfy_tiny): a token is 2 × 2 latent pixels


@pytest.mark.parametrize("fam, size", [("chroma_radiance", 16), ("hunyuan_image", 8)])
def test_mask_steps_preview_has_the_images_size_each_tokens_region_and_timestep(fams, tiny_models, fam, size):
    """"Masks at Steps" frames have the size of the image the family's VAE decodes from the latent
    (ComfyUI's pixel-space VAE: the latent itself; HunyuanImage 2.1's: 32× it), and every token
    is a block of patch × that many image pixels showing the region of a painted MASK and the
    timestep the model received for that token: its sigma (read in a model wrapper) through the
    model's own timestep(σ), white at σ = 1. Broken variant caught: the ×8 of an 8× VAE for every
    model (Radiance 128 px for its 16 px image, HunyuanImage 64 px for 256)."""
    from asyndm_fpdm.nodes.asyndm_preview_nodes import AsynDMMaskStepsPreview
    from asyndm_fpdm.samplers.backends.comfy_call import KEY
    from asyndm_fpdm.samplers.comfyui.previews import PALETTE

    model, pos, neg = fams[fam]
    lat = _latent(fam, size=size)
    image = tiny_models._cached("vae", fam).decode(lat["samples"])  # (B, H, W, 3)
    height, width = image.shape[1:3]
    seen = []

    def record(apply, args):  # the per-pixel sigmas of each model call
        seen.append(args["c"]["transformer_options"][KEY].sigma_map[0, 0].clone())
        return apply(args["input"], args["timestep"], **args["c"])

    patched = model.clone()
    patched.set_model_unet_function_wrapper(record)
    mask = torch.zeros(1, height, width)
    mask[:, :height // 2, :width // 4] = 1  # whole tokens of the image's top-left
    _, info = sampler_node(patched, pos, neg, lat, mask_source="mask input", mask=mask, sampler_name="euler",
                           scheduler="simple", steps=4, cfg=2.0, strengths="0.7")
    regions, times = AsynDMMaskStepsPreview().preview(info, "0, 1, 2, 3", 0)
    assert regions.shape == times.shape == (4, height, width, 3)

    calls = [s for i, s in enumerate(seen) if i == 0 or not torch.equal(s, seen[i - 1])]  # cond and uncond
    assert len(calls) == 4
    ms = model.get_model_object("model_sampling")
    top = float(ms.timestep(torch.ones(1))[0])
    tokens = size // STAND_IN_PATCH
    block = height // tokens  # image pixels per token side
    painted = torch.tensor(PALETTE[1]).expand(height, width, 3).clone()
    painted[mask[0] < 0.5] = torch.tensor(PALETTE[0])
    lagged = False
    for f, sig in enumerate(calls):
        expected = torch.empty(height, width, 3)
        for ty in range(tokens):
            for tx in range(tokens):
                cell = sig[ty * STAND_IN_PATCH:(ty + 1) * STAND_IN_PATCH, tx * STAND_IN_PATCH:(tx + 1) * STAND_IN_PATCH]
                assert bool((cell == cell[0, 0]).all()), "a token with more than one sigma"
                gray = float(ms.timestep(cell[0, 0].reshape(1))[0]) / top
                expected[ty * block:(ty + 1) * block, tx * block:(tx + 1) * block] = min(max(gray, 0.0), 1.0)
        assert torch.allclose(times[f], expected, atol=1e-6, rtol=0), f"step {f}: not the timesteps the model got"
        assert torch.equal(regions[f], painted), f"step {f}: not the painted region"
        lagged |= bool(times[f][mask[0] > 0.5].amin() > times[f][mask[0] < 0.5].amax())
    assert lagged, "the painted tokens never lag: nothing to see"


def test_hunyuan_image_quoted_words_resolve_to_their_qwen_tokens_in_the_context(comfy_env, monkeypatch):
    """Text to render, in quotes (HunyuanImage 2.1 prompts): ComfyUI's HunyuanImage tokenizer sends the
    quoted text to byT5 glyph tokens as well, but the masks read the Qwen2.5 context, where a quoted
    word is spelled without its leading space ('"', 'OPEN') or merged with the quote ('"The',
    '“The'). Oracle: the Qwen2.5 tokenizer's own decode of the context tokens at the positions (the
    stand-in encoder's hidden state is each token's id, after the encoder's own template trimming).
    Caught: the word's ids alone (the lookup before: ' OPEN' → 'ĠOPEN' is not in the quoted prompt,
    an UnknownWordError); words searched in the template too ('background' was refused because the
    system prompt has it)."""
    from comfy.text_encoders import hunyuan_image

    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMTextEncode
    from asyndm_fpdm.samplers.tokens import UnknownWordError

    tokenizer = hunyuan_image.HunyuanImageTokenizer()
    hf = tokenizer.qwen25_7b.tokenizer
    clip = _qwen_ids_clip(monkeypatch, hunyuan_image.HunyuanImageTEModel, tokenizer, byt5_small=None)
    prompt = '“The End” on a poster, a rabbit holding a sign that says "OPEN" and a "rabbit" on the background'
    assert "byt5" in clip.tokenize(prompt)
    cond = AsynDMTextEncode().encode(clip, prompt, "OPEN, The, rabbit#2, background, End")[0]
    info, context = cond[0][1]["asyndm_targets"], cond[0][0][0, :, 0].long().tolist()
    assert info["context_len"] == len(context)

    def said(ps):
        return hf.decode([context[p] for p in ps]).strip(' "“”')

    assert [said(ps) for ps in info["positions"]] == ["OPEN", "The", "rabbit", "background", "End"]
    assert hf.convert_ids_to_tokens(context[info["positions"][1][0]]) == "\u00e2\u0122\u013eThe"  # '“The', one token
    assert info["positions"][2][0] > info["positions"][0][0]  # the second rabbit: the quoted one
    every = AsynDMTextEncode().encode(clip, prompt, "rabbit")[0][0][1]["asyndm_targets"]["positions"][0]
    assert [said([p]) for p in every] == ["rabbit", "rabbit"]
    with pytest.raises(UnknownWordError, match="template.*your own prompt"):  # only in the system prompt
        AsynDMTextEncode().encode(clip, prompt, "texture")


def test_qwen_image_quoted_words_are_ordinary_text(comfy_env, monkeypatch):
    """Qwen-Image keeps quotes as ordinary text (no glyph tokens): a quoted word resolves to its
    Qwen2.5 tokens in the context the model receives, by the tokenizer's own decode. Caught: the
    word's ids alone ('"I' is one token, 'ĠI' is not in the prompt)."""
    from comfy.text_encoders import qwen_image

    from asyndm_fpdm.nodes.asyndm_sampler_nodes import AsynDMTextEncode

    tokenizer = qwen_image.QwenImageTokenizer()
    hf = tokenizer.qwen25_7b.tokenizer
    clip = _qwen_ids_clip(monkeypatch, qwen_image.QwenImageTEModel, tokenizer)
    prompt = '"I love rabbits" written above a rabbit'
    assert "byt5" not in clip.tokenize(prompt)
    cond = AsynDMTextEncode().encode(clip, prompt, "I, rabbit")[0]
    info, context = cond[0][1]["asyndm_targets"], cond[0][0][0, :, 0].long().tolist()
    assert [hf.decode([context[p] for p in ps]).strip(' "') for ps in info["positions"]] == ["I", "rabbit"]


def test_lumina2_padded_positive_and_a_shorter_negative_read_the_caption_columns_end_to_end(fams):
    """A positive whose Gemma context carries padding (16 columns, attention mask of 12 ones, as a
    padding text encoder gives it) and a 7-token negative, through the Asynchronous KSampler on the
    tiny Lumina 2. ComfyUI never batches the two (``c_crossattn`` is a CONDRegular and ``num_tokens``
    a CONDConstant: different lengths do not concatenate), passes the positive's mask, and NextDiT
    drops the padding: its image tokens start at the mask's 12 ones. Oracle: every positive call's
    joint attention recomputed from the q/k the model computed in that run (logged through
    ComfyUI's attention override; softmax with the mask the model passes), read at the target
    columns — the last, column 11, right before the padding (the logging override makes the read
    recompute the normaliser; without it, the read inside the attention gives the same maps). Caught:
    image tokens taken to start at the context's 16 columns (the padding counted as caption: the run fails)."""
    from asyndm_fpdm.samplers.backends import backend_for

    model, pos, neg = fams["lumina2"]
    ctx, extra = pos[0][0], pos[0][1]
    pad = 4
    targets = {"words": ["rabbit", "ball", "last"], "ks": [0.7, 0.5, 0.6], "positions": [[2], [5], [11]],
               "context_len": ctx.shape[1] + pad}
    padded = [[torch.cat([ctx, torch.zeros(1, pad, ctx.shape[2])], dim=1),
               dict(extra, attention_mask=torch.cat([extra["attention_mask"], torch.zeros(1, pad, dtype=torch.long)],
                                                    dim=1), asyndm_targets=targets)]]
    assert neg[0][0].shape[1] == 7 and padded[0][0].shape[1] == 16
    log, seen = [], []

    def override(func, *args, **kwargs):
        log.append((args[0].detach().clone(), args[1].detach().clone(), kwargs.get("mask", args[4] if len(args) > 4
                                                                                   else None)))
        return func(*args, **kwargs)

    logged = model.clone()
    logged.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    dm = model.model.diffusion_model
    handle = dm.register_forward_pre_hook(  # what ComfyUI passes the model per call: context, mask, length
        lambda m, a, kw: seen.append((kw.get("context", a[2] if len(a) > 2 else None).shape[1],
                                      kw.get("attention_mask"), kw.get("num_tokens"))), with_kwargs=True)
    try:
        _, info = sampler_node(logged, padded, neg, _latent("lumina2"), sampler_name="euler", scheduler="simple",
                               steps=3, cfg=2.0)
    finally:
        handle.remove()
    assert sorted({s[0] for s in seen}) == [7, 16]  # never batched together
    assert all((m is not None and int(m.sum()) == 12 and n == 12) for c, m, n in seen if c == 16)
    n_img, n_cap = 16, 12
    joint = [(q, k, m) for q, k, m in log if k.shape[2] == n_cap + n_img]  # the positive's joint layers
    per_call, blocks = len(dm.layers), backend_for(model).capture_blocks
    maps = [m for m in info.item_maps if m is not None]
    assert len(joint) == per_call * len(maps) and maps
    for step, got in enumerate(maps):
        ref = []
        for i in blocks:
            q, k, mask = joint[step * per_call + i]
            logits = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5  # (1, H, L, L)
            if mask is not None:
                logits = logits + mask.float().view(1, 1, 1, -1)
            probs = torch.softmax(logits, dim=-1).mean(dim=1)[:, n_cap:]
            ref.append(torch.stack([probs[..., ps].mean(-1) for ps in targets["positions"]], dim=1))
        ref = torch.stack(ref).mean(0).view(1, 3, 4, 4)
        assert got.shape == ref.shape and _rel(got, ref) <= 1e-4, (step, _rel(got, ref))
    # with no other override the read rides the block's own attention (its log-sum-exp, the mask
    # passed to that kernel): the same maps
    _, plain = sampler_node(model, padded, neg, _latent("lumina2"), sampler_name="euler", scheduler="simple",
                            steps=3, cfg=2.0)
    plain = [m for m in plain.item_maps if m is not None]
    assert len(plain) == len(maps) and max(_rel(a, b) for a, b in zip(plain, maps)) <= 1e-4


def test_hunyuan_image_masks_never_read_glyph_columns_however_long_the_quoted_text(fams):
    """Quoted text makes byT5 glyph tokens that follow the prompt's Qwen2.5 tokens in the text
    stream; a long quote gives more glyph tokens than the prompt has Qwen2.5 tokens (a 12-token
    context, 30 glyphs). The masks read the Qwen2.5 columns only, the glyph keys in the softmax's
    normaliser as the model attends. Oracle: the model's own q/k (logged), probabilities at the
    Qwen2.5 target columns. Caught: the glyph tokens counted as the context repeated (ComfyUI's
    padding of a short cross-attention context), which read columns 12 + p and 24 + p among the glyphs."""
    model, pos, _ = fams["hunyuan_image"]
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(1))
    glyphs = torch.randn(1, 30, pos[0][1]["conditioning_byt5small"].shape[2], generator=torch.Generator().manual_seed(2))
    kw = {"c_crossattn": pos[0][0].expand(2, -1, -1), "guidance": torch.full((2,), 6.0),
          "txt_byt5": glyphs.expand(2, -1, -1)}
    assert pos[0][0].shape[1] == TARGETS["context_len"] == 12
    r = _forwards(model, x, kw, [], [])
    maps, backend, log = r["maps"], r["backend"], r["log"]
    n_img, ref = 16, []
    for i in sorted(backend.capture_blocks):
        q, k, heads, skip = log[2 + i]  # txt_in's two refiner attentions come first
        assert q.shape[2] == n_img + 12 + 30
        probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(dim=1)
        ref.append(torch.stack([probs[:, :n_img, [n_img + j for j in p]].mean(-1) for p in TARGETS["positions"]], 1))
    ref = torch.stack(ref).mean(dim=0)
    assert _rel(maps.flatten(2), ref) <= 1e-4, _rel(maps.flatten(2), ref)
