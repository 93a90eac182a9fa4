"""The rate-limit engine: pacing, no bursts, in-flight cap, order, event-driven wake-ups, impossible requests."""

# Standard library imports
import asyncio
import time
from typing import List

# Third-party imports
import pytest

# Local application imports
from tasks.limits.rate_limiter import RateLimiter, RequestNeverFits

# Timing-sensitive (grants counted per real second): run alone, after the parallel part of the suite.
pytestmark = pytest.mark.timing


@pytest.mark.parametrize(
    "options",
    [
        dict(max_requests_per_minute=0, max_tokens_per_minute=None),
        dict(max_requests_per_minute=-5, max_tokens_per_minute=None),
        dict(max_requests_per_minute=None, max_tokens_per_minute=0),
        dict(max_requests_per_minute=None, max_tokens_per_minute=None, max_in_flight=0),
        dict(max_requests_per_minute=60, max_tokens_per_minute=None, burst_seconds=0),
        dict(max_requests_per_minute=60, max_tokens_per_minute=None, target_utilization=1.5),
    ],
)
def test_rejects_zero_and_negative_settings(options: dict) -> None:
    with pytest.raises(ValueError):
        RateLimiter(**options)


class FakeClock:
    """A clock the test moves by hand: the buckets' arithmetic runs with no sleeping."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _clocked(**options) -> "tuple[RateLimiter, FakeClock]":
    clock = FakeClock()
    return RateLimiter(clock=clock, **options), clock


def _grant_times(limiter: RateLimiter, clock: FakeClock, count: int, tokens: float = 1, step: float = 0.001) -> List[float]:
    """When each of ``count`` requests is granted, moving the clock a millisecond at a time (each released at once)."""
    start = clock.now
    times = []
    while len(times) < count:
        if limiter.try_acquire(tokens):
            times.append(round(clock.now - start, 6))
            limiter.release(tokens)
        else:
            clock.now += step
    return times


async def test_paces_requests_at_the_limit_without_a_burst() -> None:
    limiter, clock = _clocked(max_requests_per_minute=1200, max_tokens_per_minute=None, target_utilization=1.0)
    times = _grant_times(limiter, clock, 30)  # 20 per second
    assert times[-1] == pytest.approx(1.5, abs=0.002)  # the bucket starts empty: 30 at 20 a second
    # No sliding one-second window holds more than one second of the limit (plus one for edges).
    assert max(sum(1 for t in times if start <= t < start + 1.0) for start in times) <= 21
    assert all(later - earlier == pytest.approx(0.05, abs=0.0015) for earlier, later in zip(times, times[1:]))


async def test_tokens_per_minute_limit_paces_by_tokens() -> None:
    limiter, clock = _clocked(max_requests_per_minute=None, max_tokens_per_minute=60_000, target_utilization=1.0)
    times = _grant_times(limiter, clock, 6, tokens=200)  # 1,000 tokens per second
    # The bucket is shallow (one token at a utilization of 1): a request bigger than it goes when it
    # is full and leaves it in debt, so each later one waits for its own 200 tokens.
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert all(gap == pytest.approx(0.2, abs=0.002) for gap in gaps), times


async def test_target_utilization_leaves_headroom() -> None:
    limiter, clock = _clocked(max_requests_per_minute=1200, max_tokens_per_minute=None, target_utilization=0.5)
    times = _grant_times(limiter, clock, 10)  # 10 per second instead of 20
    assert times[-1] == pytest.approx(1.0, abs=0.002), times[-1]


async def test_request_above_the_token_limit_fails_at_once() -> None:
    limiter = RateLimiter(max_requests_per_minute=None, max_tokens_per_minute=1_000)
    start = time.monotonic()
    with pytest.raises(RequestNeverFits, match="can never be sent"):
        await limiter.acquire(1_001)
    assert time.monotonic() - start < 0.1
    assert limiter.in_flight == 0


async def test_request_deeper_than_the_bucket_but_within_the_limit_is_served() -> None:
    limiter, clock = _clocked(max_requests_per_minute=None, max_tokens_per_minute=600, target_utilization=1.0)
    times = _grant_times(limiter, clock, 2, tokens=300)  # 10 a second into a bucket one token deep: served once full
    assert times[0] == pytest.approx(0.1, abs=0.002)
    assert times[1] == pytest.approx(0.1 + 0.1 + 29.9, abs=0.01)  # the debt of 299 is refilled first


async def test_in_flight_cap_holds_across_callers() -> None:
    limiter = RateLimiter(max_requests_per_minute=None, max_tokens_per_minute=None, max_in_flight=3)
    running, peak = 0, 0

    async def call() -> None:
        nonlocal running, peak
        async with limiter.reserve(0):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            running -= 1

    await asyncio.gather(*(call() for _ in range(12)))
    assert peak == 3
    assert limiter.in_flight == 0


async def test_waiters_are_served_first_in_first_out() -> None:
    limiter = RateLimiter(max_requests_per_minute=3000, max_tokens_per_minute=None, target_utilization=1.0)
    order: List[int] = []

    async def call(number: int) -> None:
        async with limiter.reserve(1):
            order.append(number)

    await asyncio.gather(*(call(number) for number in range(15)))
    assert order == list(range(15))


async def test_a_released_slot_wakes_the_waiter_without_a_timer() -> None:
    limiter = RateLimiter(max_requests_per_minute=None, max_tokens_per_minute=None, max_in_flight=1)
    await limiter.acquire(0)
    waiter = asyncio.create_task(limiter.acquire(0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert limiter._timer is None  # nothing polls while the line waits for a slot
    released_at = time.monotonic()
    limiter.release()
    await asyncio.wait_for(waiter, 1)
    assert time.monotonic() - released_at < 0.02
    limiter.release()


async def test_a_cancelled_waiter_leaks_no_capacity() -> None:
    limiter = RateLimiter(max_requests_per_minute=None, max_tokens_per_minute=None, max_in_flight=1)
    await limiter.acquire(0)
    waiter = asyncio.create_task(limiter.acquire(0))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    limiter.release()
    await asyncio.wait_for(limiter.acquire(0), 0.5)
    assert limiter.in_flight == 1
    limiter.release()


async def test_slow_down_empties_the_buckets() -> None:
    # At half the limit, two seconds of burst leave one second of depth: 50 requests.
    limiter, clock = _clocked(max_requests_per_minute=6000, max_tokens_per_minute=None, target_utilization=0.5,
                              burst_seconds=2.0)
    _grant_times(limiter, clock, 1)
    clock.now += 1.0  # the bucket refills to its depth
    burst = _grant_times(limiter, clock, 20)
    assert burst[-1] == 0.0  # served from what the bucket held
    limiter.slow_down()
    paced = _grant_times(limiter, clock, 20)
    assert paced[-1] == pytest.approx(0.4, abs=0.002)  # after a 429 the engine goes on at its refill rate only


# Following the server's x-ratelimit-* headers


def _limits(clock=None, requests=None, tokens=None):
    """An answer's headers read into ``ServerLimits``: each scope as (limit, remaining, reset seconds)."""
    from tasks.limits.header_dialects import LimitReading, ServerLimits

    now = clock.now if clock is not None else asyncio.get_running_loop().time()
    readings = {name: LimitReading(value[0], value[1], None if value[2] is None else now + value[2])
                for name, value in (("requests", requests), ("tokens", tokens)) if value is not None}
    return ServerLimits("x-ratelimit", now, **{name: readings.get(name) for name in ("requests", "tokens")})


