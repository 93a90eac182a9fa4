"""Limits that follow the server: limits set too high, and no limits at all, against a 1-second-slice server."""

# Standard library imports
from typing import Any

# Third-party imports
import pytest

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
    source = write_jsonl(tmp_path / "high.jsonl", _rows(600))
    state, summary = await _run(requests_filepath=source, request_url=f"{server.url}/v1/chat/completions",
                                max_requests_per_minute=18_000, max_tokens_per_minute=30_000_000)
    assert state.is_completed(), state.message
    stats = server.stats()
    assert stats["rate_limited"] <= 0.02 * stats["requests"], stats
    assert stats["accepted_per_minute"] >= 0.75 * 6000, stats  # half the limit fails; room for a busy machine
    assert len(read_jsonl(tmp_path / "high_results.jsonl")) == 600
    assert summary["max_requests_per_minute"] == 6000  # the summary reports the limit in force


async def test_no_limits_given_are_learned_from_the_server(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server(requests_per_minute=6000, tokens_per_minute=5_000_000, latency_seconds=0.02)
    source = write_jsonl(tmp_path / "learn.jsonl", _rows(600))
    state, summary = await _run(requests_filepath=source, request_url=f"{server.url}/v1/chat/completions")
    assert state.is_completed(), state.message
    stats = server.stats()
    assert stats["rate_limited"] <= 0.02 * stats["requests"], stats
    assert stats["accepted_per_minute"] >= 0.75 * 6000, stats  # half the limit fails; room for a busy machine
    assert summary["max_requests_per_minute"] == 6000 and summary["max_tokens_per_minute"] == 5_000_000


async def test_each_model_keeps_to_its_own_limit(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server(model_limits={"gpt-4o-mini": (3000, None), "gpt-4.1-nano": (1200, None)}, latency_seconds=0.01)
    rows = [{"model": "gpt-4o-mini" if i % 2 else "gpt-4.1-nano", "messages": [{"role": "user", "content": f"r{i}"}],
             "max_tokens": 5} for i in range(300)]
    source = write_jsonl(tmp_path / "mixed.jsonl", rows)
    state, _ = await _run(requests_filepath=source, request_url=f"{server.url}/v1/chat/completions",
                          model_limits={"gpt-4.1-nano": {"requests_per_minute": 1200}})
    assert state.is_completed(), state.message
    stats = server.stats()
    assert stats["max_accepted_in_slice_by_model"]["gpt-4o-mini"] <= 50  # 3,000 RPM in 1 s slices
    assert stats["max_accepted_in_slice_by_model"]["gpt-4.1-nano"] <= 20  # 1,200 RPM
    assert stats["accepted_per_minute_by_model"]["gpt-4.1-nano"] <= 1200
    assert stats["accepted_per_minute_by_model"]["gpt-4o-mini"] <= 3000
    assert stats["accepted_per_minute_by_model"]["gpt-4o-mini"] >= 2 * stats["accepted_per_minute_by_model"]["gpt-4.1-nano"]
    assert stats["rate_limited"] <= 0.02 * stats["requests"], stats
    assert len(read_jsonl(tmp_path / "mixed_results.jsonl")) == 300


async def test_dry_run_counts_like_the_server_and_sends_nothing(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server()
    rows: list = []
    for i in range(200):
        if i % 2:
            rows.append({"model": "gpt-4o-mini", "max_tokens": 10, "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"Question {i}: how many legs does a spider have? Ünïcödé ✓"}]})
        else:
            rows.append({"model": "text-embedding-3-small", "input": [f"embedding text {i}", "another piece of text"]})
    rows.insert(50, '{"model": "gpt-4o-mini", "messages": [')
    chat_rows = [row for row in rows if isinstance(row, dict) and "messages" in row]
    embedding_rows = [row for row in rows if isinstance(row, dict) and "input" in row]
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows)
    embeddings = write_jsonl(tmp_path / "emb.jsonl", embedding_rows)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows)

    state, report = await _run(requests_filepath=mixed, request_url=f"{server.url}/v1/chat/completions", dry_run=True,
                               max_requests_per_minute=600)
    assert state.is_completed() and report["dry_run"] is True
    assert server.stats()["requests"] == 0  # nothing was sent
    assert report["invalid_lines"] == 1 and report["invalid_examples"][0].startswith("mixed.jsonl line 51:")
    assert report["requests"] == 200 and report["estimated_minutes"] >= 200 / 600
    assert report["estimated_cost_usd"] > 0 and report["unpriced_models"] == []

    for source, url in ((chat, f"{server.url}/v1/chat/completions"), (embeddings, f"{server.url}/v1/embeddings")):
        _, planned = await _run(requests_filepath=source, request_url=url, dry_run=True)
        server.reset()
        state, summary = await _run(requests_filepath=source, request_url=url, max_requests_per_minute=float("inf"),
                                    max_tokens_per_minute=float("inf"))
        assert state.is_completed()
        used = server.stats()["prompt_tokens"]
        assert abs(planned["prompt_tokens"] - used) <= 0.05 * used, (planned["prompt_tokens"], used)
        assert summary["totals"]["prompt_tokens_used"] == used


async def test_budget_stops_dispatching_and_cost_comes_from_usage(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server()
    prices = tmp_path / "prices.json"
    prices.write_text('{"test-model": {"input": 1000, "output": 1000}}')  # $0.001 a token: easy sums
    rows = [{"model": "test-model", "input": f"word{i}"} for i in range(100)]
    source = write_jsonl(tmp_path / "b.jsonl", rows)
    url = f"{server.url}/v1/embeddings"
    state, summary = await _run(requests_filepath=source, request_url=url, price_table=str(prices), budget_usd=0.05,
                                max_requests_per_minute=float("inf"), max_tokens_per_minute=float("inf"),
                                max_in_flight=4)
    assert state.is_failed() and "budget" in state.message
    totals = summary["totals"]
    assert 0 < totals["cost_usd"] <= 0.05
    assert totals["cost_usd"] == pytest.approx(totals["prompt_tokens_used"] / 1000)
    assert totals["not_sent"] > 0 and totals["rows_done"] + totals["not_sent"] == 100
    state, summary = await _run(requests_filepath=source, request_url=url, price_table=str(prices), budget_usd=10,
                                max_requests_per_minute=float("inf"), max_tokens_per_minute=float("inf"))
    assert state.is_completed()  # a larger budget resumes the same job
    assert len(read_jsonl(tmp_path / "b_results.jsonl")) == 100


async def test_a_token_limit_the_server_states_binds_even_with_inf_given(prefect_api_url, api_server, tmp_path) -> None:
    # Every row is read before the first answer says the token limit; each must still carry its estimate,
    # or the rows read meanwhile pass the token bucket for free and the server refuses them.
    server = api_server(requests_per_minute=6000, tokens_per_minute=30_000)
    source = write_jsonl(tmp_path / "tokens.jsonl", [{"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": f"hi {i}"}], "max_tokens": 5, "metadata": {"row": i}} for i in range(300)])
    state, summary = await _run(requests_filepath=source, request_url=f"{server.url}/v1/chat/completions",
                                max_requests_per_minute=6000, max_tokens_per_minute=float("inf"))
    assert state.is_completed(), state.message
    stats = server.stats()
    assert summary["totals"]["tokens_estimated"] > 0
    # Before the rows read meanwhile carried their estimates again: 63% of the requests answered 429. What
    # is left comes from the cautious start before the first answer (about 2-7%, as before the change).
    assert stats["rate_limited"] <= 0.15 * stats["requests"], stats
    assert len(read_jsonl(tmp_path / "tokens_results.jsonl")) == 300


async def test_a_short_window_in_openai_names_is_derived_not_taken_per_minute(prefect_api_url, api_server,
                                                                              tmp_path) -> None:
    # 20 requests per fixed 2 s window, stated as x-ratelimit-limit-requests: 20 (reset "1.379s").
    # Taken as 20 a minute, 80 rows would take 4 minutes; at the server's real rate about 8 s.
    server = api_server(requests_per_minute=600, slice_seconds=2.0, dialect="window")
    source = write_jsonl(tmp_path / "window.jsonl", _rows(80))
    state, summary = await _run(requests_filepath=source, request_url=f"{server.url}/v1/chat/completions")
    assert state.is_completed(), state.message
    stats = server.stats()
    assert stats["rate_limited"] <= 0.05 * stats["requests"], stats
    assert stats["steady_per_minute"] >= 0.85 * 600, stats
    assert summary["limits_in_force"][0] == "20 requests per 2 s (learned from x-ratelimit headers)"
    assert len(read_jsonl(tmp_path / "window_results.jsonl")) == 80


async def test_a_daily_budget_that_runs_out_stops_the_run_and_the_rerun_resumes(prefect_api_url, api_server,
                                                                                tmp_path) -> None:
    # Groq's shape: x-ratelimit-*-requests state 60 requests a day; the budget is not a rate.
    server = api_server(requests_per_minute=3000, tokens_per_minute=900_000, dialect="groq", daily_requests=60)
    source = write_jsonl(tmp_path / "daily.jsonl", _rows(100))
    state, summary = await _run(requests_filepath=source, request_url=f"{server.url}/v1/chat/completions")
    assert not state.is_completed()
    assert "per day is spent" in summary["stop_reason"] and "UTC" in summary["stop_reason"], summary
    stats = server.stats()
    assert stats["accepted"] == 60 and stats["rate_limited"] <= 20, stats
    assert any("per day" in text for text in summary["limits_in_force"]), summary
    # The server's day is over: a new budget. The same job sends only the 40 rows left.
    server.server.config.daily_requests = None
    server.reset()
    state, summary = await _run(requests_filepath=source, request_url=f"{server.url}/v1/chat/completions")
    assert state.is_completed(), state.message
    assert server.stats()["accepted"] == 40
    assert len(read_jsonl(tmp_path / "daily_results.jsonl")) == 100
