"""One run per job at a time: a lock keyed on the output, with a lease a crashed holder cannot keep.

Two runs of one job at once are normal (a cron overlap, a second click on "Run"). Without a lock
both pay for every row, and the loser's cleanup can spoil the winner's output. A job is its
output: two different inputs writing one output are the same job.

The lock is a set of leases, all taken before anything is read or sent, and held (renewed by a
background thread) until the run has finished its output:

    - a lock file beside a local output (``.results.jsonl.lock``): one machine, and every
      machine that shares that folder; for an output on S3 or another store, a lock file named
      after the URI in this machine's cache folder;
    - a lock file in the work folder (``job.lock``): the same for a work folder shared by
      workers on several machines, whatever the output;
    - with a Redis limiter (``--limiter``), a key in that Redis named after the output URI:
      every machine that uses the same Redis, for outputs on S3 and other stores.

A lock file is created atomically (``os.link``, which fails when the name exists, also on NFS)
and holds its holder: host, process id and its start time, flow run, when it was taken and last
renewed. It is stale, and taken over, when its process is gone (same host) or when it was not
renewed for ``lease_seconds`` (any host: a crashed or unreachable machine). A Redis lease is a key
with an expiry, renewed likewise.

Usage:
    >>> lock = JobLock.for_job("results.jsonl", "results.jsonl.work", redis_url=None)
    >>> lock.acquire(wait=False)      # raises JobLocked naming the holder
    >>> ...
    >>> lock.release()

Pitfalls:
    - A holder on another machine that stalls longer than the lease loses it; it learns so at its
      next renewal, ``JobLock.lost`` is set, and the run stops sending at once and leaves the output
      to the run that took over. On one machine a live process never loses its lock.
"""

# Standard library imports
import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

logger = logging.getLogger(__name__)

# How long a holder's lease lasts without renewal, and how often it is renewed.
LEASE_SECONDS = 60.0
RENEW_SECONDS = 10.0
# How often a run that waits for the lock asks again.
WAIT_POLL_SECONDS = 1.0
# The lock file's name in a work folder.
WORK_FOLDER_LOCK = "job.lock"


class JobLocked(RuntimeError):
    """Raised when another run of the same job holds its lock."""


@dataclass
class Holder:
    """Who holds a lease.

    Attributes:
        token: a random id of this holding.
        host: the holder's host name.
        pid: the holder's process id.
        pid_started: the process's start time (``/proc``), so a reused process id is not taken for it.
        flow_run: the Prefect flow run id, when there is one.
        taken_at: when the lease was taken (wall clock, seconds).
        renewed_at: when it was last renewed (wall clock, seconds).
        lease_seconds: how long it lasts without renewal.
    """

    token: str
    host: str
    pid: int
    pid_started: Optional[str]
    flow_run: Optional[str]
    taken_at: float
    renewed_at: float
    lease_seconds: float = LEASE_SECONDS

    @classmethod
    def of_this_process(cls, flow_run: Optional[str]) -> "Holder":
        """A new holding by this process."""
        now = time.time()
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), _process_start(os.getpid()), flow_run, now, now)

    def describe(self) -> str:
        """The holder in words, for the message a second run prints."""
        taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.taken_at))
        run = f", flow run {self.flow_run}" if self.flow_run else ""
        return f"process {self.pid} on {self.host}{run}, since {taken}"

    def is_stale(self) -> bool:
        """True when the holder is gone: on this host, when its process died (however long ago it
        renewed: a stopped process keeps its lock); on another, when its lease ran out."""
        if self.host == socket.gethostname():
            return not _process_alive(self.pid, self.pid_started)
        return time.time() - self.renewed_at > self.lease_seconds


