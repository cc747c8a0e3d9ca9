"""Real-ComfyUI integration harness.

Set ``COMFYUI_PATH`` to a ComfyUI checkout (tested with ComfyUI 0.3.64) to run these tests, or
run them from the pack inside ``ComfyUI/custom_nodes/<any name>/``: that ComfyUI is then found by
itself (``comfy_locate``) and named in pytest's header. Otherwise every test in this folder is
skipped with a reason saying so. The checkout is only
imported, never modified: models/input/output folders are private temporary directories.

Fixtures (session-scoped; other test files build on these names):

- ``comfy_env``   ComfyUI imported in CPU mode with its builtin extra nodes (comfy_extras) loaded.
                  SimpleNamespace: ``path`` (ComfyUI folder), ``nodes`` (ComfyUI's nodes module),
                  ``execution``, ``folder_paths``, ``work_dir`` (temp root), ``torchvision_stand_in``
                  (bool), ``extras_import_failed`` (builtin extra files that did not import here).
- ``pack_nodes``  the pack loaded through ComfyUI's own ``nodes.load_custom_node`` from a
                  ``custom_nodes/ComfyUI-AsynDM-FPDM`` link to this checkout (import failure fails
                  the fixture); dict node name → class as registered in ``nodes.NODE_CLASS_MAPPINGS``.
- ``pack_load``   the full load result: ``ok``, ``module``, ``module_name``, ``node_names``, ``log``.
- ``tiny_models`` ``comfy_tiny`` module (tiny SD1.5 / SD2.x v-pred / SDXL stand-ins), after comfy_env.
- ``stand_ins``   function-scoped: inside the test, core loader nodes (CheckpointLoaderSimple,
                  LoraLoader, VAELoader, ...) return tiny models for any file name.
Helpers are plain functions (``from comfy_workflows import run_workflow``):
``comfy_workflows.run_workflow(path_or_dict, outputs=None, shrink=None)`` → ``.outputs`` {node id:
tuple of output values}, ``.ui``, ``.prompt``, ``.messages``; ``progress_events(result, node_id)``;
``validate_prompt(api, outputs=None)``; ``ui_to_api_prompt(ui)``; ``load_ui_workflow(path)``;
``shrink_prompt(api, size=64)``. ``comfy_tiny.tiny_model/tiny_clip/tiny_vae/tiny_checkpoint(family)``
with families sd15, sd20, sd21v (v-prediction), sdxl; ``comfy_tiny.stand_ins()``.

Threads: the harness sets ``torch.set_num_threads(1)`` (tiny models; shared CI cores make
oversubscribed OpenMP threads 10-50x slower); ``COMFYUI_TEST_THREADS=N`` overrides, 0 keeps torch's.

torchvision: ComfyUI 0.3.x imports torchvision at start-up (``comfy.sd`` imports Stable Cascade's
coder, Cosmos and ACE modules) but uses it only when those models run. Where ``import torchvision``
fails — as on CPU-only torch 2.13 wheels, for which PyPI has no matching torchvision — the harness
installs an import-only stand-in into *this test process* (``sys.meta_path``); any use of it
raises a RuntimeError naming the stand-in. A working torchvision is always used when importable.
spandrel (a ComfyUI requirement that imports torchvision at import time, for upscale models) gets the
stand-in too: without it ComfyUI's UpscaleModelLoader is missing and its front end's loaders break.
"""

import os
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from comfy_locate import ENV_VAR, comfyui_path as locate_comfyui  # noqa: E402

SKIP_REASON = (f"set {ENV_VAR}=/path/to/ComfyUI, or run from the pack inside ComfyUI/custom_nodes/, "
               "to run the real-ComfyUI integration tests (see README)")

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def comfyui_path():
    return locate_comfyui()[0]


def pytest_collection_modifyitems(config, items):
    if comfyui_path():
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in pathlib.Path(str(getattr(item, "path", item.fspath))).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_env(tmp_path_factory):
    path = comfyui_path()
    if not path:
        pytest.skip(SKIP_REASON)
    import comfy_workflows
    try:
        return comfy_workflows.bootstrap_comfyui(path, tmp_path_factory.mktemp("comfyui"))
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def pack_load(comfy_env):
    import comfy_workflows
    return comfy_workflows.load_custom_node_pack(REPO_ROOT)


@pytest.fixture(scope="session")
def pack_nodes(comfy_env, pack_load):
    assert pack_load.ok, "ComfyUI failed to import the pack:\n" + "\n".join(pack_load.log)
    mappings = comfy_env.nodes.NODE_CLASS_MAPPINGS
    missing = [n for n in pack_load.node_names if n not in mappings]
    assert not missing, f"pack nodes not registered in ComfyUI: {missing}"
    return {name: mappings[name] for name in pack_load.node_names}


@pytest.fixture(scope="session")
def tiny_models(comfy_env):
    import comfy_tiny
    return comfy_tiny


@pytest.fixture
def stand_ins(comfy_env):
    import comfy_tiny
    with comfy_tiny.stand_ins() as registry:
        yield registry
