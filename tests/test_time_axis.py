"""The plan's time axis (samplers/time_axis.py; DESIGN.md, "AsynDM in sigma space"), pure math.

The oracles are the closed forms as ComfyUI writes them (``time_snr_shift``, ``flux_time_shift``,
``ModelSamplingDiscrete.sigma``), copied here as formulas, and a plan whose positions must not
depend on a flow model's shift. The real ComfyUI classes are checked in
tests/integration/test_asyndm_time_axis.py.
"""

import math

import pytest
import torch

from asyndm_fpdm.samplers.plan import SigmaPlan
from asyndm_fpdm.samplers.schedulers import DiscreteModelSampling
from asyndm_fpdm.samplers.time_axis import FlowAxis, FluxAxis, TableAxis

EPS32 = torch.finfo(torch.float32).eps


def time_snr_shift(alpha, t):  # ComfyUI's comfy.model_sampling.time_snr_shift
    return alpha * t / (1 + (alpha - 1) * t)


def flux_time_shift(mu, t):  # ComfyUI's flux_time_shift(mu, 1.0, t)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def _rel(a, b):
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp(min=1e-30)).max())


@pytest.mark.parametrize("axis,shifted", [(FlowAxis(s), lambda t, s=s: time_snr_shift(s, t)) for s in (0.5, 1, 3, 6)]
                         + [(FluxAxis(m), lambda t, m=m: flux_time_shift(m, t)) for m in (0.5, 1.15, 2.0)])
def test_flow_axes_are_the_models_shift_and_round_trip(axis, shifted):
    u = torch.arange(1, 1001).double()
    own = shifted(u / 1000)  # σ as the model's sigma(t) gives it (shift applied)
    assert _rel(axis.sigma(u.float()), own) <= 2**2 * EPS32
    assert float(axis.sigma(torch.zeros(1))) == 0.0 and float(axis.position(torch.zeros(1))) == 0.0
    sig = torch.cat([own.float(), ((own[1:] * own[:-1]).sqrt()).float(), torch.tensor([1e-6, 1.0])])
    assert _rel(axis.sigma(axis.position(sig)), sig) <= 2**4 * EPS32
    pos = axis.position(own.float())
    assert _rel(pos, u) <= 2**4 * EPS32  # the position of σ(u) is u: 1000 steps of the unshifted time


def _sd_table(zsnr=False):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    if zsnr:  # ComfyUI's rescale_zero_terminal_snr_sigmas, last alpha_bar pinned
        s = ac.sqrt()
        s = (s - s[-1]) * s[0] / (s[0] - s[-1])
        ac = s**2
        ac[-1] = 4.8973451890853435e-08
    return (((1 - ac) / ac) ** 0.5).float()


@pytest.mark.parametrize("zsnr", [False, True])
def test_table_axis_positions_are_the_models_timesteps(zsnr):
    table = _sd_table(zsnr)
    axis = TableAxis(table)
    k = torch.arange(1000).float()
    assert torch.equal(axis.position(table), k) and torch.equal(axis.position(axis.sigma(k)), k)
    # ModelSamplingDiscrete.sigma: log σ linear between entries
    half = k[:-1] + 0.5
    assert _rel(axis.sigma(half), (table[:-1].log().double() / 2 + table[1:].log().double() / 2).exp()) <= 2**3 * EPS32
    between = (table[1:] * table[:-1]).sqrt()
    assert _rel(axis.sigma(axis.position(between)), between) <= 2**4 * EPS32
    assert float(axis.position(torch.tensor([0.0]))) == 0.0


def test_table_axis_rejects_a_bad_table_and_merges_plateaus():
    with pytest.raises(ValueError, match="ascending"):
        TableAxis(torch.tensor([2.0, 1.0]))
    axis = TableAxis(torch.tensor([0.1, 0.1, 0.2, 0.4, 0.4]))  # a clamped sigma table (Stable Cascade's ends)
    assert axis.u_max == 2 and torch.equal(axis.position(torch.tensor([0.1, 0.2, 0.4])), torch.tensor([0.0, 1, 2]))


class FlowModelSampling:
    """A flow model's model sampling as ComfyUI's ModelSamplingDiscreteFlow gives it: the model is fed
    σ·multiplier (not the position), the axis is the shift's."""

    flow = True

    def __init__(self, shift, multiplier=1000.0):
        self.axis, self.multiplier = FlowAxis(shift), multiplier
        self.sigma_max = 1.0

    def timestep(self, sigma):
        return torch.as_tensor(sigma) * self.multiplier


def _positions(plan, steps):
    maps = [plan.step(0)[0]] + [plan.step(i)[1] for i in range(steps)]
    return torch.stack([plan.axis.position(m) for m in maps])


@pytest.mark.parametrize("multiplier", [1000.0, 1.0])  # SD3, AuraFlow
def test_plan_positions_do_not_depend_on_the_shift_and_maps_report_what_the_model_gets(multiplier):
    """The shift only reparameterises σ: on the same background positions every pixel of the plan is
    at the same position for any shift, and the same as on a discrete model's table. Caught: the
    old maps (position = timestep(σ) = σ·multiplier, σ = sigma(position) with the shift again)."""
    steps, size = 6, (4, 4)
    masks = torch.zeros(1, 1, *size)
    masks[..., :2, :] = 1
    u_bg = torch.linspace(1000, 0, steps + 1).round()
    out = []
    for shift in (1.0, 3.0, 6.0):
        model_sampling = FlowModelSampling(shift, multiplier)
        sigmas = model_sampling.axis.sigma(u_bg)
        plan = SigmaPlan(sigmas, model_sampling, 1, size, mode="asyn", ks=[0.7], masks=masks)
        out.append(_positions(plan, steps))
        for i, t in enumerate(plan.timestep_maps):  # what the model is fed: σ·multiplier
            assert torch.equal(t, plan._sig[i][:, 0] * multiplier)
    for other in out[1:]:
        assert float((other - out[0]).abs().max()) <= 1e-3
    assert float((out[0][1:-1, 0, 0, :2] - out[0][1:-1, 0, 0, 2:]).max()) >= 1.0  # items lag
    # the same positions as on a discrete table whose background sits at the same positions
    sd = DiscreteModelSampling(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1001), 0)[1:])
    sd_sigmas = torch.cat([sd.axis.sigma(u_bg[:-1].clamp(max=999)), torch.zeros(1)])
    plan = SigmaPlan(sd_sigmas, sd, 1, size, mode="asyn", ks=[0.7], masks=masks, from_noise=True)
    ref = _positions(plan, steps)
    assert float((ref[1:-1] - out[0][1:-1]).abs().max()) <= 1.0  # 999 vs 1000 steps: one step apart at most
