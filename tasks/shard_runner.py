"""Running a group of shards in this process: the engine, the HTTP session, and the shard tasks together.

The ``parallel-requests`` flow runs every shard here by default. In the distributed modes, each
child flow run (``flows.parallel_requests_shards``) or Dask worker runs its own group here, and
the processes share one rate limit through the Redis engine (``--limiter``).

``EngineSettings`` and ``ShardJob`` are plain, JSON-safe settings: no key, no live objects. They
travel as flow-run parameters to child runs, so a worker on another machine can rebuild the same
engine from them. The API key is read in the process that sends, from the environment variable
or the Prefect Secret block they name.

Usage:
    >>> job = ShardJob(request_url=url, shape="cookbook", engine=EngineSettings(6_000, 1_000_000, limiter=redis_url))
    >>> outcomes, state = await run_shards_here(job, shard_specs, part_paths, work_id, progress)
"""

# Standard library imports
import asyncio
import math
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

# Third-party imports
import aiohttp
from prefect.states import State
from prefect.utilities.annotations import quote

# Local application imports
from tasks.api_client import ApiClient
from tasks.metrics import RunProgress, StatusTracker
from tasks.pricing import PriceTable
from tasks.rate_limiter import RateLimiterPool
from tasks.redis_rate_limiter import RedisRateLimiterPool, limiter_identity
from tasks.request_formats import RequestShape
from tasks.shard_processing import RunSettings, SharedRunState, process_shard
from tasks.sharding import ShardSpec
from tasks.token_estimation import TokenEstimator

# How often a run checks that it still holds the job's lock.
LOCK_CHECK_SECONDS = 0.25


@dataclass(frozen=True)
class EngineSettings:
    """How a process builds its rate-limit engine.

    Attributes:
        max_requests_per_minute, max_tokens_per_minute: the limits (None: learn or none; math.inf: none).
        max_in_flight: the in-flight cap (shared by every process with ``limiter``).
        model_limits: per-model limits.
        burst_seconds, target_utilization, learn_limits: see ``tasks.rate_limiter``.
        limiter: a ``redis://`` URL for the shared engine; None keeps the engine in this process.
        limiter_name: the shared identity's name; None derives it from the API host and key.
    """

    max_requests_per_minute: Optional[float] = None
    max_tokens_per_minute: Optional[float] = None
    max_in_flight: int = 200
    model_limits: Dict[str, Dict[str, float]] = field(default_factory=dict)
    burst_seconds: float = 1.0
    target_utilization: float = 0.98
    learn_limits: bool = True
    limiter: Optional[str] = None
    limiter_name: Optional[str] = None

    def build(self, request_url: str, api_key: Optional[str]) -> RateLimiterPool:
        """The engine: in this process, or in Redis when ``limiter`` is set."""
        limits = (self.max_requests_per_minute, self.max_tokens_per_minute, self.max_in_flight, self.model_limits,
                  self.burst_seconds, self.target_utilization, self.learn_limits)
        if self.limiter:
            return RedisRateLimiterPool(*limits, url=self.limiter,
                                        identity=limiter_identity(request_url, api_key, self.limiter_name))
        return RateLimiterPool(*limits)

    @property
    def needs_estimates(self) -> bool:
        """True when a token limit can apply, so requests need token estimates."""
        tokens = self.max_tokens_per_minute
        return (tokens is not None and not math.isinf(tokens)) or self.learn_limits or any(
            "tokens_per_minute" in limits for limits in self.model_limits.values())


