"""SigmaPlan invariants (DESIGN.md invariant 3) on SD's noise schedule, without a model."""

import pytest
import torch

from asyndm_fpdm.samplers.plan import SigmaPlan
from asyndm_fpdm.samplers.curves import PaperCurves
from asyndm_fpdm.samplers.schedulers import DiscreteModelSampling, make_sigmas

SIZE = (8, 8)
KS = [0.7, 0.4]


@pytest.fixture(scope="module")
def sd():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
    return DiscreteModelSampling(torch.cumprod(1 - betas, 0).float())


def fixed_masks():
    m = torch.zeros(2, 2, *SIZE)
    m[:, 0, :, :3] = 1  # item 0: left columns, item 1: a block on the right, the rest background
    m[:, 1, 5:, 5:] = 1
    return m


def walk(plan):
    """Every step's σ map: (steps + 1, B, 1, H, W)."""
    maps = [plan.step(0)[0]]
    for i in range(len(plan)):
        maps.append(plan.step(i)[1])
    return torch.stack(maps)


def background(masks):
    return masks.sum(dim=1) == 0  # (B, H, W)


@pytest.mark.parametrize("scheduler", ["paper", "karras", "exponential", "trailing", "leading", "linspace"])
@pytest.mark.parametrize("curve", ["bin", "lin", "exp"])
def test_fixed_masks_start_end_monotone_and_items_lag(sd, scheduler, curve):
    sigmas = make_sigmas(sd, scheduler, 12)
    masks = fixed_masks()
    sig = walk(SigmaPlan(sigmas, sd, 2, SIZE, mode="asyn", ks=KS, masks=masks, curve=curve, from_noise=True))[:, :, 0]
    assert sig.shape == (13, 2, *SIZE)
    assert (sig[0] >= sigmas[0]).all() and torch.equal(sig[-1], torch.full_like(sig[-1], float(sigmas[-1])))
    assert (sig[1:] <= sig[:-1]).all(), "per pixel sigma never increases"
    bg, item = background(masks), ~background(masks)
    for i in range(12):
        assert sig[i][item].min() >= sig[i][bg].max(), f"step {i}: an item pixel is ahead of the background"
    assert (sig[1:-1][:, item] > sig[1:-1][:, bg].max()).any(), "items do lag"
    if scheduler in ("paper", "karras", "exponential", "trailing"):
        # the background is the scheduler's, bit for bit
        assert all(torch.equal(sig[i][bg], sigmas[i].expand(int(bg.sum()))) for i in range(13))


@pytest.mark.parametrize("steps", [6, 7, 10, 50])  # 6, 7: counts that do not divide 1000
@pytest.mark.parametrize("curve", ["bin", "lin", "exp"])
def test_paper_configuration_is_the_reference_schedule(sd, steps, curve):
    masks = fixed_masks()
    plan = SigmaPlan(make_sigmas(sd, "paper", steps), sd, 2, SIZE, mode="asyn", ks=KS, masks=masks, curve=curve)
    walk(plan)
    ref = PaperCurves(steps, curve=curve).plan(masks, KS, 2, *SIZE).round().long()
    assert len(plan.timestep_maps) == steps
    assert all(torch.equal(t.long(), ref[i]) for i, t in enumerate(plan.timestep_maps))


def test_concave_and_vanilla_modes(sd):
    sigmas = make_sigmas(sd, "karras", 8)
    vanilla = walk(SigmaPlan(sigmas, sd, 1, SIZE, mode="vanilla", ks=KS))
    assert all(torch.equal(vanilla[i], sigmas[i].expand_as(vanilla[i])) for i in range(9))
    concave = walk(SigmaPlan(sigmas, sd, 1, SIZE, mode="concave", ks=KS))
    # the curves meet again at the last evaluation (the paper's timestep 1, here karras' σ_min)
    assert (concave[1:-2] > vanilla[1:-2]).all() and (concave >= vanilla).all(), "every pixel lags"
    assert (concave[1:] <= concave[:-1]).all() and torch.equal(concave[-1], vanilla[-1])


