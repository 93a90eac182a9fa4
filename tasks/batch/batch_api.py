"""The OpenAI Files and Batch API client: upload, create, retrieve, find, cancel, download, delete.

Every call goes to the job's API host only: the base is the ``--request_url`` up to its ``/v1``
segment (``tasks.requests.request_formats.join_batch_url``), redirects are never followed, and
the key never appears in an error (``redact``). Transient failures (5xx, 408/409/429, resets,
timeouts) are retried with backoff; anything else raises ``BatchApiError`` naming the call.

Uploads are streamed from the file on disk and downloads are streamed to a file on disk, so a
200 MB batch file never sits in memory.

Usage:
    >>> async with aiohttp.ClientSession() as session:
    ...     api = BatchApi(session, "https://api.openai.com/v1/chat/completions", os.environ["OPENAI_API_KEY"])
    ...     file_id = await api.upload("batch-00001.jsonl", "job-3f2a batch-00001.jsonl")
    ...     batch = await api.create(file_id, "/v1/chat/completions", {"parallel_requests_job": "3f2a"})
    ...     batch = await api.retrieve(batch["id"])
"""

# Standard library imports
import asyncio
import os
from typing import Any, AsyncIterator, Dict, Optional

# Third-party imports
import aiohttp

# Local application imports
from tasks.api.api_client import auth_headers, backoff_seconds, redact
from tasks.requests import fast_json
from tasks.requests.request_formats import join_batch_url

# How many times one call is tried on transient failures, and the timeout of one try.
CALL_ATTEMPTS = 6
CALL_TIMEOUT_SECONDS = 600.0
# Statuses worth another try.
TRANSIENT_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
# How many batches one page of the list asks for.
LIST_PAGE = 100


