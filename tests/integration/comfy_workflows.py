"""Drive a real ComfyUI from tests: start-up, UI-workflow → API-prompt conversion, validation, execution.

Nothing here imports ComfyUI at module level: ``bootstrap_comfyui`` puts a ComfyUI checkout on
``sys.path`` first (the ``comfy_env`` fixture in ``conftest.py`` calls it once per session).

- ``bootstrap_comfyui(path, work_dir)``: CPU mode, temporary models/input/output folders,
  ComfyUI's builtin extra nodes (``comfy_extras``) loaded exactly as ComfyUI does at start-up.
- ``load_custom_node_pack(folder)``: the pack loaded through ComfyUI's own custom-node loader.
- ``load_ui_workflow(path)`` / ``ui_to_api_prompt(ui, node_classes)``: what the frontend's
  "Queue Prompt" sends (graphToPrompt), for the shipped ``workflows/*.json``.
- ``validate_prompt(api)``: ComfyUI's ``execution.validate_prompt`` (types, ranges, combos).
- ``run_workflow(workflow, outputs=None)``: validates, then executes through
  ``execution.PromptExecutor`` and returns every executed node's outputs.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.abc
import importlib.machinery
import json
import logging
import os
import pathlib
import sys
import types
import uuid
from types import SimpleNamespace

# Nodes that live only in the browser (virtual nodes): graphToPrompt never sends them to the server.
# (PrimitiveInt/PrimitiveString/... are different: real core nodes of comfy_extras/nodes_primitive.py.)
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
FRONTEND_ONLY_NODES = VIRTUAL_NODES
# Values of the extra "control after generate" widget the frontend adds after seed-like widgets.
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
SEED_NAMES = {"seed", "noise_seed"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4

_STATE = SimpleNamespace(bootstrapped=False, path=None, work_dir=None, torchvision_stand_in=False,
                         extras_import_failed=[])


# ----------------------------------------------------------------------------------------------
# torchvision stand-in (test process only)
# ----------------------------------------------------------------------------------------------
def _unavailable_error(name):
    return RuntimeError(
        f"{name} is not available: torchvision could not be imported in this test process, so the "
        "integration harness gave ComfyUI an import-only stand-in (see tests/integration/conftest.py)")


class _Unavailable:
    """Any attribute chain works (``torchvision.transforms.InterpolationMode.BICUBIC``); calling raises."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise _unavailable_error(self._name)

    def __repr__(self):
        return f"<stand-in {self._name}>"


class _UnavailableModule(types.ModuleType):
    """A module whose every attribute is an ``_Unavailable``: importing works, using does not."""

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self.__name__}.{attr}")


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = _UnavailableModule(spec.name)
        module.__path__ = []
        module.IS_STAND_IN = True
        return module

    def exec_module(self, module):
        pass


def _importer_file():
    """File of the code running the import statement (skipping importlib's own frames)."""
    frame = sys._getframe(2)
    importlib_dir = os.path.dirname(importlib.__file__)
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith("<frozen") or name.startswith(importlib_dir) or name == __file__):
            return name
        frame = frame.f_back
    return ""


# ComfyUI's requirements that, like ComfyUI, import torchvision at start-up but use it only when
# their models run: spandrel (upscale models) imports torchvision.transforms in two architectures.
# Without spandrel, ComfyUI's UpscaleModelLoader node does not register, and the 1.27 front end
# then fails to build any model-loader combo (it looks that node up for its model browser).
STAND_IN_USERS = ("spandrel",)


def _package_dirs(names):
    import importlib.util
    dirs = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        dirs += [os.path.abspath(d) for d in (spec.submodule_search_locations or [])] if spec else []
    return dirs


class _StandInFinder(importlib.abc.MetaPathFinder):
    """Serves the stand-in only to imports written in ComfyUI's own files (and in ``STAND_IN_USERS``).
    Anything else probing for the package (transformers' and diffusers' ``find_spec`` availability
    checks) sees it missing."""

    def __init__(self, top, comfy_root):
        self.top = top
        self.roots = tuple(d + os.sep for d in [os.path.abspath(comfy_root), *_package_dirs(STAND_IN_USERS)])

    def find_spec(self, name, path, target=None):
        if name == self.top or name.startswith(self.top + "."):
            if os.path.abspath(_importer_file()).startswith(self.roots):
                return importlib.machinery.ModuleSpec(name, _StandInLoader(), is_package=True)
        return None


