"""The parallel-requests flow and its command line: push a JSONL file of requests through a rate-limited API.

A drop-in for the OpenAI Cookbook's ``api_request_parallel_processor.py``. Its flags and file
formats work unchanged, as a Prefect 3 flow:

    parallel-requests \\
        --requests_filepath examples/data/example_requests_to_parallel_process.jsonl \\
        --save_filepath examples/data/example_requests_to_parallel_process_results.jsonl \\
        --request_url https://api.openai.com/v1/embeddings \\
        --max_requests_per_minute 1500 \\
        --max_tokens_per_minute 6250000 \\
        --token_encoding_name cl100k_base \\
        --max_attempts 5 \\
        --logging_level 20

The same runs as ``python -m flows.parallel_requests ...``. Every flag is also spelled with
dashes (``--max-requests-per-minute``). New flags: ``--max-in-flight``, ``--shards``,
``--burst-seconds``, ``--target-utilization``, ``--request-timeout``, ``--retry-base-seconds``.

What happens:
    1. The input (cookbook or Batch API shape, detected per file) is split into byte-range shards.
    2. Every shard runs as an async Prefect task. All of them are awaited together on the flow's
       event loop, and they share one rate-limit engine (RPM and TPM buckets, in-flight cap) and
       one aiohttp session.
    3. Results go to one JSONL file in input order, written atomically. Every non-blank input
       line gets exactly one output line. The metrics are published as flow artifacts (a
       progress bar, a per-shard table, a markdown summary) and printed.

Input/output:
    - ``--save_filepath`` defaults to the input's name with ``_results.jsonl``, as the Cookbook's.
    - The API key comes from ``--api_key`` or the ``OPENAI_API_KEY`` environment variable. The
      flow itself never takes the key as a parameter. It reads it from an environment variable
      named by ``api_key_env_var``, or from a Prefect Secret block named by ``api_key_secret_block``.
    - Exit status: 0 when every row has its result line (failed rows are counted in the
      summary); 1 with a one-line reason when the run stopped early (bad key, no quota);
      2 for bad arguments.

Pitfalls:
    - The limits default to the Cookbook's (1,500 RPM, 125,000 TPM). Pass ``inf`` for no limit.
    - Token estimation is needed only for a TPM limit. With ``--max_tokens_per_minute inf`` the
      flow skips it, so no encoding is loaded.
    - Prefect's embedded API takes several seconds to start. Set ``PREFECT_API_URL`` to use a
      running Prefect server instead.
"""

# Standard library imports
import argparse
import asyncio
import logging
import math
import os
import shutil
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

# Third-party imports
import aiohttp
from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed, Failed, State
from prefect.utilities.annotations import quote

# Local application imports
from tasks.api_client import ApiClient
from tasks.metrics import RunProgress, RunSummary, StatusTracker, progress_artifact, publish_run_artifacts
from tasks.rate_limiter import RateLimiter
from tasks.request_formats import DEFAULT_REQUEST_URL, detect_shape
from tasks.results_storage import PartInfo, assemble_output
from tasks.shard_processing import RunSettings, SharedRunState, process_shard
from tasks.sharding import ShardSpec, input_size, plan_shards, read_head
from tasks.token_estimation import TokenEstimator

