"""Who may talk to the daemon, as ASGI middleware declared once for every route.

From the outside in:
- HostCheck (while bound to loopback): the Host header must name this machine
  (localhost, 127.0.0.1, [::1], the hostname or the bound address; any port), so a web
  page cannot reach the API through a DNS name rebound to 127.0.0.1 (CVE-2024-28224).
- OriginCheck: a browser request from another origin is refused (403) unless that origin
  was allowed with --allow-origin; this stops a web page from even sending requests
  that need no preflight (`fetch(url, {mode: "no-cors", body: blob})`). Browsers omit
  Origin on cross-site GETs (`<img src>`, links), so those are recognised by their
  `Sec-Fetch-Site` header instead (a GET can load a model: /tokenizer_info).
- CORS (only with --allow-origin): the named origins get Access-Control-Allow-Origin.
- ApiKeyCheck (when a key is configured): `Authorization: Bearer KEY` (or `x-api-key: KEY`, as
  Anthropic's SDKs send it) on every route
  but /health and the chat page's static files, compared in constant time; 401 in OpenAI's error shape.
- BodySizeLimit: a body larger than `max_body_bytes` is refused with 413 before the
  app parses it (Content-Length or counted while reading a chunked body).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import socket
from typing import Callable

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from elmd import auth
from elmd.server import page
from elmd.server.errors import APIError
from elmd.settings import Settings

# What a supervisor may poll without the key, and the chat page's files (which hold no
# data; the page asks for the key itself).
OPEN_PATHS = frozenset({"/health"}) | page.PATHS


class ExposedWithoutKey(RuntimeError):
    """Asked to listen beyond loopback with no API key configured."""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_key(settings: Settings) -> str | None:
    """The key to enforce, or None; raises auth.KeyFileError and ExposedWithoutKey."""
    explicit = settings.api_key.get_secret_value() if settings.api_key else None
    key = auth.resolve_key(explicit, settings.api_key_file)
    if key is None and not is_loopback(settings.host):
        raise ExposedWithoutKey(
            f"refusing to listen on {settings.host} without an API key: anyone who can reach this machine could "
            f"use the daemon. Set one with the ELMD_API_KEY environment variable, or run `elmd key` to create "
            f"{auth.default_key_file()} (mode 0600) and pass it to clients as `Authorization: Bearer KEY`; "
            "or bind to 127.0.0.1."
        )
    return key


def install(app: FastAPI, settings: Settings) -> None:
    """Add the middleware in order; the last added runs first."""
    key = api_key(settings)
    if settings.log_prompts:
        from elmd.server.prompt_log import PromptLog

        app.add_middleware(PromptLog)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if key is not None:
        app.add_middleware(ApiKeyCheck, key=key)
        app.openapi = functools.partial(_openapi_with_bearer, app.openapi)
    origins = [origin.rstrip("/").lower() for origin in settings.allow_origins]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type", "x-api-key", "anthropic-version", "anthropic-beta"],
                           max_age=600)
    app.add_middleware(OriginCheck, allowed=frozenset(origins))
    if is_loopback(settings.host):
        app.add_middleware(HostCheck, allowed=allowed_hosts(settings.host))


def _openapi_with_bearer(generate: Callable[[], dict]) -> dict:
    """The schema with the key as a bearer scheme on every operation ApiKeyCheck guards, so
    clients generated from it send the key (and fuzzers know which calls need it)."""
    schema = generate()  # FastAPI keeps it, so this marks it once
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    if "bearer" not in schemes:
        schemes["bearer"] = {"type": "http", "scheme": "bearer",
                             "description": "The daemon's API key (ELMD_API_KEY or the file `elmd key` wrote)."}
        schemes["x-api-key"] = {"type": "apiKey", "in": "header", "name": "x-api-key",
                                "description": "The same key, as Anthropic's clients send it."}
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                if path not in OPEN_PATHS:
                    operation["security"] = [{"bearer": []}, {"x-api-key": []}]
    return schema


def allowed_hosts(bind_host: str) -> frozenset[str]:
    names = {"localhost", "127.0.0.1", "[::1]", socket.gethostname().lower()}
    bound = bind_host.strip("[]").lower()
    names.add(f"[{bound}]" if ":" in bound else bound)
    return frozenset(names)


def host_name(value: str) -> str | None:
    """The host part of a Host header (`name`, `name:port`, `[v6]:port`), lowercased;
    None if the header is malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
    else:
        name, _, port = value.partition(":")
        rest = f":{port}" if _ else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    return name or None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _refuse(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
    await error.response(scope["path"])(scope, receive, send)


class HostCheck:
    def __init__(self, app: ASGIApp, allowed: frozenset[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = _header(scope, b"host")
            if host is None or host_name(host) not in self.allowed:
                return await _refuse(scope, receive, send, APIError(
                    403, f"Host {host!r} is not allowed: this server answers only to localhost.",
                    type="permission_error", code="host_not_allowed"))
        await self.app(scope, receive, send)


class OriginCheck:
    def __init__(self, app: ASGIApp, allowed: frozenset[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            origin = _header(scope, b"origin")
            if origin is not None and not self._allowed(origin.strip().lower(), _header(scope, b"host")):
                return await _refuse(scope, receive, send, APIError(
                    403, f"Origin {origin!r} is not allowed; start elmd with --allow-origin {origin} to allow it.",
                    type="permission_error", code="origin_not_allowed"))
            if origin is None and _header(scope, b"sec-fetch-site") in ("cross-site", "same-site"):
                return await _refuse(scope, receive, send, APIError(
                    403, "Requests from other web sites are not allowed.", type="permission_error",
                    code="origin_not_allowed"))
        await self.app(scope, receive, send)

    def _allowed(self, origin: str, host: str | None) -> bool:
        same_origin = host is not None and origin in (f"http://{host.lower()}", f"https://{host.lower()}")
        return same_origin or origin in self.allowed


class ApiKeyCheck:
    def __init__(self, app: ASGIApp, key: str):
        self.app = app
        self._digest = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            error = self._check(_header(scope, b"authorization"), _header(scope, b"x-api-key"))
            if error is not None:
                return await _refuse(scope, receive, send, error)
        await self.app(scope, receive, send)

    def _check(self, authorization: str | None, x_api_key: str | None) -> APIError | None:
        """The key as a bearer token, or in `x-api-key` as Anthropic's SDKs send it."""
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if x_api_key is not None and not (scheme.lower() == "bearer" and presented.strip()):
            scheme, presented = "bearer", x_api_key
        if scheme.lower() != "bearer" or not presented.strip():
            return APIError(401, "You didn't provide an API key. Send it in an Authorization header using Bearer "
                            "auth (Authorization: Bearer YOUR_KEY).", code="missing_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
        # Digests of equal length: the comparison's time reveals neither the key nor its length.
        digest = hashlib.sha256(presented.strip().encode("latin-1")).digest()
        if not hmac.compare_digest(digest, self._digest):
            return APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
        return None


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > self.max_bytes):
            return await _refuse(scope, receive, send, self._too_large())
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await _refuse(scope, receive, send, self._too_large())
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than {self.max_bytes} bytes (ELMD_MAX_BODY_BYTES).",
                        code="request_too_large")
