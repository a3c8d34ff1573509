"""Stand-ins for the OS service managers (`launchctl`, `systemctl`), the one system boundary
the agent tests replace. Each records its arguments and keeps the state a real manager
would keep (what is loaded, enabled, running), answering the way the real one does, so
a missing `bootout` before `bootstrap` or a missing `daemon-reload` fails like it would on
a real machine.

The scripts read FAKE_SERVICE_LOG (JSON lines of argv), FAKE_SERVICE_STATE (a JSON file)
and FAKE_SERVICE_FAIL (a verb to refuse, as a broken manager would)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

_COMMON = """\
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_SERVICE_LOG"], "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0]), *args]) + "\\n")
state_path = Path(os.environ["FAKE_SERVICE_STATE"])
state = json.loads(state_path.read_text()) if state_path.exists() else {}


def save():
    state_path.write_text(json.dumps(state))


def refuse(message, code):
    print(message, file=sys.stderr)
    sys.exit(code)


if args and os.environ.get("FAKE_SERVICE_FAIL") in args:
    refuse(f"{os.environ['FAKE_SERVICE_FAIL']} failed: 5: Input/output error", 5)
"""

_LAUNCHCTL = """
import plistlib

domain = f"gui/{os.getuid()}"
loaded = state.setdefault("loaded", {})
verb = args[0]
if verb == "print":
    if args[1] not in loaded:
        refuse(f'Could not find service "{args[1].rsplit("/", 1)[-1]}" in domain for user gui: {os.getuid()}', 113)
    print(f"{args[1]} = {{\\n\\tstate = running\\n\\tpid = 4242\\n\\tlast exit code = (never exited)\\n}}")
elif verb == "enable":
    if not args[1].startswith(domain + "/"):
        refuse(f"Bad request. Could not parse service target: {args[1]}", 1)
elif verb == "bootstrap":
    if args[1] != domain:
        refuse(f"Bootstrap failed: 125: Domain does not support specified action ({args[1]})", 125)
    with open(args[2], "rb") as file:
        agent = plistlib.load(file)
    target = f"{domain}/{agent['Label']}"
    if target in loaded:
        refuse("Bootstrap failed: 5: Input/output error", 5)
    loaded[target] = agent["ProgramArguments"]
    save()
elif verb == "bootout":
    if args[1] not in loaded:
        refuse("Boot-out failed: 3: No such process", 3)
    del loaded[args[1]]
    save()
else:
    refuse(f"Unrecognized subcommand: {verb}", 64)
"""

_SYSTEMCTL = """
if args[:1] != ["--user"]:
    refuse("this stand-in manages only the --user instance", 1)
args = args[1:]
unit_dir = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user"
loaded = state.setdefault("loaded", {})
enabled = state.setdefault("enabled", [])
active = state.setdefault("active", [])
verb, unit = args[0], args[-1]
if verb == "daemon-reload":
    state["loaded"] = {f.name: f.read_text() for f in unit_dir.glob("*.service")}
elif verb == "enable":
    if unit not in loaded:
        refuse(f"Failed to enable unit: Unit file {unit} does not exist.", 1)
    enabled.append(unit)
elif verb == "restart":
    if unit not in loaded:
        refuse(f"Failed to restart {unit}: Unit {unit} not found.", 5)
    if (unit_dir / unit).read_text() != loaded[unit]:
        refuse(f"The unit file of {unit} changed on disk. Run 'systemctl --user daemon-reload'.", 1)
    active.append(unit)
elif verb == "disable" and "--now" in args:
    if unit not in loaded:
        refuse(f"Failed to disable unit: Unit file {unit} does not exist.", 1)
    state["enabled"] = [u for u in enabled if u != unit]
    state["active"] = [u for u in active if u != unit]
elif verb == "is-active":
    print("active" if unit in active else "inactive")
    sys.exit(0 if unit in active else 3)
elif verb == "is-enabled":
    print("enabled" if unit in enabled else "disabled")
    sys.exit(0 if unit in enabled else 1)
elif verb == "show" and "--property=MainPID" in args and "--value" in args:
    print(4343 if unit in active else 0)
else:
    refuse(f"Unknown command verb {verb}.", 1)
save()
"""


def install_fakes(bin_dir: Path) -> None:
    """Write executable `launchctl` and `systemctl` stand-ins into bin_dir."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (("launchctl", _LAUNCHCTL), ("systemctl", _SYSTEMCTL)):
        script = bin_dir / name
        script.write_text(f"#!{sys.executable}\n{_COMMON}{body}")
        script.chmod(0o755)


def recorded_calls(log_path: Path) -> list[list[str]]:
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines()]