# The Cookbook script's defaults, kept so its command lines behave the same.
DEFAULT_MAX_REQUESTS_PER_MINUTE = 3_000 * 0.5
DEFAULT_MAX_TOKENS_PER_MINUTE = 250_000 * 0.5
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_MAX_IN_FLIGHT = 200
# The environment variable through which the command line hands ``--api_key`` to the flow.
CLI_API_KEY_VARIABLE = "PARALLEL_REQUESTS_CLI_API_KEY"


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
    validate_settings(max_requests_per_minute, max_tokens_per_minute, max_attempts, max_in_flight, shards, burst_seconds)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the flow from the command line; return the process exit status."""
    args = parse_arguments(argv)
    for name in ("prefect.flow_runs", "prefect.task_runs", "tasks", "flows"):
        logging.getLogger(name).setLevel(args.logging_level)
    try:
        validate_settings(args.max_requests_per_minute, args.max_tokens_per_minute, args.max_attempts,
                          args.max_in_flight, args.shards, args.burst_seconds)
        input_size(args.requests_filepath)
    except (ValueError, OSError) as error:
        print(f"parallel-requests: error: {error}", file=sys.stderr)
        return 2
    if args.api_key:
        os.environ[CLI_API_KEY_VARIABLE] = args.api_key
    parameters: Dict[str, Any] = dict(
        requests_filepath=args.requests_filepath,
        save_filepath=args.save_filepath,
        request_url=args.request_url,
        max_requests_per_minute=args.max_requests_per_minute,
        max_tokens_per_minute=args.max_tokens_per_minute,
        token_encoding_name=args.token_encoding_name,
        max_attempts=args.max_attempts,
        max_in_flight=args.max_in_flight,
        shards=args.shards,
        burst_seconds=args.burst_seconds,
        target_utilization=args.target_utilization,
        request_timeout_seconds=args.request_timeout,
        retry_base_seconds=args.retry_base_seconds,
        api_key_env_var=CLI_API_KEY_VARIABLE if args.api_key else "OPENAI_API_KEY",
    )
    final_state = asyncio.run(parallel_requests(**parameters, return_state=True))
    summary = final_state.result(raise_on_failure=False) if final_state.data is not None else None
    if asyncio.iscoroutine(summary):
        summary = asyncio.run(summary)
    if isinstance(summary, dict):
        print(format_cli_summary(summary))
    if final_state.is_completed():
        return 0
    print(f"parallel-requests: {final_state.message or 'the run failed'}", file=sys.stderr)
    return 1


def parse_arguments(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the Cookbook's flags (each also spelled with dashes) plus ours."""
    parser = argparse.ArgumentParser(
        prog="parallel-requests",
        description="Send a JSONL file of API requests in parallel under rate limits, as a Prefect flow.",
    )

    def add(name: str, **options: Any) -> None:
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, **options)

    add("requests_filepath", required=True, help="JSONL file of requests (cookbook or Batch API shape)")
    add("save_filepath", default=None, help="JSONL file for the results (default: <input>_results.jsonl)")
    add("request_url", default=DEFAULT_REQUEST_URL,
        help="API endpoint for cookbook lines, base URL for Batch lines (default: %(default)s)")
    add("api_key", default=None, help="API key (default: the OPENAI_API_KEY environment variable)")
    add("max_requests_per_minute", type=_limit, default=DEFAULT_MAX_REQUESTS_PER_MINUTE,
        help="request limit per minute; 'inf' for none (default: %(default)s)")
    add("max_tokens_per_minute", type=_limit, default=DEFAULT_MAX_TOKENS_PER_MINUTE,
        help="token limit per minute; 'inf' for none (default: %(default)s)")
    add("token_encoding_name", default=None,
        help="tiktoken encoding for estimates (default: follow each request's model)")
    add("max_attempts", type=int, default=DEFAULT_MAX_ATTEMPTS,
        help="attempts per request on retryable failures (default: %(default)s)")
    add("logging_level", type=_logging_level, default=logging.INFO,
        help="logging level, as a number (20) or a name (INFO) (default: INFO)")
    add("max_in_flight", type=int, default=DEFAULT_MAX_IN_FLIGHT,
        help="requests awaiting an answer at once, across all shards (default: %(default)s)")
    add("shards", type=int, default=None, help="number of shards (default: one per 8 MiB of input, at most 64)")
    add("burst_seconds", type=float, default=1.0,
        help="seconds of each limit the buckets may spend at once (default: %(default)s)")
    add("target_utilization", type=float, default=0.98,
        help="share of the limits the engine aims for, leaving headroom against 429s (default: %(default)s)")
    add("request_timeout", type=float, default=300.0, help="timeout of one attempt, in seconds (default: %(default)s)")
    add("retry_base_seconds", type=float, default=0.5,
        help="backoff before the first retry; doubles with each retry, with jitter (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.api_key is None:
        args.api_key = os.environ.get("OPENAI_API_KEY")
    return args


def validate_settings(max_requests_per_minute: Optional[float], max_tokens_per_minute: Optional[float],
                      max_attempts: int, max_in_flight: int, shards: Optional[int], burst_seconds: float) -> None:
    """Reject settings the run cannot work with, before anything is sent.

    Raises:
        ValueError: naming the setting and the value.
    """
    for name, value in (("max_requests_per_minute", max_requests_per_minute),
                        ("max_tokens_per_minute", max_tokens_per_minute)):
        if value is not None and not (value > 0):
            raise ValueError(f"{name} must be positive (or 'inf' for no limit), got {value!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    if shards is not None and shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    if not burst_seconds > 0:
        raise ValueError(f"burst_seconds must be positive, got {burst_seconds}")


def default_save_path(requests_filepath: str) -> str:
    """The Cookbook's default output name: ``x.jsonl`` gives ``x_results.jsonl``."""
    head, dot, tail = requests_filepath.rpartition(".jsonl")
    if dot:
        return f"{head}_results.jsonl{tail}"
    return f"{requests_filepath}_results.jsonl"


def work_dir_for(save_filepath: str) -> str:
    """The folder beside the output that holds the shards' parts while the run goes on."""
    return f"{save_filepath}.work"


def format_cli_summary(summary: Dict[str, Any]) -> str:
    """The run summary as the command line prints it."""
    totals = summary["totals"]
    limit = summary.get("max_requests_per_minute")
    rate = totals["requests_per_minute"]
    against = f" ({100.0 * rate / limit:.0f}% of the {limit:,.0f} limit)" if limit else ""
    state = "complete" if summary["complete"] else f"STOPPED: {summary['stop_reason'] or 'incomplete'}"
    return (
        f"parallel-requests {state} in {summary['duration_seconds']:.1f} s\n"
        f"  rows {totals['rows']:,}: {totals['succeeded']:,} succeeded, {totals['failed']:,} failed "
        f"({totals['invalid_lines']:,} invalid lines, {totals['failed_invalid_request']:,} invalid requests, "
        f"{totals['failed_after_retries']:,} out of attempts, {totals['failed_too_large']:,} too large), "
        f"{totals['not_sent']:,} not sent\n"
        f"  {totals['requests_sent']:,} HTTP requests, {totals['retries']:,} retries, "
        f"{totals['rate_limited']:,} answered 429; {rate:,.0f} requests/min sustained{against}\n"
        f"  tokens estimated {totals['tokens_estimated']:,}; used "
        f"{totals['prompt_tokens_used'] + totals['completion_tokens_used']:,}\n"
        f"  results: {summary['output']}"
    )


# Helpers


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


def _limit(text: str) -> Optional[float]:
    """A per-minute limit from the command line: a number, or inf/none/unlimited for no limit."""
    if text.strip().lower() in ("inf", "infinity", "none", "unlimited"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'inf', got {text!r}") from None
    return None if math.isinf(value) else value


def _logging_level(text: str) -> int:
    """A logging level from a number (20) or a name (INFO)."""
    if text.strip().lstrip("-").isdigit():
        return int(text)
    level = logging.getLevelName(text.strip().upper())
    if not isinstance(level, int):
        raise argparse.ArgumentTypeError(f"unknown logging level {text!r}")
    return level


if __name__ == "__main__":
    sys.exit(main())
