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
    >>> outcome = await run_shards_here(job, shard_specs, part_paths, work_id, progress, api_key)
    >>> outcome.trackers, outcome.stop_reason
"""

# Standard library imports
import asyncio
import contextlib
import gc
import math
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

# Third-party imports
import aiohttp
from prefect import get_run_logger
from prefect.utilities.annotations import quote

# Local application imports
from tasks.api.api_client import ApiClient
from tasks.reporting.metrics import RunProgress, StatusTracker
from tasks.requests.pricing import PriceTable
from tasks.limits.rate_limiter import RateLimiterPool, limits_in_force
from tasks.limits.redis_engine import RedisRateLimiterPool, limiter_identity
from tasks.requests.request_formats import RequestShape
from tasks.shards.run_state import Budget, RunContext, RunSettings, RunStop
from tasks.shards.shard_task import process_shard
from tasks.shards.sharding import ShardSpec
from tasks.requests.token_estimation import TokenEstimator

# How often a run checks that it still holds the job's lock.
LOCK_CHECK_SECONDS = 0.25
# While shards run: new objects between two collections of the youngest generation (Python's default is 700).
YOUNG_GC_THRESHOLD = 50_000


@dataclass(frozen=True)
class EngineSettings:
    """How a process builds its rate-limit engine.

    Attributes:
        max_requests_per_minute, max_tokens_per_minute: the limits (None: learn or none; math.inf: none).
        max_in_flight: the in-flight cap (shared by every process with ``limiter``).
        model_limits: per-model limits.
        burst_seconds, target_utilization, learn_limits: see ``tasks.limits.rate_limiter``.
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


