"""OpenAI's error object for every failure: `{"error": {"message", "type", "param", "code"}}`,
or Ollama's `{"error": "message"}` on Ollama's routes (`/api/...`).

Validation failures become 400 naming the parameter (not FastAPI's 422 body), unknown
routes and methods keep their status in the same shape, and anything unexpected is a
500 whose body says nothing about the code (the traceback goes to the log only).

`responses(...)` documents, per route, the statuses it answers and their error body, so
that /openapi.json lists what really happens (and not the 422 FastAPI would add).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from elmd.engine.engine import MemoryBudgetError


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class OllamaError(BaseModel):
    """Every failure on Ollama's routes (OpenAI's routes send `ErrorResponse`)."""

    error: str


class AnthropicErrorBody(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    """Every failure on Anthropic's routes (`/v1/messages...`)."""

    type: str = "error"
    error: AnthropicErrorBody


log = logging.getLogger("elmd.server")

_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict"}
OLLAMA_PREFIX = "/api/"
ANTHROPIC_PREFIX = "/v1/messages"
# Anthropic's error types by status (its 529 "overloaded" is elmd's 503).
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


class APIError(Exception):
    """An error a handler raises to answer with OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()

    def ollama_body(self) -> dict:
        return {"error": self.message}

    def anthropic_body(self) -> dict:
        kind = ANTHROPIC_TYPES.get(self.status, "api_error")
        return AnthropicError(error=AnthropicErrorBody(type=kind, message=self.message)).model_dump()

    def response(self, path: str = "") -> JSONResponse:
        """The error in the shape of the API that `path` belongs to."""
        if path.startswith(OLLAMA_PREFIX):
            body = self.ollama_body()
        elif path.startswith(ANTHROPIC_PREFIX):
            body = self.anthropic_body()
        else:
            body = self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str) -> APIError:
    return APIError(400, f"'{param}' is not supported by this server.", param=param, code="unsupported_parameter")


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist or is not installed. GET /v1/models lists the models this server can serve.",
        param="model",
        code="model_not_found",
    )


def too_many_requests(retry_after: int) -> APIError:
    return APIError(
        429,
        "The server is busy: too many requests are queued. Retry after a moment.",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after)},
    )


def unavailable(message: str, retry_after: int, code: str = "server_overloaded") -> APIError:
    return APIError(503, message, type="server_error", code=code, headers={"Retry-After": str(retry_after)})


def over_memory_budget(exc: MemoryBudgetError) -> APIError:
    return APIError(503, str(exc), type="server_error", code="insufficient_memory")


def timed_out(retry_after: int) -> APIError:
    return unavailable("The request timed out.", retry_after, code="timeout")


# What each error status means, whichever route answers it (its body's `code` says which case).
MEANINGS = {
    400: "The request is invalid: malformed JSON, a wrong type or value, a missing, unknown or unsupported "
         "parameter, more tokens than the model's context holds, a model of the other kind (an embedding model "
         "asked to generate, a generator asked to embed), or a LoRA adapter that does not fit its base model "
         "(`adapter_invalid`: the message names the file and key). `param` names the parameter.",
    401: "An API key is configured and the request did not present it as `Authorization: Bearer KEY` (or "
         "`x-api-key: KEY`, as Anthropic's clients send it).",
    403: "The Host or Origin header names another site (DNS rebinding, a cross-site request).",
    404: "The model (or stored response) the request names does not exist.",
    413: "The request body is larger than ELMD_MAX_BODY_BYTES.",
    429: "Too many requests are queued; retry after `Retry-After` seconds.",
    499: "The client closed the connection before the answer was ready (what the daemon logs and counts; the "
         "client never reads it).",
    500: "An unexpected error (details in the daemon's log only), a model that fails to load, or a failed pull.",
    503: "The model is still loading or being installed, does not fit the memory budget, or the request timed "
         "out; retry after `Retry-After` seconds.",
}
EVERY_ROUTE = (403, 413, 500)  # the middleware's refusals, and the unexpected
GENERATION = (400, 404, 429, 499, 503)  # what a route that generates may answer besides those


def responses(*statuses: int, keyed: bool = True) -> dict[int, dict]:
    """OpenAPI `responses` for a route that answers `statuses` besides its own and every
    route's (401 too where the API key is asked for), each with its API's error body."""
    return {status: {"model": ErrorResponse, "description": MEANINGS[status]}
            for status in sorted({*statuses, *EVERY_ROUTE, *((401,) if keyed else ())})}


def ollama_responses(*statuses: int) -> dict[int, dict]:
    """`responses` for an Ollama route (`/api/...`): the same statuses, Ollama's error body."""
    return {status: {**response, "model": OllamaError} for status, response in responses(*statuses).items()}


def anthropic_responses(*statuses: int) -> dict[int, dict]:
    """`responses` for an Anthropic route (`/v1/messages...`): the same statuses, its error body."""
    return {status: {**response, "model": AnthropicError} for status, response in responses(*statuses).items()}


def param_name(loc: tuple) -> str | None:
    """`messages[0].content` from a pydantic error location (without `body` and union tags)."""
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and ("[" in item or item in _TYPE_TAGS or item[:1].isupper()):
            continue
        else:
            parts.append(f".{item}" if parts else str(item))
    return "".join(parts) or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return invalid(
            "We could not parse the JSON body of your request. The body must be valid JSON.",
            code="invalid_json",
        )
    param = param_name(tuple(first.get("loc", ())))
    if param is None:
        return invalid("The request body must be a JSON object.", code="invalid_body")
    if first.get("type") == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    return invalid(f"Invalid value for '{param}': {first.get('msg', 'invalid value')}.", param=param, code="invalid_value")


def install(app: FastAPI) -> None:
    """Route every error through OpenAI's error object."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(MemoryBudgetError)
    async def _memory_budget(request: Request, exc: MemoryBudgetError) -> JSONResponse:
        return over_memory_budget(exc).response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"Unknown URL: {request.method} {request.url.path}"}.get(exc.status_code, str(exc.detail))
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return APIError(exc.status_code, message, code=code, headers=headers).response(request.url.path)

    app.openapi = functools.partial(_openapi_without_422, app, app.openapi)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return APIError(500, "The server had an error while processing your request.", type="server_error",
                        code="internal_error").response(request.url.path)


def allowed_methods(request: Request) -> list[str]:
    """Every method served at the request's path: Starlette's own 405 names only those of
    the first route whose path matched (GET of /v1/responses/{id}, without its DELETE)."""
    methods: set[str] = set()
    for route in _routes(request.app.router.routes):
        if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


def _routes(routes: list) -> Iterator:
    """Every route, those of included routers too (FastAPI keeps an included router whole as
    one route, `original_router`; elmd includes its routers without a prefix)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        yield from _routes(included.routes) if included is not None else (route,)


def _openapi_without_422(app: FastAPI, generate: Callable[[], dict]) -> dict:
    """FastAPI's schema less the 422 it adds to every route with parameters (it has no
    switch for that): elmd answers validation failures with 400, documented per route."""
    if app.openapi_schema is None:
        schema = generate()
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema
