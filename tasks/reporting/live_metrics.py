"""What a run is doing right now: request rates, latency, 429s and a timeline, for live views.

The shard workers report each event here as it happens (a request sent, its answer and how long it
took, a 429, a retry, a row's failure, the time a request waited for the rate limiter). Memory stays
small whatever the run's length: latency is kept in log-spaced buckets 5% wide (percentiles within
5%), and the timeline keeps at most ``MAX_INTERVALS`` intervals, each twice as wide once it is full.

Three views read it: the command line's live status block (``tasks.reporting.live_display``), the
progress lines a run logs every 30 s when no terminal shows it, and the timeline artifact in the
Prefect dashboard (``timeline_markdown``), updated at most every 30 s.

Usage:
    >>> live = LiveMetrics()
    >>> live.sent()
    >>> live.answered("gpt-4o-mini", seconds=0.42, tokens=180, cost_usd=0.0001)
    >>> live.latency_summary()      # {"gpt-4o-mini": {"p50": 0.42, "p90": 0.42, "p99": 0.42, "answers": 1}}
    >>> print(timeline_markdown(live))
"""

# Standard library imports
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

# The width of a timeline interval at the start, and how many intervals are kept (then each is doubled).
INTERVAL_SECONDS = 10.0
MAX_INTERVALS = 120
# Latency buckets: the first covers up to 1 ms, each next one is 5% wider.
BUCKET_BASE_SECONDS = 0.001
BUCKET_GROWTH = 1.05
# The rows of the timeline artifact (the latest intervals), and the width of its bars.
TIMELINE_ROWS = 60
BAR_WIDTH = 24


def bucket_of(seconds: float) -> int:
    """The latency bucket a duration falls in."""
    if seconds <= BUCKET_BASE_SECONDS:
        return 0
    return math.ceil(math.log(seconds / BUCKET_BASE_SECONDS) / _LOG_BUCKET_GROWTH)


_LOG_BUCKET_GROWTH = math.log(BUCKET_GROWTH)


@dataclass
class LatencyHistogram:
    """Durations in log-spaced buckets: percentiles within 5% in a few hundred counters."""

    counts: Dict[int, int] = field(default_factory=dict)
    total: int = 0

    def add(self, seconds: float) -> None:
        """Count one duration."""
        self.add_to_bucket(bucket_of(seconds))

    def add_to_bucket(self, bucket: int) -> None:
        """Count one duration already placed in its bucket (``bucket_of``)."""
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.total += 1

    def merge(self, other: "LatencyHistogram") -> None:
        """Add another histogram's counts."""
        for bucket, count in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + count
        self.total += other.total

    def percentile(self, share: float) -> Optional[float]:
        """The duration ``share`` (0 to 1) of the counted ones are at most (a bucket's upper edge), or None."""
        if not self.total:
            return None
        rank = max(1, math.ceil(share * self.total))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return BUCKET_BASE_SECONDS * BUCKET_GROWTH ** bucket
        return None

    def summary(self) -> Dict[str, Any]:
        """p50, p90 and p99 in seconds (rounded to the millisecond) and the count."""
        return {"p50": _rounded(self.percentile(0.5)), "p90": _rounded(self.percentile(0.9)),
                "p99": _rounded(self.percentile(0.99)), "count": self.total}


