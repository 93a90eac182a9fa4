"""Benchmark: the flow against a bare aiohttp client, pacing under a 1-second-slice limit, and memory as input grows.

Three measurements, each against the project's OpenAI-compatible test server, run as its
own process on 127.0.0.1 so that it has a core of its own:

    1. No limits. A bare aiohttp client (one shared session, 200 requests in flight) sends N
       embeddings requests; then the flow sends the same file with no limits and 200 in
       flight (``--progress off``); then the flow again with its live status block drawn in a
       pseudo-terminal (``--progress bar``), whose cost is reported as a share of the rate. Both rates are measured at the server, from the first request to the last.
       The two alternate for ``--rounds`` rounds (5 by default), because this machine's speed
       drifts by tens of percent from minute to minute. Reported: each round's rates and ratio,
       the medians, the ratio of the medians, and the flow's start-up time (process start to
       the first request the server receives; median).
    2. 6,000 RPM enforced in 1-second slices. The flow sends 3,000 chat requests with
       ``--max_requests_per_minute 6000``. Reported: the sustained rate over the limit, and
       the 429 count.
    3. Peak memory (max RSS of the flow's process, not counting Prefect's embedded server
       process) for inputs of 10,000 and 100,000 lines.
    4. Bytes fetched by sharded S3 reads: an object of ``--s3-megabytes`` (1,024 by default) on
       moto's S3 server, read as 16 shards through a proxy that counts the bytes the server
       sends. Reported: bytes fetched over the object's size. (Reading only: sending a
       gigabyte of requests would take an hour.)

Usage:
    make bench
    PYTHONPATH=. .venv/bin/python bench/benchmark.py                  # the full run (a few minutes)
    PYTHONPATH=. .venv/bin/python bench/benchmark.py --requests 5000 --memory-lines 2000 20000
    PYTHONPATH=. .venv/bin/python bench/benchmark.py --baseline-tree /tmp/base   # against another commit

Pitfalls:
    - The machine has 2 cores: the server takes one, the client the other. Close other work
      first; numbers move by a few percent from run to run.
"""

# Standard library imports
import argparse
import asyncio
import fcntl
import json
import os
import pty
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.request
from typing import Any, Dict, List, Optional

# Third-party imports
import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(os.path.dirname(sys.executable), "parallel-requests")


