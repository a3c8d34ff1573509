"""Per-model sampling defaults (models.yaml `sampling`), through the real daemon and the
official SDK: applied when a request leaves a value out, overridden when it sets one.

The daemon serves a tiny checkpoint from a folder named after a models.yaml entry, so it
takes that entry's defaults (smollm2-135m-instruct's temperature 0.2 / top_p 0.9), or
those of the user's models.yaml that overrides the entry. A seeded request is reproducible, so "the defaults were
applied" is "the same tokens as a request that spells the defaults out"; the tiny model's
random weights give broad distributions, where temperature 0.2 and 1.0 pick different tokens.
A `max_tokens` default bounds the replies of every API whose request leaves its limit out.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
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


def override_sampling(root: Path, model_id: str, sampling: dict) -> None:
    """A user's models.yaml (in the daemon's config directory) giving `model_id` these defaults."""
    config = root / "elmd" / "config"
    config.mkdir(parents=True)
    entry = Registry.load().get(model_id).model_dump(exclude_none=True)
    (config / "models.yaml").write_text(yaml.safe_dump({"models": [{**entry, "sampling": sampling}]}))


def reply(client: OpenAI, model: str, stream: bool = False, **params) -> list[bytes]:
    """The reply's tokens (as bytes: a random model's text is mostly broken UTF-8)."""
    request = dict(model=model, messages=PROMPT, max_tokens=24, seed=7, logprobs=True, stream=stream, **params)
    if not stream:
        return [bytes(t.bytes) for t in client.chat.completions.create(**request).choices[0].logprobs.content]
    return [bytes(t.bytes) for chunk in client.chat.completions.create(**request)
            if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.content]


def test_the_shipped_defaults_are_the_authors_recommendations():
    registry = Registry.load()
    assert registry.get("smollm2-135m-instruct").sampling == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 256}
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
    override_sampling(tmp_path, "openelm-270m-instruct", {"repetition_penalty": 3.0})
    with serve_as(tiny_checkpoint, tmp_path, "openelm-270m-instruct") as daemon:
        client = OpenAI(base_url=f"{daemon.url}/v1", api_key="unused")
        omitted = reply(client, daemon.model, temperature=0)
        spelled_out = reply(client, daemon.model, temperature=0, extra_body={"repetition_penalty": 3.0})
        off = reply(client, daemon.model, temperature=0, extra_body={"repetition_penalty": 1.0})
    assert omitted == spelled_out
    assert len(set(off)) == 1 and off != omitted


def test_a_max_tokens_default_bounds_each_api_that_leaves_the_limit_out(tiny_checkpoint, tmp_path):
    """Chat's `max_tokens`, Responses' `max_output_tokens` and Ollama's `num_predict` left out
    take the default; set, they win (seeded, so the tiny model meets no end token early)."""
    override_sampling(tmp_path, "smollm2-135m-instruct", {"max_tokens": 5})
    with serve_as(tiny_checkpoint, tmp_path, "smollm2-135m-instruct") as daemon:
        client = OpenAI(base_url=f"{daemon.url}/v1", api_key="unused")

        def chat(**params):
            return client.chat.completions.create(model=daemon.model, messages=PROMPT, seed=7, **params)

        def responses(**params):
            return client.responses.create(model=daemon.model, input="Say something.", extra_body={"seed": 7}, **params)

        def ollama(**options):
            body = {"model": daemon.model, "messages": PROMPT, "stream": False, "options": {"seed": 7, **options}}
            return httpx.post(f"{daemon.url}/api/chat", json=body, timeout=60).raise_for_status().json()

        omitted, own = chat(), chat(max_tokens=9)
        assert (omitted.usage.completion_tokens, omitted.choices[0].finish_reason) == (5, "length")
        assert own.usage.completion_tokens == 9
        omitted, own = responses(), responses(max_output_tokens=9)
        assert (omitted.usage.output_tokens, omitted.status) == (5, "incomplete")
        assert own.usage.output_tokens == 9
        omitted, own = ollama(), ollama(num_predict=9)
        assert (omitted["eval_count"], omitted["done_reason"]) == (5, "length")
        assert own["eval_count"] == 9


def test_a_max_tokens_default_beyond_the_context_is_cut_to_what_fits(tiny_checkpoint, tmp_path):
    """A default larger than the context left after the prompt is a limit, not a 400."""
    override_sampling(tmp_path, "smollm2-135m-instruct", {"max_tokens": 100_000})
    with serve_as(tiny_checkpoint, tmp_path, "smollm2-135m-instruct") as daemon:
        context = httpx.get(f"{daemon.url}/v1/models/{daemon.model}").json()["context_length"]
        client = OpenAI(base_url=f"{daemon.url}/v1", api_key="unused")
        messages = [{"role": "user", "content": "a " * (context - 40)}]
        prompt = client.chat.completions.create(model=daemon.model, messages=messages, max_tokens=1).usage.prompt_tokens
        assert 0 < context - prompt <= 64  # a reply that fills the context stays short
        completion = client.chat.completions.create(model=daemon.model, messages=messages, seed=7,
                                                    extra_body={"ignore_eos": True})
    assert completion.usage.prompt_tokens == prompt
    assert (completion.usage.completion_tokens, completion.choices[0].finish_reason) == (context - prompt, "length")


def test_ollama_s_unlimited_num_predict_fills_the_context_past_the_default(tiny_checkpoint, tmp_path):
    """num_predict -1 (no limit) and -2 (fill the context) are Ollama's: the client asked for the
    whole context, so the model's default does not cut the reply."""
    override_sampling(tmp_path, "smollm2-135m-instruct", {"max_tokens": 5})
    with serve_as(tiny_checkpoint, tmp_path, "smollm2-135m-instruct") as daemon:
        context = httpx.get(f"{daemon.url}/v1/models/{daemon.model}").json()["context_length"]
        prompt = "a " * (context - 40)  # leaves a few dozen tokens, so filling them is quick
        for unlimited in (-1, -2):
            body = {"model": daemon.model, "prompt": prompt, "raw": True, "stream": False,
                    "options": {"seed": 7, "num_predict": unlimited}}
            reply = httpx.post(f"{daemon.url}/api/generate", json=body, timeout=120).raise_for_status().json()
            assert reply["eval_count"] > 5 and reply["prompt_eval_count"] + reply["eval_count"] <= context, reply

