"""The shared rate-limit engine: RPM and TPM token buckets plus a cap on requests in flight.

One ``RateLimiter`` is built per run, on the flow's event loop, and every shard task shares it.
Before a request is sent it reserves one request, its estimated tokens and one in-flight
slot. It gives the slot back when the answer has arrived.

Features:
    - Two token buckets (requests per minute, tokens per minute). They refill at
      ``target_utilization`` of each limit (98% by default): at exactly 100%, network jitter
      at the edges of the server's one-second slices earns about 1% of 429s. They are shallow
      (``token_bucket.depth_seconds``: ``burst_seconds`` times the headroom, 20 ms by default, at
      least one unit), so the catch-up after a lull never pushes a window of ``burst_seconds`` or
      more over the limit. The buckets start empty, so a run does not open with a burst either.
    - A cap on requests in flight.
    - Waiting is event-driven, with no polling loop. Waiters queue first in, first out. The
      head of the queue is granted as soon as the buckets can serve it: either one timer is
      set for the exact moment they will, or a released slot wakes the queue.
    - A request bigger than a bucket's depth, but within the per-minute limit, is served
      from a full bucket and leaves it in debt. A request whose estimate is above the
      per-minute token limit can never be served, so it fails at once with
      ``RequestNeverFits`` instead of waiting forever.
    - ``observe()`` follows the server's rate-limit headers (any dialect, read by
      ``header_dialects``) on every answer; ``limit_learning.LaneLimits`` turns them into a rate
      (the window derived, never assumed), or finds a limit no header states from the 429s. The
      rate becomes the lower of the configured limit and the server's. A bucket never holds more
      than the server says remains, less what is in flight; a spent budget pauses its bucket until
      one more unit is free (a continuous bucket) or the window's reset. With ``learn_limits`` and
      no configured limit, a bucket starts cautiously (one request, then one a second) until the
      first answer tells the limits.
    - ``slow_down()`` after a 429 empties the buckets, pauses them for the wait the server asked
      for, and cuts a limit found from 429s.

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
import logging
import math
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Deque, Dict, List, Optional, Protocol, Tuple

# Local application imports
from tasks.job.settings import check_engine_settings
from tasks.limits.learned_limits import (
    LEARNING_REQUESTS_PER_MINUTE,
    LEARNING_TOKENS_PER_MINUTE,
    RequestNeverFits,
    check_fits,
)
from tasks.limits.limit_learning import LaneLimits
from tasks.limits.token_bucket import TokenBucket, depth_seconds

LOGGER = logging.getLogger(__name__)

# The longest a bucket is paused for what the server says (a reset or a Retry-After).
MAX_PAUSE_SECONDS = 120.0

__all__ = ["InFlightSlots", "Lane", "RateLimiter", "RateLimiterPool", "RequestLane", "RequestNeverFits", "TokenBucket"]


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
        learn_limits: for a limit that is None, start cautiously and learn it from the server's
            headers (falling back to the Cookbook's defaults), instead of having no limit.
    """

    max_requests_per_minute: Optional[float]
    max_tokens_per_minute: Optional[float]
    max_in_flight: int = 200
    burst_seconds: float = 1.0
    target_utilization: float = 0.98
    learn_limits: bool = False
    in_flight: int = field(default=0, init=False)
    tokens_in_flight: float = field(default=0.0, init=False)
    limits: LaneLimits = field(init=False, repr=False)
    answered: bool = field(default=False, init=False)
    clock: Optional[Callable[[], float]] = field(default=None, repr=False)
    _requests: Optional[TokenBucket] = field(default=None, init=False, repr=False)
    _tokens: Optional[TokenBucket] = field(default=None, init=False, repr=False)
    _waiters: Deque[_Waiter] = field(default_factory=collections.deque, init=False, repr=False)
    _timer: Optional[asyncio.TimerHandle] = field(default=None, init=False, repr=False)
    _loop: Optional[asyncio.AbstractEventLoop] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_engine_settings(self.max_requests_per_minute, self.max_tokens_per_minute, self.max_in_flight,
                              self.burst_seconds, self.target_utilization)
        self.limits = LaneLimits({"requests": self.max_requests_per_minute, "tokens": self.max_tokens_per_minute},
                                 learn=self.learn_limits)
        self._depth = depth_seconds(self.burst_seconds, self.target_utilization)

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
            self.release(tokens)

    async def acquire(self, tokens: float) -> None:
        """Wait, first in first out, until one request and ``tokens`` tokens can be sent.

        The caller must call ``release()`` once its request has been answered.

        Raises:
            RequestNeverFits: when ``tokens`` is above the per-minute token limit.
        """
        if self.try_acquire(tokens):
            return
        future: asyncio.Future[None] = self._loop.create_future()  # type: ignore[union-attr]
        self._waiters.append(_Waiter(tokens=tokens, future=future))
        self._dispatch()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted in the same instant as cancelled: give the capacity back.
                self.release(tokens)
            self._dispatch()
            raise

    def try_acquire(self, tokens: float) -> bool:
        """Take capacity for one request now if nobody waits and the buckets allow it; never waits.

        Raises:
            RequestNeverFits: when ``tokens`` is above the token limit in force.
        """
        self._bind_loop()
        assert self._requests is not None and self._tokens is not None
        if self._requests.unlimited and self._tokens.unlimited:  # only the in-flight cap counts (no limits)
            if self._waiters or self.in_flight >= self.max_in_flight:
                return False
            self.in_flight += 1
            self.tokens_in_flight += tokens
            return True
        check_fits(tokens, self.token_limit)
        return not self._waiters and self._try_grant(tokens)

    def release(self, tokens: float = 0.0) -> None:
        """Free one in-flight slot (that reserved ``tokens``) and wake whoever waits for it."""
        self.in_flight -= 1
        self.tokens_in_flight -= tokens
        if self._waiters:
            self._dispatch()

    @property
    def token_limit(self) -> Optional[float]:
        """The token limit per minute in force: configured, learned from the server, or None."""
        return self.limits.in_force("tokens")

    @property
    def limits_tokens(self) -> bool:
        """True when a token limit applies or is still to be learned, so requests need token estimates.

        While learning, that is until the first answer: it may state a token limit, which then binds the
        requests read meanwhile too (even with ``inf`` given, a limit the server states is followed).
        """
        if self.learn_limits and not self.answered:
            return True
        if self._tokens is not None:
            return not self._tokens.unlimited
        limit = self.max_tokens_per_minute
        return (limit is None and self.learn_limits) or (limit is not None and not math.isinf(limit))

    def observe(self, limits: Any, rate_limited: bool = False) -> None:
        """Follow an answer's rate-limit headers (a ``ServerLimits``, or None without any).

        ``rate_limited`` says the answer was a 429 (``slow_down`` follows); any other answer lets a
        limit found from 429s grow.
        """
        self._bind_loop()
        self.answered = True
        if limits is None and not self.limits.adaptive and not self._still_learning:
            return  # no headers, and nothing to learn from their absence
        now = self._now()
        self._follow(self.limits.observe(limits, now, rate_limited), now)
        if limits is not None:
            for scope, bucket in (("requests", self._requests), ("tokens", self._tokens)):
                learner = self.limits.reading_for(scope)
                latest = learner.latest if learner is not None else None
                if latest is None or latest.at != limits.observed_at or bucket is None or bucket.unlimited:
                    continue
                reserved = self.in_flight if scope == "requests" else self.tokens_in_flight
                bucket.refill(now)
                bucket.cap_level(latest.remaining - reserved)  # never more than the server says remains
                if latest.remaining <= reserved:
                    wait = learner.wait_for_one(now)  # type: ignore[union-attr]
                    if wait:
                        bucket.pause(now + min(wait, MAX_PAUSE_SECONDS))
        if self._waiters:
            self._dispatch()

    def slow_down(self, requests: bool = True, tokens: bool = True, wait: Optional[float] = None) -> None:
        """After a 429: empty the buckets it names, pause them for the wait the server asked for, cut a limit found from 429s."""
        self._bind_loop()
        now = self._now()
        scope = None if requests and tokens else "requests" if requests else "tokens"
        self._follow(self.limits.rate_limited(scope, wait, now), now)
        if wait is None:
            wait = self.limits.backoff_seconds(scope)  # 429s in a row that name no wait: hold back more
        for wanted, bucket in ((requests, self._requests), (tokens, self._tokens)):
            if wanted and bucket is not None:
                bucket.refill(now)
                bucket.empty()
                if wait:
                    bucket.pause(now + min(wait, MAX_PAUSE_SECONDS))

    def learned_limit(self, scope: str) -> Optional[float]:
        """The per-minute limit learned for ``scope`` from the server (headers or 429s), if any."""
        return self.limits.per_minute(scope)

    # Helpers

    def _bind_loop(self) -> None:
        """Bind to the running loop and create the buckets on first use."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            now = self._now()
            self._requests = self._new_bucket(self.max_requests_per_minute, LEARNING_REQUESTS_PER_MINUTE, now)
            self._tokens = self._new_bucket(self.max_tokens_per_minute, LEARNING_TOKENS_PER_MINUTE, now)

    def _new_bucket(self, configured: Optional[float], learning_start: float, now: float) -> TokenBucket:
        """A bucket for a configured limit; with none, a cautious learning one or an unlimited one."""
        if configured is None and self.learn_limits:
            bucket = TokenBucket.per_minute(learning_start, self._depth, now)
            bucket.level = bucket.capacity  # the first request goes at once: its answer tells the limits
            return bucket
        return TokenBucket.per_minute(self._target(configured), self._depth, now)

    @property
    def _still_learning(self) -> bool:
        """True while no answer has told what the limits not given are."""
        return self.learn_limits and not self.limits.heard

    def _follow(self, changed: List[str], now: float) -> None:
        """Make the buckets of the scopes whose learned limit changed follow the limit now in force."""
        buckets = {"requests": self._requests, "tokens": self._tokens}
        for scope in changed:
            limit = self.limits.in_force(scope)
            bucket = buckets[scope]
            if bucket is None:
                continue
            if limit is None or math.isinf(limit):
                if self.limits.configured.get(scope) is None:  # the server states no such limit: none
                    bucket.set_rate(math.inf, self._depth, now)
                continue
            bucket.set_rate(limit * self.target_utilization, self._depth, now)
            LOGGER.debug("%s limit in force: %s", scope, self.limits.describe(scope))

    def _now(self) -> float:
        """The engine's time: the injected clock, else the event loop's."""
        return self.clock() if self.clock is not None else self._loop.time()  # type: ignore[union-attr]

    def _target(self, limit: Optional[float]) -> Optional[float]:
        """The rate the buckets aim for: the limit times the target utilization."""
        return None if limit is None else limit * self.target_utilization

    def _try_grant(self, tokens: float) -> bool:
        """Grant one request now if a slot and both buckets allow it."""
        if self.in_flight >= self.max_in_flight:
            return False
        assert self._requests is not None and self._tokens is not None and self._loop is not None
        now = self._now()
        self._requests.refill(now)
        self._tokens.refill(now)
        if self._requests.seconds_until_available(1, now) > 0 or self._tokens.seconds_until_available(tokens, now) > 0:
            self._held_back(tokens, now)
            return False
        self._requests.take(1)
        self._tokens.take(tokens)
        self.in_flight += 1
        self.tokens_in_flight += tokens
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
            now = self._now()
            self._requests.refill(now)
            self._tokens.refill(now)
            delay = max(
                self._requests.seconds_until_available(1, now),
                self._tokens.seconds_until_available(waiter.tokens, now),
            )
            if delay > 0:
                self._held_back(waiter.tokens, now)
                self._set_timer(delay)
                return
            self._waiters.popleft()
            self._requests.take(1)
            self._tokens.take(waiter.tokens)
            self.in_flight += 1
            self.tokens_in_flight += waiter.tokens
            waiter.future.set_result(None)

    def _held_back(self, tokens: float, now: float) -> None:
        """Note which bucket held a request back: a limit found from 429s grows only while it is the bottleneck."""
        assert self._requests is not None and self._tokens is not None
        if self._requests.seconds_until_available(1, now) > 0:
            self.limits.held_back("requests", now)
        if self._tokens.seconds_until_available(tokens, now) > 0:
            self.limits.held_back("tokens", now)

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


class InFlightSlots:
    """The run's cap on requests awaiting an answer, shared by every lane: slots handed out first in, first out.

    Usage:
        >>> slots = InFlightSlots(200)
        >>> if not slots.try_take():
        ...     await slots.take()
        >>> slots.release()
    """

    def __init__(self, limit: int) -> None:
        """
        Args:
            limit: how many slots there are.
        """
        self.limit = limit
        self.held = 0
        self._waiters: Deque["asyncio.Future[None]"] = collections.deque()

    def try_take(self) -> bool:
        """Take a slot now if one is free and nobody waits for one; never waits."""
        if self._waiters or self.held >= self.limit:
            return False
        self.held += 1
        return True

    async def take(self) -> None:
        """Wait, first in first out, for a slot."""
        if self.try_take():
            return
        future: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted in the same instant as cancelled: give it back
                self.release()
            raise

    def release(self) -> None:
        """Give a slot back; the longest waiter gets it."""
        self.held -= 1
        while self._waiters and self.held < self.limit:
            future = self._waiters.popleft()
            if not future.done():  # (a cancelled waiter is passed over)
                self.held += 1
                future.set_result(None)


@dataclass
class RequestLane:
    """One request's way through the engine: its model's buckets, then a shared in-flight slot."""

    buckets: RateLimiter
    in_flight: InFlightSlots

    async def acquire(self, tokens: float) -> None:
        """Wait for the model's buckets, then for a shared in-flight slot (raises RequestNeverFits at once).

        The model's limiter keeps counting the request as in flight too: what its server headers say
        remains is measured against that.
        """
        await self.buckets.acquire(tokens)
        try:
            await self.in_flight.take()
        except BaseException:
            self.buckets.release(tokens)
            raise

    def try_take_buckets(self, tokens: float) -> bool:
        """Take the model's bucket capacity now if it is there; never waits (raises RequestNeverFits at once).

        True means the request goes on the in-flight slot its caller already holds (``RateLimiterPool.take_slot``).
        """
        return self.buckets.try_acquire(tokens)

    def learned_limit(self, scope: str) -> Optional[float]:
        """The limit the server said for ``scope`` ("requests" or "tokens"), if any."""
        return self.buckets.learned_limit(scope)

    @property
    def limits_tokens(self) -> bool:
        """True when this model's token bucket limits anything (or will, once its limit is learned)."""
        return self.buckets.limits_tokens

    def release(self, tokens: float = 0.0) -> None:
        """Free the shared slot and the model's in-flight count."""
        self.in_flight.release()
        self.buckets.release(tokens)

    def observe(self, limits: Any, rate_limited: bool = False) -> None:
        """Follow an answer's headers for this model."""
        self.buckets.observe(limits, rate_limited)

    def slow_down(self, requests: bool = True, tokens: bool = True, wait: Optional[float] = None) -> None:
        """Empty (and pause for ``wait``) this model's buckets after a 429."""
        self.buckets.slow_down(requests, tokens, wait)

    def budget_exhausted(self) -> Optional[str]:
        """A message when a budget the server states (a daily one) is spent, else None."""
        return self.buckets.limits.budget_exhausted(self.buckets._now())

    def limits_note(self) -> List[str]:
        """The limits in force and the budgets stated, in words, for the summary."""
        return self.buckets.limits.notes()


