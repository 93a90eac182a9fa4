"""Every rate-limit header dialect a server may speak, read into one shape: ``ServerLimits``.

A reading says, per dimension (requests, tokens, input tokens, output tokens), the limit the
server states, what remains, and when the budget is whole again, as an absolute time on the
engine's clock whatever the header's format. No window is assumed here: ``limit_learning``
derives it from what the readings do over time.

Dialects read (header names are case-insensitive):

    ======================  ==================================================================
    dialect                 headers
    ======================  ==================================================================
    ``x-ratelimit``         OpenAI, Azure OpenAI, Groq and most compatibles:
                            ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; the
                            reset is a duration (``1s``, ``6m0s``, ``12ms``) or seconds
    ``anthropic``           ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
                            {limit,remaining,reset}``; the reset is an RFC 3339 time
    ``ietf``                ``RateLimit-Policy: "default";q=100;w=60`` with
                            ``RateLimit: "default";r=50;t=30`` (draft 8 and later), the draft-7
                            ``RateLimit: limit=100, remaining=50, reset=30``, and the older
                            ``RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` (+ ``-Policy: 100;w=60``)
    ``x-ratelimit-window``  ``X-RateLimit-Limit: 100, 100;window=60`` with ``X-RateLimit-Remaining``
                            and ``X-RateLimit-Reset`` (seconds, or an epoch time)
    ======================  ==================================================================

A reset may be a duration, plain seconds, an RFC 3339 or HTTP date, or epoch seconds (a number
above ``EPOCH_THRESHOLD``). A 429's wait hint also comes from ``retry-after-ms``, ``Retry-After``
and a Gemini-style ``retryDelay`` in the error body (``retry_hint``).

Usage:
    >>> limits = read_limits({"x-ratelimit-limit-requests": "20", "x-ratelimit-remaining-requests": "19",
    ...                       "x-ratelimit-reset-requests": "1.379s"}, now=100.0, wall_now=1.7e9)
    >>> limits.requests.reset_at      # 101.379, on the engine's clock
    >>> limits.dialect                # 'x-ratelimit'
"""

# Standard library imports
import dataclasses
import datetime
import email.utils
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

# The dimensions a server may state a limit for.
DIMENSIONS = ("requests", "tokens", "input_tokens", "output_tokens")
# A reset value above this is an epoch time, not a number of seconds (2001-09-09).
EPOCH_THRESHOLD = 1_000_000_000.0
# A reset further away than this is not believed (no server's budget lasts longer): it is ignored.
LONGEST_RESET_SECONDS = 400 * 86400.0
# One part of a Go-style duration such as "6m0s" or "83ms".
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s|d)")
_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
# One item of a structured header list: a name or number, then ;key=value parameters.
_PARAMETER = re.compile(r'\s*;\s*([A-Za-z0-9_*-]+)\s*=\s*("[^"]*"|[^;,\s]+)')


@dataclass(frozen=True)
class LimitReading:
    """What one answer says of one dimension (None where it says nothing).

    Attributes:
        limit: the limit the server states (over a window this reading does not always say).
        remaining: what is left of the budget now.
        reset_at: when the budget is whole again, on the engine's clock (absolute).
        window_seconds: the window, when the header states it (IETF ``w=``, ``window=``).
        resolution: how coarse the reset is, in seconds (1.0 for whole seconds or RFC 3339 times).
    """

    limit: Optional[float] = None
    remaining: Optional[float] = None
    reset_at: Optional[float] = None
    window_seconds: Optional[float] = None
    resolution: float = 0.001

    @property
    def says_anything(self) -> bool:
        """True when the reading states a limit or what remains."""
        return self.limit is not None or self.remaining is not None


