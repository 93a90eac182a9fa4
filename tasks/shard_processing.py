"""Processing one shard: the async Prefect task that reads a byte range and sends its requests.

Every shard task of a run awaits on the flow's event loop and shares one ``SharedRunState``:
the rate-limit engine, the API client with its aiohttp session, the token estimator, the
progress counter and the stop signal.

For each line of its range, the task:
    1. skips blank lines, and records malformed or invalid lines as error records (a warning
       names the shard, line and byte offset; the final message names the file's line number);
    2. estimates the request's tokens and reserves its most possible cost against the budget;
    3. takes its model's bucket capacity at once when it can and waits for a shared in-flight slot;
       otherwise starts a task for it (at most 2,000 waiting across the run) that waits in its
       model's lane, so a slow model never holds up a fast one. Each granted request is sent in
       its own asyncio task, so requests overlap up to the engine's in-flight cap;
    4. handles the answer: success is written; 429 waits for the server's hint and slows the
       shared engine; 400/404/422 fail at once; 5xx, 408/409, resets and timeouts are retried
       with exponential backoff and jitter up to ``max_attempts``; ``insufficient_quota`` and
       401/403 stop dispatching for the whole run, while answers already received are kept.

Each row's final result is appended to the shard's part file as soon as it is known (see
``tasks.results_storage``). A resumed shard skips the rows its part already holds.

Resume: the part file is the one truth about which rows are done. A shard that finished every
row returns its ``StatusTracker`` in a Completed state; run again, it reads its lines, finds them
all done and sends nothing. A shard cut short by a stop returns a Failed state carrying its
tracker, and the next run continues it. When it has read every line, the shard writes an end
record (lines and rows), which the assembly checks the output against.

One row never costs the shard: a row whose fields have the wrong type is that row's error record
(``tasks.request_formats``), a row whose model has no price under a budget is that row's error,
and anything unexpected while a row is prepared or sent becomes that row's internal error.

Usage (inside an async flow, with every shard awaited together):
    >>> states = await asyncio.gather(*(process_shard(shard, part_path(shard), work_id, quote(state),
    ...                                               return_state=True) for shard in shards))
"""

# Standard library imports
import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

# Third-party imports
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run as current_task_run
from prefect.states import Failed

# Local application imports
from tasks.api_client import ApiClient, ApiResult, Outcome, backoff_seconds
from tasks.metrics import RunProgress, StatusTracker
from tasks.pricing import PriceTable
from tasks.rate_limiter import Lane, RateLimiterPool, RequestNeverFits
from tasks.redis_rate_limiter import LimiterUnavailable
from tasks.request_formats import InvalidLine, ParsedRequest, RequestShape, format_result, parse_line
from tasks.results_storage import PartWriter, read_part_state
from tasks.row_identity import NO_DIGEST
from tasks.sharding import ShardSpec, iter_shard_lines
from tasks.token_estimation import TokenEstimator, endpoint_of_url

# How many 429 answers one request may wait out before it is failed.
MAX_RATE_LIMIT_WAITS = 50
# How many error examples a run keeps for its summary.
ERROR_EXAMPLE_LIMIT = 5
# How many requests may be read ahead of their answers, across all shards (bounds memory).
PENDING_REQUESTS = 2000
# How many lines a shard reads before it lets the event loop run other work.
YIELD_EVERY_LINES = 32


@task(
    name="process-shard",
    tags=["parallel-requests"],
    cache_policy=NO_CACHE,
    persist_result=False,
    task_run_name=lambda: _shard_run_name(),
)
async def process_shard(shard: ShardSpec, part_path: str, work_id: str, state: "SharedRunState") -> Any:
    """Send every request of one shard and write each row's result to the shard's part file.

    Args:
        shard: the byte range to process.
        part_path: the part file to append results to (rows already in it are skipped).
        work_id: the job's generation id (names the run's work; kept for the task's parameters).
        state: the run's shared engine, client and counters (pass it wrapped in ``quote()``).

    Returns:
        The shard's StatusTracker when every row is done (cached); otherwise a Failed state carrying it.
    """
    logger = get_run_logger()
    earlier = read_part_state(part_path)
    tracker = StatusTracker(shard=shard.index, resent_requests=earlier.sent_unfinished)
    worker = _ShardWorker(shard, state, tracker, logger, earlier.done)
    started = time.monotonic()
    if earlier.done or earlier.sent_unfinished:
        logger.info("Resuming %s of %s: %d rows already done, %d requests to send again", shard.label,
                    os.path.basename(shard.source), len(earlier.done), earlier.sent_unfinished)
    else:
        logger.info("Starting %s of %s", shard.label, os.path.basename(shard.source))
    with PartWriter(part_path) as part:
        await worker.run(part)
    tracker.wall_seconds = time.monotonic() - started
    logger.info(
        "Finished %s: %d rows (%d resumed), %d succeeded, %d failed, %d not sent, %d requests, %d retries, "
        "%d answered 429", shard.label, tracker.rows, tracker.resumed_rows, tracker.succeeded, tracker.failed,
        tracker.not_sent, tracker.requests_sent, tracker.retries, tracker.rate_limited,
    )
    if tracker.not_sent:
        return Failed(message=f"{shard.label}: {tracker.not_sent} rows not sent", data=tracker)
    return tracker


