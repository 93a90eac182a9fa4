"""Storage and resume: S3 over a real endpoint, compressed inputs and outputs, kill -9 and rerun, no double paying."""

# Standard library imports
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List

# Third-party imports
import pytest
from backports import zstd

# Local application imports
from flows.parallel_requests import parallel_requests
from tasks.storage.results_storage import PartWriter, read_part_state
from tests.conftest import read_jsonl, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(os.path.dirname(sys.executable), "parallel-requests")


def _embeddings(count: int, tag: str = "t") -> List[Dict[str, Any]]:
    return [{"model": "text-embedding-3-small", "input": f"{tag} {i}", "metadata": {"i": i}} for i in range(count)]


def _inputs_of(results: List[Any]) -> List[str]:
    return [line[0]["input"] for line in results]


async def _run(**parameters: Any):
    parameters.setdefault("max_requests_per_minute", math.inf)  # pacing is not what these tests are about
    parameters.setdefault("max_tokens_per_minute", math.inf)
    state = await parallel_requests(**parameters, return_state=True)
    return state, await state.aresult(raise_on_failure=False)


async def test_s3_input_and_output_in_order(prefect_api_url, api_server, s3, tmp_path) -> None:
    server = api_server()
    rows = _embeddings(500)
    s3.put_object(Bucket="jobs", Key="in/requests.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    state, summary = await _run(requests_filepath="s3://jobs/in/requests.jsonl", save_filepath="s3://jobs/out/results.jsonl",
                                request_url=f"{server.url}/v1/embeddings", shards=5,
                                work_dir=str(tmp_path / "work"))
    assert state.is_completed(), state.message
    body = s3.get_object(Bucket="jobs", Key="out/results.jsonl")["Body"].read().decode()
    results = [json.loads(line) for line in body.splitlines()]
    assert _inputs_of(results) == [row["input"] for row in rows]
    assert [line[2] for line in results] == [row["metadata"] for row in rows]
    assert server.stats()["requests"] == 500


async def test_missing_bucket_fails_with_one_line_naming_the_uri(prefect_api_url, api_server, s3) -> None:
    server = api_server()
    state, _ = await _run(requests_filepath="s3://no-such-bucket/requests.jsonl",
                          request_url=f"{server.url}/v1/embeddings")
    assert state.is_failed()
    assert "s3://no-such-bucket/requests.jsonl" in state.message and "\n" not in state.message
    assert server.stats()["requests"] == 0


@pytest.mark.parametrize("extension", [".gz", ".zst"])
async def test_compressed_inputs_give_the_same_results(prefect_api_url, api_server, tmp_path, extension: str) -> None:
    server = api_server()
    rows = _embeddings(300)
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(text)
    packed = tmp_path / f"packed.jsonl{extension}"
    packed.write_bytes(gzip.compress(text) if extension == ".gz" else zstd.compress(text))
    for source, out in ((plain, tmp_path / "plain_out.jsonl"), (packed, tmp_path / "packed_out.jsonl.gz")):
        state, _ = await _run(requests_filepath=str(source), save_filepath=str(out),
                              request_url=f"{server.url}/v1/embeddings", shards=4)
        assert state.is_completed(), state.message
    plain_results = read_jsonl(tmp_path / "plain_out.jsonl")
    packed_results = [json.loads(line) for line in gzip.decompress((tmp_path / "packed_out.jsonl.gz").read_bytes()).splitlines()]
    assert packed_results == plain_results and len(plain_results) == 300


async def test_another_url_starts_over_and_a_finished_job_sends_nothing(prefect_api_url, api_server, tmp_path) -> None:
    rows = _embeddings(200)
    source = write_jsonl(tmp_path / "r.jsonl", rows)
    poor = api_server(quota_after=60)
    state, first = await _run(requests_filepath=source, request_url=f"{poor.url}/v1/embeddings", shards=3, max_in_flight=4)
    assert state.is_failed() and 55 <= first["totals"]["rows_done"] < 200

    other = api_server()
    state, second = await _run(requests_filepath=source, request_url=f"{other.url}/v1/embeddings", shards=3)
    assert state.is_completed() and second["totals"]["resumed_rows"] == 0  # a different URL is a different job
    assert other.stats()["requests"] == 200
    other.reset()

    state, third = await _run(requests_filepath=source, request_url=f"{other.url}/v1/embeddings", shards=3)
    assert state.is_completed() and third.get("already_complete") is True
    assert other.stats()["requests"] == 0  # a finished job is not paid for twice
    assert _inputs_of(read_jsonl(tmp_path / "r_results.jsonl")) == [row["input"] for row in rows]


async def test_quota_stop_then_rerun_continues_without_duplicates(prefect_api_url, api_server, tmp_path) -> None:
    rows = _embeddings(240)
    source = write_jsonl(tmp_path / "q.jsonl", rows)
    server = api_server(quota_after=100)
    url = f"{server.url}/v1/embeddings"
    state, first = await _run(requests_filepath=source, request_url=url, shards=4, max_in_flight=3)
    assert state.is_failed()
    server.server.config.quota_after = None  # the account is topped up
    state, second = await _run(requests_filepath=source, request_url=url, shards=4, max_in_flight=3)
    assert state.is_completed(), state.message
    assert second["totals"]["resumed_rows"] == first["totals"]["rows_done"]
    results = read_jsonl(tmp_path / "q_results.jsonl")
    assert _inputs_of(results) == [row["input"] for row in rows]
    stats = server.stats()
    # Bodies accepted more than once: only the rows answered insufficient_quota (never done) are sent again.
    assert stats["status_counts"]["200"] == 240


