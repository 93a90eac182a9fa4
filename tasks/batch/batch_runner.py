"""Batch mode: the job's rows through the OpenAI Batch API, at half the price, never submitted twice.

``run_batches`` drives a job's batch files (``tasks.batch.batch_files``) through their states in
the ledger (``tasks.batch.batch_ledger``):

    1. Plan once per input: every shard is read into batch files (one model and one endpoint per
       file, Batch API limits kept). Invalid lines get their error records at once.
    2. Submit what fits: upload the file, record the creation token, create the batch (metadata names
       the job, the file and the token), record its id. A run that died between the create and the
       record finds its batch by that token instead of creating another. Under an enqueued-token cap
       (``--batch-queue-tokens``, or learned from a ``token_limit_exceeded`` refusal: OpenAI's message
       states the limit; else what was queued when it came) a file goes in only when the model's
       queued estimate leaves room. While no cap is known, one batch of a model is validated at a
       time, so a refusal can come only once.
    3. Each submitted batch is an async Prefect task named after its file and batch id: it polls the
       batch with backoff (1 s, growing to ``poll_max_seconds``), keeps the progress artifact moving
       with the batch's ``request_counts``, and when the batch ends downloads its output and error
       files and writes every row's record (``tasks.batch.batch_results``). Rows an expiry, a
       cancel or a retryable error left go into new files (``fallback="batch"``) or to the online
       engine afterwards (``fallback="online"``). Input files are deleted from the server once their
       batch ended, result files once read (unless ``keep_files``).
    4. ``submit_only``: submit what fits, collect what has ended, and return without waiting. The
       same command later does the rest and submits nothing twice.

Ctrl-C (cancellation) leaves the batches running: they are paid for, and the next run collects
them. With ``cancel_on_interrupt`` they are cancelled first; the next run collects what they finished.

Usage:
    >>> outcome = await run_batches(job, BatchSettings(), shards, part_paths, work, progress, api_key)
    >>> outcome.trackers, outcome.live_batches, outcome.online_rows
"""

# Standard library imports
import asyncio
import contextlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

# Third-party imports
import aiohttp
from prefect import get_run_logger, task
from prefect.artifacts import acreate_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.utilities.annotations import quote

# Local application imports
from tasks.api.api_client import backoff_seconds
from tasks.batch.batch_api import BatchApi, BatchApiError
from tasks.batch.batch_files import BatchFileLimits, plan_batch_files, write_retry_files
from tasks.batch.batch_ledger import LEDGER, TERMINAL_STATUSES, BatchFile, BatchLedger
from tasks.batch.batch_results import collect_batch_results
from tasks.job.crash_points import kill_point
from tasks.reporting.metrics import RunProgress, StatusTracker
from tasks.requests import fast_json
from tasks.requests.pricing import PriceTable
from tasks.requests.request_formats import RequestShape
from tasks.requests.token_estimation import TokenEstimator
from tasks.shards.run_state import ErrorExamples
from tasks.shards.runner import ShardJob
from tasks.shards.sharding import ShardSpec
from tasks.storage.results_storage import PartWriter, read_part_state

# The table artifact of the job's batches.
BATCHES_TABLE_KEY = "parallel-requests-batches"
# Share of a stated enqueued-token limit the run fills (the server counts tokens its own way).
QUEUE_MARGIN = 0.95
# A lineage of batch files that ended this many times in a row with nothing done stops the run.
MAX_STALLS = 3
# OpenAI's refusal message states the limit: "... Limit: 2,000,000 enqueued tokens ...".
STATED_QUEUE_LIMIT = re.compile(r"Limit:\s*([\d,]+)\s*enqueued", re.IGNORECASE)
# Statuses that show a batch was accepted into the queue (a refusal comes as "failed", during or after validation).
ACCEPTED_STATUSES = ("in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled")
# How many times one file may be refused for the enqueued-token cap before its rows fail (a row alone above the cap).
MAX_REFUSALS = 4
# How many times in a row one batch's task may fail on a transient error (each after 6 tries) before the run stops.
MAX_TASK_FAILURES = 3
# How many batches the search for a lost creation reads, at most.
SEARCH_LIMIT = 2000
# How many times a batch's result files are downloaded when they come short (a cut-off transfer).
DOWNLOAD_ATTEMPTS = 3
# How many times one batch's create is tried when its answer is lost (the batch looked for before each new try).
CREATE_ATTEMPTS = 4
# Answers to a batch's creation that refuse that file (its rows get the error) rather than stop the run.
REFUSED_FILE_STATUSES = (400, 413, 422)


