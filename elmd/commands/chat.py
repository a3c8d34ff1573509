"""`elmd chat [MODEL]`: an interactive chat in the terminal. Tokens appear as the daemon
streams them; the whole conversation goes back with every turn; /exit or Ctrl-D leaves,
Ctrl-C stops an answer part-way."""

from __future__ import annotations

import argparse
import sys

from elmd import client

HELP = """\
/exit, /bye   leave (Ctrl-D too)
/clear        forget the conversation so far
/help         this list
Ctrl-C stops an answer part-way."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Chat with a model served by the running daemon. The answer streams in as it is "
        "generated and the conversation is kept across turns. /exit or Ctrl-D leaves.",
    )
    parser.add_argument("model", nargs="?", help="a model the daemon serves (default: a loaded one)")
    add_generation_options(parser)
    parser.set_defaults(func=chat)


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """Options `chat` and `run` share; unset ones leave the model's defaults in charge."""
    parser.add_argument("--system", help="a system message to start the conversation with")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: the model's)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    parser.add_argument("--max-tokens", type=int, help="the most tokens in one answer")
    parser.add_argument("--seed", type=int, help="seed for reproducible sampling")
    parser.add_argument("--url", help="the daemon's address (default: from ELMD_HOST / ELMD_PORT / config)")
    parser.add_argument("--verbose", action="store_true", help="print token counts and speed after each answer")


def params(args: argparse.Namespace) -> dict:
    chosen = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens, "seed": args.seed}
    return {name: value for name, value in chosen.items() if value is not None}


# Control characters a model may emit (ESC starts terminal commands) are shown, not obeyed.
_CONTROL = {c: "\N{REPLACEMENT CHARACTER}" for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if chr(c) not in "\t\n"}


def write(text: str) -> None:
    """Print a piece of an answer now; on a terminal, without its control characters."""
    sys.stdout.write(text.translate(_CONTROL) if sys.stdout.isatty() else text)
    sys.stdout.flush()


def describe(error) -> str:
    """The daemon's own message from OpenAI's error object, not the SDK's wrapper text."""
    body = error.body if isinstance(error.body, dict) else {}
    return str(body.get("message") or error.message)


def chat(args: argparse.Namespace) -> int:
    import openai  # here, not at the top: every `elmd` command would pay for importing the SDK

    url = client.base_url(args.url)
    try:
        sdk = client.openai_client(url)
        model = args.model or _first_model(sdk, url)
    except client.ClientError as error:
        print(f"elmd chat: {error}", file=sys.stderr)
        return 1
    except (openai.APIError, LookupError) as error:
        print(f"elmd chat: {describe(error) if isinstance(error, openai.APIError) else error}", file=sys.stderr)
        return 1

    _enable_line_editing()
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(f"Chatting with {model} at {url}. /exit or Ctrl-D to leave, /help for more.")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to leave)")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/bye"):
            return 0
        if text == "/clear":
            messages = list(start)
            print("(conversation cleared)")
            continue
        if text in ("/help", "/?"):
            print(HELP)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; /help lists them")
            continue

        messages.append({"role": "user", "content": line})
        try:
            if notice := client.loading_notice(url, model):
                print(f"({notice})")
            reply = client.stream_chat(sdk, model, messages, write, **params(args))
        except client.ClientError as error:
            print(f"\nelmd chat: {error}", file=sys.stderr)
            return 1
        except openai.APIError as error:
            messages.pop()
            print(f"\nerror: {describe(error)}")
            continue
        messages.append({"role": "assistant", "content": reply.text})
        print(" [stopped]" if reply.interrupted else "")
        if args.verbose:
            print(f"[{reply.stats()}]")


def _first_model(sdk, url: str) -> str:
    import openai

    try:
        models = sdk.models.list().data
    except openai.APIConnectionError:
        raise client.DaemonUnreachable(url) from None
    if not models:
        raise LookupError("the daemon serves no models; install one with `elmd pull`")
    loaded = [m.id for m in models if getattr(m, "loaded", False)]  # elmd's addition to the model card
    return (loaded or [m.id for m in models])[0]


def _enable_line_editing() -> None:
    """Arrow keys and history at the prompt, where the platform has readline."""
    try:
        import readline  # noqa: F401  (importing it is what turns it on for input())
    except ImportError:
        pass
