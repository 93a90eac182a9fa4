"""Sending one request until it is settled: the retry loop, on a capacity the engine granted.

For one request whose first capacity is granted, ``RequestSender.send`` tries it until it
succeeds, fails for good, or the run stops:
    - success: its usage is counted (tokens, cost), the unused part of its token estimate goes
      back to the engine, and the answer is written;
    - 429: the engine slows down, the request waits for the server's hint (or backs off) and asks
      for capacity again, up to ``MAX_RATE_LIMIT_WAITS`` times;
    - 400/404/422 (INVALID): written at once as that row's error;
    - 5xx, 408/409, resets and timeouts: retried with exponential backoff and jitter, up to
      ``max_attempts``;
    - a request that no longer fits the token limit learned meanwhile: that row's error, decided here;
    - ``insufficient_quota``, 401/403 (STOP): the whole run stops sending.
Whatever happens, the budget is settled with this request's own cost.

Usage:
    >>> sender = RequestSender(context, tracker, recorder, logger, shard_label)
    >>> await sender.send(request, lane, tokens, line_bytes, reserved_usd)
"""

# Standard library imports
import asyncio
import time
from typing import Any, NamedTuple, Optional

# Local application imports
from tasks.api.api_client import ApiResult, Outcome, backoff_seconds
from tasks.limits.learned_limits import RequestNeverFits
from tasks.limits.rate_limiter import Lane
from tasks.limits.redis_engine import LimiterUnavailable
from tasks.reporting.metrics import StatusTracker
from tasks.requests.request_formats import ParsedRequest
from tasks.shards.row_results import ResultRecorder, RowResult
from tasks.shards.run_state import RunContext

# How many 429 answers one request may wait out before it is failed.
MAX_RATE_LIMIT_WAITS = 50


class Usage(NamedTuple):
    """The tokens an answer says it used (0 where it does not say).

    Chat, completions and embeddings report ``prompt_tokens``/``completion_tokens``; the Responses
    API reports ``input_tokens``/``output_tokens``. Both are read.

    Attributes:
        prompt_tokens, completion_tokens: as reported (input and output tokens for the Responses API).
        total_tokens: as reported, else their sum.
    """

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, body: Any) -> Optional["Usage"]:
        """The usage of an answer's body, or None when it reports none."""
        usage = body.get("usage") if type(body) is dict else None
        if type(usage) is not dict:
            return None
        prompt = usage.get("prompt_tokens")
        if prompt is None:
            prompt = usage.get("input_tokens")
        completion = usage.get("completion_tokens")
        if completion is None:
            completion = usage.get("output_tokens")
        prompt = prompt if isinstance(prompt, int) else 0
        completion = completion if isinstance(completion, int) else 0
        total = usage.get("total_tokens")
        return cls(prompt, completion, total if isinstance(total, int) else prompt + completion)


