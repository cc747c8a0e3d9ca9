"""ComfyUI-free checks of the AsynDM nodes: schemas, tooltips, option parsing, masks, token
location with a stand-in tokenizer, preview renderings."""

import json
import pathlib

import pytest
import torch

from asyndm_fpdm.nodes import asyndm_nodes
from asyndm_fpdm.nodes.common import CATEGORY_ASYNDM
from asyndm_fpdm.samplers.comfyui import previews
from asyndm_fpdm.samplers.comfyui import conditioning
from asyndm_fpdm.samplers.comfyui import tokens as comfy_tokens
from asyndm_fpdm.samplers.engine import RunRecord
from asyndm_fpdm.samplers.tokens import UnknownWordError
from png_content import assert_curves_drawn, assert_mask_steps_preview_shows, mean_timesteps

ROOT = pathlib.Path(__file__).resolve().parents[1]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def test_asyndm_node_schemas_have_tooltips_and_category():
    assert set(asyndm_nodes.NODE_CLASS_MAPPINGS) == set(asyndm_nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in asyndm_nodes.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == CATEGORY_ASYNDM
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for inp, (kind, *opts) in spec.get(section, {}).items():
                assert opts and opts[0].get("tooltip"), f"{name}.{inp} has no tooltip"
                if isinstance(kind, list):
                    assert opts[0].get("default", kind[0]) in kind
        assert callable(getattr(cls, cls.FUNCTION))
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES)


def test_asyndm_sampler_options():
    spec = asyndm_nodes.NODE_CLASS_MAPPINGS["AsynDMKSampler"].INPUT_TYPES()["required"]
    assert spec["mode"][0] == ["AsynDM", "DMconcave", "vanilla"]
    assert spec["mask_source"][0] == ["dynamic", "static", "mask input"]
    assert spec["curve"][0] == ["bin", "lin", "exp"]


def test_asyndm_parse_and_resolve_strengths():
    assert conditioning.parse_ks(" 0.7, 0.5 ,") == [0.7, 0.5]
    assert conditioning.parse_ks("") == []
    with pytest.raises(ValueError, match="not a number"):
        conditioning.parse_ks("high")
    with pytest.raises(ValueError, match="outside"):
        conditioning.parse_ks("1.5")
    t = conditioning.Targets(["a", "b"], [0.7, 0.5], [[2], [4]], 77)
    assert conditioning.resolve_ks(t, []) == [0.7, 0.5]
    assert conditioning.resolve_ks(t, [0.3]) == [0.3, 0.3]
    assert conditioning.resolve_ks(t, [0.1, 0.2]) == [0.1, 0.2]
    with pytest.raises(ValueError, match="one per target"):
        conditioning.resolve_ks(t, [0.1, 0.2, 0.3])
    assert conditioning.resolve_ks(None, [0.4]) == [0.4]


def test_asyndm_targets_ride_on_conditioning():
    info = {"words": ["rabbit"], "ks": [0.6], "positions": [[2]], "context_len": 77}
    cond = [[torch.zeros(1, 77, 8), {"pooled_output": None}], [torch.zeros(1, 77, 8), {"asyndm_targets": info}]]
    t = conditioning.targets_of(cond)
    assert t.words == ["rabbit"] and t.ks == [0.6] and t.anchors == [2]
    assert conditioning.targets_of([[torch.zeros(1), {}]]) is None


def test_asyndm_external_masks_layouts():
    f = conditioning.external_item_masks
    assert f(torch.ones(64, 64), 2, 3).shape == (1, 1, 64, 64)
    assert f(torch.ones(3, 64, 64), 2, 3).shape == (3, 1, 64, 64)
    assert f(torch.ones(2, 64, 64), 2, 3).shape == (1, 2, 64, 64)
    assert f(torch.ones(6, 64, 64), 2, 3).shape == (3, 2, 64, 64)
    with pytest.raises(ValueError, match="frames"):
        f(torch.ones(5, 64, 64), 2, 3)


class _Tok:
    start_token, end_token = 100, 101
    inv_vocab = {100: "<|startoftext|>", 101: "<|endoftext|>", 1: "a</w>", 2: "rab", 3: "bit</w>", 4: "cat</w>",
                 5: "jack"}


class _Clip:
    """Stand-in for comfy.sd.CLIP: a word-level tokenizer, 6-token chunks."""

    words = {"a": [1], "rabbit": [2, 3], "cat": [4], "jackrabbit": [5, 2, 3]}

    def __init__(self):
        self.tokenizer = type("T", (), {"clip_l": _Tok()})()

    def tokenize(self, text):
        ids = [i for w in text.replace("(", " ").replace(")", " ").split() for i in self.words.get(w.split(":")[0], [])]
        chunks, size = [], 4
        for s in range(0, max(len(ids), 1), size):
            body = ids[s:s + size]
            chunk = [100] + body + [101] * (size + 2 - 1 - len(body))
            chunks.append([(i, 1.0) for i in chunk])
        return {"l": chunks}


