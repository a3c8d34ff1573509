"""Who gets in (issue 6): the Host check against DNS rebinding, cross-origin requests,
the API key, and the body size limit, each against the real daemon on an ephemeral port
with raw HTTP as an attacker or a browser would send it."""

from __future__ import annotations

import socket

import httpx
import openai
import pytest

from conftest import TINY_MODEL
from elmd.server import page

CHAT = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
KEY = "elmd-test-key-0123456789"


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]


# ------------------------------------------------------------------ Host (DNS rebinding)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8356", "localhost.evil.example", "127.0.0.1.nip.io",
                                  "evil.localhost", "localhost:", "127.0.0.1:80x", "[::1", ""])
def test_a_rebound_host_name_is_refused(server, host):
    models = httpx.get(f"{server.v1}/models", headers={"Host": host})
    assert_error(models, 403, "host_not_allowed")
    chat = httpx.post(f"{server.v1}/chat/completions", json=CHAT, headers={"Host": host})
    assert_error(chat, 403, "host_not_allowed")


@pytest.mark.parametrize("host", ["localhost", "localhost:1234", "LocalHost:8356", "127.0.0.1", "127.0.0.1:9",
                                  "[::1]", "[::1]:8356", socket.gethostname(), f"{socket.gethostname()}:8356"])
def test_this_machine_s_names_are_allowed_on_any_port(server, host):
    response = httpx.get(f"{server.v1}/models", headers={"Host": host})
    assert response.status_code == 200, response.text


# ------------------------------------------------------------------ Origin / CORS


