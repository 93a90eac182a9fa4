"""The ``parallel-requests`` command line: the Cookbook script's flags, checked at once, then the flow.

This module is the console script's entry point. It imports no Prefect at load time, so it can
check the arguments at once (a bad flag costs nothing) and start Prefect's local API server
before the two seconds it takes to import Prefect and the flow. Those then happen while the
server boots.

Usage:
    parallel-requests --requests_filepath requests.jsonl --request_url https://api.openai.com/v1/chat/completions \\
        --max_requests_per_minute 1500 --max_tokens_per_minute 125000
    python -m flows.command_line ...             # the same command line (also python -m flows.parallel_requests)

Every flag of the Cookbook's ``api_request_parallel_processor.py`` works verbatim, and each is also
spelled with dashes. ``--api_key`` defaults to the ``OPENAI_API_KEY`` environment variable.
Limits take a number, or ``inf`` for none. An omitted limit is learned from the server's
rate-limit headers in any dialect, window derived (or, when no header states it, found from the
429s, starting at the Cookbook's 1,500 RPM and 125,000 TPM), and any limit is lowered to what the
server says. ``--logging_level`` takes a number (20) or a name (INFO).

Batch mode (``--mode batch``) sends the job through the OpenAI Batch API instead: see
``tasks.batch.batch_runner``. ``--batch-submit-only`` submits and exits; the same command later collects.

Progress goes to stderr: on a terminal a live status block (``tasks.reporting.live_display``), else a
progress line every ``--progress-seconds`` (``--progress auto|bar|lines|off``). stdout carries only
the final summary, or with ``--json`` the summary as one JSON object.

Exit status: 0 when every row has its result line (failed rows are counted in the summary), or
when ``--batch-submit-only`` left batches running; 130 after Ctrl-C (finished rows kept);
1 with a one-line reason when the run stopped early, when another run of the same job holds its
lock, or when the key cannot be sent; 2 for bad arguments or a missing input.
"""

# Standard library imports
import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import signal
import sys
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

# Local application imports
from tasks.job.settings import (
    BATCH_FALLBACKS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_IN_FLIGHT,
    MAX_BATCH_REQUESTS,
    MAX_SHARDS,
    MODES,
    check_batch_settings,
    job_paths,
    validate_settings,
)
from tasks.platform.embedded_prefect_api import start_embedded_api
from tasks.requests.request_formats import DEFAULT_REQUEST_URL

# The environment variable through which the command line hands ``--api_key`` to the flow.
CLI_API_KEY_VARIABLE = "PARALLEL_REQUESTS_CLI_API_KEY"


def main(argv: Optional[Sequence[str]] = None, flow_function: Optional[Callable[..., Any]] = None) -> int:
    """Run the flow from the command line; return the process exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        flow_function: the flow to run; imported here when not given (``python -m`` passes its own).
    """
    args = parse_arguments(argv)
    interrupted = _note_interrupts()
    try:
        status, summary = _run_command(args, flow_function)
    except KeyboardInterrupt:  # Ctrl-C at any moment: every finished row is kept; one line, no traceback
        status, summary = 130, None
    if interrupted.is_set() and status != 0:
        status = 130
    if status == 130:
        print(f"parallel-requests: interrupted; {_rows_kept()}; run the same command again to continue"
              + (_batches_on_interrupt(args.cancel_batches) if args.mode == "batch" else ""), file=sys.stderr)
    if args.json:  # stdout holds one JSON object whatever the ending
        print(json.dumps(summary if isinstance(summary, dict) else {
            "complete": False, "exit_status": status,
            "stop_reason": "interrupted" if status == 130 else _last_error.get("text", "the run failed")}, default=str))
    elif isinstance(summary, dict):
        print(format_cli_summary(summary))
    return status


# The last one-line error the command printed (for --json).
_last_error: Dict[str, str] = {}


def _error(text: str) -> None:
    """Print a one-line error on stderr (and keep it for --json)."""
    _last_error["text"] = text
    print(f"parallel-requests: {text}", file=sys.stderr)


def _note_interrupts() -> threading.Event:
    """An event set when Ctrl-C arrives (SIGINT still raises KeyboardInterrupt, as by default)."""
    interrupted = threading.Event()

    def on_interrupt(signum: int, frame: Any) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_interrupt)
    return interrupted


