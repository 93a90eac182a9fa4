"""Splitting a request file into shards by byte range, and reading one shard's lines.

A shard is a half-open byte range ``[start, end)`` of the input. A line belongs to the shard
that holds its first byte. Every line therefore lands in exactly one shard, whatever the
boundaries cut through, and no shard reads more than its range plus the end of its last
line. Shard readers open the file on their own and seek. Sharding reads nothing up front.

Usage:
    >>> shards = plan_shards("requests.jsonl", shard_count=None)   # count follows the size
    >>> for line_index, offset, raw in iter_shard_lines(shards[0]):
    ...     print(line_index, offset, raw)

Pitfalls:
    - Line indexes are counted per shard (blank lines included). The file's line number is the
      shard's ``first_line_number`` plus the index; it is known only after the shards before it
      have been read, which the final assembly does.
    - Lines are bytes, split on ``\\n`` only (``str.splitlines()`` also splits on U+2028).
"""

# Standard library imports
import math
from dataclasses import dataclass
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Tuple

# Local application imports
from tasks.requests.request_formats import RequestShape, detect_shape
from tasks.storage.uris import input_size, open_input, open_range

# How many bytes of input one shard gets when the count is not given.
BYTES_PER_SHARD = 8 * 1024 * 1024
# The most shards the automatic count chooses (a flag can ask for more).
MAX_AUTOMATIC_SHARDS = 64


@dataclass(frozen=True)
class ShardSpec:
    """One shard of an input file.

    Attributes:
        source: the input's path or URI.
        index: the shard's number, from 0.
        count: how many shards the input has.
        start: the first byte of the range.
        end: the byte after the range.
    """

    source: str
    index: int
    count: int
    start: int
    end: int

    @property
    def label(self) -> str:
        """A short name for logs and run names, such as "shard 3/8 bytes 100-200"."""
        return f"shard {self.index + 1}/{self.count} bytes {self.start}-{self.end}"


def plan_shards(source: str, shard_count: Optional[int] = None, size: Optional[int] = None,
                transport_params: Optional[Dict[str, Any]] = None) -> List[ShardSpec]:
    """Split an input into byte ranges of about equal size.

    Args:
        source: a path or a URI that smart-open reads.
        shard_count: how many shards; None to follow the size (one per 8 MiB, at most 64).
        size: the input's size in bytes, when already known.

    Returns:
        The shards, in input order. An empty input gives one empty shard.

    Raises:
        ValueError: when shard_count is below 1.
    """
    if size is None:
        size = input_size(source, transport_params)
    if shard_count is None:
        shard_count = default_shard_count(size)
    if shard_count < 1:
        raise ValueError(f"the number of shards must be at least 1, got {shard_count}")
    shard_count = max(1, min(shard_count, size)) if size else 1
    bounds = [size * index // shard_count for index in range(shard_count + 1)]
    return [ShardSpec(source, index, shard_count, bounds[index], bounds[index + 1]) for index in range(shard_count)]


def default_shard_count(size: int) -> int:
    """One shard per 8 MiB of input, at least 1 and at most 64."""
    return max(1, min(MAX_AUTOMATIC_SHARDS, math.ceil(size / BYTES_PER_SHARD)))


def iter_shard_lines(shard: ShardSpec, transport_params: Optional[Dict[str, Any]] = None) -> Iterator[Tuple[int, int, bytes]]:
    """Yield ``(line_index, byte_offset, raw_line)`` for every line that starts in the shard.

    Raw lines keep their line ending. Blank lines are yielded too, so indexes count every line.
    Only the shard's range is read (plus the end of its last line), with ranged reads on URIs.
    """
    if shard.start >= shard.end:
        return
    with open_range(shard.source, max(0, shard.start - 1), shard.end, transport_params) as handle:
        yield from _lines_in_range(handle, shard.start, shard.end)


def detect_source_shape(source: str, transport_params: Optional[Dict[str, Any]] = None) -> RequestShape:
    """The input's shape, decided on its first complete line that parses, whatever its length."""
    with open_input(source, transport_params) as handle:
        return detect_shape(handle)


# Helpers


def _lines_in_range(handle: BinaryIO, start: int, end: int) -> Iterator[Tuple[int, int, bytes]]:
    """Yield the lines whose first byte lies in ``[start, end)``; ``handle`` is at ``max(0, start - 1)``."""
    if start == 0:
        offset = 0
    else:
        # The line holding byte start-1 belongs to the shard before; it ends at or after it.
        offset = start - 1 + len(handle.readline())
    line_index = 0
    while offset < end:
        raw = handle.readline()
        if not raw:
            return
        yield line_index, offset, raw
        line_index += 1
        offset += len(raw)
