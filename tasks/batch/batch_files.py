"""Batch input files: the job's rows written as Batch API files, and the map from each line back to its row.

``plan_batch_files`` reads every shard once, in input order, and streams each row that has no
result yet into the batch file of its (endpoint, model): at most ``max_requests`` lines (50,000),
``max_bytes`` (200 MB) and, for embeddings, 50,000 inputs per file, and at most ``max_tokens``
estimated tokens when an enqueued-token cap is known. A full file is closed and a new one begun,
so memory stays flat whatever the input's size. Invalid lines get their error record in their
shard's part at once, as online; so does a Batch line whose ``custom_id`` an earlier line of
the job already used (the first keeps it). Each shard's end record is written as online.

Each batch file ``batch-00003.jsonl`` has a row map ``batch-00003.rows``, one line per request, in
the same order::

    "custom_id" TAB shard TAB line_index TAB digest TAB tokens TAB line_bytes TAB attempts TAB metadata

The ``custom_id`` of a cookbook line is its row identity (``<digest>-<occurrence>``,
``tasks.requests.row_identity``), so a rerun, an edit or a reorder keeps it; a Batch line keeps
its own. ``write_retry_files`` makes new files of rows to send again (after an expiry, a failed
batch or a retryable row error) from the old file's lines.

Usage:
    >>> plan = plan_batch_files(ledger, shards, parts, shape, request_url, estimator, BatchFileLimits())
    >>> plan.rows_planned, [entry.name for entry in ledger.files]
"""

# Standard library imports
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

# Local application imports
from tasks.batch.batch_ledger import BatchFile, BatchLedger
from tasks.reporting.metrics import StatusTracker
from tasks.requests import fast_json
from tasks.requests.request_formats import InvalidLine, ParsedRequest, RequestShape, parse_line
from tasks.requests.row_identity import NO_DIGEST
from tasks.requests.token_estimation import TokenEstimator
from tasks.shards.sharding import ShardSpec, iter_shard_lines
from tasks.storage.results_storage import PartWriter, read_part_state

# The Batch API's limits on one input file.
MAX_FILE_REQUESTS = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_EMBEDDING_INPUTS = 50_000
# Room left under the byte limit (the server may count a little differently).
BYTE_MARGIN = 0.95
# The endpoints the Batch API takes.
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses", "/v1/moderations")


@dataclass(frozen=True)
class BatchFileLimits:
    """How large one batch file may be.

    Attributes:
        max_requests: lines per file.
        max_bytes: bytes per file.
        max_embedding_inputs: inputs per embeddings file.
        max_tokens: per model, the estimated tokens one file may hold (an enqueued-token cap), or None.
    """

    max_requests: int = MAX_FILE_REQUESTS
    max_bytes: int = int(MAX_FILE_BYTES * BYTE_MARGIN)
    max_embedding_inputs: int = MAX_EMBEDDING_INPUTS
    max_tokens: Optional[Callable[[str], Optional[int]]] = None


@dataclass
class RowEntry:
    """One line of a row map.

    Attributes:
        custom_id: the custom_id in the batch file.
        shard: the shard index of its row.
        line_index: the row's line index inside the shard.
        digest: the row's request digest.
        tokens: its estimated tokens.
        line_bytes: its input line's length (for progress).
        attempts: how many batches it was answered in with a retryable error before this file.
        metadata: the cookbook line's metadata, or None; for a Batch line, None.
    """

    custom_id: str
    shard: int
    line_index: int
    digest: str
    tokens: int
    line_bytes: int
    attempts: int = 0
    metadata: Any = None

    def to_line(self) -> bytes:
        """The row map line (with its newline)."""
        metadata = b"-" if self.metadata is None else fast_json.dumps(self.metadata)
        fields = [fast_json.dumps(self.custom_id), str(self.shard).encode(),
                  str(self.line_index).encode(), self.digest.encode(), str(self.tokens).encode(),
                  str(self.line_bytes).encode(), str(self.attempts).encode(), metadata]
        return b"\t".join(fields) + b"\n"

    @classmethod
    def from_line(cls, raw: bytes) -> "RowEntry":
        """A row map line read back."""
        fields = raw.rstrip(b"\n").split(b"\t", 7)
        metadata = None if fields[7] == b"-" else fast_json.loads(fields[7])
        return cls(fast_json.loads(fields[0]), int(fields[1]), int(fields[2]),
                   fields[3].decode(), int(fields[4]), int(fields[5]), int(fields[6]), metadata)


@dataclass
class PlanResult:
    """What planning found.

    Attributes:
        trackers: each shard's counts (lines, rows, invalid lines, rows already done).
        rows_planned: rows written into batch files.
    """

    trackers: List[StatusTracker] = field(default_factory=list)
    rows_planned: int = 0


