"""Recording each row's final result: the record a row ends with, written to its shard's part file.

A row ends in one of four ways: the server answered (success or a final error), it was sent and
never answered (timeouts, resets), it was decided here before anything was paid (no price under a
budget, too large for the limit, an internal error), or its line was invalid. ``RowResult`` is
that ending; ``ResultRecorder`` writes it, advances the run's progress, and keeps error examples.

Usage:
    >>> recorder = ResultRecorder(part, shape, progress, errors, logger, shard)
    >>> recorder.record(request, line_bytes, RowResult.answer(api_result))
    >>> recorder.record(request, line_bytes, RowResult.local("request_too_large", str(error)))
"""

# Standard library imports
import os
from dataclasses import dataclass
from typing import Any, List, Optional

# Local application imports
from tasks.api.api_client import ApiResult
from tasks.reporting.metrics import RunProgress
from tasks.requests.request_formats import InvalidLine, ParsedRequest, RequestShape, format_result
from tasks.shards.run_state import ErrorExamples
from tasks.shards.sharding import ShardSpec
from tasks.storage.results_storage import PartWriter


@dataclass(slots=True)
class RowResult:
    """How one row ended.

    Attributes:
        status: the last HTTP status, or None when no answer arrived (or nothing was sent).
        body: the last answer's JSON body, or None.
        request_id: the server's request id, or None.
        errors: None on success; otherwise one text per failed attempt (or the local reason).
        error_code: a short code for the failure (the Batch output's ``error.code``).
        local: True when decided here before anything was paid (decided again by the next run).
    """

    status: Optional[int] = None
    body: Any = None
    request_id: Optional[str] = None
    errors: Optional[List[str]] = None
    error_code: Optional[str] = None
    local: bool = False

    @classmethod
    def answer(cls, result: ApiResult, errors: Optional[List[str]] = None) -> "RowResult":
        """The server's last answer: a success (no ``errors``) or a final failure with each attempt's error."""
        return cls(result.status, result.body, result.request_id, errors, result.cause if errors is not None else None)

    @classmethod
    def local_error(cls, error_code: str, text: str) -> "RowResult":
        """An error decided here, before anything was paid."""
        return cls(errors=[text], error_code=error_code, local=True)

    @classmethod
    def internal_error(cls, error: BaseException, sent: bool) -> "RowResult":
        """A bug while the row was prepared (``sent`` False) or sent: that row's error, never the shard's."""
        return cls(errors=[f"internal error: {error!r}"], error_code="internal_error", local=not sent)


@dataclass
class ResultRecorder:
    """Writes each row's ending to its shard's part file and advances the run's progress.

    Attributes:
        part: the shard's part file.
        shape: the input's shape (it decides the output line's form).
        progress: the run's progress counter.
        errors: the run's error examples.
        logger: the shard task's logger.
        shard: the shard (named in warnings).
    """

    part: PartWriter
    shape: RequestShape
    progress: RunProgress
    errors: ErrorExamples
    logger: Any
    shard: ShardSpec

    def sent(self, request: ParsedRequest) -> None:
        """Note that a row's request is about to be sent for the first time."""
        self.part.write_sent(request.line_index, request.digest)

    def record(self, request: ParsedRequest, line_bytes: int, result: RowResult) -> None:
        """Write a row's final result and count its bytes as done."""
        output = format_result(request, self.shape, result.status, result.body, result.request_id, result.errors,
                               result.error_code)
        if result.local:
            self.errors.note((result.errors or ["error"])[-1])
            self.part.write_local_error(request.line_index, request.digest, output)
        else:
            self.part.write_result(request.line_index, request.digest, output, answered=result.status is not None)
        self.progress.advance(line_bytes, rows=1)

    def invalid_line(self, line: InvalidLine, offset: int, line_bytes: int) -> None:
        """Write an invalid line's error record and warn, naming the file, shard, line and byte offset."""
        self.part.write_invalid(line)
        self.progress.advance(line_bytes, rows=1)
        self.logger.warning("%s: %s line +%d (byte %d): %s", os.path.basename(self.shard.source), self.shard.label,
                            line.line_index, offset, line.reason)

    def skipped(self, line_bytes: int) -> None:
        """A blank line, or a row an earlier run finished: only the progress moves."""
        self.progress.advance(line_bytes)

    def end(self, lines_read: int, rows: int) -> None:
        """Record that the shard read all its lines."""
        self.part.write_end(lines_read, rows)
