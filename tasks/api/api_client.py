"""The API client: one aiohttp session for the run, and a decision for every answer.

``ApiClient.send()`` posts one request and returns an ``ApiResult`` that says what to do
next. It looks at the HTTP status and at the error body, not at one magic string:

    ===============================================  =====================================
    answer                                           outcome
    ===============================================  =====================================
    2xx with a JSON body                             SUCCESS
    2xx with a body that is not JSON                 INVALID: paid for, so never sent again
    429 ``rate_limit_exceeded`` (or any other 429)   RATE_LIMITED: wait Retry-After, retry
    429 ``insufficient_quota``, 401, 403             STOP: stop dispatching, keep results
    400, 404, 422 and other 4xx                      INVALID: never retried
    408, 409, 5xx, resets, timeouts                  RETRY: exponential backoff with jitter
    ===============================================  =====================================

The wait hint of a 429 comes from ``retry-after-ms``, ``Retry-After`` (seconds or an HTTP
date), a Gemini-style ``retryDelay`` in the error body, or ``x-ratelimit-reset-requests`` / ``x-ratelimit-reset-tokens`` (``1s``, ``6m0s``,
``83ms``, or plain seconds), in that order. A wait the server asks for is capped at
``MAX_SERVER_WAIT_SECONDS``, so a broken or hostile header cannot park a request for days.

Redirects are never followed: the key (and the body) must go to the configured host only, so a
3xx answer is that row's failure, naming where it pointed.

Authentication is ``Authorization: Bearer KEY``. Azure deployment URLs (any URL with
``/deployments`` in it, as the Cookbook script decides) get ``api-key: KEY`` instead. The key
never appears in an ``ApiResult``: every error text goes through ``redact()``. ``check_api_key``
strips a key read from a file or a secret (a trailing newline) and refuses one that an HTTP
header cannot carry, before anything is sent.

Usage:
    >>> async with aiohttp.ClientSession() as session:
    ...     client = ApiClient(session=session, api_key=os.environ.get("OPENAI_API_KEY"))
    ...     result = await client.send("POST", "http://127.0.0.1:8000/v1/embeddings",
    ...                                json.dumps({"model": "text-embedding-3-small", "input": "hi"}).encode())
    ...     result.outcome
    <Outcome.SUCCESS: 'success'>
"""

# Standard library imports
import asyncio
import enum
import random
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

# Third-party imports
import aiohttp

# Local application imports
from tasks.limits.header_dialects import ServerLimits, parse_duration, read_limits, retry_hint
from tasks.requests import fast_json

__all__ = ["ApiClient", "ApiResult", "Outcome", "ServerLimits", "decide", "parse_duration", "retry_after_seconds"]

# Statuses that are worth another attempt besides 5xx.
RETRYABLE_STATUSES = frozenset({408, 409})
# Statuses that stop the whole run: the key is wrong or has no access.
STOPPING_STATUSES = frozenset({401, 403})
# Error codes of a 429 that mean "out of money", not "too fast".
QUOTA_ERROR_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "billing_not_active"})
# The longest wait a server's Retry-After or reset header can ask of one request.
MAX_SERVER_WAIT_SECONDS = 120.0


class Outcome(enum.Enum):
    """What the caller should do with a request after an answer."""

    SUCCESS = "success"
    RATE_LIMITED = "rate_limited"
    RETRY = "retry"
    INVALID = "invalid"
    STOP = "stop"


@dataclass(slots=True)
class ApiResult:
    """One attempt's answer, decided.

    Attributes:
        outcome: what to do next.
        status: the HTTP status, or None when no answer arrived.
        body: the parsed JSON body, or None.
        error: a readable, redacted error text; None on success.
        cause: a short name for the failure ("http_500", "timeout", "connection", ...), for metrics.
        retry_after: seconds the server asked us to wait, when it said.
        request_id: the server's ``x-request-id``, when it sent one.
        rate_limit_scope: "requests" or "tokens" when a 429 says which limit was hit.
        limits: what the answer's ``x-ratelimit-*`` headers say, when it had any.
    """

    outcome: Outcome
    status: Optional[int] = None
    body: Any = None
    error: Optional[str] = None
    cause: Optional[str] = None
    retry_after: Optional[float] = None
    request_id: Optional[str] = None
    rate_limit_scope: Optional[str] = None
    limits: Optional[ServerLimits] = None


