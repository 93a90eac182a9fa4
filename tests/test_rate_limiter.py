"""The rate-limit engine: pacing, no bursts, in-flight cap, order, event-driven wake-ups, impossible requests."""

# Standard library imports
import asyncio
import time
from typing import List

# Third-party imports
import pytest

# Local application imports
from tasks.rate_limiter import RateLimiter, RequestNeverFits


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


async def _grant_times(limiter: RateLimiter, count: int, tokens: float = 1) -> List[float]:
    start = time.monotonic()
    times = []
    for _ in range(count):
        async with limiter.reserve(tokens):
            times.append(time.monotonic() - start)
    return times


async def test_paces_requests_at_the_limit_without_a_burst() -> None:
    limiter = RateLimiter(max_requests_per_minute=1200, max_tokens_per_minute=None, target_utilization=1.0)
    times = await _grant_times(limiter, 30)  # 20 per second
    assert 1.3 <= times[-1] <= 2.0, times[-1]
    # No sliding one-second window holds more than one second of the limit (plus one for edges).
    assert max(sum(1 for t in times if start <= t < start + 1.0) for start in times) <= 21
    # The bucket starts empty: the first second does not carry a burst on top of the refill.
    assert sum(1 for t in times if t < 0.5) <= 11


async def test_tokens_per_minute_limit_paces_by_tokens() -> None:
    limiter = RateLimiter(max_requests_per_minute=None, max_tokens_per_minute=60_000, target_utilization=1.0)
    times = await _grant_times(limiter, 6, tokens=200)  # 1,000 tokens per second, 1,200 tokens in all
    assert 1.0 <= times[-1] <= 1.6, times


async def test_target_utilization_leaves_headroom() -> None:
    limiter = RateLimiter(max_requests_per_minute=1200, max_tokens_per_minute=None, target_utilization=0.5)
    times = await _grant_times(limiter, 10)  # 10 per second instead of 20
    assert times[-1] >= 0.9, times[-1]


async def test_request_above_the_token_limit_fails_at_once() -> None:
    limiter = RateLimiter(max_requests_per_minute=None, max_tokens_per_minute=1_000)
    start = time.monotonic()
    with pytest.raises(RequestNeverFits, match="can never be sent"):
        await limiter.acquire(1_001)
    assert time.monotonic() - start < 0.1
    assert limiter.in_flight == 0


async def test_request_deeper_than_the_bucket_but_within_the_limit_is_served() -> None:
    limiter = RateLimiter(max_requests_per_minute=None, max_tokens_per_minute=600, target_utilization=1.0)
    start = time.monotonic()
    await asyncio.wait_for(limiter.acquire(300), timeout=3)  # bucket holds 10; served once full
    assert time.monotonic() - start < 1.5
    limiter.release()


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
    limiter = RateLimiter(max_requests_per_minute=6000, max_tokens_per_minute=None, target_utilization=1.0)
    await limiter.acquire(1)
    limiter.release()
    await asyncio.sleep(1.0)  # the bucket refills to its depth: 100 requests
    burst = await _grant_times(limiter, 20)
    assert burst[-1] < 0.05  # served from what the bucket held
    await asyncio.sleep(1.0)
    limiter.slow_down()
    paced = await _grant_times(limiter, 20)
    assert paced[-1] >= 0.15  # after a 429 the engine goes on at its refill rate only


async def test_refund_returns_tokens() -> None:
    limiter = RateLimiter(max_requests_per_minute=None, max_tokens_per_minute=6_000, target_utilization=1.0)
    await asyncio.sleep(1.0)  # full: 100 tokens
    await limiter.acquire(100)
    limiter.release()
    limiter.refund_tokens(80)
    start = time.monotonic()
    await limiter.acquire(80)
    assert time.monotonic() - start < 0.05
    limiter.release()


# Following the server's x-ratelimit-* headers


def _limits(**values):
    from tasks.api_client import ServerLimits

    return ServerLimits(**values)


async def test_a_lower_server_limit_wins_over_the_configured_one() -> None:
    limiter = RateLimiter(max_requests_per_minute=36_000, max_tokens_per_minute=None, target_utilization=1.0)
    await limiter.acquire(1)
    limiter.release()
    limiter.observe(_limits(limit_requests=1200, remaining_requests=1199, reset_requests_seconds=0.05))
    assert limiter.learned_requests_per_minute == 1200
    times = await _grant_times(limiter, 21)  # 20 per second, not 600
    assert times[-1] >= 0.9, times[-1]


async def test_an_exhausted_budget_pauses_until_the_servers_reset() -> None:
    limiter = RateLimiter(max_requests_per_minute=6000, max_tokens_per_minute=None, target_utilization=1.0)
    await limiter.acquire(1)
    limiter.observe(_limits(remaining_requests=0, reset_requests_seconds=0.6))
    limiter.release()
    start = time.monotonic()
    await limiter.acquire(1)
    assert time.monotonic() - start >= 0.55
    limiter.release()


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
    limiter.observe(_limits(limit_requests=6000, remaining_requests=5999, limit_tokens=1_000_000,
                            remaining_tokens=999_000))
    await asyncio.wait_for(second, 0.5)
    limiter.release()
    assert limiter.learned_requests_per_minute == 6000 and limiter.token_limit == 1_000_000


async def test_learning_falls_back_to_the_cookbook_defaults_without_headers() -> None:
    limiter = RateLimiter(max_requests_per_minute=None, max_tokens_per_minute=None, learn_limits=True)
    await limiter.acquire(1)
    limiter.release()
    limiter.observe(None)
    assert limiter.learned_requests_per_minute == 1500 and limiter.token_limit == 125_000
