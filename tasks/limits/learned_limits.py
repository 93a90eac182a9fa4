"""The small rules both engines share: where learning starts, the fallbacks, and the never-fits check.

The in-process engine (``tasks.limits.rate_limiter``) and the Redis engine
(``tasks.limits.redis_engine``) use these, and learn limits through ``tasks.limits.limit_learning``.

Usage:
    >>> check_fits(tokens=9_000, token_limit=8_000)   # raises RequestNeverFits
    >>> lower_limit(6_000, None)                      # 6000: None means no limit
    >>> learning_start("requests")                    # 60.0 per minute until the first answer
"""

# Standard library imports
import math
from typing import Optional

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


def learning_start(scope: str) -> float:
    """The cautious rate a limit still to be learned starts at."""
    return LEARNING_REQUESTS_PER_MINUTE if scope == "requests" else LEARNING_TOKENS_PER_MINUTE
