"""Byte-range shards: every line lands in exactly one shard, in order, whatever the boundaries cut."""

# Standard library imports
import json
from typing import List

# Third-party imports
import pytest

# Local application imports
from tasks.shards.sharding import default_shard_count, iter_shard_lines, plan_shards

CONTENTS = {
    "plain": b"".join(json.dumps({"i": i, "pad": "x" * (i % 7)}).encode() + b"\n" for i in range(50)),
    "no final newline": b'{"a": 1}\n{"b": 2}\n{"c": 3}',
    "blank and crlf lines": b'{"a": 1}\r\n\r\n\n{"b": 2}\r\n   \n{"c": 3}\n',
    "u2028 inside strings": ('{"t": "one\u2028two"}\n{"t": "three\u2029"}\n').encode("utf-8") * 5,
    "one long line": b'{"t": "' + b"y" * 5000 + b'"}\n',
    "empty": b"",
}


@pytest.mark.parametrize("name", sorted(CONTENTS))
@pytest.mark.parametrize("shard_count", [1, 2, 3, 7, 64, 1000])
def test_every_line_once_in_order(tmp_path, name: str, shard_count: int) -> None:
    content = CONTENTS[name]
    path = tmp_path / "input.jsonl"
    path.write_bytes(content)
    shards = plan_shards(str(path), shard_count)
    assert shards[0].start == 0 and shards[-1].end == len(content)
    assert all(a.end == b.start for a, b in zip(shards, shards[1:]))
    seen: List[bytes] = []
    for shard in shards:
        indexes = []
        for index, offset, raw in iter_shard_lines(shard):
            assert shard.start <= offset < shard.end  # a line belongs to the shard of its first byte
            assert content[offset:offset + len(raw)] == raw
            indexes.append(index)
            seen.append(raw)
        assert indexes == list(range(len(indexes)))
    assert b"".join(seen) == content
    assert len(seen) == content.count(b"\n") + (0 if content.endswith(b"\n") or not content else 1)


def test_shard_count_follows_the_size() -> None:
    assert default_shard_count(0) == 1
    assert default_shard_count(1000) == 1
    assert default_shard_count(20 * 1024 * 1024) == 3
    assert default_shard_count(10**12) == 64


def test_zero_shards_is_rejected(tmp_path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"{}\n")
    with pytest.raises(ValueError):
        plan_shards(str(path), 0)
