"""Benchmark: how close to a server's limit the flow runs, given no limit flags, for each header dialect.

For each case below, the project's test server runs as its own process with the limits and the
rate-limit header dialect of a real provider, and the flow's command line sends a chat file to it
with **no limit flags** (except where a case gives limits too high on purpose). Measured at the
server:

    - the steady rate: accepted requests per minute over the middle 80% of accepted requests
      (after learning), as a share of the binding limit (the request limit, or the token limit
      over the tokens each request is charged, whichever is lower);
    - the share of requests answered 429.

Cases (the goal of each, from the limits issue, is printed beside it):

    ==========================  =================================================================
    case                        server
    ==========================  =================================================================
    2 s fixed window            20 requests per 2 s, OpenAI's header names counted per window
    Azure, remaining only       50 requests per 5 s; only remaining counts, retry-after-ms
    Groq, daily budget          requests per day stated, 9,000 tokens per minute binding
    Anthropic                   600 requests per minute, ``anthropic-ratelimit-*`` headers
    IETF RateLimit              20 per 2 s as ``RateLimit-Policy`` / ``RateLimit``
    IETF, older fields          20 per 2 s as ``RateLimit-Limit`` / ``-Remaining`` / ``-Reset``
    X-RateLimit window          20 per 2 s as ``X-RateLimit-Limit: 20, 20;window=2``
    no headers                  600 per minute in 1 s slices, no headers (Gemini-style 429 body)
    Groq, unstated RPM          300 per minute enforced, stated nowhere (a daily budget is)
    OpenAI, none given          6,000 per minute, OpenAI's headers
    OpenAI, given 3x too high   the same, with 18,000 RPM and 6,000,000 TPM given
    ==========================  =================================================================

Usage:
    make bench                                           # runs this after bench/benchmark.py
    PYTHONPATH=. .venv/bin/python bench/limit_dialects.py              # every case (about 8 minutes)
    PYTHONPATH=. .venv/bin/python bench/limit_dialects.py --only azure anthropic --scale 0.5
"""

# Standard library imports
import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Local application imports
from bench.benchmark import TestServer, run_flow_cli  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One server and how the flow is run against it.

    Attributes:
        key: a short name for ``--only``.
        title: the row's name in the table.
        server: the test server's options.
        requests: how many chat requests the flow sends (sized for at least 30 s).
        flags: limit flags given to the flow (none for most cases).
        goal: (least share of the binding limit, most share of 429s).
    """

    key: str
    title: str
    server: Tuple[str, ...]
    requests: int
    flags: Tuple[str, ...] = ()
    goal: Tuple[float, float] = (0.85, 0.02)


CASES = (
    Case("window", "2 s fixed window", ("--dialect", "window", "--rpm", "600", "--slice-seconds", "2"), 400,
         goal=(0.90, 0.05)),
    Case("azure", "Azure, remaining only", ("--dialect", "azure", "--rpm", "600", "--slice-seconds", "5"), 550),
    Case("groq-budget", "Groq, daily budget, tokens bind",
         ("--dialect", "groq", "--rpm", "600", "--tpm", "9000", "--daily-requests", "14400"), 200),
    Case("anthropic", "Anthropic headers", ("--dialect", "anthropic", "--rpm", "600", "--tpm", "900000"), 400),
    Case("ietf", "IETF RateLimit", ("--dialect", "ietf", "--rpm", "600", "--slice-seconds", "2"), 400),
    Case("ietf-legacy", "IETF, older fields", ("--dialect", "ietf-legacy", "--rpm", "600", "--slice-seconds", "2"),
         400),
    Case("x-window", "X-RateLimit window", ("--dialect", "x-ratelimit-window", "--rpm", "600", "--slice-seconds",
                                            "2"), 400),
    Case("none", "no headers at all", ("--dialect", "none", "--rpm", "600"), 400, goal=(0.80, 0.03)),
    Case("groq-rpm", "Groq, unstated RPM", ("--dialect", "groq", "--rpm", "300", "--tpm", "900000",
                                            "--daily-requests", "14400"), 200, goal=(0.80, 0.03)),
    Case("openai", "OpenAI, no limits given", ("--dialect", "openai", "--rpm", "6000", "--tpm", "2000000"), 3000,
         goal=(0.95, 0.01)),
    Case("openai-high", "OpenAI, given 3x too high", ("--dialect", "openai", "--rpm", "6000", "--tpm", "2000000"),
         3000, flags=("--max_requests_per_minute", "18000", "--max_tokens_per_minute", "6000000"), goal=(0.95, 0.01)),
)


def measure(case: Case, work: str, scale: float) -> Dict[str, Any]:
    """Run one case and return its numbers."""
    requests = max(50, int(case.requests * scale))
    source = _write_chat_file(os.path.join(work, f"{case.key}.jsonl"), requests)
    rpm, tpm = _option(case.server, "--rpm"), _option(case.server, "--tpm")
    with TestServer(work, *case.server) as server:
        flow = run_flow_cli(source, f"{server.url}/v1/chat/completions", work, list(case.flags))
        stats = server.stats_and_reset()
    accepted = max(1, stats["accepted"])
    charged_per_request = stats["tokens_charged"] / accepted
    binding = min(rpm or float("inf"), (tpm / charged_per_request) if tpm else float("inf"))
    share = stats["steady_per_minute"] / binding
    rate_limited = stats["rate_limited"] / max(1, stats["requests"])
    least, most = case.goal
    return {"case": case.title, "requests": requests, "binding_limit_per_minute": round(binding, 1),
            "steady_per_minute": round(stats["steady_per_minute"], 1), "share_of_limit": round(share, 3),
            "share_429": round(rate_limited, 4), "answered_429": stats["rate_limited"],
            "seconds": round(stats["accepted_span_seconds"], 1), "exit_status": flow["exit_status"],
            "goal": f">= {least:.0%}, <= {most:.0%} 429s",
            "met": share >= least and rate_limited <= most and flow["exit_status"] == 0}


def parse_arguments() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="How close to each dialect's limit the flow runs, with no limit flags.")
    parser.add_argument("--only", nargs="*", default=None, choices=[case.key for case in CASES],
                        help="run only these cases (default: all)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale every case's request count (default: 1)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return parser.parse_args()


def main() -> int:
    """Run the cases and print the table; exit 1 when a case misses its goal."""
    args = parse_arguments()
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="parallel-requests-dialects-") as work:
        for case in CASES:
            if args.only and case.key not in args.only:
                continue
            row = measure(case, work, args.scale)
            rows.append(row)
            print(f"{row['case']:32s} steady {row['steady_per_minute']:>8,.0f}/min of {row['binding_limit_per_minute']:>8,.0f}"
                  f" = {row['share_of_limit']:6.1%}; 429s {row['share_429']:6.2%} ({row['answered_429']}); "
                  f"{row['seconds']:5.1f} s; goal {row['goal']}: {'met' if row['met'] else 'MISSED'}", flush=True)
    if args.json:
        with open(args.json, "w") as output:
            json.dump(rows, output, indent=2)
    return 0 if all(row["met"] for row in rows) else 1


# Helpers


def _option(options: Tuple[str, ...], name: str) -> float:
    """A number option's value in a server's options (0 when absent)."""
    return float(options[options.index(name) + 1]) if name in options else 0.0


def _write_chat_file(path: str, lines: int) -> str:
    """Short chat requests of one size (each charged the same tokens)."""
    with open(path, "w") as handle:
        for i in range(lines):
            handle.write(json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hello {i}"}],
                                     "max_tokens": 20}) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
