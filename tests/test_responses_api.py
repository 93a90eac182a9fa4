"""The Responses API (``/v1/responses``) online: told apart from embeddings, estimated, priced from its usage."""

# Standard library imports
import json
import random
import re
import subprocess
from typing import Any, Dict, List

# Local application imports
from tasks.requests.request_formats import InvalidLine, ParsedRequest, RequestShape, parse_line
from tasks.requests.token_estimation import TokenEstimator
from tasks.shards.request_sender import Usage
from tests.conftest import read_jsonl, write_jsonl
from tests.test_cli import CLI, KEY, ROOT, _env


def _responses_rows(count: int) -> List[Dict[str, Any]]:
    """Responses bodies of every input form: a string, message items with parts, instructions, tools."""
    rng = random.Random(5)
    rows: List[Dict[str, Any]] = []
    for i in range(count):
        text = f"row {i} " + "lorem ipsum dolor " * rng.randint(1, 25)
        kind = i % 4
        if kind == 0:
            body: Dict[str, Any] = {"model": "gpt-4o-mini", "input": text}
        elif kind == 1:
            body = {"model": "gpt-4o-mini", "instructions": "Answer in one line.", "max_output_tokens": 60,
                    "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}]}
        elif kind == 2:
            body = {"model": "gpt-4o-mini", "input": [{"role": "developer", "content": "Be brief."},
                                                      {"role": "user", "content": text}],
                    "reasoning": {"effort": "low"}}
        else:
            body = {"model": "gpt-4o-mini", "input": text, "max_output_tokens": 30,
                    "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]}
        body["metadata"] = {"row": i}
        rows.append(body)
    return rows


def test_a_responses_body_is_parsed_as_one_and_checked_as_one() -> None:
    items = b'{"model": "gpt-4o", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}'
    parsed = parse_line(items, RequestShape.COOKBOOK, "http://127.0.0.1:1/v1/responses")
    assert isinstance(parsed, ParsedRequest) and parsed.endpoint == "responses"
    # The same items sent to the embeddings endpoint are that row's error, not a crash.
    refused = parse_line(items, RequestShape.COOKBOOK, "http://127.0.0.1:1/v1/embeddings")
    assert isinstance(refused, InvalidLine) and "input must be" in refused.reason
    batch = b'{"custom_id": "a", "method": "POST", "url": "/v1/responses", "body": {"model": "gpt-4o", "input": 7}}'
    refused = parse_line(batch, RequestShape.BATCH, "http://127.0.0.1:1/v1/chat/completions")
    assert isinstance(refused, InvalidLine) and "a list of input items" in refused.reason


def test_usage_of_a_responses_answer_is_read_from_input_and_output_tokens() -> None:
    usage = Usage.of({"usage": {"input_tokens": 36, "output_tokens": 87, "total_tokens": 123,
                                "input_tokens_details": {"cached_tokens": 0}}})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (36, 87, 123)


def test_responses_requests_online_at_6000_rpm_complete_estimated_and_priced(api_server, tmp_path) -> None:
    server = api_server(requests_per_minute=6000, slice_seconds=1.0, api_key=KEY, latency_seconds=0.02,
                        latency_jitter_seconds=0.03, seed=3)
    rows = _responses_rows(600)
    source = write_jsonl(tmp_path / "responses.jsonl", rows)
    save = str(tmp_path / "results.jsonl")
    prices = tmp_path / "prices.json"  # large prices, so the printed cost has digits enough to compare
    prices.write_text(json.dumps({"gpt-4o-mini": {"input": 1000.0, "output": 3000.0}}))
    command = [CLI, "--requests_filepath", source, "--save_filepath", save, "--request_url",
               f"{server.url}/v1/responses", "--api_key", KEY, "--max_requests_per_minute", "6000",
               "--max_tokens_per_minute", "10000000", "--price_table", str(prices), "--budget_usd", "1000000"]
    result = subprocess.run(command, cwd=ROOT, env=_env(PREFECT_HOME=str(tmp_path / "prefect-home")),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    results = read_jsonl(save)
    assert len(results) == len(rows)
    for row, line in zip(rows, results):
        assert line[2] == row["metadata"]
        text = row["input"] if isinstance(row["input"], str) else json.dumps(row["input"])
        assert line[1]["object"] == "response" and line[1]["output"][0]["content"][0]["text"].startswith("echo: ")
        assert f"row {row['metadata']['row']} " in text
    stats = server.stats()
    assert stats["rate_limited"] <= 0.01 * stats["requests"], stats
    estimator = TokenEstimator()
    estimated = sum(estimator.estimate_parts({k: v for k, v in row.items() if k != "metadata"}, "responses")[0]
                    for row in rows)
    assert abs(estimated - stats["prompt_tokens"]) <= 0.05 * stats["prompt_tokens"], (estimated, stats["prompt_tokens"])
    # The cost is the usage times the price, never $0 for a priced model.
    expected = (stats["prompt_tokens"] * 1000.0 + stats["completion_tokens"] * 3000.0) / 1_000_000
    printed = float(re.search(r"cost \$([\d,.]+)", result.stdout).group(1).replace(",", ""))
    assert abs(printed - expected) < 0.001, (printed, expected)
    assert f"used {stats['prompt_tokens'] + stats['completion_tokens']:,}" in result.stdout
