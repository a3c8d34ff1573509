"""A Messages request's conversation and tools in the terms every dialect shares: chat
template messages and a `tools.ToolUse`, written exactly as the chat route writes the same
conversation, so that both APIs give the same reply to it."""

from __future__ import annotations

from elmd.server import tools
from elmd.server.anthropic.schemas import TEXT, TOOL_RESULT, TOOL_USE, ContentBlock, MessagesRequest
from elmd.server.errors import invalid
from elmd.server.wire import FunctionDefinition


def tool_use(body: MessagesRequest) -> tools.ToolUse:
    """Anthropic's `tool_choice` as chat's: auto, any (required), a tool by name, none. One
    call per reply unless `disable_parallel_tool_use` is false, the house default for small
    models (elmd/server/tools.py)."""
    functions = [FunctionDefinition(name=t.name, description=t.description, parameters=t.input_schema)
                 for t in body.tools or []]
    choice = body.tool_choice
    kind = "auto" if choice is None else choice.type
    named = choice.name if choice is not None and kind == "tool" else None
    parallel = choice is not None and choice.disable_parallel_tool_use is False
    return tools.ToolUse(functions, {"auto": "auto", "tool": "auto", "any": "required", "none": "none"}[kind], named,
                         parallel, parameters_param="tools[{}].input_schema")


def template_messages(body: MessagesRequest, use: tools.ToolUse) -> list[dict]:
    """The system prompt and messages as the chat template takes them: an assistant turn that
    calls tools as its calls only (as chat keeps `tool_calls` over `content`), each tool result
    as a user turn of its own, the text around them as user turns."""
    out = [{"role": "system", "content": _system_text(body)}] if body.system else []
    names: dict[str, str] = {}  # tool_use id -> tool name, for the results
    for i, message in enumerate(body.messages):
        blocks = [ContentBlock(type=TEXT, text=message.content)] if isinstance(message.content, str) else message.content
        if message.role == "assistant":
            out.append({"role": "assistant", "content": _assistant_turn(blocks, i, names, use)})
            continue
        text: list[str] = []
        for j, block in enumerate(blocks):
            if block.type == TOOL_RESULT:
                if text:
                    out.append({"role": "user", "content": "\n".join(text)})
                    text = []
                param = f"messages[{i}].content[{j}]"
                call_id = _required(block.tool_use_id, f"{param}.tool_use_id")
                out.append({"role": "user", "content": tools.render_result(call_id, names.get(call_id, ""),
                                                                           _result_text(block, param))})
            elif block.type == TEXT:
                text.append(_required(block.text, f"messages[{i}].content[{j}].text"))
            else:
                raise invalid(f"A user turn cannot hold a '{block.type}' block.", param=f"messages[{i}].content[{j}].type")
        if text or not blocks:
            out.append({"role": "user", "content": "\n".join(text)})
    return tools.with_system_prompt(out, use)


def _assistant_turn(blocks: list[ContentBlock], i: int, names: dict[str, str], use: tools.ToolUse) -> str:
    calls = []
    for j, block in enumerate(blocks):
        if block.type == TOOL_USE:
            call_id = _required(block.id, f"messages[{i}].content[{j}].id")
            names[call_id] = _required(block.name, f"messages[{i}].content[{j}].name")
            calls.append((block.name, block.input or {}))
        elif block.type == TOOL_RESULT:
            raise invalid("An assistant turn cannot hold a 'tool_result' block.", param=f"messages[{i}].content[{j}].type")
    if calls:
        return tools.render_calls(calls)
    text = "\n".join(_required(block.text, f"messages[{i}].content[{j}].text") for j, block in enumerate(blocks))
    return tools.render_answer(text) if use.active else text


def _system_text(body: MessagesRequest) -> str:
    return body.system if isinstance(body.system, str) else "\n".join(block.text for block in body.system)


def _result_text(block: ContentBlock, param: str) -> str:
    content = block.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for k, part in enumerate(content):
        if part.type != TEXT:
            raise invalid(f"A tool result here holds text only, not '{part.type}'.", param=f"{param}.content[{k}].type")
        texts.append(_required(part.text, f"{param}.content[{k}].text"))
    return "\n".join(texts)


def _required(value, param: str):
    if value is None:
        raise invalid(f"Missing required parameter: '{param}'.", param=param)
    return value
