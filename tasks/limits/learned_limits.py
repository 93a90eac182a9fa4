"""What both engines know of limits: the ones a server's headers state, the fallbacks, and the never-fits check.

The in-process engine (``tasks.limits.rate_limiter``) and the Redis engine
(``tasks.limits.redis_engine``) learn limits the same way, from the same rules, here.

Usage:
    >>> learned = LearnedLimits()
    >>> learned.learn_from(server_limits, configured={"requests": None, "tokens": 1e6}, learn=True)
    ['requests']                                  # the scopes whose learned limit changed
    >>> learned.in_force("tokens", 1e6)           # the lower of configured and learned
    >>> check_fits(tokens=9_000, token_limit=8_000)   # raises RequestNeverFits
"""

# Standard library imports
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

# Where a learning bucket starts, before the first answer says the server's limits.
LEARNING_REQUESTS_PER_MINUTE = 60.0
LEARNING_TOKENS_PER_MINUTE = 60_000.0
# The Cookbook script's defaults, used when the server's answers carry no limits.
FALLBACK_REQUESTS_PER_MINUTE = 3_000 * 0.5
FALLBACK_TOKENS_PER_MINUTE = 250_000 * 0.5
SCOPES = ("requests", "tokens")


class RequestNeverFits(ValueError):
    """Raised for a request whose token estimate is above the per-minute token limit."""


def check_fits(tokens: float, token_limit: Optional[float]) -> None:
    """Fail at once for a request that no amount of waiting can serve.

    Raises:
        RequestNeverFits: when ``tokens`` is above ``token_limit`` (None: no limit).
    """
    if token_limit is not None and not math.isinf(token_limit) and tokens > token_limit:
        raise RequestNeverFits(f"the request is estimated at {int(tokens):,} tokens, more than the limit of "
                               f"{int(token_limit):,} tokens per minute: it can never be sent")


def lower_limit(first: Optional[float], second: Optional[float]) -> Optional[float]:
    """The lower of two limits, where None means no limit."""
    known = [value for value in (first, second) if value is not None]
    return min(known) if known else None


def finite_limit(limit: Optional[float]) -> Optional[float]:
    """None for no limit (None or math.inf), else the limit."""
    return None if limit is None or math.isinf(limit) else limit


def limit_when_unsaid(limits: Any, scope: str) -> float:
    """The per-minute limit to assume for ``scope`` ("requests" or "tokens") when an answer states none.

    A server that states its limit of the other kind has no limit of this kind (math.inf). A
    server that states no limit at all (or sends only remaining counts, as Azure does) gets the
    Cookbook's defaults.
    """
    other = "tokens" if scope == "requests" else "requests"
    if getattr(limits, f"limit_{other}", None):
        return math.inf
    return FALLBACK_REQUESTS_PER_MINUTE if scope == "requests" else FALLBACK_TOKENS_PER_MINUTE


def learning_start(scope: str) -> float:
    """The cautious rate a limit still to be learned starts at."""
    return LEARNING_REQUESTS_PER_MINUTE if scope == "requests" else LEARNING_TOKENS_PER_MINUTE


@dataclass
class LearnedLimits:
    """The per-minute limits the server stated for one lane (None: not stated, or not yet heard).

    Attributes:
        requests: the request limit learned.
        tokens: the token limit learned.
    """

    requests: Optional[float] = None
    tokens: Optional[float] = None

    def get(self, scope: str) -> Optional[float]:
        """The learned limit of ``scope``."""
        return getattr(self, scope)

    def set(self, scope: str, value: float) -> bool:
        """Learn ``value`` for ``scope``; True when that changed it."""
        if getattr(self, scope) == value:
            return False
        setattr(self, scope, value)
        return True

    def learn_from(self, limits: Any, configured: Dict[str, Optional[float]], learn: bool) -> List[str]:
        """Follow one answer's ``ServerLimits`` (None: the answer had no such headers).

        A stated limit is learned. A limit the server does not state, with none configured and
        ``learn`` on, becomes ``limit_when_unsaid`` once.

        Returns:
            The scopes whose learned limit changed.
        """
        changed = []
        for scope in SCOPES:
            stated = getattr(limits, f"limit_{scope}", None)
            if stated:
                value: Optional[float] = float(stated)
            elif self.get(scope) is None and learn and configured.get(scope) is None:
                value = limit_when_unsaid(limits, scope)
            else:
                value = None
            if value is not None and self.set(scope, value):
                changed.append(scope)
        return changed

    def in_force(self, scope: str, configured: Optional[float]) -> Optional[float]:
        """The limit in force for ``scope``: the lower of the configured and the learned one."""
        return lower_limit(configured, self.get(scope))
