"""Benchmark: what the Redis-backed engine costs per request, from one process and from three.

No HTTP: each process runs ``--concurrency`` loops of acquire, a simulated request of
``--request-ms`` milliseconds, release, for ``--seconds`` seconds, on one shared identity.
Three measurements, all in the same run:

    1. In-process engine (``RateLimiterPool``), one process, no limits: the baseline.
    2. Redis engine, no limits (only the shared in-flight cap, ``--in-flight``): one process,
       then three processes at once. Reported: requests per second (each process and all
       together), script calls per request, and the ratio to the baseline.
    3. Redis engine, three processes sharing a 6,000 RPM limit: requests per minute granted
       together (the engine aims at 98% of the limit) and script calls per request.
    4. The same, while the processes take turns being stopped (SIGSTOP) for ``--stall-ms``
       every second, as on a machine busy starting other processes: the most requests granted
       in any one second (100 is the limit) and how many of the one-second slices went over it,
       with late reservations given up (the engine) and, as the baseline in the same run, sent
       late (``late_seconds=inf``).

Usage:
    PYTHONPATH=. .venv/bin/python bench/redis_limiter.py
    PYTHONPATH=. .venv/bin/python bench/redis_limiter.py --redis redis://127.0.0.1:6379/0 --seconds 5

Pitfalls:
    - This machine has 2 cores, shared by Redis and the three processes: three processes cannot
      be three times as fast here. The numbers say what one Redis serves, not a ceiling.
"""

# Standard library imports
import argparse
import asyncio
import json
import math
import multiprocessing
import os
import signal
import time
import uuid
from typing import Any, Dict, List, Optional

# Local application imports
from tasks.limits.rate_limiter import RateLimiterPool
from tasks.limits.redis_engine import RedisRateLimiterPool


async def drive(pool: Any, seconds: float, concurrency: int, request_seconds: float) -> Dict[str, Any]:
    """Run ``concurrency`` acquire/request/release loops for ``seconds``; count what went through."""
    lane = pool.lane_for("gpt-4o-mini", "chat/completions")
    done = 0
    grant_times: List[float] = []  # time.monotonic() is one clock for every process of the machine
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            if lane.try_take_buckets(10):
                await pool.take_slot()
            else:
                await lane.acquire(10)
            grant_times.append(time.monotonic())
            await asyncio.sleep(request_seconds)
            lane.release(10)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    await pool.aclose()
    calls = getattr(pool, "calls", 0)
    return {"requests": done, "seconds": elapsed, "requests_per_second": done / elapsed,
            "calls_per_request": calls / done if done else 0.0, "grant_times": grant_times}


def _process(redis_url: Optional[str], identity: str, limit: Optional[float], args: Dict[str, Any],
             start_at: float, results: Any, late_seconds: float) -> None:
    """One benchmark process: wait for the common start, drive the engine, report."""
    if redis_url:
        pool: Any = RedisRateLimiterPool(limit, float("inf"), max_in_flight=args["in_flight"], url=redis_url,
                                         identity=identity, late_seconds=late_seconds)
    else:
        pool = RateLimiterPool(limit, float("inf"), max_in_flight=args["in_flight"])
    time.sleep(max(0.0, start_at - time.time()))
    results.put(asyncio.run(drive(pool, args["seconds"], args["concurrency"], args["request_ms"] / 1000)))