async def test_a_lower_server_limit_wins_over_the_configured_one() -> None:
    limiter, clock = _clocked(max_requests_per_minute=36_000, max_tokens_per_minute=None, target_utilization=1.0)
    _grant_times(limiter, clock, 1)
    limiter.observe(_limits(clock, requests=(1200, 1199, 0.05)))  # OpenAI's shape: 1,200 per minute
    assert limiter.learned_limit("requests") == 1200
    times = _grant_times(limiter, clock, 21)  # 20 per second, not 600
    assert times[-1] >= 0.95, times[-1]


async def test_an_exhausted_budget_pauses_until_the_servers_reset() -> None:
    limiter, clock = _clocked(max_requests_per_minute=6000, max_tokens_per_minute=None, target_utilization=1.0)
    _grant_times(limiter, clock, 1)
    clock.now += 1.0
    assert limiter.try_acquire(1)
    limiter.observe(_limits(clock, requests=(None, 0, 0.6)))
    limiter.release()
    times = _grant_times(limiter, clock, 1)
    # The bucket may hold no more than remains less what is in flight (-1), and refills after the reset.
    assert times[0] == pytest.approx(0.62, abs=0.002)


async def test_learning_starts_cautiously_then_adopts_the_servers_limit() -> None:
    limiter = RateLimiter(max_requests_per_minute=None, max_tokens_per_minute=None, learn_limits=True,
                          target_utilization=1.0)
    start = time.monotonic()
    await limiter.acquire(1)  # the first request goes at once
    assert time.monotonic() - start < 0.05
    second = asyncio.create_task(limiter.acquire(1))
    await asyncio.sleep(0.2)
    assert not second.done()  # cautious: about one request a second until the limits are known
    limiter.release()
    limiter.observe(_limits(requests=(6000, 5999, 0.01), tokens=(1_000_000, 999_000, 0.06)))
    await asyncio.wait_for(second, 0.5)
    limiter.release()
    assert limiter.learned_limit("requests") == 6000 and limiter.token_limit == 1_000_000


async def test_a_limit_the_server_leaves_unstated_beside_a_stated_one_is_none_after_the_first_answer() -> None:
    limiter, clock = _clocked(max_requests_per_minute=None, max_tokens_per_minute=None, learn_limits=True)
    _grant_times(limiter, clock, 1)
    limiter.observe(_limits(clock, tokens=(900_000, 899_970, 0.002)))  # tokens stated, requests not
    assert limiter.learned_limit("requests") is None
    times = _grant_times(limiter, clock, 50, tokens=30)
    assert times[-1] < 0.2  # not the cautious learning pace of one a second: no request limit at all


async def test_learning_falls_back_to_the_cookbook_defaults_without_headers() -> None:
    limiter = RateLimiter(max_requests_per_minute=None, max_tokens_per_minute=None, learn_limits=True)
    await limiter.acquire(1)
    limiter.release()
    limiter.observe(None)
    assert limiter.learned_limit("requests") == 1500 and limiter.token_limit == 125_000
