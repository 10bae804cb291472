"""JSON Schema (draft 2020-12) of the rollout spec, for editors (``lockgate schema`` prints it).

Generated from the typed models of the file format (:mod:`lockgate.controller.decide.spec.document`,
pydantic's ``model_json_schema()``), then made self-contained for editors: ``$ref`` to ``$defs`` inlined
(the format has no recursion), pydantic's automatic ``title`` of each property and ``default: null`` of
optional fields dropped. ``tests/unit/test_rollout_spec.py`` checks it against the parser's field tables
and the examples. The schema is an editing aid — it cannot express every rule (0.01 % weight resolution,
strictly increasing steps, accuracy needing per-class metrics, the sum of per-metric alphas, model/version
existence); ``lockgate validate`` is authoritative.

To use it in VS Code (redhat.vscode-yaml): ``lockgate schema > rollout.schema.json`` and add
``# yaml-language-server: $schema=./rollout.schema.json`` as the first line of a rollout file.
"""

from __future__ import annotations

import json
from typing import Any

SCHEMA_ID = "urn:lockgate:rollout-spec:v1"


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """``node`` with every ``{"$ref": "#/$defs/X"}`` replaced by (a copy of) X, and generated noise removed."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = {k: v for k, v in _inline(defs[node["$ref"].rsplit("/", 1)[1]], defs).items() if k != "title"}
        rest = {k: _inline(v, defs) for k, v in node.items() if k != "$ref"}
        return {**target, **rest}
    out = {}
    for key, value in node.items():
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: _strip(_inline(prop, defs)) for name, prop in value.items()}
        elif key != "$defs":
            out[key] = _inline(value, defs)
    return out


def _strip(prop: dict[str, Any]) -> dict[str, Any]:
    prop = {k: v for k, v in prop.items() if k != "title" and not (k == "default" and v is None)}
    for key in ("anyOf", "oneOf"):
        if key in prop:
            prop[key] = [_strip(alt) if isinstance(alt, dict) else alt for alt in prop[key]]
    return prop


def rollout_schema() -> dict[str, Any]:
    """The schema as a dict (JSON-serialisable)."""
    from lockgate.controller.decide.spec.document import SpecDocument

    generated = SpecDocument.model_json_schema(by_alias=True, mode="validation")
    body = _inline(generated, generated.get("$defs", {}))
    body.pop("title", None)
    body.pop("description", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "lockgate rollout spec",
        "description": "One progressive canary rollout (docs/rollout-spec.md). `lockgate validate FILE` is "
                       "authoritative; this schema is an editing aid.",
        **body,
    }


def schema_json(indent: int = 2) -> str:
    return json.dumps(rollout_schema(), indent=indent, ensure_ascii=False) + "\n"


__all__ = ["SCHEMA_ID", "rollout_schema", "schema_json"]
