"""`elmd serve`: run the OpenAI-compatible API on this machine."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from pathlib import Path

from elmd.choices import BACKENDS, DTYPES, QUANTS, pick_backend
from elmd.registry import PackageSource
from elmd.settings import SHUTDOWN_GRACE_SECONDS

OFFLINE_DEFAULT = "smollm2-135m-instruct"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the OpenAI-compatible API server",
        description="Serve installed models over an OpenAI-compatible HTTP API on localhost. Models load on "
        "first use; --model loads one at start (a name from models.yaml or the store, or a local directory "
        "in the hub layout). Without --model the offline default is served, installed from its Python "
        "package if needed.",
    )
    parser.add_argument("--model", help="model name, or a local model directory (hub layout)")
    parser.add_argument("--lora-modules", nargs="+", type=lora_module, action=LoraModules, metavar="NAME=DIR",
                        help="LoRA adapters (mlx-lm's or PEFT's folders) over the model served, each served as model "
                        "NAME; an adapter is read, and checked against the model, on its first request")
    parser.add_argument("--backend", choices=BACKENDS, help="runtime (default: auto)")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="activation dtype (default: auto); on the CPU bfloat16 runs float32 activations with bf16 "
                        "weights, which the CPU's fast kernels take")
    parser.add_argument("--quant", choices=QUANTS,
                        help="weight quantization: bf16 weights, int8 per channel, int4 per group of 32/64/128 (default: the model's)")
    parser.add_argument("--host", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default: 8356; 0 picks a free one)")
    parser.add_argument("--keep-alive", help="how long an idle model stays loaded: seconds or e.g. 5m; -1 forever")
    parser.add_argument("--max-loaded-models", type=int, help="models resident at once (default: 2)")
    parser.add_argument("--memory-budget-bytes", type=int, help="memory for resident models (default: half of RAM)")
    parser.add_argument("--max-concurrent-requests", type=int, help="requests generating at once (default: 16)")
    parser.add_argument("--max-queued-requests", type=int, help="requests waiting beyond those; more get 429")
    parser.add_argument("--request-timeout", type=float, help="seconds a request may take (default: 600)")
    parser.add_argument("--allow-origin", action="append", dest="allow_origins", metavar="ORIGIN",
                        help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API; repeatable")
    parser.add_argument("--api-key-file", help="file holding the API key clients must send (default: ELMD_API_KEY, "
                        "else the config directory's api_key file if present; see `elmd key`)")
    parser.add_argument("--max-body-bytes", type=int, help="largest request body (default: 4 MiB)")
    parser.add_argument("--speculation", action=argparse.BooleanOptionalAction,
                        help="speculative decoding when one request generates (default: on): a draft model's "
                        "guesses where there is one, else prompt lookup")
    parser.add_argument("--draft", metavar="MODEL", help="an installed model with the same tokenizer that guesses "
                        "for the served ones (default: the models.yaml entry's draft; none: prompt lookup only)")
    parser.add_argument("--log-file", help="also write the log to this file (created mode 0600)")
    parser.add_argument("--log-prompts", action="store_true", default=None,
                        help="write request and response bodies (prompts, completions) to the log")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def lora_module(value: str) -> tuple[str, Path]:
    """One `--lora-modules` value, NAME=DIR (vLLM's syntax)."""
    from elmd.store import InvalidModelName, validate_name

    name, equals, directory = value.partition("=")
    if not equals or not name or not directory:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (for example my-lora=./adapters), not {value!r}")
    try:
        return validate_name(name), Path(directory)
    except InvalidModelName as exc:
        raise argparse.ArgumentTypeError(f"adapter {exc}") from None


class LoraModules(argparse.Action):
    """`--lora-modules NAME=DIR ...` as {NAME: DIR} (the `lora_modules` setting); each name once."""

    def __call__(self, parser, namespace, values, option_string=None):
        modules = dict(getattr(namespace, self.dest) or {})
        for name, directory in values:
            if name in modules:
                parser.error(f"argument {option_string}: adapter {name!r} is named twice")
            modules[name] = directory
        setattr(namespace, self.dest, modules)


def run(args: argparse.Namespace) -> int:
    from elmd.offline import go_offline

    go_offline()  # before any library that might reach the network is imported
    import uvicorn
    from pydantic import ValidationError

    from elmd import logs
    from elmd.auth import KeyFileError
    from elmd.registry import Registry, RegistryError
    from elmd.server import security
    from elmd.server.app import create_app
    from elmd.catalog import Catalog
    from elmd.server.manager import ModelManager
    from elmd.settings import Settings
    from elmd.store import Store

    # Each flag's dest is its Settings field; a flag not given leaves the field to the
    # environment, config.yaml or the default.
    flags = {name: value for name, value in vars(args).items() if name in Settings.model_fields and value is not None}
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        print(f"elmd serve: invalid setting: {exc}", file=sys.stderr)
        return 2
    try:
        security.api_key(settings)
    except (KeyFileError, security.ExposedWithoutKey) as exc:
        print(f"elmd serve: {exc}", file=sys.stderr)
        return 2
    try:
        registry = Registry.load()
    except RegistryError as exc:  # a typo in models.yaml stops the start, not each request
        print(f"elmd serve: {exc}", file=sys.stderr)
        return 2
    logs.setup(args.log_level, settings.log_file)
    store = Store()
    try:
        pinned, preload, install = startup_model(settings, registry, store)
        check_lora_modules(settings, preload)
    except StartupError as exc:
        print(f"elmd serve: {exc}", file=sys.stderr)
        return 1
    manager = ModelManager(settings, Catalog(settings, registry, store, pinned, started_with=preload))
    app = create_app(settings, manager, preload=preload, install=install)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; SIGTERM
    # is how launchd and systemd stop a service, so it ends in exit status 0, not death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, log_config=None,
                timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)
    return 0


