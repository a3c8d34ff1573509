"""`elmd agent install|uninstall|status|logs`: run the daemon in the background, started at
login and restarted after a crash (launchd on macOS, systemd --user on Linux)."""

from __future__ import annotations

import argparse
import collections
import importlib
import shlex
import sys
import time

from elmd import agent, paths


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="run the daemon in the background, started at login (launchd / systemd --user)",
        description="Install elmd as a per-user background service: a launchd agent on macOS, a "
        "systemd --user unit on Linux. It starts at login and restarts after a crash.",
    )
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    actions = parser.add_subparsers(dest="agent_action", metavar="ACTION")

    serve_parser = _serve_parser()
    install = actions.add_parser(
        "install",
        parents=[serve_parser],
        conflict_handler="resolve",
        help="install (or replace) the agent and start it now",
        description="Install the agent with these `elmd serve` options and start it. Installing "
        "again replaces the running agent with the new options.",
    )
    install.set_defaults(func=lambda args: _install(args, serve_parser))

    uninstall = actions.add_parser(
        "uninstall", help="stop the agent and remove it", description="Stop the agent and remove it."
    )
    uninstall.set_defaults(func=_uninstall)

    status = actions.add_parser(
        "status",
        help="whether the agent is installed and running",
        description="Say whether the agent is installed and whether the service manager runs it.",
    )
    status.set_defaults(func=_status)

    logs = actions.add_parser("logs", help="show the daemon's log", description="Show the daemon's log.")
    logs.add_argument("-n", "--lines", type=int, default=50, help="how many of the last lines (default 50)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    logs.set_defaults(func=_logs)


def _serve_parser() -> argparse.ArgumentParser:
    """`elmd serve`'s own parser, so `install` takes exactly its options."""
    probe = argparse.ArgumentParser(add_help=False).add_subparsers()
    importlib.import_module("elmd.commands.serve").register(probe)
    return probe.choices["serve"]


def serve_argv(serve_parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The `elmd serve` options the user gave `install`, as command-line words again, with
    paths made absolute. Checked by parsing them back: the agent must run with exactly
    these settings."""
    options = [a for a in serve_parser._actions if a.option_strings and a.dest != "help"]
    chosen = {
        a.dest: agent.absolute_paths(a.dest, getattr(args, a.dest))
        for a in options
        if getattr(args, a.dest, a.default) != a.default
    }
    words: list[str] = []
    for action in options:
        if action.dest not in chosen:
            continue
        value, flag = chosen[action.dest], max(action.option_strings, key=len)
        if action.nargs == 0:
            words.append(flag)
        elif isinstance(value, list) and action.nargs is None:  # an option given repeatedly
            for item in value:
                words += [flag, str(item)]
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    parsed = serve_parser.parse_args(words)
    mismatched = [a.dest for a in options if getattr(parsed, a.dest) != chosen.get(a.dest, a.default)]
    if mismatched:
        raise agent.AgentError(f"cannot pass these serve options to the agent: {', '.join(mismatched)}")
    return words


def _install(args: argparse.Namespace, serve_parser: argparse.ArgumentParser) -> int:
    try:
        spec = agent.service_spec(serve_argv(serve_parser, args))
        manager = agent.service_manager()
        manager.install(spec)
    except agent.AgentError as error:
        print(f"elmd agent install: {error}", file=sys.stderr)
        return 1
    print(f"installed {manager.definition} ({manager.name})")
    print(f"runs: {shlex.join(spec.program)}")
    print(f"log: {spec.log_path}")
    print("check it with `elmd status`; `elmd agent logs` shows what it says")
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    try:
        manager = agent.service_manager()
        removed = manager.uninstall()
    except agent.AgentError as error:
        print(f"elmd agent uninstall: {error}", file=sys.stderr)
        return 1
    print(f"removed {manager.definition}" if removed else "the agent is not installed")
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        state = agent.service_manager().state()
    except agent.AgentError as error:
        print(f"elmd agent status: {error}", file=sys.stderr)
        return 1
    print(f"agent: {state.definition} ({state.manager})")
    print(f"installed: {'yes' if state.installed else 'no'}")
    running = f"yes (pid {state.pid})" if state.pid else ("yes" if state.running else "no")
    print(f"running: {running}" + (f"; {state.detail}" if state.detail else ""))
    print(f"log: {paths.log_dir() / agent.LOG_FILE}")
    return 0 if state.installed and state.running else 3


def _logs(args: argparse.Namespace) -> int:
    log_path = paths.log_dir() / agent.LOG_FILE
    if not log_path.exists():
        print(f"no log yet at {log_path}", file=sys.stderr)
        return 1
    with open(log_path, encoding="utf-8", errors="replace") as log:
        sys.stdout.writelines(collections.deque(log, maxlen=max(args.lines, 0)))
        sys.stdout.flush()
        if args.follow:
            try:
                while True:
                    line = log.readline()
                    if line:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                    else:
                        time.sleep(0.25)
            except KeyboardInterrupt:
                pass
    return 0
