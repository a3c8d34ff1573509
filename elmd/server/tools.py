"""Tool calling in a generic JSON format, for models whose chat template has no tool
format of its own (OpenELM's and SmolLM2-135M's have none), as llama.cpp's server does.

The tools are described in the system message; the model replies with one JSON object,
`{"tool_calls": [{"name": ..., "arguments": {...}}]}` to call functions or
`{"response": "..."}` to answer (with `tool_choice: auto`, one grammar allows both), and
the reply is constrained to exactly that: names from `tools`, arguments valid against
each function's `parameters`. Earlier calls and tool results are written into the
conversation in the same JSON, so the model sees one consistent format.

Every API that offers tools (chat completions, Responses, Ollama's chat) states its
request as a `ToolUse` and reads the reply through `parse_reply` or `ReplyStream`; only
the shapes around them differ.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from elmd.engine.protocol import Constraint
from elmd.server.wire import FunctionCall, FunctionDefinition, ToolCall
from elmd.server.structured import ANY_OBJECT, checked


@dataclass(frozen=True)
class ToolUse:
    """What a request asks of tools, in any API's terms: the functions it offers, and
    whether the reply may call them (`auto`), must (`required`) or must call `named`."""

    functions: list[FunctionDefinition]
    choice: Literal["none", "auto", "required"] = "auto"
    named: str | None = None
    parallel: bool = False  # one call per reply unless asked, as llama.cpp's server: small models repeat calls
    parameters_param: str = "tools[{}].function.parameters"  # where function i's schema is, for errors

    @property
    def active(self) -> bool:
        """Whether the reply may or must be a tool call."""
        return bool(self.functions) and self.choice != "none"

    @property
    def may_answer(self) -> bool:
        return self.choice == "auto" and self.named is None

    def offered(self) -> list[FunctionDefinition]:
        return [f for f in self.functions if f.name == self.named] if self.named else self.functions


def _declared_only(parameters: dict) -> dict:
    """Arguments hold the declared properties only, unless the schema says otherwise: what
    OpenAI's strict mode and llama.cpp's grammars do. Small models otherwise pad a call with
    properties of their own invention (SmolLM2 copies the schema into the arguments)."""
    if parameters.get("type") == "object" and "properties" in parameters and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def _call_schema(function: FunctionDefinition) -> dict:
    parameters = _declared_only(function.parameters) if function.parameters is not None else ANY_OBJECT
    return {"type": "object", "properties": {"name": {"const": function.name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def reply_schema(use: ToolUse) -> dict:
    """The JSON schema of the model's reply under the request's tools and choice."""
    calls: dict = {"type": "array", "items": {"anyOf": [_call_schema(f) for f in use.offered()]}, "minItems": 1}
    if not use.parallel or use.named:
        calls["maxItems"] = 1
    call = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
            "additionalProperties": False}
    if use.may_answer:
        answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
                  "additionalProperties": False}
        return {"anyOf": [call, answer]}
    return call


def tool_constraint(use: ToolUse) -> Constraint:
    for i, function in enumerate(use.functions):  # name the function whose parameters cannot be compiled
        if function.parameters is not None:
            checked(Constraint.json_schema(function.parameters), use.parameters_param.format(i), "JSON schema")
    return checked(Constraint.json_schema(reply_schema(use)), "tools", "tools")


def reply_constraint(use: ToolUse, body) -> Constraint | None:
    """The reply's grammar: the tool-call format while tools are in use, else the one the
    request's own format option asks for (`body.constraint()`), shared by chat and Messages."""
    return tool_constraint(use) if use.active else body.constraint()


def system_prompt(use: ToolUse) -> str:
    functions = [{"name": f.name, "description": f.description or "", "parameters": f.parameters or ANY_OBJECT}
                 for f in use.functions]
    lines = ["You can call these functions (each with arguments that follow its JSON schema):",
             json.dumps(functions, ensure_ascii=False),
             'To call functions, reply with only: {"tool_calls": [{"name": "<function name>", "arguments": {...}}]}']
    if use.may_answer:
        lines.append('To answer without calling a function, reply with only: {"response": "<your answer>"}')
    return "\n".join(lines)


def with_system_prompt(messages: list[dict], use: ToolUse) -> list[dict]:
    """Template messages with the tools described in the (first) system message."""
    if not use.active:
        return messages
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + system_prompt(use)}
        return [first] + messages[1:]
    return [{"role": "system", "content": system_prompt(use)}] + messages


def render_calls(calls: list[tuple[str, Any]]) -> str:
    """An assistant turn that called tools ((name, arguments) each, arguments as JSON text
    or already parsed), as the model would have written it."""
    written = [{"name": name, "arguments": _loads_or_text(arguments) if isinstance(arguments, str) else arguments}
               for name, arguments in calls]
    return json.dumps({"tool_calls": written}, ensure_ascii=False)


def render_result(call_id: str | None, name: str, content: str) -> str:
    """A tool's result, written as a user turn (templates without tools have no tool role)."""
    result = {"name": name, "content": content} if call_id is None else \
        {"tool_call_id": call_id, "name": name, "content": content}
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


class ReplyStream:
    """A reply followed as it streams. Under tools, an answer (`{"response": ...}`) is
    passed on as it is written and calls once their JSON is complete (at the end); without
    tools every piece is answer text."""

    def __init__(self, use: ToolUse | None):
        self.tools = use is not None and use.active
        self.text = ""
        self.sent: str | None = None if self.tools else ""  # the answer passed on so far, once it is one

    @property
    def answering(self) -> bool:
        """Whether the reply is known to be an answer (always, without tools)."""
        return self.sent is not None

    def add(self, piece: str) -> str:
        """The answer text this piece adds ("" while the reply is not known to be one)."""
        self.text += piece
        if not self.tools:
            return piece
        if self.sent is None and self.text.startswith(ANSWER_PREFIX):
            self.sent = ""
        if self.sent is None:
            return ""
        answer = parse_reply(self.text, "length").content
        if len(answer) <= len(self.sent) or not answer.startswith(self.sent):
            return ""
        new, self.sent = answer[len(self.sent):], answer
        return new

    def finish(self, finish_reason: str) -> tuple[ToolReply, str]:
        """The whole reply, and the answer text not passed on yet."""
        if not self.tools:
            return ToolReply(self.text, None, finish_reason), ""
        reply = parse_reply(self.text, finish_reason)
        if reply.tool_calls is not None:
            return reply, ""
        sent = self.sent or ""
        return reply, reply.content[len(sent):] if reply.content.startswith(sent) else ""
