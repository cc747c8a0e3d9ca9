"""The shipped FPDM workflows are UI-format files ComfyUI's Load can open (executed in tests/integration)."""

import json
import pathlib

import pytest

from asyndm_fpdm.nodes.fpdm_nodes import NODE_CLASS_MAPPINGS

WF = sorted((pathlib.Path(__file__).resolve().parents[1] / "workflows").glob("fpdm_*.json"))
CORE = {"EmptyLatentImage", "VAELoader", "VAEDecode", "SaveImage", "KSampler", "Note"}


def test_the_three_workflows_exist():
    assert {p.name for p in WF} >= {"fpdm_class_to_image.json", "fpdm_vs_dit.json", "fpdm_same_budget.json"}


@pytest.mark.parametrize("path", WF, ids=[p.name for p in WF])
def test_ui_format_links_and_note(path):
    ui = json.loads(path.read_text())
    assert {"nodes", "links", "groups", "config", "extra", "version"} <= set(ui)
    ids = {n["id"] for n in ui["nodes"]}
    for n in ui["nodes"]:
        assert {"id", "type", "pos", "size", "inputs", "outputs", "widgets_values"} <= set(n)
        assert n["type"] in CORE or n["type"] in NODE_CLASS_MAPPINGS, n["type"]
    for link_id, a, a_slot, b, b_slot, kind in ui["links"]:
        assert a in ids and b in ids
        src = next(n for n in ui["nodes"] if n["id"] == a)
        dst = next(n for n in ui["nodes"] if n["id"] == b)
        assert link_id in src["outputs"][a_slot]["links"] and dst["inputs"][b_slot]["link"] == link_id
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    text = notes[0]["widgets_values"][0].lower() if notes else ""
    assert len(text) > 150 and ("fpdm" in text or "fixed-point" in text)
    assert any(n["type"] == "VAEDecode" for n in ui["nodes"])
