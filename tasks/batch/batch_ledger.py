"""The batch ledger: every batch file of a job and where it stands, saved the moment anything changes.

Batch mode's memory is one JSON file in the generation folder (``<work>/gen-<id>/batches.json``),
written atomically (a temporary file, fsync, rename) before and after every call that creates
something on the server. That is what makes a batch never be submitted twice:

    planned     the input file and its row map are written here; nothing is on the server
    uploaded    the input file is on the server (``file_id``)
    creating    a batch is about to be created, under a fresh ``creation`` token in its metadata;
                a run that dies before recording the batch id finds it again by that token
    submitted   the batch exists (``batch_id``); it is polled until it ends
    collected   its output and error files are read into the parts; rows to do again went into
                new files (or are left for the online engine)

A file whose batch was refused for the enqueued-token cap goes back to ``uploaded`` and waits
until the queue has room (``learned_queue_tokens``).

Usage:
    >>> ledger = BatchLedger.load(work.generation_path, work.generation)
    >>> entry = ledger.new_file("gpt-4o-mini", "/v1/chat/completions")
    >>> entry.state = "uploaded"; entry.file_id = "file-abc"; ledger.save()
"""

# Standard library imports
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

LEDGER = "batches.json"
LEDGER_FORMAT = 1
STATES = ("planned", "uploaded", "creating", "submitted", "collected")
# Batch statuses after which nothing changes.
TERMINAL_STATUSES = ("completed", "failed", "expired", "cancelled")


@dataclass
class BatchFile:
    """One batch input file and its batch.

    Attributes:
        name: the file's name in the generation folder, without extension (``batch-00003``).
        model: the one model of its rows.
        endpoint: the one endpoint path of its rows (``/v1/chat/completions``).
        rows: how many rows it holds.
        tokens: their estimated tokens (prompt plus most completion), what they add to the enqueued tokens.
        size: its size in bytes.
        state: see the module docstring.
        file_id: the uploaded input file's id.
        batch_id: the batch's id.
        creation: the token in the metadata of the batch being created.
        status: the batch's last known status.
        counts: the batch's last known ``request_counts``.
        created_at: when the batch was created (epoch seconds).
        finished_at: when the run saw it end (epoch seconds).
        output_file_id, error_file_id: the batch's result files, once it ended.
        round: 0 for a file of the first plan; n for rows sent again the n-th time (after an expiry, failure).
        note: why it failed, expired or was refused, in words.
        refusals: how many times its batch was refused for the enqueued-token cap.
        stalls: how many batches in a row ended with none of these rows done (an expiry at 0%...).
        collecting: its results are being written into the parts (a crash there: the next run skips
            the rows already written).
    """

    name: str
    model: str
    endpoint: str
    rows: int = 0
    tokens: int = 0
    size: int = 0
    state: str = "planned"
    file_id: Optional[str] = None
    batch_id: Optional[str] = None
    creation: Optional[str] = None
    status: Optional[str] = None
    counts: Dict[str, int] = field(default_factory=dict)
    created_at: Optional[float] = None
    finished_at: Optional[float] = None
    output_file_id: Optional[str] = None
    error_file_id: Optional[str] = None
    round: int = 0
    note: Optional[str] = None
    refusals: int = 0
    stalls: int = 0
    collecting: bool = False

    @property
    def live(self) -> bool:
        """Its batch may exist and is not collected yet."""
        return self.state in ("creating", "submitted")

    @property
    def queued(self) -> bool:
        """Its rows count against the enqueued-token cap now (a batch that has not ended)."""
        return self.state == "creating" or (self.state == "submitted" and self.status not in TERMINAL_STATUSES)


@dataclass
class BatchLedger:
    """Every batch file of one generation.

    Attributes:
        folder: the generation folder.
        job: the job's id in batch metadata (the generation id).
        planned: True once every shard was read into batch files.
        files: the batch files, in the order they were made.
        next_number: the number of the next batch file.
        learned_queue_tokens: per model, the enqueued tokens known to be accepted (learned from a refusal).
        online_rows: rows left by batches for the online engine (``--batch-fallback online``).
        input_key: a digest of the input and the request URL, in every batch's metadata, so another work
            folder's run of the same input can see these batches on the server.
    """

    folder: str
    job: str
    planned: bool = False
    files: List[BatchFile] = field(default_factory=list)
    next_number: int = 1
    learned_queue_tokens: Dict[str, int] = field(default_factory=dict)
    online_rows: int = 0
    input_key: str = ""

    @classmethod
    def load(cls, folder: str, job: str) -> "BatchLedger":
        """The generation's ledger, or a new empty one."""
        path = os.path.join(folder, LEDGER)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return cls(folder, job)
        if data.get("format") != LEDGER_FORMAT:
            raise ValueError(f"{path}: a batch ledger of another format ({data.get('format')!r})")
        return cls(folder, data["job"], bool(data.get("planned")), [BatchFile(**entry) for entry in data["files"]],
                   int(data.get("next_number", 1)), {k: int(v) for k, v in (data.get("learned_queue_tokens") or {}).items()},
                   int(data.get("online_rows") or 0), str(data.get("input_key") or ""))

    def save(self) -> None:
        """Write the ledger atomically: a temporary file, fsync, rename."""
        path = os.path.join(self.folder, LEDGER)
        temporary = f"{path}.tmp-{os.getpid()}"
        data = {"format": LEDGER_FORMAT, "job": self.job, "planned": self.planned, "next_number": self.next_number,
                "learned_queue_tokens": self.learned_queue_tokens, "online_rows": self.online_rows, "input_key": self.input_key, "files": [asdict(entry) for entry in self.files]}
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    def new_file(self, model: str, endpoint: str, round_number: int = 0) -> BatchFile:
        """A new batch file's entry (added to the ledger; saved by the caller once its file is written)."""
        entry = BatchFile(f"batch-{self.next_number:05d}", model, endpoint, round=round_number)
        self.next_number += 1
        self.files.append(entry)
        return entry

    def path_of(self, entry: BatchFile, kind: str) -> str:
        """The local path of a batch file's ``input`` (.jsonl), ``rows`` map, ``output`` or ``errors`` download."""
        suffix = {"input": ".jsonl", "rows": ".rows", "output": ".output.jsonl", "errors": ".errors.jsonl"}[kind]
        return os.path.join(self.folder, entry.name + suffix)

    def metadata(self, entry: BatchFile) -> Dict[str, str]:
        """The metadata of the batch of ``entry``: the job, the file, and this creation's token."""
        return {"parallel_requests_job": self.job, "parallel_requests_file": entry.name,
                "parallel_requests_creation": entry.creation or "", "parallel_requests_input": self.input_key}

    def begin_creation(self, entry: BatchFile) -> None:
        """Record, before the call, that a batch of ``entry`` is being created (and under which token)."""
        entry.creation = uuid.uuid4().hex
        entry.state = "creating"
        entry.created_at = time.time()
        self.save()

    def queued_tokens(self, model: str) -> int:
        """The estimated tokens of ``model``'s batches that have not ended."""
        return sum(entry.tokens for entry in self.files if entry.model == model and entry.queued)

    @property
    def pending(self) -> List[BatchFile]:
        """Files not collected yet, in order."""
        return [entry for entry in self.files if entry.state != "collected"]

    def describe(self) -> Dict[str, Any]:
        """Counts of files by state, for logs."""
        counts: Dict[str, int] = {}
        for entry in self.files:
            counts[entry.state] = counts.get(entry.state, 0) + 1
        return counts
