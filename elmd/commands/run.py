"""`elmd run MODEL "prompt"`: one answer from the daemon, streamed to stdout as it is
generated; the prompt may also come on stdin (`echo hi | elmd run MODEL`)."""

from __future__ import annotations

import argparse
import sys

from elmd import client
from elmd.commands import chat


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="answer one prompt, streamed to stdout",
        description="Ask the running daemon one question and stream the answer to stdout. Without a "
        "prompt argument the prompt is read from stdin.",
    )
    parser.add_argument("model", help="a model the daemon serves (see `elmd list` or `elmd status`)")
    parser.add_argument("prompt", nargs="*", help="the prompt (default: read stdin)")
    chat.add_generation_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import openai  # here, not at the top: every `elmd` command would pay for importing the SDK

    prompt = " ".join(args.prompt) if args.prompt else ("" if sys.stdin.isatty() else sys.stdin.read())
    if not prompt.strip():
        print('elmd run: give a prompt: elmd run MODEL "prompt" (or pipe one on stdin)', file=sys.stderr)
        return 2
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    url = client.base_url(args.url)
    try:
        if notice := client.loading_notice(url, args.model):
            print(notice, file=sys.stderr)
        reply = client.stream_chat(client.openai_client(url), args.model, messages, chat.write, **chat.params(args))
    except client.ClientError as error:
        print(f"elmd run: {error}", file=sys.stderr)
        return 1
    except openai.APIError as error:
        print(f"elmd run: {chat.describe(error)}", file=sys.stderr)
        return 1
    if not reply.text.endswith("\n"):
        sys.stdout.write("\n")
    if args.verbose:
        print(reply.stats(), file=sys.stderr)
    return 130 if reply.interrupted else 0
