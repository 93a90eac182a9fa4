"""The API client against the test server over real sockets: every kind of answer gets the right decision."""

# Standard library imports
import json

# Third-party imports
import aiohttp
import pytest

# Local application imports
from tasks.api.api_client import (
    MAX_SERVER_WAIT_SECONDS,
    ApiClient,
    Outcome,
    backoff_seconds,
    decide,
    parse_duration,
    redact,
    retry_after_seconds,
)

KEY = "sk-test-SECRET0123456789abcdef"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}


async def _send(url: str, body: dict, key: str = KEY, timeout: float = 5.0):
    async with aiohttp.ClientSession() as session:
        return await ApiClient(session, key, timeout).send("POST", url, json.dumps(body).encode())


async def test_success_returns_the_body_and_request_id(api_server) -> None:
    server = api_server(api_key=KEY)
    result = await _send(f"{server.url}/v1/chat/completions", CHAT)
    assert result.outcome is Outcome.SUCCESS and result.status == 200
    assert result.body["choices"][0]["message"]["content"] == "echo: hello"
    assert result.request_id.startswith("req_")


async def test_wrong_key_stops_and_the_key_never_shows(api_server) -> None:
    server = api_server(api_key="sk-the-right-key-000000000")
    result = await _send(f"{server.url}/v1/chat/completions", CHAT, key=KEY)
    assert result.outcome is Outcome.STOP and result.status == 401
    assert KEY not in result.error and KEY[:12] not in result.error


async def test_azure_deployment_urls_use_the_api_key_header(api_server) -> None:
    server = api_server(api_key=KEY)
    result = await _send(f"{server.url}/openai/deployments/my-gpt/chat/completions?api-version=2024-06-01", CHAT)
    assert result.outcome is Outcome.SUCCESS


@pytest.mark.parametrize(
    "body, path, status",
    [
        ({"model": "unknown-model", "messages": [{"role": "user", "content": "x"}]}, "/v1/chat/completions", 404),
        ({"model": "gpt-4o-mini", "messages": "no"}, "/v1/chat/completions", 400),
        (CHAT, "/v1/no-such-endpoint", 404),
    ],
)
async def test_invalid_requests_are_not_retried(api_server, body: dict, path: str, status: int) -> None:
    server = api_server()
    result = await _send(f"{server.url}{path}", body)
    assert result.outcome is Outcome.INVALID and result.status == status


async def test_rate_limit_answers_carry_the_wait_and_the_scope(api_server) -> None:
    server = api_server(requests_per_minute=60, retry_after_seconds=0.75)
    first = await _send(f"{server.url}/v1/chat/completions", CHAT)
    second = await _send(f"{server.url}/v1/chat/completions", CHAT)
    assert first.outcome is Outcome.SUCCESS
    assert second.outcome is Outcome.RATE_LIMITED and second.status == 429
    assert second.retry_after == pytest.approx(0.75)
    assert second.rate_limit_scope == "requests"


async def test_insufficient_quota_stops(api_server) -> None:
    server = api_server(quota_after=0)
    await _send(f"{server.url}/v1/embeddings", {"model": "text-embedding-3-small", "input": "a"})
    result = await _send(f"{server.url}/v1/embeddings", {"model": "text-embedding-3-small", "input": "b"})
    assert result.outcome is Outcome.STOP and result.cause == "insufficient_quota"


async def test_faults_timeouts_and_dropped_connections_are_retried(api_server) -> None:
    server = api_server(fault_rate=1.0, seed=3)
    causes = set()
    for _ in range(16):
        result = await _send(f"{server.url}/v1/chat/completions", CHAT)
        assert result.outcome is Outcome.RETRY
        causes.add(result.cause)
    assert {"http_500", "http_503", "http_502", "connection"} <= causes
    slow = api_server(latency_seconds=1.0)
    result = await _send(f"{slow.url}/v1/chat/completions", CHAT, timeout=0.2)
    assert result.outcome is Outcome.RETRY and result.cause == "timeout"


async def test_unreachable_server_is_a_retryable_connection_error() -> None:
    result = await _send("http://127.0.0.1:9/v1/chat/completions", CHAT)
    assert result.outcome is Outcome.RETRY and result.cause == "connection"


