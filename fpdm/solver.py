"""Fixed-point solving: iteration budgets across timesteps, the per-call solver, reuse state.

Pure torch, no ComfyUI. The pieces:
- ``allocate_iterations``: iterations per sampling step, with the reference's budget rounding.
- ``make_solver``: plain iteration (the reference), optionally with a relative-residual
  tolerance (per sample, so image i never depends on its batch-mates) and Anderson acceleration.
- ``stochastic_solver``: the paper's training solver (no-grad then with-grad iterations, counts
  drawn per training step).
- ``FixedPointRun``: one sampling run's state — which allocation entry each step uses, the reused
  solution per CFG half, and counters (block evaluations, iterations used).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ALLOCATIONS = ("fixed", "increasing", "decreasing")


# ----------------------------------------------------------------------------- allocation


def reference_budget_list(budget: int, steps: int, kind: str = "fixed", ratio=(0.5, 1.5)) -> List[int]:
    """The reference LinearController's list, indexed like the reference (by position in the
    list; the sampler reads it from the END, so the last entry is the first sampling step).

    Float32 arithmetic on purpose: the rounding of the reference depends on it."""
    if kind not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {kind!r}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if kind == "increasing":
        ratios = torch.linspace(ratio[0], ratio[1], steps)
    elif kind == "decreasing":
        ratios = torch.linspace(ratio[1], ratio[0], steps)
    else:
        ratios = torch.ones(steps)
    wanted = 1 + (budget - steps) * ratios / torch.sum(ratios)
    # Round up in the first half of the list, down in the second; if that overshoots the
    # budget, move the switch point earlier until it fits.
    threshold = steps // 2
    while True:
        rounded = torch.where(torch.arange(steps) < threshold, torch.ceil(wanted), torch.floor(wanted))
        if torch.sum(rounded) <= budget or threshold <= 0:
            break
        threshold -= 1
    return [int(v) for v in rounded]


def allocate_iterations(iterations: int, steps: int, kind: str = "fixed", ratio=(0.5, 1.5),
                        reference_double_count: bool = False) -> List[int]:
    """Iterations for each sampling step, first (noisiest) step first. Budget = steps*iterations.

    Names follow the reference, where the list is indexed by timestep: "increasing" grows with
    the timestep t, i.e. spends MORE at the noisy start of sampling and less at the end;
    "decreasing" the opposite; "fixed" the same everywhere. Each step uses one entry, so the
    allocation never spends more than the budget. ``reference_double_count`` reproduces the
    reference sampler exactly: it asks its controller twice per step (no-grad and with-grad
    iterations), so step k runs entries P-2k and P-2k-1 (negative indices wrap), ~2x the budget.
    """
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    lst = reference_budget_list(steps * iterations, steps, kind, ratio)
    last = len(lst) - 1
    if not reference_double_count:
        return [lst[last - k] for k in range(steps)]
    return [lst[last - 2 * k] + lst[last - 2 * k - 1] for k in range(steps)]


# ----------------------------------------------------------------------------- solver


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1)


def make_solver(iterations: int, tolerance: float = 0.0, anderson: int = 0, anderson_beta: float = 1.0,
                anderson_lambda: float = 1e-4) -> Callable:
    """Return ``solve(f, z0) -> (z, info)`` running at most ``iterations`` evaluations of ``f``.

    tolerance > 0: a sample stops once ||f(z) - z|| / ||f(z)|| < tolerance; stopped samples are
    no longer evaluated (f takes an index). anderson > 0: Anderson acceleration with that much
    history, mixing past iterates by least squares on their residuals (per sample).
    info: iterations (list per sample), evaluations (sample-evaluations of the block), residual.
    """
    iterations = int(iterations)

    def solve(f, z0):
        if iterations <= 0:
            n = z0.shape[0]
            return z0, {"iterations": [0] * n, "evaluations": 0, "residual": None}
        if anderson > 0:
            return _anderson(f, z0, iterations, tolerance, anderson, anderson_beta, anderson_lambda)
        return _picard(f, z0, iterations, tolerance)

    return solve


def draw_iterations(generator: torch.Generator, no_grad: Tuple[int, int], with_grad: Tuple[int, int]) -> Tuple[int, int]:
    """(no-grad, with-grad) iteration counts, each uniform on its inclusive [min, max] range."""
    for name, (lo, hi) in (("no-grad", no_grad), ("with-grad", with_grad)):
        if lo < 0 or hi < lo:
            raise ValueError(f"{name} iterations: need 0 <= min <= max, got [{lo}, {hi}]")
    if with_grad[1] < 1:
        raise ValueError("with-grad iterations: max must be >= 1, or the fixed-point block never learns")
    a = int(torch.randint(no_grad[0], no_grad[1] + 1, (1,), generator=generator))
    b = int(torch.randint(with_grad[0], with_grad[1] + 1, (1,), generator=generator))
    return a, b


def stochastic_solver(no_grad_iterations: int, with_grad_iterations: int) -> Callable:
    """The paper's stochastic fixed-point training solver: ``no_grad_iterations`` evaluations
    without a graph (cheap in memory: this is where FPDM saves training memory), then
    ``with_grad_iterations`` evaluations that backpropagate (a truncated backward through the
    last iterations only). Draw the counts per step with ``draw_iterations``."""

    def solve(f, z):
        with torch.no_grad():
            for _ in range(no_grad_iterations):
                z = f(z)
        z = z.detach()
        for _ in range(with_grad_iterations):
            z = f(z)
        n = z.shape[0]
        total = no_grad_iterations + with_grad_iterations
        return z, {"iterations": [total] * n, "evaluations": total * n, "residual": None,
                   "no_grad": no_grad_iterations, "with_grad": with_grad_iterations}

    return solve


def _picard(f, z, iterations, tolerance):
    n = z.shape[0]
    if tolerance <= 0:  # the reference loop, nothing else on the hot path
        for _ in range(iterations):
            z = f(z)
        return z, {"iterations": [iterations] * n, "evaluations": iterations * n, "residual": None}
    used = torch.zeros(n, dtype=torch.long)
    residual = torch.full((n,), float("inf"))
    active = torch.arange(n, device=z.device)
    evaluations = 0
    z = z.clone()
    for _ in range(iterations):
        if active.numel() == 0:
            break
        za = z[active]
        fz = f(za, active) if active.numel() < n else f(za)
        evaluations += active.numel()
        res = (_per_sample_norm(fz - za) / _per_sample_norm(fz).clamp_min(1e-12)).float().cpu()
        z[active] = fz
        idx = active.cpu()
        used[idx] += 1
        residual[idx] = res
        active = active[(res >= tolerance).to(active.device)]
    return z, {"iterations": used.tolist(), "evaluations": evaluations, "residual": residual.tolist()}


def _anderson(f, z0, iterations, tolerance, m, beta, lam):
    """Anderson acceleration (type II) on flattened per-sample states, as in DEQ solvers."""
    n = z0.shape[0]
    shape = z0.shape
    d = z0[0].numel()
    X = torch.zeros(n, m, d, dtype=z0.dtype, device=z0.device)
    F_ = torch.zeros_like(X)
    x = z0.reshape(n, d)
    fx = f(z0).reshape(n, d)
    evaluations = n
    X[:, 0], F_[:, 0] = x, fx
    used = torch.ones(n, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    residual = torch.full((n,), float("inf"))
    out = fx.clone()
    H = torch.zeros(n, m + 1, m + 1, dtype=z0.dtype, device=z0.device)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    y = torch.zeros(n, m + 1, 1, dtype=z0.dtype, device=z0.device)
    y[:, 0] = 1
    res = (_per_sample_norm(fx - x) / _per_sample_norm(fx).clamp_min(1e-12)).float().cpu()
    residual = res
    if tolerance > 0:
        done = res < tolerance
    k = 1
    while k < iterations and not bool(done.all()):
        mk = min(k, m)
        G = F_[:, :mk] - X[:, :mk]
        H[:, 1:mk + 1, 1:mk + 1] = torch.bmm(G, G.transpose(1, 2)) + lam * torch.eye(mk, dtype=z0.dtype, device=z0.device)[None]
        alpha = torch.linalg.solve(H[:, :mk + 1, :mk + 1], y[:, :mk + 1])[:, 1:mk + 1, 0]
        xk = (alpha[:, None] @ F_[:, :mk])[:, 0]
        if beta != 1.0:  # damped mixing
            xk = beta * xk + (1 - beta) * (alpha[:, None] @ X[:, :mk])[:, 0]
        active = (~done).nonzero().flatten().to(z0.device)
        xa = xk[active].reshape((active.numel(),) + tuple(shape[1:]))
        fa = (f(xa, active) if active.numel() < n else f(xa)).reshape(active.numel(), d)
        evaluations += active.numel()
        slot = k % m
        X[active, slot] = xk[active]
        F_[active, slot] = fa
        out[active] = fa
        res = (_per_sample_norm(fa - xk[active]) / _per_sample_norm(fa).clamp_min(1e-12)).float().cpu()
        idx = active.cpu()
        residual[idx] = res
        used[idx] += 1
        if tolerance > 0:
            done[idx] = res < tolerance
        k += 1
    return out.reshape(shape), {"iterations": used.tolist(), "evaluations": evaluations,
                                "residual": residual.tolist()}


# ----------------------------------------------------------------------------- a sampling run


@dataclass
class SolverSettings:
    """What the user chooses. ``iterations`` None -> the model's default."""

    iterations: Optional[int] = None
    reuse: bool = False
    allocation: str = "fixed"
    ratio: Sequence[float] = (0.5, 1.5)
    tolerance: float = 0.0
    anderson: int = 0
    reference_double_count: bool = False

    def validate(self):
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError("iterations must be >= 1")
        if self.tolerance < 0 or self.anderson < 0:
            raise ValueError("tolerance and anderson must be >= 0")
        return self


