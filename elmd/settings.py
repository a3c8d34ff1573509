"""Daemon settings: command-line flags, then `ELMD_*` environment variables, then
`config.yaml` in the config directory, then these defaults."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from elmd import paths
from elmd.choices import Backend, Dtype, QuantName
from elmd.store import validate_name

# 8356: "ELM" on a phone keypad after an 8. Clear of Ollama (11434), llama.cpp (8080),
# LM Studio (1234), the Python/uvicorn default (8000) and other local tools
# (AnkiConnect 8765, Jupyter 8888, Gradio 7860, ComfyUI 8188, Syncthing 8384).
DEFAULT_PORT = 8356
CONFIG_FILE = "config.yaml"
SHUTDOWN_GRACE_SECONDS = 10  # after SIGTERM, in-flight requests (streams too) may finish this long, then are cancelled

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | int | float | None) -> float | None:
    """Seconds from a keep-alive as Ollama accepts it: a number of seconds or a Go-style
    duration ("5m", "1h30m", "90s"). Negative means forever and returns None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds or a duration such as '5m'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        negative = text.startswith("-")
        body = text.lstrip("+-")
        try:
            seconds = float(body)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"invalid duration {value!r}: use seconds or e.g. '5m', '1h30m'") from None
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
        seconds = -seconds if negative else seconds
    return None if seconds < 0 else seconds


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ELMD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    model: str | None = None  # what `serve` loads at start: a models.yaml / store name (or, from the CLI, a directory)
    backend: Backend = "auto"
    dtype: Dtype = "auto"
    quant: QuantName | None = None  # None: each model's default_quant
    # LoRA adapters over `model`, each served as a model of its own: {name: adapter folder}
    lora_modules: dict[str, Path] = Field(default_factory=dict)

    # model lifecycle
    keep_alive: float | None = 300.0  # seconds an idle model stays loaded; None: forever
    max_loaded_models: int = Field(2, ge=1)
    memory_budget_bytes: int | None = Field(None, ge=0)  # None: half of physical memory

    # back-pressure
    max_concurrent_requests: int = Field(16, ge=1)  # generating at once (the backend batches them)
    max_queued_requests: int = Field(64, ge=0)  # waiting beyond those; more get 429
    request_timeout: float = Field(600.0, gt=0)  # seconds from arrival to the last token
    retry_after: int = Field(1, ge=1)  # seconds suggested in Retry-After

    # the engines: the prefix cache on both backends, the rest on PyTorch
    prefix_cache_bytes: int = Field(256 << 20, ge=0)  # KV of earlier conversations kept for reuse; 0: off
    kv_cache_dtype: Literal["auto", "float16", "float32"] = "auto"  # auto: float16 beside float32 activations on the CPU
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (CUDA only)
    compile_decode: bool = False  # with cuda_graphs, capture a torch.compile'd step (minutes of compiling)
    speculation: bool = True  # speculative decoding when one sequence decodes (output unchanged)
    draft: str | None = None  # the model that guesses for every served one (default: models.yaml's `draft`); "none": off

    # streaming
    sse_ping_seconds: float = Field(10.0, gt=0)  # comment keep-alives while a prompt is processed

    # security (see elmd/server/security.py)
    api_key: SecretStr | None = None  # ELMD_API_KEY; required to bind beyond loopback
    api_key_file: Path | None = None  # else this file, else config_dir()/api_key if present
    allow_origins: list[str] = Field(default_factory=list)  # browser origins given CORS access
    max_body_bytes: int = Field(4 << 20, ge=1024)  # larger request bodies get 413
    log_prompts: bool = False  # write request and response bodies to the log (off: no prompt text)
    log_file: Path | None = None  # also log here, created mode 0600

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value):
        return parse_duration(value)

    @field_validator("lora_modules")
    @classmethod
    def _adapter_names(cls, modules: dict[str, Path]) -> dict[str, Path]:
        """Adapter names are model names (a request's `model`); folders are made absolute here,
        so a relative one means the same folder whoever reads it later."""
        return {validate_name(name): directory.expanduser().resolve() for name, directory in modules.items()}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file=config_file()))


def config_file() -> Path:
    return paths.config_dir() / CONFIG_FILE