class RequestSender:
    """The retry loop of a shard's requests."""

    def __init__(self, context: RunContext, tracker: StatusTracker, recorder: ResultRecorder, logger: Any,
                 label: str) -> None:
        self.context = context
        self.tracker = tracker
        self.recorder = recorder
        self.logger = logger
        self.label = label

    async def send(self, request: ParsedRequest, lane: Lane, tokens: int, line_bytes: int,
                   reserved_usd: float) -> None:
        """Send a request whose first capacity is granted until it is settled; settle its budget."""
        spent = 0.0
        try:
            if self.context.stop.stopped:  # stopped while it waited for its slot
                lane.release(tokens)
                self.tracker.not_sent += 1
                return
            spent = await self._attempts(request, lane, tokens, line_bytes)
        except Exception as error:  # a bug must cost one row, never the shard
            self.logger.exception("%s line +%d: unexpected error", self.label, request.line_index)
            self.tracker.failed_after_retries += 1
            self.recorder.record(request, line_bytes, RowResult.internal_error(error, sent=True))
        finally:
            self.context.budget.settle(reserved_usd, spent)  # its own cost, whatever else finished meanwhile

    async def _attempts(self, request: ParsedRequest, lane: Lane, tokens: int, line_bytes: int) -> float:
        """Note the row as sent, try its request until it is settled; return what its answer cost.

        The capacity the request holds goes back whatever happens (with its answer, or on an error before).
        """
        context, tracker = self.context, self.tracker
        live = context.progress.live
        errors = []
        failed_attempts = rate_limit_waits = 0
        holds_capacity = True
        try:
            self.recorder.sent(request)
            while True:
                if not holds_capacity:
                    try:
                        capacity = await self._capacity_again(lane, tokens)
                    except RequestNeverFits as error:  # the limit learned meanwhile is below this request
                        tracker.failed_too_large += 1
                        self.recorder.record(request, line_bytes,
                                             RowResult.local_error("request_too_large", str(error)))
                        return 0.0
                    if not capacity:
                        tracker.not_sent += 1
                        return 0.0
                    holds_capacity = True
                # Every answer so far, and this row's "sent" record, on disk before it leaves (one write
                # for all the requests of this turn).
                try:
                    await context.turn_writes.written()
                except OSError as error:  # nothing can be recorded (a full disk): it does not leave, and
                    tracker.not_sent += 1  # with no final record the next run decides it
                    self.logger.error("%s line +%d: not sent, its part file cannot be written: %s", self.label,
                                      request.line_index, error)
                    return 0.0
                tracker.note_request_sent()
                live.sent()
                started = time.monotonic()
                try:
                    result = await context.client.send(request.method, request.url, request.payload)
                finally:
                    lane.release(tokens)
                    holds_capacity = False
                seconds = time.monotonic() - started
                tracker.note_response()
                if result.status is not None:  # follow the server's rate-limit headers, and whether it was a 429
                    lane.observe(result.limits, result.outcome is Outcome.RATE_LIMITED)
                if result.outcome is Outcome.SUCCESS:
                    return self._succeeded(request, line_bytes, result, seconds)
                live.answered(request.model, seconds, result.outcome is Outcome.RATE_LIMITED)
                errors.append(result.error or "unknown error")
                context.errors.note(result.error or "unknown error")
                if result.outcome is Outcome.STOP:
                    context.stop.stop(result.error or "stopped")
                    self.logger.error("Stopping the run: %s (%s line +%d)", result.error, self.label,
                                      request.line_index)
                    tracker.not_sent += 1
                    return 0.0
                wait = None
                if result.outcome is Outcome.RATE_LIMITED:
                    tracker.rate_limited += 1
                    rate_limit_waits += 1
                    exhausted = lane.budget_exhausted()
                    if exhausted:  # a daily budget, not a rate: stop like insufficient_quota, results kept
                        if not context.stop.stopped:
                            self.logger.error("Stopping the run: %s", exhausted)
                        context.stop.stop(exhausted)
                        tracker.not_sent += 1
                        return 0.0
                    scope = result.rate_limit_scope
                    lane.slow_down(requests=scope != "tokens", tokens=scope != "requests", wait=result.retry_after)
                    if rate_limit_waits <= MAX_RATE_LIMIT_WAITS:
                        wait = (result.retry_after if result.retry_after is not None
                                else backoff_seconds(rate_limit_waits, 1.0))
                        tracker.note_retry("rate_limited")
                        live.retried()
                elif result.outcome is Outcome.INVALID:
                    tracker.failed_invalid_request += 1
                    return self._failed(request, line_bytes, result, errors)
                else:
                    failed_attempts += 1
                    if failed_attempts < context.settings.max_attempts:
                        wait = max(result.retry_after or 0.0,
                                   backoff_seconds(failed_attempts, context.settings.retry_base_seconds))
                        tracker.note_retry(result.cause or "error")
                        live.retried()
                if wait is None:
                    tracker.failed_after_retries += 1
                    return self._failed(request, line_bytes, result, errors)
                self.logger.debug("%s line +%d: %s, trying again in %.2f s", self.label, request.line_index,
                                  result.error, wait)
                await asyncio.sleep(wait)
        finally:
            if holds_capacity:  # an error before the request left (a full disk, a bug): its capacity goes back
                lane.release(tokens)

    async def _capacity_again(self, lane: Lane, tokens: int) -> bool:
        """Wait for capacity for another attempt; False when the run stopped (nothing is held then)."""
        if self.context.stop.stopped:
            return False
        started = time.monotonic()
        try:
            await lane.acquire(tokens)
            self.context.progress.live.waited(time.monotonic() - started)
        except LimiterUnavailable as error:
            self.context.stop.stop(str(error))
            return False
        if self.context.stop.stopped:
            lane.release(tokens)
            return False
        return True

    def _succeeded(self, request: ParsedRequest, line_bytes: int, result: ApiResult, seconds: float) -> float:
        """Count a success (answered after ``seconds``) and its usage, write it; return its cost.

        Nothing goes back to the token bucket when the answer used less than ``max_tokens``: servers count
        a request's prompt plus its ``max_tokens`` against the token limit when they admit it (OpenAI
        documents this), so a refund would run the engine above the limit.
        """
        tracker = self.tracker
        tracker.succeeded += 1
        usage = Usage.of(result.body)
        cost = 0.0
        used = 0
        if usage is not None:
            tracker.prompt_tokens_used += usage.prompt_tokens
            tracker.completion_tokens_used += usage.completion_tokens
            used = usage.prompt_tokens + usage.completion_tokens
            prices = self.context.budget.prices
            priced = prices.cost(request.model, usage.prompt_tokens, usage.completion_tokens) if prices else None
            if priced is None:
                tracker.unpriced_requests += 1
            else:
                tracker.cost_usd += priced
                cost = priced
        self.context.progress.live.answered(request.model, seconds, False, used, cost)
        self.recorder.record(request, line_bytes, RowResult.answer(result))
        return cost

    def _failed(self, request: ParsedRequest, line_bytes: int, result: ApiResult, errors: list) -> float:
        """Write a request's final failure and warn about it."""
        self.context.progress.live.failed()
        self.logger.warning("%s line +%d failed after %d attempt(s): %s (request id %s)", self.label,
                            request.line_index, len(errors), result.error, result.request_id or "-")
        self.recorder.record(request, line_bytes, RowResult.answer(result, errors))
        return 0.0
