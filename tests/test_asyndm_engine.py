"""AsynDM with the diffusers backend on a tiny random UNet: DESIGN.md invariants 1, 2, 5 and 6,
the sigma-space model_fn (eps and v), modes, mask sources, samplers, schedulers, eta."""

import pytest
import torch

from asyndm_fpdm import tiny as tm
from asyndm_fpdm.samplers.api import asyn_generate
from asyndm_fpdm.samplers.backends.diffusers_unet import (DiffusersDenoiser, model_sampling_of, unet_capture_stride,
                                                        pixel_forward)
from asyndm_fpdm.samplers.pixel_samplers import SAMPLERS
from asyndm_fpdm.samplers.curves import PaperCurves
from numeric import FAR_ABOVE_ROUNDOFF, ROUNDOFF_ONE_PASS, ROUNDOFF_SAMPLING, assert_close, assert_differs

CFG = tm.sd_scheduler_config()
MODEL_SAMPLING = model_sampling_of(CFG)
ITEMS = [([2], 0.7), ([4], 0.5)]


@pytest.fixture(scope="module")
def unet():
    return tm.tiny_unet()


def run(unet, **kw):
    kw.setdefault("steps", 6)
    kw.setdefault("seed", 7)
    batch = kw.pop("batch", 1)
    return asyn_generate(unet, CFG, tm.embeds(batch), tm.embeds(batch, seed=3), items=kw.pop("items", ITEMS), **kw)


def test_invariant1_constant_map_equals_stock_forward(unet):
    x, ctx = tm.latents(2), tm.embeds(2)
    stock = unet(x, torch.tensor([640, 37]), encoder_hidden_states=ctx).sample
    tmap = torch.tensor([640, 37]).view(2, 1, 1).expand(2, 16, 16)
    for force in (False, True):
        out, _ = pixel_forward(unet, x, tmap, ctx, force_per_pixel=force)
        assert_close(out, stock, ROUNDOFF_ONE_PASS, f"constant map (force_per_pixel={force}) vs stock forward")


