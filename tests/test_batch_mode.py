"""Batch mode through the command line, against the test server's Files and Batch API: every row once, paid once.

Each test checks the server's own counts: batches created (and created twice for one file of the
job), rows answered (and bodies answered more than once, online or in a batch), refusals.
"""

# Standard library imports
import json
import os
import re
import signal
import time
import urllib.request
from typing import Any, Dict, List

# Third-party imports
import pytest

# Local application imports
from tasks.requests.pricing import PriceTable
from tests.conftest import read_jsonl
from tests.test_data_safety import _cli, _run

KEY = "sk-test-BATCHSECRET-0123456789"


@pytest.fixture(autouse=True)
def _shared_prefect_server(prefect_api_url: str, monkeypatch) -> None:
    """Every command line of these tests reports to the session's Prefect server."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)


def _mixed_job(path: Any, count: int) -> List[Any]:
    """Chat rows of two models, with malformed lines (ours to catch) and unknown-model rows (the server's 404)."""
    rows: List[Any] = []
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            if i % 97 == 5:
                row: Any = '{"model": "gpt-4o-mini", "messages": ['
                handle.write(row + "\n")
            else:
                model = "unknown-model" if i % 89 == 7 else ("gpt-4o-mini" if i % 2 else "gpt-4.1-nano")
                row = {"model": model, "messages": [{"role": "user", "content": f"row {i} " + "lorem " * (i % 13)}],
                       "max_tokens": 40, "metadata": {"row": i}}
                handle.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


def _arguments(server: Any, source: str, save: str, *extra: str) -> List[str]:
    return ["--requests_filepath", source, "--save_filepath", save, "--request_url",
            f"{server.url}/v1/chat/completions", "--api_key", KEY, "--mode", "batch", *extra]


def _check_every_row(rows: List[Any], save: str) -> Dict[str, int]:
    """Every row has its own result, in input order; returns counts of each kind."""
    results = read_jsonl(save)
    assert len(results) == len(rows)
    counts = {"answered": 0, "malformed": 0, "invalid": 0}
    for row, line in zip(rows, results):
        if isinstance(row, str):
            counts["malformed"] += 1
            assert line[0] == row and "in.jsonl line" in line[1][0]
        elif row["model"] == "unknown-model":
            counts["invalid"] += 1
            assert line[2] == row["metadata"] and "HTTP 404" in line[1][0]
        else:
            counts["answered"] += 1
            assert line[2] == row["metadata"]
            assert line[1]["choices"][0]["message"]["content"] == "echo: " + row["messages"][0]["content"]
    return counts


def test_a_batch_job_of_two_models_answers_every_row_in_order_at_batch_prices(api_server, tmp_path) -> None:
    server = api_server(batch_rows_per_second=400)
    source = str(tmp_path / "in.jsonl")
    rows = _mixed_job(source, 600)
    save = str(tmp_path / "out.jsonl")
    code, out, err = _run(_arguments(server, source, save, "--batch-max-requests", "200"), str(tmp_path / "home"))
    assert code == 0, err[-3000:]
    assert KEY not in out + err
    counts = _check_every_row(rows, save)
    stats = server.stats()
    batches = stats["batches"]
    # 2 models in files of at most 200 rows, plus the unknown model's file; each created once.
    assert batches["created"] >= 5 and batches["duplicate_metadata"] == 0
    assert batches["rows_created"] == counts["answered"] + counts["invalid"]
    assert stats["bodies_answered_more_than_once"] == 0 and stats["requests"] == 0  # nothing went online
    assert batches["files_alive"] == 0  # input and result files deleted once read
    # The cost is each answer's usage at its model's batch price (half the online one).
    prices = PriceTable.load(None)
    expected = 0.0
    for row, line in zip(rows, read_jsonl(save)):
        if isinstance(row, dict) and row["model"] != "unknown-model":
            usage = line[1]["usage"]
            expected += prices.cost(row["model"], usage["prompt_tokens"], usage["completion_tokens"], batch=True)
    assert f"cost ${expected:,.4f}" in out, (expected, out)
    assert "0 HTTP requests" in out and f"{counts['answered']:,} succeeded" in out
    assert not [name for name in os.listdir(f"{save}.work") if name.startswith("gen-")
                for name in os.listdir(os.path.join(f"{save}.work", name)) if not name.endswith(".part")]


@pytest.mark.parametrize("step", ["batch-creating", "batch-created", "batch-downloaded", "batch-collected"])
def test_kill_9_at_each_step_of_a_batch_then_the_same_command_creates_no_batch_twice(api_server, tmp_path,
                                                                                     step: str) -> None:
    server = api_server(batch_rows_per_second=300)
    source = str(tmp_path / "in.jsonl")
    rows = _mixed_job(source, 300)
    save = str(tmp_path / "out.jsonl")
    arguments = _arguments(server, source, save)
    code, _, err = _run(arguments, str(tmp_path / "home"), {"PARALLEL_REQUESTS_TEST_KILL_AT": step})
    assert code == -signal.SIGKILL, err[-2000:]
    code, out, err = _run(arguments, str(tmp_path / "home"))
    assert code == 0, err[-3000:]
    _check_every_row(rows, save)
    # Rows whose records the killed run wrote are counted once: as resumed, never again as succeeded.
    found = re.search(r"rows ([\d,]+): ([\d,]+) resumed .*?, ([\d,]+) succeeded, ([\d,]+) failed .*?, ([\d,-]+) not sent",
                      out)
    assert found, out
    total, resumed, succeeded, failed, not_sent = (int(value.replace(",", "")) for value in found.groups())
    assert total == len(rows) and not_sent == 0 and resumed + succeeded + failed == total, out
    stats = server.stats()
    assert stats["batches"]["duplicate_metadata"] == 0, stats["batches"]
    assert stats["bodies_answered_more_than_once"] == 0, stats
    if step == "batch-created":  # the batch the killed run created was found by its token, not created again
        assert "created by an interrupted run" in out + err


def test_kill_9_while_batches_run_then_the_same_command_resumes_polling_them(api_server, tmp_path) -> None:
    server = api_server(batch_rows_per_second=40)
    source = str(tmp_path / "in.jsonl")
    rows = _mixed_job(source, 400)
    save = str(tmp_path / "out.jsonl")
    arguments = _arguments(server, source, save)
    first = _cli(arguments, str(tmp_path / "home"))
    deadline = time.monotonic() + 60
    while server.stats()["batches"]["by_status"].get("in_progress", 0) < 2:
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()[1][-2000:]
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    created = server.stats()["batches"]["created"]
    code, out, err = _run(arguments, str(tmp_path / "home"))
    assert code == 0, err[-3000:]
    _check_every_row(rows, save)
    stats = server.stats()
    assert stats["batches"]["created"] == created  # the running batches were polled again, none created
    assert stats["bodies_answered_more_than_once"] == 0


def test_submit_only_then_the_same_command_collects_without_submitting_again(api_server, tmp_path) -> None:
    server = api_server(batch_rows_per_second=40)
    source = str(tmp_path / "in.jsonl")
    rows = _mixed_job(source, 300)
    save = str(tmp_path / "out.jsonl")
    arguments = _arguments(server, source, save, "--batch-submit-only")
    code, out, err = _run(arguments, str(tmp_path / "home"))
    assert code == 0, err[-3000:]
    assert "waiting for batches" in out and "run the same command again" in out
    assert not os.path.exists(save) or len(read_jsonl(save)) < len(rows)
    created = server.stats()["batches"]["created"]
    assert created == 3  # one file per model; each accepted into the queue before the run returned
    # While they run, an online run of the job, or a run over an edited input, would pay for their rows again.
    online = [argument for argument in arguments if argument not in ("--mode", "batch", "--batch-submit-only")]
    code, out, err = _run(online, str(tmp_path / "home"))
    assert code == 1 and "still run on the server" in err and server.stats()["requests"] == 0
    original = open(source).read()
    with open(source, "a") as handle:
        handle.write(json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "new"}]}) + "\n")
    code, out, err = _run(arguments, str(tmp_path / "home"))
    assert code == 1 and "changed while" in err and server.stats()["batches"]["created"] == created
    with open(source, "w") as handle:
        handle.write(original)
    for _ in range(10):  # the same command, as a schedule would run it, until the batches have finished
        time.sleep(1.0)
        code, out, err = _run(arguments, str(tmp_path / "home"))
        assert code == 0, err[-3000:]
        assert server.stats()["batches"]["created"] == created
        if "parallel-requests complete" in out or "already complete" in out:
            break
    _check_every_row(rows, save)
    assert server.stats()["bodies_answered_more_than_once"] == 0
    # Once more: complete, nothing sent or created.
    code, out, _ = _run(arguments, str(tmp_path / "home"))
    assert code == 0 and "already complete" in out
    assert server.stats()["batches"]["created"] == created


