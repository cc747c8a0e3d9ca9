"""The shipped AsynDM workflows validate and execute through ComfyUI's executor (tiny stand-ins,
64 px) for short and long runs, and do what their notes say. Only the samplers' steps change,
as a user lowering them on a slow machine would: every other widget stays as shipped."""

import pathlib

import pytest
import torch

import comfy_workflows as cw
from numeric import FAR_ABOVE_ROUNDOFF, assert_differs
from png_content import assert_mask_steps_preview_shows

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("asyndm_*.json"))
SAMPLERS = {"AsynDMKSampler", "AsynDMKSamplerAdvanced", "AsynDMMaskExtractor", "KSampler", "BasicScheduler"}
NO_END = 10000  # the Advanced sampler's end_at_step "to the end"
STEPS = (1, 3, 7, 20)


def _api(path, steps):
    api = cw.ui_to_api_prompt(cw.load_ui_workflow(path))
    cw.shrink_prompt(api, size=64)
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] in SAMPLERS:
            inputs["steps"] = steps
        if node["class_type"] == "AsynDMKSamplerAdvanced":  # a split run (Wan 2.2's experts): split halfway
            split = (steps + 1) // 2
            inputs["start_at_step"] = split if inputs["start_at_step"] > 0 else 0
            inputs["end_at_step"] = split if inputs["end_at_step"] < NO_END else NO_END
        if node["class_type"] == "MaskComposite":  # keep the painted square inside the shrunk canvas
            inputs["x"], inputs["y"] = 16, 16
    return api


def _by_type(result, class_type):
    return {k: result.outputs[k] for k, v in result.prompt.items() if v["class_type"] == class_type and k in result.outputs}


def test_asyndm_workflows_shipped():
    names = {p.name for p in WORKFLOWS}
    assert {"asyndm_sd15_dynamic_vs_vanilla.json", "asyndm_sd15_static_extractor.json",
            "asyndm_sd15_external_mask.json", "asyndm_sd21_v.json", "asyndm_sdxl.json"} <= names


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_asyndm_workflow_executes(comfy_env, pack_nodes, stand_ins, path, steps):
    from asyndm_fpdm.samplers.comfyui.previews import PALETTE, pick_steps

    result = cw.run_workflow(_api(path, steps))
    classes = comfy_env.nodes.NODE_CLASS_MAPPINGS
    outs = [k for k, v in result.prompt.items() if getattr(classes[v["class_type"]], "OUTPUT_NODE", False)]
    assert outs and all(k in result.outputs for k in outs)
    samplers = _by_type(result, "AsynDMKSampler")
    advanced = _by_type(result, "AsynDMKSamplerAdvanced")
    custom = _by_type(result, "SamplerCustomAdvanced")  # with the AsynDM Sampler
    assert samplers or custom or advanced
    for k, (lat, run) in advanced.items():  # each pass's record: the whole run up to its end step
        assert len(run.timestep_maps) == min(steps, result.prompt[k]["inputs"]["end_at_step"])
        assert lat["samples"].shape[:2] == (1, 16) and torch.isfinite(lat["samples"]).all()
    latents = {k: v[0]["samples"] for k, v in samplers.items()}
    for lat in list(latents.values()) + [v[0]["samples"] for v in custom.values()]:
        # 16 channels: Flux / SD3; 12x12: the hires-fix pass (the 8x8 latent upscaled 1.5x); the
        # 64 px image itself: Chroma Radiance (pixel space); 64 channels at 1/32: HunyuanImage 2.1
        assert lat.shape[0] == 1 and ((lat.shape[1] in (4, 16) and lat.shape[-2:] in ((8, 8), (12, 12)))
                                      or (lat.shape[1], *lat.shape[-2:]) in ((3, 64, 64), (64, 2, 2)))
        assert torch.isfinite(lat).all()
    modes = {k: result.prompt[k]["inputs"]["mode"] for k in latents}
    # AsynDM beside vanilla with the same seed: different images (one step takes every pixel from
    # noise to clean at once, so nothing can lag and the two agree)
    if "vanilla" in modes.values() and steps > 1:
        a = next(latents[k] for k, m in modes.items() if m == "AsynDM")
        v = next(latents[k] for k, m in modes.items() if m == "vanilla")
        assert_differs(a, v, FAR_ABOVE_ROUNDOFF, "AsynDM vs vanilla of the same seed")
    for k, (lat, run) in samplers.items():
        assert len(run.timestep_maps) == steps
    for k, outs_ in _by_type(result, "AsynDMMaskExtractor").items():
        items, prio, soft, vlat, run = outs_
        assert items.shape[-2:] == (64, 64) and prio.shape == (1, 64, 64)
    for k, (img,) in _by_type(result, "AsynDMCurvePreview").items():
        assert img.ndim == 4 and img.shape[-1] == 3
    previews = _by_type(result, "AsynDMMaskStepsPreview")
    for k, (regions, times) in previews.items():
        inputs = result.prompt[k]["inputs"]
        shown, clamped, _ = pick_steps(inputs["at_steps"], steps)
        # a video's maps show its frames stacked top to bottom
        assert regions.shape == times.shape and regions.shape[0] == len(shown) and regions.shape[2:] == (64, 3)
        assert regions.shape[1] % 64 == 0
        run = result.outputs[inputs["run"][0]][inputs["run"][1]]  # the run wired into the preview
        if run.masks[0] is not None and not clamped:  # (clamped frames carry a red border)
            # (the scale per model family is pinned in test_asyndm_transformers / test_asyndm_comfy)
            assert_mask_steps_preview_shows(regions, times, run, shown, inputs.get("image_index", 0), PALETTE,
                                            max_t=run.max_timestep)
    has_preview = any(v["class_type"] == "AsynDMMaskStepsPreview" for v in result.prompt.values())
    assert bool(previews) == has_preview


def test_old_saved_workflows_keep_loading(comfy_env, pack_nodes, stand_ins):
    """A workflow saved before the preview's step list was renamed from "steps" to "at_steps":
    UI files store widget values by position, so the old file maps onto the new name."""
    import json

    ui = json.loads((ROOT / "workflows" / "asyndm_sd15_dynamic_vs_vanilla.json").read_text())
    preview = next(n for n in ui["nodes"] if n["type"] == "AsynDMMaskStepsPreview")
    # as the front end saved it then: the widget's socket under its old name
    preview["inputs"].append({"name": "steps", "type": "STRING", "widget": {"name": "steps"}, "link": None})
    preview["widgets_values"] = ["0, 10, 25, 49", 0]  # the list shipped for 50 steps
    api = cw.ui_to_api_prompt(ui)
    cw.shrink_prompt(api, size=64)
    for node in api.values():
        if node["class_type"] in SAMPLERS:
            node["inputs"]["steps"] = 4
    pid = next(k for k, v in api.items() if v["class_type"] == "AsynDMMaskStepsPreview")
    assert api[pid]["inputs"]["at_steps"] == "0, 10, 25, 49"
    regions, times = cw.run_workflow(api).outputs[pid]
    assert times.shape == (2, 64, 64, 3)  # steps 0 and 3 (10, 25 and 49 past the end: the last step)
    # an API-format prompt of that time names the list "steps"
    api[pid]["inputs"]["steps"] = api[pid]["inputs"].pop("at_steps")
    regions, times = cw.run_workflow(api).outputs[pid]
    assert times.shape == (2, 64, 64, 3)
    api[pid]["inputs"]["steps"] = "0, ten"  # a list that is no list: refused when queued, with the fix
    checked = cw.validate_prompt(api, create_files=False)
    assert "'ten' is not a step" in cw.format_node_errors(checked.node_errors)
