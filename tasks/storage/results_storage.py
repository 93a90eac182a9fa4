"""Results: one part file per shard, then one output (file or URI) in input order, verified and written atomically.

While a shard runs, records are appended to the shard's part file (unbuffered: see below when
each reaches the operating system) in the order they happen, each tagged with the row's index inside the shard and its identity digest
(``tasks.requests.row_identity``):

    <line_index> TAB s TAB <digest> TAB                    the request is about to be sent
    <line_index> TAB r TAB <digest> TAB <output line>      a request's final result (the server answered)
    <line_index> TAB f TAB <digest> TAB <output line>      a request that failed with no answer (timeouts,
                                                           connection errors): final for this input, but
                                                           never reused for an edited one
    <line_index> TAB x TAB <digest> TAB <output line>      a row's error decided here, nothing paid
                                                           (no price, too large): decided again on a rerun
    <line_index> TAB i TAB - TAB {"reason": ..., "raw": ...}   an invalid input line
    <lines_read> TAB E TAB - TAB <rows>                    the shard read every line; <rows> non-blank

Memory stays flat however long the input is: nothing waits in memory for the rows before it.
The shards of one process share a ``TurnWrites``: each shard's records of one event-loop turn
go to the operating system in one write, made at the end of that turn, and every sender awaits
``TurnWrites.written()`` before each attempt it sends: the senders of one turn wait for that one
write, not one write each. A request therefore goes out only once every answer that came before it,
in any shard, is on disk, so a killed process loses only what was in flight. (A writer given no
``TurnWrites`` writes each record at once.) ``read_part_state()`` tells a resumed shard which rows
are done, and how many were sent but never answered (they will be sent again). A record torn by a kill is cut off when the part is reopened; a damaged
record anywhere else is skipped (its row is sent again rather than the shard failing on every
rerun). The last final record of a row wins.

At the end, ``assemble_output()`` reads each part. It builds an index from row number to byte
offset (8 bytes a row), checks that every non-blank line has its record when the job is to be
complete, and writes the rows in input order through ``tasks.storage.open_atomic_output``: a
temporary file that is fsynced and renamed over the output, or a multipart upload completed only
on success. Nothing is renamed when the count is wrong. This is also where invalid lines get their
message with the file's line number, which is known only once the shards before have been counted.
The parts stay in the work folder after the output is written: they are the paid answers that an
edited input reuses (``tasks.storage.row_reuse``), whatever happens to the output.

Usage:
    >>> with PartWriter(work.part_path(0, 1)) as part:
    ...     part.write_result(0, digest, b'[{"model": "m"}, {"data": []}]')
    ...     part.write_end(1, 1)
    >>> report = assemble_output("out.jsonl", [PartInfo(path)],
    ...                          RequestShape.COOKBOOK, "requests.jsonl", require_complete=True)
"""

# Standard library imports
import array
import asyncio
import itertools
import os
from dataclasses import dataclass, field
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

# Local application imports
from tasks.requests import fast_json
from tasks.job.crash_points import kill_point
from tasks.requests.request_formats import InvalidLine, ParsedRequest, RequestShape, format_invalid_line, format_result
from tasks.requests.row_identity import NO_DIGEST, is_digest
from tasks.storage.uris import open_atomic_output, open_output_for_reading

# How many example messages of invalid lines the assembly keeps for the summary.
EXAMPLE_LIMIT = 5
# Record kinds that settle a row for good, and the one that settles it only until the next run.
DONE_KINDS = (b"r", b"f", b"i")
FINAL_KINDS = (b"r", b"f", b"i", b"x")


class IncompleteOutput(RuntimeError):
    """Raised instead of writing an output that would lack rows (nothing is renamed or uploaded)."""


@dataclass
class PartInfo:
    """Where a shard's part is.

    Attributes:
        path: the part file (parts are given in input order).
        line_count: how many lines the shard read, when known from elsewhere (the part's end record wins).
    """

    path: str
    line_count: Optional[int] = None


@dataclass
class AssemblyReport:
    """What the final assembly wrote.

    Attributes:
        rows_written: output lines written.
        rows_expected: non-blank input lines the parts say there are (None when a part never ended).
        invalid_line_examples: the first few invalid-line messages, with their line numbers.
        written: False when the output was left as it was (see ``assemble_output``).
        local_errors: rows whose error was decided without sending (decided again by a rerun).
    """

    rows_written: int = 0
    rows_expected: Optional[int] = None
    invalid_line_examples: List[str] = field(default_factory=list)
    written: bool = True
    local_errors: int = 0


