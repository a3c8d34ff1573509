"""Request and response bodies in the log, only when the operator asks for it
(`log_prompts: true` / ELMD_LOG_PROMPTS=1 / `elmd serve --log-prompts`). Without it
nothing in the daemon writes prompt or completion text anywhere."""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("elmd.prompts")

MAX_LOGGED_BYTES = 64 << 10  # per body: enough to debug a client, bounded for the log


class PromptLog:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        request, response = bytearray(), bytearray()

        async def logged_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(request) < MAX_LOGGED_BYTES:
                request.extend(message.get("body", b""))
            return message

        async def logged_send(message: Message) -> None:
            if message["type"] == "http.response.body" and len(response) < MAX_LOGGED_BYTES:
                response.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, logged_receive, logged_send)
        finally:
            path = scope["path"]
            log.info("%s request: %s", path, request[:MAX_LOGGED_BYTES].decode("utf-8", "replace"))
            log.info("%s response: %s", path, response[:MAX_LOGGED_BYTES].decode("utf-8", "replace"))
