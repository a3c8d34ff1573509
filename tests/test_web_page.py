"""The chat page at GET /, in a real browser: Debian's Chromium, headless, driven by
Playwright, against a live daemon serving three models:

- `tiny-openelm`: the generated tiny OpenELM checkpoint on the real PyTorch engine;
- `html-writer`: a real checkpoint (tests/scripted_checkpoint.py) whose reply to anything
  is HTML (`<script>`, `<img onerror>`) and a code block, on the same engine;
- `echo`: the tiny model's tokenizer over tests/echo_backend.py, which repeats the prompt
  one token every 10 ms and never stops by itself: a reply that streams visibly, shows the
  conversation the page sent, and lasts until it is stopped.

A screenshot of the page is kept in test-artifacts/web-page.png.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import TINY_MODEL, build_app, serve_app
from echo_backend import echo_engine
from scripted_checkpoint import write_scripted_checkpoint
from test_metrics import scrape, value

from elmd.server.manager import load_model
from elmd.store import Store

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ECHO = "echo"
HTML_MODEL = "html-writer"
HTML_REPLY = ('<script>alert("script ran")</script> <img src=x onerror="alert(\'img ran\')"> **really**\n'
              '- as\n* code:\n```html\n<b>bold</b>\n```')
KEY = "page-test-key"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium. Missing, it fails the tests (CI installs it: .ci/run)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def daemon(tiny_checkpoint, tmp_path_factory):
    """The daemon with `tiny-openelm` (loaded), `html-writer` and `echo` (in its store)."""
    store_root = tmp_path_factory.mktemp("page-store")
    with Store(store_root).installing(ECHO) as folder:
        shutil.copytree(tiny_checkpoint, folder, dirs_exist_ok=True)
    with Store(store_root).installing(HTML_MODEL) as folder:
        write_scripted_checkpoint(folder, HTML_REPLY)
    echo_engines = []

    def loader(spec):
        if spec.id != ECHO:
            return load_model(spec)
        echo_engines.append(echo_engine(ECHO, spec.path, interval=0.01))
        return echo_engines[-1]

    app, manager = build_app(tiny_checkpoint, store_root=store_root, loader=loader, keep_alive=-1, max_loaded_models=3)
    with serve_app(app, manager) as running:
        wait_for(lambda: httpx.get(f"{running.base_url}/health").status_code == 200, 60)
        running.echo_engines = echo_engines
        yield running


@pytest.fixture
def page(browser, daemon):
    """A fresh tab on the page; console errors (a CSP violation, a script error) fail the test."""
    context = browser.new_context()
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=daemon.base_url)
    page = context.new_page()
    errors = []
    answered = "Failed to load resource: the server responded with a status of"  # an HTTP error, shown by the page

    def console(message) -> None:
        if message.type == "error" and not message.text.startswith(answered):
            errors.append(message.text)

    page.on("console", console)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))
    response = page.goto(daemon.base_url + "/")
    assert response.status == 200
    page.wait_for_selector("#model option", state="attached")
    yield page
    context.close()
    assert errors == []


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def settings(page, model: str, max_tokens: int, temperature: float = 0.0, system: str = "") -> None:
    page.select_option("#model", model)
    page.click("#settings summary")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))
    page.fill("#system", system)
    page.click("#settings summary")


def send(page, text: str):
    """Type `text`, press Enter; the reply's element (still streaming)."""
    replies = page.locator(".message.assistant")
    count = replies.count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    reply = replies.nth(count)
    reply.wait_for()
    return reply


def finished(reply, timeout: float = 30_000) -> str:
    reply.locator("xpath=self::*[@data-done]").wait_for(timeout=timeout)
    return reply.get_attribute("data-done")


