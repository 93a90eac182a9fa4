"""The parallel-requests-shards flow, and the Dask mode: run shards of a parallel-requests run in other processes.

The distributed mode of the ``parallel-requests`` flow. With ``shard_deployment`` set (and a
shared ``limiter``), the parent flow puts the shard numbers in a queue in Redis
(``tasks.shards.shard_queue``) and starts one child flow run per shard with Prefect's
``run_deployment``. Each child run lands on whichever worker of the deployment's work pool is
free, on any machine, and takes shards from the queue one at a time until it is empty: children
that start early keep the shared limit busy while the others are still starting. Each shard runs
here with its own engine on the shared Redis limits, its own HTTP session, and its part file in
the run's work location. The parent waits for every child, then assembles the output in input
order and publishes the artifacts, as in the single-process mode.

Deploy it beside ``parallel-requests`` (``prefect.yaml`` has ``parallel-requests-shards/workers``),
start as many workers as you like on the pool, and run the parent with:

    prefect deployment run parallel-requests/adhoc \\
        --param requests_filepath=s3://bucket/requests.jsonl \\
        --param limiter=redis://10.0.0.5:6379/0 \\
        --param shard_deployment=parallel-requests-shards/workers \\
        --param work_dir=/mnt/shared/work --param shards=16

Each child writes a shard's counts beside its part (``<part>.tracker.json``), so the parent
reads them from the work location whatever result storage the workers use. A child that dies
(a killed worker) leaves its part as far as it got; the parent's run ends Failed with "rerun to
continue", and running the same command again continues that shard where it stopped.

The Dask mode: with ``dask_cluster`` set (``local``, ``local:4`` or a scheduler address), the
parent flow opens prefect-dask's ``DaskTaskRunner`` and submits each shard as the task
``process-shard-elsewhere``; each Dask worker process runs it with its own engine on the shared
Redis limits. Install it with ``pip install prefect-dask``.

Pitfalls:
    - The work location must be reachable from every worker: a shared folder for workers on
      several machines (``work_dir``). Parts are appended row by row, which object stores cannot do.
    - The API key is read by each worker from the environment variable or Secret block the run
      names; it never travels as a parameter.
    - ``budget_usd`` applies to each child run on its own.
"""

# Standard library imports
import asyncio
import json
import os
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence

# Third-party imports
from prefect import flow, get_run_logger, task
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed, Failed, State

# Local application imports
from tasks.reporting.metrics import RunProgress
from tasks.platform.prefect_blocks import resolve_api_key, transport_params_for
from tasks.shards.runner import ShardJob, ShardOutcome, ShardResult, run_shards_here
from tasks.shards.shard_queue import ShardQueue
from tasks.shards.sharding import ShardSpec

# How often the parent asks for a child run's state (seconds).
CHILD_POLL_SECONDS = 1.0


@flow(name="parallel-requests-shards", flow_run_name=lambda: _flow_run_name(), persist_result=False)
async def parallel_requests_shards(job: Dict[str, Any], shards: List[Dict[str, Any]], part_paths: List[str],
                                   work_id: str, runner: int = 1) -> State:
    """Take shards of a parallel-requests run from its queue, one at a time, and run them here.

    Args:
        job: the run's settings (``ShardJob.to_dict()``), with no key in them.
        shards: every shard of the run (``ShardSpec`` fields); the queue says which to run.
        part_paths: each shard's part file in the run's work location.
        work_id: the run's work id (it names the queue).
        runner: this child's number, for its name.

    Returns:
        Completed when every row of the shards it took has its result, Failed otherwise; the
        counts are also written beside each part for the parent.
    """
    logger = get_run_logger()
    shard_job = ShardJob.from_dict(job)
    specs = [ShardSpec(**shard) for shard in shards]
    api_key = await resolve_api_key(shard_job.api_key_env_var, shard_job.api_key_secret_block)
    transport_params = await transport_params_for(shard_job.aws_credentials_block)
    queue = ShardQueue(str(shard_job.engine.limiter), work_id)
    taken: List[int] = []
    stop_reason = None
    try:
        while stop_reason is None:
            index = await queue.take()
            if index is None:
                break
            taken.append(index)
            record = await _run_one_shard(shard_job, specs[index], part_paths[index], work_id, api_key,
                                          transport_params)
            _write_record(part_paths[index], record.to_dict())
            stop_reason = record.stop_reason
    finally:
        await queue.aclose()
    logger.info("Runner %d ran %d shard(s): %s", runner, len(taken), ", ".join(str(i + 1) for i in taken) or "none left")
    if stop_reason:
        logger.error("Stopped: %s", stop_reason)
        return Failed(message=f"stopped: {stop_reason}")
    return Completed(message=f"{len(taken)} shard(s) done")


