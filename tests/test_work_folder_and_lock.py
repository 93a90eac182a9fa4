"""Work folders that are ours only, the job lock, and paid answers reused after an edit (flow tests, real servers)."""

# Standard library imports
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List

# Third-party imports
import pytest

# Local application imports
from flows.parallel_requests import parallel_requests
from tasks.job.job_lock import FileLease, Holder, JobLock, JobLocked
from tasks.job.work_location import WorkFolderRefused, WorkLocation
from tasks.storage.uris import remove_stale_temporaries
from tests.conftest import read_jsonl, write_jsonl


def _rows(count: int, tag: str = "r") -> List[Dict[str, Any]]:
    return [{"model": "text-embedding-3-small", "input": f"{tag} {i}", "metadata": {"i": i}} for i in range(count)]


async def _run(**parameters: Any):
    parameters.setdefault("max_requests_per_minute", math.inf)
    parameters.setdefault("max_tokens_per_minute", math.inf)
    state = await parallel_requests(**parameters, return_state=True)
    return state, await state.aresult(raise_on_failure=False)


async def test_an_edited_shuffled_input_sends_exactly_its_changed_and_added_rows(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server()
    url = f"{server.url}/v1/embeddings"
    rows = _rows(300)
    source = tmp_path / "in.jsonl"
    write_jsonl(source, rows)
    state, _ = await _run(requests_filepath=str(source), request_url=url, shards=3)
    assert state.is_completed(), state.message
    server.reset()

    rng = random.Random(7)
    edited = [dict(row) for row in rows]
    changed = rng.sample(range(300), 30)  # 10% of the rows change
    for index in changed:
        edited[index]["input"] = f"changed {index}"
    duplicated = [dict(edited[index], metadata={"copy": index}) for index in rng.sample(range(300), 12)]
    edited += duplicated  # a second occurrence of a request is a new paid answer
    edited.append({"model": "text-embedding-3-small", "input": "brand new"})
    for row in edited[:50]:
        row["metadata"] = {"moved": row.get("metadata")}  # metadata is not part of a row's identity
    rng.shuffle(edited)
    write_jsonl(source, edited)
    state, summary = await _run(requests_filepath=str(source), request_url=url, shards=5)
    assert state.is_completed(), state.message
    stats = server.stats()
    assert stats["answered"] == 30 + 12 + 1 and stats["requests"] == 43, stats
    assert summary["reused_rows"] == 300 - 30
    results = read_jsonl(tmp_path / "in_results.jsonl")
    assert [line[0]["input"] for line in results] == [row["input"] for row in edited]
    assert [line[2] if len(line) > 2 else None for line in results] == [row.get("metadata") for row in edited]
    assert all(line[1]["data"][0]["object"] == "embedding" for line in results)

    # The same edited input again, touched: nothing is sent.
    server.reset()
    os.utime(source, (time.time() + 60, time.time() + 60))
    state, summary = await _run(requests_filepath=str(source), request_url=url, shards=5)
    assert state.is_completed() and summary.get("already_complete") is True
    assert server.stats()["requests"] == 0


async def test_an_edit_after_a_stopped_run_reuses_the_parts_already_paid(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server(quota_after=100)
    url = f"{server.url}/v1/embeddings"
    rows = _rows(200)
    source = tmp_path / "in.jsonl"
    write_jsonl(source, rows)
    state, first = await _run(requests_filepath=str(source), request_url=url, shards=2, max_in_flight=2)
    assert state.is_failed()
    done_before = first["totals"]["succeeded"]
    server.server.config.quota_after = None
    server.reset()
    rows.reverse()
    write_jsonl(source, rows)
    state, second = await _run(requests_filepath=str(source), request_url=url, shards=4)
    assert state.is_completed(), state.message
    assert second["reused_rows"] == done_before
    assert server.stats()["answered"] == 200 - done_before
    assert [line[0]["input"] for line in read_jsonl(tmp_path / "in_results.jsonl")] == [row["input"] for row in rows]


async def test_a_work_folder_of_an_earlier_version_is_refused_and_kept(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server()
    source = write_jsonl(tmp_path / "in.jsonl", _rows(10))
    old = tmp_path / "in_results.jsonl.work"
    old.mkdir()
    (old / "work.json").write_text(json.dumps({"input": source, "input_fingerprint": "10-1-abc", "work_id": "x" * 32,
                                               "complete": False, "output": str(tmp_path / "in_results.jsonl")}))
    (old / "shard-00000-of-00001.part").write_text('0\tr\t["paid"]\n')
    state, _ = await _run(requests_filepath=source, request_url=f"{server.url}/v1/embeddings")
    assert state.is_failed() and "earlier version" in state.message
    assert sorted(os.listdir(old)) == ["shard-00000-of-00001.part", "work.json"]
    assert server.stats()["requests"] == 0


def test_a_work_folder_is_ours_only_when_it_holds_our_manifest(tmp_path) -> None:
    fresh = WorkLocation.open(str(tmp_path / "out.jsonl"), str(tmp_path / "new" / "work"))
    assert os.path.exists(os.path.join(fresh.path, "work.json"))
    as_uri = WorkLocation.open(str(tmp_path / "uri.jsonl"), f"file://{tmp_path}/by-uri")  # not a folder "file:"
    assert as_uri.path == str(tmp_path / "by-uri") and os.path.exists(tmp_path / "by-uri" / "work.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    WorkLocation.open(str(tmp_path / "out.jsonl"), str(empty))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / ".bashrc").write_text("x")
    with pytest.raises(WorkFolderRefused):
        WorkLocation.open(str(tmp_path / "out.jsonl"), str(busy))
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkFolderRefused):
        WorkLocation.open(str(tmp_path / "out.jsonl"), str(tmp_path / "file"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "work.json").write_text("{not json")
    with pytest.raises(WorkFolderRefused):
        WorkLocation.open(str(tmp_path / "out.jsonl"), str(broken))
    assert (broken / "work.json").read_text() == "{not json" and (busy / ".bashrc").exists()


def test_a_live_lock_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path) -> None:
    output, work = str(tmp_path / "out.jsonl"), str(tmp_path / "work")
    first = JobLock.for_job(output, work)
    first.acquire()
    try:
        with pytest.raises(JobLocked, match=f"process {os.getpid()}"):
            JobLock.for_job(output, str(tmp_path / "another-work")).acquire()  # keyed on the output
    finally:
        first.release()
    assert not os.path.exists(tmp_path / ".out.jsonl.lock")

    # A holder that died (a process that no longer runs) does not keep the lock.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease = FileLease(str(tmp_path / ".out.jsonl.lock"))
    now = time.time()
    assert lease.try_take(Holder("dead", socket.gethostname(), dead.pid, None, None, now, now)) is None
    # Another machine's holder that stopped renewing loses it when its lease runs out, not before.
    other = FileLease(str(tmp_path / "w.lock"))
    assert other.try_take(Holder("far", "other-host", 1, None, None, now, now)) is None
    assert other.try_take(Holder.of_this_process(None)).host == "other-host"
    with open(other.path, "w", encoding="utf-8") as handle:
        json.dump(vars(Holder("far", "other-host", 1, None, None, now - 600, now - 600)), handle)
    second = JobLock.for_job(output, work)
    second.leases.append(other)
    second.acquire()
    second.release()


def test_an_s3_outputs_lock_holds_on_this_machine_whatever_the_work_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = JobLock.for_job("s3://jobs/out.jsonl", str(tmp_path / "work-a"))
    first.acquire()
    try:
        with pytest.raises(JobLocked):
            JobLock.for_job("s3://jobs/out.jsonl", str(tmp_path / "work-b")).acquire()
    finally:
        first.release()


async def test_a_part_written_for_other_content_is_never_taken_for_this_rows_answer(
        prefect_api_url, api_server, tmp_path) -> None:
    server = api_server(quota_after=40)
    url = f"{server.url}/v1/embeddings"
    source = tmp_path / "in.jsonl"
    write_jsonl(source, _rows(100, tag="old"))
    state, _ = await _run(requests_filepath=str(source), request_url=url, max_in_flight=2)
    assert state.is_failed()
    # The input is replaced while its generation's parts stay (as when a file changes under a running job):
    # the manifest's generation is made to claim the new content.
    write_jsonl(source, _rows(100, tag="new"))
    manifest_path = tmp_path / "in_results.jsonl.work" / "work.json"
    manifest = json.loads(manifest_path.read_text())
    from tasks.storage.uris import input_fingerprint
    manifest["current"]["input_fingerprint"] = input_fingerprint(str(source))
    manifest_path.write_text(json.dumps(manifest))
    server.server.config.quota_after = None
    server.reset()
    state, _ = await _run(requests_filepath=str(source), request_url=url)
    assert state.is_completed(), state.message
    assert [line[0]["input"] for line in read_jsonl(tmp_path / "in_results.jsonl")] == [f"new {i}" for i in range(100)]
    assert server.stats()["answered"] == 100


def test_the_lock_through_redis_spans_machines_that_share_no_folder(redis_url: str, tmp_path) -> None:
    output = "s3://jobs/out/results.jsonl"
    first = JobLock.for_job(output, str(tmp_path / "machine-a"), redis_url)
    first.acquire()
    try:
        with pytest.raises(JobLocked):
            JobLock.for_job(output, str(tmp_path / "machine-b"), redis_url).acquire()
    finally:
        first.release()
    again = JobLock.for_job(output, str(tmp_path / "machine-b"), redis_url)
    again.acquire()
    again.release()


async def test_a_deleted_s3_output_is_rebuilt(prefect_api_url, api_server, s3, tmp_path) -> None:
    server = api_server()
    rows = _rows(50)
    s3.put_object(Bucket="jobs", Key="in.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    parameters = dict(requests_filepath="s3://jobs/in.jsonl", save_filepath="s3://jobs/out.jsonl",
                      request_url=f"{server.url}/v1/embeddings", work_dir=str(tmp_path / "work"))
    state, _ = await _run(**parameters)
    assert state.is_completed(), state.message
    s3.delete_object(Bucket="jobs", Key="out.jsonl")
    state, summary = await _run(**parameters)
    assert state.is_completed() and not summary.get("already_complete"), summary
    body = s3.get_object(Bucket="jobs", Key="out.jsonl")["Body"].read().decode().splitlines()
    assert [json.loads(line)[0]["input"] for line in body] == [row["input"] for row in rows]


async def test_rows_failed_without_sending_are_decided_again_by_the_next_run(prefect_api_url, api_server, tmp_path) -> None:
    server = api_server()
    rows: List[Dict[str, Any]] = [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {i}"}],
                                   "max_tokens": 5} for i in range(40)]
    rows[9] = {"model": "house-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    parameters = dict(requests_filepath=source, request_url=f"{server.url}/v1/chat/completions", budget_usd=5.0)
    state, summary = await _run(**parameters)
    assert state.is_completed() and summary["totals"]["failed_unpriced"] == 1
    assert "no price for model 'house-model'" in read_jsonl(tmp_path / "in_results.jsonl")[9][1][0]
    server.reset()
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"house-model": {"input": 1.0, "output": 2.0}}))
    state, summary = await _run(**parameters, price_table=str(prices))
    assert state.is_completed(), state.message
    assert server.stats()["answered"] == 1 and summary["reused_rows"] == 39  # only the unpriced row is sent
    assert read_jsonl(tmp_path / "in_results.jsonl")[9][1]["choices"][0]["message"]["content"] == "echo: hi"
    server.reset()
    state, summary = await _run(**parameters, price_table=str(prices))
    assert summary.get("already_complete") is True and server.stats()["requests"] == 0


