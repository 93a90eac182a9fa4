"""A work folder written before the modules moved still resumes: nothing in it names a module path.

``tests/fixtures/work_folder_before_layout_change`` was written by the command line of the commit
before the layout change (``41ca3e2``): 60 rows, a server that answered ``insufficient_quota`` after
25, so 25 answers are in the parts and 35 rows were never sent. Prefect results are not persisted
(shard tasks have no cache), so nothing pickled by module path is in it: the parts and the manifest
are plain text. The same job now must send exactly the 35 rows left and write all 60 in order.
"""

# Standard library imports
import json
import shutil
from pathlib import Path

# Local application imports
from flows.parallel_requests import parallel_requests
from tests.conftest import read_jsonl
from tools.openai_test_server import ServerConfig, start_server_thread

FIXTURE = Path(__file__).parent / "fixtures" / "work_folder_before_layout_change"
# The address the fixture's job was written for: the request URL is part of each row's identity.
HOST, PORT = "127.77.0.1", 8000


async def test_a_work_folder_written_before_the_layout_change_resumes_without_paying_twice(prefect_api_url,
                                                                                            tmp_path, monkeypatch):
    for name in ("requests.jsonl", "out.jsonl"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    shutil.copytree(FIXTURE / "out.jsonl.work", tmp_path / "out.jsonl.work")
    manifest_path = tmp_path / "out.jsonl.work" / "work.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["output"] == "/tmp/fx/out.jsonl" and manifest["complete"] is False
    manifest["output"] = str(tmp_path / "out.jsonl")  # the job's identity is its output's path: it moved with it
    manifest_path.write_text(json.dumps(manifest))
    before = read_jsonl(tmp_path / "out.jsonl")
    assert len(before) == 25

    server = start_server_thread(ServerConfig(), host=HOST, port=PORT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    try:
        state = await parallel_requests(requests_filepath="requests.jsonl", save_filepath="out.jsonl",
                                        request_url=f"http://{HOST}:{PORT}/v1/chat/completions",
                                        max_requests_per_minute=6000, max_tokens_per_minute=1_000_000,
                                        return_state=True)
        stats = server.stats()
    finally:
        server.stop()
    assert state.is_completed(), state.message
    assert stats["requests"] == 35 and stats["bodies_received_more_than_once"] == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [row[2]["row"] for row in rows] == list(range(60))
    assert all("choices" in row[1] for row in rows)
    by_row = {row[2]["row"]: row for row in rows}
    assert all(by_row[row[2]["row"]] == row for row in before)  # the answers paid for before are the ones kept
