"""Tool calling in a generic JSON format, for models whose chat template has no tool
format of its own (OpenELM's and SmolLM2-135M's have none), as llama.cpp's server does.

The tools are described in the system message; the model replies with one JSON object,
`{"tool_calls": [{"name": ..., "arguments": {...}}]}` to call functions or
`{"response": "..."}` to answer (with `tool_choice: auto`, one grammar allows both), and
the reply is constrained to exactly that: names from `tools`, arguments valid against
each function's `parameters`. Earlier calls and `role: tool` results are written into the
conversation in the same JSON, so the model sees one consistent format.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from elmd.engine.protocol import Constraint
from elmd.server.errors import invalid
from elmd.server.schemas import ChatCompletionRequest, ChatMessage, FunctionCall, NamedToolChoice, Tool, ToolCall
from elmd.server.structured import ANY_OBJECT, checked


def uses_tools(body: ChatCompletionRequest) -> bool:
    """Whether the reply may or must be a tool call."""
    return bool(body.tools) and body.tool_choice != "none"


def _call_schema(tool: Tool) -> dict:
    parameters = tool.function.parameters if tool.function.parameters is not None else ANY_OBJECT
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def reply_schema(body: ChatCompletionRequest) -> dict:
    """The JSON schema of the model's reply under `tools`, `tool_choice` and `parallel_tool_calls`."""
    tools = body.tools
    if isinstance(body.tool_choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == body.tool_choice.function.name]
    calls: dict = {"type": "array", "items": {"anyOf": [_call_schema(t) for t in tools]}, "minItems": 1}
    if body.parallel_tool_calls is False or isinstance(body.tool_choice, NamedToolChoice):
        calls["maxItems"] = 1
    call = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
            "additionalProperties": False}
    if body.tool_choice in (None, "auto"):
        answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
                  "additionalProperties": False}
        return {"anyOf": [call, answer]}
    return call


def tool_constraint(body: ChatCompletionRequest) -> Constraint:
    for i, tool in enumerate(body.tools):  # name the function whose parameters cannot be compiled
        if tool.function.parameters is not None:
            checked(Constraint.json_schema(tool.function.parameters), f"tools[{i}].function.parameters", "JSON schema")
    return checked(Constraint.json_schema(reply_schema(body)), "tools", "tools")


def system_prompt(body: ChatCompletionRequest) -> str:
    functions = [{"name": t.function.name, "description": t.function.description or "",
                  "parameters": t.function.parameters or ANY_OBJECT} for t in body.tools]
    lines = ["You can call these functions (each with arguments that follow its JSON schema):",
             json.dumps(functions, ensure_ascii=False),
             'To call functions, reply with only: {"tool_calls": [{"name": "<function name>", "arguments": {...}}]}']
    if body.tool_choice in (None, "auto"):
        lines.append('To answer without calling a function, reply with only: {"response": "<your answer>"}')
    return "\n".join(lines)


def render_calls(message: ChatMessage) -> str:
    """An assistant message that called tools, as the model would have written it."""
    calls = [{"name": c.function.name, "arguments": _loads_or_text(c.function.arguments)} for c in message.tool_calls]
    return json.dumps({"tool_calls": calls}, ensure_ascii=False)


def render_result(message: ChatMessage, content: str, names: dict[str, str], i: int) -> str:
    """A `role: tool` message, written as a user turn (templates without tools have no tool role)."""
    if message.tool_call_id is None:
        raise invalid(f"Missing required parameter: 'messages[{i}].tool_call_id'.", param=f"messages[{i}].tool_call_id")
    result = {"tool_call_id": message.tool_call_id, "name": names.get(message.tool_call_id, ""), "content": content}
    return json.dumps({"tool_response": result}, ensure_ascii=False)


def render_answer(content: str) -> str:
    """A plain assistant answer in a conversation with tools, in the reply format."""
    return json.dumps({"response": content}, ensure_ascii=False)


def _loads_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


@dataclass
class ToolReply:
    content: str | None
    tool_calls: list[ToolCall] | None
    finish_reason: str


def parse_reply(text: str, finish_reason: str) -> ToolReply:
    """The model's reply as OpenAI's message fields. A reply cut by max_tokens is not
    valid JSON yet: it is returned as text (the answer so far, or the JSON so far for a
    call), with finish_reason "length"."""
    try:
        reply = json.loads(text)
    except ValueError:
        return ToolReply(_partial_answer(text), None, finish_reason)
    if "tool_calls" in reply:
        calls = [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                          function=FunctionCall(name=c["name"], arguments=json.dumps(c["arguments"], ensure_ascii=False)))
                 for c in reply["tool_calls"]]
        return ToolReply(None, calls, "tool_calls")
    return ToolReply(reply["response"], None, finish_reason)


ANSWER_PREFIX = '{"response":"'


def _partial_answer(text: str) -> str:
    """The answer in a cut `{"response": "...` reply, without a half-written escape at its end."""
    if not text.startswith(ANSWER_PREFIX):
        return text
    body = text[len(ANSWER_PREFIX):]
    for cut in range(min(len(body), 6) + 1):  # the longest escape, \uXXXX, has 6 characters
        try:
            return json.loads('"' + body[: len(body) - cut] + '"')
        except ValueError:
            continue
    return body