@dataclass(frozen=True)
class BatchSettings:
    """How batch mode runs.

    Attributes:
        submit_only: submit and collect what is ready, never wait for a batch.
        fallback: "batch" (rows left by an expiry or failure go into a new batch) or "online".
        keep_files: keep the input and result files on the server.
        cancel_on_interrupt: cancel the running batches when the run is interrupted (Ctrl-C).
        queue_tokens: the enqueued-token cap per model, or None (learned from a refusal).
        max_requests: the most requests per batch file (the API allows 50,000).
        poll_max_seconds: the longest wait between two polls of a batch.
    """

    submit_only: bool = False
    fallback: str = "batch"
    keep_files: bool = False
    cancel_on_interrupt: bool = False
    queue_tokens: Optional[int] = None
    max_requests: int = 50_000
    poll_max_seconds: float = 30.0


@dataclass
class BatchOutcome:
    """What a run of batch mode gave.

    Attributes:
        trackers: each shard's counts, in shard order.
        stop_reason: why the run ended before every row had its result (None: complete, or submitted only).
        error_examples: a few error texts.
        live_batches: batches still running on the server (submit-only, or stopped early).
        waiting_files: files not yet submitted (the queue had no room, or submit-only).
        online_rows: rows left for the online engine (``fallback="online"``).
        batches: the batches table (one dict per batch file).
    """

    trackers: List[StatusTracker]
    stop_reason: Optional[str] = None
    error_examples: List[str] = field(default_factory=list)
    live_batches: int = 0
    waiting_files: int = 0
    online_rows: int = 0
    batches: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def waiting_on_server(self) -> bool:
        """Batches still run, or files wait to be submitted: the next run has work to collect."""
        return bool(self.live_batches or self.waiting_files)

    def notes(self) -> List[str]:
        """Where the batches stand, in words, for the summary."""
        if not self.batches:
            return []
        by_status: Dict[str, int] = {}
        for row in self.batches:
            if row["state"] == "collected" and (row["note"] or "").startswith("split into"):
                continue
            status = row["status"] or ("waiting to be submitted" if row["state"] in ("planned", "uploaded") else row["state"])
            by_status[status] = by_status.get(status, 0) + 1
        counts = ", ".join(f"{count} {status}" for status, count in sorted(by_status.items()))
        notes = [f"{sum(by_status.values())} batch file(s): {counts}; cost at Batch API prices"]
        notes += [f"{row['file']} (batch {row['batch_id']}): {row['note']}" for row in self.batches
                  if row["note"] and not row["note"].startswith("split into")][:5]
        return notes


def merge_batch_counts(online: StatusTracker, batch: StatusTracker) -> StatusTracker:
    """A shard's counts when the online engine finished what the batches left: the online run counted
    the rows the batches settled in this run as resumed; they are the batches' rows."""
    settled = batch.rows_done - batch.resumed_rows
    online.resumed_rows -= settled
    for name in ("succeeded", "invalid_lines", "failed_invalid_request", "failed_after_retries", "failed_too_large",
                 "failed_unpriced", "prompt_tokens_used", "completion_tokens_used", "cost_usd", "unpriced_requests",
                 "tokens_estimated", "retries"):
        setattr(online, name, getattr(online, name) + getattr(batch, name))
    for cause, count in batch.retries_by_cause.items():
        online.retries_by_cause[cause] = online.retries_by_cause.get(cause, 0) + count
    return online


