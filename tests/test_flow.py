"""The flow end to end on a real Prefect API and a real test server: results, order, retries, stops, artifacts."""

# Standard library imports
import asyncio
import gc
import json
import math
import os
from typing import Any, Dict, List

# Third-party imports
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler

# Local application imports
from flows.parallel_requests import parallel_requests
from tests.conftest import read_jsonl, write_jsonl

KEY = "sk-test-FLOWSECRET-0123456789abcdef"


def _chat(i: int, model: str = "gpt-4o-mini") -> Dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": f"row {i} says hello"}], "max_tokens": 20,
            "metadata": {"row": i}}


def _cookbook_rows(count: int) -> List[Any]:
    """Rows with a malformed line, a blank line, a 404 and a row of the wrong shape among valid requests."""
    rows: List[Any] = []
    for i in range(count):
        if i == 3:
            rows.append('{"model": "gpt-4o-mini", "messages": [')
        elif i == 8:
            rows.append("")
        elif i == 10:
            rows.append(_chat(i, model="unknown-model"))
        elif i == 12:
            rows.append({"model": "gpt-4o-mini", "messages": "not a list", "metadata": {"row": i}})
        else:
            rows.append(_chat(i))
    return rows


async def _run(**parameters: Any):
    state = await parallel_requests(**parameters, return_state=True)
    return state, await state.aresult(raise_on_failure=False)


