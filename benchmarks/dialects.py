"""Does a dialect cost speed? The same streamed request through OpenAI's chat completions
and through Anthropic's Messages API, on one real `elmd serve` (the offline model at its
defaults), interleaved in one run: time to first token and decode tokens/s, the median of
each over `--rounds` pairs, and Messages' figure as a ratio of chat's (target: within 5%).

Each request opens with its own nonce, so no request's prompt is a cached prefix of
another's beyond the shared chat template; the order within a pair alternates.

    python benchmarks/dialects.py --rounds 8 --max-tokens 128
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import sys
import tempfile
from pathlib import Path

from common import OFFLINE_MODEL, StreamedReply, serve_offline_model

TOPICS = ["a lighthouse keeper", "a city under the sea", "the first snow of winter", "a clockmaker's apprentice",
          "a long train journey", "a garden on a rooftop", "a lost map", "an old violin"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args(argv)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as home:
        base, server = serve_offline_model(Path(home), Path(home) / "daemon.log")
        try:
            StreamedReply(base, OFFLINE_MODEL, "Hello.", 8)  # warm-up: first-request costs are no dialect's
            replies = {"chat": [], "messages": []}
            for i in range(args.rounds):
                order = ["chat", "messages"] if i % 2 == 0 else ["messages", "chat"]
                for dialect in order:
                    prompt = f"({rng.randrange(10**9)}) Write a long story about {TOPICS[i % len(TOPICS)]}."
                    replies[dialect].append(StreamedReply(base, OFFLINE_MODEL, prompt, args.max_tokens, dialect))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    rows = {d: (statistics.median(r.ttft_s for r in rs), statistics.median(r.decode_tok_s for r in rs),
                statistics.median(r.tokens for r in rs)) for d, rs in replies.items()}
    print(f"{'dialect':<10} {'TTFT ms':>8} {'decode tok/s':>13} {'tokens':>7}")
    for dialect, (ttft, rate, tokens) in rows.items():
        print(f"{dialect:<10} {ttft * 1e3:8.1f} {rate:13.1f} {tokens:7.0f}")
    (chat_ttft, chat_rate, _), (msg_ttft, msg_rate, _) = rows["chat"], rows["messages"]
    print(f"messages/chat: TTFT {msg_ttft / chat_ttft:.3f}x, decode {msg_rate / chat_rate:.3f}x "
          f"(medians of {args.rounds} interleaved pairs, same daemon, same run)")
    from matmul_speed import read_bandwidth_gbs  # torch, after the daemon is gone
    print(f"read bandwidth: {read_bandwidth_gbs():.1f} GB/s (the decode ceiling is this over the bytes read per token;"
          " benchmarks/bench.py prints it per model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
