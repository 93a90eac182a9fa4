"""The parallel-requests flow: push a JSONL file of requests through one shared rate-limit engine.

A drop-in for the OpenAI Cookbook's ``api_request_parallel_processor.py``. Its flags and file
formats work unchanged, as a Prefect 3 flow named ``parallel-requests``. From the command line
(see ``flows.command_line``):

    parallel-requests \\
        --requests_filepath examples/example_requests.jsonl \\
        --save_filepath examples/output/example_requests_results.jsonl \\
        --request_url https://api.openai.com/v1/chat/completions \\
        --max_requests_per_minute 1500 \\
        --max_tokens_per_minute 125000 \\
        --token_encoding_name cl100k_base \\
        --max_attempts 5 \\
        --logging_level 20

The same runs as ``python -m flows.parallel_requests ...`` (the command line, run by name). From Python, or as a deployment:
``await parallel_requests(requests_filepath="requests.jsonl", request_url=...)``.

What happens:
    1. The input (cookbook or Batch API shape, detected per file) is split into byte-range shards.
    2. Every shard runs as an async Prefect task. All of them are awaited together on the flow's
       event loop, and they share one rate-limit engine (RPM and TPM buckets, in-flight cap) and
       one aiohttp session.
    3. Results go to one JSONL file in input order, written atomically. Every non-blank input
       line gets exactly one output line. The metrics are published as flow artifacts (a
       progress bar, a per-shard table, a markdown summary).

Input/output:
    - ``save_filepath`` defaults to the input's name with ``_results.jsonl``, as the Cookbook's.
    - The flow never takes the API key as a parameter. It reads it from an environment
      variable named by ``api_key_env_var`` (default ``OPENAI_API_KEY``), or from a Prefect
      Secret block named by ``api_key_secret_block``.
    - The flow ends Completed when every row has its result, and Failed with the reason when
      dispatching stopped early (bad key, no quota). Either way it carries the summary.

Pitfalls:
    - The limits default to the Cookbook's (1,500 RPM, 125,000 TPM). None means no limit.
    - Token estimation is needed only for a TPM limit. With no TPM limit the flow skips it,
      and no encoding is loaded.
"""

# Standard library imports
import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import runpy
import time
from typing import Any, Dict, Iterator, Optional, Union

# Third-party imports
from prefect import flow, get_run_logger
from prefect.concurrency.asyncio import concurrency
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed, Failed, State

# Local application imports
from flows.parallel_requests_shards import run_shards_as_child_runs, run_shards_on_dask
from tasks.reporting.metrics import (
    RunProgress,
    RunSummary,
    StatusTracker,
    publish_dry_run_artifact,
    publish_run_artifacts,
)
from tasks.reporting.dry_run import plan_dry_run
from tasks.requests.pricing import PriceTable, format_usd
from tasks.job.settings import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_IN_FLIGHT,
    MAX_BATCH_REQUESTS,
    check_batch_settings,
    default_save_path,
    validate_settings,
)
from tasks.limits.learned_limits import (
    FALLBACK_REQUESTS_PER_MINUTE,
    FALLBACK_TOKENS_PER_MINUTE,
    finite_limit,
    lower_limit,
)
from tasks.limits.redis_engine import LimiterUnavailable, check_limiter
from tasks.api.api_client import check_api_key
from tasks.job.crash_points import kill_point
from tasks.job.job_lock import JobLock, JobLocked
from tasks.requests.request_formats import DEFAULT_REQUEST_URL
from tasks.storage.results_storage import IncompleteOutput, PartInfo, assemble_output, count_lines
from tasks.storage.row_reuse import reuse_paid_answers
from tasks.platform.prefect_blocks import resolve_api_key, transport_params_for
from tasks.batch.batch_runner import BatchOutcome, BatchSettings, live_batches_in, merge_batch_counts, run_batches
from tasks.shards.runner import EngineSettings, ShardJob, ShardOutcome, ShardPlacement, run_shards_here
from tasks.shards.sharding import detect_source_shape, plan_shards
from tasks.storage.uris import (
    abort_stale_uploads,
    compression_of,
    decompress_to,
    describe_storage_error,
    input_fingerprint,
    input_size,
    output_size,
    remove_stale_temporaries,
)
from tasks.reporting.live_reports import live_reports, publish_timeline
from tasks.reporting.run_events import emit_run_event
from tasks.requests.token_estimation import TokenEstimator
from tasks.job.work_location import WorkFolderRefused, WorkLocation, default_work_dir

# The garbage collector's first threshold while shards run (Python's default is 700).
SENDING_GC_THRESHOLD = 10_000


@flow(name="parallel-requests", flow_run_name=lambda: _flow_run_name(), persist_result=False)
async def parallel_requests(
    requests_filepath: str,
    save_filepath: Optional[str] = None,
    request_url: str = DEFAULT_REQUEST_URL,
    max_requests_per_minute: Optional[float] = None,
    max_tokens_per_minute: Optional[float] = None,
    mode: str = "online",
    token_encoding_name: Optional[str] = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    shards: Optional[int] = None,
    burst_seconds: float = 1.0,
    target_utilization: float = 0.98,
    request_timeout_seconds: float = 300.0,
    retry_base_seconds: float = 0.25,
    api_key_env_var: Optional[str] = "OPENAI_API_KEY",
    api_key_secret_block: Optional[str] = None,
    work_dir: Optional[str] = None,
    wait_for_lock: bool = False,
    aws_credentials_block: Optional[str] = None,
    run_concurrency_limit: Optional[str] = None,
    dry_run: bool = False,
    price_table: Optional[str] = None,
    budget_usd: Optional[float] = None,
    model_limits: Optional[Union[Dict[str, Dict[str, float]], str]] = None,
    learn_limits: bool = True,
    limiter: Optional[str] = None,
    limiter_name: Optional[str] = None,
    shard_deployment: Optional[str] = None,
    dask_cluster: Optional[str] = None,
    batch_submit_only: bool = False,
    batch_fallback: str = "batch",
    keep_batch_files: bool = False,
    cancel_batches: bool = False,
    batch_queue_tokens: Optional[int] = None,
    batch_max_requests: int = MAX_BATCH_REQUESTS,
    progress_every_seconds: Optional[float] = 30.0,
) -> State:
    """Send every request of a JSONL file through one shared rate-limit engine and save the results.

    Args:
        requests_filepath: the JSONL input (cookbook or Batch API shape).
        save_filepath: the JSONL output; default: the input's name with ``_results.jsonl``.
        request_url: the API endpoint (cookbook lines) or the base URL (Batch lines' paths).
        max_requests_per_minute: the request limit. None: learn it from the server's
            ``x-ratelimit-*`` headers (see learn_limits). The server's headers lower any limit.
        max_tokens_per_minute: the token limit, likewise.
        mode: ``online`` sends each request under the rate limits; ``batch`` sends the job through the
            OpenAI Batch API (half the price, results within 24 hours; see ``tasks.batch.batch_runner``).
        token_encoding_name: force a tiktoken encoding; None follows each request's model.
        max_attempts: how many times a request is tried, at most, on retryable failures.
        max_in_flight: how many requests may await an answer at once, across all shards.
        shards: how many shards to split the input into; None follows the input size.
        burst_seconds: the shortest window the server may count its limits in; the buckets hold this
            times (1 - target_utilization) seconds of each limit, so no such window goes over.
        target_utilization: the share of each limit the engine aims for (headroom against 429s).
        request_timeout_seconds: the timeout of one attempt.
        retry_base_seconds: the first retry's backoff; it doubles with each retry, with jitter.
        api_key_env_var: the environment variable holding the API key.
        api_key_secret_block: a Prefect Secret block holding the API key (wins over the variable).
        work_dir: where the run keeps its parts and resume state; default beside a local output,
            or a local cache folder for a remote one.
        aws_credentials_block: a prefect-aws AwsCredentials block for S3 (default: the standard
            AWS configuration, ``AWS_ENDPOINT_URL_S3`` included).
        run_concurrency_limit: the name of a Prefect global concurrency limit that caps how many
            runs go at once (one slot per run), for example one per API key.
        learn_limits: with a limit of None, start cautiously and learn it from the server (falling
            back to the Cookbook's 1,500 RPM / 125,000 TPM); False makes None mean no limit.
        dry_run: read and check the whole input, count tokens, estimate cost and duration, and
            send nothing.
        price_table: a JSON file of prices per model that overrides and extends the shipped one.
        budget_usd: stop dispatching when the next request could take the run's cost above this
            (each request counted at its most: completions at max_tokens); the run can resume later.
        model_limits: limits per model, as a mapping or the path of a JSON file:
            ``{"gpt-4o-mini": {"requests_per_minute": 5000, "tokens_per_minute": 2000000}}``.
            Each model (and endpoint) has buckets of its own; other models use the limits above.
        limiter: a Redis URL (``redis://host:port/db``) that holds the limits, shared by every
            process and machine using the same API host, key and model; None keeps the engine in
            this process. A password, if any, comes from ``PARALLEL_REQUESTS_REDIS_PASSWORD``.
        limiter_name: the shared limits' name; None derives it from the API host and a
            fingerprint of the key.
        shard_deployment: run each shard as a child flow run of this deployment (for example
            ``parallel-requests-shards/workers``) on its work pool's workers, instead of in this
            process. Needs ``limiter``, and a work location every worker can reach (``work_dir``).
        dask_cluster: run each shard as a task on a Dask cluster with prefect-dask's DaskTaskRunner:
            ``local`` (worker processes on this machine), ``local:N``, or a scheduler address such as
            ``tcp://10.0.0.5:8786``. Needs ``limiter`` (and ``work_dir`` reachable by every worker).
        wait_for_lock: when another run of the same job (the same output) is in progress, wait for it
            to finish instead of failing at once. Either way no row is sent twice.
        batch_submit_only: batch mode: submit and collect what has ended, never wait; the same call later
            collects the rest and submits nothing twice (for a scheduled deployment).
        batch_fallback: batch mode: where rows an expired or failed batch left go: ``batch`` (a new batch)
            or ``online`` (the online engine, once no batch runs).
        keep_batch_files: batch mode: keep the input and result files on the server.
        cancel_batches: batch mode: cancel the running batches when the run is interrupted (by default
            they keep running, paid for, and the next run collects them).
        batch_queue_tokens: batch mode: the enqueued-token cap per model (OpenAI's batch queue limit);
            None learns it from the first refusal.
        batch_max_requests: batch mode: the most requests per batch file (the API allows 50,000).
        progress_every_seconds: log a progress line this often while sending (rows, rate against the
            limit, 429s, cost, ETA); None or 0: none (the command line's live display shows it instead).

    Returns:
        A Completed state when every row has its result, a Failed state naming the reason
        otherwise; either carries the run summary as a dict.
    """
    logger = get_run_logger()
    started = time.monotonic()
    save_filepath = save_filepath or default_save_path(requests_filepath)
    validate_settings(max_requests_per_minute, max_tokens_per_minute, max_attempts, max_in_flight, shards,
                      burst_seconds, target_utilization, limiter, shard_deployment, dask_cluster,
                      uris=(requests_filepath, save_filepath, work_dir or default_work_dir(save_filepath)),
                      request_url=request_url)
    check_batch_settings(mode, batch_fallback, batch_queue_tokens, batch_max_requests, budget_usd, shard_deployment,
                         dask_cluster)
    try:
        api_key = check_api_key(await resolve_api_key(api_key_env_var, api_key_secret_block))
    except ValueError as error:  # a key the HTTP stack would refuse: stop before anything is marked failed
        logger.error("%s", error)
        return Failed(message=str(error))
    transport_params = await transport_params_for(aws_credentials_block)
    prices = PriceTable.load(price_table)
    if dry_run:
        return await _dry_run(logger, requests_filepath, request_url, token_encoding_name, prices, learn_limits,
                              max_requests_per_minute, max_tokens_per_minute, transport_params)
    try:
        work = WorkLocation.open(save_filepath, work_dir)
    except (WorkFolderRefused, OSError) as error:
        logger.error("%s", error)
        return Failed(message=str(error))
    lock = JobLock.for_job(save_filepath, work.path, limiter, str(current_flow_run.id or "") or None)
    try:
        await asyncio.to_thread(lock.acquire, wait_for_lock,
                                lambda holder: logger.warning("Waiting for the job's lock, held by %s", holder.describe()))
    except JobLocked as error:
        logger.error("%s", error)
        return Failed(message=str(error))
    except Exception as error:  # the lock's folder or Redis cannot be reached: nothing was read or sent
        message = f"cannot take the job's lock: {type(error).__name__}: {error}"
        logger.error("%s", message)
        return Failed(message=message)
    try:
        job = ShardJob(
            request_url=request_url, shape="cookbook", max_attempts=max_attempts, retry_base_seconds=retry_base_seconds,
            request_timeout_seconds=request_timeout_seconds, token_encoding_name=token_encoding_name,
            api_key_env_var=api_key_env_var, api_key_secret_block=api_key_secret_block,
            aws_credentials_block=aws_credentials_block, price_table=price_table, budget_usd=budget_usd,
            engine=EngineSettings(max_requests_per_minute, max_tokens_per_minute, max_in_flight,
                                  _read_model_limits(model_limits), burst_seconds, target_utilization, learn_limits,
                                  limiter, limiter_name),
        )
        placement = ShardPlacement(shards, shard_deployment, dask_cluster, run_concurrency_limit)
        batch = None if mode == "online" else BatchSettings(
            submit_only=batch_submit_only, fallback=batch_fallback, keep_files=keep_batch_files,
            cancel_on_interrupt=cancel_batches, queue_tokens=batch_queue_tokens, max_requests=batch_max_requests)
        return await _run_job(logger, started, job, placement, requests_filepath, save_filepath, work, lock, api_key,
                              transport_params, batch, progress_every_seconds or None)
    finally:
        await asyncio.to_thread(lock.release)


async def _run_job(logger: Any, started: float, job: ShardJob, placement: ShardPlacement, requests_filepath: str,
                   save_filepath: str, work: WorkLocation, lock: JobLock, api_key: Optional[str],
                   transport_params: Optional[Dict[str, Any]], batch: Optional[BatchSettings] = None,
                   progress_every_seconds: Optional[float] = None) -> State:
    """The job, with its lock held: resume or start, reuse paid answers, run the shards (or the batches), finish the output."""
    try:
        work.reload()
        abort_stale_uploads(save_filepath, transport_params)
        remove_stale_temporaries(save_filepath)
        fingerprint = await asyncio.to_thread(input_fingerprint, requests_filepath, transport_params)
        refusal = _batches_still_running(work, fingerprint, job.request_url, batch)
        if refusal:
            logger.error("%s", refusal)
            return Failed(message=refusal)
        start = work.begin(requests_filepath, fingerprint, job.request_url, output_size(save_filepath, transport_params))
    except WorkFolderRefused as error:
        logger.error("%s", error)
        return Failed(message=str(error))
    except Exception as error:  # storage trouble ends the run with one line naming the URI
        return _storage_failure(logger, requests_filepath, error)
    if start.already_complete:
        logger.info("%s is already complete for this input; nothing to send", save_filepath)
        return Completed(message="already complete: nothing sent",
                         data={"output": save_filepath, "complete": True, "already_complete": True})
    try:
        source = _shardable_source(requests_filepath, work, transport_params)
        size = input_size(source, transport_params)
        shape = detect_source_shape(source, transport_params)
        shard_specs = plan_shards(source, work.shard_count or placement.shards, size, transport_params)
        if work.shard_count is None:
            work.record_shard_count(len(shard_specs))
        if start.needs_reuse_pass:
            reused = await asyncio.to_thread(reuse_paid_answers, work, start.reuse_sources, shard_specs, shape,
                                             job.request_url, transport_params)
            work.record_reuse_done(work.reused_rows + reused)
    except Exception as error:
        return _storage_failure(logger, requests_filepath, error)
    job = dataclasses.replace(job, shape=shape.value)
    if job.budget_usd is not None:
        await _price_against_budget(logger, source, job, transport_params)
    logger.info("Read %s: %d bytes, %s shape, %d shard(s); results go to %s%s%s", requests_filepath, size,
                shape.value, len(shard_specs), save_filepath, f" (resuming from {work.path})" if start.resumed else "",
                f"; {work.reused_rows} earlier answers reused" if work.reused_rows else "")

    part_paths = [work.part_path(shard.index, shard.count) for shard in shard_specs]
    progress = RunProgress(total_bytes=size)
    run_slot = (concurrency(placement.run_concurrency_limit, occupy=1) if placement.run_concurrency_limit
                else contextlib.nullcontext())
    reports = live_reports(progress, os.path.basename(requests_filepath), progress_every_seconds, logger,
                           job_id=work.generation)
    async with run_slot, reports:
        try:
            if placement.shard_deployment or placement.dask_cluster:
                await check_limiter(str(job.engine.limiter))  # the shards' engines share it: check it is there
            if batch is not None:
                outcome, batches = await _run_batch_mode(logger, job, batch, shard_specs, part_paths, work, progress,
                                                         size, api_key, transport_params, lock)
            elif placement.shard_deployment:
                outcome = await run_shards_as_child_runs(placement.shard_deployment, job, shard_specs, part_paths,
                                                         work.generation, progress)
            elif placement.dask_cluster:
                outcome = await run_shards_on_dask(placement.dask_cluster, job, shard_specs, part_paths,
                                                   work.generation, progress)
            else:
                with _collector_tuned_for_sending():
                    outcome = await run_shards_here(job, shard_specs, part_paths, work.generation, progress,
                                                    api_key, transport_params, lock.lost)
        except LimiterUnavailable as error:
            logger.error("%s", error)
            return Failed(message=str(error))
    trackers = outcome.trackers
    if batch is None:
        batches = None
    if lock.lost.is_set():
        message = "another run took this job's lock while this one ran; this run leaves the output to it"
        logger.error("%s", message)
        return Failed(message=message)

    totals = StatusTracker.merged(trackers)
    complete = outcome.stop_reason is None and totals.rows_done == totals.rows
    if complete and await asyncio.to_thread(input_fingerprint, requests_filepath, transport_params) != fingerprint:
        message = ("the input changed while this run read it; its rows are kept, nothing was marked complete: "
                   "run the same command again")
        logger.error("%s", message)
        return Failed(message=message)
    parts = [PartInfo(path, line_count=tracker.lines_read) for path, tracker in zip(part_paths, trackers)]
    output_note = None
    try:
        if complete:
            report = await asyncio.to_thread(assemble_output, save_filepath, parts, shape,
                                             os.path.basename(requests_filepath), transport_params, True)
        else:
            existing = count_lines(save_filepath, transport_params)  # None: there is no output yet
            report = await asyncio.to_thread(assemble_output, save_filepath, parts, shape,
                                             os.path.basename(requests_filepath), transport_params, False, existing)
            if not report.written and existing is not None:
                output_note = (f"not rewritten: it already holds {existing:,} lines, as many as or more than the "
                               f"{report.rows_written:,} finished rows of this input; those stay in {work.path}")
            elif not report.written:
                output_note = f"not written: no row has finished; rerun to continue (work folder {work.path})"
    except IncompleteOutput as error:
        logger.error("%s; run the same command again to continue", error)
        return Failed(message=f"{error}; run the same command again to continue")
    except Exception as error:
        return _storage_failure(logger, save_filepath, error)
    summary = RunSummary(
        source=requests_filepath, output=save_filepath, totals=totals, shards=trackers,
        max_requests_per_minute=finite_limit(lower_limit(job.engine.max_requests_per_minute, outcome.learned_requests)),
        max_tokens_per_minute=finite_limit(lower_limit(job.engine.max_tokens_per_minute, outcome.learned_tokens)),
        stop_reason=outcome.stop_reason, error_examples=report.invalid_line_examples + outcome.error_examples,
        duration_seconds=time.monotonic() - started, reused_rows=work.reused_rows, output_note=output_note,
        limit_notes=outcome.limit_notes, batch_notes=batches.notes() if batches else [],
        latency=progress.live.latency_summary(), timeline=progress.live.timeline_rows(),
    )
    await publish_run_artifacts(summary)
    await publish_timeline(progress, os.path.basename(requests_filepath))
    _emit_end_events(summary, job, work.generation, os.path.basename(requests_filepath), batches)
    if batches is not None and not summary.complete and summary.stop_reason is None and batches.waiting_on_server:
        message = (f"{batches.live_batches} batch(es) running on the server, {batches.waiting_files} file(s) waiting "
                   "to be submitted; run the same command again to collect them")
        logger.info("%s", message)
        return Completed(message=message, data=summary.to_dict())
    if summary.complete:
        kill_point("manifest")
        work.mark_complete(report.rows_written, report.local_errors, output_size(save_filepath, transport_params))
        kill_point("cleanup")
        work.clean()
        logger.info("Done: %d rows in %s (%.1f s)", summary.totals.rows, save_filepath, summary.duration_seconds)
        return Completed(message=f"{summary.totals.rows} rows done", data=summary.to_dict())
    reason = summary.stop_reason or "some rows have no result"
    logger.error("Stopped early: %s. The %d finished rows are in %s; run the same command again to continue",
                 reason, summary.totals.rows_done, save_filepath if report.written else work.path)
    return Failed(message=f"stopped early: {reason}", data=summary.to_dict())


