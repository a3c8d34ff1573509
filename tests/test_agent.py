"""`elmd agent` as a user runs it: real CLI subprocesses, with HOME in a temporary folder and
stand-in `launchctl` / `systemctl` first on PATH (the only mock: the OS service manager).
ELMD_AGENT_PLATFORM selects launchd on Linux, so the macOS path runs here too."""

from __future__ import annotations

import configparser
import os
import plistlib
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from live_daemon import free_port, stop, wait_until_ready
from service_manager_fakes import install_fakes, recorded_calls

REPO = Path(__file__).resolve().parent.parent
LABEL = "dev.elmd.daemon"


class Machine:
    """A user's machine in tmp: a HOME, an ELMD_HOME, and a service manager on PATH."""

    def __init__(self, root: Path, platform: str):
        self.root = root
        self.home = root / "home"
        self.elmd_home = root / "elmd"
        self.calls_log = root / "service-calls.jsonl"
        self.home.mkdir()
        install_fakes(root / "bin")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("ELMD_", "XDG_"))}
        self.env.update(
            HOME=str(self.home),
            ELMD_HOME=str(self.elmd_home),
            ELMD_AGENT_PLATFORM=platform,
            PATH=f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}",
            PYTHONPATH=str(REPO),
            FAKE_SERVICE_LOG=str(self.calls_log),
            FAKE_SERVICE_STATE=str(root / "service-state.json"),
        )

    def elmd(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "elmd", *args],
            env={**self.env, **env},
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def calls(self) -> list[list[str]]:
        return recorded_calls(self.calls_log)

    def forget_calls(self) -> None:
        self.calls_log.unlink(missing_ok=True)

    @property
    def plist_path(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"

    @property
    def unit_path(self) -> Path:
        return self.home / ".config" / "systemd" / "user" / "elmd.service"

    @property
    def log_dir(self) -> Path:
        return self.elmd_home / "logs"


@pytest.fixture
def mac(tmp_path) -> Machine:
    return Machine(tmp_path, "launchd")


@pytest.fixture
def linux(tmp_path) -> Machine:
    return Machine(tmp_path, "systemd")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_launchd_plist_has_every_key_with_absolute_paths(mac):
    (mac.root / "my-checkpoint").mkdir()
    mac.elmd("agent", "install", "--model", "my-checkpoint", "--port", "8411", ELMD_API_KEY="sk-local")

    with open(mac.plist_path, "rb") as file:
        agent = plistlib.load(file)
    assert agent["Label"] == LABEL
    program = agent["ProgramArguments"]
    assert all(isinstance(word, str) for word in program)
    assert program[0] == sys.executable and os.path.isabs(program[0])
    assert program[1:4] == ["-m", "elmd", "serve"]
    options = program[4:]
    assert options[options.index("--port") + 1] == "8411"
    assert options[options.index("--model") + 1] == str(mac.root / "my-checkpoint")  # made absolute
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}  # a crash restarts it
    assert isinstance(agent["ThrottleInterval"], int) and agent["ThrottleInterval"] > 0
    environment = agent["EnvironmentVariables"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in environment.items())
    assert environment["HOME"] == str(mac.home)
    assert os.path.dirname(sys.executable) in environment["PATH"].split(os.pathsep)
    assert "/usr/bin" in environment["PATH"].split(os.pathsep)
    assert environment["ELMD_HOME"] == str(mac.elmd_home)
    assert environment["ELMD_API_KEY"] == "sk-local"
    assert "ELMD_AGENT_PLATFORM" not in environment
    assert os.path.isabs(agent["WorkingDirectory"]) and Path(agent["WorkingDirectory"]).is_dir()
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert Path(agent[key]).parent == mac.log_dir
    assert agent["StandardInPath"] == "/dev/null"  # never a TTY

    assert mode(mac.plist_path) == 0o600  # it may hold the API key
    assert mode(Path(agent["StandardOutPath"])) == 0o600
    uid = os.getuid()
    assert mac.calls()[-2:] == [
        ["launchctl", "enable", f"gui/{uid}/{LABEL}"],
        ["launchctl", "bootstrap", f"gui/{uid}", str(mac.plist_path)],
    ]


