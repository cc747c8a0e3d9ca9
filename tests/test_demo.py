"""``python -m asyndm_fpdm demo``, the pack's main job, end to end: the files it writes and the
numbers it prints agree with what it ran."""

import re

import pytest

from asyndm_fpdm.cli import main
from png_content import assert_pngs_show_the_run, grid_tiles, image_array, record_runs

STEPS = 2
ITERATIONS = 4  # fpdm/demo.py's default


@pytest.fixture
def fixed_point_calls(monkeypatch):
    """Sample-evaluations of the fixed-point block per FPDM generate call, counted at the block."""
    from asyndm_fpdm.fpdm import model as fpdm_model
    from asyndm_fpdm.fpdm import pipeline

    counts, real_init, real_generate = [], fpdm_model.init_random_, pipeline.generate

    def init_random_(model, *args, **kwargs):
        model = real_init(model, *args, **kwargs)
        model.block_fixed_point.register_forward_hook(lambda m, a, o: counts.__setitem__(-1, counts[-1] + a[0].shape[0]))
        return model

    def generate(*args, **kwargs):
        counts.append(0)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(fpdm_model, "init_random_", init_random_)
    monkeypatch.setattr(pipeline, "generate", generate)
    return counts


def test_demo_writes_what_it_ran_and_prints_consistent_numbers(tmp_path, monkeypatch, capsys, fixed_point_calls):
    """Broken variants caught: the timestep PNG at another scale (``scale=999.0`` in the CLI),
    an FPDM way that spends more than the budget (``SolverSettings(iterations + 1)`` for
    "fixed+reuse"), and a block-evaluation count that is not the block's (``fp_run.evaluations * 2``)."""
    runs = record_runs(monkeypatch)
    assert main(["demo", "--out", str(tmp_path), "--steps", str(STEPS)]) == 0
    printed = capsys.readouterr().out

    # AsynDM: vanilla, DMconcave and AsynDM of one prompt with two items; the PNGs show those runs
    asyn_out = tmp_path / "asyndm"
    assert sorted(kw["mode"] for kw, _ in runs) == ["asyn", "concave", "vanilla"]
    assert all(kw["steps"] == STEPS for kw, _ in runs)
    assert_pngs_show_the_run(asyn_out, runs, steps=list(range(STEPS)), items=2)
    assert f"AsynDM: vanilla, DMconcave and AsynDM images, masks and timestep maps in {asyn_out}/" in printed

    # FPDM: the same budget spent three ways; the printed numbers are what the block really did
    lines = re.findall(r"FPDM (\S+)\s*: budget (\d+) iterations/image, allocation sum (\d+), block evaluations (\d+)",
                       printed)
    assert [name for name, *_ in lines] == ["fixed", "increasing", "fixed+reuse"], printed
    for (name, budget, allocated_sum, evaluations), counted in zip(lines, fixed_point_calls):
        assert int(budget) == STEPS * ITERATIONS and int(allocated_sum) == int(budget), name
        # 2 images × cond/uncond = 4 samples per block call, the whole budget spent on each
        assert int(evaluations) == counted == 4 * int(budget), name
    assert len(fixed_point_calls) == 3
    previews = {name: image_array(tmp_path / "fpdm" / f"latents_{name}.png")
                for name in ("fixed", "increasing", "fixed_reuse")}
    for name, img in previews.items():
        halves = grid_tiles(img, 1, 2, pad=0)[0]  # two images side by side, 8× nearest
        assert img.shape == (16 * 8, 2 * 16 * 8, 3) and all(h.std() > 0 for h in halves), name
    # spending the budget another way changes the result
    assert (previews["fixed"] != previews["increasing"]).any() and (previews["fixed"] != previews["fixed_reuse"]).any()