def test_asyndm_locate_targets_with_stand_in_tokenizer():
    clip = _Clip()
    info = comfy_tokens.locate_targets(clip, "a (rabbit:1.2) a cat cat", "rabbit:0.6, cat, cat#2:0.9")
    assert info["positions"][0] == [2, 3]  # a word split in two tokens
    assert info["positions"][1] == [7, 8]  # every appearance, in the second chunk (after its start token)
    assert info["positions"][2] == [8]
    assert info["ks"] == [0.6, 0.7, 0.9] and info["context_len"] == 12
    with pytest.raises(UnknownWordError, match="rab bit"):
        comfy_tokens.locate_targets(clip, "a rabbit", "cat")
    # the word's ids run inside a longer word: not the word (caught: the id fallback unchecked)
    with pytest.raises(UnknownWordError, match="not in the prompt"):
        comfy_tokens.locate_targets(clip, "a jackrabbit", "rabbit")
    assert comfy_tokens.locate_targets(clip, "a jackrabbit rabbit", "rabbit")["positions"] == [[7, 8]]  # 2nd chunk
    assert comfy_tokens.split_occurrence("cat#2") == ("cat", 1)
    assert comfy_tokens.split_occurrence("C#") == ("C#", -1)


class _PieceClip:
    """Stand-in for a sentencepiece CLIP (T5-like: '▁' marks a space, no start token): a fixed
    segmentation of one prompt, as T5 splits quoted text ('▁"', 'O', 'PEN', '"')."""

    pieces = {"a": [1], "sign": [2], '"OPEN"': [3, 4, 5, 6], "OPEN": [7], "rabbit": [8], '"rabbit"': [3, 9, 10, 6],
              "jackrabbit": [11, 9, 10], "\u4e2d": [12]}

    def __init__(self):
        inv = {1: "\u2581a", 2: "\u2581sign", 3: '\u2581"', 4: "O", 5: "PEN", 6: '"', 7: "\u2581OPEN",
               8: "\u2581rabbit", 9: "rab", 10: "bit", 11: "\u2581jack", 12: "<unk>", 0: "</s>"}
        self.tokenizer = type("T", (), {"t5xxl": type("S", (), {"inv_vocab": inv, "end_token": 0})()})()

    def tokenize(self, text):
        return {"t5xxl": [[(i, 1.0) for w in text.split() for i in self.pieces[w]] + [(0, 1.0)]]}


def test_asyndm_locate_targets_by_spelling_finds_quoted_words_and_whole_words_only():
    """Positions by hand for a sentencepiece-style stand-in. Caught: the word's own ids alone
    ('▁OPEN' is not in the quoted prompt); no word boundary ('rabbit' inside 'jackrabbit')."""
    clip = _PieceClip()
    info = comfy_tokens.locate_targets(clip, 'a sign "OPEN" jackrabbit "rabbit" \u4e2d', "OPEN, rabbit, \u4e2d")
    # a(0) sign(1) ▁"(2) O(3) PEN(4) "(5) ▁jack rab bit(6-8) ▁" rab bit "(9-12) <unk>(13) </s>(14)
    assert info["positions"] == [[3, 4], [10, 11], [13]]  # '<unk>': its own id, as the word tokenizes
    assert info["context_len"] == 15
    with pytest.raises(UnknownWordError, match="not in the prompt"):
        comfy_tokens.locate_targets(clip, "a jackrabbit", "rabbit")


def test_asyndm_preview_steps_follow_the_run():
    pick = previews.pick_steps
    assert pick("", 10) == ([0, 3, 6, 9], [], []) and pick("", 3) == ([0, 1, 2], [], []) and pick("", 1)[0] == [0]
    assert pick("0, -1, -2", 10)[0] == [0, 9, 8]
    assert pick("0.0, 0.5, 1.0", 11)[0] == [0, 5, 10] and pick("50%", 11)[0] == [5]
    assert pick("0, 0.5, -1", 1)[0] == [0]  # repeats shown once
    steps, clamped, notes = pick("0, 10, 25, 49", 4)  # a list written for 50 steps, a 4-step run
    assert steps == [0, 3] and clamped == [3]
    assert len(notes) == 3 and "step 10 is outside the run's 4 steps (0..3): showing step 3" in notes[0]
    steps, clamped, notes = pick("-7, 1.5", 5)
    assert steps == [0, 4] and clamped == [0, 4] and "fraction 1.5" in notes[1]
    assert pick("2, 10", 20) == ([2, 10], [], [])
    with pytest.raises(ValueError, match="'half' is not a step.*'0, 0.5, -1'"):
        pick("0, half", 10)


