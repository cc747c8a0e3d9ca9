"""Image folder -> cached VAE latents, the features FPDM training reads (``python -m asyndm_fpdm fpdm features``).

- Classes: one sub-folder per class (sorted names -> labels 0..K-1), or images directly in the folder
  (one class, label 0).
- Each image is center-cropped as in ADM / DiT (``center_crop_arr``), scaled to [-1, 1] and encoded by
  a local diffusers AutoencoderKL folder; the latent is a draw from the encoder's Gaussian (as DiT's
  feature extraction does) times the VAE's scaling factor (0.18215 for the SD VAE), from a generator
  seeded per image, so a latent never depends on batching, sharding or the number of processes.
  ``flip`` adds a horizontally flipped copy of every image.
- Output: ``shard-00000.safetensors`` ... (``latents`` float32 (n, C, h, w), ``labels`` int64; which
  files and which were skipped in the metadata) and ``manifest.json``. A shard is written
  atomically once complete, so an interrupted run resumes where it stopped. Shards are dealt round
  robin to data-parallel processes (``distributed.shard``); the main process writes the manifest.
- An unreadable image is skipped and listed (in the shard and the manifest), not a crash.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST = "manifest.json"
FORMAT = "asyndm_fpdm.fpdm.features/1"


class FeatureError(ValueError):
    """Bad input for feature extraction or training data, with what is wrong and how to fix it."""


def center_crop_arr(pil_image, image_size: int):
    """ADM's center crop (as DiT uses): halve with a box filter while the short side is at least
    twice the target, resize the short side to ``image_size`` (bicubic), crop the center square."""
    import numpy as np
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[y: y + image_size, x: x + image_size])


def _images_in(folder: str) -> List[str]:
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


def list_images(folder: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """-> ([(path relative to folder, label)], class names)."""
    if not os.path.isdir(folder):
        raise FeatureError(f"image folder not found: {folder}")
    subdirs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and _images_in(os.path.join(folder, d)))
    loose = _images_in(folder)
    if subdirs and loose:
        raise FeatureError(f"{folder} has both images ({loose[0]}, ...) and class sub-folders ({subdirs[0]}, ...): "
                           "put every image in a class sub-folder, or use a folder of images only (one class)")
    if subdirs:
        items = [(os.path.join(d, f), label) for label, d in enumerate(subdirs) for f in _images_in(os.path.join(folder, d))]
        return items, subdirs
    if not loose:
        raise FeatureError(f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)} in the folder and "
                           "in its sub-folders, one sub-folder per class)")
    return [(f, 0) for f in loose], [os.path.basename(os.path.normpath(folder)) or "0"]


@dataclass
class Item:
    index: int  # position in the full list: seeds the latent draw
    file: str
    label: int
    flip: bool


@dataclass
class Summary:
    written: List[str] = field(default_factory=list)  # shards this process wrote
    reused: List[str] = field(default_factory=list)  # shards found complete (resume)
    skipped: List[dict] = field(default_factory=list)


def plan(items: List[Tuple[str, int]], flip: bool) -> List[Item]:
    out = []
    for file, label in items:
        for f in ((False, True) if flip else (False,)):
            out.append(Item(len(out), file, label, f))
    return out


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _load_image(path: str, image_size: int, flip: bool):
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        im = center_crop_arr(im.convert("RGB"), image_size)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy())
    return (arr.permute(2, 0, 1) / 255.0 - 0.5) / 0.5  # [-1, 1], as ToTensor + Normalize(0.5, 0.5)


def encode(vae, images, indices: List[int], seed: int):
    """Scaled latents: mean + std * noise from a generator seeded per image (seed + index)."""
    import torch

    from ..seeding import per_image_randn

    with torch.no_grad():
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        noise = per_image_randn([torch.Generator().manual_seed(seed + i) for i in indices], dist.mean.shape).to(dist.mean)
        return ((dist.mean + dist.std * noise) * vae.config.scaling_factor).float().cpu()


def _write_shard(path: str, latents, labels, files: List[str], skipped: List[dict]) -> None:
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({"latents": latents.contiguous(), "labels": labels.contiguous()}, tmp,
              metadata={"files": json.dumps(files), "skipped": json.dumps(skipped)})
    os.replace(tmp, path)


def _shard_done(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            count = fh.get_slice("labels").get_shape()[0]
        return {"count": count, "skipped": json.loads(meta.get("skipped", "[]"))}
    except Exception:  # a damaged file from a crash: redo it
        return None


def extract(input_dir: str, out_dir: str, vae, image_size: int = 256, flip: bool = False, shard_size: int = 1024,
            batch_size: int = 32, seed: int = 0, rank: int = 0, world: int = 1, progress: bool = True) -> Summary:
    """Encode this process's shards (round robin over ``world`` processes). Returns what it did."""
    import torch

    from ..distributed import shard

    if image_size % 8:
        raise FeatureError(f"image size {image_size} is not divisible by 8 (the VAE downsamples by 8)")
    files, _classes = list_images(input_dir)
    todo = plan(files, flip)
    shards = [todo[i: i + shard_size] for i in range(0, len(todo), shard_size)]
    os.makedirs(out_dir, exist_ok=True)
    summary = Summary()
    mine = shard(range(len(shards)), rank, world)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(shards[k]) for k in mine), desc=f"features (process {rank})" if world > 1 else "features",
               unit="img", disable=not progress)
    for k in mine:
        path = os.path.join(out_dir, shard_name(k))
        done = _shard_done(path)
        if done is not None:
            summary.reused.append(path)
            summary.skipped += done["skipped"]
            bar.update(len(shards[k]))
            continue
        latents, labels, names, skipped = [], [], [], []
        for b in range(0, len(shards[k]), batch_size):
            batch, ok = [], []
            for item in shards[k][b: b + batch_size]:
                try:
                    batch.append(_load_image(os.path.join(input_dir, item.file), image_size, item.flip))
                    ok.append(item)
                except Exception as exc:  # unreadable / not an image: list it, go on
                    if not item.flip:
                        skipped.append({"file": item.file, "error": f"{type(exc).__name__}: {exc}"})
            if batch:
                latents.append(encode(vae, torch.stack(batch), [i.index for i in ok], seed))
                labels += [i.label for i in ok]
                names += [i.file + (" (flipped)" if i.flip else "") for i in ok]
            bar.update(len(shards[k][b: b + batch_size]))
        lat = torch.cat(latents) if latents else torch.zeros(0, 4, image_size // 8, image_size // 8)
        _write_shard(path, lat, torch.tensor(labels, dtype=torch.long), names, skipped)
        summary.written.append(path)
        summary.skipped += skipped
    bar.close()
    return summary


def write_manifest(input_dir: str, out_dir: str, vae_path: str, scaling_factor: float, image_size: int, flip: bool,
                   shard_size: int, seed: int) -> dict:
    """After every shard exists: the manifest training reads (main process only)."""
    from safetensors import safe_open

    files, classes = list_images(input_dir)
    n_shards = -(-len(plan(files, flip)) // shard_size)
    shards, skipped, count, shape = [], [], 0, None
    for k in range(n_shards):
        path = os.path.join(out_dir, shard_name(k))
        if _shard_done(path) is None:
            raise FeatureError(f"shard {path} is missing or damaged: rerun the features command (it resumes)")
        with safe_open(path, framework="pt") as fh:
            n = fh.get_slice("labels").get_shape()[0]
            if n:
                shape = fh.get_slice("latents").get_shape()[1:]
            skipped += json.loads((fh.metadata() or {}).get("skipped", "[]"))
        shards.append({"file": shard_name(k), "count": n})
        count += n
    if count == 0:
        raise FeatureError(f"none of the {len(files)} images in {input_dir} could be read: " + "; ".join(
            f"{s['file']}: {s['error']}" for s in skipped[:3]))
    manifest = {"format": FORMAT, "count": count, "image_size": image_size, "latent_shape": list(shape),
                "scaling_factor": scaling_factor, "vae": os.path.abspath(vae_path), "flip": flip, "seed": seed,
                "classes": classes, "num_classes": len(classes), "shard_size": shard_size, "shards": shards,
                "skipped": skipped}
    with open(os.path.join(out_dir, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=1)
    return manifest


def load_features(folder: str):
    """-> (latents float32 (N, C, h, w), labels int64 (N,), manifest). Held in memory (about 16 KB per
    256x256 image: ImageNet's 1.28M images need about 21 GB per process)."""
    import torch
    from safetensors.torch import load_file

    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise FeatureError(f"{folder} has no {MANIFEST}: make the features first with "
                           "`python -m asyndm_fpdm fpdm features --images DIR --vae VAE_DIR --out DIR` "
                           "(an interrupted run has no manifest yet: rerun it, it resumes)")
    with open(path) as fh:
        manifest = json.load(fh)
    if manifest.get("format") != FORMAT:
        raise FeatureError(f"{path} is not a features manifest of this pack (format {manifest.get('format')!r})")
    latents, labels = [], []
    for s in manifest["shards"]:
        shard_path = os.path.join(folder, s["file"])
        try:
            d = load_file(shard_path)
            ok = d["labels"].shape[0] == s["count"] == d["latents"].shape[0]
        except Exception as exc:  # missing, truncated (safetensors' header check), not a shard
            ok, why = False, " ".join(str(exc).split())[:120] or type(exc).__name__
        else:
            why = f"it holds {d['labels'].shape[0]} latents, the manifest says {s['count']}"
        if not ok:
            raise FeatureError(f"features shard {shard_path} is missing or damaged ({why}): rerun the same "
                               "`fpdm features` command; it keeps the good shards and redoes this one")
        if s["count"]:
            latents.append(d["latents"])
            labels.append(d["labels"])
    return torch.cat(latents), torch.cat(labels), manifest
