"""Parts and the final assembly: input order, invalid-line numbers, atomic replacement of the output."""

# Standard library imports
import json
import os

# Third-party imports
import pytest

# Local application imports
from tasks.request_formats import InvalidLine, RequestShape
from tasks.results_storage import PartInfo, PartWriter, assemble_output


def test_rows_come_out_in_input_order_with_global_line_numbers(tmp_path) -> None:
    first, second = str(tmp_path / "a.part"), str(tmp_path / "b.part")
    with PartWriter(first) as part:  # shard 1: lines 1-4, line 3 blank, finished out of order
        part.write_result(3, b'["row 4"]')
        part.write_result(0, b'["row 1"]')
        part.write_invalid(InvalidLine(1, "invalid JSON (x)", "{bad", None))
        part.write_result(0, b'["row 1 again"]')  # a duplicate never doubles a row
    with PartWriter(second) as part:  # shard 2: lines 5-6
        part.write_invalid(InvalidLine(1, "expected a JSON object, got list", "[1]", None))
        part.write_result(0, b'["row 5"]')
    out = tmp_path / "out.jsonl"
    report = assemble_output(str(out), [PartInfo(first, 4, 1), PartInfo(second, 2, 5)], RequestShape.COOKBOOK, "in.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        ["row 1"],
        ["{bad", ["in.jsonl line 2: invalid JSON (x)"]],
        ["row 4"],
        ["row 5"],
        ["[1]", ["in.jsonl line 6: expected a JSON object, got list"]],
    ]
    assert report.rows_written == 5
    assert report.invalid_line_examples == ["in.jsonl line 2: invalid JSON (x)", "in.jsonl line 6: expected a JSON object, got list"]


def test_a_failed_assembly_leaves_the_old_output_and_no_temporary_file(tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    broken = tmp_path / "broken.part"
    broken.write_text('0\ti\tthis is not json\n')
    with pytest.raises(ValueError):
        assemble_output(str(out), [PartInfo(str(broken), 1, 1)], RequestShape.COOKBOOK, "in.jsonl")
    assert out.read_text() == "previous results\n"
    assert sorted(os.listdir(tmp_path)) == ["broken.part", "out.jsonl"]


def test_a_torn_last_line_of_a_part_is_ignored(tmp_path) -> None:
    part = tmp_path / "p.part"
    part.write_text('0\tr\t["done"]\n1\tr\t["half-writ')
    out = tmp_path / "out.jsonl"
    assemble_output(str(out), [PartInfo(str(part), 2, 1)], RequestShape.COOKBOOK, "in.jsonl")
    assert out.read_text() == '["done"]\n'
