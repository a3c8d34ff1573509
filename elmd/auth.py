"""The daemon's API key: where it comes from and how a key file is made.

The key is read from `ELMD_API_KEY` (or `api_key` in config.yaml), else from a key file:
`--api-key-file PATH`, or `api_key` in the config directory if it exists. A key file
must be readable by its owner only (like an SSH private key), because anyone who can
read it can use the daemon; `elmd key` creates one with mode 0600. There is no
`--api-key VALUE` flag on purpose: a command line is visible to every local user in `ps`.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from elmd import paths

KEY_FILE = "api_key"


class KeyFileError(RuntimeError):
    """A key file that cannot be used; the message says how to fix it."""


def default_key_file() -> Path:
    return paths.config_dir() / KEY_FILE


def read_key_file(path: Path) -> str:
    """The key in `path`, refusing files that other users could read or write."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"API key file {path} does not exist (create one with `elmd key`)") from None
    if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"API key file {path} is accessible by other users (mode {stat.S_IMODE(info.st_mode):o}); "
                           f"run `chmod 600 {path}`")
    key = path.read_text().strip()
    if not key:
        raise KeyFileError(f"API key file {path} is empty")
    return key


def resolve_key(explicit: str | None, key_file: Path | None) -> str | None:
    """The key the daemon enforces: an explicit key (ELMD_API_KEY, config.yaml), else
    the named key file, else the default key file if it exists, else None (no key)."""
    if explicit:
        return explicit
    if key_file is not None:
        return read_key_file(Path(key_file).expanduser())
    default = default_key_file()
    return read_key_file(default) if default.exists() else None


def client_key() -> str | None:
    """The key a local client should send: ELMD_API_KEY, else the default key file."""
    return resolve_key(os.environ.get("ELMD_API_KEY") or None, None)


def create_key_file(path: Path | None = None, replace: bool = False) -> tuple[Path, str]:
    """Write a new random key to `path` (default: the config directory's key file),
    created with mode 0600 whatever the umask; an existing key is kept unless `replace`."""
    path = Path(path) if path is not None else default_key_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace:
        return path, read_key_file(path)
    key = "elmd-" + secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen it, but an inherited ACL could
        os.write(fd, (key + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path, key
