"""An OpenAI-compatible test API server: chat, completions and embeddings, with real rate limits and faults.

The project's tests, demo and benchmark use it over a real socket on 127.0.0.1. It behaves
like the hosted API where that matters to a client:

    - ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/responses``. The Azure
      spelling ``/openai/deployments/{name}/...`` works too. Answers echo the request (the
      last user message, the prompt, the embedded text), so a test can tell that each result
      belongs to its own request. Usage counts tokens with tiktoken, like the real API.
    - Rate limits per minute, enforced in short fixed slices (``--slice-seconds``, 1 s by
      default), as hosted APIs may do. A request over the slice's allowance gets a 429
      ``rate_limit_exceeded`` with type ``requests`` or ``tokens``.
    - Rate-limit headers in the dialect of a real provider (``--dialect``), each as documented:
        * ``openai`` (default): ``x-ratelimit-*`` with the limit per minute, and remaining and
          reset describing a bucket that refills continuously over a minute (reset: until full);
        * ``window``: the same names, counted per slice (limit per slice, reset at its end), with
          ``retry-after-ms`` on 429, like a server enforcing 20 requests per 2 s;
        * ``azure``: only ``x-ratelimit-remaining-*`` per slice, ``retry-after-ms`` on 429;
        * ``groq``: ``x-ratelimit-*-requests`` state a daily budget (``--daily-requests``), the
          tokens per minute as OpenAI does; the request limit per minute is enforced, never stated;
        * ``anthropic``: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-*``
          with RFC 3339 resets (until full), ``retry-after`` on 429;
        * ``ietf``: ``RateLimit-Policy: "requests";q=N;w=S`` and ``RateLimit: "requests";r=N;t=S``;
          ``ietf-legacy``: ``RateLimit-Limit``/``-Remaining``/``-Reset``; ``x-ratelimit-window``:
          ``X-RateLimit-Limit: N, N;window=S`` with ``-Remaining``/``-Reset``;
        * ``none``: no headers; a 429 carries Gemini's ``retryDelay`` in its body.
    - Errors: 400 for a malformed body or a missing model, ``messages`` or ``input``; 404 for an
      unknown path or a model named ``unknown-*``; 401 for a wrong key when ``--api-key`` is
      set; 429 ``insufficient_quota`` after ``--quota-after`` requests.
    - Faults: ``--fault-rate`` answers that share of requests with a 500, a 503, a 502 whose
      body is HTML (unreadable as JSON), or a dropped connection. It also adds latency.
    - The Files and Batch API (``/v1/files``, ``/v1/batches``) on a time scale, with row faults,
      partial expiry and the enqueued-token cap: see ``tools.batch_test_api``.
    - ``GET /_stats`` reports what was received (counts by status, arrival times, the most
      requests accepted in any slice, bodies received more than once); ``POST /_reset`` clears it.

Usage:
    python -m tools.openai_test_server --port 8000 --rpm 6000 --tpm 2000000 --fault-rate 0.02

    >>> server = start_server_thread(ServerConfig(requests_per_minute=6000))
    >>> server.url            # 'http://127.0.0.1:PORT'
    >>> server.stats()["status_counts"]
    >>> server.stop()
"""

# Standard library imports
import argparse
import asyncio
import collections
import hashlib
import json
import math
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

# Third-party imports
from aiohttp import web

# Local application imports
from tasks.requests.token_estimation import load_encoding
from tools.batch_test_api import BatchTestApi


