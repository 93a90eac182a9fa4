"""The two JSONL request formats: reading request lines and writing result lines.

Input, one request per line, in either shape. The shape is detected once per file from its
first readable line:

    cookbook   the API body itself, with an optional ``metadata`` field that is not sent:
               {"model": "gpt-4o-mini", "messages": [...], "metadata": {"row_id": 7}}
    batch      the OpenAI Batch API's line; ``url`` is a path joined to the base URL:
               {"custom_id": "r7", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Output, one line per non-blank input line, in input order:

    cookbook   [request, response]  or  [request, response, metadata]
               failures: [request, ["error of attempt 1", ...]]  (+ metadata)
    batch      {"id": "batch_req_...", "custom_id": "r7",
                "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}
               failures carry ``"error": {"code": ..., "message": ...}`` and the last HTTP answer
               in ``response`` when there was one.

A line that is not JSON, not an object, not a valid batch line, or whose fields the engine reads
have the wrong type (``model`` a list, ``max_tokens`` a string...) becomes an ``InvalidLine``.
The caller writes it as that row's error record naming the file and line. It never stops the run.

A Batch line can never redirect the key: its ``url`` must be a path under the base URL (no
scheme, no host, no ``..``), and its ``method`` must be POST.

Usage:
    >>> shape = detect_shape(b'{"model": "m", "input": "hi"}\\n')
    >>> parse_line(b'{"model": "m", "input": "hi", "metadata": {"id": 1}}', shape,
    ...            "http://127.0.0.1:8000/v1/embeddings").metadata
    {'id': 1}

Pitfalls:
    - Work in bytes. ``str.splitlines()`` also splits on U+2028, which JSON strings may hold.
    - The Cookbook script appends metadata only when it is truthy; so do we.
    - The shape is decided on the first line that parses as a JSON object, whatever its length
      (a Batch line carrying a base64 image can be far over 64 KiB).
"""

# Standard library imports
import enum
import functools
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Union

# Local application imports
from tasks.requests import fast_json
from tasks.requests.row_identity import request_digest

# The Cookbook script's default request URL (kept so its command lines work unchanged).
DEFAULT_REQUEST_URL = "https://api.openai.com/v1/embeddings"
# How many lines shape detection reads, at most, looking for one that parses as an object.
SHAPE_DETECTION_LINES = 100
# Body fields the engine reads that must be whole numbers (with their smallest allowed value).
# Fields only a Responses API body has (``input`` alone is shared with embeddings).
RESPONSES_ONLY_FIELDS = frozenset({"instructions", "max_output_tokens", "reasoning", "tools", "tool_choice", "text",
                                   "previous_response_id", "include", "store", "background", "conversation",
                                   "max_tool_calls", "truncation"})
# Embedding models whose names do not say "embed".
EMBEDDING_MODEL_PREFIXES = ("bge-", "e5-", "gte-", "all-minilm", "text-similarity", "text-search")
WHOLE_NUMBER_FIELDS = {"max_tokens": 0, "max_completion_tokens": 0, "max_output_tokens": 0, "n": 1, "best_of": 1}
# Every body field ``body_problem`` checks.
_CHECKED_FIELDS = frozenset({"model", *WHOLE_NUMBER_FIELDS, "messages", "input", "prompt", "stream", "background"})


class RequestShape(enum.Enum):
    """The shape of a request file."""

    COOKBOOK = "cookbook"
    BATCH = "batch"


@dataclass(slots=True)
class ParsedRequest:
    """One valid request line, ready to send.

    Attributes:
        line_index: the line's index inside its shard (0-based, blank lines counted).
        url: the full URL to send to.
        method: the HTTP method.
        body: the JSON body that is sent.
        payload: ``body`` serialised, sent as is on every attempt.
        metadata: the cookbook line's metadata (never sent), or None.
        custom_id: the batch line's custom_id, or None.
        digest: the request's identity digest (``tasks.requests.row_identity``).
        endpoint: "chat", "completions", "embeddings" or "responses" (``endpoint_of``; told when not given).
        model: the body's model (validated to be a string or absent).
    """

    line_index: int
    url: str
    method: str
    body: Dict[str, Any]
    payload: bytes
    metadata: Any = None
    custom_id: Optional[str] = None
    digest: str = ""
    endpoint: str = ""
    model: Optional[str] = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = request_digest(self.method, self.url, self.body)
        if not self.endpoint:
            self.endpoint = endpoint_of(self.url, self.body)
        self.model = self.body.get("model")