def _run_command(args: argparse.Namespace, flow_function: Optional[Callable[..., Any]]) -> Tuple[int, Any]:
    """Check the arguments, start the local API, run the flow; return the exit status and the summary."""
    try:
        validate_settings(args.max_requests_per_minute, args.max_tokens_per_minute, args.max_attempts,
                          args.max_in_flight, args.shards, args.burst_seconds, args.target_utilization,
                          args.limiter, args.shard_deployment, args.dask_cluster,
                          uris=job_paths(args.requests_filepath, args.save_filepath, args.work_dir),
                          request_url=args.request_url)
        check_batch_settings(args.mode, args.batch_fallback, args.batch_queue_tokens, args.batch_max_requests,
                             args.budget_usd, args.shard_deployment, args.dask_cluster)
        batch_flags = [flag for flag, given in (
            ("--batch-submit-only", args.batch_submit_only), ("--batch-fallback", args.batch_fallback != "batch"),
            ("--keep-batch-files", args.keep_batch_files), ("--cancel-batches", args.cancel_batches),
            ("--batch-queue-tokens", args.batch_queue_tokens is not None),
            ("--batch-max-requests", args.batch_max_requests != MAX_BATCH_REQUESTS)) if given]
        if batch_flags and args.mode != "batch":
            raise ValueError(f"{', '.join(batch_flags)} only work{'s' if len(batch_flags) == 1 else ''} with --mode batch")
        _check_input(args.requests_filepath)
        if args.api_key_from_flag and (args.shard_deployment or (args.dask_cluster or "").startswith("tcp://")):
            raise ValueError("--api_key cannot reach child runs or remote Dask workers; set OPENAI_API_KEY in "
                             "the workers' environment (or use a Prefect Secret block) instead")
        if not (math.isfinite(args.progress_seconds) and args.progress_seconds > 0):
            raise ValueError(f"--progress-seconds must be a number of seconds above 0, got {args.progress_seconds}")
    except (ValueError, OSError) as error:
        _error(f"error: {error}")
        return 2, None
    # Prefect's local API starts now, in parallel with the rest of start-up (None: PREFECT_API_URL is set).
    embedded_api = start_embedded_api()
    from tasks.api.api_client import check_api_key  # imports aiohttp: after the API server is on its way

    try:
        args.api_key = check_api_key(args.api_key)
    except ValueError as error:  # stopped before anything is sent; the server stops at exit
        _error(str(error))
        return 1, None
    if flow_function is None:
        from flows.parallel_requests import parallel_requests as flow_function  # imports Prefect: ~2 s
    for name in ("prefect.flow_runs", "prefect.task_runs", "tasks", "flows"):
        logging.getLogger(name).setLevel(args.logging_level)
    if args.api_key_from_flag and args.api_key:
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
        api_key_env_var=CLI_API_KEY_VARIABLE if args.api_key_from_flag else "OPENAI_API_KEY",
        work_dir=args.work_dir,
        aws_credentials_block=args.aws_credentials_block,
        dry_run=args.dry_run,
        price_table=args.price_table,
        budget_usd=args.budget_usd,
        model_limits=args.model_limits,
        limiter=args.limiter,
        limiter_name=args.limiter_name,
        shard_deployment=args.shard_deployment,
        dask_cluster=args.dask_cluster,
        wait_for_lock=args.wait_for_lock,
        mode=args.mode,
        batch_submit_only=args.batch_submit_only,
        batch_fallback=args.batch_fallback,
        keep_batch_files=args.keep_batch_files,
        cancel_batches=args.cancel_batches,
        batch_queue_tokens=args.batch_queue_tokens,
        batch_max_requests=args.batch_max_requests,
    )
    progress = args.progress if args.progress != "auto" else ("bar" if _live_terminal() else "lines")
    if progress == "bar" and not _live_terminal():  # a file, a pipe or TERM=dumb cannot show a live block
        progress = "lines"
    parameters["progress_every_seconds"] = args.progress_seconds if progress == "lines" else 0
    if progress == "bar" and not args.dry_run:
        from tasks.reporting.live_display import LiveDisplay  # imports rich: after Prefect (which loads it anyway)
        display: Any = LiveDisplay()
    else:
        display = contextlib.nullcontext()
    with embedded_api.settings() if embedded_api else contextlib.nullcontext():
        with display:
            final_state = asyncio.run(flow_function(**parameters, return_state=True))
        summary = final_state.result(raise_on_failure=False) if final_state.data is not None else None
        if asyncio.iscoroutine(summary):
            summary = asyncio.run(summary)
        from tasks.reporting.run_events import flush_events
        flush_events()  # the run's events reach the API before this process (and its local API) ends
    if final_state.is_completed():
        return 0, summary
    _error(final_state.message or "the run failed")
    return 1, summary


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
    add("max_requests_per_minute", type=_limit, default=None,
        help="request limit per minute; 'inf' for none (default: learn it from the server's "
             "rate-limit headers, window derived; else found from 429s, from 1500)")
    add("max_tokens_per_minute", type=_limit, default=None,
        help="token limit per minute; 'inf' for none (default: learn it from the server's "
             "rate-limit headers; else found from 429s, from 125000)")
    add("token_encoding_name", default=None,
        help="tiktoken encoding for estimates (default: follow each request's model)")
    add("max_attempts", type=int, default=DEFAULT_MAX_ATTEMPTS,
        help="attempts per request on retryable failures (default: %(default)s)")
    add("logging_level", type=_logging_level, default=logging.INFO,
        help="logging level, as a number (20) or a name (INFO) (default: INFO)")
    add("max_in_flight", type=int, default=DEFAULT_MAX_IN_FLIGHT,
        help="requests awaiting an answer at once, across all shards (default: %(default)s)")
    add("shards", type=int, default=None,
        help=f"number of shards (default: one per 8 MiB of input, at most 64; at most {MAX_SHARDS})")
    add("burst_seconds", type=float, default=1.0,
        help="the shortest window a server may count its limits in; the buckets hold this times (1 - target "
             "utilization) seconds of each limit (default: %(default)s, so 20 ms)")
    add("target_utilization", type=float, default=0.98,
        help="share of the limits the engine aims for, leaving headroom against 429s (default: %(default)s)")
    add("request_timeout", type=float, default=300.0, help="timeout of one attempt, in seconds (default: %(default)s)")
    add("work_dir", default=None,
        help="where parts and resume state are kept (default: <output>.work beside a local output)")
    add("aws_credentials_block", default=None,
        help="a prefect-aws AwsCredentials block for S3 (default: the standard AWS configuration)")
    add("dry_run", action="store_true",
        help="check every line, count tokens, estimate cost and duration, and send nothing")
    add("price_table", default=None, help="a JSON file of prices per model, over the shipped table")
    add("model_limits", default=None,
        help='a JSON file of limits per model: {"gpt-4o-mini": {"requests_per_minute": 5000, '
             '"tokens_per_minute": 2000000}} (other models use the flags above)')
    add("budget_usd", type=float, default=None,
        help="stop dispatching before the run's cost could exceed this many US dollars (resumable)")
    add("retry_base_seconds", type=float, default=0.25,
        help="backoff before the first retry; doubles with each retry, with jitter (default: %(default)s)")
    add("limiter", default=None,
        help="a Redis URL (redis://host:port/db) that holds the limits, shared by every process and machine "
             "on the same API host, key and model (default: limits kept in this process)")
    add("limiter_name", default=None,
        help="name of the shared limits in Redis (default: the API host and a fingerprint of the key)")
    add("shard_deployment", default=None,
        help="run each shard as a child flow run of this deployment on its work pool, for example "
             "parallel-requests-shards/workers (needs --limiter and a --work-dir every worker reaches)")
    add("dask_cluster", default=None,
        help="run each shard as a task on a Dask cluster (prefect-dask): 'local', 'local:N' worker processes, "
             "or a scheduler address such as tcp://10.0.0.5:8786 (needs --limiter)")
    add("wait_for_lock", action="store_true",
        help="when another run of the same job (same output) is in progress, wait for it instead of exiting 1")
    add("mode", default="online", choices=MODES,
        help="online: each request under the rate limits; batch: through the OpenAI Batch API, at half the price, "
             "answered within 24 hours (default: %(default)s)")
    add("batch_submit_only", action="store_true",
        help="batch mode: submit (and collect what has ended), never wait; run the same command later to collect")
    add("batch_fallback", default="batch", choices=BATCH_FALLBACKS,
        help="batch mode: rows an expired or failed batch left go into a new batch, or online (default: %(default)s)")
    add("keep_batch_files", action="store_true", help="batch mode: keep the input and result files on the server")
    add("cancel_batches", action="store_true",
        help="batch mode: on Ctrl-C, cancel the running batches (default: they keep running, paid for, and the "
             "next run collects them)")
    add("batch_queue_tokens", type=int, default=None,
        help="batch mode: the enqueued-token cap per model (your batch queue limit); files go in as earlier ones "
             "finish (default: learned from the first refusal)")
    add("batch_max_requests", type=int, default=MAX_BATCH_REQUESTS,
        help="batch mode: the most requests per batch file (default: %(default)s, the API's limit)")
    add("progress", default="auto", choices=("auto", "bar", "lines", "off"),
        help="progress while sending, on stderr: bar (a live status block), lines (a progress line every 30 s), "
             "off; auto: bar on a terminal, else lines (default: %(default)s)")
    add("progress_seconds", type=float, default=30.0,
        help="with --progress lines: seconds between two progress lines (default: %(default)s)")
    parser.add_argument("--json", dest="json", action="store_true",
                        help="print the run summary on stdout as one JSON object (progress and logs stay on stderr)")
    args = parser.parse_args(argv)
    args.api_key_from_flag = args.api_key is not None
    if args.api_key is None:
        args.api_key = os.environ.get("OPENAI_API_KEY")
    return args






