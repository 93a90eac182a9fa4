"""Parts and the final assembly: input order, invalid-line numbers, verified and atomic replacement of the output."""

# Standard library imports
import asyncio
import json
import os

# Third-party imports
import pytest

# Local application imports
from tasks.requests.request_formats import InvalidLine, RequestShape
from tasks.storage.results_storage import (
    IncompleteOutput,
    PartInfo,
    PartWriter,
    TurnWrites,
    assemble_output,
    read_part_state,
)

D = "0123456789abcdef" * 2  # a well-formed digest


def test_rows_come_out_in_input_order_with_global_line_numbers(tmp_path) -> None:
    first, second = str(tmp_path / "a.part"), str(tmp_path / "b.part")
    with PartWriter(first) as part:  # shard 1: lines 1-4, line 3 blank, finished out of order
        part.write_result(3, D, b'["row 4"]')
        part.write_result(0, D, b'["row 1"]')
        part.write_invalid(InvalidLine(1, "invalid JSON (x)", "{bad", None))
        part.write_end(4, 3)
    with PartWriter(second) as part:  # shard 2: lines 5-6
        part.write_invalid(InvalidLine(1, "expected a JSON object, got list", "[1]", None))
        part.write_result(0, D, b'["row 5"]')
        part.write_end(2, 2)
    out = tmp_path / "out.jsonl"
    report = assemble_output(str(out), [PartInfo(first), PartInfo(second)], RequestShape.COOKBOOK, "in.jsonl",
                             require_complete=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        ["row 1"],
        ["{bad", ["in.jsonl line 2: invalid JSON (x)"]],
        ["row 4"],
        ["row 5"],
        ["[1]", ["in.jsonl line 6: expected a JSON object, got list"]],
    ]
    assert report.rows_written == report.rows_expected == 5
    assert report.invalid_line_examples == ["in.jsonl line 2: invalid JSON (x)", "in.jsonl line 6: expected a JSON object, got list"]


