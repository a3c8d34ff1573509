"""OpenAI chat messages (and tools) as the chat template takes them: what the chat route and
the tokenize route both render."""

from __future__ import annotations

from elmd.server import tools
from elmd.server.errors import invalid, unsupported
from elmd.server.openai.schemas import ChatCompletionRequest, ChatMessage, NamedToolChoice
from elmd.server.wire import ROLES, joined_text


def tool_use(body: ChatCompletionRequest) -> tools.ToolUse:
    choice = body.tool_choice
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    return tools.ToolUse([t.function for t in body.tools or []], "auto" if named or choice is None else choice, named,
                         body.parallel_tool_calls is True)


def template_messages(messages: list[ChatMessage], use: tools.ToolUse | None = None) -> list[dict]:
    """Messages as the chat template takes them: known roles, text content only; tool
    calls, tool results and the request's tools in the generic format (elmd/server/tools.py)."""
    out = []
    names: dict[str, str] = {}  # tool_call_id -> function name, for the results
    with_tools = use is not None and use.active
    for i, message in enumerate(messages):
        if message.function_call:  # on a tool result too: ignoring it would hide it
            raise unsupported(f"messages[{i}].function_call")
        if message.role == "tool":
            if message.tool_call_id is None:
                raise invalid(f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                              param=f"messages[{i}].tool_call_id")
            result = tools.render_result(message.tool_call_id, names.get(message.tool_call_id, ""), _text(message, i))
            out.append({"role": "user", "content": result})
            continue
        if message.role not in ROLES:
            if message.role == "function":
                raise unsupported(f"messages[{i}].role")
            raise invalid(f"Invalid value for 'messages[{i}].role': {message.role!r}.", param=f"messages[{i}].role")
        if message.tool_calls:
            names.update((call.id, call.function.name) for call in message.tool_calls)
            content = tools.render_calls([(c.function.name, c.function.arguments) for c in message.tool_calls])
        elif message.role == "assistant" and with_tools:
            content = tools.render_answer(_text(message, i))
        else:
            content = _text(message, i)
        out.append({"role": ROLES[message.role], "content": content})
    return tools.with_system_prompt(out, use) if with_tools else out


def _text(message: ChatMessage, i: int) -> str:
    content = message.content
    if content is None:
        if message.role == "assistant":
            return ""
        raise invalid(f"Missing required parameter: 'messages[{i}].content'.", param=f"messages[{i}].content")
    if isinstance(content, str):
        return content
    return joined_text(content, f"messages[{i}].content")
