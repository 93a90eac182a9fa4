"""Shared fixtures: a real Prefect API (test harness), and OpenAI-compatible test servers on 127.0.0.1.

Every test that sends requests talks to a real ``tools.openai_test_server`` over a socket;
flow tests run against a real (temporary, SQLite) Prefect server started once per session.
"""

# Standard library imports
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterator, List

# Settings that must be in place before Prefect is imported anywhere.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

# Third-party imports
import boto3
import pytest
from moto.server import ThreadedMotoServer

# Local application imports
from tools.openai_test_server import RunningServer, ServerConfig, start_server_thread


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    """A temporary Prefect server for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


@pytest.fixture
def api_server() -> Iterator[Callable[..., RunningServer]]:
    """A factory of test API servers (each on its own thread and free port), stopped after the test."""
    servers: List[RunningServer] = []

    def start(**config: Any) -> RunningServer:
        server = start_server_thread(ServerConfig(**config))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis over a socket: the one on 127.0.0.1:6379 when it answers, else one started here."""
    if _redis_answers(6379):
        yield "redis://127.0.0.1:6379/0"
        return
    server_binary = shutil.which("redis-server")
    if server_binary is None:
        pytest.fail("no Redis answers on 127.0.0.1:6379 and redis-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="redis-test-")
    process = subprocess.Popen([server_binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                "--appendonly", "no", "--dir", folder], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not _redis_answers(port):
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def s3(monkeypatch):
    """A real S3 endpoint (moto's server) on 127.0.0.1, reached through AWS_ENDPOINT_URL_S3."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{host}:{port}")
    client = boto3.client("s3")
    client.create_bucket(Bucket="jobs")
    yield client
    server.stop()


def _redis_answers(port: int) -> bool:
    """True when a Redis server answers PING on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def write_jsonl(path: Any, rows: List[Any]) -> str:
    """Write rows (objects are serialised; strings are written as they are) as lines of a file."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def read_jsonl(path: Any) -> List[Any]:
    """Read a JSONL file into a list."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