def test_every_kind_of_serve_option_reaches_the_agent(mac):
    """Repeated, flag-only and path options come out as `elmd serve` reads them, with
    paths absolute even when the file does not exist yet."""
    mac.elmd(
        "agent", "install", "--allow-origin", "http://a.test", "--allow-origin", "http://b.test",
        "--log-prompts", "--log-file", "logs/elmd.log", "--keep-alive", "-1", "--max-body-bytes", "1024",
        ELMD_API_KEY_FILE="keys/api_key",
    )  # fmt: skip
    with open(mac.plist_path, "rb") as file:
        agent = plistlib.load(file)

    from elmd.cli import build_parser

    served = build_parser().parse_args(agent["ProgramArguments"][3:])
    assert served.allow_origins == ["http://a.test", "http://b.test"]
    assert served.log_prompts is True
    assert served.log_file == str(mac.root / "logs" / "elmd.log")
    assert served.keep_alive == "-1" and served.max_body_bytes == 1024
    assert served.model is None and served.port is None  # not given, so the daemon's settings decide
    assert agent["EnvironmentVariables"]["ELMD_API_KEY_FILE"] == str(mac.root / "keys" / "api_key")


def test_launchd_reinstall_replaces_the_running_agent(mac):
    mac.elmd("agent", "install", "--port", "8411")
    mac.forget_calls()
    mac.elmd("agent", "install", "--port", "8412")

    verbs = [call[1] for call in mac.calls()]
    assert verbs.index("bootout") < verbs.index("bootstrap")
    with open(mac.plist_path, "rb") as file:
        assert "8412" in plistlib.load(file)["ProgramArguments"]
    assert "pid 4242" in mac.elmd("agent", "status").stdout


def test_launchd_uninstall_twice(mac):
    mac.elmd("agent", "install")
    mac.forget_calls()

    first = mac.elmd("agent", "uninstall")
    assert f"removed {mac.plist_path}" in first.stdout
    assert ["launchctl", "bootout", f"gui/{os.getuid()}/{LABEL}"] in mac.calls()
    assert not mac.plist_path.exists()

    mac.forget_calls()
    second = mac.elmd("agent", "uninstall")
    assert "not installed" in second.stdout
    assert all(call[1] != "bootout" for call in mac.calls())

    status = mac.elmd("agent", "status", check=False)
    assert status.returncode == 3
    assert "installed: no" in status.stdout and "running: no" in status.stdout


def test_launchd_refusal_is_reported(mac):
    result = mac.elmd("agent", "install", check=False, FAKE_SERVICE_FAIL="bootstrap")
    assert result.returncode == 1
    assert "launchctl bootstrap" in result.stderr and "Input/output error" in result.stderr


def test_invalid_serve_option_installs_nothing(mac):
    result = mac.elmd("agent", "install", "--port", "not-a-port", check=False)
    assert result.returncode == 2
    assert "--port" in result.stderr
    assert not mac.plist_path.exists()
    assert mac.calls() == []


def test_install_help_lists_the_serve_options(mac):
    help_text = mac.elmd("agent", "install", "--help").stdout
    assert "--model" in help_text and "--port" in help_text


def read_unit(path: Path) -> configparser.ConfigParser:
    """systemd repeats keys (Environment=); collect repeats as lines of one value."""

    class RepeatedKeys(dict):
        def __setitem__(self, key, value):
            if key in self and isinstance(value, list):
                self[key].extend(value)
            else:
                super().__setitem__(key, value)

    unit = configparser.ConfigParser(strict=False, interpolation=None, dict_type=RepeatedKeys)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(path)
    return unit


