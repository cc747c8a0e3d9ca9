"""Tiny training inputs shared by the FPDM training tests: a synthetic image folder (PIL, fixed seed),
a tiny random diffusers AutoencoderKL folder (downsamples by 8 like the SD VAE) and fast train options."""

import os

import numpy as np

IMAGE_SIZE = 64  # -> 8x8 latents


def make_images(folder, classes=2, per_class=6, size=80, seed=0):
    """Class c: smooth colour blobs whose hue depends on c (learnable), random positions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(classes):
        os.makedirs(os.path.join(folder, f"class_{c}"), exist_ok=True)
        for i in range(per_class):
            cx, cy = rng.uniform(0.3, 0.7, 2)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05)
            colour = np.array([1.0, 0.2, 0.2]) if c == 0 else np.array([0.2, 0.3, 1.0])
            img = 255 * (0.1 + 0.8 * blob[..., None] * colour)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"class_{c}", f"{i:03d}.png"))
    return folder


def make_vae(folder, seed=0):
    import torch
    from diffusers.models import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=IMAGE_SIZE)
    vae.save_pretrained(folder)
    return folder


def train_argv(features, out, *extra, steps=6, device="cpu"):
    """A tiny FPDM: hidden 32, 2 heads, patch 2, 1 pre + fixed point + 1 post block. ``device=None``
    leaves --device out (its default, auto), as the README's launch lines do."""
    return ["fpdm", "train", "--features", str(features), "--out", str(out), "--model", "DiT-S/2",
            "--hidden-size", "32", "--num-heads", "2", "--no-grad-iters", "0", "2", "--with-grad-iters", "1", "2",
            "--steps", str(steps), "--global-batch-size", "4", "--lr", "1e-3", "--ema-decay", "0.9",
            "--no-grad-checkpointing", "--log-every", "1", "--ckpt-every", "3",
            *(["--device", device] if device else []), *extra]


def launch(launcher, argv, timeout=180):
    """``launcher -m asyndm_fpdm *argv`` as a user types it (e.g. ``["torchrun", "--nproc_per_node", "2"]``),
    with ``asyndm_fpdm`` resolving to this checkout and one thread per process. -> (stdout, stderr).
    Retries once on the rare gloo teardown abort (see torchrun.py)."""
    import subprocess
    import sys
    import tempfile

    from torchrun import ROOT, TEARDOWN_ABORT

    pkg = tempfile.mkdtemp(prefix="asyndm_pkg_")
    os.symlink(ROOT, os.path.join(pkg, "asyndm_fpdm"))
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=os.pathsep.join([pkg, os.environ.get("PYTHONPATH", "")]))
    tool = os.path.join(os.path.dirname(sys.executable), launcher[0])
    cmd = [tool if os.path.exists(tool) else launcher[0], *launcher[1:], "-m", "asyndm_fpdm", *map(str, argv)]
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode == 0 or TEARDOWN_ABORT not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout, proc.stderr