@dataclass(frozen=True)
class ServerLimits:
    """One answer's rate-limit headers, in whatever dialect, read into one shape.

    Attributes:
        dialect: which dialect they were in ("x-ratelimit", "anthropic", "ietf", "x-ratelimit-window").
        observed_at: when the answer arrived, on the engine's clock.
        requests, tokens, input_tokens, output_tokens: each dimension's reading, or None.
        latency: seconds from sending the request to the answer: the server made these headers
            somewhere in that span, so a reset placed from ``observed_at`` may be that much late.
    """

    dialect: str
    observed_at: float
    requests: Optional[LimitReading] = None
    tokens: Optional[LimitReading] = None
    input_tokens: Optional[LimitReading] = None
    output_tokens: Optional[LimitReading] = None
    latency: float = 0.0

    def reading(self, dimension: str) -> Optional[LimitReading]:
        """The reading of ``dimension`` (one of ``DIMENSIONS``)."""
        return getattr(self, dimension)

    def reset_in(self, dimension: str) -> Optional[float]:
        """Seconds from the answer until ``dimension``'s budget is whole again, if the answer said."""
        reading = self.reading(dimension)
        if reading is None or reading.reset_at is None:
            return None
        return max(0.0, reading.reset_at - self.observed_at)


def read_limits(headers: Mapping[str, str], now: float, wall_now: float,
                latency: float = 0.0) -> Optional[ServerLimits]:
    """Read an answer's rate-limit headers in any dialect; None when it has none.

    Args:
        headers: the answer's headers (a case-insensitive mapping, or lower-case names).
        now: the engine's clock when the answer arrived (resets are placed on it).
        wall_now: the wall clock (``time.time()``) at the same moment, for dates and epoch times.
        latency: seconds from sending the request to ``now``.
    """
    lowered = "\n".join(headers).lower()
    if "ratelimit" not in lowered:  # the usual answer of a server without limit headers: nothing to parse
        return None
    names = [name for name in lowered.split("\n") if "ratelimit" in name]
    wrapped = _Headers(headers)
    for prefix, reader in _READERS:
        if any(name.startswith(prefix) for name in names):
            limits = reader(wrapped, now, wall_now)
            if limits is not None:
                return dataclasses.replace(limits, latency=max(0.0, latency)) if latency else limits
    return None


def parse_reset(text: Optional[str], wall_now: float) -> Optional[Tuple[float, float]]:
    """Seconds from now until a reset, and the reset's resolution; None when unreadable.

    Reads a duration ("1s", "6m0s", "12ms", "1h2m3.5s"), plain seconds ("0.5", "30"), epoch
    seconds (above ``EPOCH_THRESHOLD``), an RFC 3339 time ("2026-12-02T10:00:00Z") or an HTTP date.
    """
    parsed = _parse_reset(text, wall_now)
    if parsed is None or not parsed[0] <= LONGEST_RESET_SECONDS:
        return None
    return parsed


def _parse_reset(text: Optional[str], wall_now: float) -> Optional[Tuple[float, float]]:
    """``parse_reset`` without the check that the reset is believable."""
    if not text:
        return None
    text = text.strip().strip('"')
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if value != value or value in (float("inf"), float("-inf")):
            return None
        resolution = 1.0 if "." not in text else 0.001
        if value > EPOCH_THRESHOLD:
            return max(0.0, value - wall_now), resolution
        return max(0.0, value), resolution
    seconds = parse_duration(text)
    if seconds is not None:
        return seconds, 0.001
    moment = _parse_time(text)
    if moment is not None:
        whole = moment == int(moment)
        return max(0.0, moment - wall_now), (1.0 if whole else 0.001)
    return None


def parse_duration(text: Optional[str]) -> Optional[float]:
    """Parse "1s", "6m0s", "83ms", "1h2m3.5s" or plain seconds ("0.5") into seconds; None when unreadable."""
    if not text:
        return None
    text = text.strip()
    try:
        value = float(text)
        return max(0.0, value) if value == value else None
    except ValueError:
        pass
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    return total if position == len(text) and position > 0 else None


