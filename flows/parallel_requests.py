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

The same runs as ``python -m flows.parallel_requests ...``. From Python, or as a deployment:
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
import gc
import os
import shutil
import sys
import time
from typing import Any, Iterator, List, Optional

# Third-party imports
import aiohttp
from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed, Failed, State
from prefect.utilities.annotations import quote

# Local application imports
from flows.command_line import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_REQUESTS_PER_MINUTE,
    DEFAULT_MAX_TOKENS_PER_MINUTE,
    default_save_path,
    main,
    validate_settings,
)
from tasks.api_client import ApiClient
from tasks.metrics import RunProgress, RunSummary, StatusTracker, progress_artifact, publish_run_artifacts
from tasks.rate_limiter import RateLimiter
from tasks.request_formats import DEFAULT_REQUEST_URL, detect_shape
from tasks.results_storage import PartInfo, assemble_output
from tasks.shard_processing import RunSettings, SharedRunState, process_shard
from tasks.sharding import ShardSpec, input_size, plan_shards, read_head
from tasks.token_estimation import TokenEstimator

# The garbage collector's first threshold while shards run (Python's default is 700).
SENDING_GC_THRESHOLD = 10_000


@flow(name="parallel-requests", flow_run_name=lambda: _flow_run_name(), persist_result=False)
async def parallel_requests(
    requests_filepath: str,
    save_filepath: Optional[str] = None,
    request_url: str = DEFAULT_REQUEST_URL,
    max_requests_per_minute: Optional[float] = DEFAULT_MAX_REQUESTS_PER_MINUTE,
    max_tokens_per_minute: Optional[float] = DEFAULT_MAX_TOKENS_PER_MINUTE,
    token_encoding_name: Optional[str] = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    shards: Optional[int] = None,
    burst_seconds: float = 1.0,
    target_utilization: float = 0.98,
    request_timeout_seconds: float = 300.0,
    retry_base_seconds: float = 0.5,
    api_key_env_var: Optional[str] = "OPENAI_API_KEY",
    api_key_secret_block: Optional[str] = None,
) -> State:
    """Send every request of a JSONL file through one shared rate-limit engine and save the results.

    Args:
        requests_filepath: the JSONL input (cookbook or Batch API shape).
        save_filepath: the JSONL output; default: the input's name with ``_results.jsonl``.
        request_url: the API endpoint (cookbook lines) or the base URL (Batch lines' paths).
        max_requests_per_minute: the request limit; None for no limit.
        max_tokens_per_minute: the token limit; None for no limit (no token estimation then).
        token_encoding_name: force a tiktoken encoding; None follows each request's model.
        max_attempts: how many times a request is tried, at most, on retryable failures.
        max_in_flight: how many requests may await an answer at once, across all shards.
        shards: how many shards to split the input into; None follows the input size.
        burst_seconds: how many seconds of each limit the buckets hold (their burst).
        target_utilization: the share of each limit the engine aims for (headroom against 429s).
        request_timeout_seconds: the timeout of one attempt.
        retry_base_seconds: the first retry's backoff; it doubles with each retry, with jitter.
        api_key_env_var: the environment variable holding the API key.
        api_key_secret_block: a Prefect Secret block holding the API key (wins over the variable).

    Returns:
        A Completed state when every row has its result, a Failed state naming the reason
        otherwise; either carries the run summary as a dict.
    """
    logger = get_run_logger()
    started = time.monotonic()
    validate_settings(max_requests_per_minute, max_tokens_per_minute, max_attempts, max_in_flight, shards,
                      burst_seconds, target_utilization)
    api_key = await _resolve_api_key(api_key_env_var, api_key_secret_block)
    save_filepath = save_filepath or default_save_path(requests_filepath)
    size = input_size(requests_filepath)
    shape = detect_shape(read_head(requests_filepath))
    shard_specs = plan_shards(requests_filepath, shards, size)
    work_dir = work_dir_for(save_filepath)
    shutil.rmtree(work_dir, ignore_errors=True)
    os.makedirs(work_dir)
    logger.info("Read %s: %d bytes, %s shape, %d shard(s); results go to %s",
                requests_filepath, size, shape.value, len(shard_specs), save_filepath)

    estimator = TokenEstimator.for_name(token_encoding_name) if max_tokens_per_minute is not None else None
    settings = RunSettings(request_url=request_url, shape=shape, max_attempts=max_attempts,
                           retry_base_seconds=retry_base_seconds, estimate_tokens=estimator is not None)
    limiter = RateLimiter(max_requests_per_minute, max_tokens_per_minute, max_in_flight, burst_seconds,
                          target_utilization)
    progress = RunProgress(total_bytes=size)
    connector = aiohttp.TCPConnector(limit=max_in_flight, limit_per_host=max_in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:
        state = SharedRunState(settings, limiter, ApiClient(session, api_key, request_timeout_seconds),
                               estimator, progress)
        async with progress_artifact(progress):
            with _collector_tuned_for_sending():
                outcomes = await asyncio.gather(
                    *(process_shard(shard, _part_path(work_dir, shard), quote(state)) for shard in shard_specs),
                    return_exceptions=True,
                )

    trackers = _trackers_or_stop(outcomes, shard_specs, state)
    parts = _part_infos(work_dir, shard_specs, trackers)
    report = assemble_output(save_filepath, parts, shape, os.path.basename(requests_filepath))
    summary = RunSummary(
        source=requests_filepath, output=save_filepath, totals=StatusTracker.merged(trackers), shards=trackers,
        max_requests_per_minute=max_requests_per_minute, max_tokens_per_minute=max_tokens_per_minute,
        stop_reason=state.stop_reason, error_examples=report.invalid_line_examples + state.error_examples,
        duration_seconds=time.monotonic() - started,
    )
    await publish_run_artifacts(summary)
    if summary.complete:
        shutil.rmtree(work_dir, ignore_errors=True)
        logger.info("Done: %d rows in %s (%.1f s)", summary.totals.rows, save_filepath, summary.duration_seconds)
        return Completed(message=f"{summary.totals.rows} rows done", data=summary.to_dict())
    reason = summary.stop_reason or "some rows have no result"
    logger.error("Stopped early: %s. The %d finished rows are in %s", reason, summary.totals.rows_done, save_filepath)
    return Failed(message=f"stopped early: {reason}", data=summary.to_dict())


# Helpers


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


def work_dir_for(save_filepath: str) -> str:
    """The folder beside the output that holds the shards' parts while the run goes on."""
    return f"{save_filepath}.work"


def _trackers_or_stop(outcomes: List[Any], shards: List[ShardSpec], state: SharedRunState) -> List[StatusTracker]:
    """The shards' trackers; a shard that crashed stops the run and gets an empty tracker."""
    trackers: List[StatusTracker] = []
    for shard, outcome in zip(shards, outcomes):
        if isinstance(outcome, BaseException):
            state.stop(f"{shard.label} failed: {type(outcome).__name__}: {outcome}")
            trackers.append(StatusTracker(shard=shard.index, rows=1))
        else:
            trackers.append(outcome)
    return trackers


def _part_infos(work_dir: str, shards: List[ShardSpec], trackers: List[StatusTracker]) -> List[PartInfo]:
    """Where each shard's part is and the input line number its first line has."""
    parts, first_line = [], 1
    for shard, tracker in zip(shards, trackers):
        parts.append(PartInfo(_part_path(work_dir, shard), tracker.lines_read, first_line))
        first_line += tracker.lines_read
    return parts


def _part_path(work_dir: str, shard: ShardSpec) -> str:
    """The part file of one shard."""
    return os.path.join(work_dir, f"shard-{shard.index:05d}-of-{shard.count:05d}.part")


async def _resolve_api_key(env_var: Optional[str], secret_block: Optional[str]) -> Optional[str]:
    """Read the API key from a Prefect Secret block, or else from an environment variable."""
    if secret_block:
        from prefect.blocks.system import Secret

        secret = await Secret.aload(secret_block)
        return secret.get()
    return os.environ.get(env_var) if env_var else None


def _flow_run_name() -> str:
    """The flow run's name: the input file's name."""
    source = current_flow_run.parameters.get("requests_filepath") or "requests"
    return f"parallel-requests {os.path.basename(str(source))}"


if __name__ == "__main__":
    sys.exit(main(flow_function=parallel_requests))
