"""The pieces every API dialect's bodies are built from: strict request models that refuse
unknown fields by name, keep_alive, text parts, function tools and calls, token usage and
log-probabilities, and serializers for objects sent sparsely. Dialect schemas live in their
packages (openai/, responses/, ollama/); the sampling options in elmd/sampling_options.py.

Requests are validated strictly (a string where a number belongs is a 400 naming the
field, never a silent coercion). Fields a client may send that elmd does not implement
are declared too, so that `unsupported_params` can name them instead of ignoring them;
a top-level field nobody declared is refused as OpenAI refuses it (`unrecognized_params`).
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from elmd.engine.engine import Engine
from elmd.engine.protocol import TokenLogprob
from elmd.server.errors import invalid, unsupported
from elmd.settings import parse_duration


# The roles a message may have, each as the chat template sees it; "tool" results are
# rendered apart (elmd/server/tools.py). Any other role is refused by name.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


MESSAGE_ROLES = [*ROLES, "tool"]


# For requests that keep unknown fields only to refuse them by name: the schema says they are refused.
REFUSES_UNKNOWN = ConfigDict(strict=True, extra="allow", json_schema_extra={"additionalProperties": False})


# What the schema allows of a field elmd declares but does not implement (any other value is
# a 400 naming it): null, or any value that sets nothing.
NULL = {"enum": [None]}


UNSET = {"enum": [None, False, 0, "", [], {}]}


def present(*names: str) -> dict:
    """A schema clause for what the routes check after validation: each of `names` set, not null."""
    return {"required": list(names), "properties": {name: {"not": {"type": "null"}} for name in names}}


def when(field: str, values: list, then: dict) -> dict:
    """A schema clause: `then` applies where `field` is one of `values` (or absent, if its default is)."""
    return {"if": {"properties": {field: {"enum": values}}}, "then": then}


class _Request(BaseModel):
    # Unknown fields inside a message or an option object are ignored (clients echo back
    # assistant messages with fields such as `annotations`); at the top level of a
    # generation request they are kept, to be refused by name.
    model_config = ConfigDict(strict=True, extra="ignore")

    def unrecognized_params(self) -> list[str]:
        """Top-level fields that are neither OpenAI's nor a documented extension (kept only
        by requests that allow extra fields, to refuse them; others ignore them)."""
        return list(self.model_extra or {})


class FunctionCall(_Request):
    name: str
    arguments: str


class TextPart(_Request):
    model_config = ConfigDict(json_schema_extra={"allOf": [present("text")]})

    type: str = Field(json_schema_extra={"enum": ["text"]})  # a str: other kinds are refused as unsupported
    text: str | None = None


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


# A keep_alive string as elmd.settings.parse_duration reads it: seconds ("300", "-1") or a duration ("1h30m").
DURATION = r"^\s*[+-]*((\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|(\d+(\.\d+)?(ms|s|m|h))+)\s*$"


class _KeepAlive(_Request):
    # Ollama's: seconds or "5m"; negative: forever
    keep_alive: str | int | float | None = Field(None, json_schema_extra={"pattern": DURATION})

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: str | int | float | None) -> str | int | float | None:
        if isinstance(value, str) and not re.match(DURATION, value):  # what the schema says, no more
            raise ValueError(f"invalid duration {value!r}: use seconds or e.g. '5m', '1h30m'")
        seconds = parse_duration(value)  # a ValueError here is a 400 naming keep_alive; inf: forever
        if seconds is not None and math.isnan(seconds):  # NaN: not JSON, yet Python's parser reads it
            raise ValueError("expected a number of seconds or a duration such as '5m'")
        return value

    def keep_alive_seconds(self) -> tuple[bool, float | None]:
        """(whether the request set keep_alive, seconds or None for forever)."""
        if "keep_alive" not in self.model_fields_set or self.keep_alive is None:
            return False, None
        return True, parse_duration(self.keep_alive)


class _DropNone(BaseModel):
    """Serializes without the fields that are None (for objects OpenAI sends sparsely)."""

    @model_serializer(mode="wrap")
    def _without_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class _OmitNone(BaseModel):
    """Serializes without the fields named in `omit_none` while they are None: fields OpenAI
    leaves out rather than sending as null."""

    omit_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None or k not in self.omit_none}


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobInfo(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def joined_text(parts: list[TextPart], param: str, types: tuple[str, ...] = ("text",)) -> str:
    """The text of content parts, one per line; 400 naming any part of another kind."""
    texts = []
    for j, part in enumerate(parts):
        if part.type not in types:
            raise unsupported(f"{param}[{j}].type")
        if part.text is None:
            raise invalid(f"Missing required parameter: '{param}[{j}].text'.", param=f"{param}[{j}].text")
        texts.append(part.text)
    return "\n".join(texts)


def token_logprobs(engine: Engine, logprobs: list[TokenLogprob], top: int) -> list[TokenLogprobInfo]:
    """The engine's log-probabilities as OpenAI's chat and Responses APIs send them."""
    tokenizer = engine.tokenizer

    def entry(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=tokenizer.token_text(token_id), logprob=logprob, bytes=list(tokenizer.token_bytes(token_id)))

    infos = []
    for lp in logprobs:
        chosen = entry(lp.token_id, lp.logprob)
        infos.append(TokenLogprobInfo(**chosen.model_dump(), top_logprobs=[entry(t, l) for t, l in lp.top[:top]]))
    return infos