class BatchApiError(RuntimeError):
    """A Files or Batch API call failed for good.

    Attributes:
        status: the HTTP status, or None when no answer arrived.
        code: the error body's ``code``, when it had one.
    """

    def __init__(self, message: str, status: Optional[int] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def transient(self) -> bool:
        """True when another try may work: no answer, or a 5xx, 408, 409 or 429."""
        return self.status is None or self.status in TRANSIENT_STATUSES

    @property
    def stops_the_run(self) -> bool:
        """True for a wrong key, no access or no quota: nothing will work until the user acts."""
        return self.status in (401, 403) or self.code in ("insufficient_quota", "no_batch_id")


class BatchApi:
    """The Files and Batch API of the job's host."""

    def __init__(self, session: aiohttp.ClientSession, request_url: str, api_key: Optional[str]) -> None:
        self.session = session
        self.request_url = request_url
        self.api_key = api_key
        self.headers = {name: value for name, value in auth_headers(api_key, "/deployments" in request_url).items()
                        if name != "Content-Type"}  # aiohttp sets it: JSON, or multipart with its boundary

    def url(self, path: str) -> str:
        """The full URL of an API path such as /v1/batches?limit=100 (the request URL's query, such as
        Azure's ``api-version``, is kept)."""
        path, _, query = path.partition("?")
        base = join_batch_url(self.request_url, path)
        return base if not query else base + ("&" if "?" in base else "?") + query

    async def upload(self, path: str, filename: str) -> str:
        """Upload a batch input file (purpose ``batch``); return its file id."""
        async def body() -> aiohttp.FormData:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", open(path, "rb"), filename=filename, content_type="application/jsonl")
            return form
        answer = await self._call("POST", "/v1/files", form=body, what=f"uploading {os.path.basename(path)}")
        return str(answer["id"])

    async def create(self, input_file_id: str, endpoint: str, metadata: Dict[str, str]) -> Dict[str, Any]:
        """Start a batch over an uploaded file (completion window 24h); return the batch object.

        Tried once: a create whose answer was lost (a 5xx, a reset, a timeout) may have made the batch,
        so the caller looks for it by its creation token before creating again (``BatchApiError.transient``).
        """
        batch = await self._call("POST", "/v1/batches", json_body={
            "input_file_id": input_file_id, "endpoint": endpoint, "completion_window": "24h", "metadata": metadata},
            what=f"creating a batch of {input_file_id}", attempts=1)
        if not isinstance(batch.get("id"), str) or not batch["id"]:
            raise BatchApiError(f"creating a batch of {input_file_id}: the answer holds no batch id (does this server "
                                "have the Batch API?)", 200, "no_batch_id")
        return batch

    async def retrieve(self, batch_id: str) -> Dict[str, Any]:
        """The batch object now."""
        return await self._call("GET", f"/v1/batches/{batch_id}", what=f"reading batch {batch_id}")

    async def cancel(self, batch_id: str) -> Dict[str, Any]:
        """Ask for a batch to be cancelled; return the batch object."""
        return await self._call("POST", f"/v1/batches/{batch_id}/cancel", what=f"cancelling batch {batch_id}")

    async def batches(self) -> AsyncIterator[Dict[str, Any]]:
        """Every batch of the key's organisation, newest first (paged)."""
        after: Optional[str] = None
        while True:
            query = f"?limit={LIST_PAGE}" + (f"&after={after}" if after else "")
            page = await self._call("GET", f"/v1/batches{query}", what="listing batches")
            data = page.get("data") or []
            for batch in data:
                yield batch
            if not page.get("has_more") or not data:
                return
            after = data[-1]["id"]

    async def download(self, file_id: str, path: str) -> None:
        """Stream a file's content to ``path`` (written beside it, then renamed into place)."""
        temporary = f"{path}.download"
        for attempt in range(1, CALL_ATTEMPTS + 1):
            try:
                async with self.session.get(self.url(f"/v1/files/{file_id}/content"), headers=self.headers,
                                            allow_redirects=False,
                                            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_SECONDS)) as response:
                    if response.status != 200:
                        raw = await response.read()
                        self._raise_unless_transient(response.status, raw, f"downloading {file_id}", attempt)
                        await asyncio.sleep(backoff_seconds(attempt, 1.0))
                        continue
                    with open(temporary, "wb") as handle:
                        async for chunk in response.content.iter_chunked(1 << 20):
                            handle.write(chunk)
                        handle.flush()
                        os.fsync(handle.fileno())
                os.replace(temporary, path)
                return
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                if attempt == CALL_ATTEMPTS:
                    raise BatchApiError(self._redact(f"downloading {file_id}: {type(error).__name__}: {error}")) from None
                await asyncio.sleep(backoff_seconds(attempt, 1.0))

    async def delete_file(self, file_id: str) -> None:
        """Delete a file; one already gone is fine."""
        try:
            await self._call("DELETE", f"/v1/files/{file_id}", what=f"deleting {file_id}")
        except BatchApiError as error:
            if error.status != 404:
                raise

    async def _call(self, method: str, path: str, what: str, json_body: Optional[Dict[str, Any]] = None,
                    form: Any = None, attempts: int = CALL_ATTEMPTS) -> Dict[str, Any]:
        """One JSON call, tried again on transient failures (up to ``attempts`` tries)."""
        for attempt in range(1, attempts + 1):
            try:
                data = await form() if form is not None else None
                async with self.session.request(method, self.url(path), headers=self.headers, json=json_body, data=data,
                                                allow_redirects=False,
                                                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_SECONDS)) as response:
                    raw = await response.read()
                    if 200 <= response.status < 300:
                        try:
                            answer = fast_json.loads(raw)
                        except ValueError:
                            answer = None
                        if isinstance(answer, dict):
                            return answer
                        raise BatchApiError(f"{what}: HTTP {response.status} with a body that is not a JSON object",
                                            response.status)
                    self._raise_unless_transient(response.status, raw, what, attempt, attempts)
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                if attempt == attempts:
                    raise BatchApiError(self._redact(f"{what}: {type(error).__name__}: {error}")) from None
            await asyncio.sleep(backoff_seconds(attempt, 1.0))
        raise BatchApiError(f"{what}: no answer after {attempts} tries")

    def _raise_unless_transient(self, status: int, raw: bytes, what: str, attempt: int,
                                attempts: int = CALL_ATTEMPTS) -> None:
        """Raise for an answer that another try will not change (or for the last try)."""
        code, message = _error_of(raw)
        if status in TRANSIENT_STATUSES and code != "insufficient_quota" and attempt < attempts:
            return
        if 300 <= status < 400:
            message = "the server answered with a redirect, which is never followed (the key stays with the host)"
        raise BatchApiError(self._redact(f"{what}: HTTP {status}{f' {code}' if code else ''}: {message}"), status, code)

    def _redact(self, text: str) -> str:
        """An error text without the key."""
        return redact(text, self.api_key)


def _error_of(raw: bytes) -> tuple:
    """(code, message) of an error body; the body's start when it is not OpenAI's shape."""
    try:
        body = fast_json.loads(raw)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return error.get("code"), str(error.get("message") or "")[:300]
    return None, raw[:200].decode("utf-8", "replace")