def test_dynamic_masks_keep_every_pixel_monotone(sd):
    sigmas = make_sigmas(sd, "paper", 10)
    plan = SigmaPlan(sigmas, sd, 2, SIZE, mode="asyn", ks=KS, dynamic=True, anchors=[1, 3])
    gen = torch.Generator().manual_seed(0)
    maps = [plan.step(0)[0]]
    for i in range(10):
        maps.append(plan.step(i)[1])
        assert plan.capture_pending
        plan.observe(torch.rand(2, 2, 2, 2, generator=gen))  # fresh random attention every step
    sig = torch.stack(maps)
    assert (sig[1:] <= sig[:-1]).all() and (sig[-1] == sigmas[-1]).all()
    assert len(plan.mask_history) == 10 and not torch.equal(plan.mask_history[1], plan.mask_history[5])


def test_img2img_starts_every_pixel_on_the_first_sigma(sd):
    tail = make_sigmas(sd, "karras", 12)[5:]
    for from_noise in (False, None):  # None: detected from a first sigma below the paper's start
        plan = SigmaPlan(tail, sd, 2, SIZE, mode="asyn", ks=KS, masks=fixed_masks(), from_noise=from_noise)
        assert not plan.from_noise
        sig = walk(plan)
        assert torch.equal(sig[0], tail[0].expand_as(sig[0]))
        assert (sig[1:] <= sig[:-1]).all() and (sig[-1] == 0).all()
        assert (sig[1][:, 0][~background(fixed_masks())] > tail[1]).all(), "items lag from the first step on"


def test_bad_input_is_a_clear_error(sd):
    with pytest.raises(ValueError, match="at least 2"):
        SigmaPlan(torch.tensor([1.0]), sd, 1, SIZE)
    with pytest.raises(ValueError, match="must not increase"):
        SigmaPlan(torch.tensor([1.0, 2.0, 0.0]), sd, 1, SIZE)
    with pytest.raises(ValueError, match="one mask per item"):
        SigmaPlan(make_sigmas(sd, "karras", 4), sd, 1, SIZE, ks=KS, masks=torch.zeros(3, *SIZE))
    with pytest.raises(ValueError, match="needs masks"):
        SigmaPlan(make_sigmas(sd, "karras", 4), sd, 1, SIZE, ks=KS)
    with pytest.raises(ValueError, match="asyn, concave, vanilla"):
        SigmaPlan(make_sigmas(sd, "karras", 4), sd, 1, SIZE, mode="sync")
    with pytest.raises(ValueError, match="unknown scheduler 'simple'"):
        make_sigmas(sd, "simple", 4)


@pytest.mark.parametrize("cell", [1, 2])
def test_unaligned_mask_follows_the_share_of_each_cell_it_covers(sd, cell):
    """A 64×64 MASK for an 8×8 latent, not aligned to the latent or the token grid: a pixel (cell 1)
    or a token (cell 2, a transformer's patch) is in the mask exactly when more than half of its
    cell's image pixels are, computed here token by token. Caught: each cell taking its top-left
    pixel (the old snap: 11 of 36 masked pixels on the background schedule)."""
    mask = torch.zeros(64, 64)
    mask[10:45, 5:37] = 1  # edges at 10, 45, 5, 37: inside cells, not on their borders
    mask[50:53, 50:64] = 1  # a thin strip: under half of every cell it touches
    plan = SigmaPlan(make_sigmas(sd, "karras", 4), sd, 1, SIZE, mode="asyn", ks=[0.7], masks=mask[None], cell=cell)
    side = 8 * cell  # image pixels per cell side
    expect = torch.zeros(SIZE)
    for ty in range(8 // cell):
        for tx in range(8 // cell):
            share = float(mask[ty * side:(ty + 1) * side, tx * side:(tx + 1) * side].mean())
            expect[ty * cell:(ty + 1) * cell, tx * cell:(tx + 1) * cell] = float(share > 0.5)
    assert torch.equal(plan.masks[0, 0], expect)
    top_left = mask[::side, ::side].repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    assert not torch.equal(top_left, expect)  # the old snap would differ on this mask
    sig = walk(plan)[1, 0, 0]
    assert (sig[expect > 0] > sig[expect == 0].max()).all()  # the covered cells lag, the others do not
