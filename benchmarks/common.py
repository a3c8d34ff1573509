"""What the benchmarks share: the token-rate measurement (so elmd and llama.cpp run the same
one), measuring children, the CPU time other processes took meanwhile, and a daemon's port
and readiness. Importing it puts the repository and this folder on sys.path."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    """Random ordinary tokens (no BOS/EOS), different per seed so no prefix cache helps."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


FIXTURE_SHAPES = ("270M", "450M", "1.1B", "3B")
OFFLINE_MODEL = "smollm2-135m-instruct"


def model_dirs(names: list[str], work: Path) -> dict[str, Path]:
    """Fixtures by shape (written once into the work dir, bf16 like the hub), the offline
    model (pulled into the work dir's own store), or any local model directory."""
    out = {}
    for name in names:
        if name in FIXTURE_SHAPES:
            path = work / "fixtures" / name
            if not (path / "config.json").exists():
                from elmd.fixtures import write_checkpoint

                write_checkpoint(path, shape=name, dtype="bfloat16")
            out[f"{name} fixture"] = path
        elif name == "offline":
            home = work / "home"
            env = {**os.environ, "PYTHONPATH": str(REPO), "ELMD_HOME": str(home)}
            os.environ["ELMD_HOME"] = str(home)  # the bench's own store, pulled into once
            from elmd.store import Store

            out[OFFLINE_MODEL] = Store().path(OFFLINE_MODEL)
            if not (out[OFFLINE_MODEL] / "config.json").exists():
                subprocess.run([sys.executable, "-m", "elmd", "pull", OFFLINE_MODEL, "--quiet"], env=env, check=True)
        else:
            out[Path(name).name] = Path(name)
    return out


def peak_rss_bytes() -> int:
    """This process's high-water resident size (VmHWM). Not ru_maxrss: Linux carries that
    across exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def token_rates(generate, vocab: int, args) -> dict[str, float]:
    """The suite's definitions, for any engine whose generate(ids, max_tokens) returns the
    time stamp of each generated token: after a 16-token warm-up, median over args.repeats of
    prompt tok/s (prompt tokens over the time to the first token) and of decode tok/s at
    batch 1 (tokens after the first over their span, after a 64-token prompt). With
    args.long_context N, also both after an N-token prompt: where attention over the
    context, not the weights, sets the pace."""
    generate(prompt_ids(16, vocab, 0), 8)  # warm-up: first-call allocation and compilation
    rates: dict[str, list[float]] = {"prompt_tok_s": [], "decode_tok_s": [], "long_prompt_tok_s": [], "long_decode_tok_s": []}
    for i in range(args.repeats):
        t = time.perf_counter()
        stamps = generate(prompt_ids(args.prompt_tokens, vocab, 100 + i), 1)
        rates["prompt_tok_s"].append(args.prompt_tokens / (stamps[0] - t))
        stamps = generate(prompt_ids(64, vocab, 200 + i), args.decode_tokens)
        rates["decode_tok_s"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        if args.long_context:
            t = time.perf_counter()
            stamps = generate(prompt_ids(args.long_context, vocab, 300 + i), args.decode_tokens)
            rates["long_prompt_tok_s"].append(args.long_context / (stamps[0] - t))
            rates["long_decode_tok_s"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {name: statistics.median(values) for name, values in rates.items() if values}


def child_result(cmd: list[str], crashed: str = "", env: dict[str, str] | None = None) -> dict:
    """Run a measuring child; its last stdout line is its JSON result, else an error row
    (`crashed` adds a hint when a signal killed it). `env` adds to the environment."""
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    if done.returncode < 0:
        return {"error": f"child killed by {signal.Signals(-done.returncode).name}{crashed}"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_rate_options(p: argparse.ArgumentParser) -> None:
    """The measurement's options, shared with llamacpp.py so that both engines run the same one."""
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--long-context", type=int, default=0, metavar="N",
                   help="also prompt and decode tok/s after an N-token prompt (e.g. 1900; N + decode tokens within the context)")


