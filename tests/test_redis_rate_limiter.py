"""The Redis-backed engine against a real Redis: shared buckets, leases that expire, shared learning."""

# Standard library imports
import asyncio
import time
import uuid
from typing import List

# Third-party imports
import pytest

# Local application imports
from tasks.limits.header_dialects import LimitReading, ServerLimits
from tasks.limits.rate_limiter import RequestNeverFits
from tasks.limits.redis_engine import (
    LimiterUnavailable,
    RedisRateLimiterPool,
    describe_redis_url,
    limiter_identity,
    redis_client,
)

# Timing-sensitive (grants counted per real second): run alone, after the parallel part of the suite.
pytestmark = pytest.mark.timing


def _pool(redis_url: str, name: str, rpm=None, tpm=None, **options) -> RedisRateLimiterPool:
    """One 'process' of a shared identity (each pool has its own process name)."""
    return RedisRateLimiterPool(rpm, tpm, url=redis_url, identity=name, **options)


def _max_in_any_window(times: List[float], seconds: float) -> int:
    """The most moments in any window of ``seconds``."""
    times = sorted(times)
    best, start = 0, 0
    for end, moment in enumerate(times):
        while moment - times[start] >= seconds:
            start += 1
        best = max(best, end - start + 1)
    return best


def _max_in_any_second(times: List[float]) -> int:
    return _max_in_any_window(times, 1.0)


def test_identity_is_host_and_key_fingerprint_never_the_key() -> None:
    key = "sk-live-VERYSECRET-0123456789"
    identity = limiter_identity("https://api.openai.com/v1/chat/completions", key)
    assert identity.startswith("api.openai.com/key-") and "VERYSECRET" not in identity
    assert identity == limiter_identity("https://api.openai.com/v1/embeddings", key)  # one key, one account
    assert identity != limiter_identity("https://api.openai.com/v1/embeddings", key + "x")
    assert limiter_identity("http://127.0.0.1:8123/v1/x", key).startswith("127.0.0.1:8123/key-")
    assert limiter_identity("https://api.openai.com/v1/x", key, "team-a") == "team-a"
    assert describe_redis_url("redis://:hunter2@cache.local:6380/2") == "redis://cache.local:6380/2"


async def test_two_processes_share_one_request_limit(redis_url) -> None:
    name = f"test-{uuid.uuid4().hex}"
    pools = [_pool(redis_url, name, rpm=1200), _pool(redis_url, name, rpm=1200)]  # 20 per second together
    started = time.monotonic()
    grants: List[float] = []

    async def send(pool: RedisRateLimiterPool) -> None:
        lane = pool.lane_for("gpt-4o-mini", "chat/completions")
        await lane.acquire(10)
        grants.append(time.monotonic())
        await asyncio.sleep(0.01)
        lane.release(10)

    await asyncio.gather(*(send(pools[i % 2]) for i in range(100)))
    elapsed = time.monotonic() - started
    for pool in pools:
        await pool.aclose()
    # 100 requests at 98% of 20 per second (the buckets start empty): about 5.1 s, never faster.
    assert 4.8 <= elapsed <= 7.0, elapsed
    assert _max_in_any_second(grants) <= 21
    assert all(pool.granted > 30 for pool in pools)  # both processes got their share
    assert sum(pool.calls for pool in pools) <= 100  # at most one round trip per request


async def test_in_flight_slots_of_a_dead_process_expire(redis_url) -> None:
    name = f"test-{uuid.uuid4().hex}"
    dead = _pool(redis_url, name, rpm=float("inf"), tpm=float("inf"), max_in_flight=3, lease_seconds=1.0)
    lane = dead.lane_for("m", "embeddings")
    for _ in range(3):
        await lane.acquire(0)
    # The process "dies": its dispatcher stops and nothing is released or renewed.
    lane._closing = True
    lane._kick()
    await lane._dispatcher

    alive = _pool(redis_url, name, rpm=float("inf"), tpm=float("inf"), max_in_flight=3, lease_seconds=1.0)
    other = alive.lane_for("m", "embeddings")
    started = time.monotonic()
    await asyncio.wait_for(other.acquire(0), 10)
    waited = time.monotonic() - started
    assert 0.5 <= waited <= 3.0, waited  # blocked by the dead slots until their lease ran out
    other.release(0)
    await alive.aclose()


