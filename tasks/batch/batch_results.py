"""A finished batch's output and error files, read back into each row's result record.

The Batch API returns results in any order, joined by ``custom_id``. ``collect_batch_results``
indexes the batch file's row map (custom_id to the byte offsets of its row map line and its
request line: two numbers a row, so memory stays flat), then streams the downloaded output and
error files and writes each row's final record into its shard's part, exactly as the online
engine would have (``tasks.storage.results_storage``):

    2xx answer                                   success: usage counted at batch prices
    400, 404, 422 and other 4xx answers          that row's error, final
    5xx, 408, 409, 429 answers, other errors     sent again in a new batch, up to ``max_attempts`` answers
    ``batch_expired``, ``batch_cancelled``,      sent again (the row never ran: no attempt used)
    or a row in neither file
    a line the batch's validation refused        that row's error, final (``errors.data[].line``)
    (the batch failed)
    the batch failed as a whole                  its other rows: sent again, each using an attempt

A collection a crash cut off is done again: rows whose record it already wrote are skipped
(``already_done``), so each is counted once.

A line naming a custom_id the file does not hold, or one already answered, is ignored (logged):
each row gets exactly one result.

Usage:
    >>> collected = collect_batch_results(ledger, entry, RequestShape.COOKBOOK, parts, trackers, prices, 5,
    ...                                   progress, errors, logger)
    >>> collected.again            # custom_ids to send again
"""

# Standard library imports
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Sequence, Set, Tuple

# Local application imports
from tasks.batch.batch_files import RowEntry
from tasks.batch.batch_ledger import BatchFile, BatchLedger
from tasks.reporting.metrics import RunProgress, StatusTracker
from tasks.requests import fast_json
from tasks.requests.pricing import PriceTable
from tasks.requests.request_formats import ParsedRequest, RequestShape, format_result
from tasks.shards.request_sender import Usage
from tasks.shards.run_state import ErrorExamples
from tasks.storage.results_storage import PartWriter

# Error codes of rows that never ran: sent again without using an attempt.
CUT_OFF_CODES = frozenset({"batch_expired", "batch_cancelled"})
# Statuses of answers worth another batch.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


@dataclass
class CollectedBatch:
    """What one batch's results gave.

    Attributes:
        again: custom_ids of rows to send again.
        attempts_used: those of them whose answer used an attempt.
        answered: rows that got their final record.
        ignored_lines: result lines naming no row of the file, or a row already answered.
    """

    again: Set[str] = field(default_factory=set)
    attempts_used: Set[str] = field(default_factory=set)
    answered: int = 0
    ignored_lines: int = 0


def collect_batch_results(ledger: BatchLedger, entry: BatchFile, shape: RequestShape, parts: Dict[int, PartWriter],
                          trackers: Dict[int, StatusTracker], prices: PriceTable, max_attempts: int,
                          progress: RunProgress, errors: ErrorExamples, logger: Any,
                          batch_errors: Sequence[Any] = (), failure: Optional[str] = None, failure_final: bool = False,
                          already_done: Optional[Set[Tuple[int, int]]] = None) -> CollectedBatch:
    """Write the final record of every row a finished batch settled; say which rows go again.

    Args:
        ledger: the job's ledger.
        entry: the batch file, with its output and error files downloaded (absent ones: no lines).
        shape: the input's shape (it decides the output lines' form).
        parts: the part writers, by shard index.
        trackers: the shards' counts, by shard index.
        prices: the price table (batch prices are used).
        max_attempts: how many answers a row may get, at most, on retryable failures.
        progress: advanced by each settled row's input bytes.
        errors: the run's error examples.
        logger: for ignored lines.
        batch_errors: the batch's ``errors.data``; an item with a ``line`` (1-based, in the input file)
            is that row's error, final.
        failure: why the batch failed as a whole, or None: its other rows go again, each using an attempt
            (with ``failure_final``: each gets this error, final).
        already_done: (shard, line index) of rows whose record an interrupted collection of this batch
            already wrote: they are not written or counted again.
    """
    collected = CollectedBatch()
    index = _index_rows(ledger, entry)
    line_errors = _line_errors(batch_errors, entry.rows)
    settled: Set[str] = set()
    with open(ledger.path_of(entry, "rows"), "rb") as rows, open(ledger.path_of(entry, "input"), "rb") as lines:
        def row_of(custom_id: str) -> Tuple[RowEntry, Any]:
            place = index[custom_id]
            rows.seek(place[0])
            row = RowEntry.from_line(rows.readline())
            lines.seek(place[1])
            return row, fast_json.loads(lines.readline())["body"]

        for result in _result_lines(ledger, entry):
            custom_id = result.get("custom_id") if isinstance(result, dict) else None
            place = index.get(custom_id) if isinstance(custom_id, str) else None
            if place is None or custom_id in settled:
                collected.ignored_lines += 1
                continue
            settled.add(custom_id)
            row, body = row_of(custom_id)
            if already_done is not None and (row.shard, row.line_index) in already_done:
                collected.answered += 1
                continue
            final = _settle(result, row, body, entry, shape, parts, trackers, prices, max_attempts, errors, collected)
            if final:
                collected.answered += 1
                progress.advance(row.line_bytes, rows=1)
        for custom_id in [custom_id for custom_id in index if custom_id not in settled]:  # in neither file
            row, body = row_of(custom_id)
            if already_done is not None and (row.shard, row.line_index) in already_done:
                collected.answered += 1
                continue
            line_error = line_errors.get(index[custom_id][2])
            if line_error is None and failure is not None and failure_final:
                line_error = ("batch_refused", failure)
            if line_error is not None:
                result = {"custom_id": custom_id, "error": {"code": line_error[0], "message": line_error[1]}}
                _settle(result, row, body, entry, shape, parts, trackers, prices, max_attempts, errors, collected,
                        final_error=True)
            elif failure is not None:
                result = {"custom_id": custom_id, "error": {"code": "batch_failed", "message": failure}}
                if not _settle(result, row, body, entry, shape, parts, trackers, prices, max_attempts, errors, collected):
                    continue
            else:
                collected.again.add(custom_id)  # never ran (an expiry, a cancel, a lost line): no attempt used
                continue
            collected.answered += 1
            progress.advance(row.line_bytes, rows=1)
    if collected.ignored_lines:
        logger.warning("%s (batch %s): %d result lines named no row of the file, or one already answered; ignored",
                       entry.name, entry.batch_id, collected.ignored_lines)
    return collected