@dataclass
class TimelineInterval:
    """What happened in one interval of the run."""

    start: float
    seconds: float
    limit_rpm: Optional[float] = None
    sent: int = 0
    answered: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # of the answers other than 429s
    rate_limited: int = 0
    retries: int = 0
    errors: int = 0
    tokens: int = 0

    def absorb(self, other: "TimelineInterval") -> None:
        """Take the next interval into this one (the timeline got twice as coarse)."""
        self.seconds += other.seconds
        for name in ("sent", "answered", "rate_limited", "retries", "errors", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.limit_rpm = other.limit_rpm if other.limit_rpm is not None else self.limit_rpm
        self.latency.merge(other.latency)


@dataclass
class LiveMetrics:
    """A run's live counters, latency per model, limiter waits, and a bounded timeline.

    Attributes:
        started_at: when the run began (epoch seconds).
        totals: this run's counts so far (sent, answered, rate_limited, retries, errors, tokens), as one
            interval as long as the run.
        cost_usd: the cost of the answers so far.
        latency_by_model: time from sending a request to its answer, per model.
        limiter_wait: time requests waited for the rate limiter (only requests that waited).
        intervals: the timeline, oldest first.
        limit_probe: returns the requests-per-minute and tokens-per-minute limits in force (None: none).
    """

    started_at: float = field(default_factory=time.time)
    totals: TimelineInterval = field(default_factory=lambda: TimelineInterval(time.time(), math.inf))
    cost_usd: float = 0.0
    latency_by_model: Dict[str, LatencyHistogram] = field(default_factory=dict)
    limiter_wait: LatencyHistogram = field(default_factory=LatencyHistogram)
    intervals: List[TimelineInterval] = field(default_factory=list)
    interval_seconds: float = INTERVAL_SECONDS
    limit_probe: Optional[Callable[[], Tuple[Optional[float], Optional[float]]]] = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _current_end: float = field(default=-math.inf, repr=False)  # when the latest interval ends

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered yet."""
        return max(0, self.totals.sent - self.totals.answered)

    def sent(self) -> None:
        """A request went out."""
        with self._lock:
            self.totals.sent += 1
            self._now_interval().sent += 1

    def answered(self, model: Optional[str], seconds: float, rate_limited: bool = False, tokens: int = 0,
                 cost_usd: float = 0.0) -> None:
        """A request's answer (or failure to get one) came back after ``seconds``, having used ``tokens`` that
        cost ``cost_usd``."""
        with self._lock:
            interval = self._now_interval()
            self.totals.answered += 1
            interval.answered += 1
            if tokens:
                self.totals.tokens += tokens
                interval.tokens += tokens
            self.cost_usd += cost_usd
            if rate_limited:
                self.totals.rate_limited += 1
                interval.rate_limited += 1
            else:
                bucket = bucket_of(seconds)
                histogram = self.latency_by_model.get(model or "-")
                if histogram is None:
                    histogram = self.latency_by_model[model or "-"] = LatencyHistogram()
                for counted in (histogram, interval.latency):  # (add_to_bucket, without two calls per answer)
                    counted.counts[bucket] = counted.counts.get(bucket, 0) + 1
                    counted.total += 1

    def retried(self) -> None:
        """A request is tried again."""
        with self._lock:
            self.totals.retries += 1
            self._now_interval().retries += 1

    def failed(self) -> None:
        """A row ended in a failure."""
        with self._lock:
            self.totals.errors += 1
            self._now_interval().errors += 1

    def waited(self, seconds: float) -> None:
        """A request waited ``seconds`` for the rate limiter."""
        with self._lock:
            self.limiter_wait.add(seconds)

    def limits(self) -> Tuple[Optional[float], Optional[float]]:
        """The requests-per-minute and tokens-per-minute limits in force now (None: none)."""
        if self.limit_probe is None:
            return None, None
        try:
            return self.limit_probe()
        except Exception:  # a view must never break the run
            return None, None

    def recent_rates(self, seconds: float = 30.0) -> Tuple[float, float]:
        """Requests and tokens per minute over the last ``seconds`` (sent requests; answered tokens)."""
        now = time.time()
        with self._lock:
            sent = tokens = 0.0
            covered = 0.0
            for interval in reversed(self.intervals):
                end = min(now, interval.start + interval.seconds)
                length = max(0.0, end - interval.start)
                if length <= 0:
                    continue
                take = min(length, seconds - covered)
                sent += interval.sent * take / length
                tokens += interval.tokens * take / length
                covered += take
                if covered >= seconds:
                    break
        if covered < 1.0:
            return 0.0, 0.0
        return sent * 60.0 / covered, tokens * 60.0 / covered

    def latency_summary(self) -> Dict[str, Dict[str, Any]]:
        """Per model: p50, p90, p99 (seconds) and the answers counted; plus "limiter wait"."""
        with self._lock:
            found = {model: histogram.summary() for model, histogram in sorted(self.latency_by_model.items())}
            if self.limiter_wait.total:
                found["limiter wait"] = self.limiter_wait.summary()
        return found

    def timeline_rows(self) -> List[Dict[str, Any]]:
        """The timeline as rows of numbers (per interval: start, seconds, rates, counts, p90)."""
        with self._lock:
            rows = []
            now = time.time()
            for interval in self.intervals:
                minutes = max(1.0, min(interval.seconds, now - interval.start)) / 60.0  # the last one: so far
                rows.append({"start": _clock(interval.start), "seconds": round(interval.seconds, 1),
                             "requests_per_minute": round(interval.sent / minutes, 1),
                             "limit_per_minute": interval.limit_rpm, "sent": interval.sent,
                             "rate_limited_429": interval.rate_limited, "retries": interval.retries,
                             "errors": interval.errors, "tokens_per_minute": round(interval.tokens / minutes, 1),
                             "latency_p90_seconds": _rounded(interval.latency.percentile(0.9))})
        return rows

    def _now_interval(self) -> TimelineInterval:
        """The interval now falls in (made as time goes; the timeline halves its length when full)."""
        now = time.time()
        if now < self._current_end:
            return self.intervals[-1]
        start = self.intervals[-1].start + self.intervals[-1].seconds if self.intervals else self.started_at
        if now - start >= self.interval_seconds:  # skip quiet intervals in one step
            start += (now - start) // self.interval_seconds * self.interval_seconds
        interval = TimelineInterval(start, self.interval_seconds, limit_rpm=self.limits()[0])
        self.intervals.append(interval)
        if len(self.intervals) > MAX_INTERVALS:
            merged = []
            for index in range(0, len(self.intervals) - 1, 2):
                first, second = self.intervals[index], self.intervals[index + 1]
                first.absorb(second)
                merged.append(first)
            if len(self.intervals) % 2:
                merged.append(self.intervals[-1])
            self.intervals = merged
            self.interval_seconds *= 2
        self._current_end = self.intervals[-1].start + self.intervals[-1].seconds
        return self.intervals[-1]


def timeline_markdown(live: LiveMetrics, title: str = "Timeline") -> str:
    """The timeline as a markdown table with a bar per interval (requests/min against the limit in force),
    then latency per model: what the Prefect UI shows in the timeline artifact."""
    rows = live.timeline_rows()[-TIMELINE_ROWS:]
    peak = max([row["requests_per_minute"] for row in rows] + [1.0]
               + [row["limit_per_minute"] for row in rows if row["limit_per_minute"] and math.isfinite(row["limit_per_minute"])])
    lines = [f"## {title}", "",
             f"Requests per minute in each interval of {rows[-1]['seconds'] if rows else live.interval_seconds:.0f} s "
             "(the bar; ┃ marks the limit in force), with 429s, retries, errors, tokens per minute and latency p90.",
             "", "| time (UTC) | rate | requests/min | limit | 429s | retries | errors | tokens/min | p90 latency |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['start']} | {_bar(row['requests_per_minute'], row['limit_per_minute'], peak)} "
                     f"| {row['requests_per_minute']:,.0f} | {_number(row['limit_per_minute'])} "
                     f"| {row['rate_limited_429']:,}{' ⚠' if row['rate_limited_429'] else ''} | {row['retries']:,} "
                     f"| {row['errors']:,} | {row['tokens_per_minute']:,.0f} | {_seconds(row['latency_p90_seconds'])} |")
    latency = live.latency_summary()
    if latency:
        lines += ["", "### Latency", "", "| model | p50 | p90 | p99 | answers |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {model} | {_seconds(values['p50'])} | {_seconds(values['p90'])} | {_seconds(values['p99'])} "
                  f"| {values['count']:,} |" for model, values in latency.items()]
    return "\n".join(lines) + "\n"


def latency_markdown_rows(latency: Dict[str, Dict[str, Any]]) -> List[str]:
    """Latency as rows of the summary's measure/value table."""
    return [f"| latency {model} (p50 / p90 / p99) | {_seconds(values['p50'])} / {_seconds(values['p90'])} / "
            f"{_seconds(values['p99'])} ({values['count']:,}) |" for model, values in latency.items()]


# The run this process is running now (the command line's live display reads it).
_current: Optional[Any] = None


def watch(progress: Any) -> None:
    """Make ``progress`` (a ``RunProgress``) the run a live display in this process shows."""
    global _current
    _current = progress


def current() -> Optional[Any]:
    """The run a live display in this process shows (a ``RunProgress``), or None."""
    return _current


# Helpers


def _bar(rate: float, limit: Optional[float], peak: float) -> str:
    """A bar of ``rate`` on a scale of ``peak`` (█ filled, ░ empty), with ┃ at the limit."""
    cells = int(round(BAR_WIDTH * rate / peak)) if peak > 0 else 0
    bar = list("█" * cells + "░" * (BAR_WIDTH - cells))
    if limit and math.isfinite(limit) and peak > 0:
        bar[max(0, min(BAR_WIDTH - 1, int(round(BAR_WIDTH * limit / peak)) - 1))] = "┃"
    return "".join(bar)


def _clock(epoch: float) -> str:
    """An epoch time as HH:MM:SS UTC."""
    return time.strftime("%H:%M:%S", time.gmtime(epoch))


def _rounded(value: Optional[float]) -> Optional[float]:
    """Seconds rounded to the millisecond, or None."""
    return None if value is None else round(value, 3)


def _seconds(value: Optional[float]) -> str:
    """Seconds in words: 420 ms, 2.31 s, or -."""
    if value is None:
        return "-"
    return f"{value * 1000:,.0f} ms" if value < 1 else f"{value:,.2f} s"


def _number(value: Optional[float]) -> str:
    """A limit: 6,000, or - for none."""
    return "-" if value is None or math.isinf(value) else f"{value:,.0f}"
