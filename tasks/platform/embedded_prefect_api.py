"""Prefect's embedded local API, started at once, in parallel with the rest of start-up.

With no ``PREFECT_API_URL``, Prefect starts a temporary API server the first time a client
is needed. That is only when the flow is called, and it first imports the whole server package
into the calling process (about 4 s here). The server process then imports it again and
migrates its database. All of it happens one step after another before the first request can
leave.

The command line calls ``start_embedded_api()`` first thing, before Prefect itself is imported
(this module imports Prefect only when it needs its settings). It launches the same server, the
same way Prefect does (``uvicorn prefect.server.api.server:create_app`` with Prefect's own
settings and ephemeral flags). The command line then goes on with its own start-up, and
the flow runs against the server once its health check answers. The server stops at exit,
after Prefect has flushed its logs and events, so a successful run ends without errors.

A fresh Prefect home has no database yet. Migrating a new SQLite database and registering
Prefect's block types take the server about seven seconds here, more than everything else at
start-up. A fresh default home is therefore seeded from a copy made for the same Prefect
version: an empty, migrated database with the block types registered, and the memo file that
records that registration. Prefect's migrate-on-start then finds the database at head, and the
registration is skipped. ``make install`` prepares the copy
(``python -m tasks.platform.embedded_prefect_api --prepare``); when it is missing, the first run on a
new home keeps one.

Usage:
    >>> api = start_embedded_api()          # None when PREFECT_API_URL is already set
    >>> with api.settings():                # waits for /health, points Prefect at the server
    ...     asyncio.run(my_flow())

Pitfalls:
    - On Linux the server stops when the run that started it dies, even by ``kill -9``. Elsewhere
      a killed parent leaves it running, as Prefect's own ephemeral server does.
"""

# Standard library imports
import argparse
import atexit
import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Iterator, Optional

# Prefect is imported inside the functions that need its settings: importing it takes about
# two seconds, which the server should spend starting instead.

# How often the health check is tried while the server starts.
POLL_SECONDS = 0.05
# The exit status uvicorn uses when its port was taken after we picked it.
PORT_IN_USE_STATUS = 3
# The file in which Prefect records that its block types are registered in the database.
MEMO_FILE = "memo_store.toml"
# Linux's prctl option that signals a process when its parent dies.
PR_SET_PDEATHSIG = 1


@dataclass
class EmbeddedApi:
    """A local Prefect API server process of this run.

    Attributes:
        port: the port it listens on (127.0.0.1).
        process: the server process.
        started_at: when it was launched (monotonic clock).
    """

    port: int
    process: subprocess.Popen
    started_at: float = field(default_factory=time.monotonic)
    new_database: Optional[str] = None

    @property
    def api_url(self) -> str:
        """The API's URL."""
        return f"http://127.0.0.1:{self.port}/api"

    def wait_until_ready(self, timeout_seconds: Optional[float] = None) -> None:
        """Wait until the server answers its health check.

        Raises:
            RuntimeError: when the server exits or does not answer in time.
        """
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        timeout = timeout_seconds or float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        deadline = self.started_at + max(timeout, 1.0)
        while True:
            status = self.process.poll()
            if status == PORT_IN_USE_STATUS:
                self.port = _free_port()
                self.process = _launch(self.port)
                continue
            if status is not None:
                raise RuntimeError(f"Prefect's local API server exited with status {status} while starting")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=1) as response:
                    if response.status == 200:
                        if self.new_database:
                            _keep_seed_copy(os.path.dirname(self.new_database))
                            self.new_database = None
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Prefect's local API server did not answer within {timeout:g} s "
                                   "(raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(POLL_SECONDS)

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        """Wait for the server, then point Prefect's settings at it for the body.

        When Prefect's settings (a profile, say) name an API after all, the server is stopped
        and that API is used.
        """
        from prefect.settings import PREFECT_API_URL, temporary_settings

        if PREFECT_API_URL.value():
            self.stop()
            yield
            return
        self.wait_until_ready()
        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            yield

    def stop(self) -> None:
        """Stop the server (politely, then for good)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_embedded_api() -> Optional[EmbeddedApi]:
    """Launch Prefect's local API server now, unless an API URL is configured.

    Returns:
        The running server, or None when ``PREFECT_API_URL`` is set in the environment.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    database = _default_database_path()
    new_database = None
    if database and not os.path.exists(database) and not _seed_database(database):
        new_database = database
    port = _free_port()
    api = EmbeddedApi(port=port, process=_launch(port), new_database=new_database)
    # Registered now, so it runs after Prefect's own exit hooks have flushed logs and events.
    atexit.register(api.stop)
    return api


