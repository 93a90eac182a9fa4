"""Benchmark: batch mode's memory as the job grows, and the Responses API online at 6,000 RPM.

Two measurements against the project's test server (its own process, so its memory is not counted):

    1. Batch mode, peak memory. Chat jobs of ``--small-rows`` (12,000), half of ``--rows`` and
       ``--rows`` (120,000) rows through the test server's Batch API (answered at 50,000 rows a
       second). Reported for each: the flow process's peak RSS (max RSS, Prefect's embedded server
       process not counted), the batches created, the wall time, every row's result present; and the
       ratios of the peaks. The files are streamed, never held; what grows with a batch file (its
       custom_id index while its results are read) stops growing at the 50,000 rows a file holds, so
       the peak is flat from half the large job to the whole of it.
    2. ``/v1/responses`` online: ``--responses`` (2,000) Responses requests of every input form
       at ``--max_requests_per_minute 6000`` against a server enforcing 6,000 RPM in 1-second
       slices. Reported: complete or not, the 429 share, the input tokens estimated (tiktoken) over
       the server's count, and the printed cost over the server's usage times the price.

Usage:
    PYTHONPATH=. .venv/bin/python bench/batch_mode.py
    PYTHONPATH=. .venv/bin/python bench/batch_mode.py --rows 40000 --small-rows 4000 --responses 500

    Part of ``make bench``.
"""

# Standard library imports
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict

# Local application imports
from bench.benchmark import CLI, ROOT, TestServer, _print_section, run_flow_cli
from tasks.requests.pricing import PriceTable
from tasks.requests.token_estimation import TokenEstimator


def measure_batch_memory(work: str, rows: int) -> Dict[str, Any]:
    """Run one chat job of ``rows`` rows in batch mode; return its peak RSS, batches and time."""
    source = os.path.join(work, f"batch-{rows}.jsonl")
    rng = random.Random(5)
    with open(source, "w") as handle:
        for i in range(rows):
            text = f"row {i} " + "lorem ipsum " * rng.randint(1, 40)
            handle.write(json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}],
                                     "max_tokens": 30, "metadata": {"row": i}}) + "\n")
    with TestServer(work, "--batch-rows-per-second", "50000") as server:
        started = time.monotonic()
        flow = run_flow_cli(source, f"{server.url}/v1/chat/completions", work, ["--mode", "batch"], measure_memory=True)
        seconds = time.monotonic() - started
        stats = server.stats_and_reset()
    outputs = [name for name in os.listdir(work) if name.startswith(f"batch-{rows}_results_") and name.endswith(".jsonl")]
    with open(os.path.join(work, outputs[0]), "rb") as handle:
        lines = sum(1 for _ in handle)
    return {"rows": rows, "peak_rss_mb": flow.get("peak_rss_mb"), "exit_status": flow["exit_status"],
            "batches_created": stats["batches"]["created"], "rows_answered_by_batches": stats["batches"]["rows_answered"],
            "output_lines": lines, "seconds": round(seconds, 1)}


def measure_responses(work: str, count: int) -> Dict[str, Any]:
    """Send ``count`` Responses requests online at 6,000 RPM; compare estimates and cost with the server's counts."""
    rng = random.Random(9)
    source = os.path.join(work, "responses.jsonl")
    bodies = []
    for i in range(count):
        text = f"row {i} " + "lorem ipsum dolor " * rng.randint(1, 30)
        kind = i % 3
        if kind == 0:
            body: Dict[str, Any] = {"model": "gpt-4o-mini", "input": text}
        elif kind == 1:
            body = {"model": "gpt-4o-mini", "instructions": "Answer briefly.", "max_output_tokens": 50,
                    "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}]}
        else:
            body = {"model": "gpt-4o-mini", "input": [{"role": "developer", "content": "Be terse."},
                                                      {"role": "user", "content": text}]}
        bodies.append(body)
    with open(source, "w") as handle:
        handle.writelines(json.dumps(body) + "\n" for body in bodies)
    estimator = TokenEstimator()
    estimated = sum(estimator.estimate_parts(body, "responses")[0] for body in bodies)
    with TestServer(work, "--rpm", "6000", "--slice-seconds", "1") as server:
        save = os.path.join(work, "responses_results.jsonl")
        env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=os.path.join(work, "home"))
        env.pop("PREFECT_API_URL", None)
        completed = subprocess.run([CLI, "--requests_filepath", source, "--save_filepath", save, "--request_url",
                                    f"{server.url}/v1/responses", "--max_requests_per_minute", "6000",
                                    "--max_tokens_per_minute", "inf", "--logging_level", "WARNING"],
                                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        stats = server.stats_and_reset()
    printed = re.search(r"cost \$([\d,.]+)", completed.stdout)
    price = PriceTable.load(None).price_of("gpt-4o-mini")
    expected = (stats["prompt_tokens"] * price[0] + stats["completion_tokens"] * price[1]) / 1_000_000
    with open(save, "rb") as handle:
        lines = sum(1 for _ in handle)
    return {"requests": count, "exit_status": completed.returncode, "output_lines": lines,
            "rate_limited_share": round(stats["rate_limited"] / max(1, stats["requests"]), 4),
            "steady_per_minute": round(stats["steady_per_minute"]),
            "input_tokens_estimated": estimated, "input_tokens_server": stats["prompt_tokens"],
            "estimate_over_server": round(estimated / max(1, stats["prompt_tokens"]), 4),
            "cost_printed": printed.group(1) if printed else None, "cost_from_server_usage": f"{expected:.4f}"}


def parse_arguments() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Benchmark batch mode's memory and the Responses API online.")
    parser.add_argument("--rows", type=int, default=120_000, help="rows of the large batch job (default: %(default)s)")
    parser.add_argument("--small-rows", type=int, default=12_000,
                        help="rows of the small batch job, the baseline (default: %(default)s)")
    parser.add_argument("--responses", type=int, default=2_000,
                        help="Responses requests sent online at 6,000 RPM (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return parser.parse_args()


if __name__ == "__main__":
    options = parse_arguments()
    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="parallel-requests-batch-bench-") as folder:
        small = measure_batch_memory(folder, options.small_rows)
        middle = measure_batch_memory(folder, options.rows // 2)
        large = measure_batch_memory(folder, options.rows)
        results["batch_memory"] = {"small": small, "middle": middle, "large": large,
                                   "peak_ratio_large_over_small": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
                                   "peak_ratio_large_over_middle": round(large["peak_rss_mb"] / middle["peak_rss_mb"], 3)}
        _print_section(f"Batch mode: {options.small_rows:,}, {options.rows // 2:,} and {options.rows:,} chat rows",
                       {**{f"small {k}": v for k, v in small.items()}, **{f"middle {k}": v for k, v in middle.items()},
                        **{f"large {k}": v for k, v in large.items()},
                        "peak RSS ratio (large / small)": results["batch_memory"]["peak_ratio_large_over_small"],
                        "peak RSS ratio (large / middle)": results["batch_memory"]["peak_ratio_large_over_middle"]})
        results["responses"] = measure_responses(folder, options.responses)
        _print_section(f"Responses API online: {options.responses:,} requests at 6,000 RPM", results["responses"])
    if options.json:
        with open(options.json, "w") as output:
            json.dump(results, output, indent=2)
    sys.exit(0)
