"""FPDM training end to end on CPU: image folder -> features -> train -> a checkpoint the loader and the
sampling CLI open; exact resume; 2 processes = 1 process; warm start from a DiT; clear errors."""

import csv
import json
import os
import re
import shutil

import pytest
import torch

from asyndm_fpdm.cli import main
from asyndm_fpdm.fpdm.features import load_features
from asyndm_fpdm.fpdm.loading import load_fpdm
from fpdm_tiny import tiny_config
from fpdm_train_tiny import IMAGE_SIZE, launch, make_images, make_vae, train_argv



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


@pytest.fixture(scope="module")
def sgd_run(data, tmp_path_factory):
    """6 steps, one process, plain SGD: its step is proportional to the gradient (AdamW's is not)."""
    run = tmp_path_factory.mktemp("sgd") / "run"
    assert main(train_argv(data["features"], run, "--engine", "torch", *SGD)) == 0
    return run


SGD = ("--optimizer", "sgd", "--lr", "0.2")
README_LAUNCHES = {  # the README's lines with 2 processes, no --device (auto: cpu and gloo here)
    "torchrun": (["torchrun", "--nproc_per_node", "2"], ()),
    "torchrun --engine torch": (["torchrun", "--nproc_per_node", "2"], ("--engine", "torch")),
    "accelerate launch": (["accelerate", "launch", "--multi_gpu", "--num_processes", "2"], ()),
}


@pytest.mark.parametrize("launch_line", list(README_LAUNCHES))
def test_readme_launch_lines_with_two_processes_equal_one_process(data, sgd_run, tmp_path, launch_line):
    """The README's launch line as written, 2 processes, global batch 4 = 2 x 2, SGD: world size 2 is
    printed and the run equals the one-process run, within float32 round-off, relative to what training
    moved. Caught: accelerate created with cpu=(device == "cpu") (each process trains alone: world size 1
    printed, both write the same checkpoint and crash); gradients summed instead of averaged (loss times
    the world size: steps 4-6 move the weights twice as far, 100% off); both ranks taking the same slice
    of the global batch (another gradient); a run whose weights never move (update check)."""
    if launch_line.startswith("accelerate"):
        pytest.importorskip("accelerate")
    launcher, extra = README_LAUNCHES[launch_line]
    run = tmp_path / "run2"
    out, _ = launch(launcher, train_argv(data["features"], run, *extra, *SGD, device=None), timeout=150)
    assert "world size 2," in out and "per-process batch 2 (global 4)" in out, out
    one, two = _metrics(sgd_run), _metrics(run)
    assert [s for s, _ in two] == [s for s, _ in one]
    assert all(abs(a - b) <= 1e-4 * abs(a) for (_, a), (_, b) in zip(one, two)), (one, two)
    a3, a6 = _weights(sgd_run / "checkpoints/0000003.pt"), _weights(sgd_run / "checkpoints/0000006.pt")
    b3, b6 = _weights(run / "checkpoints/0000003.pt"), _weights(run / "checkpoints/0000006.pt")
    moved = max((a6[k] - a3[k]).abs().max().item() for k in a6)  # what steps 4-6 did to the weights
    assert moved > 1e-3 * max(v.abs().max().item() for v in a6.values()), "the one-process run did not train"
    worst_update = max(((b6[k] - b3[k]) - (a6[k] - a3[k])).abs().max().item() for k in a6)
    worst = max((b6[k] - a6[k]).abs().max().item() for k in a6)
    assert worst_update <= 1e-3 * moved and worst <= 1e-3 * moved, (worst_update, worst, moved)