class StartupError(RuntimeError):
    """The model `serve` was asked to start with cannot be served; the message says why."""


def startup_model(settings, registry, store):
    """(pinned ModelSpec or None, model id to load at start or None, what installs that model
    into the store first or None).

    A directory given by the operator is served under its folder name (Catalog.directory);
    a name must be installed, or be installable without the network (the offline default
    ships in a Python package)."""
    from elmd.catalog import Catalog
    from elmd.store import InvalidModelName

    name = settings.model
    if name and _is_directory_argument(name, store):
        path = Path(name).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise StartupError(f"{path} is not a model directory (no config.json)")
        spec = Catalog(settings, registry, store).directory(path)
        return spec, spec.id, None
    wanted = name or OFFLINE_DEFAULT
    try:
        if store.exists(wanted):
            return None, wanted, None
    except InvalidModelName as exc:
        raise StartupError(str(exc)) from None
    entry = registry.get(wanted)
    if entry is None:
        raise StartupError(f"unknown model {wanted!r}: not in models.yaml and not installed (see `elmd list`)")
    backend = pick_backend(settings.backend)
    source = entry.source_for(backend)
    if isinstance(source.weights, PackageSource) and source.weights.locate() is not None:
        from elmd.pull import pull

        # After the daemon listens (seconds of GGUF conversion), so /health can say so meanwhile.
        return None, wanted, functools.partial(pull, wanted, entry, store, progress=False,
                                               backend=backend, quant=settings.quant)
    if name:
        raise StartupError(f"model {wanted!r} is not installed: run `elmd pull {wanted}` first")
    logging.getLogger("elmd.server").warning("the offline default %s is not installable here; serving installed models only", wanted)
    return None, None, None


def check_lora_modules(settings, base: str | None) -> None:
    """The `--lora-modules` folders exist and have a model to adapt. What is in them is read on
    first use (a 400 naming what does not fit), so a bad adapter never stops the model serving."""
    if not settings.lora_modules:
        return
    if base is None:
        raise StartupError("--lora-modules adapts the model serve starts with, and there is none: give --model")
    for name, directory in settings.lora_modules.items():
        if name == base:
            raise StartupError(f"--lora-modules: {name!r} is the served model's own name; give the adapter another")
        if not directory.is_dir():
            raise StartupError(f"--lora-modules: {name}={directory}: no such directory")


def _is_directory_argument(value: str, store) -> bool:
    """A path-like value, or a bare name that is a directory here and not an installed model."""
    from elmd.store import InvalidModelName

    if "/" in value or "\\" in value or value.startswith((".", "~")):
        return True
    try:
        installed = store.exists(value)
    except InvalidModelName:
        installed = False
    return not installed and Path(value).is_dir()