# Helpers


def _batches_still_running(work: WorkLocation, fingerprint: str, request_url: str,
                           batch: Optional[BatchSettings]) -> Optional[str]:
    """Why this run must not start while the job's batches run on the server, or None.

    Their rows are paid for: an online run would send them again, and a changed input would start a new
    generation whose rows are sent again while the old batches' answers are never collected.
    """
    current = work.manifest.get("current")
    if not current:
        return None
    live = live_batches_in(work.generation_folder(current["id"]))
    if not live:
        return None
    same_input = current.get("input_fingerprint") == fingerprint and current.get("request_url") == request_url
    if batch is None and same_input:
        return (f"{live} batch(es) of this job still run on the server (paid for): an online run would pay for their "
                "rows again; run it with --mode batch to collect them (batches end within 24 hours)")
    if not same_input:
        return (f"the input (or the request URL) changed while {live} batch(es) of the earlier input still run on the "
                "server; restore it and run --mode batch to collect them first, so no row is paid twice")
    return None


def _emit_end_events(summary: RunSummary, job: ShardJob, job_id: str, source_name: str,
                     batches: Optional[BatchOutcome]) -> None:
    """The run's end as Prefect events: finished, or stopped (and budget-reached); nothing while batches wait."""
    data = summary.to_dict()
    if summary.complete:
        emit_run_event("finished", job_id, source_name, data)
        return
    if batches is not None and summary.stop_reason is None and batches.waiting_on_server:
        return
    if job.budget_usd is not None and (summary.stop_reason or "").startswith("budget of"):
        emit_run_event("budget-reached", job_id, source_name, data)
    emit_run_event("stopped", job_id, source_name, data)