@dataclass
class ServerConfig:
    """How the test server behaves.

    Attributes:
        api_key: when set, requests must carry it (Bearer or api-key header).
        requests_per_minute: the request limit, or None for none.
        tokens_per_minute: the token limit (prompt plus max_tokens), or None for none.
        quota_after: after this many accepted requests, answer 429 insufficient_quota.
        slice_seconds: the length of the fixed slices the limits are enforced in.
        fault_rate: the share of requests answered with a fault (500, 503, 502 HTML, dropped).
        latency_seconds: added to every answer.
        latency_jitter_seconds: a random extra latency, up to this much.
        retry_after_seconds: when set, 429 answers carry ``retry-after-ms`` with this wait.
        seed: the seed of the fault and latency draws.
        model_limits: limits of their own for some models: {model: (requests_per_minute, tokens_per_minute)}.
        dialect: the rate-limit header dialect (see the module docstring).
        daily_requests: the daily request budget the ``groq`` dialect states and enforces.
        batch_rows_per_second: how fast a batch's rows are answered (``tools.batch_test_api``).
        batch_validating_seconds: how long a batch stays ``validating``.
        batch_row_fault_rate: the share of batch rows answered 500 in the error file.
        batch_expire_fraction: a batch expires once this share of its rows is done (None: never).
        batch_expire_count: only the first N batches expire (None: all of them).
        batch_queue_tokens: the cap on one model's enqueued input tokens (None: no cap).
        batch_create_lost_answers: the first N batch creations are made, but answered 502 (the answer lost).
        batch_cut_downloads: the first N downloads of a file's content stop half-way, mid-line.
    """

    api_key: Optional[str] = None
    requests_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None
    quota_after: Optional[int] = None
    slice_seconds: float = 1.0
    fault_rate: float = 0.0
    latency_seconds: float = 0.0
    latency_jitter_seconds: float = 0.0
    retry_after_seconds: Optional[float] = None
    seed: int = 0
    model_limits: Dict[str, Tuple[Optional[float], Optional[float]]] = field(default_factory=dict)
    dialect: str = "openai"
    daily_requests: Optional[int] = None
    batch_rows_per_second: float = 2000.0
    batch_validating_seconds: float = 0.2
    batch_row_fault_rate: float = 0.0
    batch_expire_fraction: Optional[float] = None
    batch_expire_count: Optional[int] = None
    batch_queue_tokens: Optional[int] = None
    batch_create_lost_answers: int = 0
    batch_cut_downloads: int = 0


DIALECTS = ("openai", "window", "azure", "groq", "anthropic", "ietf", "ietf-legacy", "x-ratelimit-window", "none")


@dataclass
class RefillingBucket:
    """A bucket that refills continuously over ``window`` seconds up to ``limit``: what OpenAI's headers describe."""

    limit: float
    window: float
    level: float
    at: float

    def spend(self, amount: float, now: float) -> None:
        """Refill up to now, then take ``amount``."""
        self.level = min(self.limit, self.level + (now - self.at) * self.limit / self.window) - amount
        self.at = now

    def remaining(self, now: float) -> float:
        """What is left now."""
        return max(0.0, min(self.limit, self.level + (now - self.at) * self.limit / self.window))

    def seconds_until_full(self, now: float) -> float:
        """The reset OpenAI states: how long until the bucket is full again."""
        return (self.limit - self.remaining(now)) * self.window / self.limit


