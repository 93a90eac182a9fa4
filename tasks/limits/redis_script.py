"""The Redis engine's one server-side script, called with named fields instead of positions.

``redis_rate_limiter.lua`` does, in one atomic call, everything one process has for one lane
(model and endpoint) of a shared identity: its heartbeat, the releases, refunds, 429 slow-downs and
server headers it has gathered, and the grants for the head of its waiting line. Its arguments are
positional (``ARGV[11 + 3 * i]``); this module is the one place that knows those positions.

Usage:
    >>> script = EngineScript(redis_client)
    >>> reply = await script.run(LaneKeys.of(identity_key, lane_key), ScriptCall(
    ...     process="host:123:ab12cd34", lease_seconds=10, max_in_flight=200, requests_rate=5_880,
    ...     tokens_rate=-1, depth_seconds=0.02, horizon_seconds=0.25, waiting_tokens=[120.0, 80.0]))
    >>> reply.granted, reply.delays          # (2, [0.0, 0.0102])
"""

# Standard library imports
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List

# Local application imports
from tasks.limits.pending_changes import ABSENT, PendingChanges

__all__ = ["ABSENT", "EngineScript", "LaneKeys", "ScriptCall", "ScriptReply"]

SCRIPT_TEXT = Path(__file__).with_name("redis_rate_limiter.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class LaneKeys:
    """The five Redis keys one call touches.

    Attributes:
        buckets: the lane's hash: both buckets and the learned limits.
        lane_flight: the lane's in-flight counts per process.
        identity_flight: the identity's in-flight counts per process, over every lane.
        processes: the identity's live processes and their heartbeat expiry (a sorted set).
        lanes: every lane flight hash of the identity, so a dead process's counts can be freed.
    """

    buckets: str
    lane_flight: str
    identity_flight: str
    processes: str
    lanes: str

    @classmethod
    def of(cls, identity_key: Callable[[str], str], lane_key: str) -> "LaneKeys":
        """The keys of a lane, from the identity's key maker and the lane's key prefix."""
        return cls(f"{lane_key}:buckets", f"{lane_key}:flight", identity_key("flight"), identity_key("processes"),
                   identity_key("lanes"))

    def as_list(self) -> List[str]:
        """The keys in the script's KEYS order."""
        return [self.buckets, self.lane_flight, self.identity_flight, self.processes, self.lanes]


@dataclass
class ScriptCall:
    """One call's arguments.

    Attributes:
        process: this process's name (host, pid and a random part).
        lease_seconds: how long this process's slots stay taken after its last heartbeat.
        max_in_flight: the identity's in-flight cap.
        requests_rate, tokens_rate: the per-minute rates the buckets refill at (ABSENT: unlimited).
        depth_seconds: how many seconds of each rate the buckets hold.
        horizon_seconds: how far ahead a reservation may be.
        start_full_requests, start_full_tokens: a new bucket starts full (a learning one: the first
            answer tells the limits).
        changes: the releases, refunds, 429 slow-downs and headers gathered since the last call.
        reservations_ahead: reservations this process holds whose moment has not come yet.
        waiting_tokens: the token estimates of the requests waiting, head of the line first.
    """

    process: str
    lease_seconds: float
    max_in_flight: int
    requests_rate: float
    tokens_rate: float
    depth_seconds: float
    horizon_seconds: float
    start_full_requests: bool = False
    start_full_tokens: bool = False
    changes: PendingChanges = field(default_factory=PendingChanges)
    reservations_ahead: int = 0
    waiting_tokens: List[float] = field(default_factory=list)

    def arguments(self) -> List[Any]:
        """The script's ARGV, in the order its header comment documents."""
        start_full = ("r" if self.start_full_requests else "") + ("t" if self.start_full_tokens else "")
        changes, requests_headers, tokens_headers = self.changes, self.changes.requests_headers, self.changes.tokens_headers
        return [
            self.process, self.lease_seconds, self.max_in_flight, self.requests_rate, self.tokens_rate,
            self.depth_seconds, self.horizon_seconds, start_full or "-",
            changes.released_requests, changes.released_tokens, changes.refunded_tokens,
            int(changes.slow_requests), int(changes.slow_tokens),
            requests_headers.limit, requests_headers.remaining, requests_headers.reset_seconds,
            tokens_headers.limit, tokens_headers.remaining, tokens_headers.reset_seconds,
            self.reservations_ahead, *self.waiting_tokens,
        ]


@dataclass(frozen=True)
class ScriptReply:
    """What one call answered.

    Attributes:
        granted: how many of the waiting requests got a reservation (the head of the line).
        wait_seconds: when blocked by the rate, how long until the next request could go.
        blocked: "rate", "flight" (the in-flight cap), "share" (this process holds its share of
            reservations ahead) or "" (not blocked).
        learned_requests, learned_tokens: the limits any process learned from headers (ABSENT: none).
        share: how many reservations ahead this process may hold.
        delays: each granted request's delay from now, in seconds.
    """

    granted: int
    wait_seconds: float
    blocked: str
    learned_requests: float
    learned_tokens: float
    share: int
    delays: List[float]

    @classmethod
    def parse(cls, reply: List[str]) -> "ScriptReply":
        """The reply from the script's list of strings."""
        granted = int(reply[0])
        return cls(granted=granted, wait_seconds=float(reply[1]), blocked=reply[2],
                   learned_requests=float(reply[3]), learned_tokens=float(reply[4]), share=int(reply[5]),
                   delays=[float(delay) for delay in reply[6:6 + granted]])


class EngineScript:
    """The script registered on one Redis client; counts its calls."""

    def __init__(self, client: Any) -> None:
        self._script = client.register_script(SCRIPT_TEXT)
        self.calls = 0

    async def run(self, keys: LaneKeys, call: ScriptCall) -> ScriptReply:
        """One call (one round trip)."""
        self.calls += 1
        return ScriptReply.parse(await self._script(keys=keys.as_list(), args=call.arguments()))
