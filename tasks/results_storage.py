"""Results on disk: one part file per shard, then one output file in input order, written atomically.

While a shard runs, each finished row is appended to the shard's part file in the order
rows finish, tagged with the row's index inside the shard:

    <line_index> TAB r TAB <the output line>           a request's final result
    <line_index> TAB i TAB {"reason": ..., "raw": ...}  an invalid input line

Memory stays flat however long the input is: nothing waits in memory for the rows before it.
At the end, ``assemble_output()`` reads each part. It builds an index from row number to byte
offset (8 bytes a row) and writes the rows in input order into a temporary file beside the
output. It then fsyncs the file and renames it over the output, so a reader never sees a
half-written file. This is also where invalid lines get their message with the file's line
number, which is known only once the shards before have been counted.

Usage:
    >>> with PartWriter(work_dir / "shard-00001.part") as part:
    ...     part.write_result(0, b'[{"model": "m"}, {"data": []}]')
    >>> report = assemble_output("out.jsonl", [PartInfo(path, line_count=1, first_line_number=1)],
    ...                          RequestShape.COOKBOOK, "requests.jsonl")
"""

# Standard library imports
import array
import os
import uuid
from dataclasses import dataclass, field
from typing import IO, List, Optional, Sequence

# Local application imports
from tasks import fast_json
from tasks.request_formats import InvalidLine, RequestShape, format_invalid_line

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


class PartWriter:
    """Appends one shard's finished rows to its part file."""

    def __init__(self, path: str) -> None:
        """Open (create or append to) the part file at ``path``."""
        self.path = path
        self._handle: Optional[IO[bytes]] = open(path, "ab")

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

    def flush(self) -> None:
        """Push buffered rows to the operating system."""
        if self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        """Flush, fsync and close the part."""
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None


def assemble_output(save_path: str, parts: Sequence[PartInfo], shape: RequestShape, source_name: str) -> AssemblyReport:
    """Write every part's rows, in input order, into ``save_path`` atomically.

    Args:
        save_path: the output file.
        parts: the shards' parts, in input order.
        shape: the input's shape (for invalid-line records).
        source_name: the input's name, for invalid-line messages.

    Returns:
        What was written.
    """
    report = AssemblyReport()
    folder = os.path.dirname(os.path.abspath(save_path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(save_path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as output:
            for part in parts:
                report.rows_written += _copy_part_in_order(part, output, shape, source_name, report)
            output.flush()
            os.fsync(output.fileno())
        os.replace(temporary, save_path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_folder(folder)
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
            if tab > 0 and raw.endswith(b"\n"):
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


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the platform allows it)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
