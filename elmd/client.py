"""How the CLI reaches a running daemon: its address (`--url`, else the settings the daemon
reads too: ELMD_HOST / ELMD_PORT / config.yaml), the API key (ELMD_API_KEY, else the key
file `elmd key` made), and an official OpenAI client pointed at it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import httpx

from elmd import auth
from elmd.settings import Settings

if TYPE_CHECKING:  # the SDK is imported where it is used: `elmd status` and `--help` never need it
    import openai
    from openai.types import CompletionUsage

NO_KEY = "elmd"  # the SDK insists on a key; a daemon without one ignores it
ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class ClientError(RuntimeError):
    """The CLI cannot talk to the daemon; the message says why and what to do."""


class DaemonUnreachable(ClientError):
    def __init__(self, url: str):
        super().__init__(
            f"no elmd daemon answers at {url}; start one with `elmd serve` or `elmd agent install` "
            "(or point at it with --url / ELMD_HOST / ELMD_PORT)"
        )


def base_url(url: str | None = None) -> str:
    """The daemon's root URL, without a trailing slash or /v1."""
    if url:
        return url.rstrip("/").removesuffix("/v1")
    settings = Settings()
    host = ANY_ADDRESS.get(settings.host, settings.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def api_key() -> str | None:
    """The key the daemon enforces by default, or None when it has none."""
    try:
        return auth.client_key()
    except auth.KeyFileError as error:
        raise ClientError(str(error)) from None


def openai_client(url: str) -> "openai.OpenAI":
    """The official SDK, with no retries: a local daemon that is down stays down."""
    import openai

    return openai.OpenAI(
        base_url=f"{url}/v1",
        api_key=api_key() or NO_KEY,
        max_retries=0,
        # The SDK's own Timeout type: openai 1.x/2.x re-export httpx's, 3.x httpx2's.
        timeout=openai.Timeout(None, connect=5.0),
    )


def get(url: str, path: str) -> httpx.Response:
    """GET a daemon endpoint, with the key when there is one."""
    key = api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        return httpx.get(f"{url}{path}", headers=headers, timeout=5.0)
    except httpx.TransportError:
        raise DaemonUnreachable(url) from None


def get_json(url: str, path: str) -> tuple[int, dict]:
    """GET a daemon endpoint: (status code, JSON body)."""
    response = get(url, path)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {}


def loading_notice(url: str, model: str) -> str | None:
    """A line to show while the daemon loads `model`: the answer waits for the load."""
    code, card = get_json(url, f"/v1/models/{model}")
    if code == 200 and card.get("loaded") is False:
        return f"loading {model}; the answer starts once it is in memory..."
    return None


@dataclass
class Reply:
    """One streamed answer; `interrupted` when Ctrl-C stopped it part-way."""

    text: str = ""
    usage: "CompletionUsage | None" = None
    seconds: float = 0.0
    interrupted: bool = False

    def stats(self) -> str:
        """A line for --verbose: what the daemon counted, and how fast it came."""
        if not self.usage:
            return f"{self.seconds:.2f}s"
        rate = self.usage.completion_tokens / self.seconds if self.seconds else 0.0
        return (
            f"prompt_tokens={self.usage.prompt_tokens} completion_tokens={self.usage.completion_tokens} "
            f"{self.seconds:.2f}s {rate:.1f} tokens/s"
        )


def transport_errors() -> tuple[type[Exception], ...]:
    """What a dropped connection raises while a stream is read: the SDK wraps errors only while it
    sends, and reads through httpx (openai 1.x/2.x) or httpx2 (3.x)."""
    errors: list[type[Exception]] = [httpx.TransportError]
    try:
        import httpx2
    except ImportError:
        pass
    else:
        errors.append(httpx2.TransportError)
    return tuple(errors)


def stream_chat(
    client: "openai.OpenAI", model: str, messages: list[dict], write: Callable[[str], None], **params
) -> Reply:
    """Stream one chat answer, handing each piece of text to `write` as it arrives.
    Ctrl-C closes the stream, which tells the daemon to stop generating."""
    import openai

    reply = Reply()
    started = time.monotonic()
    stream = None
    pieces = []
    try:
        stream = client.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **params
        )
        for chunk in stream:
            if chunk.usage:
                reply.usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                    write(choice.delta.content)
    except KeyboardInterrupt:
        reply.interrupted = True
    except (openai.APIConnectionError, *transport_errors()):
        raise DaemonUnreachable(str(client.base_url).removesuffix("/").removesuffix("/v1")) from None
    finally:
        if stream is not None:
            stream.close()
        reply.text = "".join(pieces)
        reply.seconds = time.monotonic() - started
    return reply