@dataclass
class PartState:
    """What a part file already holds.

    Attributes:
        done: indexes of rows with their final record, and the digest each record was written for.
        sent_unfinished: rows that were sent but have no final record (a crash cut them off).
        lines_read: the lines the shard read, when it read them all (its end record), else None.
        rows: the shard's non-blank lines, when it read them all, else None.
    """

    done: Dict[int, str] = field(default_factory=dict)
    sent_unfinished: int = 0
    lines_read: Optional[int] = None
    rows: Optional[int] = None


def read_part_state(path: str) -> PartState:
    """Read which rows of a shard are done (an absent part: none)."""
    state = PartState()
    sent: Set[int] = set()
    for index, kind, digest, payload, _ in iter_part_records(path):
        if kind == b"s":
            sent.add(index)
        elif kind in DONE_KINDS:
            state.done[index] = digest
        elif kind == b"x":
            state.done.pop(index, None)
        elif kind == b"E" and payload.isdigit():
            state.lines_read, state.rows = index, int(payload)
    state.sent_unfinished = len(sent - state.done.keys())
    return state


def iter_part_records(path: str) -> Iterator[Tuple[int, bytes, str, bytes, int]]:
    """Yield ``(index, kind, digest, payload, offset)`` for every well-formed record of a part, in file order."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as handle:
        position = 0
        for raw in handle:
            record = _parse_record(raw)
            if record is not None:
                yield (*record, position)
            position += len(raw)


class TurnWrites:
    """The part writers of one event loop whose records wait for the end of the loop's turn.

    Usage (on the running loop; every part writer of the run is given the same one):
        >>> turn = TurnWrites()
        >>> part = PartWriter(path, turn)
        >>> await turn.written()   # before any request is sent: every record made so far reaches the disk
    """

    def __init__(self) -> None:
        self._waiting: List["PartWriter"] = []
        self._turn_end_set = False
        self._callers: List[asyncio.Future] = []  # callers of written(), woken by the turn's write

    async def written(self) -> None:
        """Return once every record waiting now has reached the operating system.

        The callers of one turn share the write made at its end. One that resumes after records made
        meanwhile (by an answer handled before it in the same turn) writes them itself, so nothing
        recorded before it returns is left waiting. Raises the write's error (a full disk).
        """
        if self._waiting:
            caller = asyncio.get_running_loop().create_future()  # one per caller: a cancelled one cancels no other
            self._callers.append(caller)
            self._write_at_turn_end()
            await caller
            self.flush()

    def note(self, writer: "PartWriter") -> None:
        """``writer`` has its first waiting record: it is written before the next request, at the latest at the
        end of the loop's turn."""
        self._write_at_turn_end()
        self._waiting.append(writer)

    def _write_at_turn_end(self) -> None:
        """Make sure the write at the end of this turn is scheduled."""
        if not self._turn_end_set:
            asyncio.get_running_loop().call_soon(self._at_turn_end)  # after every callback ready now: the turn's end
            self._turn_end_set = True

    def flush(self) -> None:
        """Write every waiting record now, then wake the callers of ``written()``."""
        callers, self._callers = self._callers, []
        try:
            self._write_waiting()
        except BaseException as error:
            for caller in callers:
                if not caller.done():
                    caller.set_exception(error)
            raise
        for caller in callers:
            if not caller.done():
                caller.set_result(None)

    def _write_waiting(self) -> None:
        """Write the waiting records of every part writer. A writer whose write fails (a full disk) keeps
        waiting, with every record it could not write, for the next write; the others are written; the
        first error is raised."""
        waiting, self._waiting = self._waiting, []
        first_error: Optional[Exception] = None
        for writer in waiting:
            try:
                writer.flush()
            except Exception as error:
                self._waiting.append(writer)
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    def _at_turn_end(self) -> None:
        """The end of the loop's turn: write what waits."""
        self._turn_end_set = False
        try:
            self.flush()
        except OSError:  # the callers of written() have it; the records not written wait for the next write
            pass