def install_torchvision_stand_in_if_needed(comfy_root) -> bool:
    """If ``import torchvision`` fails, let ComfyUI's files import it (and its submodules) as inert
    stand-ins.

    ComfyUI 0.3.x imports torchvision at start-up (``comfy.sd`` → Stable Cascade's coder, Cosmos,
    ACE) but uses it only when those models run. On machines where no torchvision build matches the
    installed torch (e.g. the CPU torch 2.13 wheel) the real import raises; the stand-in lets
    ComfyUI start while any *use* of torchvision raises a clear RuntimeError. It exists only in the
    test process, is served only to imports in ComfyUI's files, and is removed from ``sys.modules``
    once ComfyUI has started (``hide_stand_ins``) so that other libraries still see no torchvision.
    Returns True when the stand-in was installed.
    """
    if any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        return True
    try:
        import torchvision  # noqa: F401
        return False
    except Exception as exc:  # ModuleNotFoundError, or RuntimeError from a mismatched build
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _settle_availability_checks("torchvision")
        sys.meta_path.insert(0, _StandInFinder("torchvision", comfy_root))
        logging.getLogger(__name__).warning("torchvision unusable (%s: %s); ComfyUI gets an import-only stand-in",
                                            type(exc).__name__, exc)
        return True


def _settle_availability_checks(package):
    """transformers caches ``is_torchvision_available()`` (lru_cache) the first time it is asked, and
    ComfyUI imports transformers while the stand-in sits in sys.modules: ask now, while the true
    answer (not available) is what it sees."""
    try:
        import transformers.utils.import_utils as tiu
    except Exception:
        return
    for name in dir(tiu):
        if name.startswith(f"is_{package}") and callable(getattr(tiu, name)):
            try:
                getattr(tiu, name)()
            except Exception:
                pass


def hide_stand_ins():
    """Drop stand-in modules from sys.modules (modules that imported them keep their reference)."""
    for name in [n for n, m in list(sys.modules.items()) if isinstance(m, _UnavailableModule)]:
        del sys.modules[name]


# ----------------------------------------------------------------------------------------------
# start-up
# ----------------------------------------------------------------------------------------------
MODEL_FOLDERS_SKIPPED = {"custom_nodes", "configs"}


def bootstrap_comfyui(path, work_dir) -> SimpleNamespace:
    """Import a ComfyUI checkout in CPU mode with private folders; idempotent per process."""
    if _STATE.bootstrapped:
        return environment()
    path = pathlib.Path(path).resolve()
    if not (path / "nodes.py").is_file() or not (path / "comfy").is_dir() or not (path / "execution.py").is_file():
        raise RuntimeError(f"COMFYUI_PATH={path} does not look like a ComfyUI checkout "
                           "(expected nodes.py, execution.py and comfy/ there)")
    work_dir = pathlib.Path(work_dir)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    _STATE.torchvision_stand_in = install_torchvision_stand_in_if_needed(path)
    # Tiny models gain nothing from intra-op threads, and on shared CI cores oversubscribed OpenMP
    # threads make each step 10-50x slower. COMFYUI_TEST_THREADS overrides (0 = torch's default).
    import torch
    threads = int(os.environ.get("COMFYUI_TEST_THREADS", "1") or 0)
    if threads > 0:
        torch.set_num_threads(threads)

    # main.py imports its own ``utils`` package first; do the same before anything can shadow it.
    import utils.install_util  # noqa: F401
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.cpu = True
    args.disable_all_custom_nodes = False
    import folder_paths

    for sub in ("output", "input", "temp", "user"):
        (work_dir / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(work_dir / "output"))
    folder_paths.set_input_directory(str(work_dir / "input"))
    folder_paths.set_temp_directory(str(work_dir / "temp"))
    folder_paths.set_user_directory(str(work_dir / "user"))
    models = work_dir / "models"
    folder_paths.models_dir = str(models)  # folders a pack registers later land here too
    for key, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        if key in MODEL_FOLDERS_SKIPPED:
            continue
        (models / key).mkdir(parents=True, exist_ok=True)
        folder_paths.folder_names_and_paths[key] = ([str(models / key)], exts)
    folder_paths.filename_list_cache.clear()

    import comfy.model_management  # noqa: F401  (after args.cpu)
    import nodes
    import execution

    async def _init_builtin():
        # what nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False) does, keeping
        # the list of builtin extra files that failed to import
        if hasattr(nodes, "init_public_apis"):
            await nodes.init_public_apis()
        return await nodes.init_builtin_extra_nodes()

    _STATE.extras_import_failed = list(asyncio.run(_init_builtin()) or [])
    try:
        import server
        if getattr(server.PromptServer, "instance", None) is None:
            server.PromptServer.instance = DummyServer()
    except Exception as exc:  # server.py needs aiohttp; nodes that talk to the UI would fail anyway
        logging.getLogger(__name__).warning("server.PromptServer unavailable: %s", exc)

    hide_stand_ins()
    _STATE.bootstrapped = True
    _STATE.path = path
    _STATE.work_dir = work_dir
    return environment()


