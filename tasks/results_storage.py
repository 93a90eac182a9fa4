"""Results: one part file per shard, then one output (file or URI) in input order, written atomically.

While a shard runs, records are appended to the shard's part file, unbuffered, in the order
they happen, each tagged with the row's index inside the shard:

    <line_index> TAB s TAB                                 the request is about to be sent
    <line_index> TAB r TAB <the output line>               a request's final result
    <line_index> TAB i TAB {"reason": ..., "raw": ...}     an invalid input line

Memory stays flat however long the input is: nothing waits in memory for the rows before it.
Every record reaches the operating system as it is written, so a killed process loses no
finished row. ``read_part_state()`` tells a resumed shard which rows are done, and how many
were sent but never answered (they will be sent again). A record torn by a kill is cut off
when the part is reopened.

At the end, ``assemble_output()`` reads each part. It builds an index from row number to byte
offset (8 bytes a row) and writes the rows in input order through
``tasks.storage.open_atomic_output``. The result is a temporary file that is fsynced and renamed
over the output, or a multipart upload completed only on success. This is also where invalid
lines get their message with the file's line number, which is known only once the shards
before have been counted.

Usage:
    >>> with PartWriter(work.part_path(0, 1)) as part:
    ...     part.write_result(0, b'[{"model": "m"}, {"data": []}]')
    >>> report = assemble_output("out.jsonl", [PartInfo(path, line_count=1, first_line_number=1)],
    ...                          RequestShape.COOKBOOK, "requests.jsonl")
"""

# Standard library imports
import array
import os
from dataclasses import dataclass, field
from typing import IO, Any, Dict, List, Optional, Sequence, Set

# Local application imports
from tasks import fast_json
from tasks.request_formats import InvalidLine, RequestShape, format_invalid_line
from tasks.storage import open_atomic_output

# How many example messages of invalid lines the assembly keeps for the summary.
EXAMPLE_LIMIT = 5


@dataclass
class PartInfo:
    """Where a shard's part is and where its lines sit in the input.

    Attributes:
        path: the part file.
        line_count: how many lines the shard read (blank lines included).
        first_line_number: the input's line number (from 1) of the shard's first line.
    """

    path: str
    line_count: int
    first_line_number: int


@dataclass
class AssemblyReport:
    """What the final assembly wrote.

    Attributes:
        rows_written: output lines written.
        invalid_line_examples: the first few invalid-line messages, with their line numbers.
    """

    rows_written: int = 0
    invalid_line_examples: List[str] = field(default_factory=list)


@dataclass
class PartState:
    """What a part file already holds.

    Attributes:
        done: indexes of rows with their final record.
        sent_unfinished: rows that were sent but have no final record (a crash cut them off).
    """

    done: Set[int] = field(default_factory=set)
    sent_unfinished: int = 0


def read_part_state(path: str) -> PartState:
    """Read which rows of a shard are done (an absent part: none)."""
    state = PartState()
    sent: Set[int] = set()
    if not os.path.exists(path):
        return state
    with open(path, "rb") as handle:
        for raw in handle:
            first_tab = raw.find(b"\t")
            if first_tab <= 0 or not raw.endswith(b"\n"):
                continue
            index = int(raw[:first_tab])
            if raw[first_tab + 1:first_tab + 2] == b"s":
                sent.add(index)
            else:
                state.done.add(index)
    state.sent_unfinished = len(sent - state.done)
    return state


class PartWriter:
    """Appends one shard's records to its part file, each reaching the operating system at once."""

    def __init__(self, path: str) -> None:
        """Open (create or append to) the part file at ``path``, cutting off a torn last record."""
        self.path = path
        _cut_torn_tail(path)
        self._handle: Optional[IO[bytes]] = open(path, "ab", buffering=0)

    def write_sent(self, line_index: int) -> None:
        """Record that a row's request is about to be sent for the first time."""
        assert self._handle is not None
        self._handle.write(b"%d\ts\t\n" % line_index)

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def write_result(self, line_index: int, output_line: bytes) -> None:
        """Record a request's final output line (UTF-8 JSON, without a newline)."""
        assert self._handle is not None
        self._handle.write(b"%d\tr\t%b\n" % (line_index, output_line))

    def write_invalid(self, line: InvalidLine) -> None:
        """Record an invalid input line; its message is completed at assembly."""
        assert self._handle is not None
        envelope = {"reason": line.reason, "raw": line.raw_text, "custom_id": line.custom_id}
        self._handle.write(b"%d\ti\t%b\n" % (line.line_index, fast_json.dumps(envelope)))

    def close(self) -> None:
        """Fsync and close the part."""
        if self._handle is not None:
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None


def assemble_output(save_path: str, parts: Sequence[PartInfo], shape: RequestShape, source_name: str,
                    transport_params: Optional[Dict[str, Any]] = None) -> AssemblyReport:
    """Write every part's rows, in input order, to ``save_path`` (a path or URI) atomically.

    Args:
        save_path: the output path or URI; compressed when it ends in .gz, .bz2 or .zst.
        parts: the shards' parts, in input order.
        shape: the input's shape (for invalid-line records).
        source_name: the input's name, for invalid-line messages.
        transport_params: smart-open's transport parameters for a remote output.

    Returns:
        What was written.
    """
    report = AssemblyReport()
    with open_atomic_output(save_path, transport_params) as output:
        for part in parts:
            report.rows_written += _copy_part_in_order(part, output, shape, source_name, report)
    return report


# Helpers


def _copy_part_in_order(part: PartInfo, output: IO[bytes], shape: RequestShape, source_name: str,
                        report: AssemblyReport) -> int:
    """Copy one part's rows into ``output`` in line order; return how many were written."""
    if part.line_count == 0 or not os.path.exists(part.path):
        return 0
    offsets = array.array("q", [-1]) * part.line_count
    with open(part.path, "rb") as handle:
        position = 0
        for raw in iter(handle.readline, b""):
            tab = raw.find(b"\t")
            if tab > 0 and raw.endswith(b"\n") and raw[tab + 1:tab + 2] != b"s":
                index = int(raw[:tab])
                if 0 <= index < part.line_count and offsets[index] < 0:
                    offsets[index] = position
            position += len(raw)
        written = 0
        for index in range(part.line_count):
            if offsets[index] < 0:
                continue
            handle.seek(offsets[index])
            raw = handle.readline()
            first_tab = raw.index(b"\t")
            kind, payload = raw[first_tab + 1 : first_tab + 2], raw[first_tab + 3 :]
            if kind == b"i":
                envelope = fast_json.loads(payload)
                message = f"{source_name} line {part.first_line_number + index}: {envelope['reason']}"
                if len(report.invalid_line_examples) < EXAMPLE_LIMIT:
                    report.invalid_line_examples.append(message)
                line = InvalidLine(index, envelope["reason"], envelope["raw"], envelope.get("custom_id"))
                payload = format_invalid_line(line, shape, message) + b"\n"
            output.write(payload)
            written += 1
    return written


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