class CompactOccurrences:
    """Numbers identical requests in input order (0, 1, ...) in about 60 bytes a distinct request.

    ``tasks.requests.row_identity.OccurrenceCounter`` keeps every digest as a string (about 130 bytes
    each in a dict); a job of millions of rows would hold hundreds of megabytes. This keeps the first
    64 bits of each digest as an int in a set, and a count only for requests met more than once.
    Two different requests share 64 bits with a chance of about 3 in 100 million for a million rows.
    """

    def __init__(self) -> None:
        self.once: Set[int] = set()
        self.more: Dict[int, int] = {}

    def next(self, digest: str) -> int:
        """The occurrence number of this meeting of ``digest``."""
        key = int(digest[:16], 16)
        if key not in self.once:
            self.once.add(key)
            return 0
        number = self.more.get(key, 1)
        self.more[key] = number + 1
        return number


class _OpenFile:
    """A batch file being written: its ledger entry and its two handles."""

    def __init__(self, ledger: BatchLedger, entry: BatchFile) -> None:
        self.entry = entry
        self.input = open(ledger.path_of(entry, "input"), "wb")
        self.rows = open(ledger.path_of(entry, "rows"), "wb")
        self.inputs = 0

    def add(self, line: bytes, row: RowEntry, inputs: int) -> None:
        """Append one request line and its row map line."""
        self.input.write(line)
        self.rows.write(row.to_line())
        self.entry.rows += 1
        self.entry.tokens += row.tokens
        self.entry.size += len(line)
        self.inputs += inputs

    def fits(self, line_bytes: int, tokens: int, inputs: int, limits: BatchFileLimits) -> bool:
        """True when one more line of this size stays within the file's limits."""
        entry = self.entry
        if entry.rows == 0:
            return True
        cap = limits.max_tokens(entry.model) if limits.max_tokens else None
        return (entry.rows < limits.max_requests and entry.size + line_bytes <= limits.max_bytes
                and self.inputs + inputs <= limits.max_embedding_inputs
                and (cap is None or entry.tokens + tokens <= cap))

    def close(self) -> None:
        """Flush both files to disk."""
        for handle in (self.input, self.rows):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()


class BatchFileWriter:
    """Writes rows into batch files, one open file per (endpoint, model), starting a new one when full."""

    def __init__(self, ledger: BatchLedger, limits: BatchFileLimits, round_number: int = 0) -> None:
        self.ledger = ledger
        self.limits = limits
        self.round = round_number
        self.open: Dict[Tuple[str, str], _OpenFile] = {}
        self.created: List[BatchFile] = []

    def add(self, endpoint: str, model: str, body: Dict[str, Any], row: RowEntry) -> None:
        """Write one request into its group's current file."""
        line = fast_json.dumps({"custom_id": row.custom_id, "method": "POST", "url": endpoint, "body": body}) + b"\n"
        inputs = _embedding_inputs(body) if endpoint.endswith("/embeddings") else 0
        key = (endpoint, model)
        current = self.open.get(key)
        if current is not None and not current.fits(len(line), row.tokens, inputs, self.limits):
            self._close(key)
            current = None
        if current is None:
            current = self.open[key] = _OpenFile(self.ledger, self.ledger.new_file(model, endpoint, self.round))
            self.created.append(current.entry)
        current.add(line, row, inputs)

    def close(self) -> None:
        """Close every open file (their ledger entries are complete; the caller saves the ledger)."""
        for key in list(self.open):
            self._close(key)

    def _close(self, key: Tuple[str, str]) -> None:
        self.open.pop(key).close()


def plan_batch_files(ledger: BatchLedger, shards: Sequence[ShardSpec], part_paths: Sequence[str], shape: RequestShape,
                     request_url: str, estimator: TokenEstimator, limits: BatchFileLimits,
                     transport_params: Optional[Dict[str, Any]] = None) -> PlanResult:
    """Read every shard and write its unfinished rows into batch files; record them in the ledger.

    Files of an interrupted planning (not in the saved ledger) are written over: planning starts again.
    """
    result = PlanResult()
    writer = BatchFileWriter(ledger, limits)
    occurrences = CompactOccurrences()
    custom_ids: Dict[str, int] = {}  # a Batch line's custom_id -> the file line number (in shard terms) that has it
    for shard, part_path in zip(shards, part_paths):
        state = read_part_state(part_path)
        tracker = StatusTracker(shard=shard.index)
        with PartWriter(part_path) as part:
            for line_index, _, raw in iter_shard_lines(shard, transport_params):
                tracker.lines_read += 1
                if not raw.strip():
                    tracker.blank_lines += 1
                    continue
                tracker.rows += 1
                parsed = parse_line(raw, shape, request_url, line_index)
                done = state.done.get(line_index)
                if isinstance(parsed, ParsedRequest):
                    parsed = _batch_problem(parsed, raw, limits) or parsed
                if isinstance(parsed, ParsedRequest) and shape is RequestShape.BATCH and parsed.custom_id is not None:
                    first = custom_ids.setdefault(parsed.custom_id, _row_key(shard.index, line_index))
                    if first != _row_key(shard.index, line_index):
                        parsed = InvalidLine(line_index, f"custom_id {parsed.custom_id!r} is used by an earlier line "
                                                         "of the job; each row needs its own", raw.decode("utf-8", "replace"),
                                             parsed.custom_id)
                if done is not None and done == (NO_DIGEST if isinstance(parsed, InvalidLine) else parsed.digest):
                    tracker.resumed_rows += 1
                    if isinstance(parsed, ParsedRequest):
                        occurrences.next(parsed.digest)
                    continue
                if isinstance(parsed, InvalidLine):
                    tracker.invalid_lines += 1
                    part.write_invalid(parsed)
                    continue
                occurrence = occurrences.next(parsed.digest)
                custom_id = parsed.custom_id if shape is RequestShape.BATCH else f"{parsed.digest}-{occurrence}"
                try:
                    prompt, completion = estimator.estimate_parts(parsed.body, parsed.endpoint)
                except Exception:  # an odd body still goes: a size-based guess
                    prompt, completion = len(parsed.payload) // 4, 0
                tracker.tokens_estimated += prompt + completion
                row = RowEntry(custom_id, shard.index, line_index, parsed.digest, prompt + completion, len(raw),
                               metadata=parsed.metadata if shape is RequestShape.COOKBOOK else None)
                writer.add(endpoint_path(parsed.url), parsed.model or "", parsed.body, row)
                result.rows_planned += 1
            part.write_end(tracker.lines_read, tracker.rows)
        result.trackers.append(tracker)
    writer.close()
    ledger.planned = True
    ledger.save()
    return result