def rate_options(args) -> list[str]:
    """add_rate_options' values, as a measuring child's command line."""
    return ["--threads", str(args.threads), "--repeats", str(args.repeats), "--prompt-tokens", str(args.prompt_tokens),
            "--decode-tokens", str(args.decode_tokens), "--long-context", str(args.long_context)]


class OthersCpu:
    """Share of the machine's CPU time that went to other processes (or the hypervisor's
    steal) while a measurement ran: on 2 shared cores, anything much above zero makes a
    row unreliable (llama.cpp's spinning threads collapse first)."""

    def __enter__(self):
        self.start = self._sample()
        return self

    def __exit__(self, *exc):
        (busy0, own0, t0), (busy1, own1, t1) = self.start, self._sample()
        self.seconds = t1 - t0
        self.pct = 100 * max(0.0, (busy1 - busy0) - (own1 - own0)) / ((t1 - t0) * (os.cpu_count() or 1))

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        hz = os.sysconf("SC_CLK_TCK")
        own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        return (user + nice + system + irq + softirq + steal) / hz, own, time.perf_counter()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, server: subprocess.Popen, timeout: float = 300) -> float | None:
    """Seconds until GET /health answers 200 (polled every 20 ms), or None if the daemon
    exits or the timeout passes first."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout and server.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    return None


def serve_offline_model(home: Path, log: Path, repo: Path = REPO, serve_args: tuple[str, ...] = (),
                        **env_vars: str) -> tuple[str, subprocess.Popen]:
    """`elmd serve` at its defaults (the offline model) on a free port, once it is ready
    and its native CPU kernels are built: figures on the path it serves from then on.
    `repo`: the checkout whose code serves (another commit's, to compare against);
    `serve_args`: flags for `elmd serve` (a user's, such as --quant); `env_vars` are set in
    its environment."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELMD_")}
    env.update(ELMD_HOME=str(home), ELMD_PORT=str(port), PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", **env_vars)
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "elmd", "serve", *serve_args], env=env, stdin=subprocess.DEVNULL, cwd=repo,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    if wait_ready(base, server, timeout=1800) is None:
        server.kill()
        sys.exit(f"the daemon did not become ready; its log: {log}")
    while httpx.get(f"{base}/health", timeout=10).json().get("cpu_kernels_building"):
        time.sleep(1)
    return base, server


class StreamedReply:
    """One streamed reply as a client sees it: when it was asked, when its first and last
    text arrived, its completion tokens (from the stream's usage) and its text. `dialect`:
    OpenAI's chat completions or Anthropic's Messages API, the same request in each."""

    def __init__(self, base: str, model: str, prompt: str, max_tokens: int, dialect: str = "chat"):
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": max_tokens, "stream": True}
        if dialect == "chat":
            path, body["stream_options"] = "/v1/chat/completions", {"include_usage": True}
        else:
            path = "/v1/messages"
        self.start, self.first, self.last, self.tokens, parts = time.perf_counter(), None, None, 0, []
        with httpx.stream("POST", base + path, json=body, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                text, tokens = _streamed_text_and_tokens(json.loads(line[6:]))
                if text:
                    self.last = time.perf_counter()
                    self.first = self.first or self.last
                    parts.append(text)
                self.tokens = tokens or self.tokens
        self.text = "".join(parts)

    @property
    def ttft_s(self) -> float:
        return (self.first or self.start) - self.start

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first over their span (0 for a reply of one token)."""
        span = (self.last - self.first) if self.first and self.last else 0.0
        return (self.tokens - 1) / span if span > 0 and self.tokens > 1 else 0.0


def _streamed_text_and_tokens(event: dict) -> tuple[str, int]:
    """The text and the completion-token count (0 where absent) one SSE event carries, in
    chat's chunks or the Messages API's typed events."""
    if "choices" in event:
        text = event["choices"][0]["delta"].get("content") if event["choices"] else None
        return text or "", (event.get("usage") or {}).get("completion_tokens", 0)
    if event.get("type") == "content_block_delta" and event["delta"].get("type") == "text_delta":
        return event["delta"]["text"], 0
    if event.get("type") == "message_delta":
        return "", event["usage"]["output_tokens"]
    return "", 0