@dataclass
class InvalidLine:
    """An input line that cannot be sent.

    Attributes:
        line_index: the line's index inside its shard (0-based, blank lines counted).
        reason: why it cannot be sent.
        raw_text: the line as text (for the cookbook output's request element).
        custom_id: the batch line's custom_id when it could be read (as written, even when it is not a string).
    """

    line_index: int
    reason: str
    raw_text: str
    custom_id: Any = None


def detect_shape(lines: Union[bytes, Iterable[bytes]]) -> RequestShape:
    """Detect a file's shape from its first complete lines: the first line that parses as an object decides.

    Args:
        lines: the file's lines (an open binary file will do), or a block of bytes holding whole lines.

    Returns:
        BATCH when that line has ``custom_id`` and ``body``; COOKBOOK otherwise.
    """
    if isinstance(lines, bytes):
        lines = lines.split(b"\n")
    for number, raw in enumerate(lines):
        if number >= SHAPE_DETECTION_LINES:
            break
        if not raw.strip():
            continue
        try:
            value = fast_json.loads(raw)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            return RequestShape.BATCH if {"custom_id", "body"} <= value.keys() else RequestShape.COOKBOOK
    return RequestShape.COOKBOOK


def parse_line(raw: bytes, shape: RequestShape, request_url: str, line_index: int = 0) -> Union[ParsedRequest, InvalidLine]:
    """Parse one non-blank input line.

    Args:
        raw: the line's bytes, with or without its line ending.
        shape: the file's shape.
        request_url: the ``--request_url`` (the target for cookbook lines; the base for batch lines).
        line_index: the line's index inside its shard.

    Returns:
        A ParsedRequest, or an InvalidLine saying why it cannot be sent.
    """
    raw = raw.rstrip(b"\r\n")
    try:
        value = fast_json.loads(raw)
    except UnicodeDecodeError:
        return InvalidLine(line_index, "the line is not valid UTF-8", raw.decode("utf-8", "replace"))
    except ValueError as error:
        return InvalidLine(line_index, f"invalid JSON ({error})", raw.decode("utf-8", "replace"))
    if not isinstance(value, dict):
        return InvalidLine(line_index, f"expected a JSON object, got {type(value).__name__}", raw.decode("utf-8", "replace"))
    if shape is RequestShape.BATCH:
        return _parse_batch_line(value, raw, request_url, line_index)
    had_metadata = "metadata" in value
    metadata = value.pop("metadata", None)
    endpoint = endpoint_of(request_url, value)
    problem = body_problem(value, endpoint)
    if problem:
        return InvalidLine(line_index, problem, raw.decode("utf-8", "replace"))
    # Without metadata the line itself is the body: send its bytes, with no second serialisation.
    payload = fast_json.dumps(value) if had_metadata else raw
    return ParsedRequest(line_index, request_url, "POST", value, payload, metadata=metadata, endpoint=endpoint)


def format_result(request: ParsedRequest, shape: RequestShape, status: Optional[int], body: Any,
                  request_id: Optional[str], errors: Optional[List[str]], error_code: Optional[str]) -> bytes:
    """Serialise one request's final result as an output line (without the newline).

    Args:
        request: the request.
        shape: the file's shape.
        status: the last HTTP status, or None when no answer arrived.
        body: the last answer's JSON body, or None.
        request_id: the server's request id.
        errors: None on success; otherwise one text per failed attempt.
        error_code: a short code for the failure (batch output's ``error.code``).

    Returns:
        The JSON line, as UTF-8 bytes.
    """
    if shape is RequestShape.COOKBOOK:
        second = body if errors is None else errors
        row = [request.body, second, request.metadata] if request.metadata else [request.body, second]
        return fast_json.dumps(row)
    response = None if status is None else {"status_code": status, "request_id": request_id, "body": body}
    error = None if errors is None else {"code": error_code or "request_failed", "message": errors[-1] if errors else ""}
    return fast_json.dumps({"id": _batch_request_id(), "custom_id": request.custom_id, "response": response,
                            "error": error})


