"""Reading back what a PNG shows, for content checks of the CLI's, the demo's and the preview nodes'
images: a grid of tiles (white gaps between them), each tile a map enlarged with nearest pixels.

The decoding is written here from the files' layout, not with the pack's image helpers: a tile's
map pixel (i, j) is read at the centre of its block, and a gray level g shows the value g / 255.
"""

import numpy as np
import torch

GRAY_STEP = 1 / 255


def image_array(path_or_image):
    from PIL import Image

    if isinstance(path_or_image, np.ndarray):
        return path_or_image.astype(np.float64)
    img = path_or_image if hasattr(path_or_image, "convert") else Image.open(path_or_image)
    return np.asarray(img.convert("RGB"), dtype=np.float64)


def grid_tiles(path_or_image, rows, cols, pad=4):
    """rows × cols equal tiles of a grid with ``pad`` pixel gaps → [[tile (h, w, 3)]]."""
    img = image_array(path_or_image)
    height, width = img.shape[:2]
    th, tw = (height - (rows - 1) * pad) / rows, (width - (cols - 1) * pad) / cols
    assert th == int(th) and tw == int(tw), f"a {width}x{height} image is not a {rows}x{cols} grid with {pad} px gaps"
    th, tw = int(th), int(tw)
    if rows > 1:
        assert (img[th:th + pad] == 255).all(), "the gap between rows is not white"
    if cols > 1:
        assert (img[:, tw:tw + pad] == 255).all(), "the gap between columns is not white"
    return [[img[r * (th + pad):r * (th + pad) + th, c * (tw + pad):c * (tw + pad) + tw] for c in range(cols)]
            for r in range(rows)]


def shown_map(tile, h, w):
    """The (h, w) values a gray tile shows (read at each block's centre), in [0, 1]."""
    assert (tile[..., 0] == tile[..., 1]).all() and (tile[..., 1] == tile[..., 2]).all(), "the tile is not gray"
    th, tw = tile.shape[:2]
    ys = ((np.arange(h) + 0.5) * th / h).astype(int)
    xs = ((np.arange(w) + 0.5) * tw / w).astype(int)
    return tile[ys][:, xs, 0] / 255


def assert_tile_shows(tile, values, what):
    """The tile shows ``values`` (a (h, w) tensor or array in [0, 1]) to the nearest gray level."""
    values = np.asarray(values, dtype=np.float64)
    shown = shown_map(tile, *values.shape)
    err = np.abs(shown - values.clip(0, 1)).max()
    assert err <= GRAY_STEP / 2 + 1e-9, f"{what}: the image shows values off by {err:.4f} (> half a gray level)"


# ---------------------------------------------------------------- the AsynDM CLI's PNGs (and the demo's)
def record_runs(monkeypatch):
    """Every asyn_generate call the CLI makes: (keyword arguments, result)."""
    from asyndm_fpdm.samplers import api

    runs, real = [], api.asyn_generate

    def recording(*args, **kwargs):
        res = real(*args, **kwargs)
        runs.append((kwargs, res))
        return res

    monkeypatch.setattr(api, "asyn_generate", recording)
    return runs


def assert_pngs_show_the_run(out, runs, steps, items, modes=("vanilla", "concave", "asyn"), first=0):
    """The PNGs of a run show what each run returned: every image is
    the compare strip's tile, the masks grid (one row per item, one column per step) shows the
    masks the AsynDM run returned, the timesteps row its timestep maps / 1000."""
    by_mode = {kw["mode"]: res for kw, res in runs}
    asyn = by_mode["asyn"]
    batch = asyn.latents.shape[0]
    for b in range(batch):
        j = first + b
        compare = grid_tiles(out / f"{j:05}_compare.png", 1, len(modes))[0]
        for tile, name in zip(compare, modes):
            assert (tile == image_array(out / f"{j:05}_{name}.png")).all(), f"compare strip vs {name} image"
        masks = grid_tiles(out / f"{j:05}_masks.png", items, len(steps))
        for i in range(items):
            for c, s in enumerate(steps):
                assert_tile_shows(masks[i][c], asyn.masks[s][b, i], f"image {b}, item {i}, step {s} mask")
        row = grid_tiles(out / f"{j:05}_timesteps.png", 1, len(steps))[0]
        for c, s in enumerate(steps):
            assert_tile_shows(row[c], asyn.timestep_maps[s][b] / 1000, f"image {b}, step {s} timesteps")
    if "vanilla" in modes:  # the modes really differ: AsynDM's masks delay the items
        assert (image_array(out / f"{first:05}_asyn.png") != image_array(out / f"{first:05}_vanilla.png")).any()
    assert any(float(m.std()) > 0 for m in asyn.masks if m is not None), "the masks shown are all flat"