def iter_rows(ledger: BatchLedger, entry: BatchFile) -> Iterator[Tuple[RowEntry, bytes]]:
    """Each row of a batch file with its request line, in file order."""
    with open(ledger.path_of(entry, "rows"), "rb") as rows, open(ledger.path_of(entry, "input"), "rb") as lines:
        for raw_row in rows:
            yield RowEntry.from_line(raw_row), lines.readline()


def write_retry_files(ledger: BatchLedger, entry: BatchFile, again: Optional[Set[str]], limits: BatchFileLimits,
                      attempts_used: Set[str], round_number: Optional[int] = None) -> List[BatchFile]:
    """New batch files holding the rows of ``entry`` whose custom_id is in ``again`` (None: all of them).

    Args:
        again: the custom_ids to send again, or None for every row (a split).
        attempts_used: those of them whose try counted as an attempt (a retryable row error; not an
            expiry or a cancel, which never ran the row).
        round_number: the new files' round (default: the next one).

    Returns:
        The new files' entries (already in the ledger; the caller saves it).
    """
    writer = BatchFileWriter(ledger, limits, entry.round + 1 if round_number is None else round_number)
    for row, line in iter_rows(ledger, entry):
        if again is not None and row.custom_id not in again:
            continue
        if row.custom_id in attempts_used:
            row.attempts += 1
        request = fast_json.loads(line)
        writer.add(entry.endpoint, entry.model, request["body"], row)
    writer.close()
    return writer.created


def endpoint_path(url: str) -> str:
    """The API path of a request URL from its ``/v1`` segment on (``/v1/chat/completions``)."""
    path = url.split("?", 1)[0]
    cut = path.find("/v1/")
    if cut >= 0:
        return path[cut:]
    for name in ("/chat/completions", "/embeddings", "/completions", "/responses", "/moderations"):
        if path.endswith(name):
            return "/v1" + name
    return path


def _batch_problem(parsed: ParsedRequest, raw: bytes, limits: BatchFileLimits) -> Optional[InvalidLine]:
    """The row's error when the Batch API cannot take it at all (its endpoint, or a file of it alone is too large)."""
    endpoint = endpoint_path(parsed.url)
    reason = None
    if not isinstance(parsed.model, str) or not parsed.model.strip():
        reason = "a batch request needs a \"model\" (each batch file holds the requests of one model)"
    elif endpoint not in BATCH_ENDPOINTS:
        reason = f"the Batch API does not take {endpoint} (it takes {', '.join(BATCH_ENDPOINTS)}); run it with --mode online"
    elif endpoint.endswith("/embeddings") and _embedding_inputs(parsed.body) > limits.max_embedding_inputs:
        reason = (f"{_embedding_inputs(parsed.body):,} embedding inputs in one request; a batch file holds at most "
                  f"{limits.max_embedding_inputs:,}")
    elif len(raw) + 100 > limits.max_bytes:
        reason = f"a request of {len(raw):,} bytes; a batch file holds at most {limits.max_bytes:,}"
    if reason is None:
        return None
    return InvalidLine(parsed.line_index, reason, raw.decode("utf-8", "replace"), parsed.custom_id)


def _embedding_inputs(body: Dict[str, Any]) -> int:
    """How many inputs an embeddings body holds."""
    value = body.get("input")
    if isinstance(value, list) and value and not all(isinstance(item, int) for item in value):
        return len(value)
    return 1


def _row_key(shard: int, line_index: int) -> int:
    """One number for a row's place (shard, line)."""
    return (shard << 40) | line_index
