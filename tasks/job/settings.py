"""A run's settings that both the command line and the flow check: defaults, limits, paths.

The command line checks its flags here before Prefect is imported (a bad flag costs nothing and
is refused at once); the flow checks its parameters here when run as a deployment. Standard
library only, so the command line stays light until the embedded Prefect API is on its way.

Usage:
    >>> validate_settings(6_000, 1_000_000, max_attempts=5, max_in_flight=200, shards=None, burst_seconds=1.0,
    ...                   uris=job_paths("requests.jsonl", None, None))
    >>> default_save_path("requests.jsonl")
    'requests_results.jsonl'
"""

# Standard library imports
import os
import urllib.parse
from typing import Optional, Sequence

# Local application imports
from tasks.job.work_location import default_work_dir

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_MAX_IN_FLIGHT = 200
# The run's modes, and where rows a batch left go.
MODES = ("online", "batch")
BATCH_FALLBACKS = ("batch", "online")
# The Batch API's most requests per input file.
MAX_BATCH_REQUESTS = 50_000
# The most shards a run may have: each holds a part file and an input handle open while it runs.
MAX_SHARDS = 256


def check_engine_settings(max_requests_per_minute: Optional[float], max_tokens_per_minute: Optional[float],
                          max_in_flight: int, burst_seconds: float, target_utilization: float) -> None:
    """Reject limits and engine settings no engine can work with (the one place both engines and the run check them).

    Raises:
        ValueError: naming the setting and the value.
    """
    for name, value in (("max_requests_per_minute", max_requests_per_minute),
                        ("max_tokens_per_minute", max_tokens_per_minute)):
        if value is not None and not (value > 0):
            raise ValueError(f"{name} must be positive (or 'inf' for no limit), got {value!r}")
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be a whole number of at least 1, got {max_in_flight!r}")
    if not burst_seconds > 0:
        raise ValueError(f"burst_seconds must be positive, got {burst_seconds!r}")
    if not 0 < target_utilization <= 1:
        raise ValueError(f"target_utilization must be above 0 and at most 1, got {target_utilization!r}")


# Query parameters of a request URL that hold a secret (compared in lower case, "-" read as "_").
SECRET_QUERY_NAMES = frozenset({"key", "api_key", "apikey", "token", "access_token", "secret", "password", "sig",
                                "signature", "auth", "authorization"})


def validate_settings(max_requests_per_minute: Optional[float], max_tokens_per_minute: Optional[float],
                      max_attempts: int, max_in_flight: int, shards: Optional[int], burst_seconds: float,
                      target_utilization: float = 0.98, limiter: Optional[str] = None,
                      shard_deployment: Optional[str] = None, dask_cluster: Optional[str] = None,
                      uris: Sequence[str] = (), request_url: Optional[str] = None) -> None:
    """Reject settings the run cannot work with, before anything is sent.

    Args:
        uris: the input, output and work paths: checked for credentials written into them, that
            none of them is another (the output must never overwrite the input), and that the work
            folder is local.
        request_url: checked for credentials written into it (a user:password, or a key in the query):
            they would show in parameters, logs and the work folder.

    Raises:
        ValueError: naming the setting and the value (never a secret).
    """
    check_engine_settings(max_requests_per_minute, max_tokens_per_minute, max_in_flight, burst_seconds,
                          target_utilization)
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    if shards is not None and not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be from 1 to {MAX_SHARDS}, got {shards}")
    if (shard_deployment or dask_cluster) and not limiter:
        raise ValueError("shard_deployment and dask_cluster need limiter: the processes must share one rate limit")
    if limiter and not limiter.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"limiter must be a redis:// URL, got {limiter.rpartition('@')[2]!r}")
    if limiter and (has_password(limiter) or "password" in limiter.partition("?")[2].lower()):
        raise ValueError("limiter must not carry a password (it would show in parameters and logs); "
                         "put it in PARALLEL_REQUESTS_REDIS_PASSWORD")
    for uri in uris:
        if "://" in uri and has_password(uri):
            raise ValueError(f"{uri.split('://', 1)[0]}:// paths must not carry credentials (they would show in "
                             "parameters and logs); use the standard AWS configuration or --aws-credentials-block")
    if len(uris) >= 3 and "://" in uris[2] and not uris[2].startswith("file://"):
        raise ValueError(f"the work folder must be a local folder, not a {uris[2].split('://', 1)[0]}:// URI "
                         "(its parts, lock and resume state need a local or shared file system); choose another "
                         "--work-dir, or leave it out: a remote output's work folder is in the local cache")
    if request_url:
        parts = urllib.parse.urlsplit(request_url)
        names = {name.lower().replace("-", "_") for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)}
        if "@" in parts.netloc or names & SECRET_QUERY_NAMES:
            raise ValueError("request_url must not carry credentials (a user:password or a key in its query would show "
                             "in parameters and logs); put the key in OPENAI_API_KEY or a Secret block")
    paths = [comparable_path(uri) for uri in uris]
    if len(paths) >= 2 and paths[0] == paths[1]:
        raise ValueError(f"the output would overwrite the input {uris[0]}; choose another --save_filepath")
    if len(paths) >= 3 and paths[2] and paths[2] in paths[:2]:
        raise ValueError(f"the work folder cannot be the input or the output ({uris[2]}); choose another --work-dir")