async def run_benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the three measurements and return their numbers."""
    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="parallel-requests-bench-") as work:
        # 1. No limits: the flow against a bare aiohttp client over the same server.
        source = _write_embeddings_file(os.path.join(work, "unlimited.jsonl"), args.requests)
        bare_rates: List[float] = []
        flow_rates: List[float] = []
        startups: List[float] = []
        baseline_rates: List[float] = []
        baseline_startups: List[float] = []
        display_rates: List[float] = []
        unlimited: Dict[str, Any] = {"requests": args.requests}
        with TestServer(work) as server:
            for round_number in range(1, args.rounds + 1):
                await bare_aiohttp_client(f"{server.url}/v1/embeddings", source, concurrency=200)
                bare_rates.append(server.stats_and_reset()["accepted_per_minute"] / 60.0)
                # The flow without a display, and the same run with the live status block drawn in a
                # pseudo-terminal; which goes first alternates, as the machine's speed drifts.
                for shown_first in ([True, False] if round_number % 2 == 0 else [False, True]):
                    if shown_first:
                        shown = run_flow_cli(source, f"{server.url}/v1/embeddings", work, [
                            "--max_requests_per_minute", "inf", "--max_tokens_per_minute", "inf", "--max_in_flight",
                            "200", "--progress", "bar"], pseudo_terminal=True)
                        display_rates.append(server.stats_and_reset()["accepted_per_minute"] / 60.0)
                    else:
                        flow = run_flow_cli(source, f"{server.url}/v1/embeddings", work, [
                            "--max_requests_per_minute", "inf", "--max_tokens_per_minute", "inf", "--max_in_flight",
                            "200", "--progress", "off"])
                        flow_stats = server.stats_and_reset()
                        flow_rates.append(flow_stats["accepted_per_minute"] / 60.0)
                        startups.append(flow_stats["first_arrival"] - flow["started_at"])
                unlimited[f"round_{round_number}"] = (f"bare {bare_rates[-1]:,.0f}/s, flow {flow_rates[-1]:,.0f}/s, "
                                                      f"ratio {flow_rates[-1] / bare_rates[-1]:.2f}, "
                                                      f"exit {flow['exit_status']}; with the live display in a "
                                                      f"pseudo-terminal {display_rates[-1]:,.0f}/s "
                                                      f"({shown['terminal_bytes']:,} bytes drawn), exit "
                                                      f"{shown['exit_status']}")
                if args.baseline_tree:  # the same flow from another commit, in the same round
                    baseline = run_flow_cli(source, f"{server.url}/v1/embeddings", work,
                                            ["--max_requests_per_minute", "inf", "--max_tokens_per_minute", "inf",
                                             "--max_in_flight", "200"], tree=args.baseline_tree)
                    baseline_stats = server.stats_and_reset()
                    baseline_rates.append(baseline_stats["accepted_per_minute"] / 60.0)
                    baseline_startups.append(baseline_stats["first_arrival"] - baseline["started_at"])
                    unlimited[f"round_{round_number}"] += (f"; baseline flow {baseline_rates[-1]:,.0f}/s, start-up "
                                                           f"{baseline_startups[-1]:.2f} s against {startups[-1]:.2f} s")
        unlimited.update(
            bare_aiohttp_requests_per_second_median=statistics.median(bare_rates),
            flow_requests_per_second_median=statistics.median(flow_rates),
            ratio_of_medians_flow_to_bare=statistics.median(flow_rates) / statistics.median(bare_rates),
            flow_startup_to_first_request_seconds_median=statistics.median(startups),
            flow_startup_to_first_request_seconds_max=max(startups),
            flow_with_live_display_requests_per_second_median=statistics.median(display_rates),
            live_display_cost_share=1.0 - statistics.median(display_rates) / statistics.median(flow_rates),
        )
        if baseline_rates:
            unlimited.update(
                baseline_flow_requests_per_second_median=statistics.median(baseline_rates),
                baseline_ratio_of_medians_to_bare=statistics.median(baseline_rates) / statistics.median(bare_rates),
                baseline_startup_to_first_request_seconds_median=statistics.median(baseline_startups),
            )
        results["unlimited"] = unlimited
        _print_section("1. No limits", results["unlimited"])

        # 2. 6,000 RPM enforced in one-second slices.
        source = _write_chat_file(os.path.join(work, "limited.jsonl"), args.limited_requests)
        with TestServer(work, "--rpm", "6000", "--slice-seconds", "1") as server:
            flow = run_flow_cli(source, f"{server.url}/v1/chat/completions", work,
                                ["--max_requests_per_minute", "6000", "--max_tokens_per_minute", "inf"])
            stats = server.stats_and_reset()
        results["limited_6000_rpm"] = {
            "requests": args.limited_requests,
            "sustained_requests_per_minute": stats["accepted_per_minute"],
            "share_of_limit": stats["accepted_per_minute"] / 6000.0,
            "answered_429": stats["rate_limited"],
            "requests_received": stats["requests"],
            "most_accepted_in_one_second_slice": stats["max_accepted_in_slice"],
            "flow_exit_status": flow["exit_status"],
        }
        _print_section("2. 6,000 RPM in 1-second slices", results["limited_6000_rpm"])

        # 3. Peak memory as the input grows.
        memory: Dict[str, Any] = {}
        with TestServer(work) as server:
            for lines in args.memory_lines:
                source = _write_embeddings_file(os.path.join(work, f"memory-{lines}.jsonl"), lines)
                flow = run_flow_cli(source, f"{server.url}/v1/embeddings", work, ["--max_requests_per_minute", "inf",
                                    "--max_tokens_per_minute", "inf"], measure_memory=True)
                memory[f"peak_rss_mb_{lines}_lines"] = flow["peak_rss_mb"]
                memory[f"exit_status_{lines}_lines"] = flow["exit_status"]
                server.stats_and_reset()
        low, high = min(args.memory_lines), max(args.memory_lines)
        memory["growth_mb"] = memory[f"peak_rss_mb_{high}_lines"] - memory[f"peak_rss_mb_{low}_lines"]
        results["memory"] = memory
        _print_section("3. Peak memory of the flow process", memory)

        # 4. Bytes fetched by sharded S3 reads.
        if args.s3_megabytes > 0:
            results["s3_fetch"] = measure_s3_fetch(args.s3_megabytes, shards=16)
            _print_section("4. Sharded S3 reads (16 shards)", results["s3_fetch"])
    return results


def measure_s3_fetch(megabytes: int, shards: int) -> Dict[str, Any]:
    """Put an object of about ``megabytes`` on moto's S3 server and read it as shards through a byte counter."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tasks.shards.sharding import iter_shard_lines, plan_shards
    from tests.byte_counting_proxy import ByteCountingProxy

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    saved = {name: os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                      "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")}
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL_S3=f"http://{host}:{port}")
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        line = json.dumps({"model": "text-embedding-3-small", "input": "y" * 1000}).encode() + b"\n"
        body = line * (megabytes * 1024 * 1024 // len(line))
        client.put_object(Bucket="bench", Key="big.jsonl", Body=body)
        size = len(body)
        del body
        with ByteCountingProxy(host, port) as proxy:
            os.environ["AWS_ENDPOINT_URL_S3"] = proxy.url
            started = time.monotonic()
            lines = sum(1 for shard in plan_shards("s3://bench/big.jsonl", shards)
                        for _ in iter_shard_lines(shard))
            seconds = time.monotonic() - started
            fetched = proxy.bytes_from_server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        moto.stop()
    return {"object_bytes": size, "lines_read": lines, "bytes_fetched": fetched,
            "fetched_over_size": fetched / size, "read_seconds": seconds}


async def bare_aiohttp_client(url: str, source: str, concurrency: int) -> float:
    """The baseline: one shared session, ``concurrency`` requests in flight, nothing else. Returns wall seconds."""
    with open(source, "rb") as handle:
        payloads = [line.rstrip(b"\n") for line in handle if line.strip()]
    queue: asyncio.Queue = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            payload = queue.get_nowait()
            async with session.post(url, data=payload, headers=headers) as response:
                await response.read()

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return time.monotonic() - started


def run_flow_cli(source: str, url: str, work: str, extra: List[str], measure_memory: bool = False,
                 tree: Optional[str] = None, pseudo_terminal: bool = False) -> Dict[str, Any]:
    """Run the flow's command line as its own process (Prefect's embedded API included).

    Args:
        tree: run the code of this source tree instead (a checkout of another commit, the baseline).
        pseudo_terminal: give it a pseudo-terminal (120 x 40) as stdout and stderr, read as a terminal
            would, so its live display is drawn.
    """
    if pseudo_terminal:
        return _run_in_pseudo_terminal(source, url, work, extra)
    # A fresh output each time: the same input and output again would be a finished job, and send nothing.
    save = source.replace(".jsonl", f"_results_{time.monotonic_ns()}.jsonl")
    arguments = ["--requests_filepath", source, "--save_filepath", save, "--request_url", url, *extra,
                 "--logging_level", "WARNING"]
    if measure_memory:
        code = ("import resource, sys\nfrom flows.command_line import main\nstatus = main(sys.argv[1:])\n"
                "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(status)\n")
        command = [sys.executable, "-c", code, *arguments]
    else:  # the command line of whichever tree PYTHONPATH names (the installed script is this tree's)
        command = [sys.executable, "-m", "flows.command_line", *arguments]
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=os.path.join(work, "prefect-home"))
    env.pop("PREFECT_API_URL", None)
    if tree:
        env["PYTHONPATH"] = tree
    started_at = time.monotonic()
    completed = subprocess.run(command, cwd=tree or ROOT, env=env, capture_output=True, text=True, timeout=1800)
    outcome: Dict[str, Any] = {"exit_status": completed.returncode, "started_at": started_at}
    if completed.returncode != 0:
        print(completed.stdout[-2000:], completed.stderr[-4000:], file=sys.stderr)
    for line in completed.stdout.splitlines():
        if line.startswith("PEAK_RSS_KB"):
            outcome["peak_rss_mb"] = int(line.split()[1]) / 1024.0
    return outcome