@pytest.mark.parametrize("fallback", ["batch", "online"])
def test_a_batch_that_expires_30_percent_done_ends_with_every_row_answered_once(api_server, tmp_path,
                                                                                fallback: str) -> None:
    server = api_server(batch_rows_per_second=300, batch_expire_fraction=0.3, batch_expire_count=1)
    source = str(tmp_path / "in.jsonl")
    with open(source, "w", encoding="utf-8") as handle:
        rows = [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"row {i}"}], "metadata": {"row": i}}
                for i in range(300)]
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    save = str(tmp_path / "out.jsonl")
    code, out, err = _run(_arguments(server, source, save, "--batch-fallback", fallback), str(tmp_path / "home"))
    assert code == 0, err[-3000:]
    _check_every_row(rows, save)
    stats = server.stats()
    assert stats["bodies_answered_more_than_once"] == 0, stats
    assert stats["answered"] == 300  # online and batch answers alike
    assert stats["batches"]["by_status"].get("expired") == 1
    if fallback == "online":  # the 70% left went online
        assert stats["requests"] == 210 and stats["batches"]["rows_answered"] == 90
        assert stats["batches"]["created"] == 1
    else:  # ... or into one new batch
        assert stats["requests"] == 0 and stats["batches"]["created"] == 2


def _word_rows(path: Any, count: int) -> List[Dict[str, Any]]:
    rows = [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"row {i} " + "word " * 20}],
             "metadata": {"row": i}} for i in range(count)]
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def test_a_queue_cap_below_the_job_is_refused_once_at_most(api_server, tmp_path) -> None:
    # Batches of 40 rows (about 1,200 queued tokens each) that take 4 s: two fit under the cap of 3,000, a third not.
    server = api_server(batch_rows_per_second=10, batch_queue_tokens=3000)
    source = str(tmp_path / "in.jsonl")
    rows = _word_rows(source, 160)
    save = str(tmp_path / "out.jsonl")
    code, out, err = _run(_arguments(server, source, save, "--batch-max-requests", "40"), str(tmp_path / "home"))
    assert code == 0, err[-3000:]
    _check_every_row(rows, save)
    stats = server.stats()
    assert stats["batches"]["queue_refusals"] == 1, stats["batches"]  # the first refusal taught the cap
    assert stats["batches"]["created"] == 5 and stats["bodies_answered_more_than_once"] == 0