@dataclass(frozen=True)
class RunSettings:
    """Settings every shard of a run follows.

    Attributes:
        request_url: the target URL (cookbook lines) or the base URL (batch lines).
        shape: the input's shape.
        max_attempts: how many times a request is tried, at most, on retryable failures.
        retry_base_seconds: the first retry's backoff (doubled for each later one).
    """

    request_url: str
    shape: RequestShape
    max_attempts: int = 5
    retry_base_seconds: float = 0.25


class SharedRunState:
    """The live objects every shard of a run shares. They all belong to the flow's event loop."""

    def __init__(self, settings: RunSettings, limiter: RateLimiterPool, client: ApiClient,
                 estimator: Optional[TokenEstimator], progress: RunProgress,
                 transport_params: Optional[Dict[str, Any]] = None, prices: Optional[PriceTable] = None,
                 budget_usd: Optional[float] = None) -> None:
        self.settings = settings
        self.limiter = limiter
        self.client = client
        self.estimator = estimator
        self.progress = progress
        self.transport_params = transport_params
        self.prices = prices
        self.budget_usd = budget_usd
        self.spent_usd = 0.0
        self.reserved_usd = 0.0
        # Requests read but not yet settled, across every shard: enough to keep every lane busy.
        self.pending_window = asyncio.Semaphore(PENDING_REQUESTS)
        self.stop_reason: Optional[str] = None
        self.dispatch_closed: Optional[str] = None
        self.error_examples: List[str] = []

    def stop(self, reason: str) -> None:
        """Stop dispatching for the whole run, requests already waiting included (the first reason is kept)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def close_dispatch(self, reason: str) -> None:
        """Read no new rows (the budget is spoken for); requests already reserved still go."""
        if self.dispatch_closed is None:
            self.dispatch_closed = reason

    @property
    def end_reason(self) -> Optional[str]:
        """Why the run ended before every row had its result, if it did."""
        return self.stop_reason or self.dispatch_closed

    def reserve_budget(self, request: ParsedRequest, prompt_tokens: int, completion_tokens: int) -> Optional[float]:
        """Reserve the most a request may cost; None (and dispatching closes) when the budget cannot cover it.

        Raises:
            Unpriceable: when there is a budget and the request's model has no price (that row's error).
        """
        if self.budget_usd is None:
            return 0.0
        model = request.model
        worst = self.prices.cost(model, prompt_tokens, completion_tokens) if self.prices else None
        if worst is None:
            raise Unpriceable(f"no price for model {model!r}, so it cannot be kept within the budget of "
                              f"{format_usd(self.budget_usd)}; add its price with --price-table")
        if self.spent_usd + self.reserved_usd + worst > self.budget_usd:
            self.close_dispatch(f"budget of {format_usd(self.budget_usd)} reached")
            return None
        self.reserved_usd += worst
        return worst

    def settle_budget(self, reserved_usd: float, spent_usd: float) -> None:
        """Replace a request's reservation by what it really cost."""
        self.reserved_usd -= reserved_usd
        self.spent_usd += spent_usd

    def note_error(self, text: str) -> None:
        """Keep an error text as an example for the summary."""
        if len(self.error_examples) < ERROR_EXAMPLE_LIMIT and text not in self.error_examples:
            self.error_examples.append(text)


class Unpriceable(ValueError):
    """Raised when a request cannot be priced under a budget."""