class Lane(Protocol):
    """What the shard worker needs of one model's (and endpoint's) way through an engine.

    ``RequestLane`` (this module, in-process) and ``tasks.limits.redis_engine.RedisLane`` (shared
    through Redis) both have it.
    """

    async def acquire(self, tokens: float) -> None:
        """Wait for the request's capacity and in-flight slot (raises RequestNeverFits at once)."""

    def try_take_buckets(self, tokens: float) -> bool:
        """Take the capacity now if it is there; never waits. True: the request goes on the caller's pool slot."""

    def release(self, tokens: float = 0.0) -> None:
        """Give back the request's in-flight slot once its answer has arrived."""

    def observe(self, limits: Any, rate_limited: bool = False) -> None:
        """Follow an answer's rate-limit headers (or their absence: None); ``rate_limited`` for a 429."""

    def slow_down(self, requests: bool = True, tokens: bool = True, wait: Optional[float] = None) -> None:
        """Empty the buckets after a 429 (and pause them for the ``wait`` the server asked for)."""

    def budget_exhausted(self) -> Optional[str]:
        """A message when a budget the server states (a daily one) is spent, else None."""

    def limits_note(self) -> List[str]:
        """The limits in force and the budgets stated, in words, for the summary."""


    def learned_limit(self, scope: str) -> Optional[float]:
        """The limit the server said for ``scope`` ("requests" or "tokens"), if any."""

    @property
    def limits_tokens(self) -> bool:
        """True when a token limit applies or is still to be learned, so requests need token estimates."""


