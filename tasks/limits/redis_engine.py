"""The Redis-backed rate-limit engine: one set of RPM, TPM and in-flight limits shared by many processes.

Without it, each process has its own engine (``tasks.limits.rate_limiter``), and several jobs on one API
key each spend the whole limit. With ``--limiter redis://host:port/db`` (or the flow's ``limiter``
parameter), every process using the same identity and model shares one pair of buckets and one
in-flight cap, kept in Redis and changed atomically by one server-side script
(``redis_rate_limiter.lua``).

Identity: the API host, a fingerprint of the key (a SHA-256 prefix, never the key) and, per lane,
the model and endpoint. ``--limiter-name`` names it explicitly, for example to share one budget
between two hosts that are really one account.

How a request gets its capacity:
    - Each lane (model and endpoint) of each process keeps a local first-in-first-out line and one
      dispatcher task. The dispatcher sends the head of the line (up to 64 requests) in one script
      call. The script grants as many as fit, and gives each a reservation: a delay of at most
      ``horizon_seconds``, after which it goes. A process holds at most a fair share of the
      reservations not yet due (a horizon's worth of requests over the live processes), and asks
      for more when half of its share has gone. Processes never race for each token, the first to
      ask cannot take a whole horizon, and a busy process makes far fewer than one call per request.
    - Releases (a request answered), refunds (usage below the estimate), 429 slow-downs and the
      server's ``x-ratelimit-*`` headers wait locally and ride along with the next call: at most
      20 ms for headers and slow-downs; for releases and refunds, 20 ms once they add up to a tenth
      of the in-flight cap, at most 1 s otherwise. A busy lane calls often enough to carry them.
    - The shared buckets are shallow: ``burst_seconds * (1 - target_utilization)`` deep, 20 ms of
      each limit by default (at least one request). Reservations run ahead of a bucket as debt, so
      its depth only decides how much a lull saves up: when every process falls behind for a moment
      (a loop stalled by a process starting up beside it), the catch-up after it lands in the
      server's next one-second slice. A token bucket's busiest window of ``burst_seconds`` holds its
      depth plus the rate times the window, so this depth keeps every such window within the limit.
    - A reservation is for a moment. When this process's loop stalls (a busy machine) and reaches a
      reservation more than ``late_seconds`` (50 ms) after its moment, the request gives it up once
      and asks again, instead of going together with every other late one on top of what other
      processes send at that moment. The capacity of a moment that passed is lost, not spent twice.
    - When the line is blocked by the buckets, the script says for how long and the dispatcher sleeps
      exactly that long (no polling). When it is blocked by the in-flight cap, a local release wakes
      it, and otherwise it asks again every 20 ms: other processes' releases are not announced.
    - In-flight slots are leases: each process's counts are kept under its own name, with a heartbeat
      (every call, and every ``lease_seconds / 3`` while it holds slots). When a process dies, its
      heartbeat expires after ``lease_seconds`` and the next call of any process frees what it held.
    - Each process learns limits from its own answers (``limit_learning.LaneLimits``: the window
      behind any header dialect, budgets, limits found from 429s), by the rules the in-process
      engine uses. What it learned is stored beside the buckets, so a process that learned nothing
      yet follows it, and a 429 seen by one process empties the buckets for all.

Usage:
    >>> pool = RedisRateLimiterPool(6_000, 1_000_000, url="redis://127.0.0.1:6379/0",
    ...                             identity=limiter_identity(request_url, key))
    >>> lane = pool.lane_for("gpt-4o-mini", "chat/completions")
    >>> await lane.acquire(tokens)          # waits for a shared reservation
    >>> lane.release(tokens)                # when the answer has arrived
    >>> await pool.aclose()

Pitfalls:
    - A lane binds to the event loop it is first used on, like the in-process engine.
    - Every process sharing an identity should give the same limits: the buckets follow the limits
      of the latest call; a process follows what it learned itself first, else what another learned.
    - Redis's clock (``TIME``) is the only clock the buckets use, so machines need not agree on time.
"""

# Standard library imports
import asyncio
import collections
import hashlib
import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

# Third-party imports
import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

