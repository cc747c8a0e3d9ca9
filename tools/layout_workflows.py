"""Lay out the shipped workflows (workflows/*.json) from a short description of each.

    python tools/layout_workflows.py          # rewrites positions, sizes, groups and a few titles

Each workflow is a Note plus groups; a group is a row of columns and a column a stack of node
ids. Nodes get at least the front end's minimum size (tests/frontend_node_sizes.json), so the
front end draws them exactly as saved, and room is kept below nodes that are expected to grow.
Links, ids and widget values are left alone. Check the result with
``tests/test_workflows_format.py`` (saved sizes) and ``tests/integration/test_workflows_frontend.py``
(the real front end, with screenshots).
"""

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MIN_SIZES = json.loads((ROOT / "tests" / "frontend_node_sizes.json").read_text())

TITLE = 30       # LiteGraph's title bar, drawn above a node's pos
VGAP = 30        # between a node and the next node's title bar
HGAP = 50        # between columns
HEAD = 50        # a group's title bar above its first node
PAD = 20         # group border around its nodes
GROUP_GAP = 40   # between groups stacked in one column
NOTE_X, NOTE_W = 0, 440
FIRST_X = 500    # right of the Note

# Wider or taller than the minimum where that reads better (text boxes, image previews).
PREFERRED = {
    "CheckpointLoaderSimple": (315, 98), "AsynDMTextEncode": (400, 200), "CLIPTextEncode": (400, 130),
    "EmptyLatentImage": (315, 106), "AsynDMKSampler": (340, 450), "AsynDMMaskExtractor": (340, 330),
    "VAEDecode": (210, 46), "SaveImage": (300, 300), "PreviewImage": (300, 280), "AsynDMCurvePreview": (315, 106),
    "AsynDMMaskStepsPreview": (315, 102), "SolidMask": (315, 106), "MaskComposite": (315, 126),
    "MaskToImage": (210, 26), "AsynDMSampler": (315, 226), "AsynDMSamplerFromSampler": (315, 180), "SamplerDPMPP_3M_SDE": (315, 106), "BasicScheduler": (315, 106), "CFGGuider": (315, 98),
    "RandomNoise": (315, 82), "UNETLoader": (315, 82), "DualCLIPLoader": (315, 130), "CLIPLoader": (315, 106), "EmptyHunyuanLatentVideo": (315, 130),
    "SaveAnimatedWEBP": (315, 360), "TripleCLIPLoader": (315, 106),
    "QuadrupleCLIPLoader": (315, 130), "ModelSamplingSD3": (315, 58),
    "FluxGuidance": (315, 58), "EmptySD3LatentImage": (315, 106), "SamplerCustomAdvanced": (315, 106), "LatentUpscaleBy": (315, 82), "FPDMCheckpointLoader": (360, 178), "FPDMSettings": (320, 202),
    "FPDMClassConditioning": (360, 126), "FPDMSampler": (320, 238), "KSampler": (320, 262), "VAELoader": (320, 58),
}
PREFERRED.update({"ModelSamplingAuraFlow": (315, 58), "ModelSamplingSD3": (315, 58),  # Qwen-Image, Wan 2.2
                  "AsynDMKSamplerAdvanced": (344, 426)})
PREFERRED.update({"EmptyChromaRadianceLatentImage": (315, 106), "EmptyHunyuanImageLatent": (315, 106)})
# Free space kept below a node type that is about to gain widgets (rows of ~25 px).
ROOM_BELOW = {}

BLUE, GREEN, PURPLE, BROWN, LAVENDER = "#3f789e", "#8A8", "#a1309b", "#b58b2a", "#88A"
PREVIEW_TITLES = ("Timestep curves (grey = background)", "Regions at the chosen steps",
                  "Per-pixel timesteps (white = noisy)")


def _previews(curve_img, regions_img, times_img):
    return dict(zip((curve_img, regions_img, times_img), PREVIEW_TITLES))


