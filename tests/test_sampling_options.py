"""The sampling options are declared once (elmd/sampling_options.py): every dialect's
request, as the daemon's own openapi.json publishes it, and models.yaml's `sampling` accept
the same range for each option, under the name the dialect gives it on the wire."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from elmd.catalog import Catalog
from elmd.registry import Registry, SamplingDefaults
from elmd.sampling_options import SamplingOptions, SamplingShape
from elmd.server.app import create_app
from elmd.server.manager import ModelManager
from elmd.settings import Settings
from elmd.store import Store

# Where each dialect's request carries the options, and its wire names for ours.
DIALECTS = {
    "ChatCompletionRequest": {},
    "CompletionRequest": {},
    "ResponsesRequest": {},
    "OllamaOptions": {"repetition_penalty": "repeat_penalty"},
    "MessagesRequest": {},
}
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "type")


def bounds(schema: dict) -> dict:
    """A field's bounds and type, whether the schema nests them under anyOf (nullable) or not."""
    found = {key: schema[key] for key in BOUNDS if key in schema}
    for branch in schema.get("anyOf", []):
        if branch.get("type") != "null":
            found.update({key: branch[key] for key in BOUNDS if key in branch})
    return found


@pytest.fixture(scope="module")
def components(tmp_path_factory) -> dict:
    settings = Settings()
    catalog = Catalog(settings, Registry([]), Store(tmp_path_factory.mktemp("store")))
    return create_app(settings, ModelManager(settings, catalog)).openapi()["components"]["schemas"]


@pytest.mark.parametrize("option", [name for name in SamplingShape.model_fields if name != "stop"])
def test_every_dialect_publishes_the_same_range(components, option):
    expected = bounds(SamplingOptions.model_json_schema()["properties"][option])
    assert set(expected) - {"type"}, f"{option} publishes no bounds"
    for dialect, renamed in DIALECTS.items():
        published = components[dialect]["properties"][renamed.get(option, option)]
        assert bounds(published) == expected, (dialect, option)


def test_models_yaml_defaults_take_the_same_ranges():
    for option, value in [("temperature", 2.5), ("top_p", 1.5), ("top_k", -1), ("min_p", -0.1),
                          ("repetition_penalty", 0), ("presence_penalty", 3), ("frequency_penalty", -3)]:
        with pytest.raises(ValidationError):
            SamplingDefaults.model_validate({option: value})
        with pytest.raises(ValidationError):
            SamplingOptions.model_validate({option: value})
    # top_p 0 is in the API's range (it was refused in models.yaml alone before the options were declared once)
    assert SamplingDefaults.model_validate({"top_p": 0}).top_p == 0


def test_set_options_reach_the_engine_under_its_names():
    options = SamplingOptions.model_validate({"temperature": 0.5, "stop": "x", "seed": 3, "top_k": None})
    assert options.sampling_values() == {"temperature": 0.5, "stop": ("x",), "seed": 3}
    assert SamplingOptions.model_validate({"stop": []}).sampling_values() == {}  # no stops: the model's default


def test_openapi_states_every_bound_in_json_schemas_words(components):
    """pydantic writes a bound it cannot place as its own keyword (`ge`, `le`), which JSON
    Schema ignores: the published schema would then allow what the daemon refuses."""
    leaked = []

    def walk(node, path):
        if isinstance(node, dict):
            leaked.extend(f"{path}.{key}" for key in node if key in ("ge", "le", "gt", "lt", "min_length", "max_length"))
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(components, "components.schemas")
    assert not leaked, leaked
