"""Every node of the pack has a complete, self-consistent schema (no ComfyUI needed).

INPUT_TYPES must work without ComfyUI installed: CI checks schemas and workflow files on machines
that have no ComfyUI (see DESIGN.md, "Layers"). A loader's file-list combo may be empty there
(``try: import folder_paths except ImportError: files = []``).
"""

import pytest

import asyndm_fpdm

CATEGORY_ROOT = "AsynDM & FPDM"
MAPPINGS = asyndm_fpdm.NODE_CLASS_MAPPINGS
DISPLAY = asyndm_fpdm.NODE_DISPLAY_NAME_MAPPINGS
NODE_NAMES = sorted(MAPPINGS)
SECTIONS = ("required", "optional")
PRIMITIVES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def _input_types(name):
    cls = MAPPINGS[name]
    try:
        return cls.INPUT_TYPES()
    except ImportError as exc:  # pragma: no cover - message for the developer
        pytest.fail(f"{name}.INPUT_TYPES() needs {exc.name!r}; it must work without ComfyUI")


def _inputs(name):
    types_ = _input_types(name)
    for section in SECTIONS:
        for inp, spec in (types_.get(section) or {}).items():
            yield section, inp, spec


def test_mappings_are_consistent():
    assert isinstance(MAPPINGS, dict) and isinstance(DISPLAY, dict)
    assert set(DISPLAY) <= set(MAPPINGS), f"display names for unknown nodes: {set(DISPLAY) - set(MAPPINGS)}"
    # ComfyUI keys node types globally: one class per name, names are identifiers without spaces
    assert len({id(c) for c in MAPPINGS.values()}) == len(MAPPINGS), "one class registered under two names"
    for name in MAPPINGS:
        assert name and " " not in name and "/" not in name, f"bad node type name {name!r}"
    from asyndm_fpdm.nodes import common
    assert common.PACK_NAME == CATEGORY_ROOT


@pytest.mark.parametrize("name", NODE_NAMES)
def test_category_and_display_name(name):
    cls = MAPPINGS[name]
    category = getattr(cls, "CATEGORY", None)
    assert isinstance(category, str) and category.split("/")[0] == CATEGORY_ROOT, \
        f"{name}.CATEGORY = {category!r} is not under {CATEGORY_ROOT!r}"
    assert DISPLAY.get(name), f"{name} has no entry in NODE_DISPLAY_NAME_MAPPINGS"
    assert isinstance(getattr(cls, "DESCRIPTION", ""), str)


@pytest.mark.parametrize("name", NODE_NAMES)
def test_function_and_outputs(name):
    cls = MAPPINGS[name]
    fn_name = getattr(cls, "FUNCTION", None)
    assert isinstance(fn_name, str) and callable(getattr(cls, fn_name, None)), f"{name}.FUNCTION names no method"
    rt = getattr(cls, "RETURN_TYPES", None)
    assert isinstance(rt, tuple), f"{name}.RETURN_TYPES must be a tuple"
    assert all(isinstance(t, str) and t for t in rt), f"{name}.RETURN_TYPES must be type names"
    assert rt or getattr(cls, "OUTPUT_NODE", False), f"{name} has no outputs and is not an OUTPUT_NODE"
    names = getattr(cls, "RETURN_NAMES", None)
    if names is not None:
        assert len(names) == len(rt), f"{name}: RETURN_NAMES {names} vs RETURN_TYPES {rt}"
    tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
    if tips is not None:
        assert len(tips) == len(rt), f"{name}: OUTPUT_TOOLTIPS length differs from RETURN_TYPES"
    is_list = getattr(cls, "OUTPUT_IS_LIST", None)
    if is_list is not None:
        assert len(is_list) == len(rt)


@pytest.mark.parametrize("name", NODE_NAMES)
def test_inputs_are_well_formed_and_documented(name):
    types_ = _input_types(name)
    assert isinstance(types_, dict) and isinstance(types_.get("required", {}), dict)
    assert set(types_) <= {"required", "optional", "hidden"}, f"{name}: unknown INPUT_TYPES sections {set(types_)}"
    fn = getattr(MAPPINGS[name], MAPPINGS[name].FUNCTION)
    for section, inp, spec in _inputs(name):
        where = f"{name}.{inp}"
        assert isinstance(spec, tuple) and spec, f"{where}: spec must be a non-empty tuple"
        kind = spec[0]
        opts = spec[1] if len(spec) > 1 else {}
        assert isinstance(opts, dict), f"{where}: options must be a dict"
        assert isinstance(opts.get("tooltip"), str) and opts["tooltip"].strip(), f"{where} has no tooltip"
        if isinstance(kind, (list, tuple)):  # may be empty: a file list without ComfyUI or models
            if "default" in opts:
                assert opts["default"] in kind, f"{where}: default {opts['default']!r} not among the choices"
        else:
            assert isinstance(kind, str) and kind, f"{where}: type must be a name or a list of choices"
            if kind in ("INT", "FLOAT") and "default" in opts:
                lo, hi, d = opts.get("min"), opts.get("max"), opts["default"]
                assert lo is None or d >= lo, f"{where}: default {d} < min {lo}"
                assert hi is None or d <= hi, f"{where}: default {d} > max {hi}"
                if kind == "INT":
                    assert isinstance(d, int) and not isinstance(d, bool), f"{where}: INT default must be int"
            if kind == "BOOLEAN" and "default" in opts:
                assert isinstance(opts["default"], bool)
    # the function accepts every input by name (ComfyUI calls it with keyword arguments)
    import inspect
    params = inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        for section, inp, _ in _inputs(name):
            assert inp in params, f"{name}.{MAPPINGS[name].FUNCTION}() does not accept input {inp!r}"
            if section == "optional":
                assert params[inp].default is not inspect.Parameter.empty, \
                    f"{name}: optional input {inp!r} needs a default in {MAPPINGS[name].FUNCTION}()"