def _live_terminal() -> bool:
    """True when stderr is a terminal that can redraw a live block (not a file, a pipe or TERM=dumb)."""
    return sys.stderr.isatty() and os.environ.get("TERM", "") not in ("dumb", "unknown")


def _rows_kept() -> str:
    """What an interrupted run kept, in words."""
    from tasks.reporting.live_metrics import current
    progress = current()
    if progress is None:
        return "the finished rows are kept"
    return f"the {progress.rows_settled:,} rows this run finished are kept (with those of earlier runs)"


def _batches_on_interrupt(cancelled: bool) -> str:
    """What became of the batches after Ctrl-C, in words."""
    if cancelled:
        return "; the batches were cancelled, and the next run collects what they finished"
    return "; the batches keep running on the server (paid for), and the next run collects them"


def format_cli_summary(summary: Dict[str, Any]) -> str:
    """The run summary as the command line prints it."""
    if summary.get("dry_run"):
        return format_dry_run(summary)
    if summary.get("already_complete"):
        return f"parallel-requests: {summary['output']} is already complete for this input; nothing was sent"
    totals = summary["totals"]
    limit = summary.get("max_requests_per_minute")
    rate = totals["requests_per_minute"]
    against = f" ({100.0 * rate / limit:.0f}% of the {limit:,.0f} limit)" if limit else ""
    state = "complete" if summary["complete"] else f"STOPPED: {summary['stop_reason'] or 'incomplete'}"
    if not summary["complete"] and not summary["stop_reason"] and summary.get("batches"):
        state = "waiting for batches (run the same command again to collect them)"
    return (
        f"parallel-requests {state} in {summary['duration_seconds']:.1f} s\n"
        f"  rows {totals['rows']:,}: {totals['resumed_rows']:,} resumed "
        f"({summary.get('reused_rows', 0):,} reused from earlier answers to unchanged requests), "
        f"{totals['succeeded']:,} succeeded, {totals['failed']:,} failed "
        f"({totals['invalid_lines']:,} invalid lines, {totals['failed_invalid_request']:,} invalid requests, "
        f"{totals['failed_after_retries']:,} out of attempts, {totals['failed_too_large']:,} too large, "
        f"{totals.get('failed_unpriced', 0):,} with no price under the budget), "
        f"{totals['not_sent']:,} not sent\n"
        f"  {totals['requests_sent']:,} HTTP requests, {totals['retries']:,} retries, "
        f"{totals['rate_limited']:,} answered 429, {totals['resent_requests']:,} sent again after an interruption; "
        f"{rate:,.0f} requests/min sustained{against}\n"
        f"  tokens estimated {totals['tokens_estimated']:,} (while a token limit or budget needed it); used "
        f"{totals['prompt_tokens_used'] + totals['completion_tokens_used']:,}; cost ${totals['cost_usd']:,.4f}\n"
        + "".join(f"  {'time waiting for the limiter' if model == 'limiter wait' else f'latency {model}'}: p50 {_ms(values['p50'])}, p90 {_ms(values['p90'])}, p99 {_ms(values['p99'])}"
                  f" ({values['count']:,})\n" for model, values in (summary.get("latency") or {}).items())
        + "".join(f"  limit: {text}\n" for text in summary.get("limits_in_force") or [])
        + "".join(f"  batches: {text}\n" for text in summary.get("batches") or [])
        + f"  results: {summary['output']}"
        + (f" ({summary['output_note']})" if summary.get("output_note") else "")
    )


