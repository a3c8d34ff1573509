"""Validate response bodies against OpenAI's published schemas (tests/data/openai-schemas.json,
`components.schemas` of openai/openai-openapi 2.3.0). The document is OpenAPI 3.0, whose
`nullable: true` a JSON Schema validator does not know: it is rewritten to "or null".

One documented gap is patched: with `echo`, the live API sends `null` as the first
prompt token's entry in `token_logprobs` and `top_logprobs` (nothing precedes it), which
the schema's item types do not allow. And as the reference README notes, streamed
chunks carry `"finish_reason": null` until the last: `validate(..., streamed=True)`."""

from __future__ import annotations

import copy
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
    components = _nullable_to_null(json.loads(SCHEMAS.read_text())["components"])
    choice = components["schemas"]["CreateCompletionResponse"]["properties"]["choices"]["items"]
    logprobs = choice["properties"]["logprobs"]["anyOf"][0]["properties"]
    for field in ("token_logprobs", "top_logprobs"):
        logprobs[field]["items"] = {"anyOf": [logprobs[field]["items"], {"type": "null"}]}
    chunk = copy.deepcopy(components["schemas"]["CreateCompletionResponse"])
    finish = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    chunk["properties"]["choices"]["items"]["properties"]["finish_reason"] = {"anyOf": [finish, {"type": "null"}]}
    components["schemas"]["StreamedCompletionChunk"] = chunk
    return components


def validate(instance: dict, name: str, streamed: bool = False) -> None:
    """Raise jsonschema.ValidationError unless `instance` is a valid `name` (e.g. CreateChatCompletionResponse)."""
    if streamed and name == "CreateCompletionResponse":
        name = "StreamedCompletionChunk"
    schema = {"$ref": f"#/components/schemas/{name}", "components": _components()}
    jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)
