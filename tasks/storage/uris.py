"""Storage: local paths and any URI smart-open reads and writes (s3://, gs://, azure://, http(s):// for input).

Features:
    - Inputs open in binary with seeking and no transparent decompression. ``open_range`` reads
      one shard: on S3 with GETs bounded to the shard's bytes (plus 64 KiB for its last line, and
      more in 64 KiB steps only when that line is longer). However many shards there are, the
      bytes fetched stay close to the object's size.
    - ``input_fingerprint`` identifies an input's content by its bytes: an S3 object's size and
      ETag, or a SHA-256 of the whole file. A touched or re-downloaded input keeps its fingerprint.
    - Compressed inputs (``.gz``, ``.bz2``, ``.zst``, by extension) cannot seek in compressed
      offsets, so ``decompress_to`` turns them into a local file in one streaming pass.
    - ``open_atomic_output`` writes the final output so that no reader ever sees a partial
      file. A local file is written to a temporary file beside it, fsynced and renamed. An object
      store gets a multipart upload inside a context manager, which is aborted on an error and
      completed only on success. The output is compressed when its name ends in one of the
      extensions above.
    - ``abort_stale_uploads`` removes the multipart uploads a killed process left open for an
      S3 key. ``remove_stale_temporaries`` does the same for local temporary files.
    - S3 settings come from the standard AWS configuration (``AWS_ENDPOINT_URL_S3``, profiles,
      instance roles), or from a boto3 client passed as ``transport_params={"client": ...}``.
    - ``describe_storage_error`` turns any storage failure into one line naming the URI.

Usage:
    >>> with open_input("s3://bucket/requests.jsonl") as handle:
    ...     handle.seek(1024); handle.readline()
    >>> with open_atomic_output("s3://bucket/results.jsonl.gz") as output:
    ...     output.write(b'{"a": 1}\\n')
"""

# Standard library imports
import contextlib
import errno
import glob
import hashlib
import io
import os
import shutil
import uuid
from typing import Any, BinaryIO, Dict, Iterator, Optional

# Third-party imports
import smart_open
from smart_open.compression import compression_wrapper

COMPRESSED_EXTENSIONS = (".gz", ".bz2", ".zst")
# The copy buffer of decompression.
COPY_BUFFER_BYTES = 1024 * 1024
# What a shard's ranged read fetches past its end for its last line, and each further step.
RANGE_SLACK_BYTES = 64 * 1024


def is_remote(uri: str) -> bool:
    """True for a URI with a scheme other than file://."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """A local path from a path or a file:// URI."""
    return uri.removeprefix("file://")


def compression_of(uri: str) -> Optional[str]:
    """The compression extension of a path or URI, or None."""
    lowered = uri.lower()
    return next((extension for extension in COMPRESSED_EXTENSIONS if lowered.endswith(extension)), None)


def open_input(uri: str, transport_params: Optional[Dict[str, Any]] = None) -> BinaryIO:
    """Open an input for binary reading with seeking, without transparent decompression."""
    if not is_remote(uri):
        return open(local_path(uri), "rb")
    params = dict(transport_params or {})
    if uri.startswith("s3://"):
        params.setdefault("defer_seek", True)
    return smart_open.open(uri, "rb", compression="disable", transport_params=params)


def open_range(uri: str, start: int, end: int, transport_params: Optional[Dict[str, Any]] = None) -> BinaryIO:
    """Open an input positioned at ``start`` for reading about ``end - start`` bytes (more if asked).

    S3 objects are read with bounded ranged GETs; other inputs are opened and seeked.
    """
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        reader = _S3RangeReader(_s3_client(transport_params), bucket, key, start, end + RANGE_SLACK_BYTES)
        return io.BufferedReader(reader, buffer_size=RANGE_SLACK_BYTES)
    handle = open_input(uri, transport_params)
    handle.seek(start)
    return handle