def limit_notes(lanes: Dict[Tuple[str, str], Lane]) -> List[str]:
    """What each lane says of its limits; prefixed by model and endpoint when there are several lanes."""
    notes = []
    for (model, endpoint), lane in lanes.items():
        for text in lane.limits_note():
            notes.append(f"{model} {endpoint}: {text}" if len(lanes) > 1 else text)
    return notes


def limits_in_force(lanes: Dict[Tuple[str, str], Any]) -> Tuple[Optional[float], Optional[float]]:
    """The requests-per-minute and tokens-per-minute limits in force, added over the lanes (None: no limit).

    Lanes whose limit is only the starting guess (stated nowhere, no 429 yet) count only when no lane
    knows better: a model met four times must not add the Cookbook's 1,500 to a learned 600.
    """
    found: List[Optional[float]] = []
    for scope in ("requests", "tokens"):
        known, guessed = [], []
        for lane in list(lanes.values()):
            limits = getattr(lane, "limits", None) or getattr(getattr(lane, "buckets", None), "limits", None)
            value = limits.in_force(scope) if limits is not None else None
            value = value if value is not None and math.isfinite(value) else None
            (guessed if limits is not None and limits.source(scope).startswith("stated nowhere") else known).append(value)
        values = known or guessed
        found.append(None if not values or any(value is None for value in values) else sum(values))
    return found[0], found[1]