@dataclass
class BatchRun:
    """What every batch task of a run shares."""

    api: BatchApi
    ledger: BatchLedger
    settings: BatchSettings
    shape: RequestShape
    prices: PriceTable
    max_attempts: int
    parts: Dict[int, PartWriter]
    trackers: Dict[int, StatusTracker]
    progress: RunProgress
    errors: ErrorExamples
    limits: BatchFileLimits
    rows_settled_before: int
    collect_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stop_reason: Optional[str] = None
    online_rows: int = 0

    def update_progress(self) -> None:
        """Progress: rows settled, plus what the running batches report done (their ``request_counts``)."""
        running = sum(int(entry.counts.get("completed", 0)) + int(entry.counts.get("failed", 0))
                      for entry in self.ledger.files if entry.state == "submitted")
        self.progress.done_bytes = self.rows_settled_before + self.settled_now() + running
        self.progress.earlier_bytes = self.rows_settled_before  # in batch mode progress counts rows
        self.progress.rows_settled = self.settled_now()
        by_status: Dict[str, int] = {}
        for entry in self.ledger.files:
            if entry.state != "collected":
                status = entry.status or ("waiting to be submitted" if entry.state in ("planned", "uploaded") else entry.state)
                by_status[status] = by_status.get(status, 0) + 1
        self.progress.note = "batches: " + (", ".join(f"{count} {status}" for status, count in sorted(by_status.items()))
                                            or "all collected") + f"; {running:,} rows done in running batches"

    def settled_now(self) -> int:
        """Rows settled by this run."""
        return sum(tracker.rows_done - tracker.resumed_rows for tracker in self.trackers.values())


async def run_batches(job: ShardJob, settings: BatchSettings, shards: Sequence[ShardSpec], part_paths: Sequence[str],
                      generation_path: str, generation: str, progress: RunProgress, api_key: Optional[str],
                      transport_params: Optional[Dict[str, Any]] = None,
                      lost_lock: Optional[threading.Event] = None, input_key: str = "") -> BatchOutcome:
    """Run (or resume) a job through the Batch API.

    Args:
        job: the run's settings (request URL, shape, attempts, price table, encoding).
        settings: batch mode's settings.
        shards: the input's shards.
        part_paths: each shard's part file.
        generation_path, generation: the work generation's folder and id (the job id in batch metadata).
        progress: the run's progress; in batch mode it counts rows.
        api_key: the key.
        transport_params: smart-open's transport parameters for the input.
        lost_lock: set when another run took the job's lock: this run stops at once.
        input_key: a digest of the input and request URL (batch metadata), to find another work folder's
            batches of the same input before submitting it again.
    """
    logger = get_run_logger()
    ledger = BatchLedger.load(generation_path, generation)
    ledger.input_key = ledger.input_key or input_key
    shape = RequestShape(job.shape)
    prices = PriceTable.load(job.price_table)
    limits = BatchFileLimits(max_requests=settings.max_requests,
                             max_tokens=lambda model: _queue_cap(ledger, settings, model))
    if not ledger.planned:
        estimator = TokenEstimator.for_name(job.token_encoding_name)
        plan = await asyncio.to_thread(plan_batch_files, ledger, shards, part_paths, shape, job.request_url, estimator,
                                       limits, transport_params)
        trackers = {tracker.shard: tracker for tracker in plan.trackers}
        logger.info("Planned %d rows into %d batch file(s): %s", plan.rows_planned, len(ledger.files),
                    ", ".join(f"{entry.name} ({entry.model}, {entry.rows:,} rows)" for entry in ledger.files[:10])
                    + (" ..." if len(ledger.files) > 10 else ""))
    else:
        trackers = {shard.index: _tracker_from_part(shard, path) for shard, path in zip(shards, part_paths)}
    total_rows = sum(tracker.rows for tracker in trackers.values())
    progress.total_bytes = max(1, total_rows)
    before = sum(tracker.resumed_rows for tracker in trackers.values())
    parts = {shard.index: PartWriter(path) for shard, path in zip(shards, part_paths)}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            run = BatchRun(BatchApi(session, job.request_url, api_key), ledger, settings, shape, prices, job.max_attempts,
                           parts, trackers, progress, ErrorExamples(), limits, before)
            run.update_progress()
            try:
                if input_key and all(entry.state == "planned" for entry in ledger.files):
                    run.stop_reason = await _other_jobs_batches(run, logger)
                if run.stop_reason is None:
                    await _find_lost_creations(run, logger)
                    await _drive(run, logger, lost_lock)
            except asyncio.CancelledError:
                if settings.cancel_on_interrupt:
                    await asyncio.shield(_cancel_live(run, logger))
                else:
                    logger.warning("Interrupted: %d batch(es) keep running on the server (paid for); run the same "
                                   "command again to collect them", sum(entry.live for entry in ledger.files))
                raise
            except BatchApiError as error:
                run.stop_reason = str(error)
                logger.error("Stopping: %s", error)
    finally:
        for part in parts.values():
            part.close()
    run.update_progress()
    ordered = [trackers[shard.index] for shard in shards]
    live = sum(entry.live for entry in ledger.files)
    waiting = sum(entry.state in ("planned", "uploaded") for entry in ledger.files)
    for tracker in ordered:
        tracker.not_sent = tracker.rows - tracker.rows_done
    table = [_table_row(entry) for entry in ledger.files]
    await _publish_batches_table(table)
    return BatchOutcome(ordered, run.stop_reason, run.errors.texts, live, waiting, ledger.online_rows, table)


