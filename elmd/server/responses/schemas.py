"""Request and response bodies of OpenAI's Responses API (`/v1/responses`), in the shapes
of OpenAI's published schemas (`Response`, `ResponseStreamEvent`).

Like the chat request, fields a client may send that elmd does not implement are declared
so that `unsupported_params` names them instead of ignoring them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from elmd.sampling_options import Int, MaxTokens, SamplingOptions, integer
from elmd.server.limits import MAX_MESSAGES, MAX_TOP_LOGPROBS
from elmd.server.wire import (REFUSES_UNKNOWN, ROLES, TextPart, TokenLogprobInfo, _DropNone, _KeepAlive, _OmitNone,
                              _Request, present, when)

# --------------------------------------------------------------------------- requests

LOGPROBS = "message.output_text.logprobs"  # the one `include` value elmd has something for
TEXT_PARTS = ("input_text", "output_text")  # an earlier answer sent back holds output_text
ITEM_TYPES = ("message", "function_call", "function_call_output")
MEANINGLESS = {"type": ["object", "null"], "additionalProperties": {"type": "null"}}  # see _meaningful


class InputTextPart(TextPart):
    type: str = Field(json_schema_extra={"enum": list(TEXT_PARTS)})


class InputItem(_Request):
    """A message item (`EasyInputMessage`, or an earlier output message sent back), a
    function call the model made (sent back) or a function's output; other item types
    (reasoning, references, hosted tools' calls) are refused by type."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        when("type", ["message"], present("role", "content")),
        when("type", ["function_call"], present("call_id", "name", "arguments")),
        when("type", ["function_call_output"], present("call_id", "output")),
    ]})

    type: str = Field("message", json_schema_extra={"enum": list(ITEM_TYPES)})
    role: str | None = Field(None, json_schema_extra={"enum": [*ROLES, None]})  # of a message
    content: str | list[InputTextPart] | None = None
    id: str | None = None
    status: str | None = None
    call_id: str | None = Field(None, min_length=1, max_length=64)  # function_call, function_call_output
    name: str | None = None  # function_call
    arguments: str | None = None  # function_call
    output: str | list[InputTextPart] | None = None  # function_call_output


class FunctionTool(_Request):
    """A `tools` entry. Function tools (`FunctionToolParam`) are served; hosted tools
    (web search, file search, computer use, MCP, ...) are refused by type."""

    model_config = ConfigDict(strict=True, extra="allow",  # a hosted tool's own fields
                              json_schema_extra={"allOf": [present("name")]})  # hosted tools are refused anyway

    type: str = Field(json_schema_extra={"enum": ["function"]})
    name: str | None = Field(None, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def echoed(self) -> dict:
        """As OpenAI's `FunctionTool` echoes it in the response."""
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters, "strict": self.strict if self.strict is not None else True}


class NamedFunctionChoice(_Request):
    type: str = Field(json_schema_extra={"enum": ["function"]})
    name: str | None = None


