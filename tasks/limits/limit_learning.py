"""Limits learned from a server's answers: the window behind its headers, or the rate its 429s allow.

Both engines (``rate_limiter`` in-process, ``redis_engine`` shared) learn through one ``LaneLimits``
per lane, so the rules exist once:

    - **No window is assumed.** A ``WindowLearner`` per dimension watches limit, remaining and
      reset over time and tells a continuous bucket from a fixed or sliding window:
        * continuous (OpenAI): the reset is the time until the bucket is full again, so
          ``reset * limit / (limit - remaining)`` is the window (60 s for OpenAI), and the
          moment of the reset moves later with every request spent;
        * window: the moment of the reset stays put while the budget is spent, and jumps one
          window on when it passes; the window is the longest reset seen.
      Until two answers can tell, the learner takes the slower reading (cautious). The rate is
      ``limit * 60 / window`` per minute.
    - **A budget is not a rate**: a window of an hour or more (Groq's requests per day) never
      paces the run; ``budget_exhausted`` says when it is spent, so the run can stop and say when
      it is whole again.
    - **Limits no header states** (no headers at all, remaining counts only, or only a daily
      budget) are found from the 429s with ``AdaptiveRate``: from the Cookbook's defaults, the rate
      grows while answers succeed and the engine is the bottleneck, and drops on a 429 to below
      what the server accepted in the seconds before it.

Usage:
    >>> limits = LaneLimits(configured={"requests": None, "tokens": None}, learn=True)
    >>> limits.observe(server_limits, now=10.0)        # the scopes whose learned limit changed
    ['requests', 'tokens']
    >>> limits.per_minute("requests")                  # 600.0 for 20 requests per 2 s
    >>> limits.describe("requests")                    # '20 requests per 2 s (learned from x-ratelimit headers)'
"""

# Standard library imports
import collections
import datetime
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

# Local application imports
from tasks.limits.header_dialects import LimitReading, ServerLimits
from tasks.limits.learned_limits import FALLBACK_REQUESTS_PER_MINUTE, FALLBACK_TOKENS_PER_MINUTE, SCOPES

LOGGER = logging.getLogger(__name__)

# Answers with at least this much of the budget spent tell a continuous bucket's window precisely.
PRECISE_SPENT = 10.0
# A reset tells something once it is this many times its resolution.
MEASURABLE_RESETS = 3.0
# A window this long or longer is a budget to spend, not a rate to pace at.
BUDGET_WINDOW_SECONDS = 3600.0
# Dialects whose reset is, by their definition, the end of the current window.
WINDOWED_DIALECTS = ("ietf", "x-ratelimit-window")
# The window a dialect documents for its limits, for answers that never send a reset.
DOCUMENTED_WINDOWS = {"x-ratelimit": 60.0, "anthropic": 60.0}
# Windows servers use; a derived window close to one of them is taken to be it.
NICE_WINDOWS = (1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0,
                3600.0, 86400.0)
# The Cookbook script's defaults: where a limit found from 429s starts.
FALLBACK_PER_MINUTE = {"requests": FALLBACK_REQUESTS_PER_MINUTE, "tokens": FALLBACK_TOKENS_PER_MINUTE}
# How an adaptive rate grows per second while the engine is its bottleneck: fast before the first
# 429 (nothing is known), slowly after it (the limit is near).
GROWTH_BEFORE_FIRST_429 = 0.05
GROWTH_AFTER_429 = 0.01
# A 429 takes the adaptive rate to at most this share of the rate before it...
DECREASE = 0.7
# ... and to at most this share of what the server accepted in the last seconds.
ACCEPTED_SHARE = 0.95
ACCEPTED_WINDOW_SECONDS = 5.0
# The longest a lane is held after 429s in a row that named no wait.
MAX_BACKOFF_SECONDS = 30.0
# Below this share of what the server accepted over the last minute, the rate grows fast again.
REGROWTH_SHARE = 0.8
# Answers kept for telling a window from a continuous bucket: at most one per this many seconds.
ANCHOR_SECONDS = 0.25


