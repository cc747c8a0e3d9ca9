"""The layers DESIGN.md describes: the pure AsynDM engine imports neither ComfyUI nor diffusers."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PURE = ["curves", "schedule", "plan", "pixel_samplers", "masks", "tokens", "schedulers", "engine"]


@pytest.mark.parametrize("name", PURE + ["backends/pixel_math"])
def test_pure_engine_modules_import_no_framework(name):
    tree = ast.parse((ROOT / "samplers" / f"{name}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            assert node.module.split(".")[0] in PURE + ["backends"], f"{name} imports the non-pure .{node.module}"
    assert not imported & {"comfy", "comfy_extras", "nodes", "diffusers", "transformers", "folder_paths"}, imported
    assert imported <= {"torch", "math", "typing", "dataclasses", "inspect", "numpy", "einops"}, imported
