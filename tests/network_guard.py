"""Run Python code with every attempt to reach a non-loopback address refused and
recorded, for the test that the daemon never touches the network:

    python tests/network_guard.py RECORD.jsonl -m elmd serve ...
    python tests/network_guard.py RECORD.jsonl -c "code"

An audit hook (PEP 578) sees each socket.connect / sendto / getaddrinfo before it
happens; one to anything but loopback (or a Unix socket) is written to RECORD as a JSON
line and fails with an OSError. At exit the process's offline settings are recorded too.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import runpy
import socket
import sys

WATCHED_ENVIRONMENT = ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK")
LOCAL_NAMES = {"localhost", "", None}


def _is_local(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def main() -> None:
    record = open(sys.argv[1], "a", buffering=1)

    def write(entry: dict) -> None:
        record.write(json.dumps(entry) + "\n")

    def hook(event: str, args: tuple) -> None:
        if event in ("socket.connect", "socket.sendto"):
            sock, address = args[0], args[-1]
            if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
                write({"event": event, "address": repr(address)})
                raise ConnectionRefusedError(f"network_guard: {event} to {address!r} refused")
        elif event == "socket.getaddrinfo" and not _is_local(args[0]):
            write({"event": event, "address": repr(args[0])})
            raise socket.gaierror(socket.EAI_NONAME, f"network_guard: lookup of {args[0]!r} refused")

    sys.addaudithook(hook)
    atexit.register(lambda: write({"event": "exit", "environment": {k: os.environ.get(k) for k in WATCHED_ENVIRONMENT}}))
    mode, target, rest = sys.argv[2], sys.argv[3], sys.argv[4:]
    if mode == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *rest]
        exec(compile(target, "<network_guard -c>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main()
