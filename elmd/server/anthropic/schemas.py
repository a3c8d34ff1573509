"""Request and response bodies of Anthropic's Messages API (`/v1/messages`), in the shapes
of Anthropic's published API and its SDKs' types.

As on the other dialects, fields a client may send that elmd does not implement are
declared so that `unsupported_params` names them (extended thinking, images, documents,
server tools, MCP servers), and an unknown top-level field is refused by name. The
sampling options are the shared ones (elmd/sampling_options.py), `stop` spelt
`stop_sequences` as Anthropic spells it; `seed` and the other extras local servers accept
are taken too."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from elmd.engine.protocol import Constraint
from elmd.sampling_options import MaxTokens, SamplingOptions
from elmd.server.limits import MAX_MESSAGES
from elmd.server.structured import json_output
from elmd.server.wire import NULL, REFUSES_UNKNOWN, _KeepAlive, _Request, present, when

# Content blocks elmd reads; any other type (image, document, thinking, server tools'
# results, ...) is refused by name.
TEXT, TOOL_USE, TOOL_RESULT = "text", "tool_use", "tool_result"
BLOCK_TYPES = (TEXT, TOOL_USE, TOOL_RESULT)
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"

# --------------------------------------------------------------------------- requests


class ContentBlock(_Request):
    """One block of a message: `text`; `tool_use` (an assistant's call); `tool_result` (its
    answer, in a user turn). Cache hints (`cache_control`) and citations are ignored: the
    prefix cache needs no hint."""

    type: str = Field(json_schema_extra={"enum": list(BLOCK_TYPES)})  # a str: other kinds are refused as unsupported
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[ContentBlock] | None = None
    is_error: bool | None = None


class Message(_Request):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class SystemBlock(_Request):
    type: Literal["text"]
    text: str


class Tool(_Request):
    """A client tool. Server tools (`type` such as `web_search_20250305`) are refused by name."""

    type: str | None = Field(None, json_schema_extra={"enum": ["custom", None]})
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Request):
    """`any` and `tool` also need `tools` (and `tool`'s name among them): checked by the route."""

    model_config = ConfigDict(json_schema_extra={"allOf": [when("type", ["tool"], present("name"))]})

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Metadata(_Request):
    user_id: str | None = None


class JSONOutputFormat(_Request):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Request):
    """`format`: the reply follows a JSON schema. `effort` steers extended thinking, which
    these models do not do: accepted, with nothing to change."""

    format: JSONOutputFormat | None = None
    effort: str | None = None


class MessagesRequest(_KeepAlive, SamplingOptions):
    model_config = REFUSES_UNKNOWN

    model: str
    max_tokens: MaxTokens
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[SystemBlock] | None = None
    stop: list[str] | None = Field(None, alias="stop_sequences")  # bounded by the shared options' check
    stream: bool = False
    metadata: Metadata | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    # accepted, with no meaning here: one tier, one speed, one place (this machine), and the
    # prefix cache needs no hints
    service_tier: str | None = None
    speed: str | None = None
    inference_geo: str | None = None
    cache_control: dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    # not implemented: present and meaningful -> 400 naming the field
    thinking: dict[str, Any] | None = Field(None, json_schema_extra={
        "anyOf": [{"type": "null"}, {"type": "object", "properties": {"type": {"enum": ["disabled"]}}}]})
    mcp_servers: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})
    container: Any = Field(None, json_schema_extra=NULL)
    context_management: Any = Field(None, json_schema_extra=NULL)

    def unsupported_params(self) -> list[str]:
        names = []
        if self.thinking and self.thinking.get("type") != "disabled":
            names.append("thinking")
        if self.mcp_servers:
            names.append("mcp_servers")
        for name in ("container", "context_management"):
            if getattr(self, name) is not None:
                names.append(name)
        names += [f"tools[{i}].type" for i, tool in enumerate(self.tools or []) if tool.type not in (None, "custom")]
        for i, message in enumerate(self.messages):
            blocks = [] if isinstance(message.content, str) else message.content
            names += [f"messages[{i}].content[{j}].type" for j, block in enumerate(blocks) if block.type not in BLOCK_TYPES]
        return names

    def invalid_params(self) -> list[tuple[str, str]]:
        choice = self.tool_choice
        if choice is not None and choice.type == "tool":
            if choice.name is None:
                return [("tool_choice.name", "Missing required parameter: 'tool_choice.name'.")]
            if choice.name not in {tool.name for tool in self.tools or []}:
                return [("tool_choice.name", f"Invalid value for 'tool_choice.name': no tool named '{choice.name}' in 'tools'.")]
        if choice is not None and choice.type in ("any", "tool") and not self.tools:
            return [("tool_choice", "'tool_choice' requires 'tools'.")]
        if self.output_config and self.output_config.format and self.tools and (choice is None or choice.type != "none"):
            return [("output_config.format", "'output_config.format' cannot be combined with 'tools'.")]
        return []

    def constraint(self) -> Constraint | None:
        """The JSON schema `output_config.format` asks the reply to follow, compiled (a 400 if it cannot be)."""
        output_format = self.output_config.format if self.output_config else None
        return None if output_format is None else json_output(output_format.schema_, "output_config.format.schema")


class CountTokensRequest(MessagesRequest):
    """The Messages request without `max_tokens` (what the prompt costs, before any reply)."""

    max_tokens: MaxTokens | None = None  # type: ignore[assignment]


# --------------------------------------------------------------------------- responses


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str
    citations: list[Any] | None = None  # none here (as Anthropic's API sends them: null)


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0  # the prompt tokens the prefix cache held


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageObject(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock | ToolUseBlock]
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: Usage


class CountTokensResponse(BaseModel):
    input_tokens: int


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJSONDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class MessageDelta(BaseModel):
    stop_reason: StopReason | None
    stop_sequence: str | None = None


class DeltaUsage(BaseModel):
    output_tokens: int
    input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class StreamEvent(BaseModel):
    """One server-sent event, named by its `type` (for the schema: the route sends each
    type with only the fields Anthropic's event of that type has)."""

    type: Literal["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                  "message_delta", "message_stop", "ping"]
    message: MessageObject | None = None
    index: int | None = None
    content_block: TextBlock | ToolUseBlock | None = None
    delta: TextDelta | InputJSONDelta | MessageDelta | None = None
    usage: DeltaUsage | None = None
