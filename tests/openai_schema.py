"""Validate response bodies against OpenAI's published schemas (tests/data/openai-schemas.json,
`components.schemas` of openai/openai-openapi 2.3.0). The document is OpenAPI 3.0, whose
`nullable: true` a JSON Schema validator does not know: it is rewritten to "or null"."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jsonschema

SCHEMAS = Path(__file__).parent / "data" / "openai-schemas.json"


def _nullable_to_null(node):
    if isinstance(node, list):
        return [_nullable_to_null(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_to_null(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@lru_cache(maxsize=None)
def _components() -> dict:
    return _nullable_to_null(json.loads(SCHEMAS.read_text())["components"])


def validate(instance: dict, name: str) -> None:
    """Raise jsonschema.ValidationError unless `instance` is a valid `name` (e.g. CreateChatCompletionResponse)."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": _components()}
    jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)
