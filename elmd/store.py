"""The model store: one folder per installed model under `elmd.paths.models_dir()`.

Every way into the store goes through a validated name, and every file read from a
model goes through `Store.resolve_file`, so neither a request's `model` field nor a
file list inside a checkpoint (a weight index naming `../x`, a symlink) can reach a path
outside the store (the class of bug behind CVE-2024-37032). Installs are built in a
hidden temporary folder and renamed into place, so a model is either fully there or
not there at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Iterator

from elmd import paths
from elmd.quant import Quant

MANIFEST = "elmd.json"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*(:[a-z0-9._-]+)?")
MAX_NAME_LENGTH = 128


class InvalidModelName(ValueError):
    """A model name that is not in the store's grammar or would leave the store."""


class UnsafeModelFile(ValueError):
    """A file reference inside a model that would leave the model's folder."""


class ModelNotFound(LookupError):
    """No model of that name is installed."""


@dataclass(frozen=True)
class StoredModel:
    name: str
    path: Path
    size_bytes: int
    manifest: dict = field(default_factory=dict)

    @property
    def quant(self) -> Quant:
        """The quantized weights stored beside the float ones (none: the float weights only).
        Only the PyTorch backend stores them, so an older manifest's bare int4 is its group 32."""
        return Quant.parse(self.manifest.get("quant", "none"), "torch")

    @property
    def adapter_for(self) -> str | None:
        """The base model of a LoRA adapter (`elmd import DIR --adapter-for BASE`); None for a model."""
        return self.manifest.get("adapter_for")


def validate_name(name: str) -> str:
    """Return `name` if it matches `[a-z0-9][a-z0-9._-]*(:[a-z0-9._-]+)?`, else raise.

    The grammar alone excludes separators, absolute paths, `..` and hidden names."""
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not NAME_PATTERN.fullmatch(name):
        raise InvalidModelName(
            f"invalid model name {name!r}: use lowercase letters, digits, '.', '_', '-' "
            "and an optional ':tag' (for example 'openelm-270m-instruct:int4')"
        )
    return name


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(model_dir: Path) -> dict[str, dict]:
    """sha256 and size of every regular file in a model folder (the manifest excluded)."""
    files = {}
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != MANIFEST:
            rel = p.relative_to(model_dir).as_posix()
            files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return files


def write_manifest(model_dir: Path, *, source: dict, revision: str | None, quant: Quant = Quant(),
                   files: dict[str, dict] | None = None, **extra) -> dict:
    """Write `elmd.json` into a model folder that is being installed; returns the manifest.

    `quant`: the quantized weights stored beside the float ones (quant_store), written out as
    str(Quant). `files` defaults to hashing what is in the folder now."""
    manifest = {
        "source": source,
        "revision": revision,
        "quant": str(quant),
        "files": describe_files(model_dir) if files is None else files,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def human_size(n: int) -> str:
    """Bytes as people read them, in decimal units as disk tools report: '1.2 GB'."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _dir_size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class Store:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else paths.models_dir()

    def _real_root(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root.resolve()

    def path(self, name: str) -> Path:
        """The folder of model `name` (which need not exist). Raises InvalidModelName for
        a name outside the grammar or a folder that is a symlink or resolves elsewhere."""
        validate_name(name)
        root = self._real_root()
        target = root / name
        if target.is_symlink() or target.resolve().parent != root:
            raise InvalidModelName(f"model {name!r} resolves outside the store {root}")
        return target

    def exists(self, name: str) -> bool:
        return self.path(name).is_dir()

    def resolve_file(self, name: str, relative: str) -> Path:
        """The absolute path of file `relative` inside model `name`, after checking that
        neither the reference nor any symlink along it leaves the model's folder."""
        model_dir = self.path(name).resolve()
        return resolve_inside(model_dir, relative)

    @contextmanager
    def installing(self, name: str, overwrite: bool = False) -> Iterator[Path]:
        """Yield an empty hidden folder in the store to build model `name` in; on normal
        exit rename it into place (replacing an existing model only if `overwrite`), on
        an exception delete it. Installs of one name are serialized by a lock file, which
        also makes it safe to sweep the leftovers of an install that was killed."""
        from filelock import FileLock

        target = self.path(name)
        root = self._real_root()
        with FileLock(str(root / f".lock-{name}")):
            if target.exists() and not overwrite:
                raise FileExistsError(f"model {name!r} is already installed (remove it first)")
            for stale in root.glob(f".tmp-{name}@*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}@", dir=root))
            try:
                yield tmp
                if target.exists():
                    old = Path(tempfile.mkdtemp(prefix=".rm-", dir=root))
                    os.replace(target, old / "model")
                    os.replace(tmp, target)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def list(self) -> list[StoredModel]:
        models = []
        if not self.root.is_dir():
            return models
        for entry in sorted(self.root.iterdir()):
            if entry.is_symlink() or not entry.is_dir() or not NAME_PATTERN.fullmatch(entry.name):
                continue
            models.append(StoredModel(entry.name, entry, _dir_size(entry), self._read_manifest(entry)))
        return models

    def get(self, name: str) -> StoredModel:
        target = self.path(name)
        if not target.is_dir():
            raise ModelNotFound(f"model {name!r} is not installed")
        return StoredModel(name, target, _dir_size(target), self._read_manifest(target))

    def manifest(self, name: str) -> dict:
        """The model's `elmd.json` (source, revision, files with sha256, quant, created);
        {} for a model installed without one."""
        return self.get(name).manifest

    def remove(self, name: str) -> None:
        """Delete a model: renamed out of sight first, so it vanishes in one step."""
        target = self.path(name)
        if not target.is_dir():
            raise ModelNotFound(f"model {name!r} is not installed")
        trash = Path(tempfile.mkdtemp(prefix=".rm-", dir=self._real_root()))
        os.replace(target, trash / "model")
        shutil.rmtree(trash)

    @staticmethod
    def _read_manifest(model_dir: Path) -> dict:
        manifest = model_dir / MANIFEST
        if manifest.is_symlink() or not manifest.is_file():
            return {}
        return json.loads(manifest.read_text())


def check_relative(relative: str) -> PurePosixPath:
    """A file reference as written in a checkpoint or the hub's file list: relative, no
    `..` parts, no backslashes or NULs."""
    if not isinstance(relative, str) or not relative or "\\" in relative or "\x00" in relative:
        raise UnsafeModelFile(f"invalid file reference {relative!r}")
    ref = PurePosixPath(relative)
    if ref.is_absolute() or ".." in ref.parts:
        raise UnsafeModelFile(f"file reference {relative!r} leaves the model folder")
    return ref


def resolve_inside(base: Path, relative: str) -> Path:
    """`base / relative`, refusing absolute references, `..` parts and symlinks that lead
    out of `base` (which must already be resolved)."""
    full = (base / check_relative(relative)).resolve()
    if full != base and base not in full.parents:
        raise UnsafeModelFile(f"file {relative!r} resolves outside the model folder")
    return full
