"""The demo: run the flow on the example file against the project's local test API, through Prefect's embedded API.

It starts the OpenAI-compatible test server on a free port of 127.0.0.1 (3,000 RPM enforced in
one-second slices, 2% server faults, 50-150 ms latency), runs the flow from the command line
entry point on ``examples/example_requests.jsonl`` (1,000 chat requests, one of them cut short
on purpose), and prints where the results and the summary are.

Usage:
    make demo                      # creates .venv first
    .venv/bin/python examples/run_demo.py

Nothing leaves the machine: the test server answers every request.
"""

# Standard library imports
import os
import shutil
import sys

# Local application imports
from flows.command_line import main
from tools.openai_test_server import ServerConfig, start_server_thread

HERE = os.path.dirname(os.path.abspath(__file__))
REQUESTS = os.path.join(HERE, "example_requests.jsonl")
RESULTS = os.path.join(HERE, "output", "example_requests_results.jsonl")


def run_demo() -> int:
    """Start the test server, run the flow on the example file, and say where everything is."""
    # A demo always shows a whole run: forget the previous demo's results (a real rerun would resume).
    shutil.rmtree(f"{RESULTS}.work", ignore_errors=True)
    if os.path.exists(RESULTS):
        os.remove(RESULTS)
    server = start_server_thread(ServerConfig(requests_per_minute=3000, tokens_per_minute=1_000_000, fault_rate=0.02,
                                              latency_seconds=0.05, latency_jitter_seconds=0.1, seed=1))
    print(f"Test API server listening on {server.url} (3,000 RPM in 1 s slices, 2% faults)", flush=True)
    try:
        status = main([
            "--requests_filepath", REQUESTS,
            "--save_filepath", RESULTS,
            "--request_url", f"{server.url}/v1/chat/completions",
            "--max_requests_per_minute", "3000",
            "--max_tokens_per_minute", "1000000",
            "--max_attempts", "5",
            "--logging_level", "INFO",
        ])
        stats = server.stats()
    finally:
        server.stop()
    print(f"\nThe test server received {stats['requests']:,} requests "
          f"({stats['rate_limited']:,} answered 429) at {stats['accepted_per_minute']:,.0f} requests/min.")
    print(f"Results:  {RESULTS}")
    print("Summary:  printed above; also the 'parallel-requests-summary' artifact of the flow run "
          "(run `prefect server start` and set PREFECT_API_URL to keep runs in a dashboard).")
    return status


if __name__ == "__main__":
    sys.exit(run_demo())
