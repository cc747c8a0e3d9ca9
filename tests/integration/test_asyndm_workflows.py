"""The shipped AsynDM workflows validate and execute through ComfyUI's executor (tiny stand-ins,
64 px, 3 steps) and do what their notes say."""

import pathlib

import pytest
import torch

import comfy_workflows as cw

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("asyndm_*.json"))
STEPS = 3


def _api(path):
    api = cw.ui_to_api_prompt(cw.load_ui_workflow(path))
    cw.shrink_prompt(api, size=64)
    for node in api.values():
        inputs = node["inputs"]
        if isinstance(inputs.get("steps"), int):
            inputs["steps"] = STEPS
        if node["class_type"] == "AsynDMCurvePreview":
            inputs["steps"] = STEPS
        if node["class_type"] == "AsynDMMaskStepsPreview":
            inputs["steps"] = "0, -1"
        if node["class_type"] == "MaskComposite":  # keep the painted square inside the shrunk canvas
            inputs["x"], inputs["y"] = 16, 16
    return api


def _by_type(result, class_type):
    return {k: result.outputs[k] for k, v in result.prompt.items() if v["class_type"] == class_type and k in result.outputs}


def test_asyndm_workflows_shipped():
    names = {p.name for p in WORKFLOWS}
    assert {"asyndm_sd15_dynamic_vs_vanilla.json", "asyndm_sd15_static_extractor.json",
            "asyndm_sd15_external_mask.json", "asyndm_sd21_v.json", "asyndm_sdxl.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_asyndm_workflow_executes(comfy_env, pack_nodes, stand_ins, path):
    result = cw.run_workflow(_api(path))
    classes = comfy_env.nodes.NODE_CLASS_MAPPINGS
    outs = [k for k, v in result.prompt.items() if getattr(classes[v["class_type"]], "OUTPUT_NODE", False)]
    assert outs and all(k in result.outputs for k in outs)
    samplers = _by_type(result, "AsynDMKSampler")
    assert samplers
    latents = {k: v[0]["samples"] for k, v in samplers.items()}
    for lat in latents.values():
        assert lat.shape[0] == 1 and lat.shape[1] in (4, 16) and lat.shape[-2:] == (8, 8)  # 16: Flux / SD3
        assert torch.isfinite(lat).all()
    modes = {k: result.prompt[k]["inputs"]["mode"] for k in latents}
    if "vanilla" in modes.values():  # AsynDM beside vanilla with the same seed: different images
        a = next(latents[k] for k, m in modes.items() if m == "AsynDM")
        v = next(latents[k] for k, m in modes.items() if m == "vanilla")
        assert float((a - v).abs().max()) > 1e-4
    for k, (lat, run) in samplers.items():
        assert len(run.timestep_maps) == STEPS
    for k, outs_ in _by_type(result, "AsynDMMaskExtractor").items():
        items, prio, soft, vlat, run = outs_
        assert items.shape[-2:] == (64, 64) and prio.shape == (1, 64, 64)
    for k, (img,) in _by_type(result, "AsynDMCurvePreview").items():
        assert img.ndim == 4 and img.shape[-1] == 3
    for k, (regions, times) in _by_type(result, "AsynDMMaskStepsPreview").items():
        assert regions.shape == (2, 64, 64, 3) and times.shape == (2, 64, 64, 3)
