"""Never destroy, truncate or pay twice: the careless user's mistakes and the crashes, through the command line.

Each test reproduces one way the project once lost data or money (issue 10), against the
project's test server over a real socket, and checks the server's own counts: no body answered
twice, nothing sent that should not be.
"""

# Standard library imports
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

# Third-party imports
import pytest

# Local application imports
from tests.conftest import read_jsonl, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(os.path.dirname(sys.executable), "parallel-requests")
NO_LIMITS = ["--max_requests_per_minute", "inf", "--max_tokens_per_minute", "inf"]


def _rows(count: int, tag: str = "r") -> List[Dict[str, Any]]:
    return [{"model": "text-embedding-3-small", "input": f"{tag} {i}", "metadata": {"i": i}} for i in range(count)]


@pytest.fixture(autouse=True)
def _shared_prefect_server(prefect_api_url: str, monkeypatch) -> None:
    """Every command line of these tests reports to the session's Prefect server (no embedded one to start)."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)


def _cli(arguments: List[str], home: str, extra_env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false", **(extra_env or {}))
    return subprocess.Popen([CLI, *arguments], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(arguments: List[str], home: str, extra_env: Optional[Dict[str, str]] = None, timeout: float = 240):
    process = _cli(arguments, home, extra_env)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _inputs(results: List[Any]) -> List[str]:
    return [line[0]["input"] if isinstance(line[0], dict) else line[0] for line in results]


def test_a_work_dir_over_a_real_folder_is_refused_and_nothing_in_it_is_touched(api_server, tmp_path) -> None:
    server = api_server()
    source = write_jsonl(tmp_path / "in.jsonl", _rows(20))
    mine = tmp_path / "mywork"
    (mine / "photos").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    url = f"{server.url}/v1/embeddings"
    code, out, err = _run(["--requests_filepath", source, "--request_url", url, "--work-dir", str(mine), *NO_LIMITS],
                          str(tmp_path / "home"))
    assert code == 1, err[-2000:]
    assert "mywork" in err and "not a prefect-parallel-requests work folder" in err
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "photos" / "a.jpg").exists()
    assert sorted(os.listdir(mine)) == ["notes.txt", "photos"]
    assert server.stats()["requests"] == 0

    # A work folder of another job (another output) is refused too, and still works for its own job.
    own = tmp_path / "jobwork"
    code, _, err = _run(["--requests_filepath", source, "--request_url", url, "--work-dir", str(own), *NO_LIMITS],
                        str(tmp_path / "home"))
    assert code == 0, err[-2000:]
    code, _, err = _run(["--requests_filepath", source, "--save_filepath", str(tmp_path / "other.jsonl"),
                         "--request_url", url, "--work-dir", str(own), *NO_LIMITS], str(tmp_path / "home"))
    assert code == 1 and "belongs to the job writing" in err
    assert os.path.exists(own / "work.json")


def test_two_runs_of_one_job_at_once_pay_once_and_leave_a_complete_output(api_server, tmp_path) -> None:
    server = api_server(latency_seconds=0.1)
    rows = _rows(200)  # 2.5 s of sending at 8 in flight: the second run starts while the first holds the job
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    arguments = ["--requests_filepath", source, "--request_url", f"{server.url}/v1/embeddings", "--max-in-flight", "8",
                 *NO_LIMITS]
    first = _cli(arguments, str(tmp_path / "home1"))
    second = _cli(arguments, str(tmp_path / "home2"))
    results = [process.communicate(timeout=240) for process in (first, second)]
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 1], results
    loser_err = results[0][1] if first.returncode == 1 else results[1][1]
    assert "another run of this job is in progress" in loser_err and "process" in loser_err
    assert _inputs(read_jsonl(tmp_path / "in_results.jsonl")) == [row["input"] for row in rows]
    stats = server.stats()
    assert stats["answered"] == 200 and stats["bodies_answered_more_than_once"] == 0, stats

    # With --wait-for-lock the later one waits, finds the job complete and sends nothing (a new job: another output).
    server.reset()
    other = ["--save_filepath", str(tmp_path / "other.jsonl"), "--wait-for-lock"]
    first = _cli([*arguments, *other], str(tmp_path / "home1"))
    second = _cli([*arguments, *other], str(tmp_path / "home2"))
    results = [process.communicate(timeout=240) for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, results
    assert len(read_jsonl(tmp_path / "other.jsonl")) == 200
    stats = server.stats()
    assert stats["answered"] == 200 and stats["bodies_answered_more_than_once"] == 0, stats


@pytest.mark.parametrize("step", ["assembly", "rename", "manifest", "cleanup"])
def test_a_kill_at_each_step_of_finishing_then_the_same_command_completes_without_paying_twice(
        api_server, tmp_path, step: str) -> None:
    server = api_server()
    rows = _rows(120)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "in_results.jsonl"
    out.write_text('["an earlier, older output"]\n')
    arguments = ["--requests_filepath", source, "--request_url", f"{server.url}/v1/embeddings", "--shards", "4",
                 *NO_LIMITS]
    code, _, err = _run(arguments, str(tmp_path / "home"), {"PARALLEL_REQUESTS_TEST_KILL_AT": step})
    assert code == -signal.SIGKILL, err[-2000:]
    # Whatever the step, the output is the old one or the complete new one: never a partial one.
    lines = out.read_text().splitlines()
    assert lines == ['["an earlier, older output"]'] or len(lines) == 120
    code, stdout, err = _run(arguments, str(tmp_path / "home"))
    assert code == 0, err[-2000:]
    assert _inputs(read_jsonl(out)) == [row["input"] for row in rows]
    assert [line[2] for line in read_jsonl(out)] == [row["metadata"] for row in rows]
    stats = server.stats()
    assert stats["answered"] == 120 and stats["bodies_answered_more_than_once"] == 0, stats
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    work = tmp_path / "in_results.jsonl.work"
    leftovers = [name for folder in os.listdir(work) if folder.startswith("gen-")
                 for name in os.listdir(work / folder) if not name.endswith(".part")]
    assert leftovers == [] and len([name for name in os.listdir(work) if name.startswith("gen-")]) == 1


def test_a_batch_line_can_never_send_the_key_to_another_host(api_server, tmp_path) -> None:
    server = api_server(api_key="sk-test-key-0123456789")
    foreign = api_server()
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "text-embedding-3-small", "input": f"x {i}"}} for i in range(30)]
    lines[7]["url"] = f"{foreign.url}/v1/embeddings"
    lines[11]["url"] = f"//{foreign.url.split('://')[1]}/v1/embeddings"
    lines[13]["method"] = "DELETE"
    source = write_jsonl(tmp_path / "batch.jsonl", lines)
    code, _, err = _run(["--requests_filepath", source, "--request_url", f"{server.url}/v1/chat/completions",
                         *NO_LIMITS], str(tmp_path / "home"), {"OPENAI_API_KEY": "sk-test-key-0123456789"})
    assert code == 0, err[-2000:]
    assert foreign.stats()["requests"] == 0
    results = read_jsonl(tmp_path / "batch_results.jsonl")
    assert [r["custom_id"] for r in results] == [f"c{i}" for i in range(30)]
    failed = {r["custom_id"] for r in results if r["error"] is not None}
    assert failed == {"c7", "c11", "c13"}
    assert server.stats()["answered"] == 27


def test_a_field_of_the_wrong_type_is_one_error_record_among_the_answers(api_server, tmp_path) -> None:
    server = api_server()
    rows: List[Any] = _rows(50)
    rows.insert(20, {"model": ["text-embedding-3-small"], "input": "odd"})
    rows.insert(30, '{"model": "text-embedding-3-small", "input": "deep", "x": ' + "[" * 5000 + "]" * 5000 + "}")
    rows.insert(31, '{"model": "text-embedding-3-small", "input": "lone \\ud800 surrogate"}')
    rows.insert(32, '{"model": "text-embedding-3-small", "input": "meta", "metadata": {"k": "\\udc00"}}')
    rows.insert(33, "null")
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    code, _, err = _run(["--requests_filepath", source, "--request_url", f"{server.url}/v1/embeddings", *NO_LIMITS],
                        str(tmp_path / "home"))
    assert code == 0, err[-2000:]
    results = read_jsonl(tmp_path / "in_results.jsonl")
    assert len(results) == 55
    assert "in.jsonl line 21: model must be a string" in results[20][1][0]
    assert "in.jsonl line 31: invalid JSON" in results[30][1][0] and "in.jsonl line 34:" in results[33][1][0]
    assert results[31][1]["object"] == "list" and results[32][2] == {"k": "\udc00"}
    assert all(isinstance(line[1], dict) for i, line in enumerate(results) if i not in (20, 30, 33))
    assert server.stats()["answered"] == 52


def test_a_key_with_a_trailing_newline_works_and_an_impossible_key_stops_at_once(api_server, tmp_path) -> None:
    server = api_server(api_key="sk-test-key-0123456789")
    source = write_jsonl(tmp_path / "in.jsonl", _rows(30))
    arguments = ["--requests_filepath", source, "--request_url", f"{server.url}/v1/embeddings", *NO_LIMITS]
    code, _, err = _run(arguments, str(tmp_path / "home"), {"OPENAI_API_KEY": "sk-test-key-0123456789\n"})
    assert code == 0, err[-2000:]
    assert server.stats()["answered"] == 30
    server.reset()
    started = time.monotonic()
    code, out, err = _run([*arguments, "--save_filepath", str(tmp_path / "b.jsonl"), "--api_key",
                           "sk-test key\r\nX-Injected: 1"], str(tmp_path / "home"))
    assert code == 1 and "API key" in err and "sk-test" not in err + out
    assert time.monotonic() - started < 30
    assert server.stats()["requests"] == 0 and not (tmp_path / "b.jsonl").exists()


def test_a_batch_file_whose_first_line_is_over_100_kib_is_answered_like_the_others(api_server, tmp_path) -> None:
    server = api_server()
    image = "data:image/png;base64," + "A" * 110_000
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "max_tokens": 5,
                       "messages": [{"role": "user", "content": [{"type": "text", "text": f"row {i}"}] + (
                           [{"type": "image_url", "image_url": {"url": image}}] if i == 0 else [])}]}}
             for i in range(20)]
    source = write_jsonl(tmp_path / "batch.jsonl", lines)
    assert len(open(source, "rb").readline()) > 100 * 1024
    code, _, err = _run(["--requests_filepath", source, "--request_url", f"{server.url}/v1/chat/completions",
                         *NO_LIMITS], str(tmp_path / "home"))
    assert code == 0, err[-2000:]
    results = read_jsonl(tmp_path / "batch_results.jsonl")
    assert [r["custom_id"] for r in results] == [f"c{i}" for i in range(20)]
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in results)


def test_kill_9_then_a_touched_input_resumes_and_resends_at_most_what_was_in_flight(api_server, tmp_path) -> None:
    server = api_server(latency_seconds=0.05)
    rows = _rows(500)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    in_flight = 8
    arguments = ["--requests_filepath", source, "--request_url", f"{server.url}/v1/embeddings",
                 "--max-in-flight", str(in_flight), "--shards", "3", *NO_LIMITS]
    first = _cli(arguments, str(tmp_path / "home"))
    deadline = time.monotonic() + 120
    while server.stats()["answered"] < 200:
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
    content = open(source, "rb").read()
    os.remove(source)  # re-downloaded: a new file with the same bytes and a new modification time
    with open(source, "wb") as handle:
        handle.write(content)
    os.utime(source, (time.time() + 3600, time.time() + 3600))
    code, out, err = _run(arguments, str(tmp_path / "home"))
    assert code == 0, err[-2000:]
    assert _inputs(read_jsonl(tmp_path / "in_results.jsonl")) == [row["input"] for row in rows]
    stats = server.stats()
    assert stats["bodies_received_more_than_once"] <= in_flight and stats["requests"] - 500 <= in_flight, stats


def test_an_unpriced_row_is_one_error_record_and_the_budget_holds_for_the_rest(api_server, tmp_path) -> None:
    # Requests overlap (8 in flight): each one's reservation is settled with its own cost, so the budget is spent.
    server = api_server()
    rows: List[Any] = [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hello {i}"}],
                        "max_tokens": 10, "metadata": {"i": i}} for i in range(300)]
    rows.insert(40, {"model": "my-finetune-without-price", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5})
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    arguments = ["--requests_filepath", source, "--request_url", f"{server.url}/v1/chat/completions",
                 "--budget-usd", "0.001", "--max-in-flight", "8", *NO_LIMITS]
    code, out, err = _run(arguments, str(tmp_path / "home"))
    results = read_jsonl(tmp_path / "in_results.jsonl")
    unpriced = [line for line in results if line[0].get("model") == "my-finetune-without-price"]
    assert len(unpriced) == 1 and "no price for model" in unpriced[0][1][0] and "$0.001" in unpriced[0][1][0]
    answered = server.stats()["answered"]
    # gpt-4o-mini at $0.15 / $0.60 per 1M tokens: each row is reserved at its most (about 10 prompt + 10
    # completion tokens, $0.0000075) and settled at its own cost: $0.001 covers a good part, not all of them.
    assert 100 < answered < 300, (answered, err[-1500:])
    summary_cost = float(out.split("cost $")[1].split()[0])
    assert 0.00075 <= summary_cost <= 0.001, out
    assert code == 1 and "budget of $0.001 reached" in err
    assert "NoneType: None" not in err  # the shard's Failed state is logged without an empty traceback
