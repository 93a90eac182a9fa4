"""The typed script call against the real ``.lua`` on a real Redis: each named field does what it says.

A call's fields are packed into positions the script reads (``ARGV[11 + 3 * i]``...). A field put in
the wrong position would make these tests fail: a header's remaining read as a limit, a release read
as a refund.
"""

# Standard library imports
import uuid
from typing import Any, AsyncIterator

# Third-party imports
import pytest

# Local application imports
from tasks.limits.pending_changes import ABSENT, HeaderReport, PendingChanges
from tasks.limits.redis_engine import redis_client
from tasks.limits.redis_script import EngineScript, LaneKeys, ScriptCall, ScriptReply


@pytest.fixture
async def script(redis_url: str) -> AsyncIterator[Any]:
    client = redis_client(redis_url)
    prefix = f"parallel-requests-test:{uuid.uuid4().hex}"
    yield EngineScript(client), LaneKeys.of(lambda suffix: f"{prefix}:{suffix}", f"{prefix}:lane")
    keys = await client.keys(f"{prefix}*")
    if keys:
        await client.delete(*keys)
    await client.aclose()


def _call(**fields: Any) -> ScriptCall:
    defaults = dict(process="test-process", lease_seconds=10.0, max_in_flight=100, requests_rate=ABSENT,
                    tokens_rate=ABSENT, depth_seconds=1.0, horizon_seconds=0.25)
    return ScriptCall(**{**defaults, **fields})


async def test_unlimited_buckets_grant_every_waiting_request_now(script: Any) -> None:
    engine, keys = script
    reply = await engine.run(keys, _call(waiting_tokens=[10.0, 20.0, 30.0]))
    assert isinstance(reply, ScriptReply)
    assert (reply.granted, reply.blocked, reply.delays) == (3, "", [0.0, 0.0, 0.0])
    assert engine.calls == 1


async def test_the_in_flight_cap_blocks_and_a_release_frees_a_slot(script: Any) -> None:
    engine, keys = script
    first = await engine.run(keys, _call(max_in_flight=2, waiting_tokens=[1.0, 1.0, 1.0]))
    assert (first.granted, first.blocked) == (2, "flight")
    refunded = await engine.run(keys, _call(max_in_flight=2, changes=PendingChanges(refunded_tokens=5.0),
                                            waiting_tokens=[1.0]))
    assert (refunded.granted, refunded.blocked) == (0, "flight")  # a refund is not a release
    released = await engine.run(keys, _call(max_in_flight=2, changes=PendingChanges(released_requests=1,
                                                                                    released_tokens=1.0),
                                            waiting_tokens=[1.0, 1.0]))
    assert (released.granted, released.blocked) == (1, "flight")


async def test_a_rate_gives_reservations_spaced_by_the_rate_up_to_the_horizon(script: Any) -> None:
    engine, keys = script
    # 600 a minute: one every 0.1 s; a new bucket starts empty; a 0.25 s horizon holds a share of 2.
    reply = await engine.run(keys, _call(requests_rate=600.0, depth_seconds=1.0, waiting_tokens=[0.0] * 5))
    assert (reply.granted, reply.blocked, reply.share) == (2, "share", 2)
    assert reply.delays[0] == pytest.approx(0.1, abs=0.02) and reply.delays[1] == pytest.approx(0.2, abs=0.02)
    # With those two gone, the next one is 0.3 s away: beyond the horizon, so the line waits for the rate.
    again = await engine.run(keys, _call(requests_rate=600.0, depth_seconds=1.0, waiting_tokens=[0.0] * 5))
    assert (again.granted, again.blocked) == (0, "rate") and 0.25 < again.wait_seconds <= 0.32


async def test_start_full_lets_the_first_learning_request_go_at_once(script: Any) -> None:
    engine, keys = script
    reply = await engine.run(keys, _call(requests_rate=60.0, start_full_requests=True, waiting_tokens=[0.0, 0.0]))
    assert reply.granted == 1 and reply.delays == [0.0]
    again = await engine.run(keys, _call(requests_rate=60.0, start_full_requests=True, waiting_tokens=[0.0]))
    assert (again.granted, again.blocked) == (0, "rate") and 0.9 < again.wait_seconds <= 1.05  # one a second


async def test_the_tokens_bucket_reads_its_own_rate_and_the_request_estimates(script: Any) -> None:
    engine, keys = script
    # Requests unlimited; 6,000 tokens a minute (100 a second), 1 s deep, starting full.
    reply = await engine.run(keys, _call(tokens_rate=6_000.0, start_full_tokens=True, waiting_tokens=[60.0, 60.0]))
    assert reply.granted == 2 and reply.delays[0] == 0.0
    assert reply.delays[1] == pytest.approx(0.2, abs=0.02)  # 20 tokens short at 100 a second


async def test_a_stated_limit_is_learned_and_remaining_with_a_reset_pauses_the_bucket(script: Any) -> None:
    engine, keys = script
    headers = PendingChanges(requests_headers=HeaderReport(limit=1_234.0, remaining=0.0, reset_seconds=2.0),
                             tokens_headers=HeaderReport(limit=56_789.0))
    reply = await engine.run(keys, _call(requests_rate=6_000.0, start_full_requests=True, changes=headers,
                                         waiting_tokens=[0.0]))
    assert (reply.learned_requests, reply.learned_tokens) == (1_234.0, 56_789.0)
    assert reply.granted == 0 and reply.blocked == "rate" and 1.9 < reply.wait_seconds < 2.2


async def test_a_slow_down_empties_only_the_bucket_it_names(script: Any) -> None:
    engine, keys = script
    rates = dict(requests_rate=600.0, tokens_rate=60_000.0, start_full_requests=True, start_full_tokens=True)
    await engine.run(keys, _call(**rates))  # creates both buckets, full
    slowed = await engine.run(keys, _call(**rates, changes=PendingChanges(slow_tokens=True), waiting_tokens=[10.0]))
    assert slowed.granted == 1 and slowed.delays[0] > 0  # tokens refill from empty: 10 tokens at 1,000/s
    fresh = await engine.run(keys, _call(**rates, changes=PendingChanges(slow_requests=True), waiting_tokens=[0.0]))
    assert fresh.granted == 1 and 0.05 < fresh.delays[0] <= 0.25  # the request bucket is empty now


async def test_reservations_ahead_count_against_the_share(script: Any) -> None:
    engine, keys = script
    # 6,000 a minute and a 0.25 s horizon: a share of 25 for the one live process.
    reply = await engine.run(keys, _call(requests_rate=6_000.0, start_full_requests=True, reservations_ahead=24,
                                         waiting_tokens=[0.0] * 5))
    assert reply.share == 25 and (reply.granted, reply.blocked) == (1, "share")
