"""Geometry of a UI workflow as ComfyUI's front end draws it: what overlaps what.

A node's ``pos`` is the top-left corner of its body; the title bar (LiteGraph's
NODE_TITLE_HEIGHT, 30 px) sits above it. A group's ``bounding`` is [x, y, w, h] including its
title. Shared by the ComfyUI-free format test (saved sizes, raised to the front end's minimum
sizes from ``frontend_node_sizes.json``) and the real front-end test (sizes as drawn).
"""

import json
import pathlib

TITLE_HEIGHT = 30
NOTE_TYPES = ("Note", "MarkdownNote")
# The front end's smallest size for each node type with its default title (computeSize() in
# ComfyUI_frontend 1.27.10): it draws a node at least this big whatever size the file says.
FRONTEND_MIN_SIZES = json.loads((pathlib.Path(__file__).parent / "frontend_node_sizes.json").read_text())


def node_rect(pos, size):
    return (pos[0], pos[1] - TITLE_HEIGHT, size[0], size[1] + TITLE_HEIGHT)


def drawn_size(node):
    """The size the front end draws a saved node at: never below its minimum."""
    w, h = node["size"]
    mw, mh = FRONTEND_MIN_SIZES.get(node["type"], (0, 0))
    return [max(w, mw), max(h, mh)]


def _overlap(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _inside(a, b):
    return b[0] <= a[0] and b[1] <= a[1] and a[0] + a[2] <= b[0] + b[2] and a[1] + a[3] <= b[1] + b[3]


def layout_problems(nodes, groups):
    """nodes: [(id, type, pos, size)], groups: [(title, [x, y, w, h])] → what a reader would trip
    over: nodes covering each other, a node cut by a group's edge or in two groups, groups
    covering each other, a node other than a note outside every group."""
    rects = {i: node_rect(pos, size) for i, _, pos, size in nodes}
    kinds = {i: kind for i, kind, _, _ in nodes}
    problems = []
    ids = sorted(rects)
    for k, a in enumerate(ids):
        for b in ids[k + 1:]:
            if _overlap(rects[a], rects[b]):
                problems.append(f"nodes {a} ({kinds[a]}) and {b} ({kinds[b]}) overlap")
        touching = [t for t, box in groups if _overlap(rects[a], box)]
        if len(touching) > 1:
            problems.append(f"node {a} ({kinds[a]}) lies in several groups: {touching}")
        elif touching and not _inside(rects[a], dict(groups)[touching[0]]):
            problems.append(f"node {a} ({kinds[a]}) sticks out of group {touching[0]!r}")
        elif not touching and kinds[a] not in NOTE_TYPES:
            problems.append(f"node {a} ({kinds[a]}) is in no group")
    for k, (t, box) in enumerate(groups):
        for u, other in groups[k + 1:]:
            if _overlap(box, other):
                problems.append(f"groups {t!r} and {u!r} overlap")
    return problems