def _ms(seconds: Optional[float]) -> str:
    """Seconds as 420 ms or 2.31 s."""
    if seconds is None:
        return "-"
    return f"{seconds * 1000:,.0f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def format_dry_run(report: Dict[str, Any]) -> str:
    """A dry run's report as the command line prints it."""
    cost = report["estimated_cost_usd"]
    lines = [
        f"parallel-requests dry run of {report['source']}: nothing was sent",
        f"  rows {report['rows']:,}: {report['requests']:,} valid requests, {report['invalid_lines']:,} invalid lines",
        f"  prompt tokens {report['prompt_tokens']:,}; completion tokens at most {report['max_completion_tokens']:,}",
        f"  estimated cost {'unknown' if cost is None else f'${cost:,.4f}'} (completions at their maximum)"
        + (f"; no price for {', '.join(report['unpriced_models'])}" if report["unpriced_models"] else ""),
        f"  estimated duration {report['estimated_minutes']:,.1f} min",
    ]
    for model, totals in report["models"].items():
        lines.append(f"    {model}: {totals['requests']:,} requests, {totals['prompt_tokens']:,} prompt tokens")
    lines += [f"  {example}" for example in report["invalid_examples"]]
    return "\n".join(lines)


# Helpers


def _check_input(requests_filepath: str) -> None:
    """Fail at once, naming the file, when a local input is missing or unreadable."""
    if "://" in requests_filepath:
        return  # remote inputs are checked when the flow opens them
    if not os.path.isfile(requests_filepath):
        raise FileNotFoundError(f"no such input file: {requests_filepath}")
    if not os.access(requests_filepath, os.R_OK):
        raise PermissionError(f"cannot read the input file: {requests_filepath}")








