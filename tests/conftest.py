"""Shared fixtures: a real Prefect API (``prefect server start``), and OpenAI-compatible test servers on 127.0.0.1.

Every test that sends requests talks to a real ``tools.openai_test_server`` over a socket;
flow tests run against a real (temporary, SQLite) Prefect server started once per session.
"""

# Standard library imports
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Tuple

# Settings that must be in place before Prefect is imported anywhere.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

# Third-party imports
import boto3
import pytest
from moto.server import ThreadedMotoServer

# Local application imports
from tools.openai_test_server import RunningServer, ServerConfig, start_server_thread


def start_prefect_server(env: Dict[str, str], timeout_seconds: float = 90.0) -> Tuple[subprocess.Popen, str]:
    """``prefect server start`` on a free port of 127.0.0.1 with ``env``; returns it and its API URL once healthy."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "prefect"), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api_url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            urllib.request.urlopen(f"{api_url}/health", timeout=2)
            return server, api_url
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop_group(server)
                raise AssertionError("prefect server did not start") from None
            time.sleep(0.2)


@pytest.fixture(scope="session")
def prefect_api_url(tmp_path_factory) -> Iterator[str]:
    """A real ``prefect server start`` for the whole session (its own SQLite home); yields its API URL.

    Its home is seeded with the migrated database ``make install`` prepared, so it starts in a few
    seconds instead of migrating a new database. Flows run in this process use it; subprocesses get
    it through ``PREFECT_API_URL``.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.platform.embedded_prefect_api import seed_home

    home = str(tmp_path_factory.mktemp("prefect-session-home"))
    seed_home(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    server, api_url = start_prefect_server(env)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield api_url
            try:
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10)  # the runs' last logs reach the server before it stops
            except Exception:
                pass
    finally:
        stop_group(server)


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


def stop_group(process: subprocess.Popen) -> None:
    """Stop a process and its children: SIGTERM, then SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


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
