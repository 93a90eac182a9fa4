"""Reports that move while a run goes: the progress artifact, the timeline artifact and progress lines.

``live_reports`` wraps the sending part of a flow run. Inside a flow run it keeps the progress
artifact moving (every 2 s), publishes the timeline artifact (``parallel-requests-timeline``: a
markdown table with a bar per interval, see ``tasks.reporting.live_metrics``) at most every 30 s,
since each keyed update is a new artifact version, and, when ``line_seconds`` is set, logs one
progress line that often, for runs no terminal shows (cron, CI, a worker):

    progress: 12,345 rows settled, 37.1% of the input; 5,880 requests/min (limit 6,000), 98,000 tokens/min,
    12 in flight, 0 429s, 3 retries, 0 failed, $0.0412, elapsed 2m06s, ETA 3m34s

Usage:
    >>> async with live_reports(progress, source="requests.jsonl", line_seconds=30.0):
    ...     outcome = await run_shards_here(...)
"""

# Standard library imports
import asyncio
import contextlib
import logging
import math
import time
from typing import AsyncIterator, List, Optional

# Third-party imports
from prefect.artifacts import acreate_markdown_artifact
from prefect.context import FlowRunContext

# Local application imports
from tasks.reporting.live_metrics import timeline_markdown, watch
from tasks.reporting.metrics import RunProgress, progress_artifact
from tasks.reporting.run_events import emit_limits_changed

TIMELINE_KEY = "parallel-requests-timeline"
# How often the timeline artifact may get a new version while the run goes.
TIMELINE_SECONDS = 30.0
# The fewest seconds between two limits-changed events, and the change that counts (5%).
LIMIT_EVENT_SECONDS = 60.0
LIMIT_CHANGE_SHARE = 0.05

LOGGER = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def live_reports(progress: RunProgress, source: str, line_seconds: Optional[float] = None,
                       logger: Optional[logging.Logger] = None, job_id: Optional[str] = None) -> AsyncIterator[None]:
    """Keep the progress and timeline artifacts, and the progress lines, moving while the body runs; with
    ``job_id``, emit ``parallel-requests.run.limits-changed`` when the limit in force changes (at most once a minute)."""
    watch(progress)
    in_flow = FlowRunContext.get() is not None
    log = logger or LOGGER

    async def keep_reporting() -> None:
        last_timeline = last_line = time.monotonic()
        announced: Optional[List[Optional[float]]] = None
        last_event = -math.inf
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            limits = list(progress.live.limits())
            if announced is None or not any(announced):
                announced = limits
            elif job_id and _changed(announced, limits) and now - last_event >= LIMIT_EVENT_SECONDS:
                emit_limits_changed(job_id, source, limits[0], limits[1], announced)
                log.info("The limit in force changed: %s", "; ".join(
                    f"{_number(now_value)} {scope}/min (was {_number(before)})"
                    for scope, now_value, before in zip(("requests", "tokens"), limits, announced)
                    if now_value != before))
                announced, last_event = limits, now
            if line_seconds and now - last_line >= line_seconds:
                last_line = now
                log.info("progress: %s", progress_text(progress))
            if in_flow and now - last_timeline >= TIMELINE_SECONDS and progress.live.intervals:
                last_timeline = now
                with contextlib.suppress(Exception):  # a view must never stop the run
                    await publish_timeline(progress, source)

    reporter = asyncio.create_task(keep_reporting())
    try:
        async with progress_artifact(progress):
            yield
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter


async def publish_timeline(progress: RunProgress, source: str) -> None:
    """Publish the timeline artifact now (inside a flow run only; nothing when no request was sent)."""
    if FlowRunContext.get() is None or not progress.live.intervals:
        return
    try:
        await acreate_markdown_artifact(key=TIMELINE_KEY, markdown=timeline_markdown(progress.live, f"Timeline of {source}"),
                                        description=f"Request rate, limit, 429s and latency over time for {source}")
    except Exception as error:  # a view must never cost the run
        LOGGER.warning("could not publish the timeline: %s", error)


def progress_text(progress: RunProgress) -> str:
    """One line of where the run stands (the plain progress line, and the live block's words)."""
    live = progress.live
    rpm, tpm = live.recent_rates()
    limit_rpm, limit_tpm = live.limits()
    elapsed = time.time() - live.started_at
    eta = eta_seconds(progress, elapsed)
    if progress.note and not live.totals.sent:  # batch mode: the server does the sending
        return (f"{progress.rows_settled:,} rows settled, {progress.percent:.1f}% of the input; {progress.note}; "
                f"elapsed {duration_text(elapsed)}, ETA {duration_text(eta) if eta is not None else '-'}")
    return (f"{progress.rows_settled:,} rows settled, {progress.percent:.1f}% of the input; "
            f"{rpm:,.0f} requests/min{_limit(limit_rpm)}, {tpm:,.0f} tokens/min{_limit(limit_tpm)}, "
            f"{live.in_flight:,} in flight, {live.totals.rate_limited:,} 429s, {live.totals.retries:,} retries, "
            f"{live.totals.errors:,} failed, ${live.cost_usd:,.4f}, elapsed {duration_text(elapsed)}, "
            f"ETA {duration_text(eta) if eta is not None else '-'}")


def eta_seconds(progress: RunProgress, elapsed: float) -> Optional[float]:
    """Seconds left at this run's pace (lines an earlier run finished are no part of it; None until there is one)."""
    done_here = progress.done_bytes - progress.earlier_bytes
    left = progress.total_bytes - progress.done_bytes
    if done_here <= 0 or elapsed < 1.0:
        return None
    return max(0.0, elapsed * left / done_here)


def duration_text(seconds: float) -> str:
    """2h05m, 3m34s or 12s."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _changed(before: List[Optional[float]], now: List[Optional[float]]) -> bool:
    """True when a limit appeared, went, or moved by more than ``LIMIT_CHANGE_SHARE``."""
    for old, new in zip(before, now):
        if (old is None) != (new is None):
            return True
        if old is not None and new is not None and abs(new - old) > LIMIT_CHANGE_SHARE * max(old, 1e-9):
            return True
    return False


def _number(value: Optional[float]) -> str:
    """6,000 or none."""
    return "none" if value is None else f"{value:,.0f}"


def _limit(value: Optional[float]) -> str:
    """" (limit 6,000)" or ""."""
    return "" if value is None else f" (limit {value:,.0f})"