def test_sdxl_added_conditioning_per_pixel():
    unet = tm.tiny_unet(sdxl=True)
    x, ctx = tm.latents(2), tm.embeds(2)
    g = torch.Generator().manual_seed(0)
    added = {"text_embeds": torch.randn(2, tm.CROSS_DIM, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    stock = unet(x, torch.tensor([300, 300]), encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    out, _ = pixel_forward(unet, x, torch.full((2, 16, 16), 300), ctx, added_cond_kwargs=added, force_per_pixel=True)
    assert_close(out, stock, ROUNDOFF_ONE_PASS, "SDXL constant map vs stock forward")
    # the API with SDXL's added conditioning (per-image vectors on per-pixel rows), CFG and dynamic masks
    neg = {"text_embeds": torch.randn(2, tm.CROSS_DIM), "time_ids": added["time_ids"]}
    res = asyn_generate(unet, CFG, ctx, tm.embeds(2, seed=3), items=ITEMS, steps=3, seed=7, added_cond=added,
                        negative_added_cond=neg, sampler="euler", scheduler="karras")
    assert torch.isfinite(res.latents).all() and res.item_maps[0].shape == (2, 2, 4, 4)


def test_per_pixel_timesteps_act_locally(unet):
    """A pixel's timestep changes the output most where it is; a map that differs only in
    the left half leaves the far right column's receptive field... at least changes the output."""
    x, ctx = tm.latents(1), tm.embeds(1)
    base = torch.full((1, 16, 16), 500)
    other = base.clone()
    other[:, :, :8] = 900
    a, _ = pixel_forward(unet, x, base, ctx)
    b, _ = pixel_forward(unet, x, other, ctx)
    left = (a - b)[..., :8].abs().mean()
    right = (a - b)[..., 12:].abs().mean()
    assert left > 0 and left > right


def _naive_pixel_forward(unet, x, tmap, ctx, added=None):
    """Oracle for the per-pixel forward, slow and written out: the stock UNet runs with every
    ResNet's per-image time embedding zeroed, and after each ResNet's conv1 a (B, C, h, w) map is
    added whose every pixel is computed alone, by a Python loop through the model's own time MLP at
    the timestep of the latent pixel at the top-left of that feature pixel's block (DESIGN.md,
    "Backend protocol": strided indices for coarser feature maps), plus the image's added embedding (SDXL)."""
    from diffusers.models.resnet import ResnetBlock2D

    height = tmap.shape[1]
    vec = unet.get_aug_embed(emb=x.new_zeros(1), encoder_hidden_states=ctx, added_cond_kwargs=added or {})

    def pixel_embedding(b, t):
        emb = unet.time_embedding(unet.time_proj(torch.tensor([int(t)])).to(x.dtype), None)[0]
        emb = emb + vec[b] if vec is not None else emb
        return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb

    def add_map(resnet):
        def hook(module, args, out):
            s = max(height // out.shape[-2], 1)
            extra = torch.zeros_like(out)
            for b in range(out.shape[0]):
                for i in range(out.shape[-2]):
                    for j in range(out.shape[-1]):
                        emb = resnet.nonlinearity(pixel_embedding(b, tmap[b, i * s, j * s]))
                        extra[b, :, i, j] = torch.nn.functional.linear(emb, resnet.time_emb_proj.weight,
                                                                       resnet.time_emb_proj.bias)
            return out + extra
        return hook

    handles = []
    for m in unet.modules():
        if isinstance(m, ResnetBlock2D):
            handles.append(m.conv1.register_forward_hook(add_map(m)))
            handles.append(m.time_emb_proj.register_forward_hook(lambda mod, a, o: torch.zeros_like(o)))
    try:
        with torch.no_grad():
            return unet(x, torch.zeros(x.shape[0], dtype=torch.long), encoder_hidden_states=ctx,
                        added_cond_kwargs=added).sample
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_mixed_timestep_map_matches_a_naive_per_pixel_forward(sdxl):
    """Per-pixel timesteps that differ from pixel to pixel (4 values at random, so every stride's
    top-left sampling matters) against the slow per-pixel oracle above.

    Broken variants caught: feature pixels of coarser levels taking the block's centre pixel
    (``strided_index`` with ``index[:, stride // 2::stride, stride // 2::stride]``), and SDXL's
    per-image added embedding taken from the wrong image (``vec[row_img.flip(0)]``)."""
    unet = tm.tiny_unet(sdxl=sdxl)
    x, ctx = tm.latents(2), tm.embeds(2)
    gen = torch.Generator().manual_seed(5)
    tmap = torch.tensor([30, 333, 640, 981])[torch.randint(0, 4, (2, 16, 16), generator=gen)]
    added = None
    if sdxl:
        added = {"text_embeds": torch.randn(2, tm.CROSS_DIM, generator=gen), "time_ids": torch.randn(2, 6, generator=gen)}
    fast, _ = pixel_forward(unet, x, tmap, ctx, added_cond_kwargs=added)
    naive = _naive_pixel_forward(unet, x, tmap, ctx, added)
    assert_close(fast, naive, ROUNDOFF_ONE_PASS, "gathered per-pixel forward vs naive per-pixel oracle")


def _time_mlp_rows(unet, tmap, **kw):
    rows = []
    handle = unet.time_embedding.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        pixel_forward(unet, tm.latents(2), tmap, tm.embeds(2), **kw)
    finally:
        handle.remove()
    return rows


def test_invariant6_embeddings_only_for_distinct_timesteps(unet):
    tmap = torch.full((2, 16, 16), 800)
    tmap[:, :4] = 950
    tmap[1, 8:] = 120
    # the time MLP runs once on the 3 distinct timesteps (+ the stock forward's 2 per-image rows)
    assert _time_mlp_rows(unet, tmap) == [3, 2]
    sdxl = tm.tiny_unet(sdxl=True)
    added = {"text_embeds": torch.randn(2, tm.CROSS_DIM), "time_ids": torch.randn(2, 6)}
    from asyndm_fpdm.samplers.backends.diffusers_unet import _pixel_embedding_rows

    rows, index = _pixel_embedding_rows(sdxl, tm.latents(2), tmap, tm.embeds(2), added, None)
    # SDXL adds a per-image vector: rows are the 5 (image, timestep) pairs {800, 950} and {800, 950, 120}
    assert rows.shape[0] == 5 and index.shape == (2, 16, 16) and _time_mlp_rows(sdxl, tmap, added_cond_kwargs=added) == [3, 2]


def test_attention_capture_only_selected_tokens_and_stride_rule(unet):
    den = DiffusersDenoiser(unet, MODEL_SAMPLING, tm.embeds(2), tm.embeds(2, seed=9), positions=[[2], [3, 4]])
    out, maps = den(tm.latents(2), torch.full((2, 1, 16, 16), 4.0), capture=True)
    assert out.shape == (2, 4, 16, 16) and maps.shape == (2, 2, 4, 4)
    assert (maps > 0).all() and (maps < 1).all()
    # the tiny UNet has cross-attention at strides 1, 2, 4 (down/up) and 8 (mid): a missing wanted
    # stride takes the nearest finer level, a too-fine one the coarsest... of those that fit the latent
    assert [unet_capture_stride(unet, (16, 16), w) for w in (4, 3, 16, 1)] == [4, 2, 8, 1]
    assert unet_capture_stride(unet, (4, 4), 8) == 4
    _, maps3 = DiffusersDenoiser(unet, MODEL_SAMPLING, tm.embeds(1), positions=[[2]], capture_stride=3)(
        tm.latents(1), torch.full((1, 1, 16, 16), 4.0), True)
    assert maps3.shape == (1, 1, 8, 8)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_model_fn_denoised_matches_diffusers_x0(unet, prediction_type):
    """x_VE = x_VP·sqrt(1 + σ²) at σ(t): the denoised latent is diffusers' pred_original_sample."""
    from diffusers import DDIMScheduler

    cfg = tm.sd_scheduler_config(prediction_type)
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(10)
    t = int(sched.timesteps[3])
    x_vp, ctx = tm.latents(1), tm.embeds(1)
    model_out = unet(x_vp, t, encoder_hidden_states=ctx).sample
    ref = sched.step(model_out, t, x_vp).pred_original_sample
    model_sampling = model_sampling_of(cfg)
    sigma = model_sampling.sigma(torch.tensor(float(t)))
    den = DiffusersDenoiser(unet, model_sampling, ctx, prediction_type=prediction_type)
    ours, maps = den(x_vp * (1 + sigma**2) ** 0.5, torch.full((1, 1, 16, 16), float(sigma)))
    assert maps is None and (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
    scalar, _ = den(x_vp * (1 + sigma**2) ** 0.5, sigma)  # one sigma per image is a constant map
    assert torch.equal(scalar, ours)


def test_invariant2_empty_mask_equals_synchronous_sampling(unet):
    empty = torch.zeros(1, 2, 16, 16)
    asyn = run(unet, mode="asyn", mask_source="external", external_masks=empty, steps=10)
    vanilla = run(unet, mode="vanilla", steps=10)
    assert torch.equal(asyn.latents, vanilla.latents)


def test_vanilla_matches_diffusers_ddim_scheduler(unet):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(CFG)
    sched.set_timesteps(8)
    x = tm.latents(1)
    cond, uncond = tm.embeds(1), tm.embeds(1, seed=3)
    ref = x.clone()
    for t in sched.timesteps:
        eps = unet(torch.cat([ref, ref]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        u, c = eps.chunk(2)
        ref = sched.step(u + 5.0 * (c - u), t, ref).prev_sample
    ours = asyn_generate(unet, CFG, cond, uncond, latents=x, steps=8, mode="vanilla", guidance_scale=5.0)
    assert_close(ours.latents, ref, ROUNDOFF_SAMPLING, "vanilla vs diffusers DDIMScheduler")


@pytest.mark.parametrize("mode,source,eta,sampler", [
    ("asyn", "dynamic", 0.0, "ddim"), ("asyn", "static", 0.0, "ddim"), ("concave", "dynamic", 0.0, "ddim"),
    ("asyn", "dynamic", 1.0, "ddim"), ("asyn", "dynamic", 1.0, "dpmpp_2m_sde")])
def test_invariant5_seed_and_batch_independence(unet, mode, source, eta, sampler):
    kw = dict(mode=mode, mask_source=source, eta=eta, sampler=sampler)
    one = run(unet, batch=1, **kw)
    again = run(unet, batch=1, **kw)
    assert torch.equal(one.latents, again.latents)
    two = asyn_generate(unet, CFG, tm.embeds(1).repeat(2, 1, 1), tm.embeds(1, seed=3).repeat(2, 1, 1),
                        items=ITEMS, steps=6, seed=7, **kw)
    assert_close(two.latents[:1], one.latents, ROUNDOFF_SAMPLING, "image 0 of a batch of 2 vs alone")
    assert_differs(two.latents[1], two.latents[0], FAR_ABOVE_ROUNDOFF, "image 1 gets its own noise (seed + 1)")


def test_dynamic_masks_follow_attention_and_items_lag(unet):
    res = run(unet, mode="asyn", mask_source="dynamic", steps=8)
    first = res.masks[0]
    assert first[:, 1].eq(1).all(), "reference's initial mask: the last-token item covers the image"
    later = torch.stack([m for m in res.masks[1:]])
    assert 0 < later.sum() < later.numel(), "masks built from attention are neither empty nor full"
    for t, m in zip(res.timestep_maps[1:-2], res.masks[1:-2]):
        region = m.sum(dim=1) > 0
        if region.any() and (~region).any():
            assert t[region].float().mean() >= t[~region].float().mean()


def test_static_and_external_masks_fix_the_schedule(unet):
    ext = torch.zeros(2, 8, 8)
    ext[0, :4] = 1  # item 0: top half, given at a different size than the latent
    res = run(unet, mode="asyn", mask_source="external", external_masks=ext)
    for t in res.timestep_maps[:-2]:
        assert t[0, :8].min() >= t[0, 8:].max()
    static = run(unet, mode="asyn", mask_source="static")
    assert all(torch.equal(static.masks[0], m) for m in static.masks)


def test_concave_mode_puts_every_pixel_on_the_strongest_curve(unet):
    # 8 steps divide the 1000 training steps: DDIM's leading timesteps are the paper's linear curve
    res = run(unet, mode="concave", steps=8)
    plan = PaperCurves(8).plan(torch.ones(1, 1, 16, 16), [0.7], 1, 16, 16).round().long()
    assert len(res.timestep_maps) == 8 and all(torch.equal(t, plan[i]) for i, t in enumerate(res.timestep_maps))


def test_eta_is_seeded_and_stochastic(unet):
    a = run(unet, eta=1.0)
    b = run(unet, eta=1.0)
    c = run(unet, eta=1.0, seed=8)
    d = run(unet, eta=0.0)
    assert torch.equal(a.latents, b.latents)
    assert_differs(c.latents, a.latents, FAR_ABOVE_ROUNDOFF, "another seed")
    assert_differs(d.latents, a.latents, FAR_ABOVE_ROUNDOFF, "eta 0 vs eta 1")


def test_bad_settings_are_clear_errors(unet):
    with pytest.raises(ValueError, match="asyn, concave, vanilla"):
        run(unet, mode="fast")
    with pytest.raises(ValueError, match="dynamic, static, external"):
        run(unet, mask_source="file")
    with pytest.raises(ValueError, match="one mask per item"):
        run(unet, mask_source="external", external_masks=torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="needs external_masks"):
        run(unet, mask_source="external")
    with pytest.raises(ValueError, match="no per-pixel version: use one of ddim, euler"):
        run(unet, sampler="uni_pc")
    with pytest.raises(ValueError, match="takes no eta: use eta=0"):
        run(unet, sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="unknown scheduler 'simple'.*karras"):
        run(unet, scheduler="simple")
    with pytest.raises(ValueError, match="does not match the latent"):
        DiffusersDenoiser(unet, MODEL_SAMPLING, tm.embeds(1))(tm.latents(1), torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        DiffusersDenoiser(unet, MODEL_SAMPLING, tm.embeds(1), prediction_type="flow")


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_asynchronously_on_karras(unet, sampler):
    """Any per-pixel sampler on a non-paper schedule: items lag (timestep maps), the result is
    finite, and an empty mask is exactly vanilla (invariant 2 beyond DDIM)."""
    kw = dict(sampler=sampler, scheduler="karras", steps=4, eta=0.5 if sampler in ("ddim", "euler_ancestral") else 0.0)
    ext = torch.zeros(2, 16, 16)
    ext[0, :, :8] = 1
    res = run(unet, mode="asyn", mask_source="external", external_masks=ext, **kw)
    assert torch.isfinite(res.latents).all() and res.latents.abs().max() > 0
    assert (res.timestep_maps[1][0, :, :8] > res.timestep_maps[1][0, :, 8:].max()).all()
    empty = run(unet, mode="asyn", mask_source="external", external_masks=torch.zeros(2, 16, 16), **kw)
    vanilla = run(unet, mode="vanilla", **kw)
    assert torch.equal(empty.latents, vanilla.latents)


def test_non_square_latents_and_capture_grid(unet):
    x = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    tmap = torch.full((2, 16, 24), 400)
    tmap[:, :, :12] = 800
    ctx = tm.embeds(2)
    const, _ = pixel_forward(unet, x, torch.full((2, 16, 24), 400), ctx, force_per_pixel=True)
    stock = unet(x, torch.tensor([400, 400]), encoder_hidden_states=ctx).sample
    assert_close(const, stock, ROUNDOFF_ONE_PASS, "non-square constant map vs stock forward")
    out, maps = pixel_forward(unet, x, tmap, ctx, positions=[[2]], capture_slice=slice(1, 2))
    assert out.shape == x.shape and maps.shape == (1, 1, 4, 6)
    res = asyn_generate(unet, CFG, tm.embeds(1), tm.embeds(1, seed=3), items=ITEMS, steps=3, latents=x[:1])
    assert res.latents.shape == (1, 4, 16, 24) and res.masks[-1].shape == (1, 2, 16, 24)
