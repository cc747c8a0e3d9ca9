"""``python -m asyndm_fpdm fpdm``: latents without a VAE, PNGs with a local AutoencoderKL, clear errors."""

import pytest
import torch

from asyndm_fpdm.cli import main
from fpdm_tiny import save_train_checkpoint, tiny_model
from numeric import ROUNDOFF_SAMPLING, assert_close


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_train_checkpoint(str(tmp_path_factory.mktemp("run")), tiny_model(seed=1))


def _argv(checkpoint, out, *extra):
    return ["fpdm", "--checkpoint", checkpoint, "--classes", "1, tench", "--steps", "3", "--iterations", "2",
            "--num-heads", "2", "--out", str(out), *extra]


def test_latents_only_without_vae(checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    assert main(_argv(checkpoint, tmp_path, "--reuse", "--allocation", "increasing")) == 0
    lat = load_file(str(tmp_path / "latents.safetensors"))["latents"]
    assert lat.shape == (2, 4, 8, 8) and torch.isfinite(lat).all()
    assert "block evaluations per image: 12" in capsys.readouterr().out  # 3 steps x 2 iterations x cond/uncond


def test_same_seed_same_latents_and_image_independent_of_batch(checkpoint, tmp_path):
    from safetensors.torch import load_file

    main(_argv(checkpoint, tmp_path / "a", "--method", "ddim"))
    main(_argv(checkpoint, tmp_path / "b", "--method", "ddim"))
    one = _argv(checkpoint, tmp_path / "c", "--method", "ddim")
    one[one.index("--classes") + 1] = "1"
    main(one)
    a, b, c = (load_file(str(tmp_path / d / "latents.safetensors"))["latents"] for d in "abc")
    assert torch.equal(a, b)  # same batch, same seed: bit-identical by design
    assert_close(c, a[:1], ROUNDOFF_SAMPLING, "image 0 alone vs in a batch of 2")


def test_missing_vae_folder_is_a_clear_error(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="not a diffusers AutoencoderKL folder"):
        main(_argv(checkpoint, tmp_path, "--vae", str(tmp_path / "nope")))


def test_pngs_through_a_local_autoencoderkl(checkpoint, tmp_path):
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(str(tmp_path / "vae"))
    assert main(_argv(checkpoint, tmp_path / "out", "--vae", str(tmp_path / "vae"))) == 0
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["000--001.png", "001--000.png"]