def test_asyndm_mask_steps_preview_never_fails_on_a_short_run(caplog):
    node = asyndm_nodes.NODE_CLASS_MAPPINGS["AsynDMMaskStepsPreview"]()
    spec = node.INPUT_TYPES()
    assert "steps" not in {**spec["required"], **spec["optional"]}, "a step list must not look like a step count"
    assert list(spec["optional"])[:2] == ["at_steps", "image_index"]  # widget order of saved workflows
    assert node.VALIDATE_INPUTS("0, 0.25, -1") is True and node.VALIDATE_INPUTS("") is True
    assert "is not a step" in node.VALIDATE_INPUTS("0; 10")
    for total in (1, 3, 7, 20):
        maps = [torch.full((2, 4, 4), 1000 - 50 * i) for i in range(total)]
        masks = [torch.zeros(2, 1, 4, 4) for _ in range(total)]
        run = RunRecord(ks=[0.7], words=["cat"], timestep_maps=maps, masks=masks, item_maps=[])
        for text in ("", "0, 0.25, 0.5, -1", "0, 10, 25, 49"):
            regions, times = node.preview(run, text, 5)  # image 5 of a batch of 2: the last one
            chosen, clamped, _ = previews.pick_steps(text, total)
            assert regions.shape == times.shape == (len(chosen), 32, 32, 3)
            for f, i in enumerate(chosen):
                border = bool((times[f, 0, :, 0] > 0.9).all() and (times[f, 0, :, 1] < 0.2).all())
                assert border == (i in clamped), (total, text, i)
                assert torch.equal(times[f, 16, 16], (maps[i][1, 0, 0].float() / 1001.0).expand(3))  # image 1, step i
    assert "outside the run's 3 steps" in caplog.text and "outside the batch of 2" in caplog.text
    # an API prompt written before the rename still says "steps"
    assert node.preview(run, steps="0, -1")[1].shape[0] == 2 and node.VALIDATE_INPUTS(steps="0, x") is not True


def test_asyndm_previews_take_the_image_scale_of_the_latent_format():
    """Previews enlarge a run's maps by the image pixels per latent pixel: what a latent format
    declares (later ComfyUI: ``spacial_downscale_ratio``), ComfyUI 0.3.64's pixel-space and 32×
    formats by name (also through a subclass), 8 otherwise; never an error. A run that ran no step
    previews as a blank frame with a warning (a cosmetic node must not fail the run); a video's stacked
    frames shrink to 4096 px (broken variant caught: the scale uncapped, 20160 px tall)."""
    from asyndm_fpdm.samplers.comfyui.sampler import image_scale

    def fmt(name, **attrs):
        return type(name, (), attrs)()

    class HunyuanImage21:
        pass

    assert image_scale(fmt("ChromaRadiance")) == 1 and image_scale(HunyuanImage21()) == 32
    assert image_scale(type("Tuned", (HunyuanImage21,), {})()) == 32
    assert image_scale(fmt("SDXL")) == 8 and image_scale(None) == 8
    assert image_scale(fmt("ChromaRadiance", spacial_downscale_ratio=16)) == 16
    assert image_scale(fmt("Odd", spacial_downscale_ratio="x")) == 8
    maps = [torch.full((1, 3, 2), 500.0)]
    masks = [torch.zeros(1, 1, 3, 2)]
    masks[0][0, 0, 1] = 1
    run = RunRecord(ks=[0.7], timestep_maps=maps, masks=masks, image_scale=1)
    regions, times = asyndm_nodes.NODE_CLASS_MAPPINGS["AsynDMMaskStepsPreview"]().preview(run, "0", 0)
    assert regions.shape == times.shape == (1, 3, 2, 3)
    assert_mask_steps_preview_shows(regions, times, run, [0], 0, previews.PALETTE)
    regions, times = asyndm_nodes.NODE_CLASS_MAPPINGS["AsynDMMaskStepsPreview"]().preview(RunRecord(), "0, -1", 0)
    assert regions.shape == times.shape == (1, 64, 64, 3)
    # a video's frames stack along the height: 21 latent frames of 60 × 104 at Wan 2.2's 16× would be
    # 20160 px tall; the frame shrinks to the largest whole scale within 4096 px (3), an image keeps its size
    node = asyndm_nodes.NODE_CLASS_MAPPINGS["AsynDMMaskStepsPreview"]()
    tall = RunRecord(ks=[0.7], timestep_maps=[torch.full((1, 21 * 60, 104), 500.0)], masks=[None], image_scale=16)
    assert node.preview(tall, "0", 0)[1].shape == (1, 21 * 60 * 3, 104 * 3, 3)
    wide = RunRecord(ks=[0.7], timestep_maps=[torch.full((1, 64, 64), 500.0)], masks=[None], image_scale=32)
    assert node.preview(wide, "0", 0)[1].shape == (1, 2048, 2048, 3)


