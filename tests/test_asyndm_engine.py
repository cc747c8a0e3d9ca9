"""AsynDM engine on a tiny random UNet: DESIGN.md invariants 1, 2, 5 and 6, modes, mask sources, eta."""

import pytest
import torch

from asyndm_fpdm import tiny as tm
from asyndm_fpdm.samplers.api import asyn_generate
from asyndm_fpdm.samplers.backends.diffusers_unet import DiffusersDenoiser, pixel_forward
from asyndm_fpdm.samplers.ddim import ddim_step
from asyndm_fpdm.samplers.loop import sample
from asyndm_fpdm.samplers.schedule import AsyncSchedule
from numeric import FAR_ABOVE_ROUNDOFF, ROUNDOFF_ELEMENTWISE, ROUNDOFF_ONE_PASS, ROUNDOFF_SAMPLING, assert_close, assert_differs

CFG = tm.sd_scheduler_config()
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


def test_invariant6_embeddings_only_for_distinct_timesteps(unet):
    rows = []
    handle = unet.time_embedding.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        tmap = torch.full((2, 16, 16), 800)
        tmap[:, :4] = 950
        tmap[1, 8:] = 120
        pixel_forward(unet, tm.latents(2), tmap, tm.embeds(2))
    finally:
        handle.remove()
    # 2 images: {800, 950} and {800, 950, 120} -> 5 (image, timestep) rows (+2 for the stock per-image pass)
    assert max(rows) == 5 and sum(rows) <= 7, rows


def test_attention_capture_only_selected_tokens_shapes(unet):
    den = DiffusersDenoiser(unet, tm.embeds(2), tm.embeds(2, seed=9), token_groups=[[2], [3, 4]])
    out, maps = den(tm.latents(2), torch.full((2, 16, 16), 700), capture=True)
    assert out.shape == (2, 4, 16, 16) and maps.shape == (2, 2, 4, 4)
    assert (maps > 0).all() and (maps < 1).all()
    with pytest.raises(ValueError, match="query grid"):
        DiffusersDenoiser(unet, tm.embeds(1), token_groups=[[2]], attn_fraction=3)(
            tm.latents(1), torch.full((1, 16, 16), 700), True)


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


def test_ddim_step_v_prediction_matches_diffusers():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(tm.sd_scheduler_config("v_prediction"))
    sched.set_timesteps(10)
    x, v = tm.latents(1), tm.latents(1, seed=5)
    t = sched.timesteps[3]
    ref = sched.step(v, t, x).prev_sample
    ours, _ = ddim_step(v, x, int(t), int(t) - 100, sched.alphas_cumprod, prediction_type="v_prediction")
    assert_close(ours, ref, ROUNDOFF_ELEMENTWISE, "v-prediction DDIM step vs diffusers")
    per_pixel, _ = ddim_step(v, x, torch.full((1, 1, 16, 16), int(t)), torch.full((1, 1, 16, 16), int(t) - 100),
                             sched.alphas_cumprod, prediction_type="v_prediction")
    assert torch.equal(per_pixel, ours)


@pytest.mark.parametrize("mode,source", [("asyn", "dynamic"), ("asyn", "static"), ("concave", "dynamic")])
def test_invariant5_seed_and_batch_independence(unet, mode, source):
    one = run(unet, mode=mode, mask_source=source, batch=1)
    again = run(unet, mode=mode, mask_source=source, batch=1)
    assert torch.equal(one.latents, again.latents)
    two = asyn_generate(unet, CFG, tm.embeds(1).repeat(2, 1, 1), tm.embeds(1, seed=3).repeat(2, 1, 1),
                        items=ITEMS, steps=6, seed=7, mode=mode, mask_source=source)
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
    res = run(unet, mode="concave")
    plan = AsyncSchedule(6).plan(torch.ones(1, 1, 16, 16), [0.7], 1, 16, 16).round().long()
    assert all(torch.equal(t, plan[i]) for i, t in enumerate(res.timestep_maps))


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
    with pytest.raises(ValueError, match="one mask per item"):
        run(unet, mask_source="external", external_masks=torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="noise_sampler"):
        sample(lambda x, t, c: (x, None), tm.latents(1), tm.alphas_cumprod(), AsyncSchedule(2), [], eta=0.5)


def test_non_square_latents_and_capture_grid(unet):
    x = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    tmap = torch.full((2, 16, 24), 400)
    tmap[:, :, :12] = 800
    ctx = tm.embeds(2)
    const, _ = pixel_forward(unet, x, torch.full((2, 16, 24), 400), ctx, force_per_pixel=True)
    stock = unet(x, torch.tensor([400, 400]), encoder_hidden_states=ctx).sample
    assert_close(const, stock, ROUNDOFF_ONE_PASS, "non-square constant map vs stock forward")
    out, maps = pixel_forward(unet, x, tmap, ctx, capture_tokens=[[2]], capture_slice=slice(1, 2))
    assert out.shape == x.shape and maps.shape == (1, 1, 4, 6)
    res = asyn_generate(unet, CFG, tm.embeds(1), tm.embeds(1, seed=3), items=ITEMS, steps=3, latents=x[:1])
    assert res.latents.shape == (1, 4, 16, 24) and res.masks[-1].shape == (1, 2, 16, 24)
