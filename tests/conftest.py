"""Shared test set-up.

The checkout is imported as the package ``asyndm_fpdm`` whatever its folder is called,
so the tests run from any clone (installed with ``pip install -e .`` or not).
"""

import importlib.util
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _import_checkout_as_package():
    mod = sys.modules.get("asyndm_fpdm")
    if mod is not None and pathlib.Path(mod.__file__).resolve().parent == ROOT:
        return mod
    for name in [n for n in sys.modules if n == "asyndm_fpdm" or n.startswith("asyndm_fpdm.")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        "asyndm_fpdm", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["asyndm_fpdm"] = mod
    spec.loader.exec_module(mod)
    return mod


_import_checkout_as_package()
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def repo_root():
    return ROOT
