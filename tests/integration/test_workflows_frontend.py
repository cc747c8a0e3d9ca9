"""The shipped workflows in ComfyUI's real front end (opt-in: a browser is needed).

Starts the harness's ComfyUI (COMFYUI_PATH, or the one the pack sits in) as a server (CPU, private folders, this checkout as
its only custom-node pack) and opens it in headless Chromium through Playwright. Every shipped
workflow is loaded with ``app.loadGraphData`` as a user's drag and drop would, then checked:

- the front end draws every node at its saved size (none is too small for its widgets);
- nothing overlaps and every node sits in one group (``workflow_layout.layout_problems``);
- the prompt the front end would queue equals the harness's ``ui_to_api_prompt`` (so the
  executor tests run what a user would run);
- ``frontend_node_sizes.json`` still holds this front end's minimum node sizes;
- a workflow saved before the preview's step list was renamed still loads into ``at_steps``.

Run: ``COMFYUI_PATH=... COMFYUI_TEST_BROWSER=/usr/bin/chromium python -m pytest tests/integration -k frontend``
(Debian/Ubuntu: ``apt-get install chromium``; ``pip install playwright``; the front end is ComfyUI's
``comfyui-frontend-package`` requirement). ``COMFYUI_TEST_SCREENSHOTS=folder`` saves one PNG per
workflow.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # also when run as a script
import comfy_workflows as cw  # noqa: E402
from comfy_locate import comfyui_path  # noqa: E402
from workflow_layout import FRONTEND_MIN_SIZES, layout_problems  # noqa: E402

ROOT = HERE.parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
BROWSER = os.environ.get("COMFYUI_TEST_BROWSER", "").strip()

pytestmark = pytest.mark.skipif(
    not BROWSER, reason="set COMFYUI_TEST_BROWSER=/path/to/chromium (and pip install playwright) to check the "
                        "workflows in ComfyUI's real front end")

# Starts ComfyUI's main.py in this interpreter, with the harness's torchvision stand-in where
# torchvision does not import (see conftest).
SERVER = """
import runpy, sys
sys.path.insert(0, {here!r})
import comfy_workflows
comfy_workflows.install_torchvision_stand_in_if_needed({comfy!r})
sys.path.insert(0, {comfy!r})
sys.argv = ["main.py"] + {args!r}
runpy.run_path("main.py", run_name="__main__")
"""

GRAPH = """() => ({
  nodes: window.app.graph._nodes.map(n => [n.id, n.type, Array.from(n.pos), Array.from(n.size)]),
  groups: (window.app.graph._groups || []).map(g => [g.title, Array.from(g._bounding || g.bounding)]),
})"""

FIT_VIEW = """() => {
  const c = window.app.canvas; let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
  for (const g of window.app.graph._groups || []) { const b = g._bounding || g.bounding;
    x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]); x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]); }
  for (const n of window.app.graph._nodes) { x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]); }
  const s = Math.min((window.innerWidth - 160) / (x1 - x0), (window.innerHeight - 240) / (y1 - y0));
  c.ds.scale = s; c.ds.offset[0] = -x0 + 80 / s; c.ds.offset[1] = -y0 + 90 / s; c.setDirty(true, true);
}"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = comfyui_path()[0]
    base = tmp_path_factory.mktemp("comfy_frontend")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-AsynDM-FPDM").symlink_to(ROOT, target_is_directory=True)
    port = _free_port()
    args = ["--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
            "--disable-auto-launch"]
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", SERVER.format(here=str(HERE), comfy=comfy, args=args)],
                            cwd=comfy, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{url}/object_info/AsynDMMaskStepsPreview", timeout=5) as r:
                    if json.load(r):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("ComfyUI did not start (or did not load the pack):\n" + (base / "server.log").read_text()[-3000:])
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def page(server):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 2400, "height": 1400})
        pg.goto(server)
        pg.wait_for_function("window.app && window.app.graph && window.app.canvas && window.LiteGraph",
                             timeout=120_000)
        pg.wait_for_timeout(1500)
        pg.keyboard.press("Escape")  # the first-run template dialog
        yield pg
        browser.close()


def _load(page, workflow):
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    page.wait_for_timeout(300)


@pytest.fixture(scope="module")
def node_classes(server):
    """The pack's and the core's node definitions as the server sees them, for ui_to_api_prompt."""
    with urllib.request.urlopen(f"{server}/object_info", timeout=60) as r:
        info = json.load(r)

    def make(spec):
        inputs = {section: {k: tuple(v) for k, v in spec["input"].get(section, {}).items()}
                  for section in ("required", "optional")}
        return type(spec["name"], (), {"INPUT_TYPES": classmethod(lambda cls: inputs)})

    return {name: make(spec) for name, spec in info.items()}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_in_the_real_front_end(page, node_classes, path):
    workflow = json.loads(path.read_text())
    _load(page, workflow)
    drawn = page.evaluate(GRAPH)
    saved = {n["id"]: n["size"] for n in workflow["nodes"]}
    grown = [(i, kind, saved[i], size) for i, kind, _, size in drawn["nodes"] if list(size) != list(saved[i])]
    assert not grown, f"drawn bigger than saved (id, type, saved, drawn): {grown}"
    assert layout_problems(drawn["nodes"], drawn["groups"]) == []
    queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    ours = cw.ui_to_api_prompt(workflow, node_classes)
    assert {k: v["inputs"] for k, v in queued.items()} == {k: v["inputs"] for k, v in ours.items()}
    shots = os.environ.get("COMFYUI_TEST_SCREENSHOTS")
    if shots:
        page.evaluate(FIT_VIEW)
        page.wait_for_timeout(300)
        pathlib.Path(shots).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(pathlib.Path(shots) / f"{path.stem}.png"))


def _shipped_types():
    return {n["type"] for p in WORKFLOWS for n in json.loads(p.read_text())["nodes"]}


def test_minimum_node_sizes_are_current(page):
    measured = page.evaluate("""(types) => Object.fromEntries(types.map(t => {
        const n = window.LiteGraph.createNode(t); return [t, Array.from(n.computeSize()).map(Math.ceil)]; }))""",
                             sorted(set(FRONTEND_MIN_SIZES) | _shipped_types()))
    assert measured == FRONTEND_MIN_SIZES, f"update tests/frontend_node_sizes.json to {json.dumps(measured)}"


def test_a_workflow_saved_with_the_old_input_name_loads(page):
    workflow = json.loads((ROOT / "workflows" / "asyndm_sd15_dynamic_vs_vanilla.json").read_text())
    node = next(n for n in workflow["nodes"] if n["type"] == "AsynDMMaskStepsPreview")
    node["inputs"] += [{"name": "steps", "type": "STRING", "widget": {"name": "steps"}, "link": None},
                       {"name": "image_index", "type": "INT", "widget": {"name": "image_index"}, "link": None}]
    node["widgets_values"] = ["0, 10, 25, 49", 1]
    _load(page, workflow)
    queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")[str(node["id"])]
    assert queued["inputs"]["at_steps"] == "0, 10, 25, 49" and queued["inputs"]["image_index"] == 1
    assert "steps" not in queued["inputs"]


if __name__ == "__main__":  # as a dev tool: python tests/integration/test_workflows_frontend.py [pytest options]
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