def format_invalid_line(line: InvalidLine, shape: RequestShape, message: str) -> bytes:
    """Serialise an invalid input line's error record.

    Args:
        line: the invalid line.
        shape: the file's shape.
        message: the full message, naming the file and line number.

    Returns:
        The JSON line, as UTF-8 bytes.
    """
    if shape is RequestShape.COOKBOOK:
        return fast_json.dumps([line.raw_text, [message]])
    return fast_json.dumps({"id": _batch_request_id(), "custom_id": line.custom_id, "response": None,
                            "error": {"code": "invalid_request_line", "message": message}})


def body_problem(body: Dict[str, Any], endpoint: Optional[str] = None) -> Optional[str]:
    """Why a request body cannot be sent as it is (a field the engine reads has the wrong type), or None.

    Checks ``model`` (a string), the completion sizes and ``n`` (whole numbers), ``messages`` (a list
    of objects), ``prompt`` and an embeddings ``input`` (text, a list of texts, or token arrays), a
    Responses ``input`` (text, or a list of items), ``stream`` (answers are read whole, so
    streaming is refused) and a Responses ``background`` (its answer would hold no output yet).

    Args:
        body: the JSON body.
        endpoint: the endpoint (``endpoint_of``); None tells it from the body.
    """
    present = _CHECKED_FIELDS.intersection(body)  # most bodies hold two or three of them: check only those
    if not present:
        return None
    endpoint = endpoint or endpoint_of_body(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        return f"model must be a string, got {_type_name(model)}"
    if not present.isdisjoint(WHOLE_NUMBER_FIELDS):
        for name, smallest in WHOLE_NUMBER_FIELDS.items():
            value = body.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < smallest):
                return f"{name} must be a whole number of at least {smallest}, got {_short(value)}"
    messages = body.get("messages")
    if messages is not None and (not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages)):
        return "messages must be a list of objects"
    value = body.get("input")
    if value is None:
        pass
    elif endpoint == "responses":
        if not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(item, (dict, str)) for item in value)):
            return f"input must be a string or a list of input items, got {_type_name(value)}"
    elif not (isinstance(value, str) or _is_text_or_tokens(value)):
        return f"input must be a string, a list of strings, or token arrays, got {_type_name(value)}"
    if "prompt" in present:
        value = body["prompt"]
        if value is not None and not _is_text_or_tokens(value):
            return f"prompt must be a string, a list of strings, or token arrays, got {_type_name(value)}"
    if "stream" in present and body["stream"] is True:
        return "streamed answers are not supported: remove \"stream\": true"
    if endpoint == "responses" and body.get("background") is True:
        return "background responses are not supported (the answer would hold no output): remove \"background\": true"
    return None


def endpoint_of(url: str, body: Dict[str, Any]) -> str:
    """A request's endpoint: from its URL's path when it says, else from its body (``endpoint_of_body``).

    Returns:
        "chat", "completions", "embeddings" or "responses".
    """
    return endpoint_of_url(url) or endpoint_of_body(body)


@functools.lru_cache(maxsize=256)  # a run has a few URLs and asks for each row
def endpoint_of_url(url: str) -> Optional[str]:
    """Tell the endpoint from a URL path, or None when the path does not say."""
    path = url.split("?", 1)[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/embeddings"):
        return "embeddings"
    if path.endswith("/completions"):
        return "completions"
    if path.endswith("/responses"):
        return "responses"
    return None


def endpoint_of_body(body: Dict[str, Any]) -> str:
    """Tell the endpoint from a body alone: "chat", "responses", "embeddings" or "completions".

    ``input`` belongs to both embeddings and the Responses API. A body is a Responses one when it
    has a field only that API has (``instructions``, ``max_output_tokens``, ``reasoning``, ``tools``,
    ``text``, ``previous_response_id``...) or input items that are objects, or when its model is
    not an embedding model; otherwise it is an embeddings one.
    """
    if "messages" in body:
        return "chat"
    if "input" in body:
        if RESPONSES_ONLY_FIELDS & body.keys():
            return "responses"
        value = body["input"]
        if isinstance(value, list) and any(isinstance(item, dict) for item in value):
            return "responses"
        model = body.get("model")
        if isinstance(model, str) and model and not _is_embedding_model(model):
            return "responses"
        return "embeddings"
    if "prompt" in body:
        return "completions"
    return "chat"


def join_batch_url(request_url: str, path: str) -> str:
    """Join a batch line's ``url`` (a path such as /v1/chat/completions) to the base URL.

    The base is ``request_url`` up to its ``/v1`` segment (so a gateway prefix such as
    ``/proxy/v1/embeddings`` is kept), or its origin when it has none.

    Raises:
        ValueError: when ``path`` is not a plain path (a scheme, a host, ``..``, a backslash or a
            control character): an input line must never send the key anywhere else.
    """
    problem = _batch_path_problem(path)
    if problem:
        raise ValueError(problem)
    parts = urllib.parse.urlsplit(request_url)
    prefix = parts.path
    cut = prefix.find("/v1/") if "/v1/" in prefix else (prefix.find("/v1") if prefix.endswith("/v1") else -1)
    prefix = prefix[:cut] if cut >= 0 else ""
    if not path.startswith("/"):
        path = "/" + path
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, prefix + path, parts.query, ""))


