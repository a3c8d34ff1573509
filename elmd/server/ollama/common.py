"""What Ollama's generation and model routes share: its time units and stamps, and the
model a request names."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from elmd.server.errors import APIError
from elmd.server.manager import ModelManager

NS = 1_000_000_000


def timestamp(seconds: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes `created_at`."""
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def model_id(manager: ModelManager, name: str) -> str:
    """The model a request names; Ollama's clients add `:latest` to untagged names."""
    bare = name.removesuffix(":latest")
    if bare != name:
        try:
            manager.spec(name)
        except APIError:
            return bare
    return name
