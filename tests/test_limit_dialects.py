"""Every rate-limit header dialect, read against a second implementation written here, and the window logic.

The parsers of ``tasks.limits.header_dialects`` are checked against ``_reference_read`` below,
written from the providers' documentation without the engine's code, on fixed examples and on
random headers. The window logic of ``tasks.limits.limit_learning`` is checked against simulated
servers (a fixed window, a continuously refilling bucket, a daily budget, remaining counts only,
no headers) driven on an injected clock: the rate it derives must be the server's true rate.
"""

# Standard library imports
import datetime
import email.utils
import math
import random
import re
from typing import Dict, List, Optional, Tuple

# Third-party imports
import pytest

# Local application imports
from tasks.limits.header_dialects import ServerLimits, parse_reset, read_limits, retry_hint
from tasks.limits.limit_learning import LaneLimits, WindowLearner
from tasks.limits.header_dialects import LimitReading

WALL = 1_800_000_000.0  # the wall clock of every test (2027-01-15)
NOW = 500.0  # the engine's clock at the same moment


# A second implementation of the readers, from the documentation

def _ref_seconds(text: str) -> Optional[float]:
    """Seconds until a reset written any way a provider writes it."""
    text = text.strip().strip('"')
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        value = float(text)
        return max(0.0, value - WALL) if value > 1e9 else max(0.0, value)
    if re.fullmatch(r"(\d+(\.\d+)?(h|ms|m|s|d))+", text):
        units = {"d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
        return sum(float(number) * units[unit] for number, _, unit in re.findall(r"(\d+(\.\d+)?)(ms|h|m|s|d)", text))
    if re.match(r"\d{4}-\d\d-\d\dT", text):
        moment = datetime.datetime.strptime(text.replace("Z", ""), "%Y-%m-%dT%H:%M:%S" + (".%f" if "." in text else ""))
        return max(0.0, moment.replace(tzinfo=datetime.timezone.utc).timestamp() - WALL)
    return max(0.0, email.utils.parsedate_to_datetime(text).timestamp() - WALL)


def _reference_read(headers: Dict[str, str]) -> Tuple[str, Dict[str, Tuple]]:
    """(dialect, {dimension: (limit, remaining, reset seconds)}) of a header set."""
    lower = {name.lower(): value for name, value in headers.items()}
    out: Dict[str, Tuple] = {}

    def put(dimension, limit, remaining, reset):
        if limit is None and remaining is None:
            return
        out[dimension] = (None if limit is None else float(limit), None if remaining is None else float(remaining),
                          None if reset is None else _ref_seconds(reset))

    if any(name.startswith("x-ratelimit-") and name.rsplit("-", 1)[-1] in ("requests", "tokens") for name in lower):
        for scope in ("requests", "tokens"):
            put(scope, lower.get(f"x-ratelimit-limit-{scope}"), lower.get(f"x-ratelimit-remaining-{scope}"),
                lower.get(f"x-ratelimit-reset-{scope}"))
        return "x-ratelimit", out
    if any(name.startswith("anthropic-ratelimit-") for name in lower):
        for dimension in ("requests", "tokens", "input-tokens", "output-tokens"):
            put(dimension.replace("-", "_"), lower.get(f"anthropic-ratelimit-{dimension}-limit"),
                lower.get(f"anthropic-ratelimit-{dimension}-remaining"), lower.get(f"anthropic-ratelimit-{dimension}-reset"))
        return "anthropic", out
    if "ratelimit" in lower and "r=" in lower["ratelimit"]:
        quotas = {m[0]: (m[1], m[2]) for m in re.findall(r'"([^"]+)";q=(\d+);w=(\d+)', lower.get("ratelimit-policy", ""))}
        for name, remaining, reset in re.findall(r'"([^"]+)";r=(\d+);t=(\d+)', lower["ratelimit"]):
            dimension = "tokens" if "token" in name else "requests"
            put(dimension, quotas[name][0], remaining, reset)
        return "ietf", out
    if "ratelimit" in lower:
        fields = dict(re.findall(r"(\w+)=(\d+)", lower["ratelimit"]))
        put("requests", fields.get("limit"), fields.get("remaining"), fields.get("reset"))
        return "ietf", out
    if "ratelimit-remaining" in lower or "ratelimit-limit" in lower:
        limit = lower.get("ratelimit-limit")
        put("requests", limit.split(",")[0] if limit else None, lower.get("ratelimit-remaining"), lower.get("ratelimit-reset"))
        return "ietf", out
    limit = lower.get("x-ratelimit-limit")
    put("requests", limit.split(",")[0] if limit else None, lower.get("x-ratelimit-remaining"), lower.get("x-ratelimit-reset"))
    return "x-ratelimit-window", out


def _engine_read(headers: Dict[str, str]) -> Tuple[str, Dict[str, Tuple]]:
    limits = read_limits(headers, NOW, WALL)
    assert limits is not None
    out = {}
    for dimension in ("requests", "tokens", "input_tokens", "output_tokens"):
        reading = limits.reading(dimension)
        if reading is not None:
            out[dimension] = (reading.limit, reading.remaining,
                              None if reading.reset_at is None else reading.reset_at - NOW)
    return limits.dialect, out


def _same(engine: Tuple[str, Dict], reference: Tuple[str, Dict]) -> None:
    assert engine[0] == reference[0]
    assert engine[1].keys() == reference[1].keys()
    for dimension, values in reference[1].items():
        for got, expected in zip(engine[1][dimension], values):
            assert (got is None) == (expected is None), (dimension, engine, reference)
            if expected is not None:
                assert got == pytest.approx(expected, abs=1e-6), (dimension, engine, reference)


def _rfc3339(seconds_from_now: float) -> str:
    return datetime.datetime.fromtimestamp(WALL + seconds_from_now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


EXAMPLES = [
    {"x-ratelimit-limit-requests": "20", "x-ratelimit-remaining-requests": "19", "x-ratelimit-reset-requests": "1.379s"},
    {"x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9990", "x-ratelimit-reset-requests": "6m0s",
     "x-ratelimit-limit-tokens": "2000000", "x-ratelimit-remaining-tokens": "1999000", "x-ratelimit-reset-tokens": "12ms"},
    {"X-RateLimit-Remaining-Requests": "99", "X-RateLimit-Remaining-Tokens": "9000"},  # Azure: remaining only
    {"x-ratelimit-limit-requests": "14400", "x-ratelimit-remaining-requests": "14370", "x-ratelimit-reset-requests": "2m59.56s",
     "x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "5997", "x-ratelimit-reset-tokens": "7.66s"},
    {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
     "anthropic-ratelimit-requests-reset": _rfc3339(2), "anthropic-ratelimit-input-tokens-limit": "40000",
     "anthropic-ratelimit-input-tokens-remaining": "39000", "anthropic-ratelimit-input-tokens-reset": _rfc3339(2),
     "anthropic-ratelimit-output-tokens-limit": "8000", "anthropic-ratelimit-output-tokens-remaining": "8000",
     "anthropic-ratelimit-output-tokens-reset": _rfc3339(0)},
    {"RateLimit-Policy": '"default";q=100;w=60', "RateLimit": '"default";r=50;t=30'},
    {"RateLimit-Policy": '"requests";q=20;w=2, "tokens";q=4000;w=2', "RateLimit": '"requests";r=19;t=1, "tokens";r=3900;t=1'},
    {"RateLimit": "limit=100, remaining=50, reset=30", "RateLimit-Policy": "100;w=60"},
    {"RateLimit-Limit": "100", "RateLimit-Remaining": "50", "RateLimit-Reset": "30"},
    {"X-RateLimit-Limit": "100, 100;window=60", "X-RateLimit-Remaining": "41", "X-RateLimit-Reset": str(int(WALL) + 17)},
]


@pytest.mark.parametrize("headers", EXAMPLES, ids=lambda headers: next(iter(headers)))
def test_each_dialect_reads_as_the_reference_reads_it(headers: Dict[str, str]) -> None:
    _same(_engine_read(headers), _reference_read(headers))


def test_random_headers_of_every_dialect_read_as_the_reference_reads_them() -> None:
    rng = random.Random(7)
    for _ in range(400):
        limit = rng.randint(1, 10**7)
        remaining = rng.randint(0, limit)
        seconds = rng.choice([rng.randint(0, 90_000), round(rng.random() * 100, 3)])
        reset = rng.choice([f"{seconds}s" if isinstance(seconds, int) else f"{int(seconds * 1000)}ms",
                            _go(seconds), str(seconds), str(int(WALL) + int(seconds)), _rfc3339(int(seconds)),
                            email.utils.formatdate(WALL + int(seconds), usegmt=True)])
        dialect = rng.choice(["openai", "anthropic", "ietf", "ietf-old", "xwin"])
        if dialect == "openai":
            scope = rng.choice(["requests", "tokens"])
            headers = {f"x-ratelimit-limit-{scope}": str(limit), f"x-ratelimit-remaining-{scope}": str(remaining),
                       f"x-ratelimit-reset-{scope}": reset}
        elif dialect == "anthropic":
            dimension = rng.choice(["requests", "tokens", "input-tokens", "output-tokens"])
            headers = {f"anthropic-ratelimit-{dimension}-limit": str(limit),
                       f"anthropic-ratelimit-{dimension}-remaining": str(remaining),
                       f"anthropic-ratelimit-{dimension}-reset": _rfc3339(int(seconds))}
        elif dialect == "ietf":
            window = rng.randint(1, 3600)
            headers = {"RateLimit-Policy": f'"p";q={limit};w={window}', "RateLimit": f'"p";r={remaining};t={int(seconds)}'}
        elif dialect == "ietf-old":
            headers = {"RateLimit-Limit": str(limit), "RateLimit-Remaining": str(remaining), "RateLimit-Reset": str(int(seconds))}
        else:
            headers = {"X-RateLimit-Limit": f"{limit}, {limit};window=60", "X-RateLimit-Remaining": str(remaining),
                       "X-RateLimit-Reset": reset}
        _same(_engine_read(headers), _reference_read(headers))


def _go(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h{minutes}m{rest:.2f}s" if hours else f"{minutes}m{rest:.2f}s"


def test_resets_in_every_format_are_absolute_times() -> None:
    assert parse_reset("1.379s", WALL)[0] == pytest.approx(1.379)
    assert parse_reset("6m0s", WALL)[0] == 360.0
    assert parse_reset("12ms", WALL)[0] == pytest.approx(0.012)
    assert parse_reset("30", WALL) == (30.0, 1.0)  # whole seconds: a coarse resolution
    assert parse_reset(str(WALL + 42), WALL)[0] == pytest.approx(42.0)  # epoch seconds
    assert parse_reset(_rfc3339(90), WALL) == (pytest.approx(90.0), 1.0)
    assert parse_reset("2027-01-15T08:00:02.500+00:00", WALL)[0] == pytest.approx(2.5)
    assert parse_reset(email.utils.formatdate(WALL + 5, usegmt=True), WALL)[0] == pytest.approx(5.0)
    for junk in ("", "soon", "nan", "inf", "1x", "-5s"):
        assert parse_reset(junk, WALL) is None or parse_reset(junk, WALL)[0] >= 0.0
    limits = read_limits({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "2s"}, NOW, WALL)
    assert limits.requests.reset_at == NOW + 2.0 and limits.requests.limit is None


def test_unbelievable_values_are_ignored_not_crashed_on() -> None:
    far = {"x-ratelimit-limit-requests": "20", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1e15"}
    assert read_limits(far, NOW, WALL).requests.reset_at is None  # an epoch 31 million years away
    assert read_limits({"x-ratelimit-limit-requests": "0.0001", "x-ratelimit-remaining-requests": "0"}, NOW,
                       WALL).requests.limit is None  # a limit below one request says nothing usable
    limits = LaneLimits({"requests": None, "tokens": None})
    limits.observe(read_limits({"x-ratelimit-limit-requests": "20", "x-ratelimit-remaining-requests": "0",
                                "x-ratelimit-reset-requests": "99999999h"}, NOW, WALL), NOW)
    assert limits.budget_exhausted(NOW) is None and limits.notes() is not None


def test_an_odd_far_reset_does_not_turn_a_learned_window_into_a_budget() -> None:
    limits = LaneLimits({"requests": None, "tokens": None})
    _drive(limits, FixedWindowServer(20, 2.0), 20.0, 9.0, 20)
    assert limits.per_minute("requests") == pytest.approx(600, rel=0.02)
    limits.observe(ServerLimits("x-ratelimit", 20.1, requests=LimitReading(20, 19, 20.1 + 86400.0)), 20.1)
    assert not _learner(limits).is_budget and limits.per_minute("requests") == pytest.approx(600, rel=0.02)


def test_a_429_that_names_no_limit_cuts_the_request_rate_not_the_token_rate() -> None:
    limits = LaneLimits({"requests": None, "tokens": None})
    limits.observe(None, 0.0)
    for step in range(1, 200):
        limits.held_back("requests", step * 0.05)
        limits.observe(None, step * 0.05)
    limits.rate_limited(None, None, 10.0)
    assert limits.per_minute("tokens") >= 125_000  # untouched: accepted requests say nothing of tokens
    assert limits.per_minute("requests") < 1500


def test_no_headers_read_as_none_and_a_429_wait_comes_from_any_hint() -> None:
    assert read_limits({"content-type": "application/json"}, NOW, WALL) is None
    assert retry_hint({"retry-after-ms": "250", "retry-after": "9"}, None, WALL) == pytest.approx(0.25)
    assert retry_hint({"Retry-After": email.utils.formatdate(WALL + 7, usegmt=True)}, None, WALL) == pytest.approx(7.0)
    gemini = [{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "32s"}]}}]
    assert retry_hint({}, gemini, WALL) == 32.0
    assert retry_hint({}, gemini[0], WALL) == 32.0
    assert retry_hint({}, {"error": {"message": "slow down"}}, WALL) is None


# The window logic, against simulated servers on an injected clock


class FixedWindowServer:
    """A server counting ``limit`` per fixed window of ``window`` seconds, aligned to its own clock."""

    def __init__(self, limit: int, window: float, offset: float = 0.37) -> None:
        self.limit, self.window, self.offset = limit, window, offset
        self.counts: Dict[int, int] = {}

    def answer(self, now: float) -> Tuple[bool, float, float]:
        """(accepted, remaining, seconds until the window ends)."""
        index = math.floor((now + self.offset) / self.window)
        used = self.counts.get(index, 0)
        accepted = used < self.limit
        if accepted:
            self.counts[index] = used + 1
        end = (index + 1) * self.window - self.offset
        return accepted, self.limit - self.counts.get(index, 0), end - now


class RefillingServer:
    """A bucket of ``limit`` that refills continuously over ``window`` seconds (OpenAI's shape)."""

    def __init__(self, limit: float, window: float) -> None:
        self.limit, self.window = limit, window
        self.level, self.at = limit, 0.0

    def answer(self, now: float) -> Tuple[bool, float, float]:
        self.level = min(self.limit, self.level + (now - self.at) * self.limit / self.window)
        self.at = now
        accepted = self.level >= 1
        if accepted:
            self.level -= 1
        return accepted, math.floor(self.level), (self.limit - self.level) * self.window / self.limit


def _drive(limits: LaneLimits, server, seconds: float, send_rate: float, stated_limit: Optional[float],
           dialect: str = "x-ratelimit", coarse: bool = False, remaining_only: bool = False) -> List[bool]:
    """Send at ``send_rate`` per second for ``seconds`` (fake clock), feeding every answer to ``limits``."""
    outcomes = []
    now = 0.0
    while now < seconds:
        accepted, remaining, reset = server.answer(now)
        if coarse:
            reset = float(math.ceil(reset))
        reading = LimitReading(None if remaining_only else stated_limit, remaining,
                               None if remaining_only else now + reset, resolution=1.0 if coarse else 0.001)
        limits.observe(ServerLimits(dialect, now, requests=reading), now, rate_limited=not accepted)
        outcomes.append(accepted)
        now += 1.0 / send_rate
    return outcomes


def _drive_with_latency(limits: LaneLimits, server, seconds: float, send_rate: float, stated_limit: float,
                        seed: int = 7) -> None:
    """As ``_drive``, but each answer arrives 50-350 ms after the server made its headers (random, seeded),
    so answers arrive out of order and each reset is placed from the arrival, as the client sees it."""
    draw = random.Random(seed)
    arrivals = []
    now = 0.0
    while now < seconds:
        accepted, remaining, reset = server.answer(now)
        latency = 0.05 + 0.3 * draw.random()
        arrivals.append((now + latency, latency, accepted, remaining, reset))
        now += 1.0 / send_rate
    for arrived, latency, accepted, remaining, reset in sorted(arrivals):
        reading = LimitReading(stated_limit, remaining, arrived + reset)
        limits.observe(ServerLimits("x-ratelimit", arrived, requests=reading, latency=latency), arrived,
                       rate_limited=not accepted)


@pytest.mark.parametrize("server, kind", [(FixedWindowServer(20, 2.0), "window"),
                                          (RefillingServer(600, 60.0), "continuous")], ids=["window", "continuous"])
def test_answers_out_of_order_behind_jittered_latency_still_tell_the_limit(server, kind: str) -> None:
    limits = LaneLimits({"requests": None, "tokens": None})
    _drive_with_latency(limits, server, 40.0, 9.0, server.limit)
    # A bucket's reset moves by less than the answers' jitter between two answers: it may stay "unknown",
    # and its refill rate still gives the limit.
    assert _learner(limits).kind in ((kind,) if kind == "window" else (kind, "unknown"))
    assert limits.per_minute("requests") == pytest.approx(600.0, rel=0.05)


def _learner(limits: LaneLimits) -> WindowLearner:
    return limits.learners["requests"]


@pytest.mark.parametrize("limit, window, send_rate", [(20, 2.0, 9.0), (100, 10.0, 9.5), (5, 1.0, 4.0),
                                                      (600, 60.0, 9.0), (1000, 1.0, 700.0)])
def test_a_fixed_window_is_told_from_its_resets_and_paced_at_its_true_rate(limit, window, send_rate) -> None:
    limits = LaneLimits({"requests": None, "tokens": None})
    _drive(limits, FixedWindowServer(limit, window), max(30.0, 3 * window), send_rate, limit)
    assert _learner(limits).kind == "window"
    assert limits.per_minute("requests") == pytest.approx(limit * 60.0 / window, rel=0.02)
    assert "per" in limits.describe("requests") and "x-ratelimit" in limits.describe("requests")


@pytest.mark.parametrize("limit, window, send_rate", [(6000, 60.0, 95.0), (600, 60.0, 9.5), (50, 10.0, 4.0)])
def test_a_continuous_bucket_is_told_from_its_resets_and_paced_at_its_refill_rate(limit, window, send_rate) -> None:
    limits = LaneLimits({"requests": None, "tokens": None})
    _drive(limits, RefillingServer(limit, window), 20.0, send_rate, limit)
    # Sent below its refill rate, the bucket stays nearly full and its reset tiny: never a window.
    assert _learner(limits).kind in ("continuous", "unknown")
    assert limits.per_minute("requests") == pytest.approx(limit * 60.0 / window, rel=0.02)


def test_a_continuous_bucket_spent_faster_than_it_refills_is_told_as_one() -> None:
    limits = LaneLimits({"requests": None, "tokens": None})
    _drive(limits, RefillingServer(600, 60.0), 20.0, 12.0, 600)  # 12 a second into 10 a second
    assert _learner(limits).kind == "continuous"
    assert limits.per_minute("requests") == pytest.approx(600, rel=0.02)


def test_a_large_token_budget_spent_in_small_requests_is_read_per_minute() -> None:
    # 2,000,000 tokens a minute, 30 per request: each reset is under a millisecond and written "0ms",
    # each remaining count is rounded down. Nothing measurable: OpenAI's documented minute holds.
    limits = LaneLimits({"requests": None, "tokens": None})
    level, at = 2_000_000.0, 0.0
    for step in range(2000):
        now = step * 0.0102
        level = min(2_000_000.0, level + (now - at) * 2_000_000 / 60.0) - 30
        at = now
        reset = math.floor((2_000_000 - level) * 60 / 2_000_000 * 1000) / 1000
        limits.observe(ServerLimits("x-ratelimit", now, tokens=LimitReading(2_000_000, math.floor(level), now + reset)),
                       now)
    assert limits.per_minute("tokens") == 2_000_000


def test_the_first_answer_of_a_short_window_is_read_cautiously() -> None:
    learner = WindowLearner()
    learner.observe(LimitReading(20, 19, NOW + 1.379), NOW)  # 20 per 2 s, or per 27.6 s as a bucket? Not yet known
    assert learner.kind == "unknown" and learner.per_minute() <= 20 * 60 / 27.0


def test_whole_second_resets_that_cannot_be_measured_are_taken_per_minute() -> None:
    limits = LaneLimits({"requests": None, "tokens": None})
    _drive(limits, RefillingServer(600, 60.0), 10.0, 9.0, 600, dialect="anthropic", coarse=True)
    assert limits.per_minute("requests") == pytest.approx(600, rel=0.02)


def test_a_window_dialect_with_whole_second_resets_waits_for_the_boundary_not_the_rounded_reset() -> None:
    limits = LaneLimits({"requests": None, "tokens": None})
    server = FixedWindowServer(20, 2.0, offset=0.37)
    _drive(limits, server, 20.0, 12.0, 20, dialect="ietf", coarse=True)  # spends each window's budget
    assert limits.per_minute("requests") == pytest.approx(600, rel=0.02)
    now = 20.05
    true_wait = (math.floor((now + 0.37) / 2.0) + 1) * 2.0 - 0.37 - now
    wait = _learner(limits).wait_for_one(now)
    assert true_wait - 0.01 <= wait <= true_wait + 0.1  # the rounded reset would say up to a second more


def test_a_limit_stated_without_any_reset_is_taken_in_its_documented_unit() -> None:
    limits = LaneLimits({"requests": None, "tokens": None})
    for step in range(20):
        limits.observe(ServerLimits("x-ratelimit", step * 0.1, requests=LimitReading(1200, 1199 - step % 3)), step * 0.1)
    assert limits.per_minute("requests") == 1200


def test_remaining_counts_alone_give_the_window_from_the_budget_coming_back() -> None:
    limits = LaneLimits({"requests": None, "tokens": None})
    _drive(limits, FixedWindowServer(100, 10.0), 45.0, 12.0, None, remaining_only=True)
    assert _learner(limits).kind == "window"
    assert limits.per_minute("requests") == pytest.approx(600, rel=0.03)


def test_a_daily_budget_is_a_budget_not_a_rate_and_stops_the_run_when_spent() -> None:
    limits = LaneLimits({"requests": None, "tokens": None})
    day = RefillingServer(14_400, 86_400.0)
    day.level = 30
    _drive(limits, day, 3.0, 5.0, 14_400)
    assert _learner(limits).is_budget
    assert limits.per_minute("requests") == pytest.approx(1500)  # paced by what 429s find, from the Cookbook's default
    assert limits.source("requests").startswith("stated nowhere")  # no 429 yet
    assert any("per day" in text for text in limits.budgets())
    assert limits.budget_exhausted(3.0) is None
    _drive(limits, day, 6.0, 5.0, 14_400)  # spends the last of it
    message = limits.budget_exhausted(6.0)
    assert message and "per day is spent" in message and "UTC" in message


def _simulate_aimd(limit_per_second: int, seconds: float, hint: bool = True, window: float = 1.0) -> Tuple[float, float]:
    """A client paced at what LaneLimits finds, against fixed windows of ``limit_per_second`` a second, no headers.

    A refused request says how long until its window ends (``hint``), or nothing: then the lane is
    held as the engine holds it. Returns (steady requests per second over the second half, share of 429s).
    """
    limits = LaneLimits({"requests": None, "tokens": None})
    limits.observe(None, 0.0)
    slices: Dict[int, int] = {}
    now, paused_until = 0.0, 0.0
    sent = refused = 0
    accepted_times = []
    while now < seconds:
        rate = limits.per_minute("requests") / 60.0
        now = max(now + 1.0 / rate, paused_until)
        limits.held_back("requests", now)  # the client always has more to send
        index = math.floor(now / window)
        sent += 1
        if slices.get(index, 0) < limit_per_second * window:
            slices[index] = slices.get(index, 0) + 1
            accepted_times.append(now)
            limits.observe(None, now)
        else:
            refused += 1
            limits.observe(None, now, rate_limited=True)
            wait = ((index + 1) * window - now) if hint else None
            limits.rate_limited("requests", wait, now)
            paused_until = now + (wait if wait is not None else limits.backoff_seconds("requests"))
    steady = [t for t in accepted_times if t >= seconds / 2]
    return len(steady) / (seconds / 2), refused / sent


@pytest.mark.parametrize("limit_per_second", [2, 10, 40])
def test_a_limit_no_header_states_is_found_from_429s(limit_per_second: int) -> None:
    rate, share_429 = _simulate_aimd(limit_per_second, 240.0)
    assert 0.8 * limit_per_second <= rate <= limit_per_second * 1.001
    assert share_429 <= 0.03


def test_a_minute_window_with_no_headers_and_no_wait_hint_is_not_cut_to_nothing() -> None:
    # 600 a minute counted per fixed minute: once spent, every request is refused until the minute ends,
    # and no answer says how long. The rate must not collapse while it refuses.
    rate, share_429 = _simulate_aimd(10, 600.0, hint=False, window=60.0)
    assert rate >= 0.7 * 10
    assert share_429 <= 0.03


def test_a_given_limit_stays_a_ceiling_and_a_lower_stated_one_wins() -> None:
    limits = LaneLimits({"requests": 300.0, "tokens": None})
    _drive(limits, RefillingServer(6000, 60.0), 5.0, 50.0, 6000)
    assert limits.in_force("requests") == 300.0 and limits.source("requests") == "given"
    limits = LaneLimits({"requests": 18_000.0, "tokens": None})
    _drive(limits, RefillingServer(6000, 60.0), 5.0, 50.0, 6000)
    assert limits.in_force("requests") == pytest.approx(6000, rel=0.02)
    assert limits.describe("requests").startswith("6,000 requests per min (learned from x-ratelimit headers)")