def test_no_cross_origin_access_by_default(server):
    origin = {"Origin": "https://evil.example"}
    simple = httpx.post(f"{server.v1}/chat/completions", json=CHAT, headers=origin)
    assert_error(simple, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in simple.headers
    preflight = httpx.options(f"{server.v1}/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code == 403
    # a local web app on another port is another origin too
    local_app = httpx.get(f"{server.v1}/models", headers={"Origin": "http://localhost:3000"})
    assert_error(local_app, 403, "origin_not_allowed")
    sandboxed = httpx.get(f"{server.v1}/models", headers={"Origin": "null"})
    assert_error(sandboxed, 403, "origin_not_allowed")


def test_cross_site_requests_without_an_origin_are_refused(start_server, tiny_checkpoint):
    """An <img src> or a link from another site sends a GET with no Origin; /tokenizer_info
    would load a model for it."""
    running = start_server(tiny_checkpoint, preload=False)
    for site in ("cross-site", "same-site"):
        response = httpx.get(f"{running.base_url}/tokenizer_info", headers={"Sec-Fetch-Site": site})
        assert_error(response, 403, "origin_not_allowed")
    assert httpx.get(f"{running.base_url}/health").json() == {"status": "ok", "loaded": [], "loading": [], "error": None,
                                                                  "cpu_kernels": None, "cpu_kernels_reason": None,
                                                                  "cpu_kernels_building": False}
    typed_in_the_address_bar = httpx.get(f"{running.base_url}/tokenizer_info", headers={"Sec-Fetch-Site": "none"},
                                         timeout=60)
    assert typed_in_the_address_bar.status_code == 200


def test_allow_origin_admits_exactly_the_named_origins(start_server, tiny_checkpoint):
    running = start_server(tiny_checkpoint, allow_origins=["http://localhost:3000"], keep_alive=-1)
    allowed = {"Origin": "http://localhost:3000"}
    preflight = httpx.options(f"{running.v1}/chat/completions", headers={
        **allowed, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    response = httpx.post(f"{running.v1}/chat/completions", json=CHAT, headers=allowed, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = httpx.post(f"{running.v1}/chat/completions", json=CHAT, headers={"Origin": "http://localhost:3001"})
    assert_error(other, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in other.headers


def test_no_page_runs_third_party_scripts_on_the_daemon_s_origin(server):
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        response = httpx.get(server.base_url + page)
        assert response.status_code == 404 and "cdn" not in response.text.lower()
    assert httpx.get(f"{server.base_url}/openapi.json").json()["info"]["title"] == "elmd"


def test_non_browser_clients_send_no_origin_and_are_served(server):
    assert httpx.get(f"{server.v1}/models").status_code == 200


# ------------------------------------------------------------------ API key


@pytest.fixture
def keyed(start_server, tiny_checkpoint):
    return start_server(tiny_checkpoint, api_key=KEY, keep_alive=-1)


@pytest.mark.parametrize("authorization, code", [
    (None, "missing_api_key"),
    ("Bearer", "missing_api_key"),
    (f"Basic {KEY}", "missing_api_key"),
    ("Bearer wrong", "invalid_api_key"),
    (f"Bearer {KEY}x", "invalid_api_key"),
    (f"Bearer {KEY[:-1]}", "invalid_api_key"),
])
def test_every_endpoint_but_health_needs_the_key(keyed, authorization, code):
    headers = {"Authorization": authorization} if authorization else {}
    for method, path, body in [("GET", "/v1/models", None), ("GET", f"/v1/models/{TINY_MODEL}", None),
                               ("POST", "/v1/chat/completions", CHAT), ("POST", "/v1/completions", {}),
                               ("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [1]}),
                               ("GET", "/tokenizer_info", None), ("GET", "/openapi.json", None),
                               ("GET", "/no/such/route", None)]:
        response = httpx.request(method, keyed.base_url + path, json=body, headers=headers)
        assert_error(response, 401, code)
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{keyed.base_url}/health").status_code == 200


def test_openapi_json_says_which_operations_need_the_key(keyed, server):
    schema = httpx.get(f"{keyed.base_url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "security" not in schema["paths"]["/health"]["get"]
    assert schema["components"]["securitySchemes"]["x-api-key"] == {
        "type": "apiKey", "in": "header", "name": "x-api-key", "description": "The same key, as Anthropic's clients send it."}
    either = [{"bearer": []}, {"x-api-key": []}]  # OpenAPI: any one of the listed schemes
    assert schema["paths"]["/v1/chat/completions"]["post"]["security"] == either
    assert all(operation.get("security") == either for path, operations in schema["paths"].items()
               if path != "/health" and path not in page.PATHS for operation in operations.values())
    unkeyed = httpx.get(f"{server.base_url}/openapi.json").json()  # a daemon without a key asks for none
    assert "securitySchemes" not in unkeyed.get("components", {})


def test_the_key_admits_the_official_client(keyed):
    client = openai.OpenAI(base_url=keyed.v1, api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(**CHAT)
    assert reply.choices[0].message.role == "assistant"
    assert [m.id for m in client.models.list()] == [TINY_MODEL]
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=keyed.v1, api_key="not-the-key", max_retries=0).models.list()
    assert refused.value.code == "invalid_api_key"


def test_the_key_is_compared_in_constant_time(keyed, monkeypatch):
    """A wrong key is compared with hmac.compare_digest over digests of equal length, so
    neither the key's bytes nor its length show in the response time."""
    from elmd.server import security

    calls = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    for presented in ("x", KEY[:-1] + "y", KEY * 3):
        assert httpx.get(f"{keyed.v1}/models", headers={"Authorization": f"Bearer {presented}"}).status_code == 401
    assert len(calls) == 3 and all(len(a) == len(b) == 32 for a, b in calls)


# ------------------------------------------------------------------ body size


def test_a_body_over_the_limit_gets_413(start_server):
    running = start_server(None, max_body_bytes=4096)
    big = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}
    declared = httpx.post(f"{running.v1}/chat/completions", json=big)
    assert_error(declared, 413, "request_too_large")

    def chunks():  # no Content-Length: counted while it arrives
        yield b'{"model": "m", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    chunked = httpx.post(f"{running.v1}/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(chunked, 413, "request_too_large")
    within = httpx.post(f"{running.v1}/chat/completions", json={**big, "messages": [{"role": "user", "content": "x" * 3000}]})
    assert within.status_code == 404  # parsed and answered: no such model on this server