def environment() -> SimpleNamespace:
    import nodes
    import execution
    import folder_paths
    return SimpleNamespace(path=_STATE.path, nodes=nodes, execution=execution, folder_paths=folder_paths,
                           work_dir=_STATE.work_dir, torchvision_stand_in=_STATE.torchvision_stand_in,
                           extras_import_failed=list(_STATE.extras_import_failed))


class _CaptureLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def load_custom_node_pack(folder, name=None) -> SimpleNamespace:
    """Load a custom-node folder with ComfyUI's own ``nodes.load_custom_node``.

    ``name`` is the folder name ComfyUI sees (its module name); by default the folder is linked into
    ``<work_dir>/custom_nodes/ComfyUI-AsynDM-FPDM`` — the hyphenated name a ``git clone`` gives.
    Returns ``ok`` (load_custom_node's verdict), ``module``, ``module_name`` (ComfyUI's name for it),
    ``sys_module_name``, ``path``, ``node_names`` (what the pack's
    NODE_CLASS_MAPPINGS lists), ``log`` (warnings/errors logged while loading), ``imported``
    (the modules the load brought into sys.modules).
    """
    import nodes
    folder = pathlib.Path(folder).resolve()
    name = name or "ComfyUI-AsynDM-FPDM"
    cn_dir = pathlib.Path(_STATE.work_dir) / "custom_nodes"
    cn_dir.mkdir(parents=True, exist_ok=True)
    link = cn_dir / name
    if not link.exists():
        try:
            link.symlink_to(folder, target_is_directory=True)
        except OSError:
            link = folder  # no symlinks (e.g. Windows without privileges): load in place
    handler = _CaptureLog()
    root = logging.getLogger()
    root.addHandler(handler)
    before = set(sys.modules)
    try:
        ok = asyncio.run(nodes.load_custom_node(str(link), module_parent="custom_nodes"))
    finally:
        root.removeHandler(handler)
    # ComfyUI ≥ 0.3.4x registers a folder under its full path ('.' → '_x_'); older ones by its name
    module = sys.modules.get(str(link).replace(".", "_x_")) or sys.modules.get(link.name)
    names = list(getattr(module, "NODE_CLASS_MAPPINGS", {}) or {}) if module is not None else []
    log = [f"{r.levelname}: {r.getMessage()}" for r in handler.records if r.levelno >= logging.WARNING]
    return SimpleNamespace(ok=ok, module=module, module_name=link.name, node_names=names, log=log,
                           sys_module_name=getattr(module, "__name__", None), path=str(link),
                           imported=sorted(set(sys.modules) - before))


