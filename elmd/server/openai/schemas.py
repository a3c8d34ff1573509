"""OpenAI's chat completions, completions, tokenize and model-list bodies (and elmd's
/health), built from the shared pieces of elmd/server/wire.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from elmd.engine.protocol import Constraint
from elmd.sampling_options import Int, MaxTokens, SamplingOptions, integer
from elmd.server.structured import checked, json_output
from elmd.server.limits import MAX_EMBEDDING_INPUTS, MAX_MESSAGES, MAX_N, MAX_PROMPTS, MAX_TOP_LOGPROBS
from elmd.server.wire import (MESSAGE_ROLES, NULL, REFUSES_UNKNOWN, UNSET, FunctionCall, TextPart,
                              TokenLogprobInfo, Tool, ToolCall, _DropNone, _KeepAlive, _OmitNone, _Request,
                              present, when)

# --------------------------------------------------------------------------- requests


class MessageToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    """A tool result needs its call's id and content; others but the assistant's need content
    (or tool calls)."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        when("role", ["tool"], present("content", "tool_call_id")),
        when("role", ["system", "developer", "user"], {"anyOf": [
            present("content"), {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array", "minItems": 1}}}]}),
    ]})

    role: str = Field(json_schema_extra={"enum": MESSAGE_ROLES})  # a str: "function" is refused as unsupported
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    function_call: Any = Field(None, json_schema_extra=UNSET)


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


LogitBias = dict[str, Annotated[float, Field(ge=-100, le=100)]]


class _Generation(_KeepAlive, SamplingOptions):
    """The fields the chat and completions requests share. Fields beyond OpenAI's are the
    extensions elmd implements (see README); any other is refused by name."""

    model_config = REFUSES_UNKNOWN

    model: str
    n: integer(ge=1, le=MAX_N) = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extras that local servers accept (top_k, min_p, repetition_penalty, ignore_eos among the sampling options)
    json_schema: dict[str, Any] | None = None  # llama.cpp's: the output follows this JSON schema
    grammar: str | None = None  # llama.cpp's: the output follows this GBNF (or Lark) grammar
    logit_bias: LogitBias | None = None
    # harmless metadata, accepted and not used
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported_params(self) -> list[str]:
        return []

    def constraint_params(self) -> list[str]:
        """The fields that constrain the output; at most one may be set."""
        return [name for name in ("json_schema", "grammar") if getattr(self, name) is not None]

    def constraint(self) -> Constraint | None:
        """The constraint this request asks for, from whichever one field sets it (they are exclusive)."""
        response_format = getattr(self, "response_format", None)
        if response_format is not None and response_format.type == "json_object":
            return json_output(None, "response_format")
        if response_format is not None and response_format.type == "json_schema":
            return json_output(response_format.json_schema.schema_, "response_format.json_schema.schema")
        if self.json_schema is not None:
            return json_output(self.json_schema, "json_schema")
        if self.grammar is not None:
            return checked(Constraint("gbnf", self.grammar), "grammar", "grammar")
        return None

    def invalid_params(self) -> list[tuple[str, str]]:
        constrained = self.constraint_params()
        if len(constrained) > 1:
            return [(constrained[1], f"'{constrained[1]}' cannot be combined with '{constrained[0]}'.")]
        return []


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: integer(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # not implemented: present and meaningful -> 400 naming the field
    functions: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})
    function_call: Any = Field(None, json_schema_extra={"enum": [None, "none", "auto"]})
    audio: Any = Field(None, json_schema_extra=NULL)
    modalities: list[str] | None = Field(None, json_schema_extra={"enum": [None, ["text"]]})
    prediction: Any = Field(None, json_schema_extra=NULL)
    web_search_options: Any = Field(None, json_schema_extra=NULL)
    reasoning_effort: Any = Field(None, json_schema_extra=NULL)
    verbosity: Any = Field(None, json_schema_extra=NULL)

    def invalid_params(self) -> list[tuple[str, str]]:
        """(param, message) for combinations that single fields cannot reject."""
        if self.top_logprobs and not self.logprobs:
            return [("top_logprobs", "'top_logprobs' requires 'logprobs': true.")]
        if self.response_format is not None and self.response_format.type == "json_schema" \
                and self.response_format.json_schema is None:
            return [("response_format.json_schema", "Missing required parameter: 'response_format.json_schema'.")]
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            return [("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")]
        if isinstance(self.tool_choice, NamedToolChoice) and \
                self.tool_choice.function.name not in {t.function.name for t in self.tools}:
            return [("tool_choice", f"Invalid value for 'tool_choice': no function named "
                                    f"'{self.tool_choice.function.name}' in 'tools'.")]
        return super().invalid_params()

    def constraint_params(self) -> list[str]:
        names = super().constraint_params()
        if self.response_format is not None and self.response_format.type != "text":
            names.append("response_format")
        if self.tools and self.tool_choice != "none":
            names.append("tools")
        return names

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported_params(self) -> list[str]:
        names = super().unsupported_params()
        if self.functions:
            names.append("functions")
        if self.function_call not in (None, "none", "auto"):
            names.append("function_call")
        if self.audio is not None:
            names.append("audio")
        if self.modalities is not None and self.modalities != ["text"]:
            names.append("modalities")
        for name in ("prediction", "web_search_options", "reasoning_effort", "verbosity"):
            if getattr(self, name) is not None:
                names.append(name)
        return names