# ---------------------------------------------------------------- the preview nodes' IMAGE outputs
def _block_centres(img, h, w):
    """(h, w, 3) colours at the centres of an (H, W, 3) image's h × w blocks."""
    height, width = img.shape[:2]
    ys = ((torch.arange(h) + 0.5) * height / h).long()
    xs = ((torch.arange(w) + 0.5) * width / w).long()
    return img[ys][:, xs]


def assert_mask_steps_preview_shows(regions, times, run, steps, image, palette, max_t=1001.0):
    """"Masks at Steps" outputs show the run: frame f of ``regions`` colours each pixel with the
    last item whose mask is > 0.5 at step ``steps[f]`` (``palette[0]`` where none is, item j in
    ``palette[j + 1]``), frame f of ``times`` is gray at the pixel's timestep / ``max_t`` (white =
    noisy; 1001 on the paper's models, the model's top timestep on flow models)."""
    for f, s in enumerate(steps):
        t = run.timestep_maps[s][image].float()
        shown = _block_centres(times[f], *t.shape)
        assert torch.allclose(shown, (t / max_t).clamp(0, 1)[..., None].expand(-1, -1, 3), atol=1e-6, rtol=0), \
            f"timestep frame {f} (step {s}) does not show the run's timesteps"
        masks = run.masks[s][image]
        expected = torch.empty(*masks.shape[-2:], 3)
        for y in range(masks.shape[-2]):
            for x in range(masks.shape[-1]):
                on = [j for j in range(masks.shape[0]) if masks[j, y, x] > 0.5]
                expected[y, x] = torch.tensor(palette[on[-1] + 1] if on else palette[0])
        assert torch.equal(_block_centres(regions[f], *masks.shape[-2:]), expected), \
            f"region frame {f} (step {s}) does not show the run's masks"


def assert_curves_drawn(img, series, palette, max_t=1001.0, pad=24):
    """A "Timestep Curves" image draws series j (one value per step) in ``palette[j]`` through the
    points of its plot box: a pixel of that colour within 1 px of each point that no later series
    covers."""
    height, width = img.shape[:2]
    x_lo, x_hi, y_lo, y_hi = pad, width - pad, pad, height - pad
    steps = max(len(s) for s in series)
    checked = 0
    for j, values in enumerate(series):
        for i, v in enumerate(values):
            if v != v:
                continue
            y, x = y_hi - (y_hi - y_lo) * v / max_t, x_lo + (x_hi - x_lo) * i / max(steps - 1, 1)
            if any(abs(later[i] - v) * (y_hi - y_lo) / max_t < 4 for later in series[j + 1:] if later[i] == later[i]):
                continue  # under a later series' line
            near = img[round(y) - 1:round(y) + 2, round(x) - 1:round(x) + 2]
            colour = torch.tensor(palette[j], dtype=img.dtype)
            assert (near == colour).all(-1).any(), f"series {j}, step {i} ({v:.1f}) is not drawn at ({x:.0f}, {y:.0f})"
            checked += 1
    assert checked, "no point of any series could be checked"


def mean_timesteps(run, image=0):
    """Per step: the mean timestep of the background (no mask > 0.5) and of each item's pixels."""
    series = [[] for _ in range(len(run.ks) + 1)]
    for t, m in zip(run.timestep_maps, run.masks):
        t, m = t[image].double(), m[image] > 0.5
        groups = [~m.any(0)] + [m[j] for j in range(m.shape[0])]
        for j, sel in enumerate(groups):
            series[j].append(float(t[sel].sum() / sel.sum()) if sel.any() else float("nan"))
    return series