async def _run_batch_mode(logger: Any, job: ShardJob, batch: BatchSettings, shard_specs: Any, part_paths: Any,
                          work: WorkLocation, progress: RunProgress, size: int, api_key: Optional[str],
                          transport_params: Optional[Dict[str, Any]], lock: JobLock) -> Any:
    """Batch mode: the batches, then (``fallback="online"``, once no batch runs) the rows they left, online."""
    fingerprint = (work.manifest.get("current") or {}).get("input_fingerprint")
    input_key = hashlib.sha256(f"{fingerprint}\n{job.request_url}".encode()).hexdigest()[:24] if fingerprint else ""
    result = await run_batches(job, batch, shard_specs, part_paths, work.generation_path, work.generation, progress,
                               api_key, transport_params, lock.lost, input_key)
    outcome = ShardOutcome(trackers=result.trackers, stop_reason=result.stop_reason,
                           error_examples=list(result.error_examples))
    left = sum(tracker.rows - tracker.rows_done for tracker in result.trackers)
    if batch.fallback == "online" and left and result.stop_reason is None and not result.waiting_on_server:
        logger.info("%d rows the batches left go through the online engine", left)
        progress.total_bytes, progress.done_bytes = size, 0
        with _collector_tuned_for_sending():
            online = await run_shards_here(job, shard_specs, part_paths, work.generation, progress, api_key,
                                           transport_params, lock.lost)
        online.trackers = [merge_batch_counts(tracker, counts) for tracker, counts in zip(online.trackers, result.trackers)]
        online.error_examples = list(result.error_examples) + online.error_examples
        outcome = online
    return outcome, result