async def test_in_flight_cap_is_shared_and_a_release_frees_it(redis_url) -> None:
    name = f"test-{uuid.uuid4().hex}"
    first, second = (_pool(redis_url, name, rpm=float("inf"), tpm=float("inf"), max_in_flight=2) for _ in range(2))
    lane_a, lane_b = first.lane_for("m", "e"), second.lane_for("m", "e")
    await lane_a.acquire(0)
    await lane_a.acquire(0)
    waiting = asyncio.ensure_future(lane_b.acquire(0))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # the other process holds both slots
    lane_a.release(0)
    await asyncio.wait_for(waiting, 3)
    lane_a.release(0)
    lane_b.release(0)
    await first.aclose()
    await second.aclose()


async def test_a_429_in_one_process_slows_the_other_and_learned_limits_are_shared(redis_url) -> None:
    name = f"test-{uuid.uuid4().hex}"
    first = _pool(redis_url, name, rpm=None, tpm=None, learn_limits=True)
    second = _pool(redis_url, name, rpm=None, tpm=None, learn_limits=True)
    lane_a, lane_b = first.lane_for("m", "chat/completions"), second.lane_for("m", "chat/completions")
    await lane_a.acquire(100)  # a learning bucket lets the first request go at once
    now = asyncio.get_running_loop().time()  # OpenAI's shape: 600 requests and 50,000 tokens per minute
    lane_a.observe(ServerLimits("x-ratelimit", now, requests=LimitReading(600, 599, now + 0.1),
                                tokens=LimitReading(50_000, 49_000, now + 1.2)))
    lane_a.release(100)
    await asyncio.sleep(0.2)  # the headers ride along within 20 ms
    await lane_b.acquire(10)  # the other process's call brings the learned limits back
    lane_b.release(10)
    assert lane_b.learned_limit("requests") == 600 and lane_b.learned_limit("tokens") == 50_000
    with pytest.raises(RequestNeverFits):
        await lane_b.acquire(60_000)  # above the learned token limit: fails at once

    # 600 RPM is 10 per second. Half a second later the bucket holds about 5 requests; a 429 in the
    # first process empties it for both, so the second's 3 requests wait for a refill (about 0.3 s).
    await asyncio.sleep(0.5)
    lane_a.slow_down(requests=True, tokens=False)
    await asyncio.sleep(0.1)
    started = time.monotonic()
    for _ in range(3):
        await lane_b.acquire(10)
    assert time.monotonic() - started >= 0.2
    for _ in range(3):
        lane_b.release(10)
    await first.aclose()
    await second.aclose()


async def test_an_unreachable_limiter_fails_clearly(unused_tcp_port) -> None:
    pool = _pool(f"redis://:secretpw@127.0.0.1:{unused_tcp_port}/0", "x", rpm=60)
    with pytest.raises(LimiterUnavailable) as caught:
        await pool.check()
    assert f"redis://127.0.0.1:{unused_tcp_port}/0" in str(caught.value) and "secretpw" not in str(caught.value)
    with pytest.raises(ValueError, match="redis://"):
        _pool("http://127.0.0.1:6379", "x")
    with pytest.raises(ValueError, match="max_requests_per_minute must be positive"):
        _pool("redis://127.0.0.1:6379/0", "x", rpm=0)