async def test_a_changed_input_never_mixes_with_old_parts(prefect_api_url, api_server, tmp_path) -> None:
    source = tmp_path / "c.jsonl"
    write_jsonl(source, _embeddings(150, tag="old"))
    server = api_server(quota_after=50)
    url = f"{server.url}/v1/embeddings"
    state, _ = await _run(requests_filepath=str(source), request_url=url, shards=2, max_in_flight=2)
    assert state.is_failed()
    write_jsonl(source, _embeddings(150, tag="new"))
    server.server.config.quota_after = None
    state, summary = await _run(requests_filepath=str(source), request_url=url, shards=2, max_in_flight=2)
    assert state.is_completed() and summary["totals"]["resumed_rows"] == 0
    assert _inputs_of(read_jsonl(tmp_path / "c_results.jsonl")) == [f"new {i}" for i in range(150)]


def test_a_torn_record_is_cut_off_when_a_part_reopens(tmp_path) -> None:
    path = str(tmp_path / "p.part")
    d = "ab" * 16
    with open(path, "wb") as handle:
        handle.write(f'0\ts\t{d}\t\n0\tr\t{d}\t["a"]\n1\ts\t{d}\t\n2\ts\t{d}\t\n1\tr\t{d}\t["b"'.encode())
    state = read_part_state(path)
    assert set(state.done) == {0} and state.sent_unfinished == 2
    with PartWriter(path) as part:
        part.write_result(1, d, b'["b"]')
    assert open(path, "rb").read().endswith(f'2\ts\t{d}\t\n1\tr\t{d}\t["b"]\n'.encode())
    assert set(read_part_state(path).done) == {0, 1}


def _cli(arguments: List[str], home: str, api_url: str, **popen: Any) -> subprocess.Popen:
    """The command line in a process group of its own, on the session's Prefect server (killing it kills no server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=api_url)
    return subprocess.Popen([CLI, *arguments], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


def test_kill_9_half_way_then_the_same_command_finishes_without_paying_twice(prefect_api_url, api_server,
                                                                             tmp_path) -> None:
    server = api_server(requests_per_minute=6000, latency_seconds=0.05)
    rows = _embeddings(600)
    source = write_jsonl(tmp_path / "k.jsonl", rows)
    in_flight = 8
    arguments = ["--requests_filepath", source, "--request_url", f"{server.url}/v1/embeddings",
                 "--max_requests_per_minute", "6000", "--max_tokens_per_minute", "inf", "--max-in-flight", str(in_flight),
                 "--shards", "4"]
    home = str(tmp_path / "home")
    first = _cli(arguments, home, prefect_api_url)
    deadline = time.monotonic() + 120
    while server.stats()["requests"] < 300:
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before half-way"
        time.sleep(0.02)
    _kill_group(first)
    received_before = server.stats()["requests"]
    second = _cli(arguments, home, prefect_api_url)
    out, err = second.communicate(timeout=240)
    assert second.returncode == 0, err[-3000:]
    results = read_jsonl(tmp_path / "k_results.jsonl")
    assert _inputs_of(results) == [row["input"] for row in rows]
    stats = server.stats()
    assert stats["bodies_received_more_than_once"] <= in_flight, stats
    assert stats["requests"] - 600 <= in_flight
    assert received_before >= 300 and "resumed" in out


def test_kill_9_during_the_final_assembly_then_the_same_command_completes(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server()
    rows = _embeddings(20000)
    source = write_jsonl(tmp_path / "a.jsonl", rows)
    arguments = ["--requests_filepath", source, "--request_url", f"{server.url}/v1/embeddings",
                 "--max_requests_per_minute", "inf", "--max_tokens_per_minute", "inf", "--shards", "4"]
    home = str(tmp_path / "home")
    first = _cli(arguments, home, prefect_api_url)
    deadline = time.monotonic() + 180
    caught = False
    while first.poll() is None and time.monotonic() < deadline:
        if any(name.startswith(".a_results.jsonl.") and name.endswith(".tmp") and ".lock" not in name
               for name in os.listdir(tmp_path)):
            _kill_group(first)
            caught = True
            break
        time.sleep(0.001)
    if not caught:
        pytest.skip("the assembly finished before it could be interrupted")
    assert not (tmp_path / "a_results.jsonl").exists()
    sent = server.stats()["requests"]
    assert sent == 20000
    second = _cli(arguments, home, prefect_api_url)
    out, err = second.communicate(timeout=240)
    assert second.returncode == 0, err[-3000:]
    assert server.stats()["requests"] == sent  # every shard was done: nothing is sent again
    assert _inputs_of(read_jsonl(tmp_path / "a_results.jsonl")) == [row["input"] for row in rows]
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_sharded_s3_reads_fetch_little_more_than_the_object(s3, monkeypatch) -> None:
    from tasks.shards.sharding import iter_shard_lines, plan_shards
    from tests.byte_counting_proxy import ByteCountingProxy

    lines = [json.dumps({"model": "m", "input": "x" * (100 + (i * 37) % 3000), "i": i}).encode() + b"\n" for i in range(21000)]
    content = b"".join(lines)
    s3.put_object(Bucket="jobs", Key="big.jsonl", Body=content)
    endpoint = os.environ["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)
    with ByteCountingProxy(endpoint[0].removeprefix("http://"), int(endpoint[1])) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        shards = plan_shards("s3://jobs/big.jsonl", 16)
        seen = [raw for shard in shards for _, _, raw in iter_shard_lines(shard)]
        fetched = proxy.bytes_from_server
    assert seen == lines
    assert len(content) > 30_000_000
    assert fetched <= 1.1 * len(content), (fetched, len(content))
