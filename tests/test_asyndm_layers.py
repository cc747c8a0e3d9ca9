"""The layers DESIGN.md describes: the pure AsynDM engine imports neither ComfyUI nor diffusers."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PURE = ["curves", "time_axis", "plan", "clock", "pixel_samplers", "masks", "tokens", "schedulers", "engine"]


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
    assert imported <= {"torch", "math", "bisect", "typing", "dataclasses", "inspect", "numpy", "einops"}, imported


def test_every_subpackage_is_installed():
    """`pip install .` ships the packages pyproject.toml lists: every folder with an __init__.py."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"asyndm_fpdm" + "".join("." + part for part in p.parent.relative_to(ROOT).parts)
             for p in ROOT.rglob("__init__.py")
             if not any(part.startswith(".") or part in ("tests", "build") for part in p.relative_to(ROOT).parts)}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
