"""A token bucket: a level that refills continuously at a rate up to a depth, driven by the clock you give it.

The bucket never reads a clock: every method takes ``now`` (the event loop's time in the engine,
any number in a test). So its arithmetic is tested without sleeping.

Usage:
    >>> bucket = TokenBucket.per_minute(6_000, burst_seconds=1.0, now=0.0)   # 100 a second, 100 deep, empty
    >>> bucket.seconds_until_available(1, now=0.0)
    0.01
    >>> bucket.refill(now=0.5); bucket.take(1)
"""

# Standard library imports
import math
from dataclasses import dataclass, field
from typing import Optional

# A float tolerance, so that a bucket refilled to 0.9999999999 of a request still serves it.
_EPSILON = 1e-9


def depth_seconds(burst_seconds: float, target_utilization: float) -> float:
    """How many seconds of its rate a bucket holds, so the catch-up after a lull never pushes a window over.

    A bucket refilling at ``target_utilization`` of a limit, this deep, sends at most the limit in
    any window of ``burst_seconds`` or longer, however long it was idle before (at least one unit
    always fits, see ``TokenBucket.per_minute``).
    """
    return burst_seconds * (1.0 - target_utilization)


@dataclass
class TokenBucket:
    """A token bucket that refills continuously at ``rate_per_second`` up to ``capacity``.

    An unlimited bucket has ``rate_per_second`` set to ``math.inf`` and never makes anyone wait.
    The level may go below zero (debt) when a request bigger than the capacity is served.
    A paused bucket does not refill before ``paused_until``.
    """

    rate_per_second: float
    capacity: float
    level: float = 0.0
    updated_at: float = 0.0
    paused_until: float = 0.0
    unlimited: bool = field(init=False)  # True when this bucket never limits anything (an infinite rate)

    def __post_init__(self) -> None:
        self.unlimited = math.isinf(self.rate_per_second)

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
        if not burst_seconds >= 0:
            raise ValueError(f"the depth must not be negative, got {burst_seconds!r}")
        rate = limit_per_minute / 60.0
        # At least one whole unit fits, or a 30-per-minute limit could never serve anything.
        capacity = max(rate * burst_seconds, 1.0)
        return cls(rate_per_second=rate, capacity=capacity, level=0.0, updated_at=now)

    def refill(self, now: float) -> None:
        """Add what has flowed in since the last refill (or the end of a pause), up to the capacity."""
        if self.unlimited:
            return
        start = max(self.updated_at, self.paused_until)
        elapsed = now - start
        if elapsed > 0:
            self.level = min(self.capacity, self.level + elapsed * self.rate_per_second)
            self.updated_at = now

    def seconds_until_available(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` can be served (0.0 when it can be served now).

        A request bigger than the capacity is served as soon as the bucket is full.
        """
        if self.unlimited:
            return 0.0
        needed = min(amount, self.capacity) - self.level
        pause = max(0.0, self.paused_until - now)
        if needed <= _EPSILON:
            return pause
        return pause + needed / self.rate_per_second

    def set_rate(self, limit_per_minute: float, burst_seconds: float, now: float) -> None:
        """Change the refill rate (and the depth that follows from it), keeping the level."""
        self.refill(now)
        if math.isinf(limit_per_minute):
            self.rate_per_second = self.capacity = self.level = math.inf
            self.unlimited = True
            self.updated_at = max(self.updated_at, now)
            return
        self.rate_per_second = limit_per_minute / 60.0
        self.unlimited = False
        self.capacity = max(self.rate_per_second * burst_seconds, 1.0)
        self.level = min(self.level, self.capacity)
        self.updated_at = max(self.updated_at, now)

    def cap_level(self, most: float) -> None:
        """Hold no more than ``most`` (it may be below zero: a debt to refill first)."""
        if not self.unlimited:
            self.level = min(self.level, most)

    def pause(self, until: float) -> None:
        """Refill nothing before ``until``."""
        if not self.unlimited:
            self.paused_until = max(self.paused_until, until)

    def take(self, amount: float) -> None:
        """Remove ``amount`` from the bucket; the level may go below zero."""
        if not self.unlimited:
            self.level -= amount

    def empty(self) -> None:
        """Drop whatever the bucket holds, so it serves only at its refill rate from now on."""
        if not self.unlimited:
            self.level = min(self.level, 0.0)
