"""FPDM training end to end on CPU: image folder -> features -> train -> a checkpoint the loader and the
sampling CLI open; exact resume; 2 processes = 1 process; warm start from a DiT; clear errors."""

import csv
import json
import os
import shutil

import pytest
import torch

from asyndm_fpdm.cli import main
from asyndm_fpdm.fpdm.features import load_features
from asyndm_fpdm.fpdm.loading import load_fpdm
from fpdm_tiny import tiny_config
from fpdm_train_tiny import IMAGE_SIZE, make_images, make_vae, train_argv
from torchrun import run_two_processes



def _features_argv(images, vae, out, *extra):
    return ["fpdm", "features", "--images", str(images), "--vae", str(vae), "--out", str(out),
            "--image-size", str(IMAGE_SIZE), "--flip", "--shard-size", "5", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fpdm_train")
    images = make_images(str(root / "images"))
    with open(root / "images" / "class_1" / "broken.png", "w") as fh:
        fh.write("not an image")
    vae = make_vae(str(root / "vae"))
    assert main(_features_argv(images, vae, root / "features")) == 0
    return {"root": root, "images": images, "vae": vae, "features": str(root / "features")}


def _metrics(run):
    with open(os.path.join(run, "metrics.csv")) as fh:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]


def _weights(path, entry="model"):
    return torch.load(path, map_location="cpu", weights_only=True)[entry]


# ----------------------------------------------------------------------------- features


def test_features_shards_labels_flips_and_lists_unreadable_images(data, capsys):
    latents, labels, manifest = load_features(data["features"])
    assert manifest["count"] == 24 and latents.shape == (24, 4, 8, 8)  # 12 readable images x (original + flip)
    assert manifest["classes"] == ["class_0", "class_1"] and labels.tolist() == [0] * 12 + [1] * 12
    assert [s["file"] for s in manifest["skipped"]] == [os.path.join("class_1", "broken.png")]
    assert len(manifest["shards"]) == 6  # 26 planned latents (broken one included) in shards of 5
    assert not torch.allclose(latents[0], latents[1])  # the flipped copy is its own latent
    # the latent of an image does not depend on how it was batched (seeded per image)
    other = data["root"] / "features_b1"
    main(_features_argv(data["images"], data["vae"], other, "--batch-size", "1", "--shard-size", "7"))
    again, _, _ = load_features(str(other))
    assert torch.allclose(again, latents, rtol=1e-5, atol=1e-6 * latents.abs().max().item())


def test_features_resume_keeps_finished_shards(data, tmp_path, capsys):
    out = tmp_path / "f"
    shutil.copytree(data["features"], out)
    os.remove(out / "manifest.json")
    os.remove(out / "shard-00002.safetensors")
    kept = (out / "shard-00001.safetensors").stat().st_mtime_ns
    main(_features_argv(data["images"], data["vae"], out))
    assert "(5 reused by this process)" in capsys.readouterr().out
    assert (out / "shard-00001.safetensors").stat().st_mtime_ns == kept
    redone, _, _ = load_features(str(out))
    assert torch.equal(redone, load_features(data["features"])[0])