# ----------------------------------------------------------------------------------------------
# UI workflow → API prompt
# ----------------------------------------------------------------------------------------------
def load_ui_workflow(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_ui_workflow(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def _input_spec_options(spec):
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1]
    return {}


def _is_widget(spec) -> bool:
    """Does the frontend draw this input as a widget (and so store a value in widgets_values)?"""
    if not isinstance(spec, (list, tuple)) or not spec:
        return False
    kind = spec[0]
    opts = _input_spec_options(spec)
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    if isinstance(kind, (list, tuple)):
        return True
    return kind in WIDGET_TYPES


def widget_inputs(node_class) -> list[tuple[str, object]]:
    """The widget inputs of a node class in INPUT_TYPES order (required, then optional)."""
    types_ = node_class.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, spec in (types_.get(section) or {}).items():
            if _is_widget(spec):
                out.append((name, spec))
    return out


def _has_control_widget(name, spec) -> bool:
    opts = _input_spec_options(spec)
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else None
    return kind == "INT" and name in SEED_NAMES


def _has_upload_widget(spec) -> bool:
    opts = _input_spec_options(spec)
    return any(opts.get(k) for k in ("image_upload", "video_upload", "audio_upload", "animated_image_upload"))


def map_widget_values(node_class, widgets_values) -> dict:
    """Assign a UI node's ``widgets_values`` to its widget input names (as the frontend does).

    Values the frontend stores for its own extra widgets (the control-after-generate value after a
    seed, the upload button value after an image/video/audio combo) are skipped.
    """
    if isinstance(widgets_values, dict):  # some frontends/extensions store name → value
        names = {n for n, _ in widget_inputs(node_class)}
        return {k: v for k, v in widgets_values.items() if k in names}
    values = list(widgets_values or [])
    out = {}
    i = 0
    for name, spec in widget_inputs(node_class):
        if i >= len(values):
            break
        out[name] = values[i]
        i += 1
        if _has_control_widget(name, spec) and i < len(values) and values[i] in CONTROL_VALUES:
            i += 1
        elif _has_upload_widget(spec) and i < len(values) and values[i] in ("image", "video", "audio", None, ""):
            i += 1
    return out


class WorkflowError(ValueError):
    pass


def ui_to_api_prompt(ui: dict, node_classes: dict | None = None) -> dict:
    """Convert a UI (drag-and-drop) workflow into the API prompt the frontend would queue.

    ``node_classes``: class_type → node class (default: ComfyUI's ``nodes.NODE_CLASS_MAPPINGS``).
    Frontend-only nodes (Note, MarkdownNote, Reroute, PrimitiveNode) are resolved away, muted nodes
    (mode 2) are dropped, bypassed nodes (mode 4) pass their first type-matching input through.
    """
    if node_classes is None:
        import nodes
        node_classes = nodes.NODE_CLASS_MAPPINGS
    if not is_ui_workflow(ui):
        raise WorkflowError("not a UI workflow (expected 'nodes' and 'links')")
    if (ui.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported by this converter")
    by_id = {n["id"]: n for n in ui["nodes"]}
    links = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link.get("type"))
        else:
            links[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)

    def input_link(node, slot_index):
        inputs = node.get("inputs") or []
        if slot_index < len(inputs):
            return inputs[slot_index].get("link")
        return None

    def resolve(link_id, depth=0):
        """Follow a link to its real source: ("link", [node_id, slot]) / ("value", v) / (None, None)."""
        if link_id is None or link_id not in links or depth > 100:
            return None, None
        src_id, src_slot, _, _, link_type = links[link_id]
        src = by_id.get(src_id)
        if src is None:
            raise WorkflowError(f"link {link_id} comes from missing node {src_id}")
        kind = src.get("type")
        if kind == "Reroute":
            return resolve(input_link(src, 0), depth + 1)
        if kind == "PrimitiveNode":
            wv = src.get("widgets_values") or []
            return ("value", wv[0]) if wv else (None, None)
        if kind in ("Note", "MarkdownNote"):
            return None, None
        mode = src.get("mode", MODE_ALWAYS)
        if mode == MODE_NEVER:
            return None, None
        if mode == MODE_BYPASS:
            out_type = None
            outs = src.get("outputs") or []
            if src_slot < len(outs):
                out_type = outs[src_slot].get("type")
            out_type = out_type or link_type
            for inp in src.get("inputs") or []:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return resolve(inp["link"], depth + 1)
            return None, None
        return "link", [str(src_id), int(src_slot)]

    prompt = {}
    for node in ui["nodes"]:
        kind = node.get("type")
        if kind in VIRTUAL_NODES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        cls = node_classes.get(kind)
        if cls is None:
            raise WorkflowError(f"node {node['id']}: unknown node type {kind!r}")
        inputs = map_widget_values(cls, node.get("widgets_values"))
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            name = (inp.get("widget") or {}).get("name") or inp["name"]
            what, value = resolve(inp["link"])
            if what == "link":
                inputs[name] = value
            elif what == "value":
                inputs[name] = value
            else:
                inputs.pop(name, None) if name not in dict(widget_inputs(cls)) else None
        entry = {"class_type": kind, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node["id"])] = entry
    return prompt