def test_a_queue_cap_given_is_never_refused_and_sizes_the_files(api_server, tmp_path) -> None:
    server = api_server(batch_rows_per_second=200, batch_queue_tokens=3000)
    source = str(tmp_path / "in.jsonl")
    rows = _word_rows(source, 200)
    save = str(tmp_path / "out.jsonl")
    code, _, err = _run(_arguments(server, source, save, "--batch-queue-tokens", "3000"), str(tmp_path / "home"))
    assert code == 0, err[-3000:]
    _check_every_row(rows, save)
    stats = server.stats()
    assert stats["batches"]["queue_refusals"] == 0 and stats["batches"]["created"] >= 3, stats["batches"]


def test_a_file_above_the_queue_cap_is_split_after_one_refusal_and_every_row_answered(api_server, tmp_path) -> None:
    # One file of 160 rows (about 4,800 queued tokens) against a cap of 3,000: refused once, then split.
    server = api_server(batch_rows_per_second=100, batch_queue_tokens=3000)
    source = str(tmp_path / "in.jsonl")
    rows = _word_rows(source, 160)
    save = str(tmp_path / "out.jsonl")
    code, out, err = _run(_arguments(server, source, save), str(tmp_path / "home"))
    assert code == 0, err[-3000:]
    _check_every_row(rows, save)
    stats = server.stats()
    assert stats["batches"]["queue_refusals"] == 1, stats["batches"]
    assert stats["batches"]["created"] >= 3 and stats["bodies_answered_more_than_once"] == 0
    assert stats["batches"]["files_alive"] == 0  # the refused file's upload was deleted too