@dataclass
class ShardResult:
    """What running one shard gave (JSON-safe: a child run or a Dask worker hands it back as a dict).

    Attributes:
        tracker: the shard's counts.
        stop_reason: why dispatching stopped early, or None.
        error_examples: a few error texts (secrets removed).
        learned_requests, learned_tokens: the per-minute limits learned from the server, if any.
        limit_notes: the limits in force and where each came from, in words.
    """

    tracker: StatusTracker
    stop_reason: Optional[str] = None
    error_examples: List[str] = field(default_factory=list)
    learned_requests: Optional[float] = None
    learned_tokens: Optional[float] = None
    limit_notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-safe dict (infinite limits become "inf")."""
        data = asdict(self)
        for name in ("learned_requests", "learned_tokens"):
            data[name] = "inf" if data[name] is not None and math.isinf(data[name]) else data[name]
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ShardResult":
        """The result ``to_dict`` gave."""
        learned = {name: None if data.get(name) is None else float(data[name])
                   for name in ("learned_requests", "learned_tokens")}
        return cls(tracker=StatusTracker(**data["tracker"]), stop_reason=data.get("stop_reason"),
                   error_examples=list(data.get("error_examples") or []),
                   limit_notes=list(data.get("limit_notes") or []), **learned)


@dataclass
class ShardOutcome:
    """What running a run's shards gave, wherever they ran (here, child runs or Dask).

    Attributes:
        trackers: each shard's counts, in shard order.
        stop_reason: why dispatching stopped early, or None.
        error_examples: a few error texts (secrets removed).
        learned_requests, learned_tokens: the per-minute limits learned from the server, when every shard learned one.
        limit_notes: the limits in force and where each came from, in words (each once).
    """

    trackers: List[StatusTracker]
    stop_reason: Optional[str] = None
    error_examples: List[str] = field(default_factory=list)
    learned_requests: Optional[float] = None
    learned_tokens: Optional[float] = None
    limit_notes: List[str] = field(default_factory=list)

    @classmethod
    def collect(cls, shards: Sequence[ShardSpec], results: Sequence[Optional[ShardResult]],
                missing: str) -> "ShardOutcome":
        """The run's outcome from each shard's result; a shard with none counts one row not sent.

        Args:
            missing: why a shard has no result ("failed on Dask", ...); it becomes the stop reason.
        """
        outcome = cls(trackers=[])
        learned: Dict[str, set] = {"requests": set(), "tokens": set()}
        for shard, result in zip(shards, results):
            if result is None:
                outcome.stop_reason = outcome.stop_reason or f"{shard.label} {missing}; rerun to continue"
                outcome.trackers.append(StatusTracker(shard=shard.index, rows=1, not_sent=1))
                continue
            outcome.trackers.append(result.tracker)
            outcome.stop_reason = outcome.stop_reason or result.stop_reason
            outcome.error_examples += [text for text in result.error_examples if text not in outcome.error_examples]
            outcome.limit_notes += [text for text in result.limit_notes if text not in outcome.limit_notes]
            learned["requests"].add(result.learned_requests)
            learned["tokens"].add(result.learned_tokens)
        outcome.learned_requests = learned["requests"].pop() if len(learned["requests"]) == 1 else None
        outcome.learned_tokens = learned["tokens"].pop() if len(learned["tokens"]) == 1 else None
        return outcome


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


async def run_shards_here(job: ShardJob, shards: Sequence[ShardSpec], part_paths: Sequence[str], work_id: str,
                          progress: RunProgress, api_key: Optional[str],
                          transport_params: Optional[Dict[str, Any]] = None,
                          lost_lock: Optional[threading.Event] = None) -> ShardOutcome:
    """Run shards as async Prefect tasks on this event loop, sharing one engine and one HTTP session.

    Args:
        job: the run's settings.
        shards: the shards to run here.
        part_paths: each shard's part file.
        work_id: the job's generation id.
        progress: the progress counter the shards advance.
        api_key: the key (read by the caller from the place the job names).
        transport_params: smart-open's transport parameters for the input.
        lost_lock: set when the job's lock was taken by another run: dispatching stops at once.

    Returns:
        The shards' outcome.

    Raises:
        LimiterUnavailable: when the Redis engine cannot be reached at start.
    """
    engine = job.engine.build(job.request_url, api_key)
    progress.live.limit_probe = lambda: limits_in_force(engine.lanes)
    try:
        await engine.check()
        # A budget prices every request; otherwise each lane makes the estimator on first need (a token limit).
        estimator = TokenEstimator.for_name(job.token_encoding_name) if job.budget_usd is not None else None
        settings = RunSettings(request_url=job.request_url, shape=RequestShape(job.shape),
                               max_attempts=job.max_attempts, retry_base_seconds=job.retry_base_seconds)
        connector = aiohttp.TCPConnector(limit=job.engine.max_in_flight, limit_per_host=job.engine.max_in_flight)
        async with aiohttp.ClientSession(connector=connector) as session:
            context = RunContext(settings, engine, ApiClient(session, api_key, job.request_timeout_seconds),
                                 estimator, progress, Budget(job.budget_usd, PriceTable.load(job.price_table)),
                                 transport_params=transport_params, token_encoding_name=job.token_encoding_name)
            watcher = asyncio.create_task(_stop_when_set(lost_lock, context.stop)) if lost_lock is not None else None
            try:
                with _rare_garbage_collection():
                    states = await asyncio.gather(*(
                        process_shard(shard, part_path, work_id, quote(context), return_state=True)
                        for shard, part_path in zip(shards, part_paths)
                    ))
            finally:
                if watcher is not None:
                    watcher.cancel()
        trackers: List[Optional[StatusTracker]] = []
        for shard, state in zip(shards, states):
            value = await state.aresult(raise_on_failure=False)
            if not isinstance(value, StatusTracker):  # the shard task crashed: the run stops, the shard is missing
                context.stop.stop(f"{shard.label} failed: {type(value).__name__}: {value}")
                value = None
            trackers.append(value)
    finally:
        await engine.aclose()
    note = engine.usage_note()
    if note:
        get_run_logger().info("%s", note)
    learned = (engine.learned_limit("requests"), engine.learned_limit("tokens"))
    notes = engine.limit_notes()
    results = [None if tracker is None else ShardResult(tracker, context.stop.end_reason, context.errors.texts, *learned,
                                                        limit_notes=notes)
               for tracker in trackers]
    return ShardOutcome.collect(shards, results, "failed")


@contextlib.contextmanager
def _rare_garbage_collection() -> Iterator[None]:
    """While the shards run: Python's cycle collector leaves the objects of start-up alone and runs less often.

    Every request makes and drops a few dozen objects, which reference counting frees at once; the
    cycle collector would still walk the objects of the requests in flight every 700 new objects,
    and Prefect's hundreds of thousands of start-up objects at every full collection: about a tenth
    of the flow's CPU at thousands of requests a second (measured with ``gc.callbacks``). The
    objects alive now are frozen (left out of collections) and young objects are collected every
    ``YOUNG_GC_THRESHOLD`` instead of 700. Both are put back afterwards.
    """
    with _GC_SETTING_LOCK:
        if not _GC_SETTING["holders"]:  # the first group of shards in this process changes the setting...
            _GC_SETTING["threshold"] = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(max(_GC_SETTING["threshold"][0], YOUNG_GC_THRESHOLD), *_GC_SETTING["threshold"][1:])
        _GC_SETTING["holders"] += 1
    try:
        yield
    finally:
        with _GC_SETTING_LOCK:
            _GC_SETTING["holders"] -= 1
            if not _GC_SETTING["holders"]:  # ...and the last one to end puts it back
                gc.set_threshold(*_GC_SETTING["threshold"])
                gc.unfreeze()


# The collector's setting before the first running group of shards changed it, and how many groups run.
_GC_SETTING: Dict[str, Any] = {"holders": 0, "threshold": None}
_GC_SETTING_LOCK = threading.Lock()


async def _stop_when_set(event: threading.Event, stop: RunStop) -> None:
    """Stop the run's sending as soon as ``event`` is set (checked a few times a second)."""
    while not event.is_set():
        await asyncio.sleep(LOCK_CHECK_SECONDS)
    stop.stop("another run took this job's lock; this run stopped sending")