# Helpers


def _launch(port: int) -> subprocess.Popen:
    """Start the server process the way Prefect's ephemeral mode does."""
    environment = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        # A local API for one run sends no telemetry (and prints no error when no network reaches it).
        "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
    }
    command = [
        sys.executable, "-m", "uvicorn",
        "--app-dir", _prefect_parent_folder(),
        "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "error", "--lifespan", "on",
    ]
    # A session of its own: Ctrl-C at the terminal interrupts the run, not the API it still reports to while it
    # stops (the server ends with the run: ``_stop_with_parent``).
    return subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL, preexec_fn=_stop_with_parent,
                            start_new_session=True)


def _stop_with_parent() -> None:
    """In the server process: have Linux send it SIGTERM when the run that started it dies (even by kill -9)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the server then outlives a killed parent, as Prefect's own does


def prepare_seed_database() -> str:
    """Start the server once in a temporary Prefect home and keep its fresh home as the seed."""
    with tempfile.TemporaryDirectory(prefix="prefect-seed-") as home:
        previous = os.environ.get("PREFECT_HOME")
        os.environ["PREFECT_HOME"] = home
        try:
            port = _free_port()
            api = EmbeddedApi(port=port, process=_launch(port), new_database=os.path.join(home, "prefect.db"))
            try:
                api.wait_until_ready(timeout_seconds=120)
            finally:
                api.stop()
        finally:
            if previous is None:
                os.environ.pop("PREFECT_HOME", None)
            else:
                os.environ["PREFECT_HOME"] = previous
    return _seed_folder()


def seed_home(home: str) -> bool:
    """Seed a new Prefect home (for ``prefect server start`` too); False when there is no seed or it has a database."""
    database = os.path.join(home, "prefect.db")
    return not os.path.exists(database) and _seed_database(database)


def _default_database_path() -> Optional[str]:
    """The default SQLite database of the Prefect home, or None when a database URL is configured."""
    if os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        return None
    home = os.environ.get("PREFECT_HOME") or os.path.join(os.path.expanduser("~"), ".prefect")
    return os.path.join(home, "prefect.db")


def _seed_folder() -> str:
    """Where the seed home for the installed Prefect version is kept."""
    version = importlib.metadata.version("prefect")
    return os.path.join(sys.prefix, "share", "prefect-parallel-requests", f"prefect-{version}-home")


def _seed_database(database: str) -> bool:
    """Copy the seed into a new home (database, then memo file); False when there is no seed."""
    seed = _seed_folder()
    if not (os.path.exists(os.path.join(seed, "prefect.db")) and os.path.exists(os.path.join(seed, MEMO_FILE))):
        return False
    home = os.path.dirname(database)
    os.makedirs(home, exist_ok=True)
    for name, target in (("prefect.db", database), (MEMO_FILE, os.path.join(home, MEMO_FILE))):
        if name == MEMO_FILE and os.path.exists(target):
            continue
        temporary = f"{target}.{os.getpid()}.seed"
        shutil.copyfile(os.path.join(seed, name), temporary)
        os.replace(temporary, target)
    return True


def _keep_seed_copy(home: str) -> None:
    """Keep a consistent copy of a fresh home's database and memo file as the seed (best effort)."""
    seed = _seed_folder()
    try:
        os.makedirs(seed, exist_ok=True)
        database, memo = os.path.join(seed, "prefect.db"), os.path.join(seed, MEMO_FILE)
        with contextlib.closing(sqlite3.connect(os.path.join(home, "prefect.db"))) as source, \
                contextlib.closing(sqlite3.connect(f"{database}.tmp")) as copy:
            source.backup(copy)
        shutil.copyfile(os.path.join(home, MEMO_FILE), f"{memo}.tmp")
        os.replace(f"{database}.tmp", database)
        os.replace(f"{memo}.tmp", memo)
    except (OSError, sqlite3.Error):
        pass


def _prefect_parent_folder() -> str:
    """The folder that holds the prefect package, found without importing it."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the prefect package is not installed")
    return os.path.dirname(list(spec.submodule_search_locations)[0])


def _free_port() -> int:
    """A port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Prepare the seed copy of Prefect's database for fast first runs.")
    parser.add_argument("--prepare", action="store_true", help="migrate an empty database and keep it as the seed")
    if parser.parse_args().prepare:
        print(f"seed database ready: {prepare_seed_database()}")
