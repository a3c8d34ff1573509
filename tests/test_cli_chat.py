"""`elmd status`, `elmd run` and `elmd chat` as a user runs them: real CLI processes (chat in
a real pseudo-terminal, driven with pexpect) against a real daemon process serving a tiny
random-weights model. Its answers are gibberish, so the assertions are about structure:
something streamed, the conversation kept (prompt_tokens grow), clean exits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pexpect
import pytest

from live_daemon import REPO, free_port, running_daemon

pytestmark = pytest.mark.slow

STATS = re.compile(r"prompt_tokens=(\d+) completion_tokens=(\d+)")


@pytest.fixture(scope="module")
def daemon(tiny_checkpoint, tmp_path_factory):
    with running_daemon(tiny_checkpoint, tmp_path_factory.mktemp("cli-daemon")) as running:
        yield running


def elmd(daemon, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "elmd", *args],
        env={**daemon.env, **env}, input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def spawn_chat(daemon, *args: str) -> pexpect.spawn:
    env = {**daemon.env, "TERM": "dumb"}
    return pexpect.spawn(sys.executable, ["-m", "elmd", "chat", *args], env=env, cwd=str(REPO),
                         encoding="utf-8", timeout=60, dimensions=(40, 200))  # fmt: skip


def say(chat: pexpect.spawn, message: str) -> tuple[str, int, int]:
    """Send one message; (the streamed answer, prompt_tokens, completion_tokens)."""
    chat.expect_exact(">>> ")
    chat.sendline(message)
    chat.expect(r"\[prompt_tokens=(\d+) completion_tokens=(\d+)[^\]]*\]\r\n")
    answer = chat.before.split(f"{message}\r\n", 1)[1]
    return answer, int(chat.match.group(1)), int(chat.match.group(2))


def test_status_reports_the_loaded_model_and_its_memory(daemon):
    result = elmd(daemon, "status")
    assert result.returncode == 0, result.stderr
    assert f"running at {daemon.url} (ok)" in result.stdout
    model_line = next(line for line in result.stdout.splitlines() if line.strip().startswith(daemon.model))
    assert "torch" in model_line and "MiB" in model_line

    report = json.loads(elmd(daemon, "status", "--json").stdout)
    assert report["health"]["loaded"] == [daemon.model]
    (card,) = report["models"]
    assert card["loaded"] and card["memory_bytes"] > 0


def test_status_shows_what_the_daemon_has_been_doing(daemon):
    """The figures come from GET /metrics, as a Prometheus server would scrape them."""
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    sdk = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)
    for _ in range(3):
        sdk.chat.completions.create(model=daemon.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                    extra_body={"ignore_eos": True})
    samples = [s for f in text_string_to_metric_families(httpx.get(f"{daemon.url}/metrics").text) for s in f.samples]
    requests = sum(s.value for s in samples if s.name == "elmd_requests_total")
    generations = sum(s.value for s in samples if s.name == "elmd_time_to_first_token_seconds_count")

    activity = json.loads(elmd(daemon, "status", "--json").stdout)["activity"]
    assert activity["requests"] == requests + 3  # that scrape, then status's own /health and /v1/models
    assert activity["generations"] == generations >= 3
    assert activity["tokens_per_second"] >= 12 / 60
    assert 0 < activity["ttft_p50"] <= activity["ttft_p95"]
    assert activity["running"] == activity["queued"] == 0

    shown = elmd(daemon, "status").stdout
    assert re.search(r"^requests: \d+ since start \(\d+ with an error status(, \d+ health checks while loading)?\), "
                     r"0 generating, 0 queued$", shown, re.M), shown
    assert re.search(r"^generated: \d+\.\d tokens/s over the last minute$", shown, re.M), shown
    assert re.search(rf"^time to first token: p50 \d+ ms, p95 \d+ ms \({int(generations)} generations\)$", shown, re.M)


def test_health_checks_answered_while_loading_are_not_counted_as_errors():
    """A client polling /health during a load gets 503 `loading` until the model is ready:
    `elmd status` counts those apart from the errors."""
    from elmd.commands.status import activity

    text = "\n".join([
        "# TYPE elmd_requests_total counter",
        'elmd_requests_total{endpoint="/health",status="503"} 12.0',
        'elmd_requests_total{endpoint="/health",status="200"} 3.0',
        'elmd_requests_total{endpoint="/v1/chat/completions",status="503"} 1.0',
        'elmd_requests_total{endpoint="/v1/chat/completions",status="400"} 2.0',
        'elmd_requests_total{endpoint="/v1/chat/completions",status="200"} 5.0',
    ]) + "\n"
    figures = activity(httpx.Response(200, text=text))
    assert (figures.requests, figures.errors, figures.loading) == (23, 3, 12)
    assert "(3 with an error status, 12 health checks while loading)" in figures.describe()


def test_ttft_quantiles_are_read_from_the_histogram_as_promql_does():
    from elmd.commands.status import quantile

    buckets = [(0.1, 5.0), (0.5, 10.0), (float("inf"), 10.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.95, buckets) == pytest.approx(0.46)  # 0.1 + 0.4 * (9.5 - 5) / 5
    assert quantile(0.5, [(0.1, 0.0), (float("inf"), 4.0)]) == 0.1  # past the last finite bound
    assert quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_status_finds_a_daemon_configured_for_every_address(daemon):
    """ELMD_HOST=0.0.0.0 is where a daemon listens, not an address to connect to."""
    result = elmd(daemon, "status", ELMD_HOST="0.0.0.0")
    assert result.returncode == 0 and f"running at {daemon.url}" in result.stdout


def test_status_without_a_daemon(daemon):
    result = elmd(daemon, "status", ELMD_PORT=str(free_port()))
    assert result.returncode == 1
    assert "not running" in result.stdout and "elmd serve" in result.stdout


def test_run_streams_one_answer_to_stdout(daemon):
    process = subprocess.Popen(
        [sys.executable, "-m", "elmd", "run", daemon.model, "Tell me a story", "--max-tokens", "48", "--seed", "3",
         "--verbose"],
        env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    pieces = []
    while piece := os.read(process.stdout.fileno(), 65536):
        pieces.append(piece)
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0, stderr
    answer = b"".join(pieces).decode()
    assert answer.strip()
    completion_tokens = int(STATS.search(stderr).group(2))
    assert 0 < completion_tokens <= 48
    assert len(pieces) >= 3  # written as it was generated, not all at the end


def test_run_says_when_it_waits_for_the_model_to_load(daemon):
    unload = {"model": daemon.model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "keep_alive": 0}
    assert httpx.post(f"{daemon.url}/v1/chat/completions", json=unload, timeout=60).status_code == 200
    deadline = time.monotonic() + 30
    while httpx.get(f"{daemon.url}/v1/models/{daemon.model}").json()["loaded"]:
        assert time.monotonic() < deadline, "keep_alive 0 did not unload the model"
        time.sleep(0.1)

    result = elmd(daemon, "run", daemon.model, "hello", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert f"loading {daemon.model}" in result.stderr and result.stdout.strip()
    assert "loading" not in elmd(daemon, "run", daemon.model, "hello", "--max-tokens", "4").stderr


def test_run_reads_the_prompt_from_stdin(daemon):
    result = elmd(daemon, "run", daemon.model, "--max-tokens", "8", stdin="Hello from a pipe\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_run_reports_an_unknown_model(daemon):
    result = elmd(daemon, "run", "no-such-model", "hi")
    assert result.returncode == 1
    assert "no-such-model" in result.stderr and "Traceback" not in result.stderr


def test_chat_keeps_the_conversation_and_leaves_on_exit(daemon):
    chat = spawn_chat(daemon, daemon.model, "--max-tokens", "12", "--seed", "1", "--verbose")
    first, first_prompt, first_completion = say(chat, "hello there")
    assert first.strip() and first_completion > 0

    # The same words again: only the history sent along can make the prompt longer.
    second, second_prompt, _ = say(chat, "hello there")
    assert second.strip()
    assert second_prompt > first_prompt + first_completion // 2

    chat.expect_exact(">>> ")
    chat.sendline("/clear")
    _, cleared_prompt, _ = say(chat, "hello there")
    assert cleared_prompt == first_prompt

    chat.expect_exact(">>> ")
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_ctrl_c_stops_an_answer_and_returns_to_the_prompt(daemon):
    chat = spawn_chat(daemon, daemon.model, "--max-tokens", "1500", "--seed", "1", "--verbose")
    chat.expect_exact(">>> ")
    chat.sendline("tell me everything")
    chat.expect_exact("tell me everything\r\n")
    chat.expect(r"\S\S\S")  # the answer has begun
    chat.sendintr()
    chat.expect_exact(" [stopped]")
    chat.expect_exact(">>> ")  # back at the prompt, the conversation still open
    chat.sendline("/help")
    chat.expect_exact("/clear")
    chat.expect_exact(">>> ")
    chat.sendline("/bye")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_chat_picks_the_served_model_and_leaves_on_ctrl_d(daemon):
    chat = spawn_chat(daemon)
    chat.expect_exact(f"Chatting with {daemon.model} at {daemon.url}")
    chat.expect_exact(">>> ")
    chat.sendcontrol("d")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_chat_without_a_daemon_says_how_to_start_one(daemon):
    result = elmd(daemon, "chat", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "elmd serve" in result.stderr and "Traceback" not in result.stderr


def test_the_cli_sends_the_key_the_daemon_requires(tiny_checkpoint, tmp_path):
    key_file = tmp_path / "elmd" / "config" / "api_key"  # the default key file, as `elmd key` makes it
    key_file.parent.mkdir(parents=True)
    key_file.write_text("sk-test-key\n")
    key_file.chmod(0o600)
    with running_daemon(tiny_checkpoint, tmp_path) as keyed:
        assert httpx.get(f"{keyed.url}/v1/models").status_code == 401
        status = elmd(keyed, "status")
        assert status.returncode == 0 and keyed.model in status.stdout, status.stderr
        assert elmd(keyed, "run", keyed.model, "hi", "--max-tokens", "4").returncode == 0

        wrong = elmd(keyed, "run", keyed.model, "hi", ELMD_API_KEY="sk-wrong")
        assert wrong.returncode == 1 and "Incorrect API key" in wrong.stderr


@pytest.mark.parametrize("command", ["agent", "status", "chat", "run"])
def test_help_says_what_the_command_does(daemon, command):
    result = elmd(daemon, command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: elmd ")
    description = result.stdout.split("\n\n")[1]
    assert len(description.split()) >= 8
