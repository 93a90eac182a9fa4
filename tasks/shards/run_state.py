"""What every shard of a run shares while it runs: the live objects, the budget, and the stop signal.

Three parts, one job each:
    - ``Budget``: the run's money: what is spent, what running requests may still cost, and whether
      the next request fits.
    - ``RunStop``: why the run stops early, if it does: a stop (nothing more is sent, not even
      requests already waiting) or closed dispatching (no new rows; reserved requests still go).
    - ``RunContext``: the live objects (engine, client, estimator, progress, prices) and the two
      parts above, built once on the flow's event loop and handed to every shard task.

Usage:
    >>> budget = Budget(limit_usd=5.0, prices=PriceTable.load(None))
    >>> reserved = budget.reserve("gpt-4o-mini", prompt_tokens=120, completion_tokens=50)  # None: not covered
    >>> budget.settle(reserved, spent_usd=0.00004)
"""

# Standard library imports
import asyncio
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# Local application imports
from tasks.api.api_client import ApiClient
from tasks.limits.rate_limiter import RateLimiterPool
from tasks.reporting.metrics import RunProgress
from tasks.requests.pricing import PriceTable, format_usd
from tasks.requests.request_formats import RequestShape
from tasks.requests.token_estimation import TokenEstimator
from tasks.storage.results_storage import TurnWrites

# How many error examples a run keeps for its summary.
ERROR_EXAMPLE_LIMIT = 5
# How many requests may be read ahead of their answers, across all shards (bounds memory).
PENDING_REQUESTS = 2000


class Unpriceable(ValueError):
    """Raised when a request cannot be priced under a budget."""


@dataclass
class Budget:
    """The run's spending limit, kept request by request (None: no limit).

    Attributes:
        limit_usd: the most the run may spend, or None.
        prices: the price table requests are priced with.
        spent_usd: what answered requests cost.
        reserved_usd: the most the requests under way may still cost.
    """

    limit_usd: Optional[float] = None
    prices: Optional[PriceTable] = None
    spent_usd: float = 0.0
    reserved_usd: float = 0.0

    def reserve(self, model: Optional[str], prompt_tokens: int, completion_tokens: int) -> Optional[float]:
        """Reserve the most a request may cost: 0 with no limit; None when the limit cannot cover it.

        Raises:
            Unpriceable: when there is a limit and the model has no price (that row's error).
        """
        if self.limit_usd is None:
            return 0.0
        worst = self.prices.cost(model, prompt_tokens, completion_tokens) if self.prices else None
        if worst is None:
            raise Unpriceable(f"no price for model {model!r}, so it cannot be kept within the budget of "
                              f"{format_usd(self.limit_usd)}; add its price with --price-table")
        if self.spent_usd + self.reserved_usd + worst > self.limit_usd:
            return None
        self.reserved_usd += worst
        return worst

    def settle(self, reserved_usd: float, spent_usd: float) -> None:
        """Replace a request's reservation by what it really cost."""
        self.reserved_usd -= reserved_usd
        self.spent_usd += spent_usd

    @property
    def reached(self) -> str:
        """The reason given when the budget closes dispatching."""
        return f"budget of {format_usd(self.limit_usd or 0.0)} reached"


@dataclass
class RunStop:
    """Why the run ends before every row has its result (both None while it goes on).

    Attributes:
        stop_reason: nothing more is sent, requests already waiting included (a bad key, no quota).
        dispatch_closed: no new rows are read; requests already reserved still go (the budget).
    """

    stop_reason: Optional[str] = None
    dispatch_closed: Optional[str] = None

    def stop(self, reason: str) -> None:
        """Stop sending for the whole run (the first reason is kept)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def close_dispatch(self, reason: str) -> None:
        """Read no new rows (the first reason is kept)."""
        if self.dispatch_closed is None:
            self.dispatch_closed = reason

    @property
    def stopped(self) -> bool:
        """True once nothing more may be sent."""
        return self.stop_reason is not None

    @property
    def end_reason(self) -> Optional[str]:
        """Why the run ended before every row had its result, if it did."""
        return self.stop_reason or self.dispatch_closed


@dataclass
class ErrorExamples:
    """A few distinct error texts for the summary (secrets already removed)."""

    texts: List[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        """Keep ``text`` if there is room and it is new."""
        if len(self.texts) < ERROR_EXAMPLE_LIMIT and text not in self.texts:
            self.texts.append(text)


@dataclass(frozen=True)
class RunSettings:
    """Settings every shard of a run follows.

    Attributes:
        request_url: the target URL (cookbook lines) or the base URL (batch lines).
        shape: the input's shape.
        max_attempts: how many times a request is tried, at most, on retryable failures.
        retry_base_seconds: the first retry's backoff (doubled for each later one).
    """

    request_url: str
    shape: RequestShape
    max_attempts: int = 5
    retry_base_seconds: float = 0.25


@dataclass
class RunContext:
    """The live objects every shard of a run shares; they all belong to the flow's event loop.

    Attributes:
        settings: what every shard follows.
        limiter: the rate-limit engine.
        client: the API client (one aiohttp session).
        estimator: the token estimator, or None while no token limit or budget needs estimates.
        progress: the progress counter the shards advance.
        budget: the run's money.
        stop: the run's stop signal.
        errors: error examples for the summary.
        transport_params: smart-open's transport parameters for the input.
        token_encoding_name: the encoding an estimator made later uses (None: each model's own).
        pending_window: requests read but not yet settled, across every shard.
        turn_writes: the shards' part records waiting for the end of the loop's turn (written before each send).
    """

    settings: RunSettings
    limiter: RateLimiterPool
    client: ApiClient
    estimator: Optional[TokenEstimator]
    progress: RunProgress
    budget: Budget = field(default_factory=Budget)
    stop: RunStop = field(default_factory=RunStop)
    errors: ErrorExamples = field(default_factory=ErrorExamples)
    transport_params: Optional[Dict[str, Any]] = None
    token_encoding_name: Optional[str] = None
    pending_window: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(PENDING_REQUESTS))
    turn_writes: TurnWrites = field(default_factory=TurnWrites)

    def estimator_for(self, limits_tokens: bool) -> Optional[TokenEstimator]:
        """The estimator while a token limit or the budget needs estimates, else None.

        It is made the first time a token limit applies (a server may state one mid-run). A lane
        whose token limit turned out to be none (the first answers stated none) estimates nothing more.
        """
        if not limits_tokens and self.budget.limit_usd is None:
            return None
        if self.estimator is None:
            self.estimator = TokenEstimator.for_name(self.token_encoding_name)
        return self.estimator