@dataclass
class FixedPointRun:
    """State of ONE sampling run. Build a new one per run: that is the reset.

    Reuse keeps one solution per key (0 = conditional half of the CFG batch, 1 = unconditional),
    so the two halves never see each other's solutions whatever order they are evaluated in.
    """

    settings: SolverSettings
    steps: int
    default_iterations: int
    allocated: List[int] = field(init=False)
    state: Dict[int, torch.Tensor] = field(default_factory=dict)
    evaluations: int = 0  # block evaluations summed over samples
    iterations_used: List[list] = field(default_factory=list)  # per call: per-sample iterations
    calls: int = 0

    def __post_init__(self):
        s = self.settings.validate()
        its = s.iterations or self.default_iterations
        self.allocated = allocate_iterations(its, self.steps, s.allocation, s.ratio, s.reference_double_count)

    def iterations_for(self, step: int) -> int:
        return self.allocated[min(max(step, 0), len(self.allocated) - 1)]

    def solver_for(self, step: int) -> Callable:
        s = self.settings
        return make_solver(self.iterations_for(step), s.tolerance, s.anderson)

    def init_for(self, halves: Optional[Sequence[int]] = None):
        """First guesses per equal chunk of the batch (None entries: the pre-block output)."""
        if not self.settings.reuse:
            return None
        return [self.state.get(key) for key in (list(halves) if halves else [0])]

    def record(self, result, halves: Optional[Sequence[int]] = None) -> None:
        """Count a network call's evaluations and keep its solution per CFG half for reuse."""
        info = result.info or {}
        self.calls += 1
        self.evaluations += int(info.get("evaluations", 0))
        self.iterations_used.append(info.get("iterations", []))
        if self.settings.reuse and result.solution is not None:
            keys = list(halves) if halves else [0]
            for key, chunk in zip(keys, result.solution.chunk(len(keys))):
                self.state[key] = chunk.detach().clone()

    def evaluate(self, model, x, t, y, step: int, halves: Optional[Sequence[int]] = None) -> torch.Tensor:
        """One network call at sampling step ``step``: solver and first guess from this run in,
        prediction out; counts and solutions recorded. ``halves``: for each equal chunk of the
        batch, its key (0 cond, 1 uncond); None = one chunk."""
        result = model.solve(x, t, y, self.solver_for(step), self.init_for(halves))
        self.record(result, halves)
        return result.out
