"""The Prefect task that processes one shard: read its byte range, start each row, wait for all of them.

Every shard task of a run awaits on the flow's event loop and shares one ``RunContext``
(``tasks.shards.run_state``): the rate-limit engine, the API client with its aiohttp session, the
token estimator, the budget, the progress counter and the stop signal.

For each line of its range, the task:
    1. skips blank lines, and rows an earlier run finished for this very request (the part's
       record carries the row's digest); records an invalid line as that row's error (a warning
       names the file, shard, line and byte offset);
    2. estimates the request's tokens and reserves its most possible cost against the budget;
    3. takes its model's bucket capacity at once when it can and sends it on the shared in-flight
       slot its sender holds. The shard's senders are long-lived asyncio tasks that each hold a
       slot, read the next row and send it (``tasks.shards.request_sender``); one more is started
       while slots are free, so requests overlap up to the engine's in-flight cap. A row whose
       buckets are empty gets a task of its own instead (at most 2,000 waiting across the run)
       that waits in its model's lane, so a slow model never holds up a fast one.

Each row's final result is appended to the shard's part file as soon as it is known
(``tasks.shards.row_results``). When it has read every line, the shard writes an end record
(lines and rows), which the assembly checks the output against. A shard that finished every row
returns its ``StatusTracker``; one cut short by a stop returns a Failed state carrying it, and the
next run continues from its part file.

One row never costs the shard: a row with fields of the wrong type is that row's error record, a
row whose model has no price under a budget is that row's error, and anything unexpected while a
row is prepared or sent becomes that row's internal error.

Usage (inside an async flow, with every shard awaited together):
    >>> states = await asyncio.gather(*(process_shard(shard, part_path(shard), work_id, quote(context),
    ...                                               return_state=True) for shard in shards))
"""

# Standard library imports
import asyncio
import logging
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

# Third-party imports
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run as current_task_run
from prefect.states import Failed

# Local application imports
from tasks.limits.learned_limits import RequestNeverFits
from tasks.limits.rate_limiter import Lane
from tasks.limits.redis_engine import LimiterUnavailable
from tasks.reporting.metrics import StatusTracker
from tasks.requests.request_formats import InvalidLine, ParsedRequest, parse_line
from tasks.requests.row_identity import NO_DIGEST
from tasks.requests.token_estimation import TokenEstimator, budget_completion_tokens
from tasks.shards.request_sender import RequestSender
from tasks.shards.row_results import ResultRecorder, RowResult
from tasks.shards.run_state import RunContext, Unpriceable
from tasks.shards.sharding import ShardSpec, iter_shard_lines
from tasks.storage.results_storage import PartWriter, read_part_state

# How many lines a shard reads before it lets the event loop run other work.
YIELD_EVERY_LINES = 32