# Local application imports
from tasks.limits.learned_limits import SCOPES, check_fits, finite_limit, learning_start
from tasks.limits.limit_learning import LaneLimits
from tasks.limits.pending_changes import ABSENT, HeaderReport, PendingChanges
from tasks.limits.rate_limiter import RateLimiterPool, limit_notes
from tasks.limits.redis_script import EngineScript, LaneKeys, ScriptCall, ScriptReply
from tasks.limits.reservations import ReservationBook, Waiter
from tasks.limits.token_bucket import depth_seconds

LOGGER = logging.getLogger(__name__)
# How many waiting requests one call asks for.
BATCH_SIZE = 64
# How long 429 slow-downs and header updates wait to ride along with another call.
FLUSH_SECONDS = 0.02
# How long releases and refunds wait to ride along with another call, at most. They go within
# FLUSH_SECONDS once they add up to a tenth of the in-flight cap, and at once when a line waits for a slot.
RELEASE_FLUSH_SECONDS = 1.0
# How often a line blocked by the in-flight cap asks again (other processes' releases are silent).
IN_FLIGHT_RETRY_SECONDS = 0.02
# The default of RedisRateLimiterPool.late_seconds.
LATE_SECONDS = 0.05
# How many failed calls in a row make the limiter unavailable (with backoff, about 30 s).
MAX_FAILED_CALLS = 8


class LimiterUnavailable(RuntimeError):
    """Raised to waiting requests when the Redis limiter cannot be reached."""


def limiter_identity(request_url: str, api_key: Optional[str], name: Optional[str] = None) -> str:
    """The name every process sharing a key's limits uses: the API host and a fingerprint of the key.

    Args:
        request_url: the API URL (only its host and port are used).
        api_key: the key (only a SHA-256 prefix of it is used), or None.
        name: an explicit name, which wins.

    Returns:
        For example ``api.openai.com/key-3f2a9c0d1b7e4a56``.
    """
    if name:
        return name
    host = (urlsplit(request_url).hostname or "local").lower()
    port = urlsplit(request_url).port
    fingerprint = hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16] if api_key else "none"
    return f"{host}{f':{port}' if port else ''}/key-{fingerprint}"