# Helpers


def _parse_batch_line(value: Dict[str, Any], raw: bytes, request_url: str, line_index: int) -> Union[ParsedRequest, InvalidLine]:
    """Check a batch line's fields and build its request."""
    custom_id = value.get("custom_id")
    text = raw.decode("utf-8", "replace")
    if not isinstance(custom_id, str) or not custom_id:
        return InvalidLine(line_index, f"a batch line needs a non-empty string custom_id, got {_short(custom_id)}", text,
                           custom_id if custom_id not in (None, "") else None)
    body = value.get("body")
    if not isinstance(body, dict):
        return InvalidLine(line_index, "a batch line needs a JSON object body", text, custom_id)
    url = value.get("url")
    if not isinstance(url, str) or not url:
        return InvalidLine(line_index, "a batch line needs a url such as /v1/chat/completions", text, custom_id)
    method = value.get("method", "POST")
    if not isinstance(method, str) or method.upper() != "POST":
        return InvalidLine(line_index, f"a batch line's method must be POST, got {_short(method)}", text, custom_id)
    try:
        target = join_batch_url(request_url, url)
    except ValueError as error:
        return InvalidLine(line_index, str(error), text, custom_id)
    endpoint = endpoint_of(target, body)
    problem = body_problem(body, endpoint)
    if problem:
        return InvalidLine(line_index, problem, text, custom_id)
    return ParsedRequest(line_index, target, "POST", body, fast_json.dumps(body), custom_id=custom_id,
                         endpoint=endpoint)


def _batch_path_problem(path: str) -> Optional[str]:
    """Why a batch line's url is not a plain path under the base URL, or None."""
    parts = urllib.parse.urlsplit(path)
    if parts.scheme or parts.netloc or path.startswith(("//", "\\")):
        return f"a batch line's url must be a path such as /v1/chat/completions, not {_short(path)}"
    if "\\" in path or any(ord(char) < 32 or ord(char) == 127 for char in path) or " " in path:
        return f"a batch line's url has characters a path cannot hold: {_short(path)}"
    decoded = urllib.parse.unquote(parts.path)
    if any(segment in ("..", ".") for segment in decoded.split("/")):
        return f"a batch line's url must not leave the base URL: {_short(path)}"
    return None


def _is_embedding_model(model: str) -> bool:
    """True for a model name that looks like an embedding model's (text-embedding-3-small, nomic-embed-text, bge-m3...)."""
    name = model.lower().rsplit("/", 1)[-1]
    return "embed" in name or name.startswith(EMBEDDING_MODEL_PREFIXES)


def _is_text_or_tokens(value: Any) -> bool:
    """True for a string, a list of strings, a token array, or a list of token arrays."""
    if isinstance(value, str):
        return True
    if not isinstance(value, list):
        return False
    return all(isinstance(item, str) or _is_token_array(item) for item in value) or _is_token_array(value)


def _is_token_array(value: Any) -> bool:
    """True for a list of whole numbers."""
    return isinstance(value, list) and all(isinstance(item, int) and not isinstance(item, bool) for item in value)


def _type_name(value: Any) -> str:
    """A JSON type's name for messages: "list", "object", "number"..."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 80) -> str:
    """A value quoted for a message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _batch_request_id() -> str:
    """A fresh id for a batch output line, as the Batch API gives one."""
    return f"batch_req_{uuid.uuid4().hex}"
