"""Request and response bodies of Ollama's API (`/api/...`), as its docs (docs/api.md) and
its official clients define them.

Ollama ignores `options` it does not know (clients such as Open WebUI pass a user's whole
parameter set), and so does elmd; options that change sampling in a way elmd cannot
reproduce (mirostat, tail-free and typical sampling) are refused by name instead.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from elmd.sampling_options import Int, RepetitionPenalty, SamplingShape, Seed, integer
from elmd.server.limits import MAX_EMBEDDING_INPUTS, MAX_MESSAGES
from elmd.server.wire import MESSAGE_ROLES, Tool, _DropNone, _KeepAlive, _Request
from elmd.store import MAX_NAME_LENGTH, NAME_PATTERN

# --------------------------------------------------------------------------- requests


class OllamaOptions(SamplingShape):
    """`options`: the sampling options (elmd/sampling_options.py, `repeat_penalty` as Ollama
    names it) and `num_predict`; runtime settings that have no meaning here (num_thread,
    num_gpu, use_mmap, ...) ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")

    num_predict: Int | None = None  # -1 and -2: until the context is full; unset or 0: the model's default
    repetition_penalty: RepetitionPenalty | None = Field(None, alias="repeat_penalty")
    seed: Seed | None = None
    num_ctx: integer(ge=1) | None = None  # the model's context is fixed; accepted, not used
    # not implemented: a value that changes sampling -> 400 naming the option
    mirostat: Int | None = Field(None, json_schema_extra={"enum": [0, None]})
    tfs_z: float | None = Field(None, json_schema_extra={"enum": [1, None]})
    typical_p: float | None = Field(None, json_schema_extra={"enum": [1, None]})

    def unsupported_params(self) -> list[str]:
        names = []
        if self.mirostat:
            names.append("options.mirostat")
        for name in ("tfs_z", "typical_p"):
            if getattr(self, name) not in (None, 1, 1.0):
                names.append(f"options.{name}")
        return names


class OllamaFunctionCall(_Request):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)  # an object in Ollama's API
    index: int | None = None


class OllamaToolCall(_Request):
    function: OllamaFunctionCall
    id: str | None = None


class OllamaMessage(_Request):
    role: str = Field(json_schema_extra={"enum": MESSAGE_ROLES})
    content: str = ""
    images: list[str] | None = Field(None, json_schema_extra={"maxItems": 0})  # text only
    thinking: str | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None  # Open WebUI sends it on tool results


class _OllamaGeneration(_KeepAlive):
    """What /api/chat and /api/generate share."""

    model: str = Field(min_length=1)
    stream: bool = True
    options: OllamaOptions | None = None
    format: str | dict[str, Any] | None = Field(None, json_schema_extra={"pattern": "^(json)?$"})
    think: bool | str | None = Field(None, json_schema_extra={"enum": [False, None]})
    logprobs: bool | None = Field(None, json_schema_extra={"enum": [False, None]})
    top_logprobs: Int | None = Field(None, json_schema_extra={"enum": [0, None]})
    metadata: dict[str, Any] | None = None  # Open WebUI's own bookkeeping; not used

    def sampling(self) -> OllamaOptions:
        return self.options or OllamaOptions()

    def unsupported_params(self) -> list[str]:
        names = self.sampling().unsupported_params()
        if self.think not in (None, False):
            names.append("think")
        if self.logprobs or self.top_logprobs:
            names.append("logprobs")
        return names

    def invalid_params(self) -> list[tuple[str, str]]:
        return []


class OllamaChatRequest(_OllamaGeneration):
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = None

    def invalid_params(self) -> list[tuple[str, str]]:
        if self.tools and self.format:
            return [("format", "'format' cannot be combined with 'tools'.")]
        return []


class OllamaGenerateRequest(_OllamaGeneration):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = Field(None, json_schema_extra={"maxItems": 0})  # text only
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})
    template: str | None = Field(None, json_schema_extra={"maxLength": 0})
    context: list[Int] | None = Field(None, json_schema_extra={"maxItems": 0})

    def unsupported_params(self) -> list[str]:
        names = super().unsupported_params()
        for name in ("suffix", "template", "context"):
            if getattr(self, name):
                names.append(name)
        return names


def _named(name: dict[str, Any]) -> dict[str, Any]:
    """The schema's rule for a request that names a model: `model`, or else `name`, as `name` describes."""
    return {"anyOf": [{"required": ["model"], "properties": {"model": name}},
                      {"required": ["name"], "properties": {"model": {"type": "null"}, "name": name}}]}


class OllamaModelRequest(_Request):
    """/api/show, /api/delete: a model by name (`name` is the older spelling), one of them required."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=_named({"type": "string"}))

    model: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1)
    verbose: bool | None = None

    def model_name(self) -> str | None:
        return self.model or self.name


class OllamaPullRequest(OllamaModelRequest):
    # A store name (elmd/store.py's NAME_PATTERN), optionally tagged `:latest` as Ollama's clients do.
    model_config = ConfigDict(json_schema_extra=_named({"type": "string", "maxLength": MAX_NAME_LENGTH,
                                                        "pattern": rf"^{NAME_PATTERN.pattern}(:latest)?$"}))

    stream: bool = True
    insecure: bool | None = None


class OllamaEmbedRequest(_KeepAlive):
    """POST /api/embed. No input (or an empty one) loads the model and answers no vectors, as
    Ollama does (how its clients preload a model); `truncate` (default true) cuts over-long
    inputs, false makes them a 400; `options` are runtime settings, ignored as Ollama
    ignores those that do not apply."""

    model: str
    input: str | Annotated[list[str], Field(max_length=MAX_EMBEDDING_INPUTS)] | None = None
    options: dict[str, Any] | None = None
    truncate: bool = True
    dimensions: integer(ge=1) | None = None

    def inputs(self) -> list[str]:
        if self.input is None or self.input == "":
            return []
        return [self.input] if isinstance(self.input, str) else list(self.input)


class OllamaEmbeddingsRequest(_KeepAlive):
    """POST /api/embeddings (Ollama's older route): one `prompt`, cut to the model's length;
    an empty prompt answers an empty vector, as Ollama does."""

    model: str
    prompt: str = ""
    options: dict[str, Any] | None = None


# --------------------------------------------------------------------------- responses


class OllamaChatMessage(_DropNone):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[OllamaToolCall] | None = None


class _Timings(_DropNone):
    """The counters Ollama reports on its last object (durations in nanoseconds)."""

    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaChatResponse(_Timings):
    model: str
    created_at: str
    message: OllamaChatMessage
    done: bool
    done_reason: str | None = None


class OllamaGenerateResponse(_Timings):
    model: str
    created_at: str
    response: str
    done: bool
    done_reason: str | None = None


class OllamaModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class OllamaModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaTags(BaseModel):
    models: list[OllamaModel]


class OllamaRunningModel(BaseModel):
    name: str
    model: str
    size: int
    digest: str
    details: OllamaModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class OllamaRunning(BaseModel):
    models: list[OllamaRunningModel]


class OllamaShow(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: OllamaModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class OllamaVersion(BaseModel):
    version: str


class OllamaStatus(BaseModel):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class OllamaEmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int  # nanoseconds
    load_duration: int
    prompt_eval_count: int


class OllamaEmbeddingsResponse(BaseModel):
    embedding: list[float]