def _limit(text: str) -> float:
    """A per-minute limit from the command line: a number, or inf/none/unlimited for no limit."""
    if text.strip().lower() in ("inf", "infinity", "none", "unlimited"):
        return math.inf
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'inf', got {text!r}") from None


def _logging_level(text: str) -> int:
    """A logging level from a number (20) or a name (INFO)."""
    if text.strip().lstrip("-").isdigit():
        return int(text)
    level = logging.getLevelName(text.strip().upper())
    if not isinstance(level, int):
        raise argparse.ArgumentTypeError(f"unknown logging level {text!r}")
    return level


def run() -> None:
    """The console script: run :func:`main`, then exit without the interpreter's last cycle collection.

    Everything the run wrote is closed by then and Prefect's exit hooks still run; only the final
    walk over every object Prefect and the flow created is skipped (0.45 s of a small run's 4 s).
    """
    _fill_closed_standard_streams()
    status = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # Python's own flush at exit reports it, as before
            stream.flush()
    gc.freeze()  # objects still alive are freed by reference counting at exit, never walked for cycles
    sys.exit(status)


def _fill_closed_standard_streams() -> None:
    """Put /dev/null where stdin, stdout or stderr was closed at start (``>&-``).

    Else the next file opened takes the number 1 or 2 and whatever writes to "stdout" writes into
    it, Python's ``sys.stdout`` is None (Prefect's and uvicorn's logging fail on it), and child
    processes such as the local API server start without one.
    """
    for descriptor, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(descriptor)
        except OSError:
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)  # the lowest free number: this one
        if getattr(sys, name) is None:
            setattr(sys, name, open(descriptor, "r" if descriptor == 0 else "w", closefd=False))


if __name__ == "__main__":
    run()