def input_size(uri: str, transport_params: Optional[Dict[str, Any]] = None) -> int:
    """The input's size in bytes."""
    if not is_remote(uri):
        return os.path.getsize(local_path(uri))
    with open_input(uri, transport_params) as handle:
        return handle.seek(0, io.SEEK_END)


def input_fingerprint(uri: str, transport_params: Optional[Dict[str, Any]] = None) -> str:
    """An id of the input's content, by its bytes, never by its modification time.

    An S3 object is known by its size and ETag (a hash of its content that S3 keeps); anything
    else is read once and hashed whole (SHA-256, about a second a gigabyte). A touched,
    re-downloaded or copied input with the same bytes has the same fingerprint.
    """
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        head = _s3_client(transport_params).head_object(Bucket=bucket, Key=key)
        return f"s3-{head.get('ContentLength')}-{str(head.get('ETag', '')).strip(chr(34))}"
    digest = hashlib.sha256()
    size = 0
    with open_input(uri, transport_params) as handle:
        for block in iter(lambda: handle.read(COPY_BUFFER_BYTES), b""):
            digest.update(block)
            size += len(block)
    return f"sha256-{size}-{digest.hexdigest()}"


def output_exists(uri: str, transport_params: Optional[Dict[str, Any]] = None) -> bool:
    """True when the output is there (an S3 object is asked for with HEAD; nothing is read)."""
    if not is_remote(uri):
        return os.path.isfile(local_path(uri))
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        try:
            _s3_client(transport_params).head_object(Bucket=bucket, Key=key)
            return True
        except Exception as error:
            if _client_error_code(error) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    try:
        with smart_open.open(uri, "rb", compression="disable", transport_params=transport_params) as handle:
            handle.read(1)
        return True
    except Exception:
        return False


def output_size(uri: str, transport_params: Optional[Dict[str, Any]] = None) -> Optional[int]:
    """The output's size in bytes; None when it is absent; -1 when it exists but its store tells no size."""
    if not output_exists(uri, transport_params):
        return None
    try:
        if not is_remote(uri):
            return os.path.getsize(local_path(uri))
        if uri.startswith("s3://"):
            bucket, _, key = uri[len("s3://"):].partition("/")
            return int(_s3_client(transport_params).head_object(Bucket=bucket, Key=key).get("ContentLength", -1))
    except Exception:
        return None
    return -1


def open_output_for_reading(uri: str, transport_params: Optional[Dict[str, Any]] = None) -> BinaryIO:
    """Open an earlier output to read its lines back, decompressed by its extension."""
    params = transport_params if is_remote(uri) else None
    return smart_open.open(uri if is_remote(uri) else local_path(uri), "rb",
                           compression=compression_of(uri) or "disable", transport_params=params)


def decompress_to(uri: str, target: str, transport_params: Optional[Dict[str, Any]] = None) -> None:
    """Decompress a .gz/.bz2/.zst input into a local (uncompressed) file, in one streaming pass, atomically."""
    params = transport_params if is_remote(uri) else None
    with smart_open.open(uri, "rb", compression=compression_of(uri), transport_params=params) as source, \
            open_atomic_output(target) as copy:
        shutil.copyfileobj(source, copy, COPY_BUFFER_BYTES)


@contextlib.contextmanager
def open_atomic_output(uri: str, transport_params: Optional[Dict[str, Any]] = None) -> Iterator[BinaryIO]:
    """Write an output that appears whole or not at all; compressed by its extension."""
    compression = compression_of(uri) or "disable"
    if is_remote(uri):
        # smart-open's multipart writer completes the upload on a clean exit and aborts it on an error.
        with smart_open.open(uri, "wb", compression=compression, transport_params=transport_params) as output:
            yield output
        return
    path = local_path(uri)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as raw:
            if compression == "disable":
                yield raw
            else:
                with compression_wrapper(raw, "wb", compression) as compressed:
                    yield compressed
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    _fsync_folder(folder)


