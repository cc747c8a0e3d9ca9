"""Side-by-side timing shared by the benchmarks: every contender warmed once, then timed in
interleaved rounds (one run of each per round, same number of runs each), and compared as the
median over rounds of the per-round ratio — a shared machine's drift hits both sides of a round
alike, where a ratio of two medians would mix rounds."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List


def interleaved(runs: Dict[str, Callable[[], object]], rounds: int, per: float = 1.0,
                warm: bool = True) -> Dict[str, List[float]]:
    """{name: [seconds / per for each round]} after one untimed warm-up call of every run (unless the
    caller warmed them more cheaply: ``warm=False``)."""
    for fn in runs.values() if warm else ():
        fn()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / per)
    return times


def median(values: List[float]) -> float:
    return statistics.median(values)


def ratio(times: Dict[str, List[float]], name: str, base: str) -> float:
    """Median over rounds of times[name] / times[base]."""
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def spread(times: Dict[str, List[float]], name: str, base: str) -> str:
    """The lowest and highest per-round ratio, to show how noisy the machine was."""
    r = [a / b for a, b in zip(times[name], times[base])]
    return f"[{min(r):.2f}-{max(r):.2f}]"


def flush_denormals(on: bool) -> bool:
    """Set the process-wide float32 denormal flushing (a CPU setting: it applies to every contender
    alike); returns whether this CPU supports it."""
    import torch

    return bool(torch.set_flush_denormal(on))