TokenIds = list[Int]


NonEmptyStr = Annotated[str, Field(min_length=1)]
NonEmptyTokenIds = Annotated[TokenIds, Field(min_length=1)]


class CompletionRequest(_Generation):
    prompt: NonEmptyStr | list[NonEmptyStr] | NonEmptyTokenIds | list[NonEmptyTokenIds] = Field(
        json_schema_extra={"minItems": 1})  # a batch of none is refused by the route
    max_tokens: integer(ge=0) | None = None
    echo: bool = False
    logprobs: integer(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    best_of: integer(ge=1) | None = Field(None, description="Only the value of `n` (or null) is accepted.")
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})

    @field_validator("prompt")
    @classmethod
    def _bounded_batch(cls, prompt):
        batch = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
        if batch and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def unsupported_params(self) -> list[str]:
        names = super().unsupported_params()
        if self.best_of is not None and self.best_of != self.n:
            names.append("best_of")
        if self.suffix:
            names.append("suffix")
        return names


class TokenizeRequest(_Request):
    """Exactly one of `prompt` and `messages`."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
    ]})

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Int]


TokenId = integer(ge=0)


class EmbeddingRequest(_KeepAlive):
    """POST /v1/embeddings: `input` as a text, texts, token ids or lists of token ids (at
    most 2,048 inputs, none empty); `encoding_format` float or base64; `dimensions` only
    where the model allows fewer than its own (else a 400 saying so). Unknown fields are
    refused by name, as on the other OpenAI routes."""

    model_config = REFUSES_UNKNOWN

    model: str
    input: (NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
           | Annotated[list[TokenId], Field(min_length=1)]
           | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: integer(ge=1) | None = None
    user: str | None = None  # accepted and not used

    def inputs(self) -> list[str] | list[list[int]]:
        """The input as a list of texts or a list of token-id lists."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [list(self.input)]
        return list(self.input)

    def unsupported_params(self) -> list[str]:
        return []

    def invalid_params(self) -> list[tuple[str, str]]:
        return []


# --------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))



class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobInfo] | None
    refusal: list[TokenLogprobInfo] | None = None


class AssistantMessage(_OmitNone):
    omit_none = ("tool_calls",)

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(_DropNone):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_DropNone):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChatDelta(_DropNone):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_DropNone):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(_DropNone):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # elmd's additions: what a client (or `elmd status`) needs to know about residency
    loaded: bool
    context_length: int | None = None
    backend: str | None = None
    memory_bytes: int | None = None  # what a loaded model holds now: weights, KV cache, cached prefixes (`elmd status`)
    # A LoRA adapter, as vLLM lists its LoRA modules: the model it adapts, and its folder
    parent: str | None = None
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "error"]
    loaded: list[str]
    loading: list[str]
    error: str | None = None
    # The CPU kernels the loaded CPU models run on ("avx512", "avx512-vnni", "avx2", "aten"; None: no CPU
    # model loaded), why not the best ones for this CPU, and whether those are still building.
    cpu_kernels: str | None = None
    cpu_kernels_reason: str | None = None
    cpu_kernels_building: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    model: str
    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    add_bos_token: bool
    chat_template: str | None
    model_max_length: int
    vocab_size: int


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32 (`encoding_format: base64`)


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
