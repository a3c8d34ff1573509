"""Graceful shutdown (issue 6): SIGTERM, as launchd and systemd stop a service, makes
`elmd serve` stop accepting connections at once, lets a short in-flight request finish,
cuts a long one off, and exit with status 0 within a bounded time.

The test waits on events (the first streamed chunk of each request), not on sleeps: the short
request is sized by the speed measured beside the long stream, so it needs about a second of
the ten-second grace period however busy the machine is."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from elmd.settings import SHUTDOWN_GRACE_SECONDS
from live_daemon import running_daemon, wait_for_cpu_kernels

SHORT_SECONDS = 1.0  # the short request's length: in flight at SIGTERM, done well within the grace period
LONG_TOKENS = 2000  # far longer than the grace period: cancelled


def chat(daemon, max_tokens: int, **extra) -> dict:
    return {"model": daemon.model, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": max_tokens, "ignore_eos": True, "seed": 5, **extra}


class Stream(threading.Thread):
    """A streamed chat request read on its own thread; `started` is set at its first chunk."""

    def __init__(self, daemon, max_tokens: int):
        super().__init__(daemon=True)
        self.body = chat(daemon, max_tokens, stream=True, stream_options={"include_usage": True})
        self.url = f"{daemon.url}/v1/chat/completions"
        self.started, self.ended = threading.Event(), threading.Event()
        self.lines: list[str] = []
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=60) as response:
                for line in response.iter_lines():
                    self.lines.append(line)
                    self.started.set()
        except httpx.TransportError as exc:  # cut off: also an acceptable end for the long one
            self.lines.append(f"transport error: {type(exc).__name__}")
        self.ended_at = time.monotonic()
        self.started.set()
        self.ended.set()

    def events(self) -> list[dict]:
        return [json.loads(line[6:]) for line in self.lines if line.startswith("data: {")]


def tokens_per_second_beside(daemon) -> float:
    """The daemon's speed for a second request while another one streams (as in the test)."""
    start = time.monotonic()
    reply = httpx.post(f"{daemon.url}/v1/chat/completions", json=chat(daemon, 100), timeout=60)
    assert reply.status_code == 200
    return 100 / (time.monotonic() - start)


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_checkpoint, tmp_path):
    with running_daemon(tiny_checkpoint, tmp_path) as daemon:
        wait_for_cpu_kernels(daemon)  # a kernel build beside the test takes both cores: too slow to size the short request
        long = Stream(daemon, LONG_TOKENS)
        long.start()
        assert long.started.wait(60), "the long stream never started"
        short_tokens = max(4, int(tokens_per_second_beside(daemon) * SHORT_SECONDS))
        for _ in range(4):  # a machine so fast that the short request ends before SIGTERM: make it longer
            short = Stream(daemon, short_tokens)
            short.start()
            assert short.started.wait(60), "the short request never started"
            if not short.ended.is_set():
                break
            short_tokens *= 4
        signalled = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        try:  # a new connection once SIGTERM has been handled is refused
            for _ in range(50):
                try:
                    httpx.get(f"{daemon.url}/health", timeout=5)
                except httpx.RemoteProtocolError:  # accepted as the listener closed, then dropped unanswered
                    pass
                time.sleep(0.1)
            accepted_after_sigterm = True
        except httpx.ConnectError:
            accepted_after_sigterm = False
        exit_code = daemon.process.wait(timeout=SHUTDOWN_GRACE_SECONDS + 30)
        exited = time.monotonic()
        for stream in (long, short):
            assert stream.ended.wait(30), "a client was left hanging after the daemon exited"

    assert not accepted_after_sigterm, "new connections were still accepted 5 s after SIGTERM"
    assert exit_code == 0
    assert exited - signalled < SHUTDOWN_GRACE_SECONDS + 10
    # the short request was in flight at SIGTERM and was allowed to finish, every token of it
    assert short.ended_at > signalled
    assert short.lines[-2] == "data: [DONE]", (short_tokens, len(short.events()), short.ended_at - signalled, exited - signalled, short.lines[-3:])
    assert short.events()[-1]["usage"]["completion_tokens"] == short_tokens
    # the long stream was cut off instead of holding the daemon up
    content = [event for event in long.events() if event["choices"] and event["choices"][0]["delta"].get("content")]
    assert 0 < len(content) < LONG_TOKENS
