"""Per-model sampling defaults (models.yaml `sampling`), through the real daemon and the
official SDK: applied when a request leaves a value out, overridden when it sets one.

The daemon serves a tiny checkpoint from a folder named after a models.yaml entry, so it
takes that entry's defaults (smollm2-135m-instruct's temperature 0.2 / top_p 0.9), or
those of the user's models.yaml that overrides the entry. A seeded request is reproducible, so "the defaults were
applied" is "the same tokens as a request that spells the defaults out"; the tiny model's
random weights give broad distributions, where temperature 0.2 and 1.0 pick different tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from live_daemon import running_daemon
from openai import OpenAI

from elmd.registry import Registry

PROMPT = [{"role": "user", "content": "Say something."}]


def serve_as(tiny_checkpoint: Path, root: Path, model_id: str):
    folder = root / model_id
    shutil.copytree(tiny_checkpoint, folder)
    return running_daemon(folder, root)


def reply(client: OpenAI, model: str, stream: bool = False, **params) -> list[bytes]:
    """The reply's tokens (as bytes: a random model's text is mostly broken UTF-8)."""
    request = dict(model=model, messages=PROMPT, max_tokens=24, seed=7, logprobs=True, stream=stream, **params)
    if not stream:
        return [bytes(t.bytes) for t in client.chat.completions.create(**request).choices[0].logprobs.content]
    return [bytes(t.bytes) for chunk in client.chat.completions.create(**request)
            if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.content]


def test_the_shipped_defaults_are_the_authors_recommendations():
    registry = Registry.load()
    assert registry.get("smollm2-135m-instruct").sampling == {"temperature": 0.2, "top_p": 0.9}
    for size in ("270m", "450m", "1.1b", "3b"):
        assert registry.get(f"openelm-{size}-instruct").sampling == {"repetition_penalty": 1.2}


@pytest.mark.parametrize("stream", [False, True])
def test_temperature_and_top_p_defaults_apply_unless_the_request_sets_them(tiny_checkpoint, tmp_path, stream):
    with serve_as(tiny_checkpoint, tmp_path, "smollm2-135m-instruct") as daemon:
        client = OpenAI(base_url=f"{daemon.url}/v1", api_key="unused")
        omitted = reply(client, daemon.model, stream)
        spelled_out = reply(client, daemon.model, stream, temperature=0.2, top_p=0.9)
        api_default = reply(client, daemon.model, stream, temperature=1.0, top_p=1.0)
        only_temperature = reply(client, daemon.model, stream, temperature=1.0)
    assert omitted == spelled_out
    assert api_default != omitted  # a request that sets temperature gets exactly what it asked
    assert only_temperature != api_default  # ... and keeps the model's top_p it left out


def test_a_users_models_yaml_sets_the_defaults_and_requests_still_override(tiny_checkpoint, tmp_path):
    """OpenELM's repetition_penalty default through an override in the config directory's
    models.yaml (at 1.2 the tiny model's greedy loop of one token survives; at 3 it breaks)."""
    config = tmp_path / "elmd" / "config"
    config.mkdir(parents=True)
    entry = Registry.load().get("openelm-270m-instruct").model_dump(exclude_none=True)
    (config / "models.yaml").write_text(yaml.safe_dump({"models": [{**entry, "sampling": {"repetition_penalty": 3.0}}]}))
    with serve_as(tiny_checkpoint, tmp_path, "openelm-270m-instruct") as daemon:
        client = OpenAI(base_url=f"{daemon.url}/v1", api_key="unused")
        omitted = reply(client, daemon.model, temperature=0)
        spelled_out = reply(client, daemon.model, temperature=0, extra_body={"repetition_penalty": 3.0})
        off = reply(client, daemon.model, temperature=0, extra_body={"repetition_penalty": 1.0})
    assert omitted == spelled_out
    assert len(set(off)) == 1 and off != omitted
