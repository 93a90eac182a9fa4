"""The two request file shapes: detection, parsing, invalid lines, and the output lines of each."""

# Standard library imports
import json

# Third-party imports
import pytest

# Local application imports
from tasks.request_formats import (
    InvalidLine,
    ParsedRequest,
    RequestShape,
    detect_shape,
    format_invalid_line,
    format_result,
    join_batch_url,
    parse_line,
)

URL = "http://127.0.0.1:9000/v1/chat/completions"
BATCH_LINE = {"custom_id": "r1", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}


def test_detects_the_shape_from_the_first_readable_line() -> None:
    assert detect_shape(b'{"model": "m", "input": "x"}\n') is RequestShape.COOKBOOK
    assert detect_shape(b"\n{broken\n" + json.dumps(BATCH_LINE).encode() + b"\n") is RequestShape.BATCH
    assert detect_shape(b"") is RequestShape.COOKBOOK


def test_cookbook_line_keeps_metadata_out_of_the_request() -> None:
    parsed = parse_line(b'{"model": "m", "input": "x", "metadata": {"row": 3}}\r\n', RequestShape.COOKBOOK, URL, 4)
    assert isinstance(parsed, ParsedRequest)
    assert parsed.body == {"model": "m", "input": "x"}
    assert json.loads(parsed.payload) == {"model": "m", "input": "x"}
    assert parsed.metadata == {"row": 3} and parsed.url == URL and parsed.line_index == 4
    line = json.loads(format_result(parsed, RequestShape.COOKBOOK, 200, {"data": []}, "req_1", None, None))
    assert line == [{"model": "m", "input": "x"}, {"data": []}, {"row": 3}]


def test_cookbook_output_without_or_with_empty_metadata_is_a_pair() -> None:
    for raw in (b'{"model": "m", "input": "x"}', b'{"model": "m", "input": "x", "metadata": {}}'):
        parsed = parse_line(raw, RequestShape.COOKBOOK, URL)
        failure = json.loads(format_result(parsed, RequestShape.COOKBOOK, 500, None, None, ["e1", "e2"], "http_500"))
        assert failure == [{"model": "m", "input": "x"}, ["e1", "e2"]]


def test_batch_line_becomes_a_request_to_its_own_path() -> None:
    parsed = parse_line(json.dumps(BATCH_LINE).encode(), RequestShape.BATCH, URL)
    assert isinstance(parsed, ParsedRequest)
    assert parsed.url == "http://127.0.0.1:9000/v1/embeddings" and parsed.custom_id == "r1"
    ok = json.loads(format_result(parsed, RequestShape.BATCH, 200, {"data": []}, "req_9", None, None))
    assert ok["custom_id"] == "r1" and ok["error"] is None and ok["id"].startswith("batch_req_")
    assert ok["response"] == {"status_code": 200, "request_id": "req_9", "body": {"data": []}}
    failed = json.loads(format_result(parsed, RequestShape.BATCH, 404, {"error": {}}, None, ["HTTP 404 x"], "http_404"))
    assert failed["error"] == {"code": "http_404", "message": "HTTP 404 x"}
    assert failed["response"]["status_code"] == 404


@pytest.mark.parametrize(
    "base, path, expected",
    [
        ("http://h:1/v1/chat/completions", "/v1/embeddings", "http://h:1/v1/embeddings"),
        ("https://gw.example/proxy/v1/embeddings", "/v1/chat/completions", "https://gw.example/proxy/v1/chat/completions"),
        ("http://h:1/v1", "/v1/embeddings", "http://h:1/v1/embeddings"),
        ("http://h:1/other", "v1/embeddings", "http://h:1/v1/embeddings"),
        ("http://h:1/v1/x", "http://elsewhere/v1/y", "http://elsewhere/v1/y"),
    ],
)
def test_join_batch_url(base: str, path: str, expected: str) -> None:
    assert join_batch_url(base, path) == expected


@pytest.mark.parametrize(
    "raw, shape, reason",
    [
        (b'{"model": "m", ', RequestShape.COOKBOOK, "invalid JSON"),
        (b"[1, 2]", RequestShape.COOKBOOK, "expected a JSON object"),
        (b'{"model": "\xff"}', RequestShape.COOKBOOK, "UTF-8"),
        (b'{"method": "POST", "url": "/v1/x", "body": {}}', RequestShape.BATCH, "custom_id"),
        (b'{"custom_id": "a", "url": "/v1/x", "body": 3}', RequestShape.BATCH, "body"),
        (b'{"custom_id": "a", "body": {}}', RequestShape.BATCH, "url"),
    ],
)
def test_invalid_lines_say_why(raw: bytes, shape: RequestShape, reason: str) -> None:
    parsed = parse_line(raw, shape, URL, 2)
    assert isinstance(parsed, InvalidLine) and reason in parsed.reason and parsed.line_index == 2


def test_invalid_line_records_in_both_shapes() -> None:
    line = InvalidLine(0, "invalid JSON (x)", '{"model": ', "r7")
    assert json.loads(format_invalid_line(line, RequestShape.COOKBOOK, "in.jsonl line 9: invalid JSON (x)")) == [
        '{"model": ', ["in.jsonl line 9: invalid JSON (x)"]]
    batch = json.loads(format_invalid_line(line, RequestShape.BATCH, "in.jsonl line 9: invalid JSON (x)"))
    assert batch["custom_id"] == "r7" and batch["response"] is None
    assert batch["error"] == {"code": "invalid_request_line", "message": "in.jsonl line 9: invalid JSON (x)"}
