"""The sigma plan of an asynchronous run: which noise level every latent pixel is at, step by step.

The background follows the run's sigmas S_0 > ... > S_N (any scheduler, any SIGMAS) exactly.
Prompt-item pixels lag behind on the paper's concave curves (curves.py). The curves live in
the paper's *virtual timestep* space y (1001 → 0, the linear curve gives the background's
knots K_i). A pixel's y is mapped to a *position* u on the model's time axis
(time_axis.py) by interpolating, between the knots, the offset U_i − K_i where U_i =
position(S_i), then rounded to the axis' grid and turned into a sigma by the axis' exact inverse
sigma(u) (DESIGN.md, "AsynDM in sigma space"). What the model is fed, and what
``timestep_maps`` report, is the model's own timestep(σ) of that sigma — on shifted flow models a
different number from u:

- a pixel exactly on the step's knot gets S_i itself (the background is the scheduler's);
- in the paper's configuration (DDIM leading timesteps) U_i = K_i, so u = y exactly and the
  rounded timestep maps are the reference's, bit for bit;
- from pure noise (txt2img) the first evaluation is one curve step from the virtual start
  y = 1001, as in the paper; from a partly noised latent (denoise < 1, img2img) every pixel
  starts on S_0 and items lag from there.

Masks: ``vanilla`` (none), ``concave`` (every pixel on the strongest item's curve), ``asyn``
with fixed masks (static / external) or dynamic ones rebuilt from the attention the model
reports after the first evaluation of each step (``observe``), as in the paper: step i's
next state uses the masks built from step i−1's attention.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .masks import build_item_masks, cell_coverage, initial_dynamic_masks
from .curves import PaperCurves

MODES = ("asyn", "concave", "vanilla")
DEFAULT_K = 0.7


class SigmaPlan:
    def __init__(
        self,
        sigmas: torch.Tensor,
        model_sampling,
        batch: int,
        size,
        *,
        mode: str = "asyn",
        ks: Sequence[float] = (),
        masks: Optional[torch.Tensor] = None,
        dynamic: bool = False,
        anchors: Optional[Sequence[int]] = None,
        curve: str = "bin",
        mask_thr: float = 1.0,
        from_noise: Optional[bool] = None,
        capture_all: bool = False,
        cell: int = 1,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
        if len(sigmas) < 2:
            raise ValueError(f"the SIGMAS have {len(sigmas)} value(s): a run needs at least 2 (one step); "
                             "give more steps or a longer SIGMAS")
        if bool((sigmas[1:] > sigmas[:-1]).any()):
            raise ValueError("the SIGMAS must not increase: AsynDM denoises from noisy to clean")
        self.device = sigmas.device
        self.sigmas, self.model_sampling = sigmas, model_sampling
        self.batch, self.size = batch, tuple(size)
        self.steps = len(sigmas) - 1
        self.mode, self.mask_thr, self.dynamic = mode, mask_thr, dynamic and mode == "asyn"
        self.capture_all = capture_all
        self.ks = [float(k) for k in ks]
        self.cell = int(cell)  # a transformer's patch: masks are uniform on it (backends/comfy_dit.py)
        self.curves = PaperCurves(self.steps, curve=curve)  # the paper's y-space: 1001 → 0
        self._init_masks(masks, anchors)

        self.axis = model_sampling.axis  # σ ↔ position u, exact inverses (time_axis.py)
        u_sigmas = self.axis.position(sigmas.cpu()).float()
        self.u_max = float(self.axis.u_max)

        start = float(self.curves.start_value)
        first = float(self.curves.step(torch.tensor([start]), self.steps)[0])
        if from_noise is None:  # txt2img: the first sigma is at or above the paper's first timestep
            from_noise = float(u_sigmas[0]) >= first / start * self.u_max - 0.5
        self.from_noise = bool(from_noise)
        knots = [first if self.from_noise else start]
        for i in range(self.steps):
            knots.append(float(self.curves.step(torch.tensor([knots[-1]]), self.steps - i - 1)[0]))
        k = torch.tensor(knots)
        # position − y at each knot, against the rounded knot, so that in the paper's configuration
        # it is exactly 0 and u = y (float32 knots drift by ~1e-4)
        offsets = u_sigmas - k.round()
        if self.from_noise:  # the virtual start y = 1001 keeps the first knot's offset
            k, offsets = torch.cat([torch.tensor([start]), k]), torch.cat([offsets[:1], offsets])
        self.knots, self.offsets = k, offsets  # knots descend in y

        self._y: List[torch.Tensor] = []
        self._sig: List[torch.Tensor] = []
        self.capture_pending = False
        self.timestep_maps: List[torch.Tensor] = []  # (B, H, W) what the model is fed, per pixel and step
        self.mask_history: List[Optional[torch.Tensor]] = []  # masks that set each step's next state
        self.item_maps: List[Optional[torch.Tensor]] = []  # attention observed at each step
        y0 = torch.full((batch, *self.size), start, device=self.device)
        if self.from_noise:
            y0 = self.curves.step(y0, self.steps, self.masks, self.ks)
        self._push(y0, 0)

    # ----------------------------------------------------------------------------------- set-up
    def _init_masks(self, masks, anchors):
        b, size = self.batch, self.size
        self.masks = None
        if self.mode == "concave":
            self.masks = torch.ones(b, 1, *size, device=self.device)
            self.ks = [max(self.ks) if self.ks else DEFAULT_K]
        elif self.mode == "asyn" and self.ks:
            if self.dynamic:
                anchors = list(anchors) if anchors is not None else list(range(len(self.ks)))
                self.masks = initial_dynamic_masks(b, anchors, size, self.device)
            elif masks is not None:
                self.masks = fit_masks(masks, b, size, len(self.ks)).to(self.device)
            else:
                raise ValueError("mode 'asyn' with fixed masks needs masks (static pre-pass or a MASK input)")
        self.masks = self._snap(self.masks)

    def _snap(self, masks):
        """Binary masks uniform on cell × cell patches, so every transformer token has one sigma
        (the one its timestep and its pixels' updates use): a pixel or patch follows the share of
        it a mask covers (masks.cell_coverage)."""
        return None if masks is None else cell_coverage(masks, self.cell)

    def model_timestep(self, sigma_map: torch.Tensor) -> torch.Tensor:
        """What the model is fed for a (B, 1, H, W) sigma map: its own timestep(σ), looked up
        once per distinct sigma; σ = 0 is timestep 0."""
        uniq, inverse = torch.unique(sigma_map[:, 0], return_inverse=True)
        t = torch.as_tensor(self.model_sampling.timestep(uniq.float().cpu()), dtype=torch.float32).to(uniq.device)
        return torch.where(uniq > 0, t, torch.zeros_like(t))[inverse]

    # ------------------------------------------------------------------------------ y → sigma
    def _sigma_of(self, y: torch.Tensor, i: int) -> torch.Tensor:
        """Sigma map (B,1,H,W) of virtual states y at step i."""
        k = self.knots.to(y.device)
        d = self.offsets.to(y.device)
        # segment j with k[j] >= y >= k[j+1] (knots descend)
        j = (torch.searchsorted(-k, -y.contiguous(), right=True) - 1).clamp(0, len(k) - 2)
        f = ((k[j] - y) / (k[j] - k[j + 1])).clamp(0, 1)
        u = (y + d[j] + f * (d[j + 1] - d[j])).clamp(0, self.u_max).round()  # a position on the axis' grid
        sig = torch.as_tensor(self.axis.sigma(u.flatten().cpu()), dtype=torch.float32).to(y.device).view_as(y)
        knot = self.knots[i + 1 if self.from_noise else i].item()
        sig = torch.where(y == knot, self.sigmas[i].to(y.device), sig)
        # a lagging pixel is never ahead of the background: σ(u) from the model's table can be an
        # ulp below a scheduler's own σ at the same position (karras' σ_min vs σ(0))
        sig = torch.maximum(sig, self.sigmas[i].to(y.device))
        if i == self.steps:
            sig = torch.where(y <= 0, self.sigmas[-1].to(y.device), sig)
        return sig[:, None]

    def _push(self, y, i):
        sig = self._sigma_of(y, i)
        self._y.append(y)
        self._sig.append(sig)
        if i < self.steps:
            self.timestep_maps.append(self.model_timestep(sig))

    # ------------------------------------------------------------------------- sampler side
    def __len__(self):
        return self.steps

    def initial_sigma(self) -> torch.Tensor:
        return self._sig[0]

    def background(self, i: int) -> torch.Tensor:
        return self.sigmas[i]

    def step(self, i: int):
        """(σ_i, σ_{i+1}) maps (B, 1, H, W) of step i; call in order, once per step."""
        if i == len(self._y) - 1:
            self.mask_history.append(self.masks)
            self.item_maps.append(None)
            y = self.curves.step(self._y[i], self.steps - i - 1, self.masks, self.ks)
            self._push(y, i + 1)
            self.capture_pending = self.dynamic or self.capture_all
        return self._sig[i], self._sig[i + 1]

    def observe(self, maps: Optional[torch.Tensor]):
        """Attention maps (B, N, h, w) of the step's first evaluation."""
        self.capture_pending = False
        if maps is None:
            return
        self.item_maps[-1] = maps
        if self.dynamic:
            self.masks = self._snap(build_item_masks(maps.to(self.device), self.ks, self.size, self.mask_thr))


def fit_masks(masks: torch.Tensor, batch: int, size, n_items: int) -> torch.Tensor:
    """Accept (N,H,W), (B,N,H,W) or (H,W) masks of any size: each latent pixel takes the share of
    it the mask covers (area average), in the mask above 0.5. The plan then does the same for a
    transformer's tokens from these shares."""
    from .masks import resize_masks

    m = torch.as_tensor(masks, dtype=torch.float32)
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[None]
    if m.shape[1] != n_items:
        raise ValueError(f"got masks for {m.shape[1]} items but {n_items} strengths k: give one mask per item")
    if m.shape[0] not in (1, batch):
        raise ValueError(f"mask batch {m.shape[0]} does not match the latent batch {batch}: give 1 or {batch}")
    return resize_masks(m, size, mode="area").expand(batch, -1, -1, -1).clamp(0, 1)


# ------------------------------------------------------------------------- runs split over step ranges
@dataclass(frozen=True)
class PlanState:
    """Where a run split over step ranges stands after its first ``step`` steps (DESIGN.md, "Runs
    split over step ranges"): every pixel's virtual state y at that step, the masks that set the next
    state, and the history so far (for the previews of the whole run). What a plan needs to continue
    exactly as one run would; ``steps``, ``mode``, ``curve``, ``ks`` and ``size`` must match."""

    step: int
    y: torch.Tensor  # (B, H, W)
    masks: Optional[torch.Tensor]
    steps: int
    mode: str
    curve: str
    ks: tuple
    timestep_maps: tuple = ()
    mask_history: tuple = ()
    item_maps: tuple = ()


def leftover(plan: SigmaPlan, end: int) -> PlanState:
    """The plan's state at step ``end`` (after steps 0..end-1 ran)."""
    def cpu(maps):
        return tuple(m.cpu() if m is not None else None for m in maps)

    return PlanState(step=end, y=plan._y[end].cpu(), masks=None if plan.masks is None else plan.masks.cpu(),
                     steps=plan.steps, mode=plan.mode, curve=plan.curves.curve, ks=tuple(plan.ks),
                     timestep_maps=cpu(plan.timestep_maps[:end]), mask_history=cpu(plan.mask_history[:end]),
                     item_maps=cpu(plan.item_maps[:end]))


def resume(plan: SigmaPlan, state: PlanState) -> SigmaPlan:
    """Continue ``plan`` (built for the whole run) from ``state``: step ``state.step`` then computes
    what the one run would have (same y, same masks), on this plan's own sigmas."""
    mine = (plan.steps, plan.mode, plan.curves.curve, tuple(plan.ks), (plan.batch, *plan.size))
    theirs = (state.steps, state.mode, state.curve, tuple(state.ks), tuple(state.y.shape))
    names = ("steps", "mode", "curve", "strengths k", "latent (batch, height, width)")
    wrong = [f"{n} {b} here vs {a} in the first pass" for n, a, b in zip(names, theirs, mine) if a != b]
    if wrong:
        raise ValueError("this pass continues an AsynDM run over a different plan: " + "; ".join(wrong) +
                         ". Give both passes the same steps, mode, curve, strengths and latent size.")
    i, dev = state.step, plan.device
    y = state.y.to(dev)
    plan._y = [None] * i + [y]
    plan._sig = [None] * i + [plan._sigma_of(y, i)]
    plan.timestep_maps = [m.to(dev) for m in state.timestep_maps]
    if i < plan.steps:
        plan.timestep_maps.append(plan.model_timestep(plan._sig[i]))
    plan.mask_history = [None if m is None else m.to(dev) for m in state.mask_history]
    plan.item_maps = [None if m is None else m.to(dev) for m in state.item_maps]
    plan.masks = None if state.masks is None else state.masks.to(dev)
    return plan


class PlanWindow:
    """Steps ``start``..``end``-1 of a plan, seen as a run of their own (what a sampler steps through
    when one pass runs part of the schedule, like KSamplerAdvanced's start/end steps)."""

    def __init__(self, plan: SigmaPlan, start: int, end: int):
        if len(plan._y) != start + 1:
            raise RuntimeError(f"the plan stands at step {len(plan._y) - 1}, not at the window's start {start}")
        self.plan, self.start, self.end = plan, start, end

    def __getattr__(self, name):  # model_sampling, from_noise, ks, mode, capture_pending, ...
        return getattr(self.plan, name)

    def __len__(self):
        return self.end - self.start

    def step(self, i: int):
        return self.plan.step(self.start + i)

    def background(self, i: int) -> torch.Tensor:
        return self.plan.background(self.start + i)

    def initial_sigma(self) -> torch.Tensor:
        return self.plan._sig[self.start]

    def observe(self, maps):
        self.plan.observe(maps)

    @property
    def timestep_maps(self):  # the run so far: the steps before the window and the window's own
        return self.plan.timestep_maps[:self.end]