def test_features_with_two_processes_equal_one_process(data, tmp_path):
    """`torchrun --nproc_per_node 2 -m asyndm_fpdm fpdm features ...` (no --device): world size 2 printed,
    both processes encode (process 1's progress bar shows), the same manifest and latents as one process.
    Caught: a rank ignoring the launcher (world size 1 printed: one process does all)."""
    out_dir = tmp_path / "f2"
    argv = [a for a in _features_argv(data["images"], data["vae"], out_dir) if a not in ("--device", "cpu")]
    out, err = launch(["torchrun", "--nproc_per_node", "2"], argv, timeout=150)
    assert "world size 2," in out and "features (process 1)" in err, out
    one, two = (json.loads(open(os.path.join(d, "manifest.json")).read()) for d in (data["features"], out_dir))
    assert one == two
    a, la, _ = load_features(data["features"])
    b, lb, _ = load_features(str(out_dir))
    assert torch.equal(la, lb) and torch.allclose(a, b, rtol=1e-5, atol=1e-6 * a.abs().max().item())


def test_launcher_world_the_engine_does_not_share_is_an_error(monkeypatch):
    """WORLD_SIZE=2 from the launcher but an accelerate that sees one process (what cpu=False did on a
    machine without CUDA): refused, not N lone runs. Caught: the check_world call removed."""
    pytest.importorskip("accelerate")
    import accelerate

    from asyndm_fpdm.fpdm.train import TrainError, make_engine

    class OneProcess:
        num_processes, process_index, local_process_index, device = 1, 0, 0, torch.device("cpu")

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(accelerate, "Accelerator", OneProcess)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TrainError, match=r"launcher started 2 processes .* accelerate engine runs 1"):
        make_engine("accelerate", "auto", "no")


def test_accelerate_cpu_launch_without_mpi_warns(monkeypatch, capsys):
    """`accelerate launch --cpu --num_processes 2` without MPI starts one process per launch with
    MASTER_ADDR but no WORLD_SIZE: say so (a torchrun worker, with WORLD_SIZE, stays quiet)."""
    from asyndm_fpdm import distributed

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.warn_lone_launch()
    assert "this is ONE process" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.warn_lone_launch()
    assert capsys.readouterr().err == ""