@dataclass
class _Seen:
    """One answer's reading of one dimension."""

    at: float
    limit: Optional[float]
    remaining: float
    reset_at: Optional[float]
    resolution: float
    latency: float = 0.0  # the answer's round trip: its reset may be placed up to this much late


@dataclass
class WindowLearner:
    """What one dimension's readings say over time: the kind of limit, its window and its rate.

    Attributes:
        limit: the latest limit stated (None: only remaining counts were sent).
        stated_window: a window the headers state (IETF ``w=``), which then needs no deriving.
        windowed_dialect: the dialect defines its reset as the end of the current window (the IETF
            fields and ``X-RateLimit-Reset``), so the limit is a window's even before answers show it.
        documented_window: the window the dialect documents for its limits (a minute for OpenAI's and
            Anthropic's names), taken only when the answers never send a reset to derive one from.
        window_votes, continuous_votes: pairs of answers that looked like a window / a continuous bucket.
    """

    limit: Optional[float] = None
    stated_window: Optional[float] = None
    windowed_dialect: bool = False
    documented_window: Optional[float] = None
    window_votes: int = 0
    continuous_votes: int = 0
    _history: Deque[_Seen] = field(default_factory=lambda: collections.deque(maxlen=64), repr=False)
    _anchors: Deque[_Seen] = field(default_factory=lambda: collections.deque(maxlen=32), repr=False)
    _jumps: Deque[float] = field(default_factory=lambda: collections.deque(maxlen=16), repr=False)
    _most_remaining: float = 0.0
    _longest_reset: Optional[float] = None
    _comeback_at: Optional[float] = None
    _window: Tuple[bool, Optional[float]] = (False, None)  # (up to date, the window derived)

    def observe(self, reading: LimitReading, at: float, latency: float = 0.0) -> None:
        """Take one answer's reading of this dimension, made at ``at`` (the engine's clock), ``latency``
        seconds after its request was sent."""
        if reading.limit is not None:
            self.limit = reading.limit
        if reading.window_seconds is not None:
            self.stated_window = reading.window_seconds
        known_window = self._window[1] if self._window[0] else None  # what the earlier answers agreed on
        self._window = (False, None)
        if reading.remaining is None:
            return
        seen = _Seen(at, reading.limit, reading.remaining, reading.reset_at, reading.resolution, latency)
        previous = self._history[-1] if self._history else None
        if previous is not None and seen.remaining > previous.remaining:
            if seen.reset_at is None:
                self._jumps.append(at)  # remaining counts only: the budget came back, a window passed
            elif self._came_back(previous, seen):
                self.window_votes += 1
                self._comeback_at = at
        if not self._anchors or at - self._anchors[-1].at >= ANCHOR_SECONDS:
            # Pairs far enough apart for the reset's resolution to tell: a few per second at most.
            tolerance = 0.05 + seen.resolution
            earlier = next((anchor for anchor in reversed(self._anchors) if at - anchor.at >= 2 * tolerance), None)
            if earlier is not None:  # each reset may be placed up to its answer's round trip late
                self._vote(earlier, seen, tolerance + max(earlier.latency, seen.latency))
            self._anchors.append(seen)
        if seen.reset_at is not None:
            reset = seen.reset_at - at
            if self.kind == "window" and known_window and reset > 4 * known_window:
                pass  # far beyond the window the answers agree on: an odd answer, not a longer window
            else:
                self._longest_reset = reset if self._longest_reset is None else max(self._longest_reset, reset)
        self._most_remaining = max(self._most_remaining, seen.remaining)
        self._history.append(seen)

    @property
    def kind(self) -> str:
        """"window", "continuous" or "unknown" (the answers cannot tell yet)."""
        if self.stated_window is not None or self.windowed_dialect:
            return "window"
        if self.window_votes >= 2 and self.window_votes > 2 * self.continuous_votes:
            return "window"
        if self.continuous_votes >= 2 and self.continuous_votes > 2 * self.window_votes:
            return "continuous"
        if len(self._jumps) >= 3 and not any(seen.reset_at is not None for seen in self._history):
            return "window"
        return "unknown"

    @property
    def known_limit(self) -> Optional[float]:
        """The limit stated, or, with remaining counts only, the most ever seen remaining plus one."""
        if self.limit is not None:
            return self.limit
        return self._most_remaining + 1.0 if self._history and self._window_from_jumps() else None

    def window_seconds(self) -> Optional[float]:
        """The window the limit is counted over, as far as the answers tell (None: not yet)."""
        fresh, window = self._window
        if not fresh:
            window = self._derive_window()
            self._window = (True, window)
        return window

    def _derive_window(self) -> Optional[float]:
        """The window, derived from the answers kept."""
        if self.stated_window is not None:
            return self.stated_window
        longest_reset = self._longest_reset
        continuous = self._continuous_window()
        kind = self.kind
        if longest_reset is None and self.limit is not None and self._window_from_jumps() is None:
            return self.documented_window  # a limit with no reset ever: its documented unit
        if kind == "window":
            if longest_reset is None:
                return self._window_from_jumps()
            return _snap_up(longest_reset)
        if kind == "continuous" and continuous is not None:
            return continuous
        known = [value for value in (continuous, longest_reset) if value is not None and value > 0]
        unmeasurable = continuous is None and (not known or max(known) < (60.0 if self._coarse else 1.0))
        if unmeasurable and self.documented_window:
            # Resets too short to measure a refill (2,000,000 tokens a minute with 30 spent resets in
            # under a millisecond; RFC 3339 resets are whole seconds): the dialect's documented unit.
            return self.documented_window if self.limit is not None else None
        return max(known) if known else None  # cannot tell yet: the slower reading

    def per_minute(self) -> Optional[float]:
        """The rate the limit allows, per minute (None: not known)."""
        limit, window = self.known_limit, self.window_seconds()
        if limit is None or not window:
            return None
        return limit * 60.0 / window

    @property
    def is_budget(self) -> bool:
        """True for a budget (a window of an hour or more): spent, not paced at."""
        window = self.window_seconds()
        return window is not None and window >= BUDGET_WINDOW_SECONDS

    @property
    def latest(self) -> Optional[_Seen]:
        """The latest reading with a remaining count."""
        return self._history[-1] if self._history else None

    def wait_for_one(self, now: float) -> Optional[float]:
        """Seconds until one more unit is expected to be free, once the budget is spent."""
        latest = self.latest
        if latest is None or latest.reset_at is None:
            return None
        if self.kind == "continuous" and self.known_limit:
            window = self.window_seconds() or 60.0
            return window / self.known_limit
        wait = max(0.0, latest.reset_at - now)
        window = self.window_seconds()
        if self.kind == "window" and latest.resolution >= 1.0 and window and self._comeback_at is not None:
            # A reset in whole seconds may be most of a second late: the windows' boundaries follow the
            # last comeback of the budget, one window apart.
            boundary = self._comeback_at + math.ceil(max(0.0, now - self._comeback_at) / window) * window
            wait = min(wait, max(0.0, boundary - now))
        return wait

    # Helpers

    @property
    def _coarse(self) -> bool:
        """True when the resets come in whole seconds."""
        return bool(self._history) and self._history[-1].resolution >= 1.0

    def _came_back(self, previous: _Seen, seen: _Seen) -> bool:
        """The budget came back at once, about when the earlier answer said it would: a window passed."""
        limit = self.limit or self._most_remaining
        return (previous.reset_at is not None and seen.remaining - previous.remaining >= 0.5 * limit
                and seen.at >= previous.reset_at - previous.resolution - previous.latency - 0.05
                and seen.at - previous.at < 5.0)

    def _vote(self, previous: _Seen, seen: _Seen, tolerance: float) -> None:
        """Two answers within one budget period: did the reset's moment stay put (window) or move (continuous)?"""
        if previous.reset_at is None or seen.reset_at is None or seen.remaining > previous.remaining:
            return
        if seen.at >= previous.reset_at - 0.01:
            return  # the earlier budget period has ended
        drift = seen.reset_at - previous.reset_at
        if abs(drift) <= tolerance and seen.remaining < previous.remaining:
            self.window_votes += 1  # spent, and the moment it is whole again stayed put
        elif drift > tolerance:
            self.continuous_votes += 1  # the moment moved on with time: it refills as it goes

    def _continuous_window(self) -> Optional[float]:
        """The window if this is a continuous bucket: ``reset * limit / spent`` over recent answers.

        Remaining counts are whole and may be rounded down, so a bucket kept nearly full (one or two
        spent) reads as much as half short. Answers with at least ``PRECISE_SPENT`` spent give the
        window to within a few percent; without them the reading is a lower bound, taken up to the
        next usual window.
        """
        limit = self.limit
        if limit is None:
            return None
        sums = {True: [0.0, 0.0], False: [0.0, 0.0]}  # precise or not: [resets, spent]
        for seen in self._history:
            # A reset says nothing until it is several times its resolution: 2,000,000 tokens a minute
            # with 30 spent reset in under a millisecond ("0ms"); RFC 3339 times are whole seconds.
            if seen.reset_at is not None and seen.remaining < limit and \
                    seen.reset_at - seen.at >= MEASURABLE_RESETS * seen.resolution:
                spent = limit - seen.remaining
                bucket = sums[spent >= PRECISE_SPENT]
                bucket[0] += seen.reset_at - seen.at
                bucket[1] += spent
        resets, spent = sums[True]
        if spent > 0:
            return _snap_continuous(resets * limit / spent)
        resets, spent = sums[False]
        return _next_window(resets * limit / spent) if spent > 0 else None

    def _window_from_jumps(self) -> Optional[float]:
        """With remaining counts only: the shortest time between two comebacks of the budget."""
        jumps = list(self._jumps)
        gaps = [later - earlier for earlier, later in zip(jumps, jumps[1:]) if later - earlier >= 0.5]
        return _snap_up(min(gaps)) if len(gaps) >= 2 else None


