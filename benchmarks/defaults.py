"""Do everyday prompts end soon at the offline model's default settings? A real `elmd serve`
on its own store answers the README's curl example first (a fresh daemon's first answer),
then 20 everyday prompts, one at a time, each a streamed chat request that sets nothing
but the prompt (no max_tokens, temperature or penalty: what models.yaml gives is what
runs). Prints each reply's finish reason, tokens and seconds, and the summary: how many
ended with `stop`, the longest reply's seconds and tokens.

`--sampling` replaces the model's models.yaml `sampling` through the store's own
models.yaml, to measure a candidate default before writing it down. Sampling at the
offline model's temperature 0.2 is random: compare runs over all 20 prompts, not one reply.

    python benchmarks/defaults.py
    python benchmarks/defaults.py --sampling '{"temperature": 0.2, "top_p": 0.9, "max_tokens": 512}'
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import httpx
import yaml

from common import OFFLINE_MODEL, serve_offline_model

from elmd.registry import Registry

README_CURL_PROMPT = "Name three colors."
PROMPTS = [
    "Name three colors.",
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "What is 2 + 2?",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
    "How many days are in a week?",
    "Tell me a short joke.",
    "What is the boiling point of water?",
    "Translate 'good morning' into Spanish.",
    "Suggest a name for a pet cat.",
    "What does a bee make?",
    "List three fruits.",
    "How do I make a cup of tea?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "Write one sentence about the ocean.",
    "What is the opposite of cold?",
    "Give me a tip for sleeping better.",
    "What are the primary colors?",
]


class Reply:
    """One streamed reply: its finish reason (`unfinished` when the time limit cut it),
    completion tokens (the usage chunk, or content chunks received when cut) and seconds."""

    def __init__(self, base: str, prompt: str, limit_s: float):
        body = {"model": OFFLINE_MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True,
                "stream_options": {"include_usage": True}}
        self.prompt, self.finish, self.tokens, parts = prompt, "unfinished", 0, []
        start = time.perf_counter()
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=limit_s + 60) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if time.perf_counter() - start > limit_s:
                    break  # leaving the stream cancels the generation
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                for choice in event.get("choices") or []:
                    if choice["delta"].get("content"):
                        parts.append(choice["delta"]["content"])
                    self.finish = choice.get("finish_reason") or self.finish
                if event.get("usage"):
                    self.tokens = event["usage"]["completion_tokens"]
        self.seconds = time.perf_counter() - start
        self.tokens = self.tokens or len(parts)
        self.text = "".join(parts)


def write_sampling(home: Path, sampling: dict | None) -> None:
    """The store's models.yaml: the shipped offline entry with `sampling` replaced, or none."""
    user_file = home / "config" / "models.yaml"
    user_file.unlink(missing_ok=True)
    if sampling is not None:
        entry = Registry.load(user_file).get(OFFLINE_MODEL).model_dump(mode="json", exclude_defaults=True)
        user_file.parent.mkdir(parents=True, exist_ok=True)
        user_file.write_text(yaml.safe_dump({"models": [{**entry, "sampling": sampling}]}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/elmd-bench-defaults"),
                   help="the daemon's ELMD_HOME is WORK/home (the converted model is kept there between runs)")
    p.add_argument("--sampling", type=json.loads, help="the offline model's `sampling` to measure, as JSON")
    p.add_argument("--limit", type=float, default=600, help="seconds a reply may run before it is cut and counted unfinished")
    args = p.parse_args(argv)

    home = args.work / "home"
    home.mkdir(parents=True, exist_ok=True)
    write_sampling(home, args.sampling)
    base, server = serve_offline_model(home, args.work / "daemon.log")
    try:
        first = Reply(base, README_CURL_PROMPT, args.limit)
        print(f"README curl example, first answer: {first.finish}, {first.tokens} tokens, {first.seconds:.1f} s")
        replies = []
        for prompt in PROMPTS:
            replies.append(Reply(base, prompt, args.limit))
            r = replies[-1]
            print(f"{r.finish:>10} {r.tokens:5d} tok {r.seconds:6.1f} s  {prompt!r}: {r.text[:60]!r}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    longest = max(replies, key=lambda r: r.seconds)
    stops = sum(r.finish == "stop" for r in replies)
    print(f"sampling: {args.sampling if args.sampling is not None else 'models.yaml'}")
    print(f"{stops} of {len(replies)} ended with stop; longest reply {longest.seconds:.1f} s, {longest.tokens} tokens "
          f"({longest.prompt!r}); README curl example {first.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