# group: (title, colour, x, y or "below", columns); a column is a list of ids or ("gap", width)
SPECS = {
    "asyndm_sd15_dynamic_vs_vanilla.json": {
        "note_height": 470, "titles": _previews(13, 14, 15),
        "groups": [
            ("Inputs: model, prompt with targets, size", BLUE, FIRST_X, 0, [[1, 2, 3, 4]]),
            ("AsynDM: the targets' pixels lag behind (dynamic mask)", GREEN, 1000, 0, [[5], [7], [8]]),
            ("Vanilla DDIM: same seed, every pixel on one schedule", LAVENDER, 1000, "below", [[6], [9], [10]]),
            ("What the AsynDM run did", PURPLE, 1000, "below", [[11, 12], [13], [14], [15]]),
        ]},
    "asyndm_sd15_external_mask.json": {
        "note_height": 400, "titles": _previews(13, 14, 15),
        "groups": [
            ("Inputs: model, prompt, size", BLUE, FIRST_X, 0, [[1, 2, 3, 4]]),
            ("The mask: any MASK works", BROWN, NOTE_X, "below", [[5, 6, 7]]),
            ("AsynDM driven by the mask", GREEN, 1000, 0, [[8], [9], [10]]),
            ("What the AsynDM run did", PURPLE, 1000, "below", [[11, 12], [13], [14], [15]]),
        ]},
    "asyndm_sd15_static_extractor.json": {
        "note_height": 420,
        "titles": {10: "Vanilla image (the extractor's run)", 12: "Object masks", 14: "Priority map (k per pixel)"},
        "groups": [
            ("Inputs: model, prompt with targets, size", BLUE, FIRST_X, 0, [[1, 2, 3, 4]]),
            ("1. A vanilla run reads the objects' masks from attention", BROWN, 1000, 0, [[5], [9], [10]]),
            ("The masks it found", BROWN, 1000, "below", [[11, 13], [12], [14]]),
            ("2. AsynDM with those masks held fixed (static)", GREEN, 1000, "below", [[6], [7], [8]]),
        ]},
    "asyndm_sd21_v.json": {
        "note_height": 300, "titles": _previews(10, 11, 12),
        "groups": [
            ("Inputs: SD2.1-v model, prompt with targets, 768 px", BLUE, FIRST_X, 0, [[1, 2, 3, 4]]),
            ("AsynDM (dynamic mask)", GREEN, 1000, 0, [[5], [6], [7]]),
            ("What the AsynDM run did", PURPLE, 1000, "below", [[8, 9], [10], [11], [12]]),
        ]},
    "asyndm_sdxl.json": {
        "note_height": 300, "titles": _previews(10, 11, 12),
        "groups": [
            ("Inputs: SDXL model, prompt with targets, 1024 px", BLUE, FIRST_X, 0, [[1, 2, 3, 4]]),
            ("AsynDM (dynamic mask)", GREEN, 1000, 0, [[5], [6], [7]]),
            ("What the AsynDM run did", PURPLE, 1000, "below", [[8, 9], [10], [11], [12]]),
        ]},
    "asyndm_sd15_hires_fix.json": {
        "note_height": 380, "titles": {9: "Pass 1 (512 px)", 11: "Hires fix (768 px)"},
        "groups": [
            ("Inputs: model, prompt with targets, size", BLUE, FIRST_X, 0, [[1, 2, 3, 4]]),
            ("Pass 1: AsynDM with dpmpp_2m + karras", GREEN, 1000, 0, [[5], [8], [9]]),
            ("Hires fix: upscale, AsynDM again at denoise 0.5", LAVENDER, 1000, "below", [[6, 7], [10], [11]]),
        ]},
    "asyndm_sd15_samplercustom_advanced.json": {
        "note_height": 380, "titles": {},
        "groups": [
            ("Inputs: model, prompt with targets, size", BLUE, FIRST_X, 0, [[1, 2, 3, 4]]),
            ("SamplerCustomAdvanced with the AsynDM Sampler", GREEN, 1000, 0, [[5, 6, 8], [7, 9], [10, 11]]),
        ]},
    "asyndm_sd15_any_sampler.json": {
        "note_height": 400, "titles": {},
        "groups": [
            ("Inputs: model, prompt with targets, size", BLUE, FIRST_X, 0, [[1, 2, 3, 4]]),
            ("SamplerCustomAdvanced with any SAMPLER, made asynchronous", GREEN, 1000, 0,
             [[5, 6, 8], [7, 13, 9], [10, 11]]),
        ]},
    "asyndm_flux_dev.json": {
        "note_height": 380, "titles": {},
        "groups": [
            ("Inputs: Flux dev (UNET, T5 + CLIP-L, VAE), prompt with targets, size", BLUE, FIRST_X, 0,
             [[1, 2, 3], [4, 5, 6, 7]]),
            ("AsynDM on Flux (per-token timesteps)", GREEN, FIRST_X, "below", [[8], [9], [10]]),
        ]},
    "asyndm_chroma.json": {
        "note_height": 380, "titles": {},
        "groups": [
            ("Inputs: Chroma (UNET, T5, VAE), prompt with targets, negative, size", BLUE, FIRST_X, 0,
             [[1, 2, 3], [4, 6, 7]]),
            ("AsynDM on Chroma (per-token timesteps)", GREEN, FIRST_X, "below", [[8], [9], [10]]),
        ]},
    "asyndm_hidream.json": {
        "note_height": 560, "titles": {},
        "groups": [
            ("Inputs: HiDream-I1 (UNET, shift, 4 text encoders, VAE), prompt with targets", BLUE, FIRST_X, 0,
             [[1, 12, 2, 3], [4, 6, 7]]),
            ("AsynDM on HiDream (per-token timesteps)", GREEN, FIRST_X, "below", [[8], [9], [10]]),
        ]},
    "asyndm_wan_t2v.json": {
        "note_height": 560, "titles": {},
        "groups": [
            ("Inputs: Wan (UNET, UMT5, VAE), prompt with targets, negative, video size", BLUE, FIRST_X, 0,
             [[1, 2, 3], [4, 5, 6]]),
            ("AsynDM on Wan (per-token timesteps over frames)", GREEN, FIRST_X, "below", [[7], [8], [9]]),
            ("What the AsynDM run did (frames stacked top to bottom)", PURPLE, FIRST_X, "below", [[10], [11], [12]]),
        ]},
    "asyndm_qwen_image.json": {
        "note_height": 470, "titles": {},
        "groups": [
            ("Inputs: Qwen-Image (UNET, Qwen2.5-VL, VAE), shift, prompt with targets, negative, size", BLUE,
             FIRST_X, 0, [[1, 2, 3], [4, 5, 6, 7]]),
            ("AsynDM on Qwen-Image (per-token timesteps)", GREEN, FIRST_X, "below", [[8], [9], [10]]),
            ("What the AsynDM run did", PURPLE, FIRST_X, "below", [[11], [12], [13]]),
        ]},
    "asyndm_chroma_radiance.json": {
        "note_height": 500, "titles": {},
        "groups": [
            ("Inputs: Chroma Radiance (UNET, T5, pixel-space VAE), prompt with targets, negative, size", BLUE,
             FIRST_X, 0, [[1, 2, 3], [4, 5, 6]]),
            ("AsynDM on Chroma Radiance (per-token timesteps in pixel space)", GREEN, FIRST_X, "below",
             [[7], [8], [9]]),
            ("What the AsynDM run did (at the image's size)", PURPLE, FIRST_X, "below", [[10], [11], [12]]),
        ]},
    "asyndm_hunyuan_image.json": {
        "note_height": 560, "titles": {},
        "groups": [
            ("Inputs: HunyuanImage 2.1 (UNET, Qwen2.5-VL + byT5, VAE), prompt with targets, negative, size", BLUE,
             FIRST_X, 0, [[1, 2, 3], [4, 5, 6]]),
            ("AsynDM on HunyuanImage 2.1 (per-token timesteps)", GREEN, FIRST_X, "below", [[7], [8], [9]]),
            ("What the AsynDM run did (at the image's size)", PURPLE, FIRST_X, "below", [[10], [11], [12]]),
        ]},
    "asyndm_wan22_t2v.json": {
        "note_height": 760, "titles": {},
        "groups": [
            ("Inputs: Wan 2.2's two experts (shift 8), UMT5, VAE, prompt with targets, negative, video size", BLUE,
             FIRST_X, 0, [[1, 2, 3, 4], [5, 6, 7, 8, 9]]),
            ("AsynDM over two experts: one per-token plan, split at step 10", GREEN, FIRST_X, "below",
             [[10], [11], [12], [13]]),
            ("What the AsynDM run did (both passes; frames stacked top to bottom)", PURPLE, FIRST_X, "below",
             [[14], [15], [16]]),
        ]},
    "asyndm_lumina2.json": {
        "note_height": 480, "titles": {},
        "groups": [
            ("Inputs: Lumina 2 checkpoint (NextDiT, Gemma 2 2B, VAE), prompt with targets, negative, size", BLUE,
             FIRST_X, 0, [[1], [2, 3, 4]]),
            ("AsynDM on Lumina 2 (per-token timesteps)", GREEN, FIRST_X, "below", [[5], [6], [7]]),
        ]},
    "asyndm_sd35.json": {
        "note_height": 380, "titles": {},
        "groups": [
            ("Inputs: SD3.5 checkpoint, CLIP-L/G + T5, prompt with targets, size", BLUE, FIRST_X, 0,
             [[1, 2], [3, 4, 5]]),
            ("AsynDM on SD3.5 (per-token timesteps)", GREEN, FIRST_X, "below", [[6], [7], [8]]),
        ]},
    "asyndm_sdxl_vs_flux.json": {
        "note_height": 380, "titles": {},
        "groups": [
            ("SDXL: the paper's configuration", LAVENDER, FIRST_X, 0, [[1, 2, 3, 4], [5], [6, 7]]),
            ("Flux dev: the same prompt and targets", GREEN, FIRST_X, "below",
             [[11, 12, 13], [14, 15, 16, 17], [18], [19, 20]]),
        ]},
    "fpdm_class_to_image.json": {
        "note_height": 330, "titles": {},
        "groups": [
            ("Model: FPDM checkpoint, fixed-point settings, VAE", BLUE, FIRST_X, 0, [[1, 6], [2]]),
            ("Class and size", BLUE, FIRST_X, "below", [[3, 4]]),
            ("Sample and decode", GREEN, 1320, 0, [[5], [7], [8]]),
        ]},
    "fpdm_same_budget.json": {
        "note_height": 330, "titles": {},
        "groups": [
            ("Inputs", BLUE, FIRST_X, 0, [[1, 2, 3, 4]]),
            ("fixed: 8 iterations at every step", LAVENDER, 1000, 0, [[5], [6], [7], [8]]),
            ("increasing: more iterations early, fewer late", GREEN, 1000, "below", [[9], [10], [11], [12]]),
            ("fixed + reuse of the previous step's solution", PURPLE, 1000, "below", [[13], [14], [15], [16]]),
        ]},
    "fpdm_vs_dit.json": {
        "note_height": 330, "titles": {},
        "groups": [
            ("Inputs: class, size, VAE", BLUE, NOTE_X, "below", [[4, 5, 6]]),
            ("FPDM: fixed-point DiT", GREEN, FIRST_X, 0, [[1], [3], [7], [9], [10]]),
            ("Plain DiT: the same sampler, no fixed point", LAVENDER, FIRST_X, "below",
             [[2], ("gap", 320), [8], [11], [12]]),
        ]},
}


