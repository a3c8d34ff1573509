"""Graceful shutdown (issue 6): SIGTERM, as launchd and systemd stop a service, makes
`elmd serve` stop accepting connections at once, lets a short in-flight request finish,
cuts a long one off, and exit with status 0 within a bounded time."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from elmd.commands.serve import SHUTDOWN_GRACE_SECONDS
from live_daemon import running_daemon

SHORT_SECONDS = 3  # the short request's length: in flight at SIGTERM, done within the grace period
LONG_TOKENS = 2000  # far longer than the grace period: cancelled


def chat(daemon, max_tokens: int, **extra) -> dict:
    return {"model": daemon.model, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": max_tokens, "ignore_eos": True, "seed": 5, **extra}


def tokens_in(daemon, seconds: float) -> int:
    """How many tokens this daemon generates in about `seconds` (measured, since the
    tiny model's speed differs tenfold between machines and loads)."""
    start = time.monotonic()
    reply = httpx.post(f"{daemon.url}/v1/chat/completions", json=chat(daemon, 200), timeout=60)
    assert reply.status_code == 200
    return max(50, min(1500, int(200 / (time.monotonic() - start) * seconds)))


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_checkpoint, tmp_path):
    outcome: dict[str, object] = {}
    with running_daemon(tiny_checkpoint, tmp_path) as daemon:
        short_tokens = tokens_in(daemon, SHORT_SECONDS)
        streaming = threading.Event()

        def long_stream() -> None:
            received = []
            try:
                with httpx.stream("POST", f"{daemon.url}/v1/chat/completions", timeout=60,
                                  json=chat(daemon, LONG_TOKENS, stream=True)) as response:
                    for line in response.iter_lines():
                        received.append(line)
                        streaming.set()
            except httpx.TransportError as exc:  # cut off: also an acceptable end
                received.append(f"transport error: {type(exc).__name__}")
            outcome["stream"] = received
            outcome["stream_ended"] = time.monotonic()

        def short_request() -> None:
            try:
                outcome["short"] = httpx.post(f"{daemon.url}/v1/chat/completions", json=chat(daemon, short_tokens),
                                              timeout=60)
            except httpx.TransportError as exc:
                outcome["short"] = exc
            outcome["short_ended"] = time.monotonic()

        threads = [threading.Thread(target=long_stream), threading.Thread(target=short_request)]
        threads[0].start()
        assert streaming.wait(60), "the long stream never started"
        threads[1].start()
        time.sleep(0.5)  # the short request is generating
        signalled = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:
            httpx.get(f"{daemon.url}/health", timeout=5)
            accepted_after_sigterm = True
        except httpx.ConnectError:
            accepted_after_sigterm = False
        exit_code = daemon.process.wait(timeout=SHUTDOWN_GRACE_SECONDS + 30)
        exited = time.monotonic()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a client was left hanging after the daemon exited"

    assert not accepted_after_sigterm, "a new connection was accepted after SIGTERM"
    assert exit_code == 0
    assert exited - signalled < SHUTDOWN_GRACE_SECONDS + 10
    # the short request was in flight at SIGTERM and was allowed to finish
    assert outcome["short_ended"] > signalled
    short = outcome["short"]
    assert isinstance(short, httpx.Response) and short.status_code == 200, short
    assert short.json()["usage"]["completion_tokens"] == short_tokens
    # the long stream was cut off instead of holding the daemon up
    content_events = [line for line in outcome["stream"] if line.startswith("data: {")]
    assert 0 < len(content_events) < LONG_TOKENS