async def _drive(run: BatchRun, logger: Any, lost_lock: Optional[threading.Event]) -> None:
    """Submit what fits, await every submitted batch as a task, and go on until nothing is left to do."""
    running: Dict[str, "asyncio.Task[None]"] = {}
    try:
        await _drive_loop(run, logger, lost_lock, running)
    finally:  # stopped early, or interrupted: the other batches keep running on the server
        for job in running.values():
            job.cancel()
        for job in running.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await job


async def _drive_loop(run: BatchRun, logger: Any, lost_lock: Optional[threading.Event],
                      running: Dict[str, "asyncio.Task[None]"]) -> None:
    """``_drive``'s loop; ``running`` holds the batches' tasks under way."""
    ledger, settings = run.ledger, run.settings
    started_once: set = set()
    failures: Dict[str, int] = {}  # a batch's task failures in a row (the API unreachable, ...)
    while run.stop_reason is None:
        if lost_lock is not None and lost_lock.is_set():
            run.stop_reason = "another run took this job's lock; this run stopped"
            break
        await _submit_ready(run, logger)
        for entry in ledger.files:
            if entry.state == "submitted" and entry.name not in running and entry.name not in started_once:
                label = f"{entry.name} {entry.batch_id}"
                running[entry.name] = asyncio.create_task(
                    await_batch(label, entry.name, quote(run), return_state=True))
                if settings.submit_only:
                    started_once.add(entry.name)
        if not running:
            if any(entry.state in ("planned", "uploaded") for entry in ledger.files) and not settings.submit_only:
                run.stop_reason = ("a batch file cannot fit under the enqueued-token cap; raise --batch-queue-tokens "
                                   "or lower --batch-max-requests")
            break
        done, _ = await asyncio.wait(list(running.values()), return_when=asyncio.FIRST_COMPLETED,
                                     timeout=1.0 if lost_lock is not None else None)
        for name in [name for name, job in running.items() if job in done]:
            state = await running.pop(name)
            if not state.is_failed():
                failures.pop(name, None)
                continue
            error = await state.aresult(raise_on_failure=False)
            failures[name] = failures.get(name, 0) + 1
            if isinstance(error, BatchApiError) and not error.stops_the_run and failures[name] < MAX_TASK_FAILURES:
                logger.warning("%s: %s; it is polled again", name, error)
                continue
            run.stop_reason = run.stop_reason or (f"{name}: {type(error).__name__}: {error}; the batches keep running "
                                                  "on the server: run the same command again to collect them")


@task(name="batch", cache_policy=NO_CACHE, task_run_name="{label}", retries=0)
async def await_batch(label: str, name: str, run: BatchRun) -> str:
    """Poll one batch until it ends (or once, submit-only), then collect its results. Returns its status."""
    ledger, settings = run.ledger, run.settings
    entry = next(entry for entry in ledger.files if entry.name == name)
    wait = 1.0
    while True:
        try:
            batch = await run.api.retrieve(entry.batch_id or "")
        except BatchApiError as error:
            if error.status != 404:
                raise
            _forget_unknown_batch(run, entry)
            return "unknown"
        before = dict(entry.counts)
        _note_batch(entry, batch)
        run.update_progress()
        if entry.status in TERMINAL_STATUSES:
            break
        if settings.submit_only and entry.status not in (None, "validating"):
            ledger.save()  # accepted into the queue: the next run collects it
            return entry.status or "unknown"
        if entry.counts != before:
            ledger.save()
        await asyncio.sleep(wait)
        wait = min(settings.poll_max_seconds, wait * 1.5)
    await _finish(run, entry, batch)
    return entry.status or "unknown"


