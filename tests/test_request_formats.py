"""The two request file shapes: detection, parsing, invalid lines, and the output lines of each."""

# Standard library imports
import json

# Third-party imports
import pytest

# Local application imports
from tasks.requests.request_formats import (
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
    ],
)
def test_join_batch_url(base: str, path: str, expected: str) -> None:
    assert join_batch_url(base, path) == expected


@pytest.mark.parametrize("path", ["http://elsewhere/v1/y", "https://h:1/v1/embeddings", "//elsewhere/v1/y",
                                  "/v1/../admin", "/v1/%2e%2e/admin", "\\\\elsewhere\\v1", "/v1/x\ny", "javascript:alert(1)"])
def test_a_batch_url_never_leaves_the_base_url(path: str) -> None:
    with pytest.raises(ValueError):
        join_batch_url("http://h:1/v1/x", path)
    line = json.dumps({"custom_id": "c", "method": "POST", "url": path, "body": {"model": "m", "input": "x"}}).encode()
    parsed = parse_line(line, RequestShape.BATCH, "http://h:1/v1/x")
    assert isinstance(parsed, InvalidLine) and parsed.custom_id == "c"


@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT", "post ", 7])
def test_a_batch_line_must_post(method) -> None:
    line = json.dumps({"custom_id": "c", "method": method, "url": "/v1/embeddings", "body": {"model": "m"}}).encode()
    parsed = parse_line(line, RequestShape.BATCH, "http://h:1/v1/x")
    assert isinstance(parsed, InvalidLine) and "POST" in parsed.reason


@pytest.mark.parametrize("body, field", [
    ({"model": ["a"], "input": "x"}, "model"), ({"model": {"a": 1}, "input": "x"}, "model"),
    ({"model": "m", "input": "x", "max_tokens": "10"}, "max_tokens"), ({"model": "m", "input": "x", "n": 0}, "n"),
    ({"model": "m", "input": "x", "max_tokens": True}, "max_tokens"), ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": ["hi"]}, "messages"), ({"model": "m", "input": {"a": 1}}, "input"),
    ({"model": "m", "prompt": 5}, "prompt"), ({"model": "m", "messages": [], "stream": True}, "stream"),
])
def test_a_field_of_the_wrong_type_is_that_rows_error(body, field: str) -> None:
    for shape, line in ((RequestShape.COOKBOOK, body),
                        (RequestShape.BATCH, {"custom_id": "c", "url": "/v1/chat/completions", "body": body})):
        parsed = parse_line(json.dumps(line).encode(), shape, "http://h:1/v1/chat/completions")
        assert isinstance(parsed, InvalidLine) and field in parsed.reason, parsed


def test_a_background_response_is_that_rows_error_and_a_foreground_one_is_sent() -> None:
    url = "http://h:1/v1/responses"
    parsed = parse_line(b'{"model": "gpt-4.1", "input": "hi", "background": true}', RequestShape.COOKBOOK, url)
    assert isinstance(parsed, InvalidLine) and "background" in parsed.reason
    parsed = parse_line(b'{"model": "gpt-4.1", "input": "hi", "background": false}', RequestShape.COOKBOOK, url)
    assert not isinstance(parsed, InvalidLine)


def test_the_shape_is_decided_on_the_first_complete_line_whatever_its_length() -> None:
    image = "data:image/png;base64," + "A" * 200_000
    first = json.dumps({"custom_id": "r0", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "m", "messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": image}}]}]}}).encode()
    assert len(first) > 100_000
    assert detect_shape(iter([b"\n", first + b"\n", b'{"model": "m"}\n'])) is RequestShape.BATCH


def test_identical_requests_have_one_digest_whatever_the_key_order_or_metadata() -> None:
    url = "http://h:1/v1/embeddings"
    one = parse_line(b'{"model": "m", "input": "x", "metadata": {"row": 1}}', RequestShape.COOKBOOK, url)
    two = parse_line(b'{"input":"x","model":"m"}', RequestShape.COOKBOOK, url)
    other = parse_line(b'{"input":"y","model":"m"}', RequestShape.COOKBOOK, url)
    elsewhere = parse_line(b'{"input":"x","model":"m"}', RequestShape.COOKBOOK, "http://h:2/v1/embeddings")
    assert one.digest == two.digest and len({one.digest, other.digest, elsewhere.digest}) == 3


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