def test_rows_the_batch_api_cannot_take_get_their_error_and_the_others_are_answered(api_server, tmp_path) -> None:
    server = api_server(batch_rows_per_second=500)
    source = str(tmp_path / "in.jsonl")
    lines = [{"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"row {i}"}]}} for i in range(20)]
    lines.insert(5, {"custom_id": "image-1", "method": "POST", "url": "/v1/images/generations",
                     "body": {"model": "dall-e-3", "prompt": "a cat"}})
    lines.insert(9, {"custom_id": "embed-huge", "method": "POST", "url": "/v1/embeddings",
                     "body": {"model": "text-embedding-3-small", "input": ["a"] * 50_001}})
    lines.insert(12, {"custom_id": 17, "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}})
    for number, model in enumerate((None, "", "absent")):  # one file per model: these would share a refused one
        body: Dict[str, Any] = {"messages": [{"role": "user", "content": "no model"}]}
        if model != "absent":
            body["model"] = model
        lines.append({"custom_id": f"nomodel-{number}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    with open(source, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    save = str(tmp_path / "out.jsonl")
    code, out, err = _run(_arguments(server, source, save), str(tmp_path / "home"))
    assert code == 0, err[-3000:]
    results = {json.dumps(result.get("custom_id")): result for result in read_jsonl(save)}
    assert len(results) == len(lines)
    assert "does not take /v1/images/generations" in results['"image-1"']["error"]["message"]
    assert "in.jsonl line 6" in results['"image-1"']["error"]["message"]
    assert "50,001 embedding inputs" in results['"embed-huge"']["error"]["message"]
    assert "custom_id" in results["17"]["error"]["message"]  # a number as custom_id is kept in its error line
    for number in range(3):
        assert "needs a \"model\"" in results[f'"nomodel-{number}"']["error"]["message"]
    for i in range(20):
        assert results[f'"chat-{i}"']["response"]["status_code"] == 200
    assert server.stats()["batches"]["created"] == 1


def test_batches_the_server_forgot_are_submitted_again_and_the_job_completes(api_server, tmp_path) -> None:
    server = api_server(batch_rows_per_second=40)
    source = str(tmp_path / "in.jsonl")
    rows = _mixed_job(source, 200)
    save = str(tmp_path / "out.jsonl")
    arguments = _arguments(server, source, save, "--batch-submit-only")
    code, out, err = _run(arguments, str(tmp_path / "home"))
    assert code == 0 and "waiting for batches" in out, err[-3000:]
    created = server.stats()["batches"]["created"]
    urllib.request.urlopen(urllib.request.Request(f"{server.url}/_forget_batches", method="POST"), timeout=10).read()
    code, out, err = _run([argument for argument in arguments if argument != "--batch-submit-only"],
                          str(tmp_path / "home"))
    assert code == 0, err[-3000:]
    assert "does not know batch" in err and "Traceback" not in err
    _check_every_row(rows, save)
    # Each forgotten batch was created once more (one that ended before it was forgotten was collected already).
    assert created < server.stats()["batches"]["created"] <= 2 * created


def test_batch_flags_without_batch_mode_are_refused(tmp_path) -> None:
    source = str(tmp_path / "in.jsonl")
    _word_rows(source, 3)
    for flags in (["--batch-submit-only"], ["--batch-queue-tokens", "1000"], ["--batch-fallback", "online"]):
        code, _, err = _run(["--requests_filepath", source, *flags], str(tmp_path / "home"))
        assert code == 2 and "only works with --mode batch" in err and flags[0] in err, err[-2000:]


def test_a_create_whose_answer_is_lost_is_found_by_its_token_and_never_made_twice(api_server, tmp_path) -> None:
    # The server makes the first two batches but answers 502: a blind retry would pay for them twice.
    server = api_server(batch_rows_per_second=500, batch_create_lost_answers=2)
    source = str(tmp_path / "in.jsonl")
    rows = _mixed_job(source, 200)
    save = str(tmp_path / "out.jsonl")
    code, out, err = _run(_arguments(server, source, save), str(tmp_path / "home"))
    assert code == 0, err[-3000:]
    _check_every_row(rows, save)
    stats = server.stats()
    assert stats["batches"]["created"] == 3 and stats["batches"]["duplicate_metadata"] == 0, stats["batches"]
    assert stats["bodies_answered_more_than_once"] == 0
    assert err.count("was made after all") == 2


def test_a_request_url_carrying_credentials_is_refused_before_anything_runs(tmp_path) -> None:
    source = str(tmp_path / "in.jsonl")
    _word_rows(source, 3)
    for url in ("http://user:USERSECRET@127.0.0.1:9/v1/chat/completions",
                "http://127.0.0.1:9/v1/chat/completions?api-key=QUERYSECRET"):
        code, out, err = _run(["--requests_filepath", source, "--request_url", url], str(tmp_path / "home"))
        assert code == 2 and "must not carry credentials" in err, err[-2000:]
        assert "SECRET" not in out + err
    assert not os.path.exists(str(tmp_path / "in_results.jsonl.work"))


def test_the_same_input_from_another_work_folder_is_refused_while_its_batches_run(api_server, tmp_path) -> None:
    server = api_server(batch_rows_per_second=4)  # the batches run 25 s: still running when the second run looks
    source = str(tmp_path / "in.jsonl")
    _mixed_job(source, 200)
    save = str(tmp_path / "out.jsonl")
    first = _arguments(server, source, save, "--batch-submit-only", "--work-dir", str(tmp_path / "work-a"))
    code, out, err = _run(first, str(tmp_path / "home"))
    assert code == 0 and "waiting for batches" in out, err[-3000:]
    created = server.stats()["batches"]["created"]
    second = _arguments(server, source, save, "--batch-submit-only")  # the default work folder: a new job
    code, out, err = _run(second, str(tmp_path / "home"))
    assert code == 1 and "from another work folder still run" in err, err[-3000:]
    assert server.stats()["batches"]["created"] == created  # nothing submitted twice


def test_result_files_cut_off_in_transfer_are_downloaded_again_not_paid_again(api_server, tmp_path) -> None:
    server = api_server(batch_rows_per_second=500, batch_cut_downloads=2)
    source = str(tmp_path / "in.jsonl")
    rows = _mixed_job(source, 200)
    save = str(tmp_path / "out.jsonl")
    code, out, err = _run(_arguments(server, source, save), str(tmp_path / "home"))
    assert code == 0, err[-3000:]
    _check_every_row(rows, save)
    stats = server.stats()
    assert stats["batches"]["created"] == 3 and stats["bodies_answered_more_than_once"] == 0, stats["batches"]
    assert "downloading them again" in err
