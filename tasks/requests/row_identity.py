"""A row's identity: what makes two input rows the same paid request.

A row is identified by a digest of its request (method, full URL and JSON body, with the body's
keys sorted so that formatting does not matter) plus its occurrence number among identical
requests in input order. Sampling jobs repeat a row on purpose: N identical rows are N paid
answers, (digest, 0) to (digest, N - 1). Resume, the reuse of paid answers after an edited or
reordered input, and the deduplication of two runs all key on this identity. Metadata and a
Batch line's ``custom_id`` are not part of it: they are not sent, so they change no answer.

Usage:
    >>> digest = request_digest("POST", "https://api.openai.com/v1/embeddings", {"model": "m", "input": "hi"})
    >>> len(digest)
    32
    >>> counter = OccurrenceCounter()
    >>> counter.next(digest), counter.next(digest)
    (0, 1)

Pitfalls:
    - The URL is part of the identity: a job pointed at another endpoint pays again.
    - A body that orjson cannot serialise with sorted keys (an integer beyond 64 bits, a lone
      surrogate) falls back to the standard library, so every valid JSON line has a digest.
"""

# Standard library imports
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict

# Third-party imports
import orjson

# Hex characters of a digest (128 bits).
DIGEST_LENGTH = 32
# What a record holds in place of a digest when its row has none (an invalid line).
NO_DIGEST = "-"


def request_digest(method: str, url: str, body: Any) -> str:
    """The digest of one request: method, URL and body with sorted keys (32 hex characters)."""
    try:
        canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits, lone surrogates: the standard library, all in escapes
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")
    hasher = _hasher_of(method, url).copy()
    hasher.update(canonical)
    return hasher.hexdigest()[:DIGEST_LENGTH]


@functools.lru_cache(maxsize=256)  # a run has a few URLs, and digests every row
def _hasher_of(method: str, url: str) -> Any:
    """A hasher that has read a request's method and URL (copy it before use)."""
    return hashlib.sha256(f"{method.upper()} {url}\n".encode("utf-8"))


def is_digest(text: str) -> bool:
    """True for a well-formed digest."""
    return len(text) == DIGEST_LENGTH and all(char in "0123456789abcdef" for char in text)


@dataclass
class OccurrenceCounter:
    """Numbers identical requests in the order they are met: 0 for the first, 1 for the second...

    Attributes:
        seen: how many times each digest was met so far.
    """

    seen: Dict[str, int] = field(default_factory=dict)

    def next(self, digest: str) -> int:
        """The occurrence number of this meeting of ``digest``."""
        number = self.seen.get(digest, 0)
        self.seen[digest] = number + 1
        return number