@dataclass
class AdaptiveRate:
    """A limit no header states, found from 429s: growth while answers succeed, a multiplicative cut on a 429.

    Before the first 429 the rate grows by 5% a second (nothing is known yet); after it, by a fixed
    step of 1% of the rate the last cut left per second (additive increase), except while it is below
    80% of what the server accepted over the last minute, where it grows fast again (that much is known to
    pass). A 429 cuts it to 70%, or to 95% of what the server accepted in the last 5 s, whichever is
    lower, but never below half of what it accepted over the last minute: a long fixed window that ran
    out keeps refusing until it ends, and that says nothing new.

    Attributes:
        per_minute: the rate now.
        hit: True once a 429 has been seen.
    """

    per_minute: float
    hit: bool = False
    refused_in_a_row: int = 0
    _changed_at: Optional[float] = None
    _cut_at: float = -math.inf
    _step: float = 0.0
    _sustained: Tuple[float, float] = (-math.inf, 0.0)  # (when reckoned, accepted per minute over the last minute)
    _accepted: Deque[float] = field(default_factory=lambda: collections.deque(maxlen=8192), repr=False)

    def succeeded(self, now: float, bottleneck: bool) -> bool:
        """An answer that was not a 429; grow when the engine held requests back for this rate."""
        self._accepted.append(now)
        self.refused_in_a_row = 0
        last, self._changed_at = self._changed_at, now
        if not bottleneck or last is None:
            return False
        elapsed = min(1.0, max(0.0, now - last))
        if not self.hit or self.per_minute < REGROWTH_SHARE * self._sustained_rate(now):
            self.per_minute *= 1.0 + GROWTH_BEFORE_FIRST_429 * elapsed
        else:
            self.per_minute += self._step * elapsed
        return True

    def rate_limited(self, now: float, wait: Optional[float], by_accepted: bool = True) -> bool:
        """A 429: cut the rate, at most once per second (or per wait the server asked for).

        ``by_accepted``: the rate counts requests, so what the server accepted bounds the cut (a token
        rate is cut by its share only: accepted requests say nothing of tokens).
        """
        self.hit = True
        self.refused_in_a_row += 1
        if now - self._cut_at < max(1.0, min(wait or 0.0, 10.0)):
            return False
        self._cut_at = now
        recent = [moment for moment in self._accepted if moment >= now - ACCEPTED_WINDOW_SECONDS]
        cut = self.per_minute * DECREASE
        if by_accepted and len(recent) >= 5:
            span = max(now - recent[0], 1.0)
            cut = min(cut, len(recent) * 60.0 / span * ACCEPTED_SHARE)
        self._sustained = (-math.inf, 0.0)
        if by_accepted:
            cut = max(cut, 0.5 * self._sustained_rate(now))
        self.per_minute = max(1.0, cut)
        self._step = GROWTH_AFTER_429 * self.per_minute
        self._changed_at = now
        return True

    def backoff_seconds(self) -> float:
        """How long to hold the lane after a 429 that named no wait: nothing for one, doubling from
        half a second while 429s come in a row (a long window that ran out refuses until it ends)."""
        if self.refused_in_a_row < 2:
            return 0.0
        return min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** (self.refused_in_a_row - 2))

    def _sustained_rate(self, now: float) -> float:
        """What the server accepted per minute over the last minute (reckoned at most once a second)."""
        reckoned, rate = self._sustained
        if now - reckoned >= 1.0:
            accepted = self._accepted
            first = accepted[0] if accepted else now
            count = len(accepted) - next((index for index, moment in enumerate(accepted) if moment >= now - 60.0),
                                         len(accepted))
            rate = count * 60.0 / max(1.0, min(60.0, now - first))
            self._sustained = (now, rate)
        return rate


