"""Sharded sampling: under ``torchrun --nproc_per_node 2`` (gloo on CPU) the FPDM CLI and the AsynDM
batch CLI share their work and write byte-identical files to a one-process run with the same seeds."""

import json
import os

import pytest

import torch

from asyndm_fpdm.cli import main
from asyndm_fpdm.distributed import shard
from fpdm_tiny import save_train_checkpoint, tiny_model
from fpdm_train_tiny import make_vae
from torchrun import run_two_processes

LAUNCH = "from asyndm_fpdm.cli import main; raise SystemExit(main(sys.argv[3:]))"
# The same command, and each worker reports the world size of its process group and the files it
# saved itself (PIL's save observed from outside the CLI), so a test can see who did what.
LAUNCH_REPORTING = """import json, os, PIL.Image, torch.distributed as dist
from asyndm_fpdm.cli import main
saved, _save = [], PIL.Image.Image.save
def _recording_save(self, fp, *args, **kwargs):
    saved.append(os.path.basename(str(fp)))
    return _save(self, fp, *args, **kwargs)
PIL.Image.Image.save = _recording_save
rc = main(sys.argv[3:])
world = dist.get_world_size() if dist.is_initialized() else 1
print("WROTE " + json.dumps({"rank": int(os.environ["RANK"]), "world": world, "files": saved}), flush=True)
raise SystemExit(rc)
"""


def _one_process(argv):
    """The command in this process with one thread, as each torchrun worker has (so that float reductions
    are split the same way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def _torchrun(argv):
    return run_two_processes(LAUNCH, *argv)


def _files(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


def test_shard_is_round_robin_and_covers_everything():
    parts = [shard(range(7), r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == list(range(7))
    with pytest.raises(ValueError):
        shard(range(3), 2, 2)


def test_fpdm_sampling_on_two_processes_writes_the_same_files(tmp_path):
    ckpt = save_train_checkpoint(str(tmp_path / "run"), tiny_model(seed=1))
    vae = make_vae(str(tmp_path / "vae"))
    common = ["fpdm", "--checkpoint", ckpt, "--classes", "1,2,3,4,5", "--steps", "3", "--iterations", "2", "--reuse",
              "--num-heads", "2", "--batch-size", "2", "--device", "cpu", "--image-size", "64"]
    for suffix, extra in (("png", ["--vae", vae]), ("lat", [])):
        _one_process(common + ["--out", str(tmp_path / f"one_{suffix}")] + extra)
        out = _torchrun(common + ["--out", str(tmp_path / f"two_{suffix}")] + extra)
        assert "on 2 processes" in out
        one, two = _files(tmp_path / f"one_{suffix}"), _files(tmp_path / f"two_{suffix}")
        assert list(one) == list(two) and len(one) == (5 if suffix == "png" else 1)
        assert one == two  # byte for byte: same chunks, per-image noise


def test_asyndm_batch_cli_on_two_processes_splits_the_work_and_writes_the_same_images(tmp_path):
    """Each of the 2 workers is in a process group of 2, saves a different, non-empty share of the
    images, and the shares together are the one-process run's images, byte for byte.

    Broken variants caught: every rank taking all batches (``shard`` returning ``list(items)``: the
    shares overlap, though the files are still identical) and each process running alone
    (``distributed.init`` never forming the process group: world 1)."""
    from asyndm_fpdm import tiny as tiny_pipeline

    model = tiny_pipeline.save_tiny_pipeline(str(tmp_path / "sd"))
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["a cat eating a sandwich", "a dog playing basketball", "a red cat"]))
    common = ["asyn", "--model", model, "--prompt-file", str(prompts), "--targets", "a:0.5", "--steps", "2",
              "--modes", "asyn", "--device", "cpu"]
    _one_process(common + ["--out", str(tmp_path / "one")])
    out = run_two_processes(LAUNCH_REPORTING, *common, "--out", str(tmp_path / "two"))
    reports = sorted((json.loads(line[len("WROTE "):]) for line in out.splitlines() if line.startswith("WROTE ")),
                     key=lambda r: r["rank"])
    assert [(r["rank"], r["world"]) for r in reports] == [(0, 2), (1, 2)], out
    shares = [set(r["files"]) for r in reports]
    assert len(shares[0]) == len(reports[0]["files"]) and len(shares[1]) == len(reports[1]["files"])
    assert shares[0] and shares[1] and not shares[0] & shares[1], f"overlapping or empty shares: {shares}"
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    pngs = [p for p in one if p.endswith(".png")]
    assert len(pngs) == 3 * 4 and pngs == [p for p in two if p.endswith(".png")]
    assert shares[0] | shares[1] == set(pngs)
    assert all(one[p] == two[p] for p in pngs)