def check_batch_settings(mode: str, batch_fallback: str, batch_queue_tokens: Optional[int], batch_max_requests: int,
                         budget_usd: Optional[float] = None, shard_deployment: Optional[str] = None,
                         dask_cluster: Optional[str] = None) -> None:
    """Reject batch-mode settings the run cannot work with.

    Raises:
        ValueError: naming the setting and the value.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if batch_fallback not in BATCH_FALLBACKS:
        raise ValueError(f"batch_fallback must be one of {', '.join(BATCH_FALLBACKS)}, got {batch_fallback!r}")
    if batch_queue_tokens is not None and (isinstance(batch_queue_tokens, bool) or batch_queue_tokens < 1):
        raise ValueError(f"batch_queue_tokens must be a whole number of at least 1, got {batch_queue_tokens!r}")
    if not 1 <= batch_max_requests <= MAX_BATCH_REQUESTS:
        raise ValueError(f"batch_max_requests must be from 1 to {MAX_BATCH_REQUESTS:,}, got {batch_max_requests!r}")
    if mode == "batch" and budget_usd is not None:
        raise ValueError("budget_usd is not supported in batch mode yet: a batch's cost is known only when it ends "
                         "(use --dry-run for the estimate)")
    if mode == "batch" and (shard_deployment or dask_cluster):
        raise ValueError("batch mode runs its batches from this process: drop shard_deployment / dask_cluster")


def default_save_path(requests_filepath: str) -> str:
    """The Cookbook's default output name: ``x.jsonl`` gives ``x_results.jsonl``."""
    head, dot, tail = requests_filepath.rpartition(".jsonl")
    if dot:
        return f"{head}_results.jsonl{tail}"
    return f"{requests_filepath}_results.jsonl"


def job_paths(requests_filepath: str, save_filepath: Optional[str], work_dir: Optional[str]) -> Sequence[str]:
    """The input, the output and the work folder a run will use, defaults filled in."""
    save_filepath = save_filepath or default_save_path(requests_filepath)
    return requests_filepath, save_filepath, work_dir or default_work_dir(save_filepath)


def comparable_path(uri: str) -> str:
    """A path or URI in a form two spellings of one file share ("" for none)."""
    if not uri:
        return ""
    if "://" not in uri or uri.startswith("file://"):
        return os.path.realpath(uri.removeprefix("file://"))
    return uri.rstrip("/")


def has_password(uri: str) -> bool:
    """True when a URI carries credentials before its host (``scheme://user:secret@host``)."""
    netloc = uri.split("://", 1)[1].split("/", 1)[0] if "://" in uri else ""
    if "@" not in netloc:
        return False
    return bool(netloc.rpartition("@")[0])
