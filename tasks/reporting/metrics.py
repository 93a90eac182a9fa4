"""Metrics of a run: a StatusTracker per shard, run totals, and the Prefect artifacts that show them.

Each shard task fills its own ``StatusTracker``. The flow merges them into the run's totals.
It publishes three artifacts, under stable keys so runs can be compared on the Artifacts page:

    parallel-requests-progress   a progress artifact that moves while the shards run
    parallel-requests-shards     a table with one row per shard
    parallel-requests-summary    a markdown summary of the run
    parallel-requests-output     a link to the output

Usage:
    >>> totals = StatusTracker.merged(shard_trackers)
    >>> summary = RunSummary(totals=totals, shards=shard_trackers, ...)
    >>> await publish_run_artifacts(summary)
    >>> print(summary.to_markdown())

Pitfalls:
    - In async code Prefect's ``create_*_artifact`` functions return coroutines. The ``a*``
      variants are used here. Outside a flow run they are skipped; they do not fail.
"""

# Standard library imports
import asyncio
import collections
import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

# Third-party imports
from prefect.artifacts import (
    acreate_link_artifact,
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.context import FlowRunContext

# Local application imports
from tasks.reporting.live_metrics import LiveMetrics, latency_markdown_rows

logger = logging.getLogger(__name__)

PROGRESS_KEY = "parallel-requests-progress"
SHARDS_TABLE_KEY = "parallel-requests-shards"
SUMMARY_KEY = "parallel-requests-summary"
OUTPUT_LINK_KEY = "parallel-requests-output"
DRY_RUN_KEY = "parallel-requests-dry-run"
# How often the progress artifact is updated while shards run.
PROGRESS_INTERVAL_SECONDS = 2.0


@dataclass
class StatusTracker:
    """Counts for one shard; merged, for the whole run.

    Rows are non-blank input lines. Every row ends in exactly one of: succeeded,
    failed_invalid_request, failed_after_retries, failed_too_large, invalid_lines or not_sent.
    """

    shard: Optional[int] = None
    lines_read: int = 0
    blank_lines: int = 0
    rows: int = 0
    resumed_rows: int = 0
    resent_requests: int = 0
    succeeded: int = 0
    invalid_lines: int = 0
    failed_invalid_request: int = 0
    failed_after_retries: int = 0
    failed_too_large: int = 0
    failed_unpriced: int = 0
    not_sent: int = 0
    requests_sent: int = 0
    retries: int = 0
    retries_by_cause: Dict[str, int] = field(default_factory=dict)
    rate_limited: int = 0
    tokens_estimated: int = 0
    prompt_tokens_used: int = 0
    completion_tokens_used: int = 0
    cost_usd: float = 0.0
    unpriced_requests: int = 0
    first_request_at: Optional[float] = None
    last_response_at: Optional[float] = None
    wall_seconds: float = 0.0

    @property
    def rows_done(self) -> int:
        """Rows that have their final result (resumed ones included)."""
        return (self.resumed_rows + self.succeeded + self.invalid_lines + self.failed_invalid_request
                + self.failed_after_retries + self.failed_too_large + self.failed_unpriced)

    @property
    def failed(self) -> int:
        """Rows of this run that ended in a failure record."""
        return self.rows_done - self.succeeded - self.resumed_rows

    @property
    def sending_seconds(self) -> float:
        """Seconds from the first request sent to the last answer received."""
        if self.first_request_at is None or self.last_response_at is None:
            return 0.0
        return max(0.0, self.last_response_at - self.first_request_at)

    @property
    def requests_per_minute(self) -> float:
        """The sustained request rate while sending (HTTP requests, retries included)."""
        seconds = self.sending_seconds
        return self.requests_sent * 60.0 / seconds if seconds > 0 else 0.0

    def note_request_sent(self) -> None:
        """Count one HTTP request going out."""
        self.requests_sent += 1
        if self.first_request_at is None:
            self.first_request_at = time.time()

    def note_response(self) -> None:
        """Remember when the latest answer (or failure) arrived."""
        self.last_response_at = time.time()

    def note_retry(self, cause: str) -> None:
        """Count one retry and its cause."""
        self.retries += 1
        self.retries_by_cause[cause] = self.retries_by_cause.get(cause, 0) + 1

    @classmethod
    def merged(cls, trackers: Sequence["StatusTracker"]) -> "StatusTracker":
        """Add up shard trackers into run totals."""
        total = cls()
        causes: collections.Counter = collections.Counter()
        for tracker in trackers:
            for name, value in asdict(tracker).items():
                if name in ("shard", "first_request_at", "last_response_at", "retries_by_cause"):
                    continue
                if name == "wall_seconds":
                    total.wall_seconds = max(total.wall_seconds, value)
                else:
                    setattr(total, name, getattr(total, name) + value)
            causes.update(tracker.retries_by_cause)
            if tracker.first_request_at is not None:
                total.first_request_at = min(total.first_request_at or tracker.first_request_at, tracker.first_request_at)
            if tracker.last_response_at is not None:
                total.last_response_at = max(total.last_response_at or 0.0, tracker.last_response_at)
        total.retries_by_cause = dict(causes)
        return total

    def table_row(self) -> Dict[str, Any]:
        """This tracker as one row of the shards table."""
        return {
            "shard": self.shard,
            "rows": self.rows,
            "resumed_rows": self.resumed_rows,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "invalid_lines": self.invalid_lines,
            "not_sent": self.not_sent,
            "requests_sent": self.requests_sent,
            "retries": self.retries,
            "rate_limited_429": self.rate_limited,
            "tokens_estimated": self.tokens_estimated,
            "tokens_used": self.prompt_tokens_used + self.completion_tokens_used,
            "cost_usd": round(self.cost_usd, 6),
            "requests_per_minute": round(self.requests_per_minute, 1),
            "wall_seconds": round(self.wall_seconds, 3),
        }


@dataclass
class RunProgress:
    """Progress shared by every shard of a run: input bytes whose rows are finished, rows settled by
    this run, and what the run is doing now (``live``: rates, latency, the timeline)."""

    total_bytes: int
    done_bytes: int = 0
    rows_settled: int = 0
    live: LiveMetrics = field(default_factory=LiveMetrics)
    note: Optional[str] = None  # what the run waits on, in words, when it sends nothing itself (batch mode)

    earlier_bytes: int = 0  # of done_bytes, lines this run found finished (or blank): no part of its pace

    def advance(self, line_bytes: int, rows: int = 0) -> None:
        """A line ``line_bytes`` long is finished (``rows``: 1 for a row this run settled, 0 for a blank
        line or one an earlier run finished)."""
        self.done_bytes += line_bytes
        self.rows_settled += rows
        if not rows:
            self.earlier_bytes += line_bytes

    @property
    def percent(self) -> float:
        """Finished share of the input, 0 to 100."""
        return 100.0 if self.total_bytes <= 0 else min(100.0, 100.0 * self.done_bytes / self.total_bytes)


@dataclass
class RunSummary:
    """The outcome of a run: totals, per-shard counts, where the output is, and why it stopped.

    Attributes:
        source: the input's path or URI.
        output: where the results are.
        totals: the merged tracker.
        shards: the per-shard trackers.
        max_requests_per_minute: the request limit (None: no limit).
        max_tokens_per_minute: the token limit (None: no limit).
        stop_reason: why dispatching stopped early, or None when every row has its result.
        error_examples: a few error texts (secrets removed).
        duration_seconds: the run's whole duration.
        reused_rows: rows answered by earlier answers to the same requests (an edited input's unchanged rows).
        output_note: what happened to the output when it was not written (a better one was kept).
        limit_notes: the limits in force and where each came from ("20 requests per 2 s (learned from
            x-ratelimit headers)"), and budgets the server states.
        batch_notes: in batch mode, where the job's batches stand ("3 batches: 2 completed, 1 in progress").
        latency: per model, p50/p90/p99 seconds from sending to the answer, and "limiter wait": how
            long requests waited for the rate limiter (``LiveMetrics.latency_summary``).
        timeline: per interval, the request rate against the limit, 429s, retries, errors, tokens and
            latency p90 (``LiveMetrics.timeline_rows``).
    """

    source: str
    output: str
    totals: StatusTracker
    shards: List[StatusTracker]
    max_requests_per_minute: Optional[float]
    max_tokens_per_minute: Optional[float]
    stop_reason: Optional[str] = None
    error_examples: List[str] = field(default_factory=list)
    duration_seconds: float = 0.0
    reused_rows: int = 0
    output_note: Optional[str] = None
    limit_notes: List[str] = field(default_factory=list)
    batch_notes: List[str] = field(default_factory=list)
    latency: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    timeline: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every row has its result line."""
        return self.stop_reason is None and self.totals.rows_done == self.totals.rows

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-friendly view (the flow's return value)."""
        totals = asdict(self.totals)
        totals.update(rows_done=self.totals.rows_done, failed=self.totals.failed,
                      requests_per_minute=round(self.totals.requests_per_minute, 1))
        return {
            "source": self.source,
            "output": self.output,
            "complete": self.complete,
            "stop_reason": self.stop_reason,
            "duration_seconds": round(self.duration_seconds, 3),
            "max_requests_per_minute": self.max_requests_per_minute,
            "max_tokens_per_minute": self.max_tokens_per_minute,
            "totals": totals,
            "reused_rows": self.reused_rows,
            "output_note": self.output_note,
            "limits_in_force": self.limit_notes,
            "batches": self.batch_notes,
            "latency": self.latency,
            "timeline": self.timeline,
            "shards": [shard.table_row() for shard in self.shards],
            "error_examples": self.error_examples,
        }

    def to_markdown(self) -> str:
        """The run summary as markdown (the summary artifact)."""
        totals = self.totals
        state = "complete" if self.complete else f"stopped: {self.stop_reason}"
        lines = [
            f"# parallel-requests: {self.source}",
            "",
            f"**{state}**. Output: `{self.output}`" + (f" ({self.output_note})" if self.output_note else ""),
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| rows | {totals.rows:,} |",
            f"| rows resumed from an earlier run | {totals.resumed_rows:,} |",
            f"| of which earlier answers reused for unchanged requests | {self.reused_rows:,} |",
            f"| requests sent again after an interruption | {totals.resent_requests:,} |",
            f"| succeeded | {totals.succeeded:,} |",
            f"| failed: invalid requests (4xx, not retried) | {totals.failed_invalid_request:,} |",
            f"| failed: after all attempts | {totals.failed_after_retries:,} |",
            f"| failed: too large for the token limit | {totals.failed_too_large:,} |",
            f"| failed: no price for the model under a budget | {totals.failed_unpriced:,} |",
            f"| invalid input lines | {totals.invalid_lines:,} |",
            f"| not sent (run stopped) | {totals.not_sent:,} |",
            f"| HTTP requests sent | {totals.requests_sent:,} |",
            f"| 429 answers | {totals.rate_limited:,} |",
            f"| retries | {totals.retries:,} |",
            f"| sustained rate | {totals.requests_per_minute:,.0f} requests/min"
            f"{_against(totals.requests_per_minute, self.max_requests_per_minute)} |",
            f"| tokens estimated (while a token limit or budget needed it) | {totals.tokens_estimated:,} |",
            f"| tokens used (prompt + completion) | {totals.prompt_tokens_used:,} + {totals.completion_tokens_used:,} |",
            f"| cost (from usage) | ${totals.cost_usd:,.4f}"
            f"{f' (+ {totals.unpriced_requests:,} requests of models with no price)' if totals.unpriced_requests else ''} |",
            f"| duration | {self.duration_seconds:,.1f} s |",
        ] + [f"| limit in force | {text} |" for text in self.limit_notes] + [
            f"| batches | {text} |" for text in self.batch_notes] + latency_markdown_rows(self.latency)
        if totals.retries_by_cause:
            lines += ["", "Retries by cause: " + ", ".join(f"{cause} {count}" for cause, count in sorted(totals.retries_by_cause.items()))]
        if self.error_examples:
            lines += ["", "Examples of errors:", ""] + [f"- `{example}`" for example in self.error_examples]
        return "\n".join(lines) + "\n"


async def publish_run_artifacts(summary: RunSummary) -> None:
    """Publish the shards table and the markdown summary (only inside a flow run)."""
    if FlowRunContext.get() is None:
        return
    await acreate_table_artifact(
        key=SHARDS_TABLE_KEY,
        table=[shard.table_row() for shard in summary.shards],
        description=f"Per-shard metrics for {summary.source}",
    )
    await acreate_markdown_artifact(key=SUMMARY_KEY, markdown=summary.to_markdown(),
                                    description=f"Run summary for {summary.source}")
    await acreate_link_artifact(key=OUTPUT_LINK_KEY, link=_link_to(summary.output), link_text=summary.output,
                                description="The results, in input order")


async def publish_dry_run_artifact(markdown: str, source: str) -> None:
    """Publish a dry run's report (only inside a flow run)."""
    if FlowRunContext.get() is not None:
        await acreate_markdown_artifact(key=DRY_RUN_KEY, markdown=markdown, description=f"Dry run of {source}")


@contextlib.asynccontextmanager
async def progress_artifact(progress: RunProgress, interval_seconds: float = PROGRESS_INTERVAL_SECONDS):
    """Keep a progress artifact moving while the body runs; it ends at the final value."""
    if FlowRunContext.get() is None:
        yield
        return
    artifact_id = await acreate_progress_artifact(progress=0.0, key=PROGRESS_KEY,
                                                  description="Share of input rows finished")

    async def keep_updating() -> None:
        last = 0.0
        while True:
            await asyncio.sleep(interval_seconds)
            if progress.percent != last:
                last = progress.percent
                await aupdate_progress_artifact(artifact_id=artifact_id, progress=round(last, 2))

    updater = asyncio.create_task(keep_updating())
    try:
        yield
    finally:
        updater.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await updater
        await aupdate_progress_artifact(artifact_id=artifact_id, progress=round(progress.percent, 2))


# Helpers


def _link_to(output: str) -> str:
    """A link for an output: its URI, or a file:// URL for a local path."""
    if "://" in output:
        return output
    return "file://" + os.path.abspath(output)


def _against(rate: float, limit: Optional[float]) -> str:
    """ " (97% of the 6,000 limit)" or "" when there is no limit."""
    if not limit:
        return ""
    return f" ({100.0 * rate / limit:.0f}% of the {limit:,.0f} limit)"