class PartWriter:
    """Appends one shard's records to its part file, each reaching the operating system at once
    (or, given a ``TurnWrites``, at the end of the event loop's turn, and before any request is sent)."""

    def __init__(self, path: str, turn: Optional[TurnWrites] = None) -> None:
        """Open (create or append to) the part file at ``path``, cutting off a torn last record.

        Args:
            path: the part file.
            turn: join the records of one turn of the running event loop into one write, made by ``turn``.
        """
        self.path = path
        _cut_torn_tail(path)
        self._handle: Optional[IO[bytes]] = open(path, "ab", buffering=0)
        self._turn = turn
        self._pending: List[bytes] = []

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def write_sent(self, line_index: int, digest: str) -> None:
        """Record that a row's request is about to be sent for the first time (the sender flushes the
        turn's records before it sends)."""
        self._write(line_index, b"s", digest, b"")

    def write_result(self, line_index: int, digest: str, output_line: bytes, answered: bool = True) -> None:
        """Record a request's final output line (UTF-8 JSON, without a newline).

        ``answered`` is False for a request that failed without any answer from the server.
        """
        self._write(line_index, b"r" if answered else b"f", digest, output_line)

    def write_local_error(self, line_index: int, digest: str, output_line: bytes) -> None:
        """Record a row's error decided without sending it (decided again by the next run)."""
        self._write(line_index, b"x", digest, output_line)

    def write_invalid(self, line: InvalidLine) -> None:
        """Record an invalid input line; its message is completed at assembly."""
        envelope = {"reason": line.reason, "raw": line.raw_text, "custom_id": line.custom_id}
        self._write(line.line_index, b"i", NO_DIGEST, fast_json.dumps(envelope))

    def write_end(self, lines_read: int, rows: int) -> None:
        """Record that the shard read all its lines: how many, and how many were not blank."""
        self._write(lines_read, b"E", NO_DIGEST, b"%d" % rows)

    def flush(self) -> None:
        """Write the records waiting for the end of the loop's turn."""
        if self._pending and self._handle is not None:
            data = memoryview(b"".join(self._pending))
            self._pending.clear()
            try:
                while data:  # an unbuffered write may take only part of a long buffer
                    data = data[self._handle.write(data):]
            except BaseException:
                self._pending.append(bytes(data))  # what did not reach the disk waits for the next write
                raise

    def close(self) -> None:
        """Write what waits, fsync and close the part."""
        if self._handle is not None:
            self.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def _write(self, index: int, kind: bytes, digest: str, payload: bytes) -> None:
        """Append one record: in one write, or, given a ``TurnWrites``, in this turn's write."""
        assert self._handle is not None
        record = b"%d\t%b\t%b\t%b\n" % (index, kind, digest.encode("ascii"), payload)
        if self._turn is None:
            self._handle.write(record)
            return
        if not self._pending:
            self._turn.note(self)
        self._pending.append(record)


def assemble_output(save_path: str, parts: Sequence[PartInfo], shape: RequestShape, source_name: str,
                    transport_params: Optional[Dict[str, Any]] = None, require_complete: bool = False,
                    existing_rows: Optional[int] = None) -> AssemblyReport:
    """Write every part's rows, in input order, to ``save_path`` (a path or URI) atomically.

    Args:
        save_path: the output path or URI; compressed when it ends in .gz, .bz2 or .zst.
        parts: the shards' parts, in input order.
        shape: the input's shape (for invalid-line records).
        source_name: the input's name, for invalid-line messages.
        transport_params: smart-open's transport parameters for a remote output.
        require_complete: raise ``IncompleteOutput`` (writing nothing) unless every part ended and
            every non-blank line has its record.
        existing_rows: the lines of the output already there (None: none). An incomplete output is
            not written over one with as many lines or more (never replace an output with a worse
            one), and an incomplete output with no row is not written at all; ``report.written`` is
            then False.

    Returns:
        What was written.

    Raises:
        IncompleteOutput: see ``require_complete``.
    """
    report = AssemblyReport()
    indexes = [_index_part(part) for part in parts]
    present = sum(index.present for index in indexes)
    if all(index.rows is not None for index in indexes):
        report.rows_expected = sum(index.rows or 0 for index in indexes)
    if require_complete and report.rows_expected != present:
        missing = "a shard never finished reading" if report.rows_expected is None else \
            f"{report.rows_expected - present} of {report.rows_expected} rows have no result"
        raise IncompleteOutput(f"not writing {save_path}: {missing}")
    if not require_complete and (present == 0 or (existing_rows is not None and existing_rows >= present)):
        report.written = False
        report.rows_written = present
        return report
    with open_atomic_output(save_path, transport_params) as output:
        first_line = 1
        for part, index in zip(parts, indexes):
            report.rows_written += _copy_part_in_order(part, index, first_line, output, shape, source_name, report)
            first_line += index.lines_read if index.lines_read is not None else (part.line_count or 0)
            if report.rows_written >= present // 2:
                kill_point("assembly")
        if report.rows_written != present:
            raise IncompleteOutput(f"not writing {save_path}: wrote {report.rows_written} rows of {present}")
        kill_point("rename")
    return report


def count_lines(save_path: str, transport_params: Optional[Dict[str, Any]] = None) -> Optional[int]:
    """How many lines an existing output has, or None when there is none (or it cannot be read)."""
    try:
        with open_output_for_reading(save_path, transport_params) as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except Exception:
        return None