@dataclass(frozen=True)
class ShardJob:
    """What every process running shards of one run follows (JSON-safe).

    Attributes:
        request_url: the target URL (cookbook lines) or the base URL (batch lines).
        shape: the input's shape ("cookbook" or "batch").
        engine: the rate-limit engine's settings.
        max_attempts, retry_base_seconds, request_timeout_seconds: the retry and timeout settings.
        token_encoding_name: a forced tiktoken encoding, or None to follow each model.
        api_key_env_var, api_key_secret_block: where the sending process reads the key.
        aws_credentials_block: a prefect-aws block for S3, or None for the standard AWS configuration.
        price_table: a price table file, or None for the shipped prices.
        budget_usd: the budget (per process in the distributed modes).
    """

    request_url: str
    shape: str
    engine: EngineSettings = field(default_factory=EngineSettings)
    max_attempts: int = 5
    retry_base_seconds: float = 0.25
    request_timeout_seconds: float = 300.0
    token_encoding_name: Optional[str] = None
    api_key_env_var: Optional[str] = "OPENAI_API_KEY"
    api_key_secret_block: Optional[str] = None
    aws_credentials_block: Optional[str] = None
    price_table: Optional[str] = None
    budget_usd: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-safe dict (for flow-run parameters); infinite limits become "inf"."""
        data = asdict(self)
        for name in ("max_requests_per_minute", "max_tokens_per_minute"):
            value = data["engine"][name]
            data["engine"][name] = "inf" if value is not None and math.isinf(value) else value
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ShardJob":
        """The job ``to_dict`` gave."""
        engine = dict(data.get("engine") or {})
        for name in ("max_requests_per_minute", "max_tokens_per_minute"):
            if engine.get(name) is not None:
                engine[name] = float(engine[name])
        return cls(**{**data, "engine": EngineSettings(**engine)})


async def run_shards_here(job: ShardJob, shards: Sequence[ShardSpec], part_paths: Sequence[str], work_id: str,
                          progress: RunProgress, api_key: Optional[str],
                          transport_params: Optional[Dict[str, Any]] = None,
                          engine: Optional[RateLimiterPool] = None,
                          lost_lock: Optional[threading.Event] = None) -> Tuple[List[State], SharedRunState]:
    """Run shards as async Prefect tasks on this event loop, sharing one engine and one HTTP session.

    Args:
        job: the run's settings.
        shards: the shards to run here.
        part_paths: each shard's part file.
        work_id: the job's generation id.
        progress: the progress counter the shards advance.
        api_key: the key (read by the caller from the place the job names).
        transport_params: smart-open's transport parameters for the input.
        engine: an engine already built (and checked); by default one is built from ``job.engine``.
        lost_lock: set when the job's lock was taken by another run: dispatching stops at once.

    Returns:
        Each shard's final state (in order), and the shared state (stop reason, error examples).

    Raises:
        LimiterUnavailable: when the Redis engine cannot be reached at start.
    """
    engine = engine or job.engine.build(job.request_url, api_key)
    await engine.check()
    estimator = (TokenEstimator.for_name(job.token_encoding_name)
                 if job.engine.needs_estimates or job.budget_usd is not None else None)
    settings = RunSettings(request_url=job.request_url, shape=RequestShape(job.shape), max_attempts=job.max_attempts,
                           retry_base_seconds=job.retry_base_seconds)
    connector = aiohttp.TCPConnector(limit=job.engine.max_in_flight, limit_per_host=job.engine.max_in_flight)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            state = SharedRunState(settings, engine, ApiClient(session, api_key, job.request_timeout_seconds),
                                   estimator, progress, transport_params, PriceTable.load(job.price_table),
                                   job.budget_usd)
            watcher = asyncio.create_task(_stop_when_set(lost_lock, state)) if lost_lock is not None else None
            try:
                outcomes = await asyncio.gather(*(
                    process_shard(shard, part_path, work_id, quote(state), return_state=True)
                    for shard, part_path in zip(shards, part_paths)
                ))
            finally:
                if watcher is not None:
                    watcher.cancel()
    finally:
        await engine.aclose()
    return list(outcomes), state


async def _stop_when_set(event: threading.Event, state: SharedRunState) -> None:
    """Stop the run's dispatching as soon as ``event`` is set (checked a few times a second)."""
    while not event.is_set():
        await asyncio.sleep(LOCK_CHECK_SECONDS)
    state.stop("another run took this job's lock; this run stopped sending")


@dataclass(frozen=True)
class ShardPlacement:
    """How a run splits its input and where its shards run.

    Attributes:
        shards: the number of shards asked for (None: follow the size; a resumed job keeps its split).
        shard_deployment: run shards as child runs of this deployment, or None.
        dask_cluster: run shards on this Dask cluster, or None.
        run_concurrency_limit: a Prefect global concurrency limit the run takes one slot of, or None.
    """

    shards: Optional[int] = None
    shard_deployment: Optional[str] = None
    dask_cluster: Optional[str] = None
    run_concurrency_limit: Optional[str] = None


@dataclass
class ShardOutcome:
    """What running a run's shards gave, wherever they ran.

    Attributes:
        trackers: each shard's counts, in shard order.
        stop_reason: why dispatching stopped early, or None.
        error_examples: a few error texts (secrets removed).
    """

    trackers: List[StatusTracker]
    stop_reason: Optional[str] = None
    error_examples: List[str] = field(default_factory=list)


async def trackers_of(states: Sequence[State], shards: Sequence[ShardSpec], state: SharedRunState) -> List[StatusTracker]:
    """The shards' trackers; a shard that crashed stops the run and gets a tracker with one row not sent."""
    trackers: List[StatusTracker] = []
    for shard, outcome in zip(shards, states):
        value = await outcome.aresult(raise_on_failure=False)
        if isinstance(value, StatusTracker):
            trackers.append(value)
            continue
        state.stop(f"{shard.label} failed: {type(value).__name__}: {value}")
        trackers.append(StatusTracker(shard=shard.index, rows=1, not_sent=1))
    return trackers


async def resolve_api_key(env_var: Optional[str], secret_block: Optional[str]) -> Optional[str]:
    """Read the API key from a Prefect Secret block, or else from an environment variable."""
    if secret_block:
        from prefect.blocks.system import Secret

        secret = await Secret.aload(secret_block)
        return secret.get()
    return os.environ.get(env_var) if env_var else None


async def transport_params_for(aws_credentials_block: Optional[str]) -> Optional[Dict[str, Any]]:
    """smart-open's transport parameters: an S3 client from a prefect-aws block, or None (standard AWS config)."""
    if not aws_credentials_block:
        return None
    try:
        from prefect_aws import AwsCredentials
    except ImportError as error:
        raise RuntimeError("aws_credentials_block needs the prefect-aws package (pip install prefect-aws)") from error
    credentials = await AwsCredentials.aload(aws_credentials_block)
    return {"client": credentials.get_boto3_session().client("s3")}