def test_systemd_unit_parses_with_restart_and_environment(linux):
    linux.elmd("agent", "install", "--port", "8411", "--model", "openelm-270m-instruct")

    unit = read_unit(linux.unit_path)
    service = unit["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[0] == sys.executable and os.path.isabs(command[0])
    assert command[1:4] == ["-m", "elmd", "serve"]
    assert command[command.index("--port") + 1] == "8411"
    assert command[command.index("--model") + 1] == "openelm-270m-instruct"  # a name stays a name
    assert service["Restart"] == "on-failure"
    assert int(service["RestartSec"]) > 0
    environment = dict(shlex.split(line)[0].split("=", 1) for line in service["Environment"].splitlines())
    assert environment["HOME"] == str(linux.home)
    assert environment["ELMD_HOME"] == str(linux.elmd_home)
    assert os.path.dirname(sys.executable) in environment["PATH"].split(os.pathsep)
    assert os.path.isabs(service["WorkingDirectory"])
    assert service["StandardInput"] == "null"
    for key in ("StandardOutput", "StandardError"):
        assert service[key] == f"append:{linux.log_dir / 'daemon.log'}"
    assert unit["Install"]["WantedBy"] == "default.target"
    assert mode(linux.unit_path) == 0o600

    assert linux.calls() == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "elmd.service"],
        ["systemctl", "--user", "restart", "elmd.service"],
    ]
    status = linux.elmd("agent", "status")
    assert "installed: yes" in status.stdout and "pid 4343" in status.stdout


def test_systemd_reinstall_and_uninstall_twice(linux):
    linux.elmd("agent", "install", "--port", "8411")
    linux.elmd("agent", "install", "--port", "8412")  # the stand-in refuses a stale unit
    assert "8412" in read_unit(linux.unit_path)["Service"]["ExecStart"]

    linux.forget_calls()
    assert "removed" in linux.elmd("agent", "uninstall").stdout
    assert linux.calls() == [
        ["systemctl", "--user", "disable", "--now", "elmd.service"],
        ["systemctl", "--user", "daemon-reload"],
    ]
    assert not linux.unit_path.exists()

    linux.forget_calls()
    assert "not installed" in linux.elmd("agent", "uninstall").stdout
    assert linux.calls() == []
    status = linux.elmd("agent", "status", check=False)
    assert status.returncode == 3 and "inactive" in status.stdout


def test_logs_shows_the_tail_of_the_daemon_log(linux):
    assert linux.elmd("agent", "logs", check=False).returncode == 1
    linux.log_dir.mkdir(parents=True)
    (linux.log_dir / "daemon.log").write_text("".join(f"line {i}\n" for i in range(10)))
    assert linux.elmd("agent", "logs", "-n", "2").stdout == "line 8\nline 9\n"


def test_logs_follow_prints_new_lines_until_ctrl_c(linux):
    log_path = linux.log_dir / "daemon.log"
    linux.log_dir.mkdir(parents=True)
    log_path.write_text("started\n")
    follower = subprocess.Popen([sys.executable, "-m", "elmd", "agent", "logs", "-f"], env=linux.env,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert follower.stdout.readline() == "started\n"
        with open(log_path, "a") as log:
            log.write("a request\n")
        assert follower.stdout.readline() == "a request\n"
    finally:
        follower.send_signal(signal.SIGINT)
    assert follower.wait(timeout=30) == 0


@pytest.mark.slow
def test_the_agent_definition_serves_without_a_shell(mac, tiny_checkpoint):
    """Start the daemon the way launchd would from the installed plist: only its
    environment, its working directory, stdin from /dev/null, no controlling terminal,
    output to its log file. It must answer, stop on SIGTERM, and `agent logs` shows its log."""
    port = free_port()
    mac.elmd("agent", "install", "--model", str(tiny_checkpoint), "--port", str(port), "--backend", "torch")
    with open(mac.plist_path, "rb") as file:
        agent = plistlib.load(file)

    log_path = Path(agent["StandardOutPath"])
    with open(agent["StandardInPath"], "rb") as stdin, open(log_path, "ab") as log:
        daemon = subprocess.Popen(
            agent["ProgramArguments"], env=agent["EnvironmentVariables"], cwd=agent["WorkingDirectory"],
            stdin=stdin, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", daemon, log_path)
    finally:
        exit_status = stop(daemon)
    assert exit_status in (0, -signal.SIGTERM)  # stopped when asked, as bootout / systemctl stop do
    log_text = log_path.read_text()
    assert log_text and mac.elmd("agent", "logs", "-n", "100000").stdout == log_text
