"""Live views, as a user sees them: the status block in a real terminal (tmux), plain progress lines and
``--json`` when stderr is not a terminal, latency and the timeline in the summary and the artifacts.
"""

# Standard library imports
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, List, Optional

# Third-party imports
import pytest

# Local application imports
from tests.conftest import write_jsonl
from tests.test_data_safety import CLI, ROOT, _run

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux drives the real terminal")


def _rows(count: int) -> List[Any]:
    return [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"row {i}"}], "max_tokens": 20,
             "metadata": {"row": i}} for i in range(count)]


class Terminal:
    """One command line in a tmux session 150 columns wide: start it, read the screen, press keys."""

    def __init__(self, name: str, command: str) -> None:
        self.name = name
        subprocess.run(["tmux", "kill-session", "-t", name], stderr=subprocess.DEVNULL)
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "150", "-y", "45", "bash", "--norc"], check=True)
        subprocess.run(["tmux", "send-keys", "-t", name, command, "Enter"], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def wait_for(self, pattern: str, seconds: float) -> re.Match:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = re.search(pattern, self.screen())
            if found:
                return found
            time.sleep(0.25)
        raise AssertionError(f"{pattern!r} never showed; the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], stderr=subprocess.DEVNULL)


def _wait_for_file(path: str, seconds: float) -> None:
    """Return once ``path`` exists, or after ``seconds`` (the caller's asserts then tell what is missing)."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def _command(prefect_api_url: str, tmp_path: Any, arguments: List[str], status_file: Optional[str] = None) -> str:
    env = {"PREFECT_API_URL": prefect_api_url, "PREFECT_HOME": str(tmp_path / "home"), "OPENAI_API_KEY": "sk-live-test",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TERM": "xterm-256color"}
    line = "cd " + shlex.quote(ROOT) + " && env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    line += " " + shlex.join([CLI, *arguments])
    if status_file:
        line += f"; echo exit=$? > {shlex.quote(status_file)}"
    return line


BLOCK = re.compile(r"(\d+\.\d)%\s+([\d,]+) rows settled.*?\n([\d,]+) requests/min of ([\d,]+).*?\n.*?ETA (\S+)", re.S)


def test_the_live_block_shows_the_bar_the_rate_against_the_limit_and_the_eta_moving(api_server, tmp_path,
                                                                                    prefect_api_url) -> None:
    server = api_server()
    source = write_jsonl(tmp_path / "in.jsonl", _rows(600))
    status = str(tmp_path / "status")
    arguments = ["--requests_filepath", source, "--request_url", f"{server.url}/v1/chat/completions",
                 "--max_requests_per_minute", "4800"]
    terminal = Terminal("pr-live", _command(prefect_api_url, tmp_path, arguments, status))
    try:
        first = terminal.wait_for(BLOCK.pattern, 60)
        seen = [first.groups()]
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not os.path.exists(status):
            found = BLOCK.search(terminal.screen())
            if found and found.groups() != seen[-1]:
                seen.append(found.groups())
            time.sleep(0.5)
        terminal.wait_for(r"parallel-requests complete", 30)
        screen = terminal.screen()
    finally:
        terminal.close()
    percents = [float(groups[0]) for groups in seen]
    etas = {groups[4] for groups in seen}
    assert len(seen) >= 4 and percents == sorted(percents) and percents[-1] > percents[0], seen
    assert len(etas) >= 3, seen  # the ETA moves
    assert {groups[3] for groups in seen} == {"4,800"}  # the limit in force is shown beside the rate
    assert any(3000 <= int(groups[2].replace(",", "")) <= 4800 for groups in seen), seen  # near the limit, not above
    assert open(status).read().strip() == "exit=0"
    # The block stays, final, above the summary; the summary follows it.
    assert re.search(r"100\.0%\s+600 rows settled", screen), screen
    assert screen.index("rows settled") < screen.index("parallel-requests complete")
    assert re.search(r"latency gpt-4o-mini: p50 \d+ ms", screen), screen


def test_ctrl_c_in_a_terminal_says_what_was_kept_and_how_to_resume(api_server, tmp_path, prefect_api_url) -> None:
    server = api_server()
    source = write_jsonl(tmp_path / "in.jsonl", _rows(1000))
    status = str(tmp_path / "status")
    arguments = ["--requests_filepath", source, "--request_url", f"{server.url}/v1/chat/completions",
                 "--max_requests_per_minute", "3000"]
    terminal = Terminal("pr-ctrl-c", _command(prefect_api_url, tmp_path, arguments, status))
    try:
        terminal.wait_for(r"[1-9][\d,]* rows settled", 60)
        terminal.keys("C-c")
        found = terminal.wait_for(r"interrupted; the ([\d,]+) rows this run finished are kept.*?run the same command "
                                  r"again to continue", 30)
        _wait_for_file(status, 20)
        screen = terminal.screen()
    finally:
        terminal.close()
    assert open(status).read().strip() == "exit=130"
    assert "Traceback" not in screen
    kept = int(found.group(1).replace(",", ""))
    parts = [os.path.join(folder, name) for folder, _, names in os.walk(f"{source[:-6]}_results.jsonl.work")
             for name in names if name.endswith(".part")]
    records = sum(1 for part in parts for line in open(part, encoding="utf-8") if "\tr\t" in line)
    assert 0 < kept <= records < 1000  # what it says was kept is on disk (a few more may have landed after)


def test_without_a_terminal_progress_comes_as_lines_and_json_on_stdout(api_server, tmp_path, prefect_api_url,
                                                                       monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    server = api_server(fault_rate=0.05, seed=3)
    source = write_jsonl(tmp_path / "in.jsonl", _rows(600))
    code, out, err = _run(["--requests_filepath", source, "--request_url", f"{server.url}/v1/chat/completions",
                           "--api_key", "sk-live-test", "--max_requests_per_minute", "6000", "--json",
                           "--progress-seconds", "1", "--retry_base_seconds", "0.05"], str(tmp_path / "home"))
    assert code == 0, err[-3000:]
    summary = json.loads(out)  # stdout is the summary and nothing else
    assert summary["complete"] and summary["totals"]["succeeded"] == 600
    lines = [line for line in err.splitlines() if "progress: " in line]
    assert len(lines) >= 3, err[-3000:]
    assert re.search(r"progress: [\d,]+ rows settled, [\d.]+% of the input; [\d,]+ requests/min \(limit 6,000\)", lines[-1])
    assert "\x1b[" not in err and "━" not in err  # no bar drawn where no terminal shows it
    latency = summary["latency"]["gpt-4o-mini"]
    assert latency["count"] > 0 and 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    timeline = summary["timeline"]
    assert timeline and sum(row["sent"] for row in timeline) == summary["totals"]["requests_sent"]
    assert sum(row["retries"] for row in timeline) == summary["totals"]["retries"] > 0
    assert all(row["limit_per_minute"] == 6000 for row in timeline[1:])


def test_the_readmes_automation_notifies_a_webhook_when_a_run_ends_with_failed_rows(api_server, tmp_path,
                                                                                   prefect_api_url,
                                                                                   monkeypatch) -> None:
    received: List[Any] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the http.server name)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    try:
        name = f"failed-rows-{os.getpid()}"
        created = subprocess.run([sys.executable, "deployments/notify_on_failed_rows.py", "--webhook-url",
                                  f"http://127.0.0.1:{hook.server_port}/hook", "--name", name], cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
        assert created.returncode == 0, created.stderr[-2000:]
        server = api_server()
        clean = write_jsonl(tmp_path / "clean.jsonl", _rows(20))
        code, _, err = _run(["--requests_filepath", clean, "--request_url", f"{server.url}/v1/chat/completions",
                             "--api_key", "sk-live-test"], str(tmp_path / "home"))
        assert code == 0, err[-2000:]
        rows = _rows(40)
        for row in rows[::10]:
            row["model"] = "unknown-model"  # the server answers 404: 4 rows fail
        bad = write_jsonl(tmp_path / "bad.jsonl", rows)
        code, out, err = _run(["--requests_filepath", bad, "--request_url", f"{server.url}/v1/chat/completions",
                               "--api_key", "sk-live-test"], str(tmp_path / "home"))
        assert code == 0 and "4 failed" in out, err[-2000:]
        deadline = time.monotonic() + 60
        while not received and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # a notification for the clean run, if one were (wrongly) sent, would be in by now
    finally:
        hook.shutdown()
    assert len(received) == 1, received  # the run with failed rows, not the clean one
    text = received[0]["text"]
    assert "bad.jsonl ended (parallel-requests.run.finished): 4 of 40 rows failed" in text, text
    assert "sk-live-test" not in json.dumps(received)


def test_ctrl_c_during_start_up_is_one_line_exit_130_and_json_still_parses(api_server, tmp_path,
                                                                         prefect_api_url) -> None:
    server = api_server()
    source = write_jsonl(tmp_path / "in.jsonl", _rows(300))
    status, stdout = str(tmp_path / "status"), str(tmp_path / "stdout.json")
    arguments = ["--requests_filepath", source, "--request_url", f"{server.url}/v1/chat/completions", "--json"]
    started = str(tmp_path / "started")
    line = _command(prefect_api_url, tmp_path, arguments).replace(" --json", " --json > " + shlex.quote(stdout))
    terminal = Terminal("pr-early-c", f"touch {shlex.quote(started)} && {line}; echo exit=$? > {shlex.quote(status)}")
    try:
        # Once the shell runs the command: a Ctrl-C before that would reach a shell still starting, and be lost.
        _wait_for_file(started, 30)
        time.sleep(1.0)  # Prefect and the flow are still being imported
        terminal.keys("C-c")
        _wait_for_file(status, 30)
        screen = terminal.screen()
    finally:
        terminal.close()
    assert open(status).read().strip() == "exit=130", screen
    assert "Traceback" not in screen and "interrupted;" in screen, screen
    assert json.loads(open(stdout).read()) == {"complete": False, "exit_status": 130, "stop_reason": "interrupted"}


def test_json_on_stdout_even_when_the_run_cannot_start(tmp_path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", _rows(3))
    for extra, status in ((["--api_key", "sk-live test"], 1), (["--progress-seconds", "-1"], 2)):
        code, out, err = _run(["--requests_filepath", source, "--json", *extra], str(tmp_path / "home"))
        assert code == status, err[-2000:]
        summary = json.loads(out)
        assert summary["complete"] is False and summary["exit_status"] == status and summary["stop_reason"], summary
        assert "sk-live test" not in out + err