def test_page_files_carry_the_csp_and_no_inline_script(daemon):
    page = httpx.get(f"{daemon.base_url}/")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "<script src=\"/chat.js\"" in page.text and "<script>" not in page.text and "onclick" not in page.text
    assert "http" not in page.text.replace(" ", "")  # nothing from elsewhere: no CDN, font or image URL
    for path, media in (("/chat.js", "text/javascript"), ("/chat.css", "text/css"), ("/favicon.svg", "image/svg+xml")):
        response = httpx.get(f"{daemon.base_url}{path}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media)
        assert response.headers["x-content-type-options"] == "nosniff"


def test_a_reply_streams_in_with_its_figures_and_copies(page, daemon):
    assert sorted(page.locator("#model option").all_inner_texts()) == sorted([TINY_MODEL, ECHO, HTML_MODEL])
    settings(page, TINY_MODEL, max_tokens=12)
    reply = send(page, "What is the capital of France?")
    assert finished(reply) == "finished"
    text = reply.locator(".body").inner_text()
    sdk = openai.OpenAI(base_url=daemon.v1, api_key="unused", max_retries=0)
    expected = sdk.chat.completions.create(model=TINY_MODEL, temperature=0, max_tokens=12, messages=[
        {"role": "user", "content": "What is the capital of France?"}]).choices[0].message.content
    assert text.strip() == expected.strip() and text.strip()
    stats = reply.locator(".stats").inner_text()
    assert stats.startswith(f"{TINY_MODEL} · 12 tokens · ") and "tokens/s" in stats and "TTFT" in stats

    reply.locator(".meta .copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == expected

    # the echo model streams slowly: text appears before the reply is finished
    settings(page, ECHO, max_tokens=300, system="Answer briefly.")
    reply = send(page, "Show me some code: ```python\nprint('hello')\n```")
    # (polled from here: under the page's CSP, Playwright's wait_for_function may not eval)
    wait_for(lambda: reply.locator(".body").inner_text() and reply.get_attribute("data-done") is None)
    assert finished(reply) == "finished"
    body = reply.locator(".body").inner_text()
    assert "Answer briefly." in body  # the system prompt from the settings was sent
    assert "What is the capital of France?" in body  # so was the conversation so far
    assert reply.locator(".code pre code").first.inner_text() == "print('hello')"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web-page.png"
    page.set_viewport_size({"width": 1000, "height": 900})
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")


def test_stop_cancels_the_generation(page, daemon):
    settings(page, ECHO, max_tokens=2000)
    reply = send(page, "Tell me a very long story.")
    wait_for(lambda: len(reply.locator(".body").inner_text()) > 20)
    assert page.locator("#stop").is_visible()
    page.click("#stop")
    assert finished(reply) == "stopped"
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    assert reply.locator(".stats").inner_text().endswith("stopped")
    # closing the stream cancelled the generation in the daemon, long before 2000 tokens
    backend = daemon.echo_engines[-1].backend
    wait_for(lambda: backend.finished and backend.finished[-1].reason == "cancelled")
    samples = scrape(daemon.base_url)
    assert value(samples, "elmd_running_sequences", model=ECHO) == 0
    assert value(samples, "elmd_generation_tokens_total", model=ECHO) < 2000


def test_switching_models_keeps_the_conversation(page, daemon):
    before = scrape(daemon.base_url)
    settings(page, TINY_MODEL, max_tokens=5)
    first = send(page, "Name a colour.")
    assert finished(first) == "finished"
    settings(page, ECHO, max_tokens=80)
    second = send(page, "And another?")
    assert finished(second) == "finished"
    assert first.locator(".stats").inner_text().startswith(TINY_MODEL)
    assert second.locator(".stats").inner_text().startswith(ECHO)
    assert "Name a colour." in second.locator(".body").inner_text()  # the echo model saw the first turn
    after = scrape(daemon.base_url)
    for model, reply in ((TINY_MODEL, first), (ECHO, second)):  # each reply's count, as the page shows it
        tokens = int(re.search(r" · (\d+) tokens", reply.locator(".stats").inner_text()).group(1))
        generated = value(after, "elmd_generation_tokens_total", model=model)
        assert generated - value(before, "elmd_generation_tokens_total", model=model) == tokens

    page.click("#new-chat")  # a new conversation: the page sends none of the old turns
    assert page.locator(".message").count() == 0
    fresh = send(page, "Start over.")
    assert finished(fresh) == "finished" and "Name a colour." not in fresh.locator(".body").inner_text()


def test_an_error_is_shown_under_the_reply_and_the_page_goes_on(page):
    settings(page, TINY_MODEL, max_tokens=5000)  # more than the tiny model's 2048-token context
    failed = send(page, "Hello")
    assert finished(failed) == "finished"
    assert "context holds 2048 tokens" in failed.locator(".meta .error").inner_text()
    settings(page, TINY_MODEL, max_tokens=3)
    assert finished(ok := send(page, "Hello again")) == "finished" and ok.locator(".error").count() == 0


def test_html_in_a_reply_is_shown_as_text(page):
    """The model's reply and the user's own message hold live-looking HTML; the page shows
    it as characters (an alert would be a dialog, which fails the test)."""
    settings(page, HTML_MODEL, max_tokens=100, temperature=0.7)
    typed = '<img src=y onerror="alert(1)"> <b>typed</b>'
    reply = send(page, typed)
    assert finished(reply) == "finished"
    paragraph = reply.locator(".body .text p")
    assert paragraph.inner_text() == '<script>alert("script ran")</script> <img src=x onerror="alert(\'img ran\')"> really'
    assert paragraph.locator("strong").inner_text() == "really"  # the Markdown that is rendered
    assert reply.locator(".body .text ul li").all_inner_texts() == ["as", "code:"]
    assert reply.locator(".body .code pre code").inner_text() == "<b>bold</b>"
    assert page.locator(".message.user .body").last.inner_text() == typed
    assert page.evaluate("document.querySelectorAll('#log script, #log img, #log b').length") == 0


def test_api_key_is_asked_for_and_kept_in_session_storage(browser, tiny_checkpoint):
    app, manager = build_app(tiny_checkpoint, api_key=KEY, keep_alive=-1)
    with serve_app(app, manager) as keyed:
        wait_for(lambda: httpx.get(f"{keyed.base_url}/health").status_code == 200, 60)
        context = browser.new_context()
        page = context.new_page()
        url = keyed.base_url.replace("127.0.0.1", "localhost") + "/"  # another name the Host check allows
        page.goto(url)
        page.wait_for_selector("#key-form:not([hidden])")
        assert page.locator("#composer").is_hidden()
        page.fill("#key", "not-the-key")
        page.press("#key", "Enter")
        wait_for(lambda: "Incorrect API key" in page.locator("#key-error").inner_text())
        page.fill("#key", KEY)
        page.press("#key", "Enter")
        page.wait_for_selector("#model option", state="attached")
        assert page.locator("#key-form").is_hidden() and page.locator("#composer").is_visible()
        assert page.evaluate("sessionStorage.getItem('elmd-api-key')") == KEY
        assert page.evaluate("localStorage.length") == 0
        settings(page, TINY_MODEL, max_tokens=3)
        assert finished(send(page, "Hello")) == "finished"
        assert page.locator(".message.assistant .error").count() == 0
        page.reload()  # the same tab keeps the key
        page.wait_for_selector("#model option", state="attached")
        assert page.locator("#key-form").is_hidden()
        other = context.new_page()  # another tab starts without it
        other.goto(url)
        other.wait_for_selector("#key-form:not([hidden])")
        context.close()