@dataclass
class ApiClient:
    """Sends requests through one shared aiohttp session.

    Attributes:
        session: the run's session (one connection pool for every shard).
        api_key: the key, or None for servers without authentication.
        timeout_seconds: the whole-request timeout of one attempt.
    """

    session: aiohttp.ClientSession
    api_key: Optional[str] = None
    timeout_seconds: float = 300.0

    def __post_init__(self) -> None:
        self._timeout = aiohttp.ClientTimeout(total=self.timeout_seconds)
        self._headers: Dict[bool, Dict[str, str]] = {
            azure: auth_headers(self.api_key, azure) for azure in (False, True)
        }

    async def send(self, method: str, url: str, payload: bytes) -> ApiResult:
        """Send one attempt and decide what its answer means.

        Args:
            method: the HTTP method, usually "POST".
            url: the full URL.
            payload: the JSON body, already serialised.

        Returns:
            The decided result. Never raises for network or HTTP errors.
        """
        headers = self._headers["/deployments" in url]
        sent_at = time.monotonic()
        try:
            async with self.session.request(
                method, url, data=payload, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as response:
                raw = await response.read()
                return decide(response.status, raw, response.headers, self.api_key, sent_at)
        except asyncio.TimeoutError:
            return ApiResult(Outcome.RETRY, error=f"timed out after {self.timeout_seconds:g} s", cause="timeout")
        except aiohttp.InvalidURL as error:
            return ApiResult(Outcome.STOP, error=f"invalid URL: {redact(str(error), self.api_key)}", cause="bad_url")
        except (aiohttp.ClientError, OSError) as error:
            text = redact(f"{type(error).__name__}: {error}", self.api_key)
            return ApiResult(Outcome.RETRY, error=f"connection error: {text}", cause="connection")


def decide(status: int, raw: bytes, headers: Mapping[str, str], api_key: Optional[str] = None,
           sent_at: Optional[float] = None) -> ApiResult:
    """Turn one HTTP answer into an ``ApiResult``, with what its rate-limit headers say.

    Args:
        status: the HTTP status.
        raw: the body's bytes.
        headers: the response headers (case-insensitive mapping).
        api_key: the key, removed from any error text.
        sent_at: when the request went out (engine clock): the headers were made somewhere between
            then and now, which the limit learning allows for.

    Returns:
        The decided result.
    """
    result = _decide_outcome(status, raw, headers, api_key)
    now = time.monotonic()
    result.limits = read_limits(headers, now, time.time(), latency=now - sent_at if sent_at is not None else 0.0)
    if result.error:
        result.error = redact(result.error, api_key)
    return result


def _decide_outcome(status: int, raw: bytes, headers: Mapping[str, str], api_key: Optional[str]) -> ApiResult:
    """The outcome of one HTTP answer."""
    request_id = headers.get("x-request-id")
    try:
        body = fast_json.loads(raw) if raw else None
    except ValueError:
        body = None
    if 200 <= status < 300 and isinstance(body, dict) and "error" not in body:  # the usual answer: nothing to read
        return ApiResult(Outcome.SUCCESS, status, body, request_id=request_id)
    error_info = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error_info, dict):
        error_info = {"message": error_info} if isinstance(error_info, str) else {}
    code = str(error_info.get("code") or "")
    kind = str(error_info.get("type") or "")
    message = redact(str(error_info.get("message") or _snippet(raw)), api_key)
    label = code or kind or "error"

    if 200 <= status < 300:
        if body is None:  # answered (and billed): sending it again would pay again
            return ApiResult(Outcome.INVALID, status, None, f"HTTP {status}: the answer is not JSON: {_snippet(raw)!r}",
                             cause="unreadable_body", request_id=request_id)
        if isinstance(body, dict) and "error" in body and not ({"choices", "data", "object"} & body.keys()):
            return ApiResult(Outcome.RETRY, status, body, f"HTTP {status} {label}: {message}",
                             cause="error_body", request_id=request_id)
        return ApiResult(Outcome.SUCCESS, status, body, request_id=request_id)
    error = f"HTTP {status} {label}: {message}"
    if status == 429:
        if code in QUOTA_ERROR_CODES or kind in QUOTA_ERROR_CODES:
            return ApiResult(Outcome.STOP, status, body, error, cause="insufficient_quota", request_id=request_id)
        return ApiResult(Outcome.RATE_LIMITED, status, body, error, cause="rate_limited",
                         retry_after=retry_after_seconds(headers, body), request_id=request_id,
                         rate_limit_scope=_rate_limit_scope(kind, message))
    if 300 <= status < 400:
        location = headers.get("location", "")
        return ApiResult(Outcome.INVALID, status, body, f"HTTP {status}: a redirect to {location[:200]!r} was not "
                         "followed (the key goes to the configured URL only)", cause=f"http_{status}",
                         request_id=request_id)
    if status in STOPPING_STATUSES:
        return ApiResult(Outcome.STOP, status, body, error, cause=f"http_{status}", request_id=request_id)
    if status in RETRYABLE_STATUSES or status >= 500:
        return ApiResult(Outcome.RETRY, status, body, error, cause=f"http_{status}",
                         retry_after=retry_after_seconds(headers), request_id=request_id)
    return ApiResult(Outcome.INVALID, status, body, error, cause=f"http_{status}", request_id=request_id)