# ----------------------------------------------------------------------------------------------
# placeholders so that file-name widgets validate
# ----------------------------------------------------------------------------------------------
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def ensure_files_for(api_prompt: dict, image_size=(64, 64)) -> list[str]:
    """Create what the prompt's file-name widgets refer to, so ComfyUI's combo lists contain them.

    Model file names (``*.safetensors``, ``*.ckpt``...) become empty placeholder files in every
    model folder of the harness; image names become small real PNGs in the input folder. Loading a
    placeholder model fails loudly — use ``comfy_tiny.stand_ins()`` to execute such workflows.
    """
    import folder_paths
    import nodes
    for node in api_prompt.values():  # INPUT_TYPES may register a pack's model folder lazily
        cls = nodes.NODE_CLASS_MAPPINGS.get(node.get("class_type"))
        if cls is not None:
            try:
                cls.INPUT_TYPES()
            except Exception:
                pass  # validation reports it
    created = []
    model_exts = tuple(folder_paths.supported_pt_extensions)
    for node in api_prompt.values():
        for value in node.get("inputs", {}).values():
            if not isinstance(value, str) or "\n" in value or len(value) > 255:
                continue
            low = value.lower()
            if low.endswith(model_exts):
                for key, (paths, exts) in folder_paths.folder_names_and_paths.items():
                    if key in MODEL_FOLDERS_SKIPPED or not paths:
                        continue
                    if exts and not low.endswith(tuple(exts)):
                        continue
                    target = pathlib.Path(paths[0]) / value
                    if not target.exists() and str(_STATE.work_dir) in str(target):
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(b"")
                        created.append(str(target))
            elif low.endswith(IMAGE_EXTS):
                target = pathlib.Path(folder_paths.get_input_directory()) / value
                if not target.exists():
                    from PIL import Image
                    import numpy as np
                    target.parent.mkdir(parents=True, exist_ok=True)
                    rng = np.random.default_rng(0)
                    arr = rng.integers(0, 256, size=(image_size[1], image_size[0], 3), dtype=np.uint8)
                    Image.fromarray(arr).save(target)
                    created.append(str(target))
    folder_paths.filename_list_cache.clear()
    return created


# ----------------------------------------------------------------------------------------------
# validation and execution
# ----------------------------------------------------------------------------------------------
class _Routes:
    """Accepts ``@PromptServer.instance.routes.get(...)`` decorators that packs use at import time."""

    def __getattr__(self, method):
        def register(*args, **kwargs):
            return lambda handler: handler
        return register