async def test_cookbook_file_every_row_once_in_order_with_artifacts(prefect_api_url, api_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TEST_FLOW_KEY", KEY)
    server = api_server(requests_per_minute=12_000, fault_rate=0.05, api_key=KEY, seed=5)
    rows = _cookbook_rows(300)
    source = write_jsonl(tmp_path / "requests.jsonl", rows)
    collector = gc.get_threshold()
    state, summary = await _run(
        requests_filepath=source, request_url=f"{server.url}/v1/chat/completions", max_requests_per_minute=12_000,
        max_tokens_per_minute=2_000_000, shards=4, retry_base_seconds=0.05, api_key_env_var="TEST_FLOW_KEY",
    )
    assert state.is_completed(), state.message
    # The shards ran with a rarer cycle collector; the process's own setting is back afterwards.
    assert gc.get_threshold() == collector and gc.get_freeze_count() == 0
    results = read_jsonl(tmp_path / "requests_results.jsonl")
    non_blank = [row for row in rows if row != ""]
    assert len(results) == len(non_blank) == 299
    for row, result in zip(non_blank, results):
        if isinstance(row, str):  # the malformed line: an error record naming file and line 4
            assert result == [row, ["requests.jsonl line 4: invalid JSON (Expecting value: line 1 column 39 (char 38))"]]
            continue
        if row["messages"] == "not a list":  # checked here, never sent: an error record naming file and line 13
            assert json.loads(result[0]) == row
            assert result[1] == ["requests.jsonl line 13: messages must be a list of objects"]
            continue
        request = {key: value for key, value in row.items() if key != "metadata"}
        assert result[0] == request and result[2] == row["metadata"]
        if row["model"] == "unknown-model":
            assert len(result[1]) == 1 and result[1][0].startswith("HTTP 404 model_not_found")
        else:
            assert result[1]["choices"][0]["message"]["content"] == f"echo: row {row['metadata']['row']} says hello"
    # Invalid requests were sent once; faulted ones were retried.
    stats = server.stats()
    assert summary["totals"]["failed_invalid_request"] == 1 and summary["totals"]["invalid_lines"] == 2
    assert summary["totals"]["succeeded"] == 296
    assert stats["status_counts"]["404"] == 1 and "400" not in stats["status_counts"]
    assert summary["totals"]["retries"] > 0 and stats["requests"] == summary["totals"]["requests_sent"]
    work = tmp_path / "requests_results.jsonl.work"  # the parts stay once complete: they are the paid answers
    assert sorted(name for folder in os.listdir(work) if folder.startswith("gen-")
                  for name in os.listdir(work / folder)) == [f"shard-0000{i}-of-00004.part" for i in range(4)]

    async with get_client() as client:
        flow_run_id = state.state_details.flow_run_id
        artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        by_key = {artifact.key: artifact for artifact in artifacts}
        table = json.loads(by_key["parallel-requests-shards"].data)
        assert len(table) == 4 and sum(row["rows"] for row in table) == 299
        assert sum(row["succeeded"] for row in table) == 296
        assert "| succeeded | 296 |" in by_key["parallel-requests-summary"].data
        assert by_key["parallel-requests-progress"].data == 100.0
        await APILogHandler.aflush()  # logs reach the API in the background: send what is queued first
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        flow_run = await client.read_flow_run(flow_run_id)
    everything = json.dumps([a.data for a in artifacts]) + json.dumps(flow_run.parameters) + " ".join(l.message for l in logs)
    assert KEY not in everything
    assert "line +3" in everything  # the malformed line was logged with its shard position


async def test_batch_file_gives_batch_output_in_order(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server()
    rows: List[Any] = []
    for i in range(40):
        if i % 2:
            rows.append({"custom_id": f"c{i}", "method": "POST", "url": "/v1/embeddings",
                         "body": {"model": "text-embedding-3-small", "input": f"text {i}"}})
        else:
            rows.append({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q {i}"}]}})
    rows[5] = {"method": "POST", "url": "/v1/embeddings", "body": {}}
    source = write_jsonl(tmp_path / "batch.jsonl", rows)
    out = str(tmp_path / "out" / "batch_output.jsonl")
    state, summary = await _run(requests_filepath=source, save_filepath=out, max_requests_per_minute=math.inf,
                                request_url=f"{server.url}/v1/chat/completions", shards=3)
    assert state.is_completed()
    results = read_jsonl(out)
    assert [r["custom_id"] for r in results] == [row.get("custom_id") for row in rows]
    assert results[5]["error"]["code"] == "invalid_request_line" and "batch.jsonl line 6" in results[5]["error"]["message"]
    assert results[1]["response"]["body"]["object"] == "list" and results[1]["error"] is None
    assert results[2]["response"]["body"]["choices"][0]["message"]["content"] == "echo: q 2"
    assert results[2]["response"]["status_code"] == 200


async def test_insufficient_quota_stops_and_keeps_finished_rows(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server(quota_after=30)
    source = write_jsonl(tmp_path / "q.jsonl", [_chat(i) for i in range(200)])
    state, summary = await _run(requests_filepath=source, request_url=f"{server.url}/v1/chat/completions",
                                max_requests_per_minute=6_000, max_in_flight=5)
    assert state.is_failed() and "insufficient_quota" in state.message
    totals = summary["totals"]
    assert totals["succeeded"] >= 25 and totals["not_sent"] > 100
    assert totals["rows_done"] + totals["not_sent"] == 200
    results = read_jsonl(tmp_path / "q_results.jsonl")
    assert len(results) == totals["rows_done"]
    assert all(isinstance(result[1], dict) for result in results)
    assert server.stats()["requests"] <= totals["succeeded"] + 5 + 1  # stopped at once: at most the in-flight ones


async def test_a_request_that_can_never_fit_fails_at_once(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server()
    big = {"model": "gpt-4", "messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 10}
    source = write_jsonl(tmp_path / "big.jsonl", [_chat(0), big, _chat(2)])
    state, summary = await asyncio.wait_for(
        _run(requests_filepath=source, request_url=f"{server.url}/v1/chat/completions", max_tokens_per_minute=1_000),
        timeout=120,
    )
    assert state.is_completed()
    results = read_jsonl(tmp_path / "big_results.jsonl")
    assert "can never be sent" in results[1][1][0]
    assert results[0][1]["choices"] and results[2][1]["choices"]
    assert summary["totals"]["failed_too_large"] == 1