def iter_part_answers(path: str) -> Iterator[Tuple[str, bytes]]:
    """Yield ``(digest, output line)`` for every row of a part the server answered, in line order."""
    final: Dict[int, Tuple[bytes, str, int]] = {}
    for index, kind, digest, _, offset in iter_part_records(path):
        if kind in FINAL_KINDS:
            final[index] = (kind, digest, offset)
    with open(path, "rb") as handle:
        for index in sorted(final):
            kind, digest, offset = final[index]
            if kind == b"r" and is_digest(digest):
                handle.seek(offset)
                record = _parse_record(handle.readline())
                if record is not None:
                    yield digest, record[3]


def reformat_answer(output_line: bytes, request: ParsedRequest, shape: RequestShape) -> bytes:
    """An earlier output line's answer, written for ``request`` (its metadata, custom_id and shape).

    Raises:
        ValueError: when the line is not an output line of either shape.
    """
    value = fast_json.loads(output_line)
    if isinstance(value, list) and len(value) >= 2:
        answer = value[1]
        if isinstance(answer, list):
            return format_result(request, shape, None, None, None, [str(item) for item in answer], None)
        return format_result(request, shape, 200, answer, None, None, None)
    if isinstance(value, dict) and "response" in value:
        response = value.get("response") or {}
        error = value.get("error")
        status = response.get("status_code") if isinstance(response, dict) else None
        body = response.get("body") if isinstance(response, dict) else None
        request_id = response.get("request_id") if isinstance(response, dict) else None
        if isinstance(error, dict):
            return format_result(request, shape, status, body, request_id, [str(error.get("message", ""))],
                                 str(error.get("code") or "request_failed"))
        return format_result(request, shape, status, body, request_id, None, None)
    raise ValueError("not an output line")


# Helpers


@dataclass
class _PartIndex:
    """Where each row's final record sits in a part, and what the part's end record says."""

    offsets: "array.array[int]"
    present: int
    lines_read: Optional[int]
    rows: Optional[int]


def _index_part(part: PartInfo) -> _PartIndex:
    """Index a part: the offset of each row's last final record (8 bytes a row), and its end record."""
    lines_read, rows = part.line_count, None
    table = array.array("q")
    for index, kind, _, payload, offset in iter_part_records(part.path):
        if kind in FINAL_KINDS:
            if index >= len(table):
                table.extend(itertools.repeat(-1, index + 1 - len(table)))
            table[index] = offset
        elif kind == b"E" and payload.isdigit():
            lines_read, rows = index, int(payload)
    if lines_read is not None:
        del table[lines_read:]
        table.extend(itertools.repeat(-1, lines_read - len(table)))
    return _PartIndex(table, len(table) - table.count(-1), lines_read, rows)


def _copy_part_in_order(part: PartInfo, index: _PartIndex, first_line: int, output: IO[bytes],
                        shape: RequestShape, source_name: str, report: AssemblyReport) -> int:
    """Copy one part's rows into ``output`` in line order; return how many were written."""
    written = 0
    if not index.present:
        return 0
    with open(part.path, "rb") as handle:
        for line_index, offset in enumerate(index.offsets):
            if offset < 0:
                continue
            handle.seek(offset)
            record = _parse_record(handle.readline())
            if record is None:  # the file changed under us: stop rather than write a wrong row
                raise IncompleteOutput(f"{part.path} changed during assembly")
            _, kind, _, payload = record
            if kind == b"i":
                envelope = fast_json.loads(payload)
                message = f"{source_name} line {first_line + line_index}: {envelope['reason']}"
                if len(report.invalid_line_examples) < EXAMPLE_LIMIT:
                    report.invalid_line_examples.append(message)
                line = InvalidLine(line_index, envelope["reason"], envelope["raw"], envelope.get("custom_id"))
                payload = format_invalid_line(line, shape, message)
            report.local_errors += kind == b"x"
            output.write(payload + b"\n")
            written += 1
    return written


def _parse_record(raw: bytes) -> Optional[Tuple[int, bytes, str, bytes]]:
    """One record's ``(index, kind, digest, payload)``, or None for a torn or damaged record."""
    if not raw.endswith(b"\n"):
        return None
    fields = raw[:-1].split(b"\t", 3)
    if len(fields) != 4 or not fields[0].isdigit() or len(fields[1]) != 1:
        return None
    digest = fields[2].decode("ascii", "replace")
    if digest != NO_DIGEST and not is_digest(digest):
        return None
    return int(fields[0]), fields[1], digest, fields[3]


def _cut_torn_tail(path: str) -> None:
    """Cut a part back to its last complete record (a kill may have torn the last one)."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        block = min(size, 1 << 16)
        while True:
            handle.seek(size - block)
            chunk = handle.read(block)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                handle.truncate(size - block + cut + 1)
                return
            if block == size:
                handle.truncate(0)
                return
            block = min(size, block * 2)