async def test_no_paid_answer_is_lost_to_an_empty_input_a_deleted_output_or_a_touched_one(
        prefect_api_url, api_server, tmp_path) -> None:
    server = api_server()
    url = f"{server.url}/v1/embeddings"
    rows = _rows(60)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, rows)
    parameters = dict(requests_filepath=str(source), save_filepath=str(output), request_url=url, shards=2)
    state, _ = await _run(**parameters)
    assert state.is_completed() and server.stats()["answered"] == 60
    stranger = tmp_path / "out.jsonl.work" / f"gen-{'a' * 32}"
    stranger.mkdir()
    (stranger / "shard-00000-of-00001.part").write_text("not ours: never named by the manifest\n")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    state, summary = await _run(**dict(parameters, requests_filepath=str(empty)))
    assert state.is_completed() and summary["totals"]["rows"] == 0
    server.reset()
    state, summary = await _run(**parameters)  # the original input again: every answer is still there
    assert state.is_completed() and summary["reused_rows"] == 60 and server.stats()["requests"] == 0

    output.unlink()  # a deleted output is rebuilt from the kept answers, without paying again
    state, summary = await _run(**parameters)
    assert state.is_completed() and len(read_jsonl(output)) == 60 and server.stats()["requests"] == 0
    output.write_text("".join(output.read_text().splitlines(keepends=True)[:10]))  # cut short by hand
    state, summary = await _run(**parameters)
    assert state.is_completed() and len(read_jsonl(output)) == 60 and server.stats()["requests"] == 0

    os.utime(output, (time.time() + 60, time.time() + 60))  # a touched output does not matter
    rows[5]["input"] = "changed"
    write_jsonl(source, rows)
    state, summary = await _run(**parameters)
    assert state.is_completed() and server.stats()["answered"] == 1 and summary["reused_rows"] == 59
    assert [line[0]["input"] for line in read_jsonl(output)] == [row["input"] for row in rows]
    assert (stranger / "shard-00000-of-00001.part").exists()  # cleaning touches only generations it made


def test_a_live_process_on_this_machine_keeps_its_lock_however_long_ago_it_renewed(tmp_path) -> None:
    lease = FileLease(str(tmp_path / "job.lock"))
    long_ago = time.time() - 3600
    stalled = Holder("stalled", socket.gethostname(), os.getpid(), None, None, long_ago, long_ago)
    assert lease.try_take(stalled) is None
    assert lease.try_take(Holder.of_this_process(None)).token == "stalled"


def test_the_cleanup_of_stale_temporaries_never_touches_the_job_locks_files(tmp_path) -> None:
    # A run cleans its output's leftovers while another run, waiting for the lock, writes the lock's temporary
    # beside it: removing that file made the waiter fail (seen when two runs of one job started at once).
    out = tmp_path / "out.jsonl"
    lock_temporary = tmp_path / ".out.jsonl.lock.0f3a.77aa12bc.tmp"
    assembly_leftover = tmp_path / ".out.jsonl.4411.tmp"
    for path in (lock_temporary, assembly_leftover):
        path.write_text("x")
    assert remove_stale_temporaries(str(out)) == 1
    assert lock_temporary.exists() and not assembly_leftover.exists()
