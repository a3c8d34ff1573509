"""Chat templates: which one a model uses, and rendering it as transformers does.

Templates are Jinja, run in a sandbox (they come with downloaded models) with the
settings and helpers transformers gives them, so a model's own template renders here
exactly as it does there. OpenELM-Instruct ships none: it was DPO-tuned on the Zephyr
format, which is the default.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Mapping

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# `<s><|system|>\n{system}</s>\n<|user|>\n{user}</s>\n<|assistant|>\n{assistant}</s>\n...`,
# ending with `<|assistant|>\n` when a reply is wanted. Every line ends in a block tag, so
# trim_blocks leaves no stray newlines.
ZEPHYR_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}\n"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('The Zephyr format has no role ' + message['role']) }}{% endif %}\n"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}\n"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}\n"
)


class ChatTemplateError(ValueError):
    """A template rejected the conversation (`raise_exception`) or could not be rendered."""


def select_template(override: str | None, tokenizer_template: str | None) -> str:
    """models.yaml's override, else the tokenizer's own template, else Zephyr."""
    return override or tokenizer_template or ZEPHYR_TEMPLATE


def render(
    template: str,
    messages: Iterable[Mapping[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Renders `messages` (OpenAI chat messages) to the prompt text."""
    try:
        return _compile(template).render(
            messages=flatten_messages(messages),
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e


def flatten_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages with their content as one string: OpenAI allows a list of text parts,
    which are joined by newlines."""
    return [{**m, "content": _content_text(m.get("content"))} for m in messages]


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise ChatTemplateError(f"unsupported content part type {part.get('type')!r}: only text parts are")
        texts.append(part["text"])
    return "\n".join(texts)  # as vLLM and our service join text parts


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