def _size(node):
    pw, ph = PREFERRED.get(node["type"], node["size"])
    mw, mh = MIN_SIZES.get(node["type"], (0, 0))
    return [max(pw, mw, node["size"][0]), max(ph, mh)]


def _place_group(nodes, columns, x0, y0):
    """Positions for one group's columns from (x0, y0); returns the group's [x, y, w, h]."""
    x, bottom = x0 + PAD, y0 + HEAD
    for col in columns:
        if isinstance(col, tuple):  # ("gap", width): keeps columns of two groups aligned
            x += col[1] + HGAP
            continue
        y, width = y0 + HEAD, 0
        for i in col:
            node = nodes[i]
            node["size"] = _size(node)
            node["pos"] = [x, y + TITLE]
            y += TITLE + node["size"][1] + ROOM_BELOW.get(node["type"], 0) + VGAP
            width = max(width, node["size"][0])
        bottom = max(bottom, y - VGAP)
        x += width + HGAP
    return [x0, y0, x - HGAP + PAD - x0, bottom + PAD - y0]


def _overlaps_x(a, x0, x1):
    return a[0] < x1 and x0 < a[0] + a[2]


def lay_out(path, spec):
    raw = path.read_text()
    indent = len(raw.splitlines()[1]) - len(raw.splitlines()[1].lstrip())  # keep the file's style
    wf = json.loads(raw)
    nodes = {n["id"]: n for n in wf["nodes"]}
    note = next(n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote"))
    note["pos"], note["size"] = [NOTE_X, TITLE], [NOTE_W, spec["note_height"]]
    placed = [[NOTE_X, 0, NOTE_W, TITLE + spec["note_height"]]]
    groups = []
    for k, (title, color, x, y, columns) in enumerate(spec["groups"]):
        if y == "below":  # under whatever is already placed in the columns this group spans
            probe = _place_group(nodes, columns, x, 0)
            y = max(b[1] + b[3] for b in placed if _overlaps_x(b, x, x + probe[2])) + GROUP_GAP
        box = _place_group(nodes, columns, x, y)
        placed.append(box)
        groups.append({"id": k + 1, "title": title, "bounding": box, "color": color, "font_size": 24, "flags": {}})
    laid = {note["id"]} | {i for g in spec["groups"] for col in g[4] if isinstance(col, list) for i in col}
    missing = sorted(set(nodes) - laid)
    assert not missing, f"{path.name}: nodes {missing} are in no group"
    for i, title in spec["titles"].items():
        nodes[i]["title"] = title
    wf["groups"] = groups
    path.write_text(json.dumps(wf, indent=indent, ensure_ascii=False) + "\n")


def main():
    for name, spec in SPECS.items():
        lay_out(ROOT / "workflows" / name, spec)
        print("laid out", name)


if __name__ == "__main__":
    main()