async def _finish(run: BatchRun, entry: BatchFile, batch: Dict[str, Any]) -> None:
    """A batch ended: learn from a refusal, or download and collect its results; rows left go again."""
    logger = get_run_logger()
    ledger = run.ledger
    errors = (batch.get("errors") or {}).get("data") or []
    codes = [error.get("code") for error in errors if isinstance(error, dict)]
    if entry.status == "failed" and "token_limit_exceeded" in codes and entry.refusals + 1 < MAX_REFUSALS:
        message = next(str(error.get("message")) for error in errors if error.get("code") == "token_limit_exceeded")
        _learn_queue_cap(ledger, entry, message, logger)
        entry.state, entry.batch_id, entry.status, entry.counts = "uploaded", None, None, {}
        entry.refusals += 1
        ledger.save()
        return
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        for kind, file_id in (("output", entry.output_file_id), ("errors", entry.error_file_id)):
            if file_id:
                await run.api.download(file_id, ledger.path_of(entry, kind))
        short = await asyncio.to_thread(_short_download, ledger, entry)
        if short is None:
            break
        logger.warning("%s (batch %s): the result files downloaded %s; %s", entry.name, entry.batch_id, short,
                       "downloading them again" if attempt < DOWNLOAD_ATTEMPTS else "the rows missing go again")
    kill_point("batch-downloaded")
    failure = None
    if entry.status == "failed":
        failure = "; ".join(f"{error.get('code')}: {error.get('message')}" for error in errors
                            if isinstance(error, dict)) or "no reason given"
        entry.note = f"failed: {failure}"
        logger.error("%s (batch %s) failed: %s", entry.name, entry.batch_id, failure)
        run.errors.note(f"batch {entry.batch_id} failed: {failure}")
    await _collect(run, entry, logger, batch_errors=errors, failure=failure)


async def _collect(run: BatchRun, entry: BatchFile, logger: Any, batch_errors: Sequence[Any] = (),
                   failure: Optional[str] = None, failure_final: bool = False) -> None:
    """Write the records of a batch's rows into the parts; rows left go into new files (or online); clean up."""
    ledger, settings = run.ledger, run.settings
    async with run.collect_lock:
        already_done = None
        if entry.collecting:  # a run died while writing these rows: skip those it wrote
            already_done = await asyncio.to_thread(_rows_done, run.parts)
        entry.collecting = True
        ledger.save()
        collected = await asyncio.to_thread(collect_batch_results, ledger, entry, run.shape, run.parts, run.trackers,
                                            run.prices, run.max_attempts, run.progress, run.errors, logger,
                                            batch_errors, failure, failure_final, already_done)
        kill_point("batch-collected")
        if entry.status not in ("completed", "failed") or (collected.again and not entry.note):
            entry.note = f"{entry.status or 'ended'} with {collected.answered:,} of {entry.rows:,} rows settled"
            if collected.again:
                logger.warning("%s (batch %s) %s; %d rows go %s", entry.name, entry.batch_id, entry.note,
                               len(collected.again), "online" if settings.fallback == "online" else "into a new batch")
        stalls = 0 if collected.answered else entry.stalls + 1
        if collected.again and settings.fallback == "online":
            ledger.online_rows += len(collected.again)
        elif collected.again:
            for new in await asyncio.to_thread(write_retry_files, ledger, entry, collected.again, run.limits,
                                               collected.attempts_used):
                new.stalls = stalls
            if stalls >= MAX_STALLS:  # the rows wait in their new files: the next run submits them again
                run.stop_reason = (f"batches of {entry.model} ended {stalls} times in a row with nothing done "
                                   f"({entry.note}); {len(collected.again)} rows wait for the next run")
        entry.state = "collected"
        entry.collecting = False
        entry.finished_at = time.time()
        ledger.save()
    run.update_progress()
    if not settings.keep_files:
        for file_id in (entry.file_id, entry.output_file_id, entry.error_file_id):
            if file_id:
                with contextlib.suppress(BatchApiError):
                    await run.api.delete_file(file_id)
    for kind in ("output", "errors"):
        with contextlib.suppress(OSError):
            os.remove(ledger.path_of(entry, kind))