async def run_shards_as_child_runs(deployment: str, job: ShardJob, shards: Sequence[ShardSpec],
                                   part_paths: Sequence[str], work_id: str, progress: RunProgress) -> ShardOutcome:
    """Queue the shards and start one child flow run of ``deployment`` per shard (from the parent flow).

    Each child takes shards from the queue until it is empty, so children that start early keep
    the shared limit busy while later ones start. Waits for every child.

    Returns:
        Each shard's counts, read from the work location, and why the run stopped early, if it did.
    """
    logger = get_run_logger()
    parameters = job.to_dict()
    for part_path in part_paths:
        _remove_tracker(part_path)
    queue = ShardQueue(str(job.engine.limiter), work_id)
    try:
        await queue.fill(range(len(shards)))
    finally:
        await queue.aclose()
    shard_fields = [asdict(shard) for shard in shards]

    async def run_one(runner: int) -> Any:
        return await run_deployment(
            deployment, parameters={"job": parameters, "shards": shard_fields, "part_paths": list(part_paths),
                                    "work_id": work_id, "runner": runner},
            timeout=None, poll_interval=CHILD_POLL_SECONDS, as_subflow=True,
        )

    async def follow_progress() -> None:
        finished: set = set()
        while True:
            await asyncio.sleep(CHILD_POLL_SECONDS)
            for index, part_path in enumerate(part_paths):
                if index not in finished and os.path.exists(tracker_path(part_path)):
                    finished.add(index)
                    progress.advance(shards[index].end - shards[index].start)

    logger.info("Running %d shard(s) through %d child runs of %s", len(shards), len(shards), deployment)
    follower = asyncio.create_task(follow_progress())
    try:
        children = await asyncio.gather(*(run_one(runner) for runner in range(1, len(shards) + 1)))
    finally:
        follower.cancel()
    progress.advance(progress.total_bytes)  # every shard is accounted for below
    failures = [f"child run {child.name} ended {child.state.name if child.state else 'unknown'}"
                for child in children if not (child.state and child.state.is_completed())]
    return ShardOutcome.collect(shards, [_read_record(part_path) for part_path in part_paths],
                                f"was not finished ({'; '.join(failures) or 'no child run took it'})")


@task(name="process-shard-elsewhere", persist_result=False, task_run_name="{shard[source]} shard {shard[index]}")
async def process_shard_elsewhere(job: Dict[str, Any], shard: Dict[str, Any], part_path: str, work_id: str) -> Dict[str, Any]:
    """Run one shard in this (Dask worker) process, sharing the run's Redis limits; return its counts."""
    shard_job = ShardJob.from_dict(job)
    api_key = await resolve_api_key(shard_job.api_key_env_var, shard_job.api_key_secret_block)
    transport_params = await transport_params_for(shard_job.aws_credentials_block)
    result = await _run_one_shard(shard_job, ShardSpec(**shard), part_path, work_id, api_key, transport_params)
    return result.to_dict()


async def run_shards_on_dask(cluster: str, job: ShardJob, shards: Sequence[ShardSpec], part_paths: Sequence[str],
                             work_id: str, progress: RunProgress) -> ShardOutcome:
    """Run each shard as a task on a Dask cluster (prefect-dask's DaskTaskRunner) and wait for all of them.

    Args:
        cluster: "local" (a LocalCluster with one worker process per core), "local:N" (N worker
            processes), or the address of a running scheduler ("tcp://10.0.0.5:8786").
    """
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as error:
        raise RuntimeError("dask_cluster needs the prefect-dask package (pip install prefect-dask)") from error
    logger = get_run_logger()
    if cluster == "local" or cluster.startswith("local:"):
        workers = int(cluster.partition(":")[2] or min(len(shards), os.cpu_count() or 1))
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "processes": True, "threads_per_worker": 1,
                                                "dashboard_address": None})
    else:
        runner = DaskTaskRunner(address=cluster)
    parameters = job.to_dict()
    logger.info("Running %d shard(s) as tasks on the Dask cluster %s", len(shards), cluster)
    with runner:
        futures = [runner.submit(process_shard_elsewhere, parameters={"job": parameters, "shard": asdict(shard),
                                                                       "part_path": part_path, "work_id": work_id})
                   for shard, part_path in zip(shards, part_paths)]
        results: List[Optional[ShardResult]] = []
        for shard, future in zip(shards, futures):
            await asyncio.to_thread(future.wait)
            progress.advance(shard.end - shard.start)
            value = await future.state.aresult(raise_on_failure=False) if future.state else None
            results.append(ShardResult.from_dict(value) if isinstance(value, dict) else None)
    return ShardOutcome.collect(shards, results, "failed on Dask")


# Helpers


def tracker_path(part_path: str) -> str:
    """Where a child run leaves a shard's counts for the parent."""
    return f"{part_path}.tracker.json"


async def _run_one_shard(job: ShardJob, shard: ShardSpec, part_path: str, work_id: str, api_key: Optional[str],
                         transport_params: Optional[Dict[str, Any]]) -> ShardResult:
    """Run one shard in this process; its result (counts, stop reason, error examples, limits learned)."""
    progress = RunProgress(total_bytes=shard.end - shard.start)
    outcome = await run_shards_here(job, [shard], [part_path], work_id, progress, api_key, transport_params)
    return ShardResult(outcome.trackers[0], outcome.stop_reason, outcome.error_examples, outcome.learned_requests,
                       outcome.learned_tokens, outcome.limit_notes)


def _write_record(part_path: str, record: Dict[str, Any]) -> None:
    """Write a shard's record atomically beside its part, for the parent."""
    path = tracker_path(part_path)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(record, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _read_record(part_path: str) -> Optional[ShardResult]:
    """A shard's result, or None when no child run left one."""
    try:
        with open(tracker_path(part_path), encoding="utf-8") as handle:
            return ShardResult.from_dict(json.load(handle))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_tracker(part_path: str) -> None:
    """Forget counts an earlier run left, so only this run's child can speak for the shard."""
    try:
        os.remove(tracker_path(part_path))
    except FileNotFoundError:
        pass


def _flow_run_name() -> str:
    """The child run's name: input file and runner number."""
    shards = current_flow_run.parameters.get("shards") or []
    source = os.path.basename(str(shards[0].get("source"))) if shards else "input"
    return f"parallel-requests-shards {source} runner {current_flow_run.parameters.get('runner', 1)}/{len(shards)}"