@dataclass
class ServerStats:
    """What the server has received."""

    status_counts: collections.Counter = field(default_factory=collections.Counter)
    arrivals: List[float] = field(default_factory=list)
    accepted_arrivals: List[float] = field(default_factory=list)
    bodies: collections.Counter = field(default_factory=collections.Counter)
    answered_bodies: collections.Counter = field(default_factory=collections.Counter)
    max_accepted_in_slice: int = 0
    max_accepted_in_slice_by_model: Dict[str, int] = field(default_factory=dict)
    accepted_arrivals_by_model: Dict[str, List[float]] = field(default_factory=dict)
    tokens_charged: int = 0
    rate_limited_by: collections.Counter = field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> Dict[str, Any]:
        """A JSON view of the stats."""
        accepted = self.accepted_arrivals
        span = (accepted[-1] - accepted[0]) if len(accepted) > 1 else 0.0
        return {
            "requests": len(self.arrivals),
            "status_counts": {str(status): count for status, count in sorted(self.status_counts.items())},
            "rate_limited": self.status_counts.get(429, 0),
            "accepted": len(accepted),
            "accepted_span_seconds": span,
            "accepted_per_minute": (len(accepted) - 1) * 60.0 / span if span > 0 else 0.0,
            "steady_per_minute": _per_minute(accepted[len(accepted) // 10: len(accepted) - len(accepted) // 10]),
            "first_arrival": self.arrivals[0] if self.arrivals else None,
            "last_arrival": self.arrivals[-1] if self.arrivals else None,
            "max_accepted_in_slice": self.max_accepted_in_slice,
            "max_accepted_in_slice_by_model": dict(self.max_accepted_in_slice_by_model),
            "accepted_per_minute_by_model": {model: _per_minute(times) for model, times in self.accepted_arrivals_by_model.items()},
            "bodies_received_more_than_once": sum(1 for count in self.bodies.values() if count > 1),
            "bodies_answered_more_than_once": sum(1 for count in self.answered_bodies.values() if count > 1),
            "answered": sum(self.answered_bodies.values()),
            "tokens_charged": self.tokens_charged,
            "rate_limited_by": dict(self.rate_limited_by),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


class OpenAITestServer:
    """The request handlers and the limit bookkeeping of the test server."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stats = ServerStats()
        self._random = random.Random(config.seed)
        self._slices: Dict[str, List[float]] = {}  # limit key -> [slice id, requests, tokens]
        self._buckets: Dict[Tuple[str, str], RefillingBucket] = {}  # (limit key, scope) -> the stated bucket
        self._accepted_total = 0
        self.batch_api = BatchTestApi(self)
        if config.dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {config.dialect!r}; one of {', '.join(DIALECTS)}")

    def build_app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=256 * 1024 * 1024)  # batch input files are up to 200 MB
        for endpoint in ("chat/completions", "completions", "embeddings", "responses"):
            app.router.add_post(f"/v1/{endpoint}", self._handle)
            app.router.add_post(f"/openai/deployments/{{deployment}}/{endpoint}", self._handle)
        self.batch_api.add_routes(app)
        app.router.add_get("/_stats", self._stats)
        app.router.add_post("/_reset", self._reset)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one API request."""
        now = time.monotonic()
        self.stats.arrivals.append(now)
        raw = await request.read()
        body_hash = hashlib.sha1(raw).hexdigest()
        self.stats.bodies[body_hash] += 1
        endpoint = _endpoint_of_path(request.path)
        if self.config.api_key and not _has_key(request, self.config.api_key):
            return self._error(401, "invalid_request_error", "invalid_api_key",
                               f"Incorrect API key provided: {_masked(request)}.")
        try:
            body = json.loads(raw)
        except ValueError:
            return self._error(400, "invalid_request_error", None, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return self._error(400, "invalid_request_error", None, "The request body must be a JSON object.")
        model = body.get("model") or request.match_info.get("deployment")
        if not isinstance(model, str) or not model:
            return self._error(400, "invalid_request_error", None, "you must provide a model parameter")
        if model.startswith("unknown-"):
            return self._error(404, "invalid_request_error", "model_not_found",
                               f"The model `{model}` does not exist or you do not have access to it.")
        problem = _validate(endpoint, body)
        if problem:
            return self._error(400, "invalid_request_error", None, problem)
        prompt_tokens, completion_tokens = _usage(endpoint, body, model)
        charged = prompt_tokens + _requested_completion(endpoint, body)
        limited = self._admit(now, charged, model)
        if limited is not None:
            return limited
        if self.config.quota_after is not None and self._accepted_total > self.config.quota_after:
            return self._error(429, "insufficient_quota", "insufficient_quota",
                               "You exceeded your current quota, please check your plan and billing details.")
        await self._delay()
        fault = self._draw_fault()
        if fault == "drop":
            self.stats.status_counts[0] += 1  # 0 stands for "connection dropped"
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if fault == "502":
            return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        if fault in ("500", "503"):
            return self._error(int(fault), "server_error", None, "The server had an error while processing your request.")
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        self.stats.answered_bodies[_body_key(body)] += 1
        return web.json_response(_answer(endpoint, body, model, prompt_tokens, completion_tokens),
                                 headers=self._limit_headers(now, model))

    def stats_view(self) -> Dict[str, Any]:
        """What ``/_stats`` reports: the online stats, and the Batch API's under ``batches``."""
        return dict(self.stats.as_dict(), batches=self.batch_api.stats_view())

    def answer_batch_line(self, path: str, body: Any) -> Tuple[int, Dict[str, Any]]:
        """Answer one Batch API request line (its own rate-limit pool: no limits, no faults): (status, body).

        Its usage is counted in the stats, and its body as answered (``bodies_answered_more_than_once``
        covers online and batch answers alike).
        """
        endpoint = _endpoint_of_path(path)
        if not isinstance(body, dict):
            return 400, {"error": {"message": "The request body must be a JSON object.", "type": "invalid_request_error",
                                   "param": None, "code": None}}
        model = body.get("model")
        problem = None if isinstance(model, str) and model else "you must provide a model parameter"
        if problem is None and model.startswith("unknown-"):
            return 404, {"error": {"message": f"The model `{model}` does not exist or you do not have access to it.",
                                   "type": "invalid_request_error", "param": None, "code": "model_not_found"}}
        problem = problem or _validate(endpoint, body)
        if problem:
            return 400, {"error": {"message": problem, "type": "invalid_request_error", "param": None, "code": None}}
        prompt_tokens, completion_tokens = _usage(endpoint, body, model)
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        self.stats.answered_bodies[_body_key(body)] += 1
        return 200, _answer(endpoint, body, model, prompt_tokens, completion_tokens)

    def queued_tokens_of(self, path: str, body: Any) -> int:
        """The tokens one batch line adds to its model's enqueued tokens: its input tokens."""
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return 0
        try:
            return _usage(_endpoint_of_path(path), body, body["model"])[0]
        except Exception:  # an invalid body is answered 400 later; it queues nothing
            return 0

    def _limits_of(self, model: str) -> Tuple[str, Optional[float], Optional[float]]:
        """The key and (RPM, TPM) limits a model's requests count against."""
        if model in self.config.model_limits:
            rpm, tpm = self.config.model_limits[model]
            return model, rpm, tpm
        return "", self.config.requests_per_minute, self.config.tokens_per_minute

    def _slice(self, key: str, now: float) -> List[float]:
        """The current slice's counters of a limit key: [slice id, requests, tokens]."""
        slice_id = math.floor(now / self.config.slice_seconds)
        current = self._slices.get(key)
        if current is None or current[0] != slice_id:
            current = self._slices[key] = [slice_id, 0, 0]
        return current

    def _admit(self, now: float, tokens: int, model: str) -> Optional[web.Response]:
        """Count a request against its limits' current slice, or answer 429 when it does not fit."""
        key, rpm, tpm = self._limits_of(model)
        current = self._slice(key, now)
        request_allowance, token_allowance = self._allowances(rpm, tpm)
        if self.config.daily_requests is not None and self._accepted_total >= self.config.daily_requests:
            return self._rate_limited("requests", now, model, per="day")
        if current[1] + 1 > request_allowance:
            return self._rate_limited("requests", now, model)
        if current[2] + tokens > token_allowance:
            return self._rate_limited("tokens", now, model)
        current[1] += 1
        current[2] += tokens
        for scope, limit, amount in (("requests", rpm, 1), ("tokens", tpm, tokens)):
            if limit:
                self._bucket(key, scope, limit, 60.0, now).spend(amount, now)
        if self.config.daily_requests is not None:
            self._bucket(key, "day", float(self.config.daily_requests), 86400.0, now).spend(1, now)
        self._accepted_total += 1
        self.stats.tokens_charged += tokens
        self.stats.accepted_arrivals.append(now)
        self.stats.accepted_arrivals_by_model.setdefault(model, []).append(now)
        self.stats.max_accepted_in_slice = max(self.stats.max_accepted_in_slice, int(current[1]))
        by_model = self.stats.max_accepted_in_slice_by_model
        by_model[model] = max(by_model.get(model, 0), int(current[1]))
        return None

    def _allowances(self, rpm: Optional[float], tpm: Optional[float]) -> Tuple[float, float]:
        """How many requests and tokens one slice allows."""
        share = self.config.slice_seconds / 60.0
        return (rpm * share if rpm else math.inf), (tpm * share if tpm else math.inf)

    def _rate_limited(self, scope: str, now: float, model: str, per: str = "min") -> web.Response:
        """A 429 in OpenAI's words, naming the limit that was hit, with the dialect's wait hint."""
        _, rpm, tpm = self._limits_of(model)
        limit = self.config.daily_requests if per == "day" else rpm if scope == "requests" else tpm
        unit = {("requests", "min"): "requests per min (RPM)", ("tokens", "min"): "tokens per min (TPM)",
                ("requests", "day"): "requests per day (RPD)"}[(scope, per)]
        message = f"Rate limit reached for {model} in organization org-test on {unit}: Limit {limit or 0:.0f}."
        self.stats.rate_limited_by[f"{scope} per {per}"] += 1
        headers = self._limit_headers(now, model)
        until_slice_end = self._slice_end(now) - now
        dialect = self.config.dialect
        if per == "day":
            headers["retry-after"] = str(math.ceil(86400.0 / float(self.config.daily_requests or 1)))
        elif self.config.retry_after_seconds is not None:
            headers["retry-after-ms"] = str(int(self.config.retry_after_seconds * 1000))
        elif dialect in ("window", "azure"):
            headers["retry-after-ms"] = str(max(1, math.ceil(until_slice_end * 1000)))
        elif dialect in ("anthropic", "ietf", "ietf-legacy", "x-ratelimit-window", "groq"):
            headers["retry-after"] = str(max(1, math.ceil(until_slice_end)))
        response = self._error(429, scope, "rate_limit_exceeded", message, headers)
        if dialect == "none":  # Gemini: the wait is in the body, in RetryInfo
            body = {"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED", "details": [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{max(1, math.ceil(until_slice_end))}s"}]}}
            response = web.json_response(body, status=429)
        return response

    def _bucket(self, key: str, scope: str, limit: float, window: float, now: float) -> RefillingBucket:
        """The continuously refilling bucket a dialect's headers describe, made full on first use."""
        bucket = self._buckets.get((key, scope))
        if bucket is None or bucket.limit != limit:
            bucket = self._buckets[(key, scope)] = RefillingBucket(limit, window, limit, now)
        return bucket

    def _slice_end(self, now: float) -> float:
        """When the current slice ends."""
        return (math.floor(now / self.config.slice_seconds) + 1) * self.config.slice_seconds

    def _limit_headers(self, now: float, model: str) -> Dict[str, str]:
        """The rate-limit headers of the configured dialect for the model's limits."""
        headers: Dict[str, str] = {"x-request-id": f"req_{self._random.getrandbits(64):016x}"}
        key, rpm, tpm = self._limits_of(model)
        current = self._slice(key, now)
        request_allowance, token_allowance = self._allowances(rpm, tpm)
        in_slice = {"requests": (rpm, request_allowance, request_allowance - current[1]),
                    "tokens": (tpm, token_allowance, token_allowance - current[2])}
        until_end = self._slice_end(now) - now
        window = self.config.slice_seconds
        dialect = self.config.dialect
        for scope, (per_minute, allowance, left) in in_slice.items():
            if not per_minute:
                continue
            left = max(0.0, left)
            if dialect in ("openai", "groq") and not (dialect == "groq" and scope == "requests"):
                bucket = self._bucket(key, scope, per_minute, 60.0, now)
                headers[f"x-ratelimit-limit-{scope}"] = str(int(per_minute))
                headers[f"x-ratelimit-remaining-{scope}"] = str(int(bucket.remaining(now)))
                headers[f"x-ratelimit-reset-{scope}"] = _go_duration(bucket.seconds_until_full(now))
            elif dialect == "window":
                headers[f"x-ratelimit-limit-{scope}"] = str(int(allowance))
                headers[f"x-ratelimit-remaining-{scope}"] = str(int(left))
                headers[f"x-ratelimit-reset-{scope}"] = _go_duration(until_end)
            elif dialect == "azure":
                headers[f"x-ratelimit-remaining-{scope}"] = str(int(left))
            elif dialect == "anthropic":
                bucket = self._bucket(key, scope, per_minute, 60.0, now)
                full_at = time.time() + bucket.seconds_until_full(now)
                names = ("requests",) if scope == "requests" else ("tokens", "input-tokens", "output-tokens")
                for name in names:
                    headers[f"anthropic-ratelimit-{name}-limit"] = str(int(per_minute))
                    headers[f"anthropic-ratelimit-{name}-remaining"] = str(int(bucket.remaining(now)))
                    headers[f"anthropic-ratelimit-{name}-reset"] = _rfc3339(full_at)
            elif dialect == "ietf":
                policy = f'"{scope}";q={int(allowance)};w={window:g}'
                state = f'"{scope}";r={int(left)};t={math.ceil(until_end)}'
                headers["RateLimit-Policy"] = ", ".join(filter(None, [headers.get("RateLimit-Policy"), policy]))
                headers["RateLimit"] = ", ".join(filter(None, [headers.get("RateLimit"), state]))
            elif dialect == "ietf-legacy" and scope == "requests":
                headers["RateLimit-Limit"] = str(int(allowance))
                headers["RateLimit-Remaining"] = str(int(left))
                headers["RateLimit-Reset"] = str(math.ceil(until_end))
            elif dialect == "x-ratelimit-window" and scope == "requests":
                headers["X-RateLimit-Limit"] = f"{int(allowance)}, {int(allowance)};window={window:g}"
                headers["X-RateLimit-Remaining"] = str(int(left))
                headers["X-RateLimit-Reset"] = str(math.ceil(until_end))
        if dialect == "groq" and self.config.daily_requests is not None:
            day = self._bucket(key, "day", float(self.config.daily_requests), 86400.0, now)
            headers["x-ratelimit-limit-requests"] = str(self.config.daily_requests)
            headers["x-ratelimit-remaining-requests"] = str(int(day.remaining(now)))
            headers["x-ratelimit-reset-requests"] = _go_duration(day.seconds_until_full(now))
        return headers

    async def _delay(self) -> None:
        """Wait the configured latency."""
        latency = self.config.latency_seconds
        if self.config.latency_jitter_seconds:
            latency += self._random.random() * self.config.latency_jitter_seconds
        if latency > 0:
            await asyncio.sleep(latency)

    def _draw_fault(self) -> Optional[str]:
        """Decide whether this request gets a fault, and which."""
        if self.config.fault_rate <= 0 or self._random.random() >= self.config.fault_rate:
            return None
        return self._random.choice(["500", "503", "502", "drop"])

    def _error(self, status: int, kind: str, code: Optional[str], message: str,
               headers: Optional[Dict[str, str]] = None) -> web.Response:
        """An error answer in OpenAI's shape."""
        self.stats.status_counts[status] += 1
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return web.json_response(body, status=status, headers=headers)

    async def _not_found(self, request: web.Request) -> web.Response:
        """Any other path."""
        if request.path.startswith("/_"):
            raise web.HTTPNotFound()
        self.stats.arrivals.append(time.monotonic())
        return self._error(404, "invalid_request_error", None, f"Invalid URL ({request.method} {request.path})")

    async def _stats(self, request: web.Request) -> web.Response:
        """GET /_stats."""
        return web.json_response(self.stats_view())

    async def _reset(self, request: web.Request) -> web.Response:
        """POST /_reset."""
        self.stats = ServerStats()
        self._accepted_total = 0
        return web.json_response({"ok": True})


SERVER_KEY = web.AppKey("server", OpenAITestServer)


@web.middleware
async def _count_successes(request: web.Request, handler: Any) -> web.StreamResponse:
    """Count 2xx answers (errors are counted where they are made)."""
    response = await handler(request)
    if 200 <= response.status < 300 and not request.path.startswith("/_"):
        request.app[SERVER_KEY].stats.status_counts[response.status] += 1
    elif response.status == 502:
        request.app[SERVER_KEY].stats.status_counts[502] += 1
    return response


@dataclass
class RunningServer:
    """A test server running on its own thread and event loop."""

    url: str
    server: OpenAITestServer
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _runner: web.AppRunner

    def stats(self) -> Dict[str, Any]:
        """The server's stats (read on its own loop)."""
        return asyncio.run_coroutine_threadsafe(_call(self.server.stats_view), self._loop).result(10)

    def reset(self) -> None:
        """Clear the stats."""
        async def clear() -> None:
            self.server.stats = ServerStats()
            self.server._accepted_total = 0
        asyncio.run_coroutine_threadsafe(clear(), self._loop).result(10)

    def stop(self) -> None:
        """Stop the server and its thread."""
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def build_application(config: ServerConfig) -> Tuple[web.Application, OpenAITestServer]:
    """Build the aiohttp application and its server object.

    Both encodings are loaded here, before the first request: loading one takes about a second,
    and doing it inside the first request's handler would stall the server's loop, so that the
    requests queued meanwhile would all be counted in one slice.
    """
    load_encoding("o200k_base")
    load_encoding("cl100k_base")
    server = OpenAITestServer(config)
    app = server.build_app()
    app.middlewares.append(_count_successes)
    app[SERVER_KEY] = server
    return app, server


def start_server_thread(config: ServerConfig, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Start a test server on a thread of its own; ``port=0`` picks a free port."""
    loop = asyncio.new_event_loop()
    app, server = build_application(config)
    runner = web.AppRunner(app, access_log=None)
    ready = threading.Event()
    holder: Dict[str, Any] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, host, port)
            loop.run_until_complete(site.start())
            holder["port"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        except BaseException as error:  # report start-up failures to the caller
            holder["error"] = error
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="openai-test-server", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in holder:
        raise holder["error"]
    return RunningServer(f"http://{host}:{holder['port']}", server, loop, thread, runner)


def parse_arguments() -> argparse.Namespace:
    """Command-line options of the standalone server."""
    parser = argparse.ArgumentParser(description="An OpenAI-compatible test API server with rate limits and faults.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--rpm", type=float, default=None, help="requests per minute allowed (default: no limit)")
    parser.add_argument("--tpm", type=float, default=None, help="tokens per minute allowed (default: no limit)")
    parser.add_argument("--slice-seconds", type=float, default=1.0, help="slice the limits are enforced in (default: 1)")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of requests that get a fault (default: 0)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer (default: 0)")
    parser.add_argument("--latency-jitter", type=float, default=0.0, help="random extra latency, up to (default: 0)")
    parser.add_argument("--api-key", default=None, help="require this key (default: no key needed)")
    parser.add_argument("--quota-after", type=int, default=None, help="answer insufficient_quota after N requests")
    parser.add_argument("--retry-after", type=float, default=None, help="send retry-after-ms on 429 answers (seconds)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault and latency draws (default: 0)")
    parser.add_argument("--dialect", default="openai", choices=DIALECTS,
                        help="rate-limit header dialect (default: %(default)s; see the module docstring)")
    parser.add_argument("--daily-requests", type=int, default=None,
                        help="a daily request budget (stated by the groq dialect, enforced by all)")
    parser.add_argument("--batch-rows-per-second", type=float, default=2000.0,
                        help="how fast batch rows are answered (default: %(default)s)")
    parser.add_argument("--batch-row-fault-rate", type=float, default=0.0, help="share of batch rows answered 500")
    parser.add_argument("--batch-expire-fraction", type=float, default=None,
                        help="batches expire once this share of their rows is done (default: never)")
    parser.add_argument("--batch-expire-count", type=int, default=None, help="only the first N batches expire")
    parser.add_argument("--batch-queue-tokens", type=int, default=None,
                        help="cap on one model's enqueued batch input tokens (default: none)")
    parser.add_argument("--batch-create-lost-answers", type=int, default=0,
                        help="the first N batch creations are made but answered 502, as if the answer was lost")
    parser.add_argument("--batch-cut-downloads", type=int, default=0,
                        help="the first N downloads of a file's content stop half-way, mid-line")
    parser.add_argument("--port-file", default=None, help="write the chosen port to this file once listening")
    return parser.parse_args()


async def serve_forever(args: argparse.Namespace) -> None:
    """Run the standalone server until interrupted."""
    config = ServerConfig(requests_per_minute=args.rpm, tokens_per_minute=args.tpm, slice_seconds=args.slice_seconds,
                          fault_rate=args.fault_rate, latency_seconds=args.latency,
                          latency_jitter_seconds=args.latency_jitter, api_key=args.api_key,
                          quota_after=args.quota_after, retry_after_seconds=args.retry_after, seed=args.seed,
                          dialect=args.dialect, daily_requests=args.daily_requests,
                          batch_rows_per_second=args.batch_rows_per_second, batch_row_fault_rate=args.batch_row_fault_rate,
                          batch_expire_fraction=args.batch_expire_fraction, batch_expire_count=args.batch_expire_count,
                          batch_queue_tokens=args.batch_queue_tokens,
                          batch_create_lost_answers=args.batch_create_lost_answers,
                          batch_cut_downloads=args.batch_cut_downloads)
    app, _ = build_application(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    if args.port_file:
        with open(args.port_file, "w") as handle:
            handle.write(str(port))
    print(f"OpenAI test server listening on http://{args.host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


# Helpers


async def _call(function: Any) -> Any:
    """Run a plain function on the server's loop."""
    return function()


def _go_duration(seconds: float) -> str:
    """A duration the way OpenAI writes it: "12ms", "1.379s", "6m0s"."""
    if seconds < 1.0:
        return f"{int(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60.0)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def _rfc3339(epoch: float) -> str:
    """An RFC 3339 time in UTC, to the second, as Anthropic sends it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(epoch)))


def _per_minute(times: List[float]) -> float:
    """The rate of a list of arrival times, per minute."""
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return (len(times) - 1) * 60.0 / span if span > 0 else 0.0


# The endpoint each request path ends with ("/completions" is the rest).
_ENDPOINT_SUFFIXES = (("/chat/completions", "chat"), ("/embeddings", "embeddings"), ("/responses", "responses"))


def _endpoint_of_path(path: str) -> str:
    """"chat", "completions", "embeddings" or "responses" from a request path."""
    return next((name for suffix, name in _ENDPOINT_SUFFIXES if path.endswith(suffix)), "completions")


def _body_key(body: Dict[str, Any]) -> str:
    """A body's identity for "answered more than once": the same request online or in a batch line."""
    return hashlib.sha1(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _has_key(request: web.Request, key: str) -> bool:
    """True when the request carries the key, as Bearer or api-key."""
    return request.headers.get("Authorization") == f"Bearer {key}" or request.headers.get("api-key") == key


def _masked(request: web.Request) -> str:
    """The presented key masked the way OpenAI masks it in 401 messages."""
    presented = request.headers.get("api-key") or request.headers.get("Authorization", "").removeprefix("Bearer ")
    return f"{presented[:3]}*****{presented[-4:]}" if len(presented) > 8 else "*****"


def _validate(endpoint: str, body: Dict[str, Any]) -> Optional[str]:
    """A 400 message for an invalid body, or None."""
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' is a required property and must be a non-empty array"
        if not all(isinstance(message, dict) and "role" in message for message in messages):
            return "each message must be an object with a 'role'"
    elif endpoint == "embeddings":
        if body.get("input") in (None, "", []):
            return "'input' is a required property"
    elif endpoint == "responses":
        value = body.get("input")
        if value in (None, "", []):
            return "'input' is a required property"
        if not isinstance(value, (str, list)) or (isinstance(value, list) and not all(
                isinstance(item, dict) and ("role" in item or "type" in item) for item in value)):
            return "Invalid 'input': expected a string or an array of input items"
        if body.get("instructions") is not None and not isinstance(body["instructions"], str):
            return "Invalid 'instructions': expected a string"
    elif body.get("prompt") is None:
        return "'prompt' is a required property"
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens", "n"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or value < (1 if name == "n" else 0)):
            return f"Invalid '{name}': {value!r}"
    return None


def _encoding_for(model: str) -> Any:
    """The tokenizer the real API uses for a model."""
    modern = model.startswith(("gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4", "chatgpt-4o"))
    return load_encoding("o200k_base" if modern else "cl100k_base")


def _text_tokens(value: Any, encoding: Any) -> int:
    """Tokens of a string, a list of strings, or token arrays."""
    if isinstance(value, str):
        return len(encoding.encode_ordinary(value))
    if isinstance(value, list):
        if all(isinstance(item, int) for item in value):
            return len(value)
        return sum(_text_tokens(item, encoding) for item in value)
    return 0 if value is None else len(encoding.encode_ordinary(json.dumps(value)))


def _content_text(content: Any) -> str:
    """The text of a message's content (string or parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content
                        if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"))
    return ""


def _responses_messages(body: Dict[str, Any]) -> List[Dict[str, Any]]:
    """A Responses body as chat messages: instructions as a system message, a string input as a user one."""
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    value = body.get("input")
    if isinstance(value, str):
        return messages + [{"role": "user", "content": value}]
    for item in value or []:
        if "role" in item:
            messages.append({"role": item["role"], "content": item.get("content")})
        else:  # a tool call or its output: counted as its JSON
            messages.append({"role": "tool", "content": json.dumps(item, separators=(",", ":"))})
    return messages


def _echo(endpoint: str, body: Dict[str, Any]) -> str:
    """What the answer says: an echo of the request."""
    if endpoint in ("chat", "responses"):
        messages = _responses_messages(body) if endpoint == "responses" else body["messages"]
        users = [m for m in messages if m.get("role") == "user"] or messages
        return "echo: " + _content_text(users[-1].get("content"))[:500]
    prompt = body.get("prompt")
    return "echo: " + (prompt if isinstance(prompt, str) else json.dumps(prompt))[:500]


def _usage(endpoint: str, body: Dict[str, Any], model: str) -> Tuple[int, int]:
    """Prompt and completion tokens, counted the way the API counts them."""
    encoding = _encoding_for(model)
    if endpoint == "embeddings":
        return _text_tokens(body.get("input"), encoding), 0
    if endpoint == "completions":
        prompt = _text_tokens(body.get("prompt"), encoding)
    else:
        prompt = 3
        for message in _responses_messages(body) if endpoint == "responses" else body["messages"]:
            prompt += 3
            for key, value in message.items():
                text = _content_text(value) if key == "content" else value
                prompt += _text_tokens(text, encoding) + (1 if key == "name" else 0)
        if endpoint == "responses" and body.get("tools"):
            prompt += _text_tokens(json.dumps(body["tools"], separators=(",", ":")), encoding)
    cap = body.get("max_output_tokens") or body.get("max_completion_tokens") or body.get("max_tokens") or 10_000
    completion = min(cap, len(encoding.encode_ordinary(_echo(endpoint, body)))) * (body.get("n") or 1)
    return prompt, completion


def _requested_completion(endpoint: str, body: Dict[str, Any]) -> int:
    """The completion tokens a request reserves against the token limit."""
    if endpoint == "embeddings":
        return 0
    cap = body.get("max_output_tokens") or body.get("max_completion_tokens") or body.get("max_tokens") or 16
    return cap * (body.get("n") or 1)


def _answer(endpoint: str, body: Dict[str, Any], model: str, prompt_tokens: int, completion_tokens: int) -> Dict[str, Any]:
    """A successful answer in OpenAI's shape."""
    created = int(time.time())
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if endpoint == "embeddings":
        inputs = body["input"] if isinstance(body["input"], list) and not all(isinstance(i, int) for i in body["input"]) else [body["input"]]
        data = [{"object": "embedding", "index": index, "embedding": _vector(item)} for index, item in enumerate(inputs)]
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
    text = _echo(endpoint, body)
    choices = body.get("n") or 1
    if endpoint == "responses":
        return {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": created, "status": "completed",
                "model": model, "output": [{"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "completed",
                                            "role": "assistant",
                                            "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                "usage": {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": prompt_tokens + completion_tokens}}
    if endpoint == "chat":
        return {"id": f"chatcmpl-{created}", "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                            for i in range(choices)], "usage": usage}
    return {"id": f"cmpl-{created}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "finish_reason": "stop"} for i in range(choices)], "usage": usage}


def _vector(item: Any) -> List[float]:
    """A small deterministic embedding of an input."""
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    return [round(byte / 255.0, 4) for byte in digest[:8]]


if __name__ == "__main__":
    try:
        asyncio.run(serve_forever(parse_arguments()))
    except KeyboardInterrupt:
        pass
