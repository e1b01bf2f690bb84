"""Nested dicts <-> the flat `a.b.c` keys that W&B's grouping and parallel-coordinates plots work on."""

from __future__ import annotations

from typing import Any


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 8}} -> {'lora.r': 8}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}