def retry_after_seconds(headers: Mapping[str, str], body: Any = None) -> Optional[float]:
    """The wait a server asks for, in seconds (at most ``MAX_SERVER_WAIT_SECONDS``), or None when it says nothing usable."""
    wait = _requested_wait(headers, body)
    return None if wait is None else min(wait, MAX_SERVER_WAIT_SECONDS)


def _requested_wait(headers: Mapping[str, str], body: Any = None) -> Optional[float]:
    """The wait a server's answer asks for, uncapped: its retry hint, else the longer of OpenAI's resets."""
    wait = retry_hint(headers, body, time.time())
    if wait is not None:
        return wait
    resets = [parse_duration(headers.get(name)) for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")]
    # A reset beyond a minute is a budget's (Groq's requests per day), not the wait of a per-minute limit.
    known = [value for value in resets if value is not None and value <= 60.0]
    return max(known) if known else None


def backoff_seconds(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with jitter for retry number ``attempt`` (1 for the first retry).

    Returns a value between half and all of ``base * 2 ** (attempt - 1)``, at most ``cap``.
    """
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return ceiling / 2 + random.random() * ceiling / 2


def auth_headers(api_key: Optional[str], azure: bool) -> Dict[str, str]:
    """The request headers for a key: Bearer for OpenAI and compatibles, api-key for Azure."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        if azure:
            headers["api-key"] = api_key
        else:
            headers["Authorization"] = f"Bearer {api_key}"
    return headers


def check_api_key(api_key: Optional[str]) -> Optional[str]:
    """A key stripped of surrounding white space; None for none.

    Raises:
        ValueError: when the key holds characters an HTTP header cannot carry (the message never shows it).
    """
    if api_key is None:
        return None
    key = api_key.strip()
    if not key:
        return None
    bad = [char for char in key if not 0x21 <= ord(char) <= 0x7E]
    if bad:
        kinds = sorted({"a line break" if char in "\r\n" else "a space" if char == " " else
                        f"the character U+{ord(char):04X}" for char in bad})
        raise ValueError(f"the API key contains {', '.join(kinds)}, which an HTTP header cannot carry; "
                         "check how the key was set (a key file or secret with extra text?)")
    return key


def redact(text: str, secret: Optional[str]) -> str:
    """Remove a secret (and any long prefix of it that a server echoes) from a text."""
    if not secret or not text:
        return text
    text = text.replace(secret, "[REDACTED]")
    if len(secret) >= 12:
        text = text.replace(secret[:12], "[REDACTED]")
    return text


# Helpers


def _rate_limit_scope(kind: str, message: str) -> Optional[str]:
    """Which limit a 429 names: "requests", "tokens" or None."""
    if kind in ("requests", "tokens"):
        return kind
    lowered = message.lower()
    if "tokens per min" in lowered or "(tpm)" in lowered:
        return "tokens"
    if "requests per min" in lowered or "(rpm)" in lowered:
        return "requests"
    return None


def _number(text: Optional[str]) -> Optional[float]:
    """A header's number, or None."""
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _snippet(raw: bytes, limit: int = 200) -> str:
    """The start of a body, as text, for error messages."""
    return raw[:limit].decode("utf-8", "replace")