def run_processes(count: int, redis_url: Optional[str], limit: Optional[float], args: Dict[str, Any],
                  stall_seconds: float = 0.0, late_seconds: float = 0.05) -> List[Dict[str, Any]]:
    """Start ``count`` processes at the same moment on one identity; return each one's numbers.

    With ``stall_seconds``, the processes take turns being stopped for that long every second.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    identity = f"bench-{uuid.uuid4().hex}"
    start_at = time.time() + 3.0
    processes = [context.Process(target=_process,
                                 args=(redis_url, identity, limit, args, start_at, results, late_seconds))
                 for _ in range(count)]
    for process in processes:
        process.start()
    if stall_seconds > 0:
        time.sleep(max(0.0, start_at + 1.0 - time.time()))
        turn = 0
        while time.time() < start_at + args["seconds"] - 1.0:
            pid = processes[turn % count].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            time.sleep(stall_seconds)
            os.kill(pid, signal.SIGCONT)
            time.sleep(max(0.0, 1.0 - stall_seconds))
            turn += 1
    numbers = [results.get(timeout=args["seconds"] + 120) for _ in processes]
    for process in processes:
        process.join()
    return numbers


def slice_counts(numbers: List[Dict[str, Any]], limit_per_minute: float) -> Dict[str, Any]:
    """The most grants in any one-second window, and the one-second slices above the limit."""
    times = sorted(moment for item in numbers for moment in item["grant_times"])
    most, start = 0, 0
    for end, moment in enumerate(times):
        while moment - times[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    slices: Dict[int, int] = {}
    for moment in times:
        slices[math.floor(moment)] = slices.get(math.floor(moment), 0) + 1
    allowed = limit_per_minute / 60.0
    over = sum(max(0, count - allowed) for count in slices.values())
    return {"most_in_any_second": most, "slices_over_limit": sum(count > allowed for count in slices.values()),
            "requests_over_limit": int(over)}


def summarize(numbers: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Totals over processes."""
    requests = sum(item["requests"] for item in numbers)
    seconds = max(item["seconds"] for item in numbers)
    calls = sum(item["calls_per_request"] * item["requests"] for item in numbers)
    return {"processes": len(numbers), "requests": requests, "requests_per_second": round(requests / seconds, 1),
            "per_process": [round(item["requests_per_second"], 1) for item in numbers],
            "calls_per_request": round(calls / requests, 3) if requests else 0.0}


def main() -> None:
    """Run the three measurements and print them."""
    parser = argparse.ArgumentParser(description="Benchmark the Redis-backed rate-limit engine.")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measurement (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=200, help="loops per process (default: %(default)s)")
    parser.add_argument("--in-flight", type=int, default=600, help="shared in-flight cap (default: %(default)s)")
    parser.add_argument("--request-ms", type=float, default=20.0,
                        help="simulated request time in milliseconds (default: %(default)s)")
    parser.add_argument("--stall-ms", type=float, default=300.0,
                        help="how long a stalled process stops, once a second, in measurement 4 (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    settings = {"seconds": args.seconds, "concurrency": args.concurrency, "in_flight": args.in_flight,
                "request_ms": args.request_ms}
    report: Dict[str, Any] = {"settings": settings}
    report["in_process_1"] = summarize(run_processes(1, None, float("inf"), settings))
    report["redis_1"] = summarize(run_processes(1, args.redis, float("inf"), settings))
    report["redis_3"] = summarize(run_processes(3, args.redis, float("inf"), settings))
    report["redis_3_at_6000_rpm"] = summarize(run_processes(3, args.redis, 6000.0, settings))
    report["redis_3_at_6000_rpm"]["requests_per_minute"] = round(
        report["redis_3_at_6000_rpm"]["requests_per_second"] * 60, 1)
    for name, late in (("redis_3_at_6000_rpm_stalled", 0.05), ("baseline_stalled_sending_late", math.inf)):
        numbers = run_processes(3, args.redis, 6000.0, settings, stall_seconds=args.stall_ms / 1000, late_seconds=late)
        report[name] = summarize(numbers)
        report[name]["requests_per_minute"] = round(report[name]["requests_per_second"] * 60, 1)
        report[name].update(slice_counts(numbers, 6000.0))
    report["ratio_redis_1_to_in_process"] = round(
        report["redis_1"]["requests_per_second"] / report["in_process_1"]["requests_per_second"], 3)
    for name, numbers in report.items():
        print(f"{name}: {numbers}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