def test_decide_covers_statuses() -> None:
    assert decide(200, b"not json", {}).cause == "unreadable_body"
    assert decide(200, b'{"error": {"message": "boom"}}', {}).outcome is Outcome.RETRY
    assert decide(408, b"", {}).outcome is Outcome.RETRY
    assert decide(409, b"", {}).outcome is Outcome.RETRY
    assert decide(422, b"{}", {}).outcome is Outcome.INVALID
    assert decide(403, b"{}", {}).outcome is Outcome.STOP
    tokens = decide(429, b'{"error": {"message": "Rate limit reached on tokens per min (TPM)", "code": "rate_limit_exceeded"}}', {})
    assert tokens.outcome is Outcome.RATE_LIMITED and tokens.rate_limit_scope == "tokens"
    assert decide(429, b'{"error": {"type": "insufficient_quota", "code": null}}', {}).outcome is Outcome.STOP


@pytest.mark.parametrize(
    "text, seconds",
    [("1s", 1.0), ("6m0s", 360.0), ("83ms", 0.083), ("1h2m3.5s", 3723.5), ("0.5", 0.5), ("20", 20.0),
     ("", None), ("soon", None), ("5x", None)],
)
def test_parse_duration(text: str, seconds) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_prefers_milliseconds_then_seconds_then_resets() -> None:
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == pytest.approx(0.25)
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"x-ratelimit-reset-requests": "120ms", "x-ratelimit-reset-tokens": "2s"}) == 2.0
    assert retry_after_seconds({}) is None


def test_backoff_grows_with_jitter_and_a_cap() -> None:
    for attempt in range(1, 12):
        ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
        value = backoff_seconds(attempt)
        assert ceiling / 2 <= value <= ceiling


def test_redact_removes_the_key_and_its_prefix() -> None:
    assert redact(f"bad key {KEY} and {KEY[:14]}", KEY) == "bad key [REDACTED] and [REDACTED]" + KEY[12:14]


def test_an_answered_request_whose_body_is_not_json_is_never_sent_again() -> None:
    result = decide(200, b"data: {\"stream\": true}\n\n" + KEY.encode(), {}, KEY)
    assert result.outcome is Outcome.INVALID and result.cause == "unreadable_body"  # billed: no retry
    assert KEY not in result.error and KEY[:12] not in result.error


def test_error_codes_and_snippets_are_redacted() -> None:
    body = json.dumps({"error": {"code": f"bad_key_{KEY}", "message": "x"}}).encode()
    result = decide(400, body, {}, KEY)
    assert KEY not in result.error and KEY[:12] not in result.error


@pytest.mark.parametrize("headers", [{"retry-after": "86400"}, {"retry-after-ms": "999999999"}])
def test_a_servers_wait_is_capped(headers) -> None:
    assert retry_after_seconds(headers) == MAX_SERVER_WAIT_SECONDS


def test_a_budgets_reset_is_no_wait_for_a_429() -> None:
    # Groq's x-ratelimit-reset-requests counts down a day's budget: a 429 of its per-minute limit
    # must not wait for it (nor hold the lane two minutes).
    assert retry_after_seconds({"x-ratelimit-reset-requests": "23h59m53s"}) is None
    assert retry_after_seconds({"x-ratelimit-reset-requests": "23h59m53s", "x-ratelimit-reset-tokens": "7.66s"}) == 7.66


async def test_a_redirect_is_never_followed_with_the_key(api_server) -> None:
    from aiohttp import web

    target = api_server(api_key=KEY)
    app = web.Application()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"{target.url}/v1/chat/completions")

    app.router.add_post("/{tail:.*}", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        for url in (f"http://127.0.0.1:{port}/v1/chat/completions",
                    f"http://127.0.0.1:{port}/openai/deployments/x/chat/completions?api-version=1"):
            result = await _send(url, CHAT)
            assert result.outcome is Outcome.INVALID and result.status == 307 and "not followed" in result.error
    finally:
        await runner.cleanup()
    assert target.stats()["requests"] == 0