def _forget_unknown_batch(run: BatchRun, entry: BatchFile) -> None:
    """The server does not know a batch of ours (HTTP 404): it lost it, or the key is another organisation's.
    Its file is planned again, so its rows are not lost; a batch that still runs elsewhere is paid twice."""
    get_run_logger().warning(
        "The server does not know batch %s of %s (HTTP 404); its %d rows are submitted again. If the API key or "
        "organisation changed since it was created, that batch still runs there and its rows are paid twice: stop "
        "this run and use the old key to collect it", entry.batch_id, entry.name, entry.rows)
    entry.note = f"batch {entry.batch_id} unknown to the server (HTTP 404); submitted again"
    entry.state, entry.batch_id, entry.status, entry.counts, entry.file_id = "planned", None, None, {}, None
    entry.output_file_id = entry.error_file_id = entry.creation = None
    run.ledger.save()


def _short_download(ledger: BatchLedger, entry: BatchFile) -> Optional[str]:
    """What is wrong with a batch's downloaded result files (the last line cut off, fewer lines than the batch
    counted done), or None when they hold what the batch reported. Only the lines are counted and each file's
    last line parsed: a transfer cut short loses the end (lines are parsed once, when collected)."""
    whole = broken = 0
    for kind in ("output", "errors"):
        path = ledger.path_of(entry, kind)
        if not os.path.exists(path):
            continue
        last = b""
        with open(path, "rb") as handle:
            for raw in handle:
                if raw.strip():
                    whole += 1
                    last = raw
        if last:
            try:
                fast_json.loads(last)
            except ValueError:
                whole, broken = whole - 1, broken + 1
    expected = int(entry.counts.get("completed", 0)) + int(entry.counts.get("failed", 0))
    if broken:
        return f"{broken} file(s) ending in a line cut off"
    if whole < min(expected, entry.rows):
        return f"{whole:,} lines where the batch counted {expected:,} requests done"
    return None


def _rows_done(parts: Dict[int, PartWriter]) -> set:
    """(shard, line index) of every row with its final record in the parts."""
    return {(shard, index) for shard, part in parts.items() for index in read_part_state(part.path).done}


async def _submit_ready(run: BatchRun, logger: Any) -> None:
    """Upload and create the batches of every file the enqueued-token cap has room for."""
    ledger = run.ledger
    position = 0
    while position < len(ledger.files):  # files a split adds are met too
        entry = ledger.files[position]
        position += 1
        if entry.state not in ("planned", "uploaded"):
            continue
        cap = _queue_cap(ledger, run.settings, entry.model)
        queued = ledger.queued_tokens(entry.model)
        validating = any(other.model == entry.model and (other.state == "creating" or (
            other.state == "submitted" and other.status not in ACCEPTED_STATUSES)) for other in ledger.files)
        if cap is None and validating:
            continue  # no cap known: one batch of a model validates at a time, so a refusal comes at most once
        if cap is not None and entry.tokens > cap and entry.rows > 1:
            await _split(run, entry, logger)
            continue
        if cap is not None and queued > 0 and queued + entry.tokens > cap:
            continue
        fresh_upload = entry.state == "planned"
        if fresh_upload:
            entry.file_id = await run.api.upload(ledger.path_of(entry, "input"), f"{ledger.job[:12]}-{entry.name}.jsonl")
            entry.state = "uploaded"
            ledger.save()
        ledger.begin_creation(entry)
        kill_point("batch-creating")
        try:
            batch = await _create(run, entry, logger)
        except BatchApiError as error:
            if error.status not in REFUSED_FILE_STATUSES + (404,):
                raise
            if not fresh_upload:  # uploaded by an earlier run: the server may have lost that file; upload it again
                logger.warning("%s: creating its batch failed (%s); its file is uploaded again", entry.name, error)
                entry.state, entry.file_id, entry.creation = "planned", None, None
                ledger.save()
                position -= 1
                continue
            if error.status == 404:
                raise
            entry.note = f"refused: {error}"  # still "creating": a crash before it is collected tries again
            logger.error("%s: the server refused to create its batch (%s); its %d rows get this error", entry.name,
                         error, entry.rows)
            run.errors.note(str(error))
            await _collect(run, entry, logger, failure=str(error), failure_final=True)
            continue
        kill_point("batch-created")
        entry.batch_id = str(batch["id"])
        entry.state = "submitted"
        _note_batch(entry, batch)
        ledger.save()
        logger.info("Submitted %s as batch %s: %d %s requests to %s", entry.name, entry.batch_id, entry.rows,
                    entry.model, entry.endpoint)