@dataclass
class LaneLimits:
    """Everything one lane learns of its server's limits, for both scopes the engine paces.

    Attributes:
        configured: the limits given ("requests", "tokens"; None: not given). They stay ceilings.
        learn: find limits not given from the headers or the 429s (else only stated ones are followed).
        dialect: the header dialect heard last (None: none yet).
    """

    configured: Dict[str, Optional[float]]
    learn: bool = True
    dialect: Optional[str] = None
    learners: Dict[str, WindowLearner] = field(default_factory=dict, repr=False)
    adaptive: Dict[str, AdaptiveRate] = field(default_factory=dict, repr=False)
    heard: bool = False
    _bottleneck_at: Dict[str, float] = field(default_factory=dict, repr=False)
    _reported: Dict[str, Optional[float]] = field(default_factory=dict, repr=False)
    _budgets_told: set = field(default_factory=set, repr=False)

    def observe(self, limits: Optional[ServerLimits], now: float, rate_limited: bool = False) -> List[str]:
        """Take one answer (its headers, or None); return the scopes whose learned limit changed.

        An answer that is not a 429 lets a limit found from 429s grow while it is the bottleneck.
        """
        self.heard = True
        if limits is not None:
            self.dialect = limits.dialect
            for dimension in ("requests", "tokens", "input_tokens", "output_tokens"):
                reading = limits.reading(dimension)
                if reading is not None:
                    learner = self.learners.setdefault(dimension, WindowLearner())
                    learner.windowed_dialect = limits.dialect in WINDOWED_DIALECTS
                    learner.documented_window = DOCUMENTED_WINDOWS.get(limits.dialect)
                    learner.observe(reading, limits.observed_at, limits.latency)
                    if learner.is_budget and dimension not in self._budgets_told:
                        self._budgets_told.add(dimension)
                        LOGGER.warning("The server states a budget, not a rate (it does not pace this run; the run "
                                       "stops when it is spent): %s", "; ".join(self.budgets()))
        for scope in SCOPES:
            adaptive = self._adaptive(scope, hit=False)
            if adaptive is not None and not rate_limited:
                adaptive.succeeded(now, now - self._bottleneck_at.get(scope, -math.inf) < 1.0)
        return self._changes()

    def rate_limited(self, scope: Optional[str], wait: Optional[float], now: float) -> List[str]:
        """A 429 naming ``scope`` (None: it did not say): cut the limits found from 429s it concerns."""
        names = [scope] if scope is not None else [
            name for name in SCOPES if name in self.adaptive and now - self._bottleneck_at.get(name, -math.inf) < 2.0
        ] or ["requests"]  # a 429 that does not say which limit: the one holding requests back, else requests
        for name in names:
            adaptive = self._adaptive(name, hit=scope is not None)
            if adaptive is not None:
                adaptive.rate_limited(now, wait, by_accepted=name == "requests")
        return self._changes()

    def backoff_seconds(self, scope: Optional[str]) -> float:
        """How long to hold the lane after a 429 that named no wait (0: not at all)."""
        return max((adaptive.backoff_seconds() for name, adaptive in self.adaptive.items() if scope in (None, name)),
                   default=0.0)

    def notes(self) -> List[str]:
        """The limits in force and the budgets stated, in words."""
        texts = [text for text in (self.describe(scope) for scope in SCOPES) if text]
        return texts + [f"a budget, not a rate: {text}" for text in self.budgets()]

    def held_back(self, scope: str, now: float) -> None:
        """The engine held a request back for ``scope``'s rate: the rate is the bottleneck now."""
        self._bottleneck_at[scope] = now

    def per_minute(self, scope: str) -> Optional[float]:
        """The limit learned for ``scope`` (headers or 429s), per minute; None: nothing learned (no limit from the server)."""
        stated = self._stated(scope)
        if stated is not None:
            return stated
        adaptive = self.adaptive.get(scope)
        return adaptive.per_minute if adaptive is not None else None

    def in_force(self, scope: str) -> Optional[float]:
        """The limit in force: the lower of the configured and the learned one (None: no limit)."""
        known = [value for value in (self.configured.get(scope), self.per_minute(scope)) if value is not None]
        return min(known) if known else None

    def source(self, scope: str) -> str:
        """Where the limit in force for ``scope`` comes from, in words."""
        configured, learned = self.configured.get(scope), self.per_minute(scope)
        if configured is not None and (learned is None or configured <= learned):
            return "given"
        if self._stated(scope) is not None:
            return f"learned from {self.dialect} headers"
        if scope in self.adaptive:
            return "found from 429s" if self.adaptive[scope].hit else "stated nowhere: the Cookbook's default, growing until a 429"
        return "none"

    def describe(self, scope: str) -> Optional[str]:
        """E.g. "20 requests per 2 s (learned from x-ratelimit headers)"; None when no limit is in force."""
        limit = self.in_force(scope)
        if limit is None or math.isinf(limit):
            return None
        source = self.source(scope)
        learner = self._rate_learner(scope)
        if source.startswith("learned") and learner is not None and learner.known_limit:
            window = learner.window_seconds() or 60.0
            return f"{learner.known_limit:,.0f} {scope} per {_window_text(window)} ({source})"
        return f"{limit:,.0f} {scope} per min ({source})"

    def budgets(self) -> List[str]:
        """The budgets (windows of an hour or more) the server states, in words."""
        texts = []
        for dimension, learner in self.learners.items():
            latest = learner.latest
            if learner.is_budget and latest is not None and learner.known_limit:
                whole = _wall_text(latest.reset_at, latest.at) if latest.reset_at is not None else "unknown"
                texts.append(f"{latest.remaining:,.0f} of {learner.known_limit:,.0f} {dimension.replace('_', ' ')} per "
                             f"{_window_text(learner.window_seconds() or 86400.0)} left (whole again {whole})")
        return texts

    def budget_exhausted(self, now: float) -> Optional[str]:
        """A message when a budget (not a rate) is spent, for the run to stop on; else None."""
        for dimension, learner in self.learners.items():
            latest = learner.latest
            if learner.is_budget and latest is not None and latest.remaining < 1 and (
                    latest.reset_at is None or latest.reset_at > now + 60.0):
                whole = _wall_text(latest.reset_at, now) if latest.reset_at is not None else "at a time it did not say"
                return (f"the server's budget of {learner.known_limit or 0:,.0f} {dimension.replace('_', ' ')} per "
                        f"{_window_text(learner.window_seconds() or 86400.0)} is spent; it is whole again {whole}. "
                        "Run the same command then to continue")
        return None

    def reading_for(self, scope: str) -> Optional[WindowLearner]:
        """The learner whose remaining counts cap ``scope``'s bucket (None for a budget, or nothing heard)."""
        learner = self.learners.get(scope)
        if learner is None or learner.is_budget:
            return None
        return learner

    # Helpers

    def _rate_learner(self, scope: str) -> Optional[WindowLearner]:
        """The learner that states ``scope``'s rate (for tokens: total tokens, else input tokens)."""
        for dimension in ((scope,) if scope == "requests" else ("tokens", "input_tokens")):
            learner = self.learners.get(dimension)
            if learner is not None and not learner.is_budget and learner.per_minute() is not None:
                return learner
        return None

    def _stated(self, scope: str) -> Optional[float]:
        """The rate ``scope``'s headers state (a budget states none)."""
        learner = self._rate_learner(scope)
        if learner is None:
            return None
        rate = learner.per_minute()
        if scope == "tokens" and learner is self.learners.get("input_tokens"):
            output = self.learners.get("output_tokens")
            extra = output.per_minute() if output is not None and not output.is_budget else None
            rate = None if rate is None else rate + (extra or 0.0)
        return rate

    def _adaptive(self, scope: str, hit: bool) -> Optional[AdaptiveRate]:
        """The adaptive rate of ``scope``, started when this scope's limit must be found from 429s."""
        if self._stated(scope) is not None:
            return None
        adaptive = self.adaptive.get(scope)
        if adaptive is not None or not self.learn or self.configured.get(scope) is not None:
            return adaptive
        learner = self.learners.get(scope)
        if learner is not None and learner.limit is not None and not learner.is_budget and not hit:
            return None  # a limit is stated; its window is still to be told
        other = "tokens" if scope == "requests" else "requests"
        other_stated = self._stated(other) is not None
        if other_stated and self.learners.get(scope) is None and not hit:
            return None  # the server states the other limit and says nothing of this one: none, until a 429 names it
        adaptive = self.adaptive[scope] = AdaptiveRate(FALLBACK_PER_MINUTE[scope])
        return adaptive

    def _changes(self) -> List[str]:
        """The scopes whose learned limit moved by more than 1% since last told."""
        changed = []
        for scope in SCOPES:
            value, before = self.per_minute(scope), self._reported.get(scope)
            first = scope not in self._reported  # the first answer: a learning bucket must follow it, even to "none"
            if first or (value is None) != (before is None) or (
                    value is not None and before is not None and abs(value - before) > 0.01 * before):
                self._reported[scope] = value
                changed.append(scope)
        return changed


