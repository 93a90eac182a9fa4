"""The command line's live status block: one block on stderr, redrawn four times a second, logs above it.

Drawn with ``rich`` (Prefect depends on it): a bar of the input done, the rows settled, the request
rate against the limit in force, tokens per minute, requests in flight, 429s, retries, failures, the
cost so far, the time elapsed and the ETA. Prefect's console log handlers print through the same
console while the block is shown, so log lines scroll above it instead of tearing it. stdout is
left alone: it carries only the final summary (or ``--json``).

Usage:
    >>> with LiveDisplay():
    ...     asyncio.run(flow_function(**parameters))
"""

# Standard library imports
import logging
import time
from typing import Any, List, Optional, Tuple

# Third-party imports
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

# Local application imports
from tasks.reporting.live_metrics import current
from tasks.reporting.live_reports import duration_text, eta_seconds

# Redraws per second.
REFRESH_PER_SECOND = 4


class LiveDisplay:
    """The status block, shown while the body of the ``with`` runs (it stays, final, above the summary)."""

    def __init__(self, console: Optional[Console] = None) -> None:
        self.console = console or Console(stderr=True)
        self._live: Optional[Live] = None
        self._swapped: List[Tuple[Any, Any]] = []

    def __enter__(self) -> "LiveDisplay":
        self._live = Live(get_renderable=self.render, console=self.console, refresh_per_second=REFRESH_PER_SECOND,
                          redirect_stdout=False, redirect_stderr=True, transient=False)
        self._live.start()
        for handler in _console_handlers():  # Prefect's log lines go through the live console: above the block
            self._swapped.append((handler, handler.console))
            handler.console = self._live.console
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handler, console in self._swapped:
            handler.console = console
        self._swapped.clear()
        if self._live is not None:
            self._live.stop()
            self._live = None

    def render(self) -> Any:
        """The block as it stands now."""
        progress = current()
        if progress is None:
            return Text("parallel-requests: starting…", style="dim")
        live = progress.live
        rpm, tpm = live.recent_rates()
        limit_rpm, limit_tpm = live.limits()
        elapsed = time.time() - live.started_at
        eta = eta_seconds(progress, elapsed)
        head = Table.grid(padding=(0, 1))
        head.add_row(ProgressBar(total=100.0, completed=progress.percent, width=40),
                     Text(f"{progress.percent:5.1f}%", style="bold"),
                     Text(f"{progress.rows_settled:,} rows settled"))
        rate = f"{rpm:,.0f} requests/min" + (f" of {limit_rpm:,.0f} ({100.0 * rpm / limit_rpm:.0f}%)"
                                             if limit_rpm else " (no limit)")
        tokens = f"{tpm:,.0f} tokens/min" + (f" of {limit_tpm:,.0f}" if limit_tpm else "")
        first = Text.assemble((rate, "cyan"), "   ", tokens, "   ", f"{live.in_flight:,} in flight")
        if progress.note and not live.totals.sent:  # batch mode: the server does the sending
            first = Text(progress.note, style="cyan")
        second = Text.assemble((f"{live.totals.rate_limited:,} 429s", "yellow" if live.totals.rate_limited else ""),
                               f"   {live.totals.retries:,} retries   ",
                               (f"{live.totals.errors:,} failed", "red" if live.totals.errors else ""),
                               f"   ${live.cost_usd:,.4f}   elapsed {duration_text(elapsed)}   ETA ",
                               (duration_text(eta) if eta is not None else "-", "bold"))
        return Group(head, first, second)


def _console_handlers() -> List[Any]:
    """Every log handler that prints through a rich console (Prefect's console handler)."""
    found = []
    loggers = [logging.getLogger()] + [item for item in logging.Logger.manager.loggerDict.values()
                                       if isinstance(item, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(getattr(handler, "console", None), Console) and handler not in found:
                found.append(handler)
    return found