class _NoEmptyTraceback(logging.Filter):
    """Drops the empty traceback Prefect asks for when a task returns a Failed state without an exception.

    Prefect logs "Task run failed with state: ..." with ``exc_info=True``; with no exception being
    handled, that prints a stray "NoneType: None" line under it (a shard stopped by a budget, say).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is not None and record.exc_info[0] is None:
            record.exc_info = None
        return True


if not any(isinstance(existing, _NoEmptyTraceback) for existing in logging.getLogger("prefect.task_runs").filters):
    logging.getLogger("prefect.task_runs").addFilter(_NoEmptyTraceback())


@task(
    name="process-shard",
    tags=["parallel-requests"],
    cache_policy=NO_CACHE,
    persist_result=False,
    task_run_name=lambda: _shard_run_name(),
)
async def process_shard(shard: ShardSpec, part_path: str, work_id: str, context: RunContext) -> Any:
    """Send every request of one shard and write each row's result to the shard's part file.

    Args:
        shard: the byte range to process.
        part_path: the part file to append results to (rows already in it are skipped).
        work_id: the job's generation id (names the run's work; kept for the task's parameters).
        context: the run's shared engine, client, budget and counters (pass it wrapped in ``quote()``).

    Returns:
        The shard's StatusTracker when every row is done; otherwise a Failed state carrying it.
    """
    logger = get_run_logger()
    earlier = read_part_state(part_path)
    tracker = StatusTracker(shard=shard.index, resent_requests=earlier.sent_unfinished)
    started = time.monotonic()
    if earlier.done or earlier.sent_unfinished:
        logger.info("Resuming %s of %s: %d rows already done, %d requests to send again", shard.label,
                    os.path.basename(shard.source), len(earlier.done), earlier.sent_unfinished)
    else:
        logger.info("Starting %s of %s", shard.label, os.path.basename(shard.source))
    with PartWriter(part_path, context.turn_writes) as part:
        recorder = ResultRecorder(part, context.settings.shape, context.progress, context.errors, logger, shard)
        sender = RequestSender(context, tracker, recorder, logger, shard.label)
        await ShardReader(shard, context, sender, earlier.done).run()
    tracker.wall_seconds = time.monotonic() - started
    logger.info(
        "Finished %s: %d rows (%d resumed), %d succeeded, %d failed, %d not sent, %d requests, %d retries, "
        "%d answered 429", shard.label, tracker.rows, tracker.resumed_rows, tracker.succeeded, tracker.failed,
        tracker.not_sent, tracker.requests_sent, tracker.retries, tracker.rate_limited,
    )
    if tracker.not_sent:
        return Failed(message=f"{shard.label}: {tracker.not_sent} rows not sent", data=tracker)
    return tracker


class ShardReader:
    """Reads a shard's lines and starts each row: estimate, budget, capacity, then send.

    The shard's senders read the lines themselves, one row at a time, as the Cookbook script's
    loop and a bare aiohttp client do: a sender holds a shared in-flight slot, reads the next row
    and, when its model's buckets serve it at once, sends it on that slot; once the answer is
    written it takes a slot again (at once when nobody waits for one) and reads on. No row is
    handed from task to task, so a row costs no wake-up of its own. A row whose buckets are empty
    goes to a task of its own that waits in its model's lane (``_wait_then_send``).
    """

    def __init__(self, shard: ShardSpec, context: RunContext, sender: RequestSender, done: Dict[int, str]) -> None:
        """
        Args:
            shard: the byte range to read.
            context: the run's shared objects.
            sender: sends each started row until it is settled (it holds the shard's tracker and recorder).
            done: the rows an earlier run finished: line index to the digest of the request it answered.
        """
        self.shard, self.context, self.sender, self.done = shard, context, sender, done
        self.tracker: StatusTracker = sender.tracker
        self.recorder: ResultRecorder = sender.recorder
        self._lines: Iterator[Tuple[int, int, bytes]] = iter_shard_lines(shard, context.transport_params)
        self._read_all = False
        self._senders: Set["asyncio.Task[None]"] = set()  # the other senders still running
        self._sender_errors: List[BaseException] = []
        self._slot_waiters = 0  # the shard's senders waiting for a slot
        self._waiting: Set["asyncio.Task[None]"] = set()  # rows waiting in their lane, then sending

    async def run(self) -> None:
        """Read the shard's lines and start them; return when every row is settled."""
        errors: List[BaseException] = []
        try:
            try:
                await self._send_rows()  # this task is the first sender; it starts more while slots are free
            except Exception as error:  # reading failed: the other senders still finish what they sent
                errors.append(error)
            # No sender is started once every line is read (or reading failed); rows waiting in their lane start none.
            while self._senders:
                await asyncio.wait(list(self._senders))
            while self._waiting:
                await asyncio.gather(*list(self._waiting))
        finally:
            self._lines.close()  # type: ignore[attr-defined]
        errors += self._sender_errors
        if errors:
            raise errors[0]
        self.recorder.end(self.tracker.lines_read, self.tracker.rows)

    async def _send_rows(self, first: bool = True) -> None:
        """A sender: hold a slot, read the next row, send it on the slot; until every line is read.

        Args:
            first: the shard task's own sender, which goes on until every line is read. Another one
                ends early when it would wait for a slot while one of the shard's senders already waits.
        """
        limiter = self.context.limiter
        holds_slot = False
        try:
            while True:
                if not holds_slot:
                    if not limiter.try_take_slot():
                        if self._slot_waiters and not first:
                            return  # one sender of the shard waiting for a slot is enough: more would only take turns
                        self._slot_waiters += 1
                        try:
                            await limiter.take_slot()
                        finally:
                            self._slot_waiters -= 1
                    holds_slot = True
                kind, row = self._next_row()
                if kind is _GRANTED:
                    assert row is not None
                    # A slot is free and none of the shard's senders waits for one: one more sender. (Senders
                    # backing off before a retry hold no slot, so they are not counted against the cap.)
                    if limiter.free_slots > 0 and not self._slot_waiters and not self._read_all:
                        job = asyncio.create_task(self._send_rows(first=False))
                        self._senders.add(job)
                        job.add_done_callback(self._sender_ended)
                    holds_slot = False  # the request goes on this slot; its answer gives it back
                    await self.sender.send(*row)
                elif kind is _WAIT_IN_LANE:
                    assert row is not None
                    # The window bounds how many rows wait at once (and so the memory they take).
                    if self.context.pending_window.locked():
                        limiter.release_slot()  # never hold a slot while waiting for anything but an answer
                        holds_slot = False
                    await self.context.pending_window.acquire()
                    job = asyncio.create_task(self._wait_then_send(*row))
                    self._waiting.add(job)
                    job.add_done_callback(self._waiting.discard)
                elif kind is _PAUSE:  # many lines without a request: let the engine's timers and the answers run
                    limiter.release_slot()
                    holds_slot = False
                    await asyncio.sleep(0)
                else:
                    return
        finally:
            if holds_slot:
                limiter.release_slot()

    def _sender_ended(self, job: "asyncio.Task[None]") -> None:
        """One of the other senders ended: forget it, keep its error for ``run``."""
        self._senders.discard(job)
        if not job.cancelled() and job.exception() is not None:
            self._sender_errors.append(job.exception())  # type: ignore[arg-type]

    def _next_row(self) -> Tuple[object, Optional[Tuple[ParsedRequest, Lane, int, int, float]]]:
        """Read lines until one gives a row to send; settle the others (blank, done, invalid, unpriced) here.

        Returns ``(_GRANTED, row)`` for a row its buckets serve now, ``(_WAIT_IN_LANE, row)`` for one that
        must wait in its lane, ``(_PAUSE, None)`` after ``YIELD_EVERY_LINES`` lines without either, and
        ``(_END, None)`` once every line is read.
        """
        settings, tracker = self.context.settings, self.tracker
        for _ in range(YIELD_EVERY_LINES):
            try:
                line_index, offset, raw = next(self._lines)
            except StopIteration:  # (also after another sender's read failed: that sender raises it)
                self._read_all = True
                return _END, None
            except BaseException:
                self._read_all = True
                raise
            tracker.lines_read += 1
            if not raw.strip():
                tracker.blank_lines += 1
                self.recorder.skipped(len(raw))
                continue
            tracker.rows += 1
            parsed = parse_line(raw, settings.shape, settings.request_url, line_index)
            if self.done and self.done.get(line_index) == (NO_DIGEST if isinstance(parsed, InvalidLine)
                                                           else parsed.digest):
                # Done by an earlier run, for this very request (a record written for other content is not).
                tracker.resumed_rows += 1
                self.recorder.skipped(len(raw))
                continue
            if self.context.stop.end_reason is not None:
                tracker.not_sent += 1
                continue
            if isinstance(parsed, InvalidLine):
                tracker.invalid_lines += 1
                self.recorder.invalid_line(parsed, offset, len(raw))
                continue
            try:
                started = self._start_row(parsed, len(raw))
            except Exception as error:  # a bug must cost one row, never the shard
                self.sender.logger.exception("%s line +%d: unexpected error", self.shard.label, line_index)
                tracker.failed_after_retries += 1
                self.recorder.record(parsed, len(raw), RowResult.internal_error(error, sent=False))
                continue
            if started is not None:
                return started
        return _PAUSE, None

    def _start_row(self, request: ParsedRequest,
                   line_bytes: int) -> Optional[Tuple[object, Tuple[ParsedRequest, Lane, int, int, float]]]:
        """Estimate, budget and take the buckets of one valid row; None when the row is settled here."""
        lane = self.context.limiter.lane_for(request.model, request.endpoint)
        budget = self.context.budget
        estimator = self.context.estimator_for(lane.limits_tokens)
        if estimator is None:  # no token limit and no budget: nothing needs its tokens or its price
            tokens, reserved_usd = 0, 0.0
        else:
            prompt_tokens, completion_tokens = self._estimate(request, estimator)
            tokens = prompt_tokens + completion_tokens
            try:
                reserved_usd = budget.reserve(request.model, prompt_tokens, budget_completion_tokens(
                    request.body, request.endpoint, completion_tokens))
            except Unpriceable as error:  # that row's error; the rest keep to the budget
                self.tracker.failed_unpriced += 1
                self.recorder.record(request, line_bytes, RowResult.local_error("unpriced_model", str(error)))
                return None
            if reserved_usd is None:  # the budget cannot cover this request: read no more rows
                self.context.stop.close_dispatch(budget.reached)
                self.tracker.not_sent += 1
                return None
        try:
            ready = lane.try_take_buckets(tokens)
        except RequestNeverFits as error:
            self._too_large(request, line_bytes, reserved_usd, error)
            return None
        # Served now: it goes on the sender's slot. Otherwise it waits in its own model's lane, so a slow
        # model never holds up a fast one.
        return (_GRANTED if ready else _WAIT_IN_LANE), (request, lane, tokens, line_bytes, reserved_usd)

    async def _wait_then_send(self, request: ParsedRequest, lane: Lane, tokens: int, line_bytes: int,
                              reserved_usd: float) -> None:
        """Wait in the request's lane of the engine (its buckets, then a slot), then send it until it is settled."""
        try:
            started = time.monotonic()
            try:
                await lane.acquire(tokens)
                self.context.progress.live.waited(time.monotonic() - started)
            except LimiterUnavailable as error:  # the shared engine is gone: stop, keep what is done
                self.context.budget.settle(reserved_usd, 0.0)
                self.context.stop.stop(str(error))
                self.tracker.not_sent += 1
                return
            except RequestNeverFits as error:  # the limit learned meanwhile is below this request
                self._too_large(request, line_bytes, reserved_usd, error)
                return
            await self.sender.send(request, lane, tokens, line_bytes, reserved_usd)
        finally:
            self.context.pending_window.release()

    def _too_large(self, request: ParsedRequest, line_bytes: int, reserved_usd: float, error: Exception) -> None:
        """A request above the token limit: that row's error, decided here."""
        self.context.budget.settle(reserved_usd, 0.0)
        self.tracker.failed_too_large += 1
        self.recorder.record(request, line_bytes, RowResult.local_error("request_too_large", str(error)))

    def _estimate(self, request: ParsedRequest, estimator: TokenEstimator) -> Tuple[int, int]:
        """The request's prompt and most completion tokens."""
        try:
            prompt, completion = estimator.estimate_parts(request.body, request.endpoint)
        except Exception:  # an odd body must not stop the shard: fall back to a size-based guess
            prompt, completion = len(request.payload) // 4, 0
        self.tracker.tokens_estimated += prompt + completion
        return prompt, completion


# What ShardReader._next_row found.
_GRANTED, _WAIT_IN_LANE, _PAUSE, _END = object(), object(), object(), object()


def _shard_run_name() -> str:
    """The task run's name: input file, shard number and byte range."""
    shard = current_task_run.parameters.get("shard")
    if isinstance(shard, ShardSpec):
        return f"{os.path.basename(shard.source)} {shard.label}"
    return "process-shard"