def retry_hint(headers: Mapping[str, str], body: Any, wall_now: float) -> Optional[float]:
    """The wait in seconds a rate-limit answer asks for, uncapped; None when it says nothing usable.

    ``retry-after-ms``, then ``Retry-After`` (seconds or an HTTP date), then a ``retryDelay`` in
    the body (Gemini: ``{"error": {"details": [{"retryDelay": "32s"}]}}``, also inside a list).
    """
    lowered = _Headers(headers)
    milliseconds = _number(lowered.get("retry-after-ms"))
    if milliseconds is not None:
        return max(0.0, milliseconds / 1000.0)
    retry_after = lowered.get("retry-after")
    if retry_after:
        parsed = parse_reset(retry_after, wall_now)
        if parsed is not None:
            return parsed[0]
    return _body_retry_delay(body)


# The dialects


class _Headers:
    """Case-insensitive access to a header mapping."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._headers = headers
        self._lowered: Optional[Dict[str, str]] = None

    def get(self, name: str) -> Optional[str]:
        value = self._headers.get(name)
        if value is None and not hasattr(self._headers, "getall"):  # a plain dict: try other spellings
            if self._lowered is None:
                self._lowered = {key.lower(): item for key, item in self._headers.items()}
            value = self._lowered.get(name)
        return value


def _reading(limit: Optional[str], remaining: Optional[str], reset: Optional[str], now: float, wall_now: float,
             window: Optional[float] = None) -> Optional[LimitReading]:
    """A reading from the three texts of one dimension; None when none is readable."""
    parsed = parse_reset(reset, wall_now)
    reading = LimitReading(limit=_positive(limit), remaining=_count(remaining),
                           reset_at=None if parsed is None else now + parsed[0],
                           window_seconds=window, resolution=1.0 if parsed is None else parsed[1])
    return reading if reading.says_anything else None


def _read_x_ratelimit(headers: _Headers, now: float, wall_now: float) -> Optional[ServerLimits]:
    """OpenAI's ``x-ratelimit-*-requests`` / ``-tokens`` (also Azure, Groq, most compatibles)."""
    readings = {scope: _reading(headers.get(f"x-ratelimit-limit-{scope}"), headers.get(f"x-ratelimit-remaining-{scope}"),
                                headers.get(f"x-ratelimit-reset-{scope}"), now, wall_now)
                for scope in ("requests", "tokens")}
    if not any(readings.values()):
        return None
    return ServerLimits("x-ratelimit", now, **readings)


def _read_anthropic(headers: _Headers, now: float, wall_now: float) -> Optional[ServerLimits]:
    """Anthropic's ``anthropic-ratelimit-<dimension>-{limit,remaining,reset}``."""
    readings = {}
    for dimension in DIMENSIONS:
        prefix = f"anthropic-ratelimit-{dimension.replace('_', '-')}"
        readings[dimension] = _reading(headers.get(f"{prefix}-limit"), headers.get(f"{prefix}-remaining"),
                                       headers.get(f"{prefix}-reset"), now, wall_now)
    if not any(readings.values()):
        return None
    return ServerLimits("anthropic", now, **readings)


def _read_ietf(headers: _Headers, now: float, wall_now: float) -> Optional[ServerLimits]:
    """The IETF RateLimit fields: the structured draft-8+ form, draft 7's one field, or the older three."""
    policy_text, state_text = headers.get("ratelimit-policy"), headers.get("ratelimit")
    readings: Dict[str, Optional[LimitReading]] = {}
    if state_text and ("r=" in state_text or "q=" in (policy_text or "")):
        policies = {name: params for name, params in _items(policy_text or "")}
        for name, params in _items(state_text):
            policy = policies.get(name, {})
            dimension = "tokens" if "token" in name.lower() else "requests"
            window = _positive(policy.get("w"))
            reading = _reading(policy.get("q"), params.get("r"), params.get("t"), now, wall_now, window)
            if reading is not None and _smaller_window(reading, readings.get(dimension)):
                readings[dimension] = reading
    elif state_text and "remaining=" in state_text:
        fields = dict(part.strip().split("=", 1) for part in state_text.split(",") if "=" in part)
        window = _policy_window(policy_text)
        readings["requests"] = _reading(fields.get("limit"), fields.get("remaining"), fields.get("reset"), now,
                                        wall_now, window)
    else:
        limit = headers.get("ratelimit-limit")
        readings["requests"] = _reading(limit.split(",")[0] if limit else None, headers.get("ratelimit-remaining"),
                                        headers.get("ratelimit-reset"), now, wall_now,
                                        _policy_window(policy_text) or _policy_window(limit))
    if not any(readings.values()):
        return None
    return ServerLimits("ietf", now, **readings)


