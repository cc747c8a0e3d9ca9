"""Where the real ComfyUI for the integration suites is: ``COMFYUI_PATH``, else the ComfyUI the pack sits in.

A user who cloned the pack into ``ComfyUI/custom_nodes/<any name>/`` and runs ``python -m pytest``
there gets the integration and front-end suites against that ComfyUI without setting anything:
from the pack's folder we walk up to the first folder that holds ComfyUI's ``nodes.py``,
``execution.py`` and ``comfy/``. The pack's folder is taken both as the shell sees it (``$PWD``,
which keeps a symlinked ``custom_nodes/<name>`` link) and as the file system resolves it.
"""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "COMFYUI_PATH"
PACK_ROOT = pathlib.Path(__file__).resolve().parents[2]


def looks_like_comfyui(folder) -> bool:
    folder = pathlib.Path(folder)
    return (folder / "nodes.py").is_file() and (folder / "execution.py").is_file() and (folder / "comfy").is_dir()


def _pack_folders():
    """The pack's folder as the shell spells it (symlinks kept) and resolved, without duplicates."""
    seen, folders = set(), []
    pwd = os.environ.get("PWD")
    candidates = []
    if pwd:
        logical = pathlib.Path(pwd)
        # $PWD only counts when it is the pack (or inside it): pytest may be run from elsewhere
        for up in [logical, *logical.parents]:
            if up.resolve() == PACK_ROOT:
                candidates.append(up)
                break
    candidates.append(PACK_ROOT)
    for c in candidates:
        if str(c) not in seen:
            seen.add(str(c))
            folders.append(c)
    return folders


def enclosing_comfyui():
    """The ComfyUI folder the pack sits in (``<ComfyUI>/custom_nodes/<name>``), or None."""
    for pack in _pack_folders():
        for up in pack.parents:
            if looks_like_comfyui(up):
                return up
    return None


def comfyui_path():
    """(path, how): ``COMFYUI_PATH`` when set, else the enclosing ComfyUI, else (None, None)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value:
        return value, f"{ENV_VAR}"
    found = enclosing_comfyui()
    if found is not None:
        return str(found), "found by walking up from the pack's folder; COMFYUI_PATH overrides"
    return None, None
