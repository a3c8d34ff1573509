"""The models elmd knows by name: `elmd/models.yaml` (shipped in the package) plus an
optional `models.yaml` in the config directory that adds entries or overrides them by id.

The registry only describes models; whether one is installed is the store's business.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from elmd import paths
from elmd.choices import Dtype, QuantName, Runtime
from elmd.sampling_options import MaxTokens, SamplingShape
from elmd.store import validate_name

FILE_NAME = "models.yaml"


class RegistryError(ValueError):
    """A models.yaml that cannot be used; the message names the file and the entry."""


class HubSource(BaseModel):
    """A Hugging Face repository in the hub layout."""

    model_config = ConfigDict(extra="forbid")
    hub: str
    revision: str | None = None


class PackageSource(BaseModel):
    """A file (a GGUF) or a folder (a model in the hub layout) inside an installed Python
    package, found without importing the package."""

    model_config = ConfigDict(extra="forbid")
    package: str
    file: str | None = None
    folder: str | None = None

    @model_validator(mode="after")
    def _one_of_file_or_folder(self) -> "PackageSource":
        if (self.file is None) == (self.folder is None):
            raise ValueError("a package source names exactly one of 'file' and 'folder'")
        return self

    def locate(self) -> Path | None:
        """The file's or folder's path, or None if the package or it is not installed."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            if self.file is not None and (Path(folder) / self.file).is_file():
                return Path(folder) / self.file
            if self.folder is not None and (Path(folder) / self.folder / "config.json").is_file():
                return Path(folder) / self.folder
        return None


Source = HubSource | PackageSource


class ModelSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: Source
    tokenizer: Source


class SamplingDefaults(SamplingShape):
    """The sampling options a model's `sampling` may set, in the API's ranges (one
    declaration, elmd/sampling_options.py): checked when models.yaml is read, so a typo stops
    `elmd serve` at start instead of failing requests."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: MaxTokens | None = None


ModelKind = Literal["generator", "embedding"]


class ModelEntry(BaseModel):
    """One model of models.yaml. `kind: embedding` is a sentence encoder (a BERT in the hub
    layout with sentence-transformers' modules.json): it answers the embeddings routes only;
    `matryoshka` says whether its vectors may be cut to fewer dimensions (`dimensions`)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    kind: ModelKind = "generator"
    matryoshka: bool = False
    context_length: int = Field(gt=0)
    default_quant: QuantName = "none"  # as spelled: a bare int4 takes the serving backend's group
    dtype: Dtype = "auto"  # activations, unless the operator chooses
    chat_template: str | None = None
    sampling: dict = Field(default_factory=dict)  # SamplingDefaults' fields that are set
    draft: str | None = None  # a smaller model with the same tokenizer that guesses for this one
    source: ModelSource
    sources: dict[Runtime, ModelSource] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _drop_architecture(cls, raw):
        """models.yaml files written for an older elmd name an `architecture`; nothing reads it."""
        return {k: v for k, v in raw.items() if k != "architecture"} if isinstance(raw, dict) else raw

    @field_validator("sampling")
    @classmethod
    def _known_sampling(cls, sampling: dict) -> dict:
        return SamplingDefaults.model_validate(sampling).model_dump(exclude_none=True)

    @model_validator(mode="after")
    def _valid_id(self) -> "ModelEntry":
        validate_name(self.id)
        return self

    def source_for(self, backend: str) -> ModelSource:
        """Where this model's weights and tokenizer come from for `backend` (torch | mlx)."""
        return self.sources.get(backend, self.source)


class Registry:
    """Model entries by id, in file order (the package's first, then the user's additions)."""

    def __init__(self, entries: list[ModelEntry]):
        self._entries = {entry.id: entry for entry in entries}

    @classmethod
    def load(cls, user_file: Path | None = None) -> "Registry":
        """The shipped models.yaml, overlaid with the user's (default: config_dir()/models.yaml)."""
        shipped = importlib.resources.files("elmd").joinpath(FILE_NAME)
        entries = {e.id: e for e in _parse(shipped.read_text(), f"elmd/{FILE_NAME}")}
        user_file = user_file if user_file is not None else paths.config_dir() / FILE_NAME
        if user_file.is_file():
            for entry in _parse(user_file.read_text(), str(user_file)):
                entries[entry.id] = entry
        return cls(list(entries.values()))

    def get(self, model_id: str) -> ModelEntry | None:
        return self._entries.get(model_id)

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._entries

    def __iter__(self):
        return iter(self._entries.values())


def _parse(text: str, origin: str) -> list[ModelEntry]:
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RegistryError(f"{origin}: not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("models", []), list):
        raise RegistryError(f"{origin}: expected a mapping with a list under 'models'")
    entries = []
    for index, raw in enumerate(document.get("models") or []):
        try:
            entries.append(ModelEntry.model_validate(raw))
        except (ValidationError, ValueError) as exc:
            name = raw.get("id", f"#{index}") if isinstance(raw, dict) else f"#{index}"
            raise RegistryError(f"{origin}: model {name}: {exc}") from exc
    return entries