def test_asyndm_previews_show_the_run():
    """The "Masks at Steps" frames show the run's masks and timestep maps of the chosen image at the
    chosen steps, and "Timestep Curves" draws the mean timestep of the background and of each item.

    Broken variants caught: regions of the first image of the batch (``m[0]`` in ``region_images``),
    gray levels over 1000 instead of 1001 (``max_t=1000.0``), and curves averaged over all pixels."""
    gen = torch.Generator().manual_seed(0)
    steps, batch, h, w = 5, 2, 6, 5
    maps = [torch.randint(0, 1000, (batch, h, w), generator=gen) for _ in range(steps)]
    masks = [(torch.rand(batch, 2, h, w, generator=gen) > 0.6).float() for _ in range(steps)]
    run = RunRecord(ks=[0.7, 0.5], words=["cat", "dog"], timestep_maps=maps, masks=masks, item_maps=[])
    regions, times = asyndm_nodes.NODE_CLASS_MAPPINGS["AsynDMMaskStepsPreview"]().preview(run, "0, 2, -1", 1)
    assert regions.shape == times.shape == (3, h * 8, w * 8, 3)
    assert_mask_steps_preview_shows(regions, times, run, [0, 2, 4], 1, previews.PALETTE)
    (img,) = asyndm_nodes.NODE_CLASS_MAPPINGS["AsynDMCurvePreview"]().plot(steps, "bin", "0.7, 0.5", run=run)
    assert_curves_drawn(img[0], mean_timesteps(run), previews.PALETTE)


def test_asyndm_plots_shapes():
    img = previews.curves_image([[981, 500, 1], [1000, 800, 2]], 2)
    assert img.shape == (1, 256, 384, 3) and 0 <= float(img.min()) and float(img.max()) <= 1
    tmaps = [torch.full((2, 4, 4), v) for v in (900, 500, 100)]
    masks = [torch.zeros(2, 1, 4, 4) for _ in range(3)]
    for m in masks:
        m[:, 0, :2] = 1
    series = previews.mean_curves(tmaps, masks, 1)
    assert series[0] == [900.0, 500.0, 100.0] and series[1] == [900.0, 500.0, 100.0]
    assert previews.region_images(masks, [0, 2], 1).shape == (2, 32, 32, 3)
    assert previews.timestep_images(tmaps, [1], 0).shape == (1, 32, 32, 3)


def test_asyndm_preview_node_plots_theoretical_curves():
    node = asyndm_nodes.NODE_CLASS_MAPPINGS["AsynDMCurvePreview"]()
    (img,) = node.plot(20, "bin", "0.3, 0.9", run=None)
    assert img.shape == (1, 256, 384, 3)


@pytest.mark.parametrize("path", sorted(ROOT.glob("workflows/asyndm_*.json")), ids=lambda p: p.name)
def test_asyndm_workflow_files_are_ui_format(path):
    wf = json.loads(path.read_text())
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in wf, f"{path.name} lacks {key}"
    ids = {n["id"] for n in wf["nodes"]}
    assert max(ids) <= wf["last_node_id"] and max(l[0] for l in wf["links"]) <= wf["last_link_id"]
    for link in wf["links"]:
        lid, a, a_slot, b, b_slot, kind = link
        assert a in ids and b in ids
        src = next(n for n in wf["nodes"] if n["id"] == a)
        dst = next(n for n in wf["nodes"] if n["id"] == b)
        assert lid in src["outputs"][a_slot]["links"] and dst["inputs"][b_slot]["link"] == lid
        assert src["outputs"][a_slot]["type"] == kind
    assert any(n["type"] in ("Note", "MarkdownNote") for n in wf["nodes"]), "each workflow explains itself"
    for n in wf["nodes"]:
        if n["type"] in asyndm_nodes.NODE_CLASS_MAPPINGS:
            types_ = asyndm_nodes.NODE_CLASS_MAPPINGS[n["type"]].INPUT_TYPES()
            spec = {**types_["required"], **types_.get("optional", {})}
            widgets = [k for k, v in spec.items() if isinstance(v[0], list) or v[0] in WIDGET_TYPES]
            extra = 1 if "seed" in spec else 0  # "control after generate"
            assert len(n["widgets_values"]) == len(widgets) + extra, n["type"]
        if n["type"] == "AsynDMMaskStepsPreview":  # the list fits any run the sampler allows
            for total in range(1, 151):
                steps, clamped, _ = previews.pick_steps(n["widgets_values"][0], total)
                assert steps and not clamped, (path.name, total)