def describe_redis_url(url: str) -> str:
    """A Redis URL without its password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisLane:
    """One model's (and endpoint's) shared buckets, seen from this process: its waiting line and dispatcher.

    The line is first in, first out. One dispatcher task per lane sends the head of the line with
    the pending changes in one script call (``tasks.limits.redis_script``), hands the grants to the
    reservation book (``tasks.limits.reservations``), and sleeps until the next thing is due: the
    moment the line can move, a flush of changes, or a heartbeat. It never polls, except every 20 ms
    while the line waits for an in-flight slot another process holds.

    Attributes:
        max_requests_per_minute, max_tokens_per_minute: the configured limits (None: none).
        limits: what this process learned of the server's limits (headers and 429s), by the rules the
            in-process engine uses too; ``shared`` holds what other processes sharing the identity learned.
    """

    def __init__(self, pool: "RedisRateLimiterPool", lane_key: str, max_requests_per_minute: Optional[float],
                 max_tokens_per_minute: Optional[float]) -> None:
        self.pool = pool
        self.keys = LaneKeys.of(pool.key, lane_key)
        self.max_requests_per_minute = max_requests_per_minute
        self.max_tokens_per_minute = max_tokens_per_minute
        self.limits = LaneLimits({"requests": max_requests_per_minute, "tokens": max_tokens_per_minute},
                                 learn=pool.learn_limits)
        self.shared: Dict[str, float] = {}
        self._waiters: Deque[Waiter] = collections.deque()
        # Waiters that gave up a late reservation, back to the head of the line between two calls
        # (during a call, the head of the line is the batch the reply is for).
        self._given_up: List[Waiter] = []
        self._changes = PendingChanges()
        self._flush_at: Optional[float] = None
        self._retry_at = 0.0
        self._blocked_by_flight = False
        self._held = 0
        self._last_call = 0.0
        self._failed_calls = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._book: Optional[ReservationBook] = None
        self._wake: Optional["asyncio.Future[None]"] = None
        self._closing = False
        self._dispatcher: Optional["asyncio.Task[None]"] = None
        self._round_trips: Deque[float] = collections.deque(maxlen=16)

    # The lane interface the shard worker uses (tasks.limits.rate_limiter.Lane).

    def try_take_buckets(self, tokens: float) -> bool:
        """Never serves at once (capacity and the shared in-flight slots live in Redis: ``acquire`` takes both);
        raises RequestNeverFits for a request that can never fit."""
        check_fits(tokens, self.token_limit)
        return False

    async def acquire(self, tokens: float) -> None:
        """Wait, first in first out in this process, for a shared reservation of one request and ``tokens``.

        Raises:
            RequestNeverFits: when ``tokens`` is above the per-minute token limit.
            LimiterUnavailable: when Redis cannot be reached.
        """
        check_fits(tokens, self.token_limit)
        self._start()
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(Waiter(tokens, future))
        self._kick()
        await future

    def release(self, tokens: float = 0.0) -> None:
        """Give back a request's in-flight slot (told to Redis with the next call)."""
        self._held -= 1
        self._changes.release(tokens)
        if self._blocked_by_flight:
            self._retry_at = 0.0
        many = self._changes.released_requests >= max(1, self.pool.max_in_flight // 10)
        self._changed(FLUSH_SECONDS if many else RELEASE_FLUSH_SECONDS)

    def observe(self, limits: Any, rate_limited: bool = False) -> None:
        """Follow an answer's rate-limit headers (a ``ServerLimits``), or their absence (None)."""
        now = self._now()
        if self.limits.observe(limits, now, rate_limited):
            self._ask_again_now()  # a wait reckoned at an older rate is wrong now
        if limits is None:
            return
        reports = []
        for scope in SCOPES:
            learner = self.limits.reading_for(scope)
            latest = learner.latest if learner is not None else None
            learned = self.limits.per_minute(scope)
            if latest is None or latest.at != limits.observed_at:
                reports.append(HeaderReport(limit=_absent_if_none(learned)))
                continue
            wait = learner.wait_for_one(now) if learner is not None else None
            reports.append(HeaderReport(_absent_if_none(learned), latest.remaining, _absent_if_none(wait)))
        if any(report.says_anything for report in reports):
            self._changes.headers(*reports)
            self._changed()

    def slow_down(self, requests: bool = True, tokens: bool = True, wait: Optional[float] = None) -> None:
        """Empty the shared buckets after a 429 (every process slows down); cut a limit found from 429s."""
        scope = None if requests and tokens else "requests" if requests else "tokens"
        self.limits.rate_limited(scope, wait, self._now())
        self._changes.slow(requests, tokens)
        self._changed()

    def learned_limit(self, scope: str) -> Optional[float]:
        """The per-minute limit learned for ``scope`` (here, or by another process sharing the identity), if any."""
        own = self.limits.per_minute(scope)
        return own if own is not None else self.shared.get(scope)

    def budget_exhausted(self) -> Optional[str]:
        """A message when a budget the server states (a daily one) is spent, else None."""
        return self.limits.budget_exhausted(self._now())

    def limits_note(self) -> List[str]:
        """The limits in force and the budgets stated, in words, for the summary."""
        return self.limits.notes()

    @property
    def forfeited(self) -> int:
        """How many reservations this process reached too late and gave up."""
        return self._book.forfeited if self._book else 0

    @property
    def token_limit(self) -> Optional[float]:
        """The token limit per minute in force, or None."""
        return finite_limit(self._limit_in_force("tokens"))

    @property
    def limits_tokens(self) -> bool:
        """True when the shared token bucket limits anything (or will, once its limit is learned)."""
        return self._rate_argument("tokens")[0] != ABSENT

    async def aclose(self) -> None:
        """Tell Redis what is still pending and stop the dispatcher."""
        if self._dispatcher is not None:
            self._closing = True
            self._kick()
            try:
                await self._dispatcher
            except Exception:  # a failed dispatcher has nothing more to tell
                pass
            self._dispatcher = None
        if not self._changes.empty:
            try:
                await self._call([])
            except Exception as error:  # the leases expire on their own
                LOGGER.warning("could not tell the limiter %s about the last releases: %s",
                               describe_redis_url(self.pool.url), error)

    # The dispatcher

    def _start(self) -> None:
        """Bind to the running loop and start the dispatcher on first use."""
        if self._dispatcher is None:
            self._loop = asyncio.get_running_loop()
            self._book = ReservationBook(self._loop, self.pool.late_seconds, self.release, self._given_up.append,
                                         self._ask_again_now)
            self._dispatcher = self._loop.create_task(self._dispatch_forever())
            self._dispatcher.add_done_callback(self._on_dispatcher_done)

    def _on_dispatcher_done(self, dispatcher: "asyncio.Task[None]") -> None:
        """A dispatcher that died of a bug must not leave requests waiting forever."""
        if not dispatcher.cancelled() and dispatcher.exception() is not None:
            self._fail_waiters(dispatcher.exception())  # type: ignore[arg-type]

    def _changed(self, within: float = FLUSH_SECONDS) -> None:
        """Note that something must be told to Redis ``within`` seconds, and wake the dispatcher."""
        if self._loop is not None:
            due = self._loop.time() + within
            if self._flush_at is None or due < self._flush_at:
                self._flush_at = due
        self._kick()

    def _ask_again_now(self) -> None:
        """Ask Redis again with the next turn of the dispatcher, whatever the line waited for."""
        self._retry_at, self._blocked_by_flight = 0.0, False
        if self._book is not None:
            self._book.clear_block()
        self._kick()

    def _kick(self) -> None:
        """Wake the dispatcher if it sleeps."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _sleep(self, timeout: Optional[float]) -> None:
        """Sleep until ``timeout`` seconds pass (None: forever) or ``_kick()`` is called."""
        assert self._loop is not None
        self._wake = wake = self._loop.create_future()
        timer = self._loop.call_later(timeout, self._kick) if timeout is not None else None
        try:
            await wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()

    def _limit_in_force(self, scope: str) -> Optional[float]:
        """The configured limit, lowered by what this process (or, when it learned nothing, another) learned."""
        limit = self.limits.in_force(scope)
        shared = self.shared.get(scope)
        if self.limits.per_minute(scope) is None and shared is not None:
            limit = shared if limit is None else min(limit, shared)
        return limit

    def _rate_argument(self, scope: str) -> Tuple[float, bool]:
        """The per-minute rate the shared bucket refills at (ABSENT: unlimited), and whether it is still learning."""
        limit = self._limit_in_force(scope)
        if limit is None or math.isinf(limit):
            learning = self.pool.learn_limits and not self.limits.heard and self.limits.configured.get(scope) is None
            return (learning_start(scope), True) if learning else (ABSENT, False)
        return limit * self.pool.target_utilization, False

    def _now(self) -> float:
        """The engine's clock (the event loop's)."""
        return self._loop.time() if self._loop is not None else time.monotonic()

    async def _dispatch_forever(self) -> None:
        """Call Redis when the line can move, changes are due, or a heartbeat is; otherwise sleep."""
        assert self._loop is not None
        heartbeat = self.pool.lease_seconds / 3
        while not self._closing:
            while self._given_up:
                self._waiters.appendleft(self._given_up.pop())
            while self._waiters and self._waiters[0].future.done():
                self._waiters.popleft()  # cancelled while waiting
            deadlines = []
            if self._waiters and not math.isinf(self._retry_at):
                deadlines.append(self._retry_at)
            if self._flush_at is not None:
                deadlines.append(self._flush_at)
            if self._held > 0:
                deadlines.append(self._last_call + heartbeat)
            now = self._loop.time()
            if not deadlines or min(deadlines) > now:
                await self._sleep(min(deadlines) - now if deadlines else None)
                continue
            batch = list(self._waiters)[:BATCH_SIZE] if now >= self._retry_at else []
            try:
                reply = await self._call([waiter.tokens for waiter in batch])
            except (RedisError, OSError) as error:
                self._failed_calls += 1
                if self._failed_calls >= MAX_FAILED_CALLS:
                    self._fail_waiters(error)
                    self._failed_calls = 0
                wait = min(8.0, 0.25 * 2 ** self._failed_calls)
                LOGGER.warning("the limiter %s did not answer (%s); trying again in %.1f s",
                               describe_redis_url(self.pool.url), error, wait)
                self._retry_at = self._loop.time() + wait
                self._last_call = self._loop.time()
                await self._sleep(wait)
                continue
            self._failed_calls = 0
            self._apply(reply, batch)

    async def _call(self, tokens: List[float]) -> ScriptReply:
        """One script call: the pending changes, and grants for ``tokens`` (the head of the line)."""
        changes, self._changes, self._flush_at = self._changes, PendingChanges(), None
        requests_rate, requests_learning = self._rate_argument("requests")
        tokens_rate, tokens_learning = self._rate_argument("tokens")
        call = ScriptCall(
            process=self.pool.process_name, lease_seconds=self.pool.lease_seconds,
            max_in_flight=self.pool.max_in_flight, requests_rate=requests_rate, tokens_rate=tokens_rate,
            depth_seconds=self.pool.depth_seconds, horizon_seconds=float(self.pool.horizon_seconds or 0.0),
            start_full_requests=requests_learning, start_full_tokens=tokens_learning, changes=changes,
            reservations_ahead=self._book.ahead if self._book else 0,
            waiting_tokens=tokens,
        )
        if self._loop is not None:
            self._last_call = self._loop.time()
        try:
            reply = await self.pool.run_script(self.keys, call)
        except BaseException:
            self._changes.restore(changes)
            self._changed()
            raise
        if self._loop is not None:
            self._round_trips.append(self._loop.time() - self._last_call)
        return reply

    def _apply(self, reply: ScriptReply, batch: List[Waiter]) -> None:
        """Hand the grants of a reply to the reservation book, and note when to ask again."""
        assert self._loop is not None and self._book is not None
        learned_changed = False
        for scope, value in (("requests", reply.learned_requests), ("tokens", reply.learned_tokens)):
            if value > 0 and self.shared.get(scope) != value:
                self.shared[scope] = value
                learned_changed |= self.limits.per_minute(scope) is None
        now = self._loop.time()
        if not batch:
            # A call that only told Redis what changed: the line's state stays, unless the limits changed.
            if learned_changed:
                self._retry_at, self._blocked_by_flight = now, False
                self._book.clear_block()
            return
        blocked, wait = reply.blocked, reply.wait_seconds
        if learned_changed and blocked == "rate":
            # The wait was reckoned at this process's cautious learning rate; ask again at the real one.
            blocked, wait = "", 0.0
        self.pool.granted += reply.granted
        # Reservations count from the earliest moment this reply could have been read: the call's
        # start plus the quickest recent round trip. A reply read later, after a stalled loop, then
        # shows its reservations as late instead of shifting them all later together.
        base = min(now, self._last_call + min(self._round_trips, default=0.0))
        for waiter, delay in zip(batch[:reply.granted], reply.delays):
            self._waiters.popleft()
            self._held += 1
            self._book.schedule(waiter, base + delay)
        self._blocked_by_flight = blocked == "flight"
        blocked_by_share = self._book.note_share(reply.share, blocked == "share")
        if blocked == "rate":
            self._retry_at = now + wait + 0.001
        elif blocked == "flight":
            self._retry_at = now + IN_FLIGHT_RETRY_SECONDS
        elif blocked_by_share:
            self._retry_at = math.inf  # until half of what it holds has gone (the book asks again)
        else:
            self._retry_at = now

    def _fail_waiters(self, error: BaseException) -> None:
        """Fail every waiting request: the limiter cannot be reached."""
        failure = LimiterUnavailable(f"the rate limiter {describe_redis_url(self.pool.url)} cannot be reached: {error}")
        while self._given_up:
            self._waiters.appendleft(self._given_up.pop())
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(failure)


@dataclass(kw_only=True)
class RedisRateLimiterPool(RateLimiterPool):
    """Shared buckets per (model, endpoint) and one shared in-flight cap, kept in Redis.

    A ``RateLimiterPool`` (same limits, same checks, same ``lane_for(model, endpoint)``) whose lanes
    live in Redis. Its own fields are keyword-only.

    Attributes:
        url: the Redis URL, ``redis://host:port/db`` (``rediss://`` for TLS).
        identity: the shared name (see ``limiter_identity``).
        lease_seconds: how long a dead process's in-flight slots stay taken.
        horizon_seconds: how far ahead a reservation may be (default: a quarter of burst_seconds).
        late_seconds: a reservation reached later than this after its moment is given up once and
            asked for again (math.inf: always sent, however late).
        The limits are RateLimiterPool's; max_in_flight is shared by every process of the identity.
    """

    url: str
    identity: str
    lease_seconds: float = 10.0
    horizon_seconds: Optional[float] = None
    late_seconds: float = LATE_SECONDS
    granted: int = field(default=0, init=False)
    process_name: str = field(default="", init=False)
    _client: Any = field(default=None, init=False, repr=False)
    _script: Optional[EngineScript] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()  # the same checks, and messages, as the in-process engine
        if urlsplit(self.url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"limiter must be a redis:// URL, got {describe_redis_url(self.url)!r}")
        if not self.lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, got {self.lease_seconds!r}")
        if not self.late_seconds > 0:
            raise ValueError(f"late_seconds must be positive, got {self.late_seconds!r}")
        if self.horizon_seconds is None:
            self.horizon_seconds = self.burst_seconds / 4
        self.process_name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def key(self, suffix: str) -> str:
        """A Redis key of this identity (one hash slot, so a cluster keeps them together)."""
        return f"parallel-requests:{{{self.identity}}}:{suffix}"

    def lane_for(self, model: Optional[str], endpoint: Optional[str]) -> RedisLane:
        """The lane of a model and endpoint (made on first use)."""
        lane_key = (model or "", endpoint or "")
        lane = self._lanes.get(lane_key)
        if lane is None:
            own = self.model_limits.get(model or "", {})
            lane = self._lanes[lane_key] = RedisLane(
                self, self.key(f"lane:{model or '-'}:{endpoint or '-'}"),
                own.get("requests_per_minute", self.max_requests_per_minute),
                own.get("tokens_per_minute", self.max_tokens_per_minute),
            )
        return lane

    @property
    def depth_seconds(self) -> float:
        """How many seconds of each limit the shared buckets hold: what the target utilization leaves spare."""
        return min(depth_seconds(self.burst_seconds, self.target_utilization), float(self.horizon_seconds or 0.0))

    @property
    def round_trips_per_request(self) -> float:
        """Script calls per granted request so far."""
        return self.calls / self.granted if self.granted else 0.0

    async def check(self) -> None:
        """Connect and ping, so a wrong URL fails at start with a clear message.

        Raises:
            LimiterUnavailable: when Redis does not answer.
        """
        try:
            await self._connection().ping()
        except (RedisError, OSError) as error:
            raise LimiterUnavailable(f"the rate limiter {describe_redis_url(self.url)} cannot be reached: "
                                     f"{type(error).__name__}: {error}") from None

    async def run_script(self, keys: LaneKeys, call: ScriptCall) -> ScriptReply:
        """Run the engine's script once (one round trip)."""
        self._connection()
        assert self._script is not None
        return await self._script.run(keys, call)

    @property
    def calls(self) -> int:
        """Script calls so far."""
        return self._script.calls if self._script is not None else 0

    def limit_notes(self) -> List[str]:
        """The limits in force and where each came from, per lane, in words (for the summary)."""
        return limit_notes(self._lanes)  # type: ignore[arg-type]

    def usage_note(self) -> Optional[str]:
        """How the shared limiter was used, for the log."""
        if not self.granted:
            return None
        return (f"Shared limiter {describe_redis_url(self.url)} ({self.identity}): {self.calls} script calls for "
                f"{self.granted} grants, {self.round_trips_per_request:.3f} round trips per request")

    async def aclose(self) -> None:
        """Tell Redis the last releases, stop the dispatchers and close the connection."""
        for lane in list(self._lanes.values()):
            await lane.aclose()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _connection(self) -> Any:
        if self._client is None:
            self._client = redis_client(self.url)
            self._script = EngineScript(self._client)
        return self._client


def redis_client(url: str) -> redis_asyncio.Redis:
    """An asyncio Redis client for ``url``; the password, if the URL has none, from the environment."""
    password = os.environ.get("PARALLEL_REQUESTS_REDIS_PASSWORD")
    options = {"password": password} if password and not urlsplit(url).password else {}
    return redis_asyncio.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
                                        **options)


def _absent_if_none(value: Optional[float]) -> float:
    """A header value for the script: ABSENT when the server did not send it (or sent 0 for a reset)."""
    return float(value) if value is not None else ABSENT


async def check_limiter(url: str) -> None:
    """Connect to the shared limiter and ping it, so a wrong URL fails at start with a clear message.

    Raises:
        LimiterUnavailable: when Redis does not answer.
    """
    client = redis_client(url)
    try:
        await client.ping()
    except (RedisError, OSError) as error:
        raise LimiterUnavailable(f"the rate limiter {describe_redis_url(url)} cannot be reached: "
                                 f"{type(error).__name__}: {error}") from None
    finally:
        await client.aclose()