class FileLease:
    """A lease held as a lock file (atomic creation; stale holders taken over)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def try_take(self, holder: Holder) -> Optional[Holder]:
        """Take the lease; return None on success, or the live holder that has it."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        for _ in range(5):
            if self._create(holder):
                return None
            current = self._read()
            if current is None:  # unreadable: a holder writing it right now, or debris
                if not self._debris_for_long():
                    return Holder("?", "unknown host", 0, None, None, time.time(), time.time())
                self._take_over(None)
                continue
            if current.token == holder.token:
                return None
            if not current.is_stale():
                return current
            logger.warning("Taking over the stale lock %s of %s", self.path, current.describe())
            self._take_over(current.token)
        return self._read()

    def renew(self, holder: Holder) -> bool:
        """Renew the lease; False when it is no longer ours."""
        current = self._read()
        if current is None or current.token != holder.token:
            return False
        holder.renewed_at = time.time()
        self._write_over(holder)
        return True

    def release(self, holder: Holder) -> None:
        """Give the lease up (only when it is still ours)."""
        current = self._read()
        if current is not None and current.token == holder.token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def _create(self, holder: Holder) -> bool:
        """Create the lock file holding ``holder``; False when it exists."""
        temporary = self._temporary(holder)
        try:
            os.link(temporary, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as error:  # a file system without hard links: exclusive creation instead
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(vars(holder), handle)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)

    def _temporary(self, holder: Holder) -> str:
        """A fully written file holding ``holder``, beside the lock."""
        temporary = f"{self.path}.{holder.token}.{uuid.uuid4().hex[:8]}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(vars(holder), handle)
            handle.flush()
            os.fsync(handle.fileno())
        return temporary

    def _write_over(self, holder: Holder) -> None:
        """Replace the lock file's content atomically."""
        os.replace(self._temporary(holder), self.path)

    def _read(self) -> Optional[Holder]:
        """The holder written in the lock file, or None when it is absent or unreadable."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                return Holder(**json.load(handle))
        except (OSError, ValueError, TypeError):
            return None

    def _debris_for_long(self) -> bool:
        """True when an unreadable lock file has not changed for a whole lease (nobody is writing it)."""
        try:
            return time.time() - os.stat(self.path).st_mtime > LEASE_SECONDS
        except FileNotFoundError:
            return True

    def _take_over(self, stale_token: Optional[str]) -> None:
        """Move a stale lock file aside (only one taker wins the rename) and remove it."""
        aside = f"{self.path}.stale.{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = FileLease(aside)._read()
        if stale_token is not None and moved is not None and moved.token != stale_token:
            # The holder renewed between our look and the rename: give its lock back.
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(aside)


class RedisLease:
    """A lease held as a Redis key with an expiry (for machines that share a Redis, not a folder)."""

    RENEW_SCRIPT = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) else return nil end"
    RELEASE_SCRIPT = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

    def __init__(self, url: str, output: str) -> None:
        import redis

        self.key = "parallel-requests:job-lock:" + hashlib.sha256(output.encode("utf-8")).hexdigest()[:32]
        self._client = redis.Redis.from_url(url, password=os.environ.get("PARALLEL_REQUESTS_REDIS_PASSWORD"),
                                            decode_responses=True, socket_timeout=10, socket_connect_timeout=5)
        self._value: Optional[str] = None

    def try_take(self, holder: Holder) -> Optional[Holder]:
        """Take the lease; return None on success, or the live holder that has it."""
        self._value = json.dumps(vars(holder))
        for _ in range(3):
            if self._client.set(self.key, self._value, nx=True, px=int(holder.lease_seconds * 1000)):
                return None
            held = self._client.get(self.key)
            try:
                current = Holder(**json.loads(held or "{}"))
            except (TypeError, ValueError):
                return Holder("?", "unknown host", 0, None, None, time.time(), time.time())
            if not current.is_stale():
                return current
            logger.warning("Taking over the stale lock in Redis of %s", current.describe())
            self._client.eval(self.RELEASE_SCRIPT, 1, self.key, held)  # only that very holding is removed
        return current

    def renew(self, holder: Holder) -> bool:
        """Renew the lease; False when it is no longer ours."""
        old = self._value
        holder.renewed_at = time.time()
        self._value = json.dumps(vars(holder))
        return bool(self._client.eval(self.RENEW_SCRIPT, 1, self.key, old, self._value,
                                      int(holder.lease_seconds * 1000)))

    def release(self, holder: Holder) -> None:
        """Give the lease up (only when it is still ours)."""
        with contextlib.suppress(Exception):
            self._client.eval(self.RELEASE_SCRIPT, 1, self.key, self._value)
            self._client.close()


@dataclass
class JobLock:
    """The leases of one job, taken together and renewed by a background thread.

    Attributes:
        leases: the leases (lock files, a Redis key), taken in this order.
        holder: this run's holding.
        lost: set when a renewal found a lease taken by another run.
    """

    leases: List[Any]
    holder: Holder
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None
    _held: List[Any] = field(default_factory=list)

    @classmethod
    def for_job(cls, save_filepath: str, work_path: str, redis_url: Optional[str] = None,
                flow_run: Optional[str] = None) -> "JobLock":
        """The lock of the job that writes ``save_filepath`` with its work folder at ``work_path``."""
        leases: List[Any] = []
        if "://" not in save_filepath or save_filepath.startswith("file://"):
            output = os.path.abspath(save_filepath.removeprefix("file://"))
            leases.append(FileLease(os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.lock")))
        else:  # an object store: a lock file per output URI for this whole machine, whatever the work folder
            leases.append(FileLease(_machine_lock_path(save_filepath)))
        leases.append(FileLease(os.path.join(work_path, WORK_FOLDER_LOCK)))
        if redis_url:
            leases.append(RedisLease(redis_url, save_filepath))
        return cls(leases, Holder.of_this_process(flow_run))

    def acquire(self, wait: bool = False, on_wait: Optional[Callable[[Holder], None]] = None) -> None:
        """Take every lease, or none.

        Args:
            wait: wait until the holder is done (or gone) instead of failing at once.
            on_wait: called once with the holder when this run starts waiting.

        Raises:
            JobLocked: naming the holder, when another run has the lock and ``wait`` is False.
        """
        announced = False
        while True:
            blocker = self._try_all()
            if blocker is None:
                break
            if not wait:
                raise JobLocked(f"another run of this job is in progress ({blocker.describe()}); "
                                "it holds the job's lock. Wait for it, or pass --wait-for-lock")
            if not announced and on_wait is not None:
                on_wait(blocker)
                announced = True
            time.sleep(WAIT_POLL_SECONDS)
        self._thread = threading.Thread(target=self._renew_forever, name="job-lock-renewal", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and give every lease up."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for lease in reversed(self._held):
            with contextlib.suppress(Exception):
                lease.release(self.holder)
        self._held.clear()

    def _try_all(self) -> Optional[Holder]:
        """Take the leases in order; on a refusal give back those taken and return the holder."""
        for lease in self.leases:
            blocker = lease.try_take(self.holder)
            if blocker is not None:
                for taken in reversed(self._held):
                    taken.release(self.holder)
                self._held.clear()
                return blocker
            self._held.append(lease)
        return None

    def _renew_forever(self) -> None:
        """Renew every lease until released; note a lease lost to another run."""
        while not self._stop.wait(RENEW_SECONDS):
            for lease in self._held:
                try:
                    if not lease.renew(self.holder):
                        logger.error("The job's lock %s was taken by another run", getattr(lease, "path", "in Redis"))
                        self.lost.set()
                except Exception as error:  # a passing storage or Redis failure: try again next time
                    logger.warning("Could not renew the job's lock: %s", error)


# Helpers


def _machine_lock_path(output: str) -> str:
    """This machine's lock file for an output URI (under the user's cache folder)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(output.encode("utf-8")).hexdigest()[:32]
    return os.path.join(cache, "prefect-parallel-requests", "locks", f"{key}.lock")


def _process_start(pid: int) -> Optional[str]:
    """A process's start time in clock ticks since boot (Linux), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, started: Optional[str]) -> bool:
    """True when process ``pid`` runs and is the one that started at ``started``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or _process_start(pid) in (None, started)

