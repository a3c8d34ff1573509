"""Run `elmd serve` as a per-user background service: a launchd agent on macOS, a
`systemd --user` unit on Linux.

A model server that works from a shell often hangs or dies when a service manager starts
it: no `PATH`, no `HOME`, no TTY, a working directory of `/`, relative paths. So the
service is described completely here: the absolute interpreter, `-m elmd serve` and the
user's serve options (relative paths made absolute), an explicit environment, an absolute
working directory, stdin from /dev/null and output appended to a file in
`elmd.paths.log_dir()`.

Every operation is idempotent: `install` replaces a running agent with the new
definition, `uninstall` of an agent that is not there succeeds.

`ELMD_AGENT_PLATFORM=launchd|systemd` picks the service manager regardless of the OS, so
the macOS path is exercised on Linux in tests (with `HOME` pointing at a temporary folder).
"""

from __future__ import annotations

import os
import plistlib
import shlex
import site
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import elmd
from elmd import paths

PLATFORM_ENV = "ELMD_AGENT_PLATFORM"
# The launchd template ships inside the package (launchd/ in the source tree links to it).
TEMPLATE = Path(__file__).resolve().parent / "data" / "dev.elmd.daemon.plist"
LOG_FILE = "daemon.log"
SYSTEMD_UNIT = "elmd.service"
RESTART_SECONDS = 10  # launchd's ThrottleInterval and systemd's RestartSec
PATH_SETTING_SUFFIXES = ("_file", "_dir", "_path", "_home")
SYSTEM_PATH = ["/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]


class AgentError(RuntimeError):
    """The service manager refused or is unavailable; the message says what it answered."""


@dataclass(frozen=True)
class ServiceSpec:
    """Everything a service manager needs to start the daemon without a shell."""

    program: list[str]
    environment: dict[str, str]
    working_directory: Path
    log_path: Path


@dataclass(frozen=True)
class AgentState:
    """What `elmd agent status` reports."""

    manager: str
    definition: Path
    installed: bool
    running: bool
    pid: int | None
    detail: str


def service_spec(serve_args: list[str]) -> ServiceSpec:
    """The daemon's command, environment and paths, all absolute. `serve_args` are
    `elmd serve` options with their paths already absolute (see `absolute_paths`)."""
    python = os.path.abspath(sys.executable)
    environment = {
        "PATH": os.pathsep.join(dict.fromkeys([os.path.dirname(python), *SYSTEM_PATH])),
        "HOME": str(Path.home()),
        "PYTHONUNBUFFERED": "1",  # log lines reach the file as they happen
    }
    source_root = _source_root_outside_site_packages()
    if source_root:
        environment["PYTHONPATH"] = str(source_root)
    for name, value in sorted(os.environ.items()):
        if name.startswith("ELMD_") and name != PLATFORM_ENV:
            environment[name] = absolute_paths(name, value)
    return ServiceSpec(
        program=[python, "-m", "elmd", "serve", *serve_args],
        environment=environment,
        working_directory=paths.data_dir().absolute(),
        log_path=paths.log_dir().absolute() / LOG_FILE,
    )


def absolute_paths(name: str, value):
    """A setting's value as the service must see it. A relative path would mean something
    else from the service's working directory, so paths become absolute: always for a
    setting named like a path (..._file, ..._dir, ..._path, ..._home), and for any other
    value that names a file or folder that exists here."""
    if isinstance(value, list):
        return [absolute_paths(name, item) for item in value]
    if not isinstance(value, str) or not value or os.path.isabs(value):
        return value
    if name.lower().endswith(PATH_SETTING_SUFFIXES) or os.path.exists(value):
        return os.path.abspath(os.path.expanduser(value))
    return value


def _source_root_outside_site_packages() -> Path | None:
    """The folder holding the `elmd` package when it runs from a source checkout, which
    the service's interpreter would not find on its own."""
    root = Path(elmd.__file__).resolve().parent.parent
    site_dirs = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return None if root in site_dirs else root


def render_plist(spec: ServiceSpec) -> bytes:
    """The launchd agent: the template's policy plus this machine's command and paths."""
    agent = plistlib.loads(TEMPLATE.read_bytes())
    agent.update(
        ProgramArguments=spec.program,
        EnvironmentVariables=spec.environment,
        WorkingDirectory=str(spec.working_directory),
        StandardInPath="/dev/null",
        StandardOutPath=str(spec.log_path),
        StandardErrorPath=str(spec.log_path),
    )
    return plistlib.dumps(agent, sort_keys=False)


def render_systemd_unit(spec: ServiceSpec) -> str:
    """The `systemd --user` unit with the same command, environment and restart policy."""
    environment = "\n".join(f"Environment={_systemd_quote(f'{k}={v}')}" for k, v in spec.environment.items())
    command = " ".join(_systemd_quote(_systemd_escape_dollars(arg)) for arg in spec.program)
    log = _systemd_escape(str(spec.log_path))
    return f"""[Unit]
Description=elmd: OpenELM with an OpenAI-compatible API on localhost

[Service]
Type=exec
ExecStart={command}
{environment}
WorkingDirectory={_systemd_escape(str(spec.working_directory))}
StandardInput=null
StandardOutput=append:{log}
StandardError=append:{log}
Restart=on-failure
RestartSec={RESTART_SECONDS}

[Install]
WantedBy=default.target
"""


def _systemd_escape(text: str) -> str:
    """systemd expands `%` specifiers in unit values; keep them literal."""
    return text.replace("%", "%%")


def _systemd_escape_dollars(text: str) -> str:
    """ExecStart also expands `$VARIABLES`."""
    return text.replace("$", "$$")


def _systemd_quote(text: str) -> str:
    """One word for ExecStart= or Environment=, quoted as systemd reads it."""
    text = _systemd_escape(text)
    if text and not any(c in text for c in ' \t"\'\\;'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_private(path: Path, data: bytes) -> None:
    """Atomically, mode 0600: the definition may carry ELMD_API_KEY."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


def _prepare_folders(spec: ServiceSpec) -> None:
    """The working directory must exist or the manager cannot start the daemon; the log
    file is created here so that it is 0600 (prompts may end up in it when asked)."""
    spec.working_directory.mkdir(parents=True, exist_ok=True)
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))


def _run(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise AgentError(f"{command[0]} was not found on PATH") from None


def _check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        answer = (result.stderr or result.stdout).strip()
        raise AgentError(f"`{shlex.join(result.args)}` failed ({result.returncode}): {answer}")
    return result


class Launchd:
    """A per-user agent in ~/Library/LaunchAgents, in the `gui/<uid>` domain."""

    name = "launchd"

    def __init__(self) -> None:
        self.label = plistlib.loads(TEMPLATE.read_bytes())["Label"]
        self.definition = Path.home() / "Library" / "LaunchAgents" / f"{self.label}.plist"
        self.domain = f"gui/{os.getuid()}"
        self.target = f"{self.domain}/{self.label}"

    def install(self, spec: ServiceSpec) -> None:
        _prepare_folders(spec)
        _write_private(self.definition, render_plist(spec))
        if self._loaded():
            self._bootout()
        _check(_run(["launchctl", "enable", self.target]))
        _check(_run(["launchctl", "bootstrap", self.domain, str(self.definition)]))

    def uninstall(self) -> bool:
        """True when there was something to remove."""
        was_there = self.definition.exists() or self._loaded()
        if self._loaded():
            self._bootout()
        self.definition.unlink(missing_ok=True)
        return was_there

    def state(self) -> AgentState:
        printed = _run(["launchctl", "print", self.target])
        loaded = printed.returncode == 0
        pid = _field(printed.stdout, "pid = ") if loaded else None
        last_exit = _field(printed.stdout, "last exit code = ") if loaded else None
        detail = ("loaded" if loaded else "not loaded") + ("" if last_exit is None else f", last exit code {last_exit}")
        return AgentState(self.name, self.definition, self.definition.exists(), pid is not None, pid, detail)

    def _loaded(self) -> bool:
        return _run(["launchctl", "print", self.target]).returncode == 0

    def _bootout(self) -> None:
        """`bootout` returns before launchd has let go of the label; a `bootstrap` right
        after it fails, so wait until the label is gone."""
        _check(_run(["launchctl", "bootout", self.target]))
        deadline = time.monotonic() + 10
        while self._loaded():
            if time.monotonic() > deadline:
                raise AgentError(f"launchd still holds {self.target} after bootout")
            time.sleep(0.2)


class Systemd:
    """A `systemd --user` unit in $XDG_CONFIG_HOME/systemd/user."""

    name = "systemd"

    def __init__(self) -> None:
        config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        self.definition = config_home / "systemd" / "user" / SYSTEMD_UNIT

    def install(self, spec: ServiceSpec) -> None:
        _prepare_folders(spec)
        _write_private(self.definition, render_systemd_unit(spec).encode())
        _check(_run(["systemctl", "--user", "daemon-reload"]))
        _check(_run(["systemctl", "--user", "enable", SYSTEMD_UNIT]))
        # restart, not start: a reinstall must replace the running daemon with the new options
        _check(_run(["systemctl", "--user", "restart", SYSTEMD_UNIT]))

    def uninstall(self) -> bool:
        if not self.definition.exists():
            return False
        _check(_run(["systemctl", "--user", "disable", "--now", SYSTEMD_UNIT]))
        self.definition.unlink()
        _check(_run(["systemctl", "--user", "daemon-reload"]))
        return True

    def state(self) -> AgentState:
        active = _run(["systemctl", "--user", "is-active", SYSTEMD_UNIT]).stdout.strip()
        enabled = _run(["systemctl", "--user", "is-enabled", SYSTEMD_UNIT]).stdout.strip()
        pid_text = _run(["systemctl", "--user", "show", "--property=MainPID", "--value", SYSTEMD_UNIT]).stdout.strip()
        pid = int(pid_text) if pid_text.isdigit() and int(pid_text) > 0 else None
        detail = f"{active or 'unknown'}, {enabled or 'unknown'}"
        return AgentState(self.name, self.definition, self.definition.exists(), active == "active", pid, detail)


def _field(printed: str, prefix: str) -> int | None:
    for line in printed.splitlines():
        line = line.strip()
        if line.startswith(prefix) and line[len(prefix) :].lstrip("-").isdigit():
            return int(line[len(prefix) :])
    return None


def service_manager() -> Launchd | Systemd:
    """launchd on macOS, systemd elsewhere on Linux; ELMD_AGENT_PLATFORM overrides."""
    chosen = os.environ.get(PLATFORM_ENV) or ("launchd" if sys.platform == "darwin" else "systemd")
    if chosen == "launchd":
        return Launchd()
    if chosen == "systemd":
        return Systemd()
    raise AgentError(f"{PLATFORM_ENV} must be 'launchd' or 'systemd', not {chosen!r}")