def remove_stale_temporaries(uri: str) -> int:
    """Delete temporary files an interrupted assembly left beside a local output; return how many."""
    if is_remote(uri):
        return 0
    path = local_path(uri)
    pattern = os.path.join(os.path.dirname(os.path.abspath(path)), f".{glob.escape(os.path.basename(path))}.*.tmp")
    lock_files = f".{os.path.basename(path)}.lock."  # the job lock's own files: another run may be writing one now
    removed = 0
    for stale in glob.glob(pattern):
        if os.path.basename(stale).startswith(lock_files):
            continue
        with contextlib.suppress(OSError):
            os.remove(stale)
            removed += 1
    return removed


def abort_stale_uploads(uri: str, transport_params: Optional[Dict[str, Any]] = None) -> int:
    """Abort multipart uploads left open for an S3 key by a killed process; return how many."""
    if not uri.startswith("s3://"):
        return 0
    bucket, _, key = uri[len("s3://"):].partition("/")
    client = _s3_client(transport_params)
    aborted = 0
    listing = client.list_multipart_uploads(Bucket=bucket, Prefix=key)
    for upload in listing.get("Uploads", []):
        if upload.get("Key") == key:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
            aborted += 1
    return aborted


def describe_storage_error(uri: str, error: BaseException) -> str:
    """One line a user can act on, naming the URI."""
    code = _client_error_code(error)
    if code in ("NoSuchBucket",):
        return f"the bucket of {uri} does not exist"
    if code in ("NoSuchKey", "404", "NotFound") or isinstance(error, FileNotFoundError):
        return f"{uri} does not exist"
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or isinstance(error, PermissionError):
        return f"no permission to access {uri}"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"the disk is full while writing {uri}"
    text = " ".join(str(error).split()) or type(error).__name__
    if "Could not connect" in text or "EndpointConnectionError" in type(error).__name__ or "Connect" in type(error).__name__:
        return f"cannot reach the storage of {uri}: {text}"
    return f"storage error on {uri}: {text[:300]}"


class _S3RangeReader(io.RawIOBase):
    """Reads an S3 object from ``start`` with bounded GETs: up to ``first_end``, then small steps."""

    def __init__(self, client: Any, bucket: str, key: str, start: int, first_end: int) -> None:
        super().__init__()
        self._client, self._bucket, self._key = client, bucket, key
        self._position = start
        self._next_end = first_end
        self._body: Any = None
        self._at_end = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._at_end:
            if self._body is None:
                self._open_next()
                continue
            data = self._body.read(len(buffer))
            if data:
                buffer[:len(data)] = data
                self._position += len(data)
                return len(data)
            self._body.close()
            self._body = None
        return 0

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
        super().close()

    def _open_next(self) -> None:
        """Start the next bounded GET, or note the end of the object."""
        end = max(self._next_end, self._position + 1)
        self._next_end = end + RANGE_SLACK_BYTES
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=self._key,
                                               Range=f"bytes={self._position}-{end - 1}")
        except Exception as error:
            if _client_error_code(error) == "InvalidRange":
                self._at_end = True
                return
            raise
        self._body = response["Body"]
        total = str(response.get("ContentRange", "")).rpartition("/")[2]
        if total.isdigit() and end >= int(total):
            self._next_end = int(total)
            if self._position >= int(total):
                self._at_end = True


# Helpers


def _s3_client(transport_params: Optional[Dict[str, Any]]) -> Any:
    """The S3 client to use: the one given, or one from the standard AWS configuration."""
    if transport_params and transport_params.get("client") is not None:
        return transport_params["client"]
    import boto3

    return boto3.client("s3")


def _client_error_code(error: BaseException) -> str:
    """The error code of a botocore ClientError, found through the exception's causes."""
    seen = 0
    current: Optional[BaseException] = error
    while current is not None and seen < 5:
        response = getattr(current, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return str(response["Error"].get("Code", ""))
        current = current.__cause__ or current.__context__
        seen += 1
    return ""


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