async def _split(run: BatchRun, entry: BatchFile, logger: Any) -> None:
    """A file larger than the learned cap: its rows go into files that fit; the old one is retired."""
    ledger = run.ledger
    new_files = write_retry_files(ledger, entry, None, run.limits, set(), round_number=entry.round)
    for new in new_files:
        new.stalls = entry.stalls
    logger.info("%s holds %d estimated tokens, above the enqueued-token cap; split into %d files", entry.name,
                entry.tokens, len(new_files))
    entry.state, entry.note = "collected", f"split into {', '.join(new.name for new in new_files)}"
    ledger.save()
    if entry.file_id and not run.settings.keep_files:
        with contextlib.suppress(BatchApiError):
            await run.api.delete_file(entry.file_id)


async def _create(run: BatchRun, entry: BatchFile, logger: Any) -> Dict[str, Any]:
    """Create the batch of ``entry`` (recorded as ``creating``). A create whose answer was lost may have made
    the batch: before each new try, the batch is looked for by the creation token, so it is never made twice."""
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            return await run.api.create(entry.file_id or "", entry.endpoint, run.ledger.metadata(entry))
        except BatchApiError as error:
            if not error.transient or attempt == CREATE_ATTEMPTS:
                raise
            logger.warning("%s: creating its batch got no clear answer (%s); looking for it before trying again",
                           entry.name, error)
        await asyncio.sleep(backoff_seconds(attempt, 1.0))
        found = await _search_creations(run, {entry.creation or "": entry})
        if found:
            logger.info("%s: the batch was made after all (%s); it is not created again", entry.name, found[0]["id"])
            return found[0]
    raise AssertionError("unreachable")


async def _search_creations(run: BatchRun, wanted: Dict[str, BatchFile]) -> List[Dict[str, Any]]:
    """The server's batches of this job whose creation token is in ``wanted`` (newest first, a bounded search)."""
    ledger = run.ledger
    left = dict(wanted)
    oldest = min(entry.created_at or 0.0 for entry in wanted.values()) - 600
    found = []
    seen = 0
    async for batch in run.api.batches():
        seen += 1
        metadata = batch.get("metadata") or {}
        token = metadata.get("parallel_requests_creation")
        if token in left and metadata.get("parallel_requests_job") == ledger.job and batch.get("id"):
            left.pop(token)
            found.append(batch)
        if not left or seen >= SEARCH_LIMIT or (batch.get("created_at") or 0) < oldest:
            break
    return found


async def _other_jobs_batches(run: BatchRun, logger: Any) -> Optional[str]:
    """Why this job must not submit yet: batches of the same input, from another work folder's run, still run
    on the server (their rows would be paid twice); None when there are none (or the server cannot list)."""
    ledger = run.ledger
    others: Dict[str, int] = {}
    oldest = time.time() - 26 * 3600  # a batch ends within 24 hours
    seen = 0
    try:
        async for batch in run.api.batches():
            seen += 1
            metadata = batch.get("metadata") or {}
            job = metadata.get("parallel_requests_job")
            if (metadata.get("parallel_requests_input") == ledger.input_key and job and job != ledger.job
                    and batch.get("status") not in TERMINAL_STATUSES):
                others[str(job)] = others.get(str(job), 0) + 1
            if seen >= SEARCH_LIMIT or (batch.get("created_at") or 0) < oldest:
                break
    except BatchApiError as error:
        logger.info("Could not list the server's batches to look for another run's batches of this input: %s", error)
        return None
    if not others:
        return None
    described = ", ".join(f"job {job} ({count} batch(es))" for job, count in others.items())
    message = (f"batches of this input from another work folder still run on the server: {described}; run the "
               "command with that run's --work-dir to collect them (or cancel them), so no row is paid twice")
    logger.error("%s", message)
    return message


async def _find_lost_creations(run: BatchRun, logger: Any) -> None:
    """Files recorded as ``creating``: find the batch a dead run created (by its token), or create again."""
    ledger = run.ledger
    lost = {entry.creation: entry for entry in ledger.files if entry.state == "creating" and entry.creation}
    if lost:
        for batch in await _search_creations(run, lost):
            entry = lost.pop(batch["metadata"]["parallel_requests_creation"])
            entry.batch_id, entry.state = str(batch["id"]), "submitted"
            _note_batch(entry, batch)
            ledger.save()
            logger.info("Found batch %s of %s, created by an interrupted run; it is not created again",
                        entry.batch_id, entry.name)
    for entry in ledger.files:  # the create never reached the server
        if entry.state == "creating" and entry.batch_id is None:
            entry.state, entry.creation = "uploaded", None
    ledger.save()


