"""Where the daemon's log goes: stderr (which the service manager may send to a file),
and optionally a log file that is created readable by its owner only, since even
without prompts a log says which models were used and when."""

from __future__ import annotations

import logging
import os
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def open_private(path: Path) -> int:
    """A descriptor for appending to `path`, created (or narrowed) to mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def setup(level: str, log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        handlers.append(logging.StreamHandler(os.fdopen(open_private(Path(log_file).expanduser()), "a", buffering=1)))
    logging.basicConfig(level=level.upper(), format=FORMAT, handlers=handlers, force=True)
