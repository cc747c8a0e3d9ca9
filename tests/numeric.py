"""Float comparisons for the tests, relative to the size of what is compared.

Two runs of the same float32 computation agree bit for bit only when they run the same kernels
in the same order: same batch, same seed, same machine. Otherwise (another batch size, another
CPU, BLAS or thread count, a per-pixel path beside the stock one) sums are reordered and the
results differ by round-off, which scales with the magnitude of the values: latents of size 500
differ by about 1e-5 where latents of size 1 differ by about 1e-7. So every tolerance here is
relative to the largest magnitude of the expected value, and written in units of the dtype's
machine epsilon (float32: 1.19e-7) where it covers round-off:

- ``ROUNDOFF_ELEMENTWISE`` (2^3 eps, 9.5e-7): an elementwise formula (one sampler step from given
  predictions) against the same formula written out: a few roundings per element, no sums.
- ``ROUNDOFF_ONE_PASS`` (2^7 eps, 1.5e-5): one forward pass of a small network, or one closed-form
  step, computed along two routes.
- ``ROUNDOFF_SAMPLING`` (2^9 eps, 6.1e-5): a whole sampling loop (a few steps, CFG), where each
  step's round-off feeds the next.
- ``FAR_ABOVE_ROUNDOFF`` (1e-3, about 8000 eps): the least relative difference that counts as a
  real change (another seed, a LoRA, a mask), so round-off can never pass for one.

``NUMERIC_LOG=/path/file python -m pytest`` appends every comparison's measured error and its
tolerance to that file, to see the margins on a new machine.
"""

import os

import torch

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
ROUNDOFF_ELEMENTWISE = 2**3 * EPS32
ROUNDOFF_ONE_PASS = 2**7 * EPS32
ROUNDOFF_SAMPLING = 2**9 * EPS32
FAR_ABOVE_ROUNDOFF = 1e-3


def _f64(x):
    return torch.as_tensor(x).detach().cpu().double()


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (the plain difference when expected is all zero)."""
    actual, expected = _f64(actual), _f64(expected)
    scale = float(expected.abs().max())
    diff = float((actual - expected).abs().max())
    return diff / scale if scale > 0 else diff


def _log(kind, err, tol, what):
    path = os.environ.get("NUMERIC_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{test}\t{what}\t{kind}\t{err:.3e}\t{tol:.1e}\n")


def assert_close(actual, expected, rtol, what="values"):
    """``actual`` equals ``expected`` up to ``rtol`` × the largest |expected|."""
    assert actual.shape == expected.shape, f"{what}: shapes {tuple(actual.shape)} and {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    _log("close", err, rtol, what)
    scale = float(_f64(expected).abs().max())
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.1e} (largest |expected| {scale:.3g})"


def assert_differs(a, b, at_least, what="values"):
    """``a`` and ``b`` differ somewhere by more than ``at_least`` × the largest |b|: a real change,
    far above round-off."""
    err = rel_err(a, b)
    _log("differs", err, at_least, what)
    assert err > at_least, f"{what}: relative difference {err:.2e} is not above {at_least:.1e}"