@dataclass
class RateLimiterPool:
    """One bucket pair per (model, endpoint), as OpenAI limits each model, and one in-flight cap for all.

    Attributes:
        max_requests_per_minute: the request limit of models with no limits of their own.
        max_tokens_per_minute: the token limit of models with no limits of their own.
        max_in_flight: the in-flight cap shared by every model.
        model_limits: per model: {"requests_per_minute": ..., "tokens_per_minute": ...}.
        burst_seconds, target_utilization, learn_limits: as for RateLimiter.
    """

    max_requests_per_minute: Optional[float]
    max_tokens_per_minute: Optional[float]
    max_in_flight: int = 200
    model_limits: Dict[str, Dict[str, float]] = field(default_factory=dict)
    burst_seconds: float = 1.0
    target_utilization: float = 0.98
    learn_limits: bool = False
    _lanes: Dict[Tuple[str, str], Lane] = field(default_factory=dict, init=False, repr=False)
    _in_flight: InFlightSlots = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._in_flight = InFlightSlots(self.max_in_flight)
        for model, limits in self.model_limits.items():  # reject bad limits at once, naming the model
            try:
                RateLimiter(limits.get("requests_per_minute"), limits.get("tokens_per_minute"), self.max_in_flight)
            except ValueError as error:
                raise ValueError(f"limits of model {model!r}: {error}") from None
        RateLimiter(self.max_requests_per_minute, self.max_tokens_per_minute, self.max_in_flight,
                    self.burst_seconds, self.target_utilization)

    def lane_for(self, model: Optional[str], endpoint: Optional[str]) -> Lane:
        """The lane of a model and endpoint (made on first use)."""
        key = (model or "", endpoint or "")
        lane = self._lanes.get(key)
        if lane is None:
            own = self.model_limits.get(model or "", {})
            buckets = RateLimiter(
                own.get("requests_per_minute", self.max_requests_per_minute),
                own.get("tokens_per_minute", self.max_tokens_per_minute),
                max_in_flight=10**9, burst_seconds=self.burst_seconds,
                target_utilization=self.target_utilization, learn_limits=self.learn_limits,
            )
            lane = self._lanes[key] = RequestLane(buckets, self._in_flight)
        return lane

    def try_take_slot(self) -> bool:
        """Take a shared in-flight slot now if one is free and nobody waits for one; never waits."""
        return self._in_flight.try_take()

    async def take_slot(self) -> None:
        """Wait, first in first out with every lane's requests, for a shared in-flight slot."""
        await self._in_flight.take()

    def release_slot(self) -> None:
        """Give back a slot taken with ``take_slot`` or ``try_take_slot`` (a request sent on it gives it back
        with its lane's ``release``)."""
        self._in_flight.release()

    @property
    def free_slots(self) -> int:
        """How many shared in-flight slots nobody holds."""
        return self._in_flight.limit - self._in_flight.held

    @property
    def lanes(self) -> Dict[Tuple[str, str], Lane]:
        """The lanes made so far."""
        return dict(self._lanes)

    def learned_limit(self, scope: str) -> Optional[float]:
        """The limit the server said for ``scope``, when every lane heard the same one (the usual single-model run)."""
        values = {lane.learned_limit(scope) for lane in self._lanes.values()}
        return values.pop() if len(values) == 1 else None

    def usage_note(self) -> Optional[str]:
        """A line on how the engine was used, for the log (None: nothing to say)."""
        return None

    def limit_notes(self) -> List[str]:
        """The limits in force and where each came from, per lane, in words (for the summary)."""
        return limit_notes(self._lanes)

    async def check(self) -> None:
        """Nothing to check: the engine lives in this process (the Redis engine pings its server here)."""

    async def aclose(self) -> None:
        """Nothing to close (the Redis engine tells its server the last releases here)."""
