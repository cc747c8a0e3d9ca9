"""ImageNet-1k class names (public label list) and the class-choice helpers of the nodes/CLI."""

from __future__ import annotations

import functools
import json
import os
from typing import List, Sequence, Union

NULL_CLASS = -1  # in CONDITIONING / the CLI: "no class"; the model maps it to its null row


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> List[str]:
    with open(os.path.join(os.path.dirname(__file__), "imagenet_classes.json"), encoding="utf-8") as fh:
        return json.load(fh)


def choice_list() -> List[str]:
    """'207: golden retriever' strings for a dropdown."""
    return [f"{i}: {name}" for i, name in enumerate(imagenet_classes())]


def parse_class(value: Union[int, str]) -> int:
    """An index, '207: golden retriever', or a class name (case-insensitive) -> index."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    head = text.split(":", 1)[0].strip()
    if head.lstrip("-").isdigit():
        return int(head)
    names = [n.lower() for n in imagenet_classes()]
    if text.lower() in names:
        return names.index(text.lower())
    close = [n for n in imagenet_classes() if text.lower() in n.lower()][:5]
    raise ValueError(f"unknown ImageNet class {text!r}" + (f"; did you mean one of {close}?" if close else
                                                           "; give an index 0-999 or an exact class name"))


def parse_classes(values: Union[str, Sequence]) -> List[int]:
    """'207, 360, goldfish' or a list -> indices."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    return [parse_class(v) for v in values]