def test_a_complete_output_is_never_written_with_a_row_missing(tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("a good earlier output\n")
    part = str(tmp_path / "a.part")
    with PartWriter(part) as writer:
        writer.write_result(0, D, b'["row 1"]')
        writer.write_end(3, 2)  # two non-blank rows, one has no result
    with pytest.raises(IncompleteOutput):
        assemble_output(str(out), [PartInfo(part)], RequestShape.COOKBOOK, "in.jsonl", require_complete=True)
    missing_end = str(tmp_path / "b.part")
    with PartWriter(missing_end) as writer:
        writer.write_result(0, D, b'["row 1"]')
    with pytest.raises(IncompleteOutput):  # a shard that never finished reading is not complete either
        assemble_output(str(out), [PartInfo(missing_end)], RequestShape.COOKBOOK, "in.jsonl", require_complete=True)
    assert out.read_text() == "a good earlier output\n"
    assert sorted(os.listdir(tmp_path)) == ["a.part", "b.part", "out.jsonl"]


def test_a_partial_output_never_replaces_a_longer_one(tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("1\n2\n3\n")
    part = str(tmp_path / "a.part")
    with PartWriter(part) as writer:
        writer.write_result(0, D, b'["row 1"]')
    report = assemble_output(str(out), [PartInfo(part)], RequestShape.COOKBOOK, "in.jsonl", existing_rows=3)
    assert not report.written and out.read_text() == "1\n2\n3\n"
    report = assemble_output(str(out), [PartInfo(part)], RequestShape.COOKBOOK, "in.jsonl", existing_rows=0)
    assert report.written and out.read_text() == '["row 1"]\n'


def test_a_failed_assembly_leaves_the_old_output_and_no_temporary_file(tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    broken = tmp_path / "broken.part"
    broken.write_text('0\ti\t-\tthis is not json\n')
    with pytest.raises(ValueError):
        assemble_output(str(out), [PartInfo(str(broken), line_count=1)], RequestShape.COOKBOOK, "in.jsonl")
    assert out.read_text() == "previous results\n"
    assert sorted(os.listdir(tmp_path)) == ["broken.part", "out.jsonl"]


def test_a_torn_last_line_of_a_part_is_ignored(tmp_path) -> None:
    part = tmp_path / "p.part"
    part.write_text(f'0\tr\t{D}\t["done"]\n1\tr\t{D}\t["half-writ')
    out = tmp_path / "out.jsonl"
    assemble_output(str(out), [PartInfo(str(part), line_count=2)], RequestShape.COOKBOOK, "in.jsonl")
    assert out.read_text() == '["done"]\n'


def test_a_damaged_record_in_the_middle_costs_its_row_not_every_rerun(tmp_path) -> None:
    part = tmp_path / "p.part"
    part.write_bytes(f'0\tr\t{D}\t["a"]\n\x00\x00garbage\tr\n1\ts\t{D}\t\nxx\ty\tz\tw\n2\tr\t{D}\t["c"]\n'.encode())
    state = read_part_state(str(part))
    assert set(state.done) == {0, 2} and state.sent_unfinished == 1
    with PartWriter(str(part)) as writer:
        writer.write_result(1, D, b'["b"]')
        writer.write_end(3, 3)
    out = tmp_path / "out.jsonl"
    assemble_output(str(out), [PartInfo(str(part))], RequestShape.COOKBOOK, "in.jsonl", require_complete=True)
    assert out.read_text() == '["a"]\n["b"]\n["c"]\n'


def test_a_local_error_is_decided_again_and_the_last_final_record_wins(tmp_path) -> None:
    part = str(tmp_path / "p.part")
    with PartWriter(part) as writer:
        writer.write_local_error(0, D, b'["no price"]')
    assert read_part_state(part).done == {}
    with PartWriter(part) as writer:
        writer.write_result(0, D, b'["answered"]')
        writer.write_end(1, 1)
    out = tmp_path / "out.jsonl"
    assemble_output(str(out), [PartInfo(part)], RequestShape.COOKBOOK, "in.jsonl", require_complete=True)
    assert out.read_text() == '["answered"]\n'


def test_the_shards_writers_put_every_answer_on_disk_before_any_request_and_by_the_end_of_the_turn(tmp_path) -> None:
    paths = str(tmp_path / "a.part"), str(tmp_path / "b.part")

    def on_disk(path: str) -> list:
        with open(path, "rb") as handle:
            return [line.split(b"\t")[:2] for line in handle.read().splitlines()]

    async def two_shards() -> list:
        seen = []
        turn = TurnWrites()
        with PartWriter(paths[0], turn) as first, PartWriter(paths[1], turn) as second:
            first.write_result(0, D, b'["row 1"]')
            first.write_result(1, D, b'["row 2"]')
            second.write_sent(0, D)
            seen.append((on_disk(paths[0]), on_disk(paths[1])))  # nothing yet: written together, once
            await turn.written()  # a sender of either shard, before any attempt: the other shard's answers too
            seen.append((on_disk(paths[0]), on_disk(paths[1])))
            second.write_result(0, D, b'["row 1 of b"]')
            await asyncio.sleep(0)  # one turn of the loop
            seen.append((on_disk(paths[0]), on_disk(paths[1])))
            first.write_invalid(InvalidLine(2, "invalid JSON (x)", "{bad", None))
        seen.append((on_disk(paths[0]), on_disk(paths[1])))  # closing writes what waits
        return seen

    waiting, sent, turn_end, closed = asyncio.run(two_shards())
    assert waiting == ([], [])
    assert sent == ([[b"0", b"r"], [b"1", b"r"]], [[b"0", b"s"]])
    assert turn_end == (sent[0], sent[1] + [[b"0", b"r"]])
    assert closed == (sent[0] + [[b"2", b"i"]], turn_end[1])
    assert read_part_state(paths[0]).done.keys() == {0, 1, 2} and read_part_state(paths[1]).done.keys() == {0}


def test_a_part_that_cannot_be_written_keeps_its_records_and_holds_back_no_other_part(tmp_path) -> None:
    # One shard's part on a full disk (/dev/full answers every write with ENOSPC), the other's on this one.
    # Each sender waiting for the turn's write is told; the other part's records reach its file all the
    # same, in that turn and after; the full part keeps what it could not write for a later write.
    path = str(tmp_path / "b.part")

    async def two_shards() -> list:
        turn = TurnWrites()
        full, part = PartWriter("/dev/full", turn), PartWriter(path, turn)
        full.write_sent(0, D)
        part.write_sent(0, D)
        errors = []
        for row in range(3):
            try:
                await turn.written()
            except OSError as error:
                errors.append(error.errno)
            part.write_result(row, D, b'["answer %d"]' % row)
            part.write_sent(row + 1, D)
        await asyncio.sleep(0)  # the turn's end
        with open(path, "rb") as handle:  # on disk before the part is closed
            kinds = [line.split(b"\t")[1] for line in handle.read().splitlines()]
        part.close()
        return [errors, kinds, len(full._pending)]

    errors, kinds, not_written = asyncio.run(two_shards())
    assert errors == [28, 28, 28]
    assert kinds == [b"s", b"r"] * 3 + [b"s"]
    assert not_written == 1  # the full part's records, joined, wait for a later write
    assert read_part_state(path).done.keys() == {0, 1, 2}