def _run_in_pseudo_terminal(source: str, url: str, work: str, extra: List[str]) -> Dict[str, Any]:
    """``run_flow_cli`` in a pseudo-terminal: what a user at a terminal runs."""
    save = source.replace(".jsonl", f"_results_{time.monotonic_ns()}.jsonl")
    arguments = ["--requests_filepath", source, "--save_filepath", save, "--request_url", url, *extra,
                 "--logging_level", "WARNING"]
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=os.path.join(work, "prefect-home"),
               TERM="xterm-256color", COLUMNS="120", LINES="40")
    env.pop("PREFECT_API_URL", None)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    drawn = [0]

    def drain() -> None:  # a terminal reads everything it is sent
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            drawn[0] += len(chunk)

    started_at = time.monotonic()
    process = subprocess.Popen([CLI, *arguments], cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
                               start_new_session=True)
    os.close(slave)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    status = process.wait(timeout=1800)
    reader.join(timeout=10)
    os.close(master)
    return {"exit_status": status, "started_at": started_at, "terminal_bytes": drawn[0]}


class TestServer:
    """The project's test API server as a separate process."""

    def __init__(self, work: str, *options: str) -> None:
        self.work = work
        self.options = options
        self.process: Optional[subprocess.Popen] = None
        self.url = ""

    def __enter__(self) -> "TestServer":
        port_file = os.path.join(self.work, f"port-{time.monotonic_ns()}")
        self.process = subprocess.Popen([sys.executable, "-m", "tools.openai_test_server", "--port", "0",
                                         "--port-file", port_file, *self.options], cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{open(port_file).read().strip()}"
        return self

    def stats_and_reset(self) -> Dict[str, Any]:
        """Read the server's stats, then clear them."""
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=30) as response:
            stats = json.load(response)
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/_reset", method="POST"), timeout=30).read()
        return stats

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


