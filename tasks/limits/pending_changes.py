"""What a Redis lane has gathered to tell the shared engine with its next script call.

Releases (a request answered), refunds (usage below the estimate), 429 slow-downs and the server's
latest headers do not each cost a round trip: they wait here and ride along with the next call.
A call that fails gives them back (``restore``), so nothing is lost to a Redis hiccup.

Usage:
    >>> changes = PendingChanges()
    >>> changes.release(tokens=120.0); changes.slow(requests=True, tokens=False)
    >>> sent, changes = changes, PendingChanges()      # taken by a call
    >>> changes.restore(sent)                          # the call failed: keep them for the next
"""

# Standard library imports
from dataclasses import dataclass, field

# What the script takes as "absent" for a header value or a rate ("unlimited").
ABSENT = -1.0


@dataclass(frozen=True)
class HeaderReport:
    """What one answer's headers said of one limit (requests or tokens); ABSENT where they said nothing.

    Attributes:
        limit: the limit per minute the server states.
        remaining: what the server says remains.
        reset_seconds: how long until the budget is whole again.
    """

    limit: float = ABSENT
    remaining: float = ABSENT
    reset_seconds: float = ABSENT

    @property
    def says_anything(self) -> bool:
        """True when the server stated a limit or what remains."""
        return self.limit > 0 or self.remaining >= 0


@dataclass
class PendingChanges:
    """Changes not yet told to Redis.

    Attributes:
        released_requests, released_tokens: in-flight slots (and their tokens) given back.
        refunded_tokens: tokens reserved but not used.
        slow_requests, slow_tokens: a 429 asks to empty that bucket.
        requests_headers, tokens_headers: the latest answer's headers.
    """

    released_requests: int = 0
    released_tokens: float = 0.0
    refunded_tokens: float = 0.0
    slow_requests: bool = False
    slow_tokens: bool = False
    requests_headers: HeaderReport = field(default_factory=HeaderReport)
    tokens_headers: HeaderReport = field(default_factory=HeaderReport)

    @property
    def empty(self) -> bool:
        """True when there is nothing to tell."""
        return not (self.released_requests or self.refunded_tokens or self.slow_requests or self.slow_tokens
                    or self.requests_headers.says_anything or self.tokens_headers.says_anything)

    def release(self, tokens: float) -> None:
        """A request's slot (and the tokens it reserved) is free again."""
        self.released_requests += 1
        self.released_tokens += tokens

    def refund(self, tokens: float) -> None:
        """Tokens a request reserved but did not use."""
        self.refunded_tokens += tokens

    def slow(self, requests: bool, tokens: bool) -> None:
        """A 429: empty these buckets."""
        self.slow_requests |= requests
        self.slow_tokens |= tokens

    def headers(self, requests: HeaderReport, tokens: HeaderReport) -> None:
        """The latest answer's headers (they replace older ones)."""
        self.requests_headers, self.tokens_headers = requests, tokens

    def restore(self, undelivered: "PendingChanges") -> None:
        """Take back what a failed call could not deliver (newer headers win over the undelivered ones)."""
        self.released_requests += undelivered.released_requests
        self.released_tokens += undelivered.released_tokens
        self.refunded_tokens += undelivered.refunded_tokens
        self.slow_requests |= undelivered.slow_requests
        self.slow_tokens |= undelivered.slow_tokens
        if self.requests_headers.remaining < 0 and self.tokens_headers.remaining < 0:
            self.requests_headers, self.tokens_headers = undelivered.requests_headers, undelivered.tokens_headers