def _snap_continuous(window: float) -> float:
    """A window derived precisely from a continuous bucket's readings: a usual window when within 10% of it."""
    for nice in NICE_WINDOWS:
        if abs(window - nice) <= 0.1 * nice:
            return nice
    return window


def _next_window(lower_bound: float) -> float:
    """The shortest usual window not below a lower bound of the window (or the bound, beyond a day)."""
    return next((nice for nice in NICE_WINDOWS if nice >= 0.98 * lower_bound), lower_bound)


def _snap_up(longest_reset: float) -> float:
    """A window from the longest reset seen: the next usual window when within 25% above it, else the reset."""
    for nice in NICE_WINDOWS:
        if longest_reset <= nice * 1.02 and nice <= longest_reset * 1.25:
            return nice
    return longest_reset


def _window_text(seconds: float) -> str:
    """"2 s", "min", "10 min", "day"."""
    if abs(seconds - 86400.0) < 1:
        return "day"
    if abs(seconds - 3600.0) < 1:
        return "hour"
    if abs(seconds - 60.0) < 0.01:
        return "min"
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s" if seconds == round(seconds, 3) else f"{seconds:.1f} s"


def _wall_text(reset_at: float, now: float) -> str:
    """When a reset on the engine's clock falls, as a UTC time."""
    moment = datetime.datetime.fromtimestamp(time.time() + min(max(0.0, reset_at - now), 400 * 86400.0),
                                             datetime.timezone.utc)
    return f"at {moment:%Y-%m-%d %H:%M} UTC"