def _settle(result: Dict[str, Any], row: RowEntry, body: Any, entry: BatchFile, shape: RequestShape,
            parts: Dict[int, PartWriter], trackers: Dict[int, StatusTracker], prices: PriceTable, max_attempts: int,
            errors: ErrorExamples, collected: CollectedBatch, final_error: bool = False) -> bool:
    """Decide one result line; write the row's record when final. True when final.

    ``final_error``: the line's error is the row's own (a line the batch's validation refused): final.
    """
    response = result.get("response") if isinstance(result.get("response"), dict) else None
    error = result.get("error") if isinstance(result.get("error"), dict) else None
    status = response.get("status_code") if response else None
    answer = response.get("body") if response else None
    request_id = response.get("request_id") if response else None
    tracker = trackers[row.shard]
    request = ParsedRequest(row.line_index, entry.endpoint, "POST", body, b"", metadata=row.metadata,
                            custom_id=row.custom_id, digest=row.digest)
    if isinstance(status, int) and 200 <= status < 300 and error is None:
        tracker.succeeded += 1
        usage = Usage.of(answer)
        if usage is not None:
            tracker.prompt_tokens_used += usage.prompt_tokens
            tracker.completion_tokens_used += usage.completion_tokens
            cost = prices.cost(entry.model, usage.prompt_tokens, usage.completion_tokens, batch=True)
            if cost is None:
                tracker.unpriced_requests += 1
            else:
                tracker.cost_usd += cost
        output = format_result(request, shape, status, answer, request_id, None, None)
        parts[row.shard].write_result(row.line_index, row.digest, output)
        return True
    code, message = _error_text(answer, error)
    text = f"HTTP {status} {code or 'error'}: {message}" if status is not None else f"{code or 'error'}: {message}"
    if status is None and code in CUT_OFF_CODES and not final_error:
        collected.again.add(row.custom_id)
        return False
    retryable = not final_error and (status is None or status >= 500 or status in RETRYABLE_STATUSES)
    if retryable and row.attempts + 1 < max_attempts:
        collected.again.add(row.custom_id)
        collected.attempts_used.add(row.custom_id)
        tracker.note_retry(code or f"http_{status}")
        return False
    if retryable:
        tracker.failed_after_retries += 1
    else:
        tracker.failed_invalid_request += 1
    errors.note(text)
    output = format_result(request, shape, status, answer, request_id, [text], code or "request_failed")
    parts[row.shard].write_result(row.line_index, row.digest, output, answered=status is not None)
    return True


def _line_errors(batch_errors: Sequence[Any], rows: int) -> Dict[int, Tuple[str, str]]:
    """The batch's errors that name an input line: 0-based line -> (code, message)."""
    found: Dict[int, Tuple[str, str]] = {}
    for error in batch_errors:
        line = error.get("line") if isinstance(error, dict) else None
        if isinstance(line, int) and not isinstance(line, bool) and 1 <= line <= rows:
            found.setdefault(line - 1, (str(error.get("code") or "invalid_request"),
                                        f"refused by the batch's validation: {str(error.get('message') or '')[:500]}"))
    return found


def _index_rows(ledger: BatchLedger, entry: BatchFile) -> Dict[str, Tuple[int, int, int]]:
    """custom_id -> (offset of its row map line, offset of its request line, its 0-based line number)."""
    index: Dict[str, Tuple[int, int, int]] = {}
    with open(ledger.path_of(entry, "rows"), "rb") as rows, open(ledger.path_of(entry, "input"), "rb") as lines:
        row_offset = line_offset = 0
        for number, raw_row in enumerate(rows):
            raw_line = lines.readline()
            custom_id = fast_json.loads(raw_row.split(b"\t", 1)[0])
            index[custom_id] = (row_offset, line_offset, number)
            row_offset += len(raw_row)
            line_offset += len(raw_line)
    return index


def _result_lines(ledger: BatchLedger, entry: BatchFile) -> Iterator[Any]:
    """The lines of the downloaded output file, then of the error file (absent files: none)."""
    for kind in ("output", "errors"):
        path = ledger.path_of(entry, kind)
        if not os.path.exists(path):
            continue
        with open(path, "rb") as handle:
            for raw in handle:
                if raw.strip():
                    try:
                        yield fast_json.loads(raw)
                    except ValueError:
                        yield None


def _error_text(answer: Any, error: Optional[Dict[str, Any]]) -> Tuple[Optional[str], str]:
    """(code, message) of a failed row: from the batch line's ``error``, else from the answer's body."""
    if error is not None:
        return error.get("code"), str(error.get("message") or "")[:500]
    inner = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(inner, dict):
        return inner.get("code") or inner.get("type"), str(inner.get("message") or "")[:500]
    return None, "the batch answered with no body"
