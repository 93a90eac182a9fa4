"""The OpenAI Files and Batch API, as documented, inside the project's test server, on a time scale.

``tools.openai_test_server`` mounts these routes on its application:

    POST   /v1/files                    upload (multipart: ``purpose``, ``file``)
    GET    /v1/files/{id}               the file object
    GET    /v1/files/{id}/content       its bytes
    DELETE /v1/files/{id}               delete it
    POST   /v1/batches                  create: {input_file_id, endpoint, completion_window: "24h", metadata}
    GET    /v1/batches/{id}             retrieve
    GET    /v1/batches?limit=&after=    list, newest first
    POST   /v1/batches/{id}/cancel      cancel

A batch goes ``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed``, or ``failed``
(an input file the API refuses, or the enqueued-token cap), ``expired``, ``cancelling`` ->
``cancelled``. Its rows are answered by the test server's own handlers, at
``batch_rows_per_second``, with ``request_counts`` moving as they go. States advance lazily,
whenever a batch or a file is read. Results go into an output file (2xx answers) and an error file
(everything else, and the rows an expiry or a cancel cut off: ``batch_expired``, ``batch_cancelled``),
in an order that is not the input's.

Validation refuses a whole file, as the real API does: lines that are not JSON objects with
``custom_id``, ``method`` POST, ``url`` equal to the batch's endpoint and a ``body``; a duplicate
``custom_id``; more than one model; more than 50,000 lines or 200 MB; an embeddings batch of
more than 50,000 inputs.

Faults on the time scale (``ServerConfig`` fields):
    - ``batch_row_fault_rate``: the share of rows answered 500 in the error file;
    - ``batch_expire_fraction`` (with ``batch_expire_count``): a batch expires once this share of its
      rows is done (the first N batches only, when a count is given);
    - ``batch_queue_tokens``: the cap on the input tokens of one model's ``validating`` and
      ``in_progress`` batches; a batch over it fails with ``token_limit_exceeded`` and OpenAI's message.

``/_stats`` gains ``batches``: how many were created, duplicates of one ``metadata`` (the same
job's file submitted twice), refusals for the token cap, rows answered, files alive.

Usage:
    >>> server = start_server_thread(ServerConfig(batch_rows_per_second=500, batch_expire_fraction=0.3))
    >>> server.stats()["batches"]["created"]
"""

# Standard library imports
import collections
import json
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

# Third-party imports
from aiohttp import web

if TYPE_CHECKING:  # the server imports this module; the type is named only for hints
    from tools.openai_test_server import OpenAITestServer

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses", "/v1/moderations")
MAX_LINES = 50_000
MAX_BYTES = 200 * 1024 * 1024
MAX_EMBEDDING_INPUTS = 50_000
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class StoredFile:
    """A file of the Files API."""

    id: str
    purpose: str
    filename: str
    content: bytes
    created_at: int

    def as_object(self) -> Dict[str, Any]:
        """The file object."""
        return {"id": self.id, "object": "file", "bytes": len(self.content), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


@dataclass
class Batch:
    """A batch and where its simulation stands."""

    id: str
    input_file_id: str
    endpoint: str
    metadata: Dict[str, Any]
    created_at: float
    lines: List[Tuple[str, Dict[str, Any]]] = field(default_factory=list)  # (custom_id, body)
    status: str = "validating"
    started_at: Optional[float] = None
    done: int = 0
    failed: int = 0
    expires_after: Optional[int] = None
    queued_tokens: int = 0
    model: str = ""
    output: List[bytes] = field(default_factory=list)
    errors_out: List[bytes] = field(default_factory=list)
    errors: Optional[Dict[str, Any]] = None
    output_file_id: Optional[str] = None
    error_file_id: Optional[str] = None
    times: Dict[str, int] = field(default_factory=dict)

    def as_object(self) -> Dict[str, Any]:
        """The batch object, as the API returns it."""
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": self.errors,
                "input_file_id": self.input_file_id, "completion_window": "24h", "status": self.status,
                "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": int(self.created_at), "in_progress_at": self.times.get("in_progress"),
                "expires_at": int(self.created_at) + 86400, "finalizing_at": self.times.get("finalizing"),
                "completed_at": self.times.get("completed"), "failed_at": self.times.get("failed"),
                "expired_at": self.times.get("expired"), "cancelling_at": self.times.get("cancelling"),
                "cancelled_at": self.times.get("cancelled"),
                "request_counts": {"total": len(self.lines), "completed": self.done - self.failed, "failed": self.failed},
                "metadata": self.metadata}