def parse_arguments() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Benchmark the parallel-requests flow.")
    parser.add_argument("--requests", type=int, default=20_000, help="requests in the no-limit comparison (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds of the no-limit comparison (default: %(default)s)")
    parser.add_argument("--limited-requests", type=int, default=3_000,
                        help="requests in the 6,000 RPM run (default: %(default)s)")
    parser.add_argument("--memory-lines", type=int, nargs=2, default=[10_000, 100_000],
                        help="the two input sizes of the memory run (default: 10000 100000)")
    parser.add_argument("--s3-megabytes", type=int, default=1024,
                        help="size of the S3 object read as 16 shards; 0 skips it (default: %(default)s)")
    parser.add_argument("--baseline-tree", default=None,
                        help="a checkout of another commit (git worktree add /tmp/base <rev>): its flow runs in every "
                             "no-limit round too, for a comparison in the same run")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return parser.parse_args()


# Helpers


def _write_embeddings_file(path: str, lines: int) -> str:
    """Small embeddings requests (the cheapest the server answers)."""
    with open(path, "w") as handle:
        for i in range(lines):
            handle.write(json.dumps({"model": "text-embedding-3-small", "input": f"benchmark text {i}"}) + "\n")
    return path


def _write_chat_file(path: str, lines: int) -> str:
    """Chat requests of varied length."""
    rng = random.Random(3)
    with open(path, "w") as handle:
        for i in range(lines):
            text = f"row {i} " + "lorem ipsum " * rng.randint(1, 40)
            handle.write(json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}],
                                     "max_tokens": 30}) + "\n")
    return path


def _print_section(title: str, numbers: Dict[str, Any]) -> None:
    """Print one measurement's numbers."""
    print(f"\n{title}", flush=True)
    for name, value in numbers.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        print(f"  {name:45s} {shown}", flush=True)


if __name__ == "__main__":
    options = parse_arguments()
    numbers = asyncio.run(run_benchmark(options))
    if options.json:
        with open(options.json, "w") as output:
            json.dump(numbers, output, indent=2)