class DummyServer:
    """What PromptExecutor (and nodes using ``PromptServer.instance``) need; records every message."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []
        self.routes = _Routes()

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"node": node_id, "text": text}))


def to_api_prompt(workflow, node_classes=None) -> dict:
    """Path / UI dict / API dict → API prompt (a deep copy)."""
    if isinstance(workflow, (str, os.PathLike)):
        workflow = load_ui_workflow(workflow)
    if is_ui_workflow(workflow):
        return ui_to_api_prompt(workflow, node_classes)
    return copy.deepcopy(workflow)


def validate_prompt(api_prompt: dict, outputs=None, create_files=True) -> SimpleNamespace:
    """ComfyUI's own validation. Returns ``ok``, ``error``, ``outputs`` (valid output ids), ``node_errors``.

    ``outputs``: node ids to validate (any node, not only OUTPUT_NODEs); default: every output node.
    """
    import execution
    if create_files:
        ensure_files_for(api_prompt)
    prompt_id = str(uuid.uuid4())
    if outputs is None:
        ok, error, good, node_errors = asyncio.run(execution.validate_prompt(prompt_id, api_prompt, None))
        return SimpleNamespace(ok=ok, error=error, outputs=good, node_errors=node_errors)
    validated, errors, good = {}, {}, []

    async def _validate():
        for o in outputs:
            res = await execution.validate_inputs(prompt_id, api_prompt, str(o), validated)
            if res[0] is True:
                good.append(str(o))
        for node_id, res in validated.items():
            if res[0] is not True and res[1]:
                errors[node_id] = {"errors": res[1], "class_type": api_prompt[node_id]["class_type"]}

    asyncio.run(_validate())
    ok = len(good) == len(list(outputs))
    error = None if ok else {"type": "prompt_outputs_failed_validation", "message": "validation failed",
                             "details": format_node_errors(errors)}
    return SimpleNamespace(ok=ok, error=error, outputs=good, node_errors=errors)


def format_node_errors(node_errors) -> str:
    lines = []
    for node_id, info in (node_errors or {}).items():
        for err in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "\n".join(lines)


def _progress_hook(server):
    """main.py's progress hook, minus the websocket: honours interrupts, records ("progress", {...})."""
    import comfy.model_management
    try:
        from comfy_execution.utils import get_executing_context
        from comfy_execution.progress import get_progress_state
    except ImportError:  # older ComfyUI
        get_executing_context = get_progress_state = None

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context() if get_executing_context else None
        if prompt_id is None and ctx is not None:
            prompt_id = ctx.prompt_id
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        prompt_id = prompt_id or server.last_prompt_id
        node_id = node_id or server.last_node_id
        if get_progress_state is not None:
            get_progress_state().update_progress(node_id, value, total, preview_image)
        server.messages.append(("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id}))

    return hook


def progress_events(result, node_id=None) -> list:
    """The ("progress") events of a ``run_workflow`` result, optionally for one node: [(value, max)]."""
    return [(d["value"], d["max"]) for ev, d in result.messages
            if ev == "progress" and (node_id is None or str(d.get("node")) == str(node_id))]


def _unwrap(slot_values):
    if isinstance(slot_values, list) and len(slot_values) == 1:
        return slot_values[0]
    return slot_values


SHRINK_INPUTS = ("width", "height")


def shrink_prompt(api_prompt: dict, size=64, batch_size=None) -> dict:
    """Cap every ``width``/``height`` widget value at ``size`` (and ``batch_size`` if given), in
    place: shipped workflows ask for 512–1024 px, the tiny stand-ins only need a few latent pixels.
    Returns the prompt."""
    for node in api_prompt.values():
        inputs = node.get("inputs", {})
        for key in SHRINK_INPUTS:
            value = inputs.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > size:
                inputs[key] = size
        if batch_size is not None and isinstance(inputs.get("batch_size"), int) and inputs["batch_size"] > batch_size:
            inputs["batch_size"] = batch_size
    return api_prompt


def run_workflow(workflow, outputs=None, node_classes=None, validate=True, extra_data=None,
                 shrink=None) -> SimpleNamespace:
    """Validate and execute a workflow (path, UI dict or API dict) through ComfyUI's PromptExecutor.

    ``outputs``: node ids to execute (with their inputs); default: every valid output node.
    Returns a namespace with ``outputs`` {node_id: tuple of that node's output values} for every
    node that executed (list outputs stay lists), ``ui`` {node_id: ui dict} (e.g. SaveImage's
    images), ``prompt`` (the API prompt), ``messages`` (server events, including ("progress",
    {value, max, node}) from ProgressBar — see ``progress_events``) and ``executor``.
    ``shrink``: an image size (e.g. 64) passed to ``shrink_prompt`` before validation.
    Raises AssertionError with ComfyUI's own messages when validation or execution fails.
    """
    import execution
    prompt = to_api_prompt(workflow, node_classes)
    if shrink:
        shrink_prompt(prompt, size=shrink)
    ensure_files_for(prompt)
    targets = [str(o) for o in outputs] if outputs is not None else None
    if validate:
        res = validate_prompt(prompt, outputs=targets, create_files=False)
        if not res.ok:
            raise AssertionError(f"prompt failed ComfyUI validation: {res.error}\n{format_node_errors(res.node_errors)}")
        if targets is None:
            targets = res.outputs
    elif targets is None:
        import nodes
        targets = [k for k, v in prompt.items()
                   if getattr(nodes.NODE_CLASS_MAPPINGS[v["class_type"]], "OUTPUT_NODE", False)]
    server = DummyServer()
    executor = execution.PromptExecutor(server, cache_type=False)
    prompt_id = str(uuid.uuid4())
    server.last_prompt_id = prompt_id
    import comfy.utils
    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(_progress_hook(server))
    try:
        executor.execute(prompt, prompt_id, extra_data or {}, targets)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
    if not executor.success:
        errs = [d for ev, d in executor.status_messages if ev == "execution_error"]
        if errs:
            e = errs[0]
            raise AssertionError(f"node {e['node_id']} ({e['node_type']}) failed: {e['exception_type']}: "
                                 f"{e['exception_message']}\n{''.join(e['traceback'])}")
        raise AssertionError(f"execution failed: {executor.status_messages}")
    results = {}
    for node_id in prompt:
        cached = executor.caches.outputs.get(node_id)
        if cached is None:
            continue
        values = getattr(cached, "outputs", cached)
        results[node_id] = tuple(_unwrap(v) for v in values)
    return SimpleNamespace(outputs=results, ui=executor.history_result.get("outputs", {}), prompt=prompt,
                           messages=server.messages + executor.status_messages, executor=executor,
                           prompt_id=prompt_id)