class BatchTestApi:
    """The Files and Batch API of a test server."""

    def __init__(self, server: "OpenAITestServer") -> None:
        self.server = server
        self.config = server.config
        self.files: Dict[str, StoredFile] = {}
        self.batches: Dict[str, Batch] = {}
        self.order: List[str] = []  # batch ids, oldest first
        self.random = random.Random(self.config.seed + 1)
        self.stats: collections.Counter = collections.Counter()
        self.metadata_seen: collections.Counter = collections.Counter()

    def add_routes(self, app: web.Application) -> None:
        """Mount the routes."""
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files/{id}", self.file_object)
        app.router.add_get("/v1/files/{id}/content", self.file_content)
        app.router.add_delete("/v1/files/{id}", self.delete_file)
        app.router.add_post("/v1/batches", self.create)
        app.router.add_get("/v1/batches", self.list)
        app.router.add_get("/v1/batches/{id}", self.retrieve)
        app.router.add_post("/v1/batches/{id}/cancel", self.cancel)
        app.router.add_post("/_forget_batches", self.forget)

    def stats_view(self) -> Dict[str, Any]:
        """What ``/_stats`` reports under ``batches``."""
        by_status = collections.Counter(batch.status for batch in self.batches.values())
        return {"created": self.stats["created"], "by_status": dict(by_status),
                "duplicate_metadata": sum(count - 1 for count in self.metadata_seen.values() if count > 1),
                "queue_refusals": self.stats["queue_refusals"], "rows_answered": self.stats["rows_answered"],
                "rows_created": self.stats["rows_created"], "uploads": self.stats["uploads"],
                "files_alive": len(self.files), "cancels": self.stats["cancels"]}

    # Files

    async def upload(self, request: web.Request) -> web.Response:
        """POST /v1/files."""
        denied = self._denied(request)
        if denied:
            return denied
        form = await request.post()
        upload = form.get("file")
        purpose = form.get("purpose")
        if purpose != "batch" or not hasattr(upload, "file"):
            return _error(400, "a multipart upload with purpose 'batch' and a file is required")
        content = upload.file.read()
        stored = StoredFile(f"file-{uuid.uuid4().hex[:24]}", "batch", upload.filename or "upload.jsonl", content,
                            int(time.time()))
        self.files[stored.id] = stored
        self.stats["uploads"] += 1
        return web.json_response(stored.as_object())

    async def file_object(self, request: web.Request) -> web.Response:
        """GET /v1/files/{id}."""
        self._advance_all()
        stored = self.files.get(request.match_info["id"])
        return web.json_response(stored.as_object()) if stored else _error(404, "No such File object", "not_found")

    async def file_content(self, request: web.Request) -> web.Response:
        """GET /v1/files/{id}/content."""
        denied = self._denied(request)
        if denied:
            return denied
        self._advance_all()
        stored = self.files.get(request.match_info["id"])
        if stored is None:
            return _error(404, "No such File object", "not_found")
        content = stored.content
        if len(content) > 1 and self.stats["cut_downloads"] < self.config.batch_cut_downloads:
            self.stats["cut_downloads"] += 1  # the transfer stops half-way: the last line is cut off
            content = content[: len(content) // 2 + 1]
        return web.Response(body=content, content_type="application/octet-stream")

    async def delete_file(self, request: web.Request) -> web.Response:
        """DELETE /v1/files/{id}."""
        stored = self.files.pop(request.match_info["id"], None)
        if stored is None:
            return _error(404, "No such File object", "not_found")
        return web.json_response({"id": stored.id, "object": "file", "deleted": True})

    async def forget(self, request: web.Request) -> web.Response:
        """POST /_forget_batches: drop every batch and file, as a server that lost its state (or another
        organisation's key) would see them."""
        forgotten = {"batches": len(self.batches), "files": len(self.files)}
        self.batches.clear()
        self.files.clear()
        self.order.clear()
        return web.json_response(forgotten)

    # Batches

    async def create(self, request: web.Request) -> web.Response:
        """POST /v1/batches."""
        denied = self._denied(request)
        if denied:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        stored = self.files.get(body.get("input_file_id") or "")
        if stored is None:
            return _error(400, f"Invalid input_file_id: {body.get('input_file_id')!r}")
        if body.get("endpoint") not in BATCH_ENDPOINTS or body.get("completion_window") != "24h":
            return _error(400, "endpoint must be a batchable endpoint and completion_window '24h'")
        metadata = body.get("metadata") or {}
        batch = Batch(f"batch_{uuid.uuid4().hex[:24]}", stored.id, body["endpoint"], metadata, time.time())
        self.batches[batch.id] = batch
        self.order.append(batch.id)
        self.stats["created"] += 1
        if metadata:
            self.metadata_seen[json.dumps(metadata, sort_keys=True)] += 1
        self._validate(batch, stored)
        if self.stats["created"] <= self.config.batch_create_lost_answers:  # made, but the answer is lost
            return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        return web.json_response(batch.as_object())

    async def retrieve(self, request: web.Request) -> web.Response:
        """GET /v1/batches/{id}."""
        denied = self._denied(request)
        if denied:
            return denied
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "No such Batch object", "not_found")
        self._advance(batch)
        return web.json_response(batch.as_object())

    async def list(self, request: web.Request) -> web.Response:
        """GET /v1/batches, newest first, paged with ``limit`` and ``after``."""
        denied = self._denied(request)
        if denied:
            return denied
        self._advance_all()
        limit = max(1, min(100, int(request.query.get("limit", "20"))))
        ids = list(reversed(self.order))
        after = request.query.get("after")
        if after in ids:
            ids = ids[ids.index(after) + 1:]
        page = [self.batches[batch_id].as_object() for batch_id in ids[:limit]]
        return web.json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit})

    async def cancel(self, request: web.Request) -> web.Response:
        """POST /v1/batches/{id}/cancel."""
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "No such Batch object", "not_found")
        self._advance(batch)
        if batch.status not in TERMINAL:
            self.stats["cancels"] += 1
            batch.times["cancelling"] = int(time.time())
            self._finish(batch, "cancelled", "batch_cancelled", "This request was cancelled with its batch.")
        return web.json_response(batch.as_object())

    # The simulation

    def _validate(self, batch: Batch, stored: StoredFile) -> None:
        """Read the input file: a file the API refuses fails the whole batch at once."""
        problem = None
        models = set()
        seen = set()
        inputs = 0
        if len(stored.content) > MAX_BYTES:
            problem = ("file_too_large", f"The input file is larger than {MAX_BYTES} bytes.")
        for number, raw in enumerate(stored.content.splitlines(), start=1):
            if problem:
                break
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                problem = ("invalid_json_line", f"Line {number} is not valid JSON.", number)
                break
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str) or "body" not in line:
                problem = ("missing_required_parameter", f"Line {number} needs custom_id, method, url and body.", number)
            elif line["custom_id"] in seen:
                problem = ("duplicate_custom_id", f"The custom_id for line {number} is not unique.", number)
            elif line.get("method") != "POST" or line.get("url") != batch.endpoint:
                problem = ("mismatched_endpoint", f"Line {number}'s url is not the batch's endpoint {batch.endpoint}.",
                           number)
            else:
                seen.add(line["custom_id"])
                body = line["body"]
                models.add(body.get("model") if isinstance(body, dict) else None)
                if batch.endpoint == "/v1/embeddings" and isinstance(body, dict):
                    value = body.get("input")
                    inputs += len(value) if isinstance(value, list) and not all(isinstance(i, int) for i in value) else 1
                batch.lines.append((line["custom_id"], body))
                batch.queued_tokens += self.server.queued_tokens_of(batch.endpoint, body)
        if problem is None and len(batch.lines) > MAX_LINES:
            problem = ("too_many_requests", f"The input file has more than {MAX_LINES} requests.")
        if problem is None and len(models) > 1:
            problem = ("mismatched_model", "All requests of a batch must use the same model.")
        if problem is None and inputs > MAX_EMBEDDING_INPUTS:
            problem = ("too_many_inputs", f"An embeddings batch may hold at most {MAX_EMBEDDING_INPUTS} inputs.")
        batch.model = next(iter(models), None) or ""
        if problem:
            self._fail(batch, *problem)
            return
        self.stats["rows_created"] += len(batch.lines)
        cap = self.config.batch_queue_tokens
        if cap is not None:
            queued = sum(other.queued_tokens for other in self.batches.values()
                         if other is not batch and other.model == batch.model and other.status in ("validating", "in_progress"))
            if queued + batch.queued_tokens > cap:
                self.stats["queue_refusals"] += 1
                self._fail(batch, "token_limit_exceeded",
                           f"Enqueued token limit reached for {batch.model} in organization org-test. Limit: {cap:,} "
                           "enqueued tokens. Please try again once some in_progress batches have been completed.")
                return
        fraction = self.config.batch_expire_fraction
        count = self.config.batch_expire_count
        if fraction is not None and (count is None or self.stats["expiring"] < count):
            self.stats["expiring"] += 1
            batch.expires_after = int(math.ceil(fraction * len(batch.lines)))

    def _fail(self, batch: Batch, code: str, message: str, line: Optional[int] = None) -> None:
        """A batch the API refused (``line``: the 1-based input line at fault, as OpenAI names it)."""
        batch.status = "failed"
        batch.times["failed"] = int(time.time())
        batch.errors = {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": line}]}
        batch.lines = []

    def _advance_all(self) -> None:
        """Bring every batch up to now."""
        for batch in list(self.batches.values()):
            self._advance(batch)

    def _advance(self, batch: Batch) -> None:
        """Move a batch along its states, answering the rows due by now."""
        if batch.status in TERMINAL:
            return
        now = time.time()
        if batch.status == "validating":
            if now - batch.created_at < self.config.batch_validating_seconds:
                return
            batch.status = "in_progress"
            batch.started_at = batch.created_at + self.config.batch_validating_seconds
            batch.times["in_progress"] = int(now)
        due = min(len(batch.lines), int((now - (batch.started_at or now)) * self.config.batch_rows_per_second))
        if batch.expires_after is not None:
            due = min(due, batch.expires_after)
        while batch.done < due:
            self._answer_row(batch, batch.lines[batch.done])
            batch.done += 1
        if batch.expires_after is not None and batch.done >= batch.expires_after and batch.done < len(batch.lines):
            self._finish(batch, "expired", "batch_expired",
                         "This request could not be executed before the completion window expired.")
        elif batch.done >= len(batch.lines):
            batch.times["finalizing"] = int(now)
            self._finish(batch, "completed", None, None)

    def _answer_row(self, batch: Batch, line: Tuple[str, Dict[str, Any]]) -> None:
        """Answer one row into the batch's output or error lines."""
        custom_id, body = line
        request_id = f"req_{uuid.uuid4().hex[:24]}"
        if self.config.batch_row_fault_rate and self.random.random() < self.config.batch_row_fault_rate:
            status, answer = 500, {"error": {"message": "The server had an error while processing your request.",
                                             "type": "server_error", "param": None, "code": None}}
        else:
            status, answer = self.server.answer_batch_line(batch.endpoint, body)
            self.stats["rows_answered"] += 1
        record = json.dumps({"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id,
                             "response": {"status_code": status, "request_id": request_id, "body": answer},
                             "error": None}).encode()
        if 200 <= status < 300:
            batch.output.append(record)
        else:
            batch.failed += 1
            batch.errors_out.append(record)

    def _finish(self, batch: Batch, status: str, cut_code: Optional[str], cut_message: Optional[str]) -> None:
        """End a batch: rows not done are cut off with ``cut_code``; the output and error files are written."""
        for custom_id, _ in batch.lines[batch.done:]:
            batch.errors_out.append(json.dumps({"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id,
                                                "response": None,
                                                "error": {"code": cut_code, "message": cut_message}}).encode())
            batch.failed += 1
            batch.done += 1
        self.random.shuffle(batch.output)  # output lines come in any order, joined by custom_id
        for records, attribute in ((batch.output, "output_file_id"), (batch.errors_out, "error_file_id")):
            if records:
                stored = StoredFile(f"file-{uuid.uuid4().hex[:24]}", "batch_output", f"{batch.id}_{attribute}.jsonl",
                                    b"\n".join(records) + b"\n", int(time.time()))
                self.files[stored.id] = stored
                setattr(batch, attribute, stored.id)
        batch.output, batch.errors_out = [], []
        batch.status = status
        batch.times[status] = int(time.time())

    def _denied(self, request: web.Request) -> Optional[web.Response]:
        """A 401 when the server wants a key and the request lacks it."""
        key = self.config.api_key
        if key and request.headers.get("Authorization") != f"Bearer {key}" and request.headers.get("api-key") != key:
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        return None


def _error(status: int, message: str, code: Optional[str] = None) -> web.Response:
    """An error answer in OpenAI's shape."""
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                        "code": code}}, status=status)
