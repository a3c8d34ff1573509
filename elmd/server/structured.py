"""A request's output constraint: `response_format` (OpenAI chat), `text.format` (OpenAI
Responses), `format` (Ollama), or llama.cpp's top-level `json_schema` and `grammar`. Each is compiled once here, without the model, so a schema
llguidance cannot follow is a 400 naming the parameter and the feature before any model
loads."""

from __future__ import annotations

from elmd.engine.engine import GrammarError, compile_constraint
from elmd.engine.protocol import Constraint
from elmd.server.errors import invalid

ANY_OBJECT: dict = {"type": "object"}


def checked(constraint: Constraint, param: str, what: str) -> Constraint:
    """`constraint`, or a 400 naming `param` when llguidance cannot compile it."""
    try:
        compile_constraint(constraint)
    except GrammarError as exc:
        raise invalid(f"Invalid {what} for '{param}': {exc}", param=param, code="invalid_value") from None
    return constraint


def json_output(schema: dict | bool | None, param: str) -> Constraint:
    """Output that parses as JSON and follows `schema` (None: any JSON object)."""
    return checked(Constraint.json_schema(ANY_OBJECT if schema is None else schema), param, "JSON schema")


def text_format_constraint(text_format: dict | None) -> Constraint | None:
    """The Responses API's `text.format`: text, json_object, or json_schema with its `schema`."""
    kind = (text_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_output(None, "text.format")
    if kind == "json_schema":
        if not isinstance(text_format.get("schema"), (dict, bool)):
            raise invalid("Missing required parameter: 'text.format.schema'.", param="text.format.schema")
        return json_output(text_format["schema"], "text.format.schema")
    raise invalid(f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object' and 'json_schema'.",
                  param="text.format.type", code="invalid_value")


def ollama_format_constraint(output_format: str | dict | None) -> Constraint | None:
    """Ollama's `format`: "json" (a JSON object, as llama.cpp's JSON grammar) or a JSON schema."""
    if output_format in (None, ""):
        return None
    if output_format == "json":
        return json_output(None, "format")
    if isinstance(output_format, dict):
        return json_output(output_format, "format")
    raise invalid(f"invalid format '{output_format}': use \"json\" or a JSON schema", param="format")


