"""Every shipped workflow is a drag-and-drop loadable UI workflow that fits our node definitions.

No ComfyUI needed. Core node types are not checked here (the real-ComfyUI suite does that);
everything that touches one of OUR nodes is: link types against RETURN_TYPES / INPUT_TYPES,
input and output slots, and how many widget values the node stores.
"""

import json
import pathlib
import sys

import pytest

import asyndm_fpdm

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
import comfy_workflows as cw  # noqa: E402  (ComfyUI-free helpers: widget order, frontend-only nodes)

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
IDS = [p.name for p in WORKFLOWS]
OURS = asyndm_fpdm.NODE_CLASS_MAPPINGS
NODE_KEYS = ("id", "type", "pos", "size", "flags", "order", "mode", "properties")


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _links(wf):
    return {link[0]: link for link in wf["links"]}


def _all_inputs(cls):
    types_ = cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        out.update(types_.get(section) or {})
    return out


def _type_name(spec):
    kind = spec[0]
    return "COMBO" if isinstance(kind, (list, tuple)) else kind


def _compatible(a, b):
    """ComfyUI's rule: '*' matches anything, otherwise comma-separated alternatives must intersect."""
    if a == "*" or b == "*" or a == b:
        return True
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


def test_workflows_folder_exists():
    assert (ROOT / "workflows").is_dir()
    assert not [p for p in (ROOT / "workflows").iterdir() if p.suffix == ".json" and p.stat().st_size == 0]


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_is_ui_format(path):
    wf = _load(path)
    assert isinstance(wf, dict)
    assert cw.is_ui_workflow(wf), "API-format prompt (or not a workflow): ship the UI format (File → Save)"
    for key, typ in (("nodes", list), ("links", list), ("last_node_id", int), ("last_link_id", int)):
        assert isinstance(wf.get(key), typ), f"missing or malformed {key!r}"
    assert isinstance(wf.get("version"), (int, float)), "missing 'version'"
    assert isinstance(wf.get("groups", []), list)
    ids = [n.get("id") for n in wf["nodes"]]
    assert len(ids) == len(set(ids)), "duplicate node ids"
    assert wf["nodes"], "workflow has no nodes"
    for node in wf["nodes"]:
        missing = [k for k in NODE_KEYS if k not in node]
        assert not missing, f"node {node.get('id')} ({node.get('type')}) lacks {missing}"
        assert isinstance(node["id"], int) and isinstance(node["type"], str)
        assert isinstance(node.get("inputs", []), list) and isinstance(node.get("outputs", []), list)
        # the front end's schema check alerts on load for null (a node without widgets stores [])
        assert isinstance(node.get("widgets_values", []), (list, dict)), f"node {node['id']}: widgets_values is null"
    assert wf["last_node_id"] >= max(ids)
    link_ids = [link[0] for link in wf["links"]]
    assert len(link_ids) == len(set(link_ids)), "duplicate link ids"
    if link_ids:
        assert wf["last_link_id"] >= max(link_ids)
    for link in wf["links"]:
        assert isinstance(link, list) and len(link) == 6, f"link {link!r} is not [id, from, from_slot, to, to_slot, type]"
        assert all(isinstance(v, int) for v in link[:5]) and isinstance(link[5], str)
    assert not (wf.get("definitions") or {}).get("subgraphs"), "subgraphs: keep shipped workflows flat"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_links_reference_existing_nodes_and_slots(path):
    wf = _load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src_id, src_slot, dst_id, dst_slot, ltype in wf["links"]:
        assert src_id in nodes and dst_id in nodes, f"link {link_id} joins missing nodes {src_id}->{dst_id}"
        outs = nodes[src_id].get("outputs") or []
        ins = nodes[dst_id].get("inputs") or []
        assert src_slot < len(outs), f"link {link_id}: node {src_id} has no output slot {src_slot}"
        assert dst_slot < len(ins), f"link {link_id}: node {dst_id} has no input slot {dst_slot}"
        assert link_id in (outs[src_slot].get("links") or []), f"link {link_id} missing from node {src_id}'s output"
        assert ins[dst_slot].get("link") == link_id, f"node {dst_id} input {dst_slot} does not point at link {link_id}"
        assert _compatible(outs[src_slot].get("type"), ltype) or nodes[src_id]["type"] in cw.VIRTUAL_NODES
        assert _compatible(ins[dst_slot].get("type"), ltype) or nodes[dst_id]["type"] in cw.VIRTUAL_NODES
    # and the other direction: every link a node mentions exists
    links = _links(wf)
    for node in wf["nodes"]:
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None:
                assert inp["link"] in links, f"node {node['id']} input {inp.get('name')} uses missing link {inp['link']}"
        for out in node.get("outputs") or []:
            for lid in out.get("links") or []:
                assert lid in links, f"node {node['id']} output {out.get('name')} lists missing link {lid}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_links_touching_our_nodes_fit_our_definitions(path):
    wf = _load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src_id, src_slot, dst_id, dst_slot, ltype in wf["links"]:
        src, dst = nodes[src_id], nodes[dst_id]
        src_type = dst_type = None
        if src["type"] in OURS:
            rt = OURS[src["type"]].RETURN_TYPES
            assert src_slot < len(rt), f"link {link_id}: {src['type']} has only {len(rt)} outputs"
            src_type = rt[src_slot]
            assert _compatible(src_type, ltype), f"link {link_id}: {src['type']} output {src_slot} is {src_type}, link says {ltype}"
        if dst["type"] in OURS:
            inp = dst["inputs"][dst_slot]
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            spec = _all_inputs(OURS[dst["type"]]).get(name)
            assert spec is not None, f"link {link_id}: {dst['type']} has no input {name!r}"
            dst_type = _type_name(spec)
            if dst_type != "COMBO":  # a converted combo widget takes a PrimitiveNode's value: any type name
                assert _compatible(dst_type, ltype), f"link {link_id}: {dst['type']}.{name} takes {dst_type}, link carries {ltype}"
        if src_type is not None and dst_type is not None and dst_type != "COMBO":
            assert _compatible(src_type, dst_type), \
                f"link {link_id}: {src['type']} gives {src_type} but {dst['type']} wants {dst_type}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_our_nodes_slots_and_widget_values_match_definitions(path):
    wf = _load(path)
    for node in wf["nodes"]:
        cls = OURS.get(node["type"])
        if cls is None:
            continue
        where = f"node {node['id']} ({node['type']})"
        outs = node.get("outputs") or []
        assert [o.get("type") for o in outs] == list(cls.RETURN_TYPES), f"{where}: outputs differ from RETURN_TYPES"
        inputs = _all_inputs(cls)
        for inp in node.get("inputs") or []:
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            assert name in inputs, f"{where}: input {name!r} is not in INPUT_TYPES"
        sockets = [n for n, s in inputs.items() if not cw._is_widget(s)]
        required = cls.INPUT_TYPES().get("required") or {}
        linked = {(i.get("widget") or {}).get("name") or i.get("name") for i in node.get("inputs") or []
                  if i.get("link") is not None}
        for name in sockets:
            if name in required:
                assert name in linked, f"{where}: required input {name!r} is not connected"
        values = node.get("widgets_values")
        widgets = cw.widget_inputs(cls)
        if isinstance(values, dict):
            assert set(values) == {n for n, _ in widgets}, f"{where}: widget names differ"
            continue
        values = values or []
        expected = sum(1 + int(cw._has_control_widget(n, s)) + int(cw._has_upload_widget(s)) for n, s in widgets)
        assert len(values) == expected, (f"{where}: {len(values)} widget values, the node defines {expected} "
                                         f"({[n for n, _ in widgets]})")
        mapped = cw.map_widget_values(cls, values)
        for name, spec in widgets:
            v = mapped[name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, (list, tuple)):
                if name.endswith("_name"):
                    # a model-file list (ComfyUI's *_name convention): what is installed differs per
                    # machine; the real-ComfyUI suite validates these against stand-in files
                    assert isinstance(v, str) and v, f"{where}: {name} needs a file name"
                    continue
                assert v in kind, f"{where}: {name}={v!r} is not one of {list(kind)}"
            elif kind == "INT":
                assert isinstance(v, int) and not isinstance(v, bool), f"{where}: {name}={v!r} is not an INT"
            elif kind == "FLOAT":
                assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{where}: {name}={v!r} is not a FLOAT"
            elif kind == "BOOLEAN":
                assert isinstance(v, bool), f"{where}: {name}={v!r} is not a BOOLEAN"
            elif kind == "STRING":
                assert isinstance(v, str), f"{where}: {name}={v!r} is not a STRING"
            if kind in ("INT", "FLOAT"):
                assert opts.get("min") is None or v >= opts["min"], f"{where}: {name}={v} < min {opts['min']}"
                assert opts.get("max") is None or v <= opts["max"], f"{where}: {name}={v} > max {opts['max']}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_layout_nothing_overlaps_at_the_front_ends_node_sizes(path):
    """Groups hold the parts of each comparison; no node covers another once the front end has
    raised every node to its minimum size (the real front-end test checks the drawn sizes)."""
    from workflow_layout import drawn_size, layout_problems

    wf = _load(path)
    assert wf["groups"], "groups name the parts of the comparison"
    grown = [(n["id"], n["type"], n["size"], drawn_size(n)) for n in wf["nodes"] if drawn_size(n) != n["size"]]
    assert not grown, f"the front end draws these bigger than saved: {grown}"
    nodes = [(n["id"], n["type"], n["pos"], n["size"]) for n in wf["nodes"]]
    groups = [(g["title"], g["bounding"]) for g in wf["groups"]]
    assert layout_problems(nodes, groups) == []