async def _cancel_live(run: BatchRun, logger: Any) -> None:
    """Cancel every running batch (on Ctrl-C with ``cancel_on_interrupt``); the next run collects what they did."""
    for entry in run.ledger.files:
        if entry.state == "submitted" and entry.status not in TERMINAL_STATUSES:
            with contextlib.suppress(Exception):
                _note_batch(entry, await run.api.cancel(entry.batch_id or ""))
                logger.warning("Cancelled batch %s (%s); the next run collects what it finished", entry.batch_id,
                               entry.name)
    run.ledger.save()


def _learn_queue_cap(ledger: BatchLedger, entry: BatchFile, message: str, logger: Any) -> None:
    """A batch refused for the enqueued-token cap: learn the cap, from the message or from what was queued."""
    stated = STATED_QUEUE_LIMIT.search(message)
    others = ledger.queued_tokens(entry.model) - (entry.tokens if entry.queued else 0)
    if stated:
        cap = int(int(stated.group(1).replace(",", "")) * QUEUE_MARGIN)
    elif others > 0:
        cap = others  # what was queued then was accepted: the cap is at least that
    else:
        cap = max(1, entry.tokens // 2)
    known = ledger.learned_queue_tokens.get(entry.model)
    ledger.learned_queue_tokens[entry.model] = cap if known is None else min(known, cap)
    logger.warning("Batch %s of %s was refused for the enqueued-token cap; %s's batches now keep under %d "
                   "estimated tokens queued", entry.batch_id, entry.name, entry.model,
                   ledger.learned_queue_tokens[entry.model])


def live_batches_in(generation_path: str) -> int:
    """How many batches of a generation may still run on the server (0 without a ledger)."""
    if not os.path.exists(os.path.join(generation_path, LEDGER)):
        return 0
    try:
        ledger = BatchLedger.load(generation_path, "")
    except (OSError, ValueError):
        return 0
    return sum(entry.live for entry in ledger.files)


def _queue_cap(ledger: BatchLedger, settings: BatchSettings, model: str) -> Optional[int]:
    """The enqueued-token cap a model's batches keep under, when one is known."""
    caps = [cap for cap in (ledger.learned_queue_tokens.get(model),
                            int(settings.queue_tokens * QUEUE_MARGIN) if settings.queue_tokens else None) if cap]
    return min(caps) if caps else None


def _note_batch(entry: BatchFile, batch: Dict[str, Any]) -> None:
    """Copy a batch object's status, counts and result files into its ledger entry."""
    entry.status = batch.get("status")
    counts = batch.get("request_counts") or {}
    entry.counts = {name: int(counts.get(name) or 0) for name in ("total", "completed", "failed")}
    entry.output_file_id = batch.get("output_file_id") or entry.output_file_id
    entry.error_file_id = batch.get("error_file_id") or entry.error_file_id


def _tracker_from_part(shard: ShardSpec, part_path: str) -> StatusTracker:
    """A shard's counts at the start of a resumed run: its rows, and those already settled."""
    state = read_part_state(part_path)
    return StatusTracker(shard=shard.index, lines_read=state.lines_read or 0, rows=state.rows or 0,
                         resumed_rows=len(state.done))


def _table_row(entry: BatchFile) -> Dict[str, Any]:
    """One row of the batches table."""
    return {"file": entry.name, "batch_id": entry.batch_id, "model": entry.model, "endpoint": entry.endpoint,
            "rows": entry.rows, "state": entry.state, "status": entry.status,
            "completed": entry.counts.get("completed", 0), "failed": entry.counts.get("failed", 0),
            "created": _when(entry.created_at), "finished": _when(entry.finished_at), "note": entry.note or ""}


def _when(epoch: Optional[float]) -> Optional[str]:
    """An epoch time as UTC text."""
    return None if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


async def _publish_batches_table(table: List[Dict[str, Any]]) -> None:
    """The batches table artifact (only inside a flow run)."""
    if FlowRunContext.get() is not None and table:
        await acreate_table_artifact(key=BATCHES_TABLE_KEY, table=table, description="The job's batches")
