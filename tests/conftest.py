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


def pytest_configure(config):
    """Every test module needs torch: without it, one message that says how to install it
    instead of an import error per module."""
    if importlib.util.find_spec("torch") is None:
        pytest.exit(f"torch is not installed in this Python ({sys.executable}): run the README's first command, "
                    'pip install torch==2.13.0 && pip install -e ".[test]"', returncode=pytest.ExitCode.USAGE_ERROR)


_import_checkout_as_package()
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_report_header(config):
    """Which ComfyUI the integration suites use (here, not in tests/integration/conftest.py: pytest
    asks only the conftest files it loads at start-up, and that one loads later)."""
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    try:
        from comfy_locate import ENV_VAR, comfyui_path
    finally:
        sys.path.pop(0)
    path, how = comfyui_path()
    if not path:
        return (f"real-ComfyUI integration tests: skipped ({ENV_VAR} not set and the pack is not inside "
                "a ComfyUI's custom_nodes/)")
    version = "unknown"
    vfile = pathlib.Path(path) / "comfyui_version.py"
    if vfile.is_file():
        for line in vfile.read_text().splitlines():
            if line.startswith("__version__"):
                version = line.split("=", 1)[1].strip().strip("\"'")
    return f"real-ComfyUI integration tests: ComfyUI {version} at {path} ({how})"


@pytest.fixture
def repo_root():
    return ROOT


# Suites, by where a test lives; the summary prints one line per suite so a CI log shows at a
# glance whether the optional suites ran or skipped.
SUITES = (
    ("front end", "tests/integration/test_workflows_frontend.py"),
    ("integration", "tests/integration/"),
    ("reference parity", "tests/test_asyndm_reference_parity.py"),
    ("unit", "tests/"),
)
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def suite_of(nodeid):
    path = nodeid.split("::", 1)[0].replace("\\", "/")
    return next((name for name, prefix in SUITES if path.startswith(prefix)), "other")


def pytest_terminal_summary(terminalreporter):
    counts = {}
    for outcome in OUTCOMES:
        seen = set()
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if not nodeid or nodeid in seen:  # an error in setup and teardown counts once
                continue
            seen.add(nodeid)
            suite = counts.setdefault(suite_of(nodeid), dict.fromkeys(OUTCOMES, 0))
            suite[outcome] += 1
    if not counts:
        return
    terminalreporter.section("tests per suite")
    for name in [n for n, _ in SUITES] + ["other"]:
        if name in counts:
            shown = ", ".join(f"{n} {o}" for o, n in counts[name].items() if n)
            terminalreporter.write_line(f"{name:>17}: {shown}")