def _damage(path, how, tmp_path):
    data = open(path, "rb").read()
    if how == "truncated":
        open(path, "wb").write(data[: len(data) // 2])
    elif how == "empty":
        open(path, "wb").close()
    elif how == "not a checkpoint":
        open(path, "w").write("just text\n")
    elif how == "code pickle":
        import argparse

        torch.save({"model": argparse.Namespace(x=1)}, path)
    elif how == "raw state dict":  # e.g. a released DiT file: weights only, no optimizer or step
        _, dit_path = _tiny_dit(tmp_path)
        shutil.copy(dit_path, path)
    elif how == "other model":  # a training checkpoint of another network that carries no args
        dit, _ = _tiny_dit(tmp_path)
        torch.save({"model": dit.state_dict(), "ema": dit.state_dict(), "opt": {}, "args": {}, "train_steps": 3}, path)


@pytest.mark.parametrize("how, fix", [("truncated", "Pass another checkpoint"), ("empty", "empty .* Pass another"),
                                      ("not a checkpoint", "Pass another checkpoint"),
                                      ("code pickle", "can run code .* Pass another"),
                                      ("raw state dict", "lacks .*--warm-start"),
                                      ("other model", "do not fit this model.*use that run's options")])
def test_resume_from_a_bad_file_is_one_clear_message(data, straight_run, tmp_path, how, fix):
    """--resume FILE with a damaged or wrong file: a SystemExit naming the file and the fix, no traceback.
    Caught: torch.load's own error escaping (truncated: RuntimeError from the zip reader, empty: EOFError,
    text: KeyError), load_state_dict's RuntimeError for another network."""
    bad = tmp_path / "bad.pt"
    shutil.copy(straight_run / "checkpoints" / "0000003.pt", bad)
    _damage(bad, how, tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(train_argv(data["features"], tmp_path / "run", "--engine", "torch", "--resume", str(bad)))
    msg = str(exc.value)
    assert msg.startswith("error: --resume") and str(bad) in msg and "\n" not in msg, msg
    assert re.search(fix, msg), msg


def test_resume_auto_skips_a_damaged_latest_checkpoint(data, straight_run, tmp_path, capsys):
    """A crash left the newest checkpoint truncated and a .tmp of a later save: --resume auto warns about
    both, resumes from the newest readable one (step 3) and ends bitwise equal to the uninterrupted run.
    With every checkpoint unreadable it stops with a message. Caught: taking the newest file blindly (a
    torch error), and counting the .tmp as a checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    _damage(run / "checkpoints" / "0000006.pt", "truncated", tmp_path)
    (run / "checkpoints" / "0000009.pt.tmp").write_bytes(b"half a save")
    main(train_argv(data["features"], run, "--engine", "torch", "--resume", "auto", steps=6))
    err = capsys.readouterr().err
    assert f"skips {run / 'checkpoints' / '0000006.pt'}: it is damaged" in err and "0000009.pt.tmp" in err, err
    assert _metrics(run) == _metrics(straight_run)
    a, b = _weights(run / "checkpoints/0000006.pt"), _weights(straight_run / "checkpoints/0000006.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for f in ("0000003.pt", "0000006.pt"):
        _damage(run / "checkpoints" / f, "empty", tmp_path)
    with pytest.raises(SystemExit, match=r"--resume auto: no checkpoint in .* can be read"):
        main(train_argv(data["features"], run, "--engine", "torch", "--resume", "auto", steps=6))


def test_a_missing_or_truncated_shard_is_named_and_features_repairs_it(data, tmp_path, capsys):
    """Training on features with a lost shard, then a truncated one: an error naming the shard and the fix;
    rerunning `fpdm features` redoes just those shards. Caught: safetensors' FileNotFoundError /
    SafetensorError escaping from load_features."""
    out = tmp_path / "f"
    shutil.copytree(data["features"], out)
    os.remove(out / "shard-00002.safetensors")
    with pytest.raises(SystemExit, match=r"shard .*shard-00002.safetensors is missing or damaged .* rerun the same"):
        main(train_argv(out, tmp_path / "run"))
    raw = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00001.safetensors").write_bytes(raw[: len(raw) - 40])
    with pytest.raises(SystemExit, match=r"shard .*shard-00001.safetensors is missing or damaged"):
        main(train_argv(out, tmp_path / "run"))
    capsys.readouterr()
    main(_features_argv(data["images"], data["vae"], out))
    assert "(4 reused by this process)" in capsys.readouterr().out  # 6 shards, 2 redone
    assert torch.equal(load_features(str(out))[0], load_features(data["features"])[0])


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


# ----------------------------------------------------------------------------- the typed configuration


def test_config_stores_the_reference_train_py_names_and_reads_them_back():
    """The checkpoint's args use the reference train.py's key names (written out here by hand, the oracle),
    and a reference-style args dict reads back into the same config. Caught: a field renamed in the
    dataclass without its mapping (the key would change), a pair stored as a list under one key."""
    from asyndm_fpdm.fpdm.config import TrainConfig

    cfg = TrainConfig(features="f", out="o", pre_depth=2, post_depth=3, no_grad_iters=(1, 7), with_grad_iters=(2, 9),
                      timestep_conditioning=True, sampling_iterations=5, zero_snr=True, predict_v=True, seed=11)
    args = cfg.to_args()
    reference = {"fixed_point_pre_depth": 2, "fixed_point_post_depth": 3, "fixed_point_no_grad_min_iters": 1,
                 "fixed_point_no_grad_max_iters": 7, "fixed_point_with_grad_min_iters": 2,
                 "fixed_point_with_grad_max_iters": 9, "fixed_point_pre_post_timestep_conditioning": True,
                 "fixed_point_iters": 5, "use_zero_terminal_snr": True, "predict_v": True, "global_seed": 11,
                 "fixed_point": True, "model": "DiT-XL/2", "global_batch_size": 256}
    assert {k: args.get(k) for k in reference} == reference
    assert json.loads(json.dumps(args)) == args  # plain JSON, as train.py's args
    assert TrainConfig.from_args({**args, "some_reference_only_key": 1}) == cfg
