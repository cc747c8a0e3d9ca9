"""``python -m asyndm_fpdm asyn`` end to end on a tiny random pipeline saved to a temp folder."""

import json
import os
import subprocess
import sys

import pytest
import torch

from asyndm_fpdm import tiny as tiny_pipeline

from asyndm_fpdm.cli import main
from png_content import assert_pngs_show_the_run, record_runs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_pipeline.save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_sd")))


def test_cli_writes_all_modes_masks_and_timesteps(model_dir, tmp_path, monkeypatch):
    """Broken variants caught: the masks grid drawn from the next image of the batch
    (``res.masks[s][(b + 1) % 2, i]``) and the timestep tiles at another scale (``scale=999.0``)."""
    runs = record_runs(monkeypatch)
    out = tmp_path / "out"
    rc = main(["asyn", "--model", model_dir, "--prompt", "a rabbit playing basketball",
               "--targets", "rabbit:0.7, basketball:0.5", "--steps", "4", "--eta", "0",
               "--out", str(out), "--batch-size", "2"])
    assert rc == 0
    assert sorted(kw["mode"] for kw, _ in runs) == ["asyn", "concave", "vanilla"]
    assert_pngs_show_the_run(out, runs, steps=[0, 1, 2, 3], items=2)  # 4 steps: all shown
    from PIL import Image

    assert Image.open(out / "00000_asyn.png").size == (128, 128)
    assert json.loads((out / "prompts.json").read_text()) == ["a rabbit playing basketball"] * 2


def test_cli_reference_files_static_mask_and_resume(model_dir, tmp_path, monkeypatch):
    prompts = tmp_path / "p.json"
    items = tmp_path / "i.json"
    prompts.write_text(json.dumps(["a cat eating a sandwich", "a dog playing basketball"]))
    items.write_text(json.dumps({
        "item_idx": {"a cat eating a sandwich": [1, 4], "a dog playing basketball": [1, 3]},
        "item_k": {"a cat eating a sandwich": [0.7, 0.7], "a dog playing basketball": [0.7, 0.7]},
    }))
    out = tmp_path / "out"
    args = ["asyn", "--model", model_dir, "--prompt-file", str(prompts), "--item-file", str(items),
            "--steps", "3", "--mask", "static", "--modes", "asyn", "--out", str(out)]
    runs = record_runs(monkeypatch)
    assert main(args) == 0
    assert [kw["mask_source"] for kw, _ in runs] == ["static", "static"]
    for n, (_, res) in enumerate(runs):  # a static mask: the same at every step, and shown so
        assert all(torch.equal(m, res.masks[0]) for m in res.masks)
        assert_pngs_show_the_run(out, [runs[n]], steps=[0, 1, 2], items=2, modes=("asyn",), first=n)
    assert sorted(os.listdir(out)) == sorted(
        ["00000_asyn.png", "00000_compare.png", "00000_masks.png", "00000_timesteps.png",
         "00001_asyn.png", "00001_compare.png", "00001_masks.png", "00001_timesteps.png",
         "progress.json", "prompts.json"])
    first = (out / "00001_asyn.png").stat().st_mtime_ns
    (out / "00000_asyn.png").unlink()
    progress = json.loads((out / "progress.json").read_text())
    (out / "progress.json").write_text(json.dumps([p for p in progress if p != "0"]))
    assert main(args + ["--resume"]) == 0
    assert (out / "00000_asyn.png").is_file(), "the unfinished batch is redone"
    assert (out / "00001_asyn.png").stat().st_mtime_ns == first, "the finished batch is skipped"


def test_cli_unknown_word_lists_the_prompt_tokens(model_dir, tmp_path, capsys):
    rc = main(["asyn", "--model", model_dir, "--prompt", "a rabbit playing basketball",
               "--targets", "cat:0.7", "--steps", "2", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'cat' is not in the prompt" in err and "rabbit</w>" in err and "playing</w>" in err


def test_cli_missing_or_wrong_model_folder_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from asyndm_fpdm.cli import main; sys.exit(main(sys.argv[1:]))",
         "asyn", "--model", str(tmp_path / "nope"), "--prompt", "a cat", "--targets", "cat"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _package_parent(tmp_path)},
    )
    assert proc.returncode == 2 and "model folder not found" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "empty").mkdir()
    assert main(["asyn", "--model", str(tmp_path / "empty"), "--prompt", "a cat", "--targets", "cat"]) == 2


def _package_parent(tmp_path):
    """A folder where ``import asyndm_fpdm`` finds this checkout, for a subprocess."""
    link = tmp_path / "pkg"
    link.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.symlink(root, link / "asyndm_fpdm")
    return str(link)


def test_cli_sampler_and_scheduler_reach_the_engine(model_dir, tmp_path, monkeypatch):
    from asyndm_fpdm.samplers import api

    calls = []
    real = api.asyn_generate

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "asyn_generate", recording)
    base = ["asyn", "--model", model_dir, "--prompt", "a rabbit playing basketball", "--targets", "rabbit:0.7",
            "--steps", "3", "--modes", "asyn"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    # the reference's defaults: DDIM on the paper's timesteps with eta 1
    assert {k: calls[-1][k] for k in ("sampler", "scheduler", "eta")} == {"sampler": "ddim", "scheduler": "paper", "eta": 1.0}
    assert main(base + ["--sampler", "dpmpp_2m", "--scheduler", "karras", "--out", str(tmp_path / "b")]) == 0
    assert {k: calls[-1][k] for k in ("sampler", "scheduler", "eta")} == {"sampler": "dpmpp_2m", "scheduler": "karras", "eta": 0.0}
    assert (tmp_path / "b" / "00000_asyn.png").is_file()


def test_cli_eta_for_a_sampler_without_noise_is_a_clear_error(model_dir, tmp_path, capsys):
    rc = main(["asyn", "--model", model_dir, "--prompt", "a rabbit", "--targets", "rabbit", "--steps", "2",
               "--sampler", "euler", "--eta", "0.5", "--out", str(tmp_path)])
    assert rc == 2 and "takes no --eta" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["asyn", "--model", model_dir, "--prompt", "a rabbit", "--sampler", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
