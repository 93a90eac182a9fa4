"""Limits that follow the server: limits set too high, and no limits at all, against a 1-second-slice server."""

# Standard library imports
from typing import Any

# Local application imports
from flows.parallel_requests import parallel_requests
from tests.conftest import read_jsonl, write_jsonl


def _rows(count: int) -> list:
    return [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"row {i}"}], "max_tokens": 20}
            for i in range(count)]


async def _run(**parameters: Any):
    state = await parallel_requests(**parameters, return_state=True)
    return state, await state.aresult(raise_on_failure=False)


async def test_limits_three_times_too_high_follow_the_server(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server(requests_per_minute=6000, latency_seconds=0.02)
    source = write_jsonl(tmp_path / "high.jsonl", _rows(1500))
    state, summary = await _run(requests_filepath=source, request_url=f"{server.url}/v1/chat/completions",
                                max_requests_per_minute=18_000, max_tokens_per_minute=30_000_000)
    assert state.is_completed(), state.message
    stats = server.stats()
    assert stats["rate_limited"] <= 0.02 * stats["requests"], stats
    assert stats["accepted_per_minute"] >= 0.85 * 6000, stats
    assert len(read_jsonl(tmp_path / "high_results.jsonl")) == 1500
    assert summary["max_requests_per_minute"] == 6000  # the summary reports the limit in force


async def test_no_limits_given_are_learned_from_the_server(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server(requests_per_minute=6000, tokens_per_minute=5_000_000, latency_seconds=0.02)
    source = write_jsonl(tmp_path / "learn.jsonl", _rows(1500))
    state, summary = await _run(requests_filepath=source, request_url=f"{server.url}/v1/chat/completions")
    assert state.is_completed(), state.message
    stats = server.stats()
    assert stats["rate_limited"] <= 0.02 * stats["requests"], stats
    assert stats["accepted_per_minute"] >= 0.85 * 6000, stats
    assert summary["max_requests_per_minute"] == 6000 and summary["max_tokens_per_minute"] == 5_000_000
