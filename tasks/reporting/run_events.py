"""Prefect events a run emits, for Automations to react to without code.

    parallel-requests.run.finished        every row has its result (failed rows included)
    parallel-requests.run.stopped         the run ended early (a bad key, no quota, the lock lost...)
    parallel-requests.run.budget-reached  --budget-usd stopped dispatching
    parallel-requests.run.limits-changed  the limit in force changed (learned, cut by 429s); at most one a minute

The resource is the job (``parallel-requests.job.<generation id>``, named after the input, with the
label ``parallel-requests.failed-rows``: ``yes`` when a row failed or was not sent, else ``no``); the
flow run is a related resource (role ``flow-run``), so an Automation can filter on any of them
(``deployments/notify_on_failed_rows.py`` makes one). The payload holds
the run's figures: rows, succeeded, failed, not sent, 429s, retries, cost, duration, the output, the
stop reason, latency p90 per model, and the limits in force. The command line drains Prefect's events
worker before it exits, so the last event is never lost with the process.

Usage:
    >>> emit_run_event("finished", job_id, "requests.jsonl", summary.to_dict())
    >>> emit_limits_changed(job_id, "requests.jsonl", 5880.0, 180000.0)
"""

# Standard library imports
import logging
from typing import Any, Dict, List, Optional

# Third-party imports
from prefect.events import emit_event
from prefect.runtime import flow_run as current_flow_run

EVENT_PREFIX = "parallel-requests.run"
LOGGER = logging.getLogger(__name__)


def emit_run_event(kind: str, job_id: str, source_name: str, summary: Dict[str, Any]) -> None:
    """Emit ``parallel-requests.run.<kind>`` with the run's figures (never raises)."""
    totals = summary.get("totals") or {}
    payload = {
        "source": summary.get("source"), "output": summary.get("output"), "complete": summary.get("complete"),
        "stop_reason": summary.get("stop_reason"), "rows": totals.get("rows"), "succeeded": totals.get("succeeded"),
        "failed": totals.get("failed"), "not_sent": totals.get("not_sent"), "rate_limited_429": totals.get("rate_limited"),
        "retries": totals.get("retries"), "requests_sent": totals.get("requests_sent"),
        "cost_usd": round(float(totals.get("cost_usd") or 0.0), 6), "duration_seconds": summary.get("duration_seconds"),
        "latency_p90_seconds": {model: values.get("p90") for model, values in (summary.get("latency") or {}).items()},
        "limits_in_force": summary.get("limits_in_force") or [],
    }
    failed = int(totals.get("failed") or 0) + int(totals.get("not_sent") or 0)
    _emit(kind, job_id, source_name, payload, {"parallel-requests.failed-rows": "yes" if failed else "no"})


def emit_limits_changed(job_id: str, source_name: str, requests_per_minute: Optional[float],
                        tokens_per_minute: Optional[float], before: Optional[List[Optional[float]]] = None) -> None:
    """Emit ``parallel-requests.run.limits-changed`` with the limits now and before (never raises)."""
    _emit("limits-changed", job_id, source_name, {
        "requests_per_minute": requests_per_minute, "tokens_per_minute": tokens_per_minute,
        "before": {"requests_per_minute": (before or [None, None])[0], "tokens_per_minute": (before or [None, None])[1]}})


def _emit(kind: str, job_id: str, source_name: str, payload: Dict[str, Any],
          labels: Optional[Dict[str, str]] = None) -> None:
    """One event, with the flow run (when there is one) as a related resource."""
    related = []
    flow_run_id = current_flow_run.get_id()
    if flow_run_id:
        related.append({"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run",
                        "prefect.resource.name": str(current_flow_run.get_name() or "")})
    try:
        emit_event(event=f"{EVENT_PREFIX}.{kind}",
                   resource={"prefect.resource.id": f"parallel-requests.job.{job_id}",
                             "prefect.resource.name": source_name, **(labels or {})},
                   related=related, payload=payload)
    except Exception as error:  # an event must never cost the run
        LOGGER.warning("could not emit %s.%s: %s", EVENT_PREFIX, kind, error)


def flush_events(timeout_seconds: float = 10.0) -> None:
    """Send the events still queued in this process (the command line calls it before it exits)."""
    try:
        from prefect.events.worker import EventsWorker
        EventsWorker.drain_all(timeout=timeout_seconds)
    except Exception as error:
        LOGGER.warning("could not send the last events: %s", error)