class TextParam(_Request):
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class ResponsesRequest(_KeepAlive, SamplingOptions):
    model_config = REFUSES_UNKNOWN

    model: str
    input: str | list[InputItem] = Field(max_length=MAX_MESSAGES)
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True
    text: TextParam | None = None
    # the sampling options (elmd/sampling_options.py), `stop` and the extras local servers accept among them
    # harmless metadata, accepted and not used
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    stream_options: dict[str, Any] | None = None
    max_tool_calls: Int | None = None
    parallel_tool_calls: bool | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    # not implemented: present and meaningful -> 400 naming the field
    include: list[str] | None = Field(None, json_schema_extra={"items": {"enum": [LOGPROBS]}})
    top_logprobs: integer(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    reasoning: dict[str, Any] | None = Field(None, json_schema_extra=MEANINGLESS)
    background: bool | None = Field(None, json_schema_extra={"enum": [False, None]})
    conversation: Any = Field(None, json_schema_extra=MEANINGLESS)
    prompt: Any = Field(None, json_schema_extra=MEANINGLESS)
    truncation: str | None = Field(None, json_schema_extra={"enum": ["disabled", None]})

    def unsupported_params(self) -> list[str]:
        names = [f"tools[{i}].type" for i, tool in enumerate(self.tools or []) if tool.type != "function"]
        if isinstance(self.tool_choice, NamedFunctionChoice) and self.tool_choice.type != "function":
            names.append("tool_choice")
        if any(value != LOGPROBS for value in self.include or []):
            names.append("include")
        if self.truncation not in (None, "disabled"):
            names.append("truncation")
        for name in ("reasoning", "conversation", "prompt"):
            if _meaningful(getattr(self, name)):
                names.append(name)
        if self.background:
            names.append("background")
        return names

    def invalid_params(self) -> list[tuple[str, str]]:
        """(param, message) for what single fields cannot reject."""
        names = [tool.name for tool in self.tools or []]
        if None in names:
            return [(f"tools[{names.index(None)}].name", f"Missing required parameter: 'tools[{names.index(None)}].name'.")]
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            return [("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")]
        if isinstance(self.tool_choice, NamedFunctionChoice) and self.tool_choice.name not in names:
            return [("tool_choice", f"Invalid value for 'tool_choice': no function named "
                                    f"'{self.tool_choice.name}' in 'tools'.")]
        if self.tools and self.tool_choice != "none":
            if self.text and self.text.format and self.text.format.get("type") != "text":
                return [("text.format", "'text.format' cannot be combined with 'tools'.")]
            if self.logprobs() is not None:
                return [("include", f"'{LOGPROBS}' cannot be combined with 'tools' (the reply's tokens are "
                                    "a tool-call JSON, not the output text).")]
        return []

    def logprobs(self) -> int | None:
        """Alternatives per token when the output's logprobs are asked for, else None."""
        return (self.top_logprobs or 0) if LOGPROBS in (self.include or []) else None


def _meaningful(value: Any) -> bool:
    """Set to something: not null, and not an object of nulls (`"reasoning": {"effort": null}`)."""
    if isinstance(value, dict):
        return any(v is not None for v in value.values())
    return value is not None


# --------------------------------------------------------------------------- responses


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[TokenLogprobInfo] = Field(default_factory=list)  # OpenAI's LogProb: chat's entries


class FunctionCallItem(BaseModel):
    """OpenAI's `FunctionToolCall` output item."""

    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseText(BaseModel):
    format: dict[str, Any] = Field(default_factory=lambda: {"type": "text"})  # the request's, as OpenAI echoes it


class ResponseObject(_OmitNone):
    """OpenAI's `Response` (`usage` only once it is done)."""

    omit_none = ("usage",)

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "in_progress", "incomplete", "failed"]
    completed_at: int | None = None
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    top_logprobs: int | None = None
    model: str
    output: list[OutputMessage | FunctionCallItem]
    parallel_tool_calls: bool = False
    previous_response_id: str | None
    store: bool
    temperature: float
    top_p: float
    text: ResponseText = Field(default_factory=ResponseText)
    tool_choice: Literal["none", "auto", "required"] | dict[str, str] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    truncation: Literal["disabled"] = "disabled"
    background: bool = False
    usage: ResponseUsage | None = None  # left out until the response is done (the schema has no null)
    metadata: dict[str, str] = Field(default_factory=dict)


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class ResponseEvent(_DropNone):
    """One streamed event; each type carries the fields OpenAI's schema gives it."""

    type: str
    sequence_number: int
    response: ResponseObject | None = None
    output_index: int | None = None
    item_id: str | None = None
    content_index: int | None = None
    item: OutputMessage | FunctionCallItem | None = None
    part: OutputText | None = None
    delta: str | None = None
    text: str | None = None
    name: str | None = None
    arguments: str | None = None
    logprobs: list[TokenLogprobInfo] | None = None


class ResponseErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    code: str | None
    message: str
    param: str | None
    sequence_number: int
