"""The pack inside a real ComfyUI (COMFYUI_PATH): loading, registration, shipped workflows, harness.

Parametrised over whatever nodes and workflows exist when the tests are collected, so the suite
grows with the pack. Skipped as a whole without COMFYUI_PATH (see conftest.py).
"""

import pathlib

import pytest

import asyndm_fpdm
import comfy_workflows as cw

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
PACK_NODE_NAMES = sorted(asyndm_fpdm.NODE_CLASS_MAPPINGS)
CATEGORY_ROOT = "AsynDM & FPDM"
# comfy_extras files that need optional packages a CPU test machine may lack: torchaudio (audio),
# spandrel (needs torchvision), kornia (canny, morphology). Anything else failing to import means a
# required package is missing (README: integration tests).
OPTIONAL_EXTRAS = {"nodes_audio.py", "nodes_audio_encoder.py", "nodes_upscale_model.py",
                   "nodes_canny.py", "nodes_morphology.py"}


# ---------------------------------------------------------------- ComfyUI itself
def test_comfyui_started_with_core_and_extra_nodes(comfy_env):
    mappings = comfy_env.nodes.NODE_CLASS_MAPPINGS
    for name in ("CheckpointLoaderSimple", "KSampler", "CLIPTextEncode", "VAEDecode", "SaveImage",
                 "SamplerCustom", "KSamplerSelect", "BasicScheduler", "SolidMask", "LoraLoader"):
        assert name in mappings, f"core node {name} missing from ComfyUI's registry"
    unexpected = set(comfy_env.extras_import_failed) - OPTIONAL_EXTRAS
    assert not unexpected, f"comfy_extras failed to import (missing requirement?): {sorted(unexpected)}"
    assert comfy_env.folder_paths.get_output_directory().startswith(str(comfy_env.work_dir))


def test_torchvision_is_real_or_a_stand_in_only_comfyui_sees(comfy_env):
    import importlib.util
    import comfy.ldm.cascade.stage_c_coder as coder  # does `import torchvision` at module level
    if not comfy_env.torchvision_stand_in:
        assert not isinstance(coder.torchvision, cw._UnavailableModule)
        return
    assert isinstance(coder.torchvision, cw._UnavailableModule)
    with pytest.raises(RuntimeError, match="stand-in"):
        coder.torchvision.models.efficientnet_v2_s(weights=None)
    # invisible to everyone else: availability probes and imports outside ComfyUI's files
    assert importlib.util.find_spec("torchvision") is None
    with pytest.raises(ImportError):
        import torchvision  # noqa: F401
    from transformers.utils import import_utils
    assert not import_utils.is_torchvision_available()


# ---------------------------------------------------------------- loading the pack
def test_pack_loads_through_comfyui_custom_node_loader(comfy_env, pack_load):
    assert pack_load.ok, "nodes.load_custom_node reported an import failure:\n" + "\n".join(pack_load.log)
    assert pack_load.module is not None
    assert not [m for m in pack_load.log if "Cannot import" in m or "Traceback" in m], pack_load.log
    import importlib.util
    if importlib.util.find_spec("pydantic_settings") is not None:  # ComfyUI reads [tool.comfy] with it
        assert not [m for m in pack_load.log if "pyproject.toml" in m], pack_load.log
    # loaded from a folder named as a git clone names it (hyphens), not as the package asyndm_fpdm
    assert pack_load.module_name == "ComfyUI-AsynDM-FPDM"
    assert pack_load.module.__name__ != "asyndm_fpdm"
    assert comfy_env.nodes.LOADED_MODULE_DIRS.get(pack_load.module_name) == pack_load.path


def test_pack_registers_exactly_its_nodes(comfy_env, pack_nodes):
    assert sorted(pack_nodes) == PACK_NODE_NAMES
    for name, cls in pack_nodes.items():
        assert comfy_env.nodes.NODE_CLASS_MAPPINGS[name] is cls
        assert cls.RELATIVE_PYTHON_MODULE == "custom_nodes.ComfyUI-AsynDM-FPDM"