def _read_x_ratelimit_window(headers: _Headers, now: float, wall_now: float) -> Optional[ServerLimits]:
    """``X-RateLimit-Limit: 100, 100;window=60`` with ``X-RateLimit-Remaining`` / ``-Reset``."""
    limit = headers.get("x-ratelimit-limit")
    reading = _reading(limit.split(",")[0] if limit else None, headers.get("x-ratelimit-remaining"),
                       headers.get("x-ratelimit-reset"), now, wall_now, _policy_window(limit))
    return None if reading is None else ServerLimits("x-ratelimit-window", now, requests=reading)


# The dialects in the order they are tried, each with the prefix all of its header names share.
_READERS = (("x-ratelimit-", _read_x_ratelimit), ("anthropic-ratelimit-", _read_anthropic), ("ratelimit", _read_ietf),
            ("x-ratelimit-", _read_x_ratelimit_window))


# Helpers


def _items(text: str) -> List[Tuple[str, Dict[str, str]]]:
    """The items of a structured header list: ``"name";k=v;k=v, ...`` as (name, {k: v})."""
    items = []
    for part in _split_list(text):
        head = part.split(";", 1)[0].strip().strip('"')
        params = {key.lower(): value.strip('"') for key, value in _PARAMETER.findall(part[len(part.split(";", 1)[0]):])}
        items.append((head, params))
    return items


def _split_list(text: str) -> List[str]:
    """Split a header list on commas outside quotes."""
    parts, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part for part in parts if part.strip()]


def _policy_window(text: Optional[str]) -> Optional[float]:
    """The shortest window a policy text states (``100;w=60``, ``100, 100;window=60``), if any."""
    if not text:
        return None
    windows = [_positive(value) for key, value in _PARAMETER.findall(text) if key.lower() in ("w", "window")]
    known = [window for window in windows if window is not None]
    return min(known) if known else None


def _smaller_window(reading: LimitReading, other: Optional[LimitReading]) -> bool:
    """True when ``reading`` describes a shorter window than ``other`` (the pace-setting one wins)."""
    if other is None:
        return True
    return (reading.window_seconds or float("inf")) < (other.window_seconds or float("inf"))


def _parse_time(text: str) -> Optional[float]:
    """Epoch seconds of an RFC 3339 time or an HTTP date; None when it is neither."""
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _body_retry_delay(body: Any) -> Optional[float]:
    """A Gemini-style ``retryDelay`` ("32s") anywhere in an error body's details."""
    if isinstance(body, list) and body:
        body = body[0]
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and detail.get("retryDelay") is not None:
            return parse_duration(str(detail["retryDelay"]))
    return None


def _number(text: Optional[str]) -> Optional[float]:
    """A header's finite number, or None."""
    try:
        value = float(text.strip().strip('"')) if text else None
    except ValueError:
        return None
    return value if value is not None and abs(value) != float("inf") and value == value else None


def _positive(text: Optional[str]) -> Optional[float]:
    """A header's number of at least one, or None (a limit below one unit says nothing usable)."""
    value = _number(text)
    return value if value is not None and value >= 1 else None


def _count(text: Optional[str]) -> Optional[float]:
    """A remaining count: a number, never below zero."""
    value = _number(text)
    return None if value is None else max(0.0, value)