def format_usd(amount: float) -> str:
    """US dollars with the digits that matter: $0.002, $0.50, $1,234.50."""
    return f"${amount:,.2f}" if amount >= 1 or round(amount, 2) == amount else f"${amount:,.6g}"


@dataclass
class _ShardWorker:
    """The request loop of one shard."""

    shard: ShardSpec
    state: SharedRunState
    tracker: StatusTracker
    logger: Any
    done: Dict[int, str] = field(default_factory=dict)
    _pending: set = field(default_factory=set)

    async def run(self, part: PartWriter) -> None:
        """Read the shard's lines and dispatch them; return when every row is settled."""
        settings = self.state.settings
        for line_index, offset, raw in iter_shard_lines(self.shard, self.state.transport_params):
            self.tracker.lines_read += 1
            if self.tracker.lines_read % YIELD_EVERY_LINES == 0:
                # Reading and estimating never wait, so let the engine's timers and the answers run.
                await asyncio.sleep(0)
            if not raw.strip():
                self.tracker.blank_lines += 1
                self.state.progress.advance(len(raw))
                continue
            self.tracker.rows += 1
            parsed = parse_line(raw, settings.shape, settings.request_url, line_index)
            if self.done.get(line_index) == (NO_DIGEST if isinstance(parsed, InvalidLine) else parsed.digest):
                # Done by an earlier run, for this very request (a record written for other content is not).
                self.tracker.resumed_rows += 1
                self.state.progress.advance(len(raw))
                continue
            if self.state.end_reason is not None:
                self.tracker.not_sent += 1
                continue
            if isinstance(parsed, InvalidLine):
                self._record_invalid_line(part, parsed, offset, len(raw))
                continue
            try:
                await self._start_row(part, parsed, len(raw))
            except Exception as error:  # a bug must cost one row, never the shard
                self.logger.exception("%s line +%d: unexpected error", self.shard.label, line_index)
                self.tracker.failed_after_retries += 1
                self._finish_locally(part, parsed, len(raw), f"internal error: {error!r}", "internal_error")
        if self._pending:
            await asyncio.gather(*list(self._pending))
        part.write_end(self.tracker.lines_read, self.tracker.rows)

    async def _start_row(self, part: PartWriter, parsed: ParsedRequest, line_bytes: int) -> None:
        """Estimate, budget and queue one valid row (its send runs in a task of its own)."""
        prompt_tokens, completion_tokens = self._estimate(parsed)
        tokens = prompt_tokens + completion_tokens
        try:
            reserved_usd = self.state.reserve_budget(parsed, prompt_tokens, completion_tokens)
        except Unpriceable as error:  # that row's error; the rest keep to the budget
            self.tracker.failed_unpriced += 1
            self._finish_locally(part, parsed, line_bytes, str(error), "unpriced_model")
            return
        if reserved_usd is None:  # the budget cannot cover this request: stop dispatching
            self.tracker.not_sent += 1
            return
        lane = self.state.limiter.lane_for(parsed.model, endpoint_of_url(parsed.url))
        try:
            ready = lane.try_take_buckets(tokens)
        except RequestNeverFits as error:
            self.state.settle_budget(reserved_usd, 0.0)
            self.tracker.failed_too_large += 1
            self._finish_locally(part, parsed, line_bytes, str(error), "request_too_large")
            return
        if ready:
            # Its model's buckets serve it now: wait here for a shared in-flight slot, then send.
            await lane.take_slot()
            job = asyncio.create_task(self._send_granted(part, parsed, lane, tokens, line_bytes, reserved_usd))
        else:
            # It waits in its own model's lane, so a slow model never holds up a fast one;
            # the window bounds how many wait at once (and so the memory they take).
            await self.state.pending_window.acquire()
            job = asyncio.create_task(self._dispatch(part, parsed, lane, tokens, line_bytes, reserved_usd))
        self._pending.add(job)
        job.add_done_callback(self._pending.discard)

    async def _dispatch(self, part: PartWriter, request: ParsedRequest, lane: Lane, tokens: int,
                        line_bytes: int, reserved_usd: float) -> None:
        """Wait in the request's lane of the engine, then send it until it is settled."""
        try:
            try:
                await lane.acquire(tokens)
            except LimiterUnavailable as error:  # the shared engine is gone: stop, keep what is done
                self.state.settle_budget(reserved_usd, 0.0)
                self.state.stop(str(error))
                self.tracker.not_sent += 1
                return
            except RequestNeverFits as error:  # the limit learned meanwhile is below this request
                self.state.settle_budget(reserved_usd, 0.0)
                self.tracker.failed_too_large += 1
                self._finish_locally(part, request, line_bytes, str(error), "request_too_large")
                return
            await self._send_granted(part, request, lane, tokens, line_bytes, reserved_usd)
        finally:
            self.state.pending_window.release()

    async def _send_granted(self, part: PartWriter, request: ParsedRequest, lane: Lane, tokens: int,
                            line_bytes: int, reserved_usd: float) -> None:
        """Send a request whose capacity is granted, unless the run has stopped meanwhile."""
        if self.state.stop_reason is not None:
            self.state.settle_budget(reserved_usd, 0.0)
            lane.release(tokens)
            self.tracker.not_sent += 1
            return
        part.write_sent(request.line_index, request.digest)
        await self._send_until_settled(part, request, lane, tokens, line_bytes, reserved_usd)

    async def _send_until_settled(self, part: PartWriter, request: ParsedRequest, lane: Lane, tokens: int,
                                  line_bytes: int, reserved_usd: float) -> None:
        """Send one request (its first slot already granted) until it succeeds, fails for good, or the run stops."""
        spent = 0.0
        try:
            spent = await self._attempts(part, request, lane, tokens, line_bytes) or 0.0
        except Exception as error:  # a bug must cost one row, never the shard
            self.logger.exception("%s line +%d: unexpected error", self.shard.label, request.line_index)
            self.tracker.failed_after_retries += 1
            self._finish(part, request, line_bytes, None, None, None, [f"internal error: {error!r}"], "internal_error")
        finally:
            self.state.settle_budget(reserved_usd, spent)  # this request's own cost, whatever else finished meanwhile

    async def _attempts(self, part: PartWriter, request: ParsedRequest, lane: Lane, tokens: int,
                        line_bytes: int) -> Optional[float]:
        """The retry loop of one request (its model's lane of the engine); return what its answer cost."""
        settings, limiter, tracker = self.state.settings, lane, self.tracker
        errors: List[str] = []
        failed_attempts = 0
        rate_limit_waits = 0
        holds_slot = True
        while True:
            if not holds_slot:
                if self.state.stop_reason is None:
                    try:
                        await limiter.acquire(tokens)
                    except LimiterUnavailable as error:
                        self.state.stop(str(error))
                        tracker.not_sent += 1
                        return
                    if self.state.stop_reason is not None:
                        limiter.release(tokens)
                if self.state.stop_reason is not None:
                    tracker.not_sent += 1
                    return
            tracker.note_request_sent()
            try:
                result = await self.state.client.send(request.method, request.url, request.payload)
            finally:
                limiter.release(tokens)
                holds_slot = False
            tracker.note_response()
            if result.status is not None:
                limiter.observe(result.limits)  # follow the server's x-ratelimit-* headers
            if result.outcome is Outcome.SUCCESS:
                used, cost = self._count_usage(result, request)
                if used is not None and tokens > used:
                    limiter.refund_tokens(tokens - used)  # the estimate reserved more than the answer used
                tracker.succeeded += 1
                self._finish(part, request, line_bytes, result.status, result.body, result.request_id, None, None)
                return cost
            errors.append(result.error or "unknown error")
            self.state.note_error(result.error or "unknown error")
            if result.outcome is Outcome.STOP:
                self.state.stop(result.error or "stopped")
                self.logger.error("Stopping the run: %s (%s line +%d)", result.error, self.shard.label, request.line_index)
                tracker.not_sent += 1
                return
            if result.outcome is Outcome.RATE_LIMITED:
                tracker.rate_limited += 1
                rate_limit_waits += 1
                scope = result.rate_limit_scope
                limiter.slow_down(requests=scope != "tokens", tokens=scope != "requests")
                if rate_limit_waits <= MAX_RATE_LIMIT_WAITS:
                    wait = result.retry_after if result.retry_after is not None else backoff_seconds(rate_limit_waits, 1.0)
                    tracker.note_retry("rate_limited")
                    self.logger.debug("%s line +%d: 429, waiting %.2f s", self.shard.label, request.line_index, wait)
                    await asyncio.sleep(wait)
                    continue
            elif result.outcome is Outcome.INVALID:
                tracker.failed_invalid_request += 1
                self._log_failure(request, result, 1)
                self._finish(part, request, line_bytes, result.status, result.body, result.request_id, errors, result.cause)
                return
            else:
                failed_attempts += 1
                if failed_attempts < settings.max_attempts:
                    wait = max(result.retry_after or 0.0, backoff_seconds(failed_attempts, settings.retry_base_seconds))
                    tracker.note_retry(result.cause or "error")
                    self.logger.debug("%s line +%d: %s, retrying in %.2f s", self.shard.label, request.line_index,
                                      result.error, wait)
                    await asyncio.sleep(wait)
                    continue
            tracker.failed_after_retries += 1
            self._log_failure(request, result, len(errors))
            self._finish(part, request, line_bytes, result.status, result.body, result.request_id, errors, result.cause)
            return

    # Helpers

    def _estimate(self, request: ParsedRequest) -> Tuple[int, int]:
        """The request's prompt and most completion tokens, or (0, 0) when no estimate is needed."""
        estimator = self.state.estimator
        if estimator is None:
            return 0, 0
        try:
            prompt, completion = estimator.estimate_parts(request.body, endpoint_of_url(request.url))
        except Exception:  # an odd body must not stop the shard: fall back to a size-based guess
            prompt, completion = len(request.payload) // 4, 0
        self.tracker.tokens_estimated += prompt + completion
        return prompt, completion

    def _count_usage(self, result: ApiResult, request: ParsedRequest) -> Tuple[Optional[int], float]:
        """Add the answer's usage (and its cost) to the tracker; return the tokens it used (None: not
        reported) and its cost (0 when unknown)."""
        usage = result.body.get("usage") if isinstance(result.body, dict) else None
        if not isinstance(usage, dict):
            return None, 0.0
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        prompt = prompt if isinstance(prompt, int) else 0
        completion = completion if isinstance(completion, int) else 0
        self.tracker.prompt_tokens_used += prompt
        self.tracker.completion_tokens_used += completion
        cost = self.state.prices.cost(request.model, prompt, completion) if self.state.prices else None
        if cost is None:
            self.tracker.unpriced_requests += 1
        else:
            self.tracker.cost_usd += cost
        total = usage.get("total_tokens")
        return (total if isinstance(total, int) else prompt + completion), cost or 0.0

    def _record_invalid_line(self, part: PartWriter, line: InvalidLine, offset: int, line_bytes: int) -> None:
        """Write an invalid line's error record and warn about it."""
        self.tracker.invalid_lines += 1
        part.write_invalid(line)
        self.state.progress.advance(line_bytes)
        self.logger.warning("%s: %s line +%d (byte %d): %s", os.path.basename(self.shard.source), self.shard.label,
                            line.line_index, offset, line.reason)

    def _finish(self, part: PartWriter, request: ParsedRequest, line_bytes: int, status: Optional[int], body: Any,
                request_id: Optional[str], errors: Optional[List[str]], error_code: Optional[str]) -> None:
        """Write a request's final result (the server answered, or it was sent) and count the row as done."""
        shape = self.state.settings.shape
        part.write_result(request.line_index, request.digest,
                          format_result(request, shape, status, body, request_id, errors, error_code),
                          answered=status is not None)
        self.state.progress.advance(line_bytes)

    def _finish_locally(self, part: PartWriter, request: ParsedRequest, line_bytes: int, error: str,
                        error_code: str) -> None:
        """Write a row's error decided here, before anything was paid (decided again on a rerun)."""
        self.state.note_error(error)
        part.write_local_error(request.line_index, request.digest,
                               format_result(request, self.state.settings.shape, None, None, None, [error], error_code))
        self.state.progress.advance(line_bytes)

    def _log_failure(self, request: ParsedRequest, result: ApiResult, attempts: int) -> None:
        """Warn about a request that failed for good."""
        self.logger.warning("%s line +%d failed after %d attempt(s): %s (request id %s)", self.shard.label,
                            request.line_index, attempts, result.error, result.request_id or "-")


def _shard_run_name() -> str:
    """The task run's name: input file, shard number and byte range."""
    shard = current_task_run.parameters.get("shard")
    if isinstance(shard, ShardSpec):
        return f"{os.path.basename(shard.source)} {shard.label}"
    return "process-shard"