def test_pack_import_did_not_pull_heavy_modules(comfy_env, pack_load):
    # what loading the pack itself imported (earlier tests in the session may have imported more)
    heavy = [m for m in pack_load.imported if m.split(".")[0] in ("diffusers", "transformers", "accelerate")]
    assert not heavy, f"loading the pack imported {heavy[:5]} at start-up"


@pytest.mark.parametrize("node_name", PACK_NODE_NAMES)
def test_node_registered_with_inputs_and_outputs(comfy_env, pack_nodes, node_name):
    cls = pack_nodes[node_name]
    types_ = cls.INPUT_TYPES()
    assert isinstance(types_, dict) and "required" in types_, f"{node_name}.INPUT_TYPES() needs 'required'"
    for section in ("required", "optional"):
        for inp, spec in (types_.get(section) or {}).items():
            assert isinstance(spec, (tuple, list)) and spec, f"{node_name}.{inp}: spec must be a tuple"
            assert isinstance(spec[0], (str, list, tuple)), f"{node_name}.{inp}: type must be a name or a list"
            if isinstance(spec[0], (list, tuple)):
                assert len(spec[0]) > 0, f"{node_name}.{inp}: empty combo"
    assert isinstance(cls.RETURN_TYPES, tuple)
    assert all(isinstance(t, (str, list)) for t in cls.RETURN_TYPES)
    assert callable(getattr(cls, cls.FUNCTION, None)), f"{node_name}.FUNCTION names no method"
    assert cls.CATEGORY.split("/")[0] == CATEGORY_ROOT
    assert comfy_env.nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_name), f"{node_name} has no display name"
    assert cls.RETURN_TYPES or getattr(cls, "OUTPUT_NODE", False), f"{node_name} has no outputs and is no output node"
    # what /object_info sends the frontend (server.py's node_info) must be JSON: otherwise ComfyUI
    # logs an error and the node silently disappears from the node library
    import json
    info = {"input": types_, "input_order": {k: list(v) for k, v in types_.items()},
            "output": cls.RETURN_TYPES, "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
            "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
            "output_tooltips": getattr(cls, "OUTPUT_TOOLTIPS", None), "description": getattr(cls, "DESCRIPTION", ""),
            "category": cls.CATEGORY, "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    json.dumps(info)


# ---------------------------------------------------------------- shipped workflows
@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_uses_only_existing_node_types(comfy_env, pack_nodes, workflow):
    ui = cw.load_ui_workflow(workflow)
    known = comfy_env.nodes.NODE_CLASS_MAPPINGS
    unknown = sorted({n["type"] for n in ui["nodes"]
                      if n["type"] not in known and n["type"] not in cw.VIRTUAL_NODES})
    assert not unknown, f"{workflow.name} uses node types ComfyUI does not know: {unknown}"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_validates_in_comfyui(comfy_env, pack_nodes, workflow):
    api = cw.ui_to_api_prompt(cw.load_ui_workflow(workflow))
    result = cw.validate_prompt(api)
    assert result.ok, (f"{workflow.name} fails ComfyUI's validation: {result.error}\n"
                       + cw.format_node_errors(result.node_errors))
    assert result.outputs, f"{workflow.name} has no valid output node"
    assert not result.node_errors


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_executes_on_tiny_stand_ins(comfy_env, pack_nodes, stand_ins, workflow):
    """The shipped graph runs end to end in ComfyUI's executor (tiny models, 64 px)."""
    import torch
    result = cw.run_workflow(workflow, shrink=64)
    classes = comfy_env.nodes.NODE_CLASS_MAPPINGS
    outputs = [k for k, v in result.prompt.items() if getattr(classes[v["class_type"]], "OUTPUT_NODE", False)]
    assert outputs and all(k in result.outputs for k in outputs), "not every output node executed"
    used = {v["class_type"] for v in result.prompt.values()}
    assert used & set(pack_nodes), f"{workflow.name} uses none of the pack's nodes"
    for node_id, values in result.outputs.items():
        for value in values:
            if isinstance(value, torch.Tensor):
                assert bool(value.isfinite().all()), f"node {node_id} produced non-finite values"


# ---------------------------------------------------------------- the harness itself
def _core_ui_workflow(ckpt="v1-5-pruned-emaonly.safetensors"):
    """A UI-format core txt2img graph with the frontend's quirks: a Note, a Reroute, a PrimitiveNode
    driving a converted widget (steps), a seed with its control_after_generate value."""
    nodes = [
        {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}, {"name": "CLIP", "type": "CLIP", "links": [2, 3]},
                     {"name": "VAE", "type": "VAE", "links": [8]}], "widgets_values": [ckpt]},
        {"id": 6, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 2}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4]}],
         "widgets_values": ["a rabbit playing basketball"]},
        {"id": 7, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [5]}], "widgets_values": ["blurry"]},
        {"id": 5, "type": "EmptyLatentImage", "mode": 0, "inputs": [],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [6]}], "widgets_values": [64, 64, 1]},
        {"id": 3, "type": "KSampler", "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 1}, {"name": "positive", "type": "CONDITIONING", "link": 4},
                    {"name": "negative", "type": "CONDITIONING", "link": 5}, {"name": "latent_image", "type": "LATENT", "link": 6},
                    {"name": "steps", "type": "INT", "link": 11, "widget": {"name": "steps"}}],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [7]}],
         "widgets_values": [42, "fixed", 20, 2.0, "euler", "normal", 1.0]},
        {"id": 10, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 7}],
         "outputs": [{"name": "", "type": "LATENT", "links": [9]}]},
        {"id": 8, "type": "VAEDecode", "mode": 0,
         "inputs": [{"name": "samples", "type": "LATENT", "link": 9}, {"name": "vae", "type": "VAE", "link": 8}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [10]}], "widgets_values": []},
        {"id": 9, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 10}],
         "outputs": [], "widgets_values": ["harness"]},
        {"id": 11, "type": "PrimitiveNode", "mode": 0, "inputs": [],
         "outputs": [{"name": "INT", "type": "INT", "links": [11], "widget": {"name": "steps"}}],
         "widgets_values": [3, "fixed"]},
        {"id": 12, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["just a note"]},
    ]
    links = [[1, 4, 0, 3, 0, "MODEL"], [2, 4, 1, 6, 0, "CLIP"], [3, 4, 1, 7, 0, "CLIP"],
             [4, 6, 0, 3, 1, "CONDITIONING"], [5, 7, 0, 3, 2, "CONDITIONING"], [6, 5, 0, 3, 3, "LATENT"],
             [7, 3, 0, 10, 0, "*"], [8, 4, 2, 8, 1, "VAE"], [9, 10, 0, 8, 0, "LATENT"],
             [10, 8, 0, 9, 0, "IMAGE"], [11, 11, 0, 3, 4, "INT"]]
    return {"last_node_id": 12, "last_link_id": 11, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def test_ui_to_api_conversion_matches_the_frontend(comfy_env):
    api = cw.ui_to_api_prompt(_core_ui_workflow())
    assert set(api) == {"3", "4", "5", "6", "7", "8", "9"}  # Note, Reroute, PrimitiveNode resolved away
    ks = api["3"]["inputs"]
    assert ks["seed"] == 42 and ks["cfg"] == 2.0 and ks["sampler_name"] == "euler"  # "fixed" skipped
    assert ks["steps"] == 3  # from the PrimitiveNode
    assert ks["model"] == ["4", 0] and ks["latent_image"] == ["5", 0]
    assert api["8"]["inputs"]["samples"] == ["3", 0]  # through the Reroute
    assert api["5"]["inputs"] == {"width": 64, "height": 64, "batch_size": 1}
    assert cw.validate_prompt(api).ok


def test_ui_to_api_conversion_handles_bypassed_and_muted_nodes(comfy_env):
    ui = _core_ui_workflow()
    # a bypassed LatentUpscaleBy between EmptyLatentImage and KSampler, and a muted second SaveImage
    ui["nodes"].append({"id": 13, "type": "LatentUpscaleBy", "mode": 4,
                        "inputs": [{"name": "samples", "type": "LATENT", "link": 12}],
                        "outputs": [{"name": "LATENT", "type": "LATENT", "links": [6]}],
                        "widgets_values": ["nearest-exact", 1.5]})
    ui["nodes"].append({"id": 14, "type": "SaveImage", "mode": 2,
                        "inputs": [{"name": "images", "type": "IMAGE", "link": 13}], "outputs": [],
                        "widgets_values": ["muted"]})
    ui["links"] = [link for link in ui["links"] if link[0] != 6]
    ui["links"] += [[12, 5, 0, 13, 0, "LATENT"], [6, 13, 0, 3, 3, "LATENT"], [13, 8, 0, 14, 0, "IMAGE"]]
    api = cw.ui_to_api_prompt(ui)
    assert "13" not in api and "14" not in api
    assert api["3"]["inputs"]["latent_image"] == ["5", 0]


def test_widget_values_map_in_input_order(comfy_env):
    ks = comfy_env.nodes.NODE_CLASS_MAPPINGS["KSampler"]
    assert [n for n, _ in cw.widget_inputs(ks)] == ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    mapped = cw.map_widget_values(ks, [7, "randomize", 5, 1.5, "ddim", "karras", 0.5])
    assert mapped == {"seed": 7, "steps": 5, "cfg": 1.5, "sampler_name": "ddim", "scheduler": "karras", "denoise": 0.5}
    load_image = comfy_env.nodes.NODE_CLASS_MAPPINGS["LoadImage"]
    assert cw.map_widget_values(load_image, ["example.png", "image"]) == {"image": "example.png"}


def test_validation_rejects_bad_widget_values(comfy_env):
    api = cw.ui_to_api_prompt(_core_ui_workflow())
    api["3"]["inputs"]["sampler_name"] = "no_such_sampler"
    api["3"]["inputs"]["steps"] = 0
    result = cw.validate_prompt(api)
    assert not result.ok
    assert "3" in result.node_errors
    text = cw.format_node_errors(result.node_errors)
    assert "sampler_name" in text and "steps" in text


@pytest.mark.parametrize("ckpt,family", [
    ("v1-5-pruned-emaonly.safetensors", "sd15"),
    ("v2-1_768-ema-pruned.safetensors", "sd21v"),
    ("sd_xl_base_1.0.safetensors", "sdxl"),
])
def test_core_workflow_runs_on_tiny_stand_ins(comfy_env, stand_ins, ckpt, family):
    result = cw.run_workflow(_core_ui_workflow(ckpt))
    assert stand_ins.loads == [("checkpoint", ckpt, family)]
    image = result.outputs["8"][0]
    assert tuple(image.shape) == (1, 64, 64, 3)
    latent = result.outputs["3"][0]["samples"]
    assert tuple(latent.shape) == (1, 4, 8, 8) and bool(latent.isfinite().all())
    assert cw.progress_events(result, "3")[-1] == (3, 3)  # KSampler's ProgressBar, via the hook
    saved = result.ui["9"]["images"]
    assert len(saved) == 1
    assert (pathlib.Path(comfy_env.folder_paths.get_output_directory()) / saved[0]["filename"]).is_file()


def test_tiny_models_are_deterministic_and_seed_sensitive(comfy_env, stand_ins):
    wf = _core_ui_workflow()
    a = cw.run_workflow(wf).outputs["3"][0]["samples"]
    b = cw.run_workflow(wf).outputs["3"][0]["samples"]
    assert bool((a == b).all()), "same seed, same tiny model → identical latents"
    wf["nodes"][4]["widgets_values"][0] = 43
    c = cw.run_workflow(wf).outputs["3"][0]["samples"]
    assert not bool((a == c).all())


def test_stand_ins_are_removed_after_use(comfy_env):
    import comfy_tiny
    cls = comfy_env.nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]
    original = cls.load_checkpoint
    with comfy_tiny.stand_ins():
        assert cls.load_checkpoint is not original
    assert cls.load_checkpoint is original


def test_run_workflow_reports_node_failures(comfy_env):
    # without stand-ins the placeholder checkpoint is an empty file: ComfyUI must fail loudly
    with pytest.raises(AssertionError, match="CheckpointLoaderSimple"):
        cw.run_workflow(_core_ui_workflow("empty-placeholder.safetensors"))
