"""Where elmd keeps things. platformdirs decides; ELMD_HOME puts everything under one folder
(tests, portable installs)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "elmd"


def _home() -> Path | None:
    home = os.environ.get("ELMD_HOME")
    return Path(home) if home else None


def config_dir() -> Path:
    home = _home()
    return home / "config" if home else Path(platformdirs.user_config_dir(APP))


def data_dir() -> Path:
    home = _home()
    return home / "data" if home else Path(platformdirs.user_data_dir(APP))


def models_dir() -> Path:
    """The model store: one folder per installed model, in the hub's layout."""
    return data_dir() / "models"


def log_dir() -> Path:
    home = _home()
    return home / "logs" if home else Path(platformdirs.user_log_dir(APP))
