"""The integration harness finds the ComfyUI the pack sits in, without COMFYUI_PATH.

A user who cloned the pack into ``ComfyUI/custom_nodes/<any name>/`` and runs ``python -m pytest``
there must get the real-ComfyUI suites, and pytest's header must say which ComfyUI they use.
"""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "integration"))
import comfy_locate  # noqa: E402

ROOT = HERE.parent


def comfyui_skeleton(base):
    """The three things that make a folder a ComfyUI for the harness, and a custom_nodes/ folder."""
    (base / "comfy").mkdir(parents=True)
    (base / "nodes.py").write_text("")
    (base / "execution.py").write_text("")
    (base / "custom_nodes").mkdir()
    return base


def test_pack_linked_into_custom_nodes_finds_that_comfyui_and_names_it_in_the_header(tmp_path):
    """A light test file is collected: the header comes from the conftest every run loads.

    Broken variants caught: resolving the pack's path before walking up (a symlinked
    ``custom_nodes/<name>`` then points back at the checkout, which no ComfyUI encloses: the header
    says the suite is skipped), and the header hook in tests/integration/conftest.py (pytest asks
    only the conftest files it loads at start-up: no header line for ``python -m pytest``)."""
    comfy = comfyui_skeleton(tmp_path / "ComfyUI")
    link = comfy / "custom_nodes" / "any-name"
    link.symlink_to(ROOT, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env["PWD"] = str(link)  # what a shell sets after `cd ComfyUI/custom_nodes/any-name`
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider",
                          "tests/test_asyndm_curves.py"],
                         cwd=link, env=env, capture_output=True, text=True, timeout=120)
    header = [line for line in out.stdout.splitlines() if line.startswith("real-ComfyUI integration tests")]
    assert header == [f"real-ComfyUI integration tests: ComfyUI unknown at {comfy} "
                      "(found by walking up from the pack's folder; COMFYUI_PATH overrides)"], out.stdout + out.stderr


def test_environment_variable_wins_and_a_lone_clone_finds_nothing(tmp_path, monkeypatch):
    comfy = comfyui_skeleton(tmp_path / "ComfyUI")
    lone = tmp_path / "clones" / "pack"  # a clone beside ComfyUI, not inside it
    lone.mkdir(parents=True)
    monkeypatch.setattr(comfy_locate, "PACK_ROOT", lone)
    monkeypatch.setenv("PWD", str(lone))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert comfy_locate.comfyui_path() == (None, None)
    monkeypatch.setenv("COMFYUI_PATH", str(comfy))
    assert comfy_locate.comfyui_path() == (str(comfy), "COMFYUI_PATH")


def test_pwd_outside_the_pack_is_ignored(tmp_path, monkeypatch):
    """pytest run from another folder: $PWD is not the pack, so only the pack's real path counts."""
    comfy = comfyui_skeleton(tmp_path / "ComfyUI")
    elsewhere = comfy / "custom_nodes" / "other-pack"
    elsewhere.mkdir()
    monkeypatch.setenv("PWD", str(elsewhere))
    assert comfy_locate._pack_folders() == [comfy_locate.PACK_ROOT]