@contextlib.contextmanager
def _collector_tuned_for_sending() -> Iterator[None]:
    """Keep the garbage collector from rescanning Prefect's large heap while requests fly.

    Each request allocates a few dozen short-lived objects, so the collector runs very
    often. Each full pass walks every object Prefect, pydantic and SQLAlchemy keep alive,
    and these passes cost a third of the no-limit request rate (measured with the
    benchmark). Freezing what exists now moves it out of the collector's sight. A larger
    first threshold makes passes rarer. Both are undone when the shards finish.
    """
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(SENDING_GC_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def _dry_run(logger: Any, requests_filepath: str, request_url: str, token_encoding_name: Optional[str],
                   prices: PriceTable, learn_limits: bool, max_requests_per_minute: Optional[float],
                   max_tokens_per_minute: Optional[float], transport_params: Optional[Dict[str, Any]]) -> State:
    """Report what the job would send, cost and take; send nothing."""
    requests_limit = max_requests_per_minute
    tokens_limit = max_tokens_per_minute
    if learn_limits:  # limits still to be learned: estimate at the fallback the engine would use
        requests_limit = FALLBACK_REQUESTS_PER_MINUTE if requests_limit is None else requests_limit
        tokens_limit = FALLBACK_TOKENS_PER_MINUTE if tokens_limit is None else tokens_limit
    try:
        report = plan_dry_run(requests_filepath, request_url, TokenEstimator.for_name(token_encoding_name), prices,
                              requests_limit, tokens_limit, transport_params)
    except Exception as error:
        return _storage_failure(logger, requests_filepath, error)
    await publish_dry_run_artifact(report.to_markdown(), requests_filepath)
    logger.info("Dry run of %s: %d requests, %d prompt tokens, %d invalid lines; nothing was sent",
                requests_filepath, report.requests, report.prompt_tokens, report.invalid_lines)
    return Completed(message="dry run: nothing sent", data=report.to_dict())


async def _price_against_budget(logger: Any, source: str, job: ShardJob,
                                transport_params: Optional[Dict[str, Any]]) -> None:
    """Price the whole input in one pass before sending, and say what the budget covers."""
    try:
        plan = await asyncio.to_thread(plan_dry_run, source, job.request_url, TokenEstimator.for_name(job.token_encoding_name),
                                       PriceTable.load(job.price_table), None, None, transport_params)
    except Exception as error:  # pricing is advice: the budget is still kept request by request
        logger.warning("Could not price the input before sending: %s", error)
        return
    cost = plan.estimated_cost_usd or 0.0
    budget = job.budget_usd or 0.0
    unpriced = sum(plan.models[model].requests for model in plan.unpriced_models)
    covered = "all of it" if cost <= budget else f"about {100.0 * budget / cost:.0f}% of it" if cost else "none of it"
    logger.info("Budget %s: the input's %d requests cost at most %s (completions at their maximum); the budget "
                "covers %s%s", format_usd(budget), plan.requests, format_usd(cost), covered,
                f"; {unpriced} requests of models with no price ({', '.join(plan.unpriced_models)}) will be error "
                "records" if unpriced else "")


def _read_model_limits(model_limits: Any) -> Dict[str, Dict[str, float]]:
    """Per-model limits from a mapping, or from the JSON file a string names."""
    if not model_limits:
        return {}
    if isinstance(model_limits, str):
        try:
            with open(model_limits, encoding="utf-8") as handle:
                model_limits = json.load(handle)
        except (OSError, ValueError) as error:
            raise ValueError(f"{model_limits}: cannot read the model limits ({error})") from error
    return {str(model): dict(limits) for model, limits in dict(model_limits).items()}


def _shardable_source(requests_filepath: str, work: WorkLocation, transport_params: Optional[Dict[str, Any]]) -> str:
    """The input itself, or for a compressed input its decompressed copy in the work location."""
    if compression_of(requests_filepath) is None:
        return requests_filepath
    if not os.path.exists(work.decompressed_input):
        decompress_to(requests_filepath, work.decompressed_input, transport_params)
    return work.decompressed_input


def _storage_failure(logger: Any, uri: str, error: BaseException) -> State:
    """End the run with one line naming the URI; results already written stay where they are."""
    message = describe_storage_error(uri, error)
    logger.error("%s", message)
    return Failed(message=message)


def _flow_run_name() -> str:
    """The flow run's name: the input file's name."""
    source = current_flow_run.parameters.get("requests_filepath") or "requests"
    return f"parallel-requests {os.path.basename(str(source))}"


if __name__ == "__main__":
    # ``python -m flows.parallel_requests`` is the command line's other name. It is run, not imported,
    # so the command line (which imports this flow) and the flow never import each other.
    runpy.run_module("flows.command_line", run_name="__main__", alter_sys=True)
