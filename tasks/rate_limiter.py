"""The shared rate-limit engine: RPM and TPM token buckets plus a cap on requests in flight.

One ``RateLimiter`` is built per run, on the flow's event loop, and every shard task shares it.
Before a request is sent it reserves one request, its estimated tokens and one in-flight
slot. It gives the slot back when the answer has arrived.

Features:
    - Two token buckets (requests per minute, tokens per minute). They refill at
      ``target_utilization`` of each limit (98% by default): at exactly 100%, network jitter
      at the edges of the server's one-second slices earns about 1% of 429s. Each bucket is
      deep enough for about ``burst_seconds`` of its limit, one second by default. Hosted APIs enforce
      per-minute limits in short slices, so the engine never sends a whole minute's worth at
      once. The buckets start empty, so a run does not open with a burst either.
    - A cap on requests in flight.
    - Waiting is event-driven, with no polling loop. Waiters queue first in, first out. The
      head of the queue is granted as soon as the buckets can serve it: either one timer is
      set for the exact moment they will, or a released slot wakes the queue.
    - A request bigger than a bucket's depth, but within the per-minute limit, is served
      from a full bucket and leaves it in debt. A request whose estimate is above the
      per-minute token limit can never be served, so it fails at once with
      ``RequestNeverFits`` instead of waiting forever.
    - ``slow_down()`` empties the buckets after a 429, so the engine goes on only at its
      refill rate. It slows the engine; it does not freeze it for a fixed time.

Usage:
    >>> limiter = RateLimiter(max_requests_per_minute=6_000, max_tokens_per_minute=1_000_000,
    ...                       max_in_flight=200)
    >>> async def call(session, body, tokens):
    ...     async with limiter.reserve(tokens):
    ...         return await session.post(url, json=body)

Pitfalls:
    - The limiter binds to the running event loop the first time it is used. Build it and
      the aiohttp session in the flow, and await the shard tasks with ``asyncio.gather`` on
      the same loop. Prefect's ``.submit()`` runs async tasks on other loops.
    - Zero or negative limits raise ``ValueError`` at construction. ``None`` means "no limit".
"""

# Standard library imports
import asyncio
import collections
import contextlib
import math
from dataclasses import dataclass, field
from typing import AsyncIterator, Deque, Optional

# A float tolerance, so that a bucket refilled to 0.9999999999 of a request still serves it.
_EPSILON = 1e-9


class RequestNeverFits(ValueError):
    """Raised for a request whose token estimate is above the per-minute token limit."""


@dataclass
class TokenBucket:
    """A token bucket that refills continuously at ``rate_per_second`` up to ``capacity``.

    An unlimited bucket has ``rate_per_second`` set to ``math.inf`` and never makes anyone wait.
    The level may go below zero (debt) when a request bigger than the capacity is served.
    """

    rate_per_second: float
    capacity: float
    level: float = 0.0
    updated_at: float = 0.0

    @classmethod
    def per_minute(cls, limit_per_minute: Optional[float], burst_seconds: float, now: float) -> "TokenBucket":
        """Build a bucket for a per-minute limit, ``burst_seconds`` deep, starting empty.

        Args:
            limit_per_minute: the limit, or None for no limit.
            burst_seconds: how many seconds of the limit the bucket holds at most.
            now: the current time of the event loop's clock.

        Returns:
            The bucket.

        Raises:
            ValueError: when the limit or the depth is zero or negative.
        """
        if limit_per_minute is None or math.isinf(limit_per_minute):
            return cls(rate_per_second=math.inf, capacity=math.inf, level=math.inf, updated_at=now)
        if not limit_per_minute > 0:
            raise ValueError(f"a per-minute limit must be positive, got {limit_per_minute!r}")
        if not burst_seconds > 0:
            raise ValueError(f"burst_seconds must be positive, got {burst_seconds!r}")
        rate = limit_per_minute / 60.0
        # At least one whole unit fits, or a 30-per-minute limit could never serve anything.
        capacity = max(rate * burst_seconds, 1.0)
        return cls(rate_per_second=rate, capacity=capacity, level=0.0, updated_at=now)

    @property
    def unlimited(self) -> bool:
        """True when this bucket never limits anything."""
        return math.isinf(self.rate_per_second)

    def refill(self, now: float) -> None:
        """Add what has flowed in since the last refill, up to the capacity."""
        if self.unlimited:
            return
        elapsed = now - self.updated_at
        if elapsed > 0:
            self.level = min(self.capacity, self.level + elapsed * self.rate_per_second)
            self.updated_at = now

    def seconds_until_available(self, amount: float) -> float:
        """Seconds until ``amount`` can be served (0.0 when it can be served now).

        A request bigger than the capacity is served as soon as the bucket is full.
        """
        if self.unlimited:
            return 0.0
        needed = min(amount, self.capacity) - self.level
        if needed <= _EPSILON:
            return 0.0
        return needed / self.rate_per_second

    def take(self, amount: float) -> None:
        """Remove ``amount`` from the bucket; the level may go below zero."""
        if not self.unlimited:
            self.level -= amount

    def give_back(self, amount: float) -> None:
        """Return ``amount`` to the bucket (a refund), never above the capacity."""
        if not self.unlimited:
            self.level = min(self.capacity, self.level + amount)

    def empty(self) -> None:
        """Drop whatever the bucket holds, so it serves only at its refill rate from now on."""
        if not self.unlimited:
            self.level = min(self.level, 0.0)


@dataclass
class _Waiter:
    """One caller waiting in line for capacity."""

    tokens: float
    future: "asyncio.Future[None]"