def test_features_errors_name_the_problem(data, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images found"):
        main(_features_argv(tmp_path / "empty", data["vae"], tmp_path / "o"))
    with pytest.raises(SystemExit, match="not a diffusers AutoencoderKL folder"):
        main(_features_argv(data["images"], tmp_path / "novae", tmp_path / "o"))
    mixed = tmp_path / "mixed"
    shutil.copytree(data["images"], mixed)
    shutil.copy(mixed / "class_0" / "000.png", mixed / "loose.png")
    with pytest.raises(SystemExit, match="both images .* and class sub-folders"):
        main(_features_argv(mixed, data["vae"], tmp_path / "o"))
    with pytest.raises(SystemExit, match="no manifest.json"):
        main(train_argv(tmp_path / "empty", tmp_path / "run"))


# ----------------------------------------------------------------------------- training


def test_loss_falls_and_the_checkpoint_loads_and_samples(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data["features"], run, "--log-every", "50", "--ckpt-every", "1000", steps=200)) == 0
    losses = [loss for _, loss in _metrics(run)]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses
    ckpt = run / "checkpoints" / "0000200.pt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # nothing but tensors and plain data
    assert set(raw) == {"model", "ema", "opt", "args", "train_steps"} and raw["train_steps"] == 200
    assert json.loads((run / "args.json").read_text())["fixed_point"] is True
    model, info = load_fpdm(str(ckpt))
    assert info["entry"] == "ema" and model.config.fixed_point and model.config.num_heads == 2
    assert model.config.num_classes == 2 and model.config.input_size == 8 and model.config.iterations == 4
    assert main(["fpdm", "--checkpoint", str(ckpt), "--classes", "0,1", "--steps", "4", "--out", str(tmp_path / "png"),
                 "--vae", data["vae"], "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == ["000--000.png", "001--001.png"]


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory):
    """6 uninterrupted steps, one process, torch engine (checkpoints at 3 and 6)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main(train_argv(data["features"], run, "--engine", "torch")) == 0
    return run


def test_resume_repeats_the_uninterrupted_run_exactly(data, straight_run, tmp_path):
    run = tmp_path / "run"
    main(train_argv(data["features"], run, "--engine", "torch", steps=3))
    # a crash after step 3 left extra log rows: resume drops them and continues from the checkpoint
    with open(run / "metrics.csv", "a") as fh:
        fh.write("4,123.0,,,,,,,,\n")
    main(train_argv(data["features"], run, "--engine", "torch", "--resume", "auto", steps=6))
    assert _metrics(run) == _metrics(straight_run)
    for entry in ("model", "ema"):
        a, b = _weights(run / "checkpoints/0000006.pt", entry), _weights(straight_run / "checkpoints/0000006.pt", entry)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_match_one_process(data, straight_run, tmp_path):
    """torchrun, 2 processes (gloo), accelerate engine, global batch 4 = 2 x 2: the same parameters as the
    one-process run within float32 round-off of the gradient average."""
    pytest.importorskip("accelerate")
    run = tmp_path / "run2"
    run_two_processes("from fpdm_train_tiny import train_argv; from asyndm_fpdm.cli import main; "
                      "main(train_argv(sys.argv[3], sys.argv[4], '--engine', 'accelerate'))",
                      data["features"], run, timeout=120)
    one, two = _metrics(straight_run), _metrics(run)
    assert [s for s, _ in two] == [s for s, _ in one]
    assert all(abs(a - b) <= 1e-5 * abs(a) for (_, a), (_, b) in zip(one, two))
    a, b = _weights(straight_run / "checkpoints/0000006.pt"), _weights(run / "checkpoints/0000006.pt")
    scale = max(v.abs().max().item() for v in a.values())
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5 * scale, f"max parameter difference {worst} (parameters up to {scale})"
    assert any(not torch.equal(a[k], _weights(straight_run / "checkpoints/0000003.pt")[k]) for k in a)  # it trained


def test_training_errors_name_the_problem(data, tmp_path):
    with pytest.raises(SystemExit, match="needs v-prediction"):
        main(train_argv(data["features"], tmp_path / "a", "--zero-snr"))
    with pytest.raises(SystemExit, match="larger than the dataset"):
        main(train_argv(data["features"], tmp_path / "b", "--global-batch-size", "64"))
    with pytest.raises(SystemExit, match="never learns"):
        main(train_argv(data["features"], tmp_path / "c", "--with-grad-iters", "0", "0"))
    main(train_argv(data["features"], tmp_path / "d", steps=1))
    with pytest.raises(SystemExit, match=r"other settings for \['fixed_point_post_depth'\]"):
        main(train_argv(data["features"], tmp_path / "d", "--post-depth", "2", "--resume", "auto", steps=2))


def test_plain_dit_v_prediction_and_flow_variants_train(data, tmp_path):
    main(train_argv(data["features"], tmp_path / "dit", "--no-fixed-point", "--depth", "2", "--predict-v", "--zero-snr",
                    steps=2))
    model, _ = load_fpdm(str(tmp_path / "dit" / "checkpoints" / "0000002.pt"))
    assert not model.config.fixed_point and model.config.prediction == "v" and model.config.zero_terminal_snr
    main(train_argv(data["features"], tmp_path / "flow", "--flow", steps=2))
    rows = list(csv.DictReader(open(tmp_path / "flow" / "metrics.csv")))
    assert rows[-1]["flow"] and not rows[-1]["vb"]
    with pytest.raises(Exception, match="flow-matching"):
        load_fpdm(str(tmp_path / "flow" / "checkpoints" / "0000002.pt"))


# ----------------------------------------------------------------------------- warm start


def _tiny_dit(tmp_path, depth=4):
    from asyndm_fpdm.fpdm.model import DiT, init_random_

    dit = init_random_(DiT(tiny_config(fixed_point=False, depth=depth, num_classes=2)), seed=5)
    path = tmp_path / "dit.pt"
    torch.save(dit.state_dict(), path)
    return dit, path


def test_warm_start_with_one_iteration_is_the_truncated_dit(tmp_path):
    from asyndm_fpdm.fpdm.model import DiT
    from asyndm_fpdm.fpdm.solver import make_solver
    from asyndm_fpdm.fpdm.warm_start import warm_start_from_dit

    dit, path = _tiny_dit(tmp_path)
    fpdm = DiT(tiny_config(num_classes=2, pre_post_timestep_conditioning=True))
    info = warm_start_from_dit(fpdm, str(path))
    assert info["fixed_point_block"] == 2 and not info["left"]
    truncated = DiT(tiny_config(fixed_point=False, depth=3, num_classes=2))
    sd = {k: v for k, v in dit.state_dict().items() if not k.startswith("blocks.")}
    for new, old in enumerate((0, 2, 3)):  # pre block, the middle block, post block
        sd.update({f"blocks.{new}." + k.split(".", 2)[2]: v for k, v in dit.state_dict().items() if k.startswith(f"blocks.{old}.")})
    truncated.load_state_dict(sd)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([0, 1])
    with torch.no_grad():
        a, b = fpdm(x, t, y, solver=make_solver(1)), truncated(x, t, y)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_warm_start_from_the_cli_and_its_errors(data, tmp_path):
    from asyndm_fpdm.fpdm.model import DiT
    from asyndm_fpdm.fpdm.warm_start import warm_start_from_dit

    _, path = _tiny_dit(tmp_path)
    run = tmp_path / "warm"
    main(train_argv(data["features"], run, "--warm-start", str(path), "--timestep-conditioning", steps=1))
    first = _weights(run / "checkpoints" / "0000001.pt")
    dit = torch.load(path, weights_only=True)
    # one AdamW step at lr 1e-3 moves a weight by about 1e-3 at most
    assert (first["blocks_pre.0.attn.qkv.weight"] - dit["blocks.0.attn.qkv.weight"]).abs().max() < 2e-3
    with pytest.raises(Exception, match="too few"):
        warm_start_from_dit(DiT(tiny_config(num_classes=2, pre_depth=2, post_depth=2)), str(path))
    with pytest.raises(Exception, match="patch embedding does not fit"):
        warm_start_from_dit(DiT(tiny_config(num_classes=2, hidden_size=64)), str(path))