async def test_high_throughput_costs_less_than_one_round_trip_per_request(redis_url) -> None:
    pool = _pool(redis_url, f"test-{uuid.uuid4().hex}", rpm=float("inf"), tpm=float("inf"), max_in_flight=50)
    lane = pool.lane_for("m", "e")

    async def send() -> None:
        await lane.acquire(0)
        await asyncio.sleep(0.005)
        lane.release(0)

    await asyncio.gather(*(send() for _ in range(2000)))
    await pool.aclose()
    assert pool.granted == 2000
    assert pool.round_trips_per_request < 1.0, (pool.calls, pool.granted)


async def test_the_catch_up_after_a_lull_keeps_every_second_within_the_limit(redis_url) -> None:
    # 6,000 RPM is 100 a second; the engine aims at 98. A bucket saves up during a lull, and the
    # catch-up after it adds what it saved to the next second: a quarter second deep, that second
    # would get about 122. The shared buckets hold only the 2% the target leaves spare.
    pool = _pool(redis_url, f"test-{uuid.uuid4().hex}", rpm=6000, tpm=float("inf"))
    lane = pool.lane_for("m", "chat/completions")
    await lane.acquire(1)
    lane.release(1)
    await asyncio.sleep(0.5)  # the lull: nobody asks
    grants: List[float] = []

    async def send() -> None:
        await lane.acquire(1)
        grants.append(time.monotonic())
        lane.release(1)

    await asyncio.gather(*(send() for _ in range(150)))
    await pool.aclose()
    assert _max_in_any_second(grants) <= 100, _max_in_any_second(grants)


async def test_a_stalled_loop_gives_up_its_late_reservations_instead_of_sending_them_together(redis_url) -> None:
    name = f"test-{uuid.uuid4().hex}"
    pool = _pool(redis_url, name, rpm=6000, tpm=float("inf"))
    lane = pool.lane_for("m", "chat/completions")
    grants: List[float] = []

    async def send() -> None:
        await lane.acquire(1)
        grants.append(time.monotonic())
        await asyncio.sleep(0.01)
        lane.release(1)

    async def stall() -> None:
        await asyncio.sleep(0.8)
        time.sleep(0.4)  # the whole loop stops, as on a machine busy starting other processes

    await asyncio.gather(stall(), *(send() for _ in range(250)))
    # Reservations run up to a quarter second ahead, about 25 of them at 98 a second. Sent when the
    # loop came back, the late ones would all go within a millisecond or two; given up and asked
    # for again, they go at the rate: about 10 in any 100 ms, plus the few due in the last 50 ms.
    assert len(grants) == 250
    assert lane.forfeited >= 10, lane.forfeited
    assert _max_in_any_window(grants, 0.1) <= 16, _max_in_any_window(grants, 0.1)
    assert _max_in_any_second(grants) <= 100
    await pool.aclose()
    client = redis_client(redis_url)
    in_flight = await client.hget(pool.key("lane:m:chat/completions:flight"), "n")
    await client.aclose()
    assert int(in_flight) == 0  # every slot given up or released was freed in Redis


async def test_processes_that_all_want_more_than_the_limit_get_fair_shares(redis_url) -> None:
    # Three processes, each with far more to send than 6,000 RPM allows. The first to ask must not
    # take a whole horizon of reservations, again and again, while the others wait.
    name = f"test-{uuid.uuid4().hex}"
    pools = [_pool(redis_url, name, rpm=6000, tpm=float("inf")) for _ in range(3)]
    deadline = time.monotonic() + 3.0
    counts = [0, 0, 0]

    async def send(index: int) -> None:
        lane = pools[index].lane_for("m", "chat/completions")
        while time.monotonic() < deadline:
            await lane.acquire(1)
            if time.monotonic() < deadline:
                counts[index] += 1
            await asyncio.sleep(0.02)
            lane.release(1)

    await asyncio.gather(*(send(index) for index in range(3) for _ in range(40)))
    for pool in pools:
        await pool.aclose()
    assert 250 <= sum(counts) <= 300, counts  # 3 s at 98 a second, the buckets starting empty
    assert min(counts) >= 0.28 * sum(counts), counts  # a fair share is a third