@dataclass
class RateLimiter:
    """Request and token buckets plus an in-flight cap, shared by every shard of a run.

    Attributes:
        max_requests_per_minute: the request limit, or None for no limit.
        max_tokens_per_minute: the token limit, or None for no limit.
        max_in_flight: how many requests may be waiting for an answer at once.
        burst_seconds: how many seconds of each limit the buckets hold at most.
        target_utilization: the share of each limit the buckets refill at (0 to 1).
    """

    max_requests_per_minute: Optional[float]
    max_tokens_per_minute: Optional[float]
    max_in_flight: int = 200
    burst_seconds: float = 1.0
    target_utilization: float = 0.98
    in_flight: int = field(default=0, init=False)
    _requests: Optional[TokenBucket] = field(default=None, init=False, repr=False)
    _tokens: Optional[TokenBucket] = field(default=None, init=False, repr=False)
    _waiters: Deque[_Waiter] = field(default_factory=collections.deque, init=False, repr=False)
    _timer: Optional[asyncio.TimerHandle] = field(default=None, init=False, repr=False)
    _loop: Optional[asyncio.AbstractEventLoop] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_requests_per_minute", "max_tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive (or None for no limit), got {value!r}")
        if not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be a whole number of at least 1, got {self.max_in_flight!r}")
        if not self.burst_seconds > 0:
            raise ValueError(f"burst_seconds must be positive, got {self.burst_seconds!r}")
        if not 0 < self.target_utilization <= 1:
            raise ValueError(f"target_utilization must be above 0 and at most 1, got {self.target_utilization!r}")

    @contextlib.asynccontextmanager
    async def reserve(self, tokens: float) -> AsyncIterator[None]:
        """Wait for capacity for one request of ``tokens`` tokens, and hold its in-flight slot.

        Raises:
            RequestNeverFits: when ``tokens`` is above the per-minute token limit.
        """
        await self.acquire(tokens)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, tokens: float) -> None:
        """Wait, first in first out, until one request and ``tokens`` tokens can be sent.

        The caller must call ``release()`` once its request has been answered.

        Raises:
            RequestNeverFits: when ``tokens`` is above the per-minute token limit.
        """
        self._bind_loop()
        if self.max_tokens_per_minute is not None and tokens > self.max_tokens_per_minute:
            raise RequestNeverFits(
                f"the request is estimated at {int(tokens):,} tokens, more than "
                f"max_tokens_per_minute={int(self.max_tokens_per_minute):,}: it can never be sent"
            )
        if not self._waiters and self._try_grant(tokens):
            return
        future: asyncio.Future[None] = self._loop.create_future()  # type: ignore[union-attr]
        self._waiters.append(_Waiter(tokens=tokens, future=future))
        self._dispatch()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted in the same instant as cancelled: give the capacity back.
                self.release()
            self._dispatch()
            raise

    def release(self) -> None:
        """Free one in-flight slot and wake whoever waits for it."""
        self.in_flight -= 1
        if self._waiters:
            self._dispatch()

    def slow_down(self, requests: bool = True, tokens: bool = True) -> None:
        """Empty the buckets after a rate-limit answer, so dispatching goes on only at the refill rate."""
        self._bind_loop()
        now = self._loop.time()  # type: ignore[union-attr]
        for wanted, bucket in ((requests, self._requests), (tokens, self._tokens)):
            if wanted and bucket is not None:
                bucket.refill(now)
                bucket.empty()

    def refund_tokens(self, tokens: float) -> None:
        """Give back tokens that were reserved but not used (the estimate was too high)."""
        if tokens > 0 and self._tokens is not None:
            self._tokens.give_back(tokens)
            if self._waiters:
                self._dispatch()

    @property
    def waiting(self) -> int:
        """How many callers wait in line."""
        return sum(1 for waiter in self._waiters if not waiter.future.done())

    # Helpers

    def _bind_loop(self) -> None:
        """Bind to the running loop and create the buckets on first use."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            now = self._loop.time()
            self._requests = TokenBucket.per_minute(self._target(self.max_requests_per_minute), self.burst_seconds, now)
            self._tokens = TokenBucket.per_minute(self._target(self.max_tokens_per_minute), self.burst_seconds, now)

    def _target(self, limit: Optional[float]) -> Optional[float]:
        """The rate the buckets aim for: the limit times the target utilization."""
        return None if limit is None else limit * self.target_utilization

    def _try_grant(self, tokens: float) -> bool:
        """Grant one request now if a slot and both buckets allow it."""
        if self.in_flight >= self.max_in_flight:
            return False
        assert self._requests is not None and self._tokens is not None and self._loop is not None
        now = self._loop.time()
        self._requests.refill(now)
        self._tokens.refill(now)
        if self._requests.seconds_until_available(1) > 0 or self._tokens.seconds_until_available(tokens) > 0:
            return False
        self._requests.take(1)
        self._tokens.take(tokens)
        self.in_flight += 1
        return True

    def _dispatch(self) -> None:
        """Grant waiters in order while capacity lasts; otherwise set one timer for the moment it returns."""
        assert self._requests is not None and self._tokens is not None and self._loop is not None
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.done():
                self._waiters.popleft()
                continue
            if self.in_flight >= self.max_in_flight:
                return  # release() wakes the line when a slot frees
            now = self._loop.time()
            self._requests.refill(now)
            self._tokens.refill(now)
            delay = max(
                self._requests.seconds_until_available(1),
                self._tokens.seconds_until_available(waiter.tokens),
            )
            if delay > 0:
                self._set_timer(delay)
                return
            self._waiters.popleft()
            self._requests.take(1)
            self._tokens.take(waiter.tokens)
            self.in_flight += 1
            waiter.future.set_result(None)

    def _set_timer(self, delay: float) -> None:
        """Set the single wake-up timer ``delay`` seconds from now, replacing an older one."""
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        """The buckets should now serve the head of the line."""
        self._timer = None
        self._dispatch()
