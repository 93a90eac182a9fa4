"""The work folder of a job: shard parts, and the manifest that lets the same command resume.

A job is its output. Its work folder holds:

    <work>/work.json                          the manifest: whose folder this is, and what it holds
    <work>/job.lock                           the lock of the run in progress (``tasks.job.job_lock``)
    <work>/gen-<id>/shard-00003-of-00016.part each shard's rows, appended as they finish (kept: the paid answers)
    <work>/gen-<id>/earlier-answers.jsonl     answers of earlier generations, by row identity (``tasks.storage.row_reuse``)
    <work>/gen-<id>/input.jsonl               the decompressed copy of a compressed input (removed when done)
    <work>/gen-<id>/batches.json, batch-*     batch mode's ledger and batch files (``tasks.batch``; removed when done)

A generation is the work on one input content (its bytes, ``tasks.storage.uris.input_fingerprint``)
and one request URL. The same command after a crash, ``kill -9``, a quota stop or Ctrl-C finds
the current generation and resumes it: each shard skips the rows its part already holds. A
touched or re-downloaded input with the same bytes is the same generation. When the input changed,
a new generation starts, and everything the earlier ones paid for (their parts and their own
earlier answers) is carried into it and reused by row identity, so an edited input sends only new
or changed rows, and no paid answer is ever dropped: not when rows are removed from the input,
not when the output is deleted, moved or edited. The work folder of a finished job therefore
keeps about as many bytes as its output (and the answers of rows since removed); delete the folder
to let them go.

Safety:
    - A folder is ours only when it holds our manifest. A missing or empty folder is made ours; a
      folder holding anything else, or the manifest of another job (another output) or of an
      earlier version of this tool, is refused with one line, and nothing in it is touched.
    - Only generation folders the manifest names, and in them only the files this module makes, are
      ever deleted.
    - Finishing is crash-safe: the output is written and renamed, then the manifest is marked
      complete, then the earlier generations (whose answers the current one holds) are cleaned. A kill
      at any step leaves a state the next run completes without sending a row.

Where: beside a local output (``results.jsonl.work``). For a remote output (``s3://...``) it is a
local folder under ``~/.cache/prefect-parallel-requests/work`` keyed by the output URI, or
whatever ``--work-dir`` names (a shared mount for workers on several machines). Parts are
appended row by row, and that is what bounds the requests a crash makes us send twice to those
in flight: object stores cannot append.

Usage:
    >>> work = WorkLocation.open("results.jsonl", None)
    >>> start = work.begin("requests.jsonl", fingerprint, "http://127.0.0.1:8000/v1/embeddings")
    >>> start.already_complete, start.resumed, work.part_path(0, 4)
"""

# Standard library imports
import contextlib
import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

MANIFEST = "work.json"
MANIFEST_FORMAT = 2
TOOL = "prefect-parallel-requests"
DECOMPRESSED_INPUT = "input.jsonl"
EARLIER_ANSWERS = "earlier-answers.jsonl"
# Names this module creates in a generation folder, and only these are ever deleted.
BATCH_FILES = r"batches\.json(\.tmp-\d+)?|batch-\d{5}\.(jsonl|rows|output\.jsonl|errors\.jsonl)(\.download)?"
OWN_FILES = re.compile(r"^(shard-\d{5}-of-\d{5}\.part(\.tracker\.json(\.tmp-\d+)?)?|input\.jsonl|earlier-answers\.jsonl|"
                       + BATCH_FILES + ")$")
# What a finished generation no longer needs: the decompressed input and child runs' counts.
SCRATCH_FILES = re.compile(r"^(shard-\d{5}-of-\d{5}\.part\.tracker\.json(\.tmp-\d+)?|input\.jsonl|" + BATCH_FILES + ")$")


class WorkFolderRefused(RuntimeError):
    """Raised when a work folder is not ours to use (nothing in it was touched)."""


@dataclass
class JobStart:
    """What a run finds when it starts on its work folder.

    Attributes:
        already_complete: the output is complete for this input and URL; nothing is to be sent.
        resumed: an unfinished generation of the same input is continued.
        reuse_sources: earlier answers that an edited input may reuse (see ``tasks.storage.row_reuse``).
        needs_reuse_pass: the reuse pass has not yet copied those answers into this generation's parts.
    """

    already_complete: bool = False
    resumed: bool = False
    reuse_sources: List[Dict[str, Any]] = field(default_factory=list)
    needs_reuse_pass: bool = False


class WorkLocation:
    """A job's work folder and its manifest."""

    def __init__(self, path: str, output: str, manifest: Dict[str, Any]) -> None:
        self.path = path
        self.output = output
        self.manifest = manifest

    @classmethod
    def open(cls, save_filepath: str, work_dir: Optional[str]) -> "WorkLocation":
        """Open the job's work folder, making a missing or empty one ours; refuse anything else.

        Args:
            save_filepath: the output path or URI (the job).
            work_dir: an explicit work folder (a path or a file:// URI), or None for the default.

        Raises:
            WorkFolderRefused: naming the folder and why; nothing in it was changed.
        """
        path = os.path.abspath((work_dir or default_work_dir(save_filepath)).removeprefix("file://"))
        if os.path.exists(path) and not os.path.isdir(path):
            raise WorkFolderRefused(f"the work folder {path} is a file, not a folder; choose another --work-dir")
        os.makedirs(path, exist_ok=True)
        manifest = _read_manifest(path)
        if manifest is None:
            _check_empty(path)
            _create_manifest(path, {"format": MANIFEST_FORMAT, "tool": TOOL, "output": job_output(save_filepath),
                                    "current": None, "complete": False, "finished": None, "reuse": [],
                                    "generations": []})
            manifest = _read_manifest(path)
            if manifest is None:
                raise WorkFolderRefused(f"the work folder {path} has an unreadable {MANIFEST}; nothing was changed")
        _check_ours(path, manifest, save_filepath)
        return cls(path, job_output(save_filepath), manifest)

    def reload(self) -> None:
        """Read the manifest again (after taking the job's lock)."""
        manifest = _read_manifest(self.path)
        if manifest is None:
            raise WorkFolderRefused(f"the manifest of {self.path} disappeared; nothing was changed")
        _check_ours(self.path, manifest, self.output)
        self.manifest = manifest

    def begin(self, source: str, input_fingerprint: str, request_url: str, output_size: Optional[int]) -> JobStart:
        """Decide what this run does: nothing (already complete), resume, or start a new generation.

        Args:
            source: the input's path or URI.
            input_fingerprint: the input's content fingerprint.
            request_url: the request URL.
            output_size: the output's size now (``tasks.storage.uris.output_size``): None when it is absent. An
                output that is not the size this job wrote (deleted, cut short, edited) is rebuilt from
                the kept answers.

        Returns:
            What the run starts from.
        """
        manifest = self.manifest
        current = manifest.get("current")
        same = bool(current) and current["input_fingerprint"] == input_fingerprint and \
            current["request_url"] == request_url
        finished = manifest.get("finished") or {}
        local_errors = finished.get("local_errors")
        output_present = output_size is not None and finished.get("size") in (None, -1, output_size)
        if same and manifest.get("complete") and output_present and not local_errors:
            self.clean()
            return JobStart(already_complete=True)
        if same and not manifest.get("complete"):
            current["input"] = source
            os.makedirs(self.generation_path, exist_ok=True)
            self._save()
            return JobStart(resumed=True, reuse_sources=list(manifest.get("reuse") or []),
                            needs_reuse_pass=not current.get("reuse_done", False) and bool(manifest.get("reuse")))
        # A new generation: the input changed, the finished output was deleted or changed, or some rows' errors were
        # decided without sending (no price, too large) and are decided again. Every earlier answer comes along.
        reuse: List[Dict[str, Any]] = []
        if current:
            reuse.append({"kind": "generation", "generation": current["id"]})
            if not current.get("reuse_done", True):  # its own carry-over never finished: its sources too
                reuse += list(manifest.get("reuse") or [])
        generation = uuid.uuid4().hex
        os.makedirs(self.generation_folder(generation), exist_ok=True)
        generations = [gen for gen in manifest.get("generations") or [] if gen != generation] + [generation]
        manifest.update(current={"id": generation, "input": source, "input_fingerprint": input_fingerprint,
                                 "request_url": request_url, "shard_count": None, "reuse_done": not reuse,
                                 "reused_rows": 0},
                        complete=False, reuse=reuse, generations=generations)
        self._save()
        return JobStart(reuse_sources=reuse, needs_reuse_pass=bool(reuse))

    @property
    def generation(self) -> str:
        """The current generation's id."""
        return self.manifest["current"]["id"]

    @property
    def generation_path(self) -> str:
        """The current generation's folder."""
        return self.generation_folder(self.generation)

    def generation_folder(self, generation: str) -> str:
        """The folder of a generation."""
        return os.path.join(self.path, f"gen-{generation}")

    @property
    def shard_count(self) -> Optional[int]:
        """How the current generation's input was split, once it was."""
        return self.manifest["current"].get("shard_count")

    @property
    def reused_rows(self) -> int:
        """Rows of the current generation answered by reusing earlier answers."""
        return int(self.manifest["current"].get("reused_rows") or 0)

    def record_shard_count(self, count: int) -> None:
        """Remember how the input was split, so a resumed run splits it the same way."""
        self.manifest["current"]["shard_count"] = count
        self._save()

    def record_reuse_done(self, reused_rows: int) -> None:
        """Remember that earlier answers were copied into this generation's parts."""
        self.manifest["current"].update(reuse_done=True, reused_rows=reused_rows)
        self._save()

    def part_path(self, index: int, count: int, generation: Optional[str] = None) -> str:
        """The part file of shard ``index`` of ``count`` (of the current generation by default)."""
        return os.path.join(self.generation_folder(generation or self.generation), f"shard-{index:05d}-of-{count:05d}.part")

    def part_paths_of(self, generation: str) -> List[str]:
        """Every part file of a generation, in shard order."""
        folder = self.generation_folder(generation)
        if not os.path.isdir(folder):
            return []
        return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
                if name.startswith("shard-") and name.endswith(".part")]

    @property
    def decompressed_input(self) -> str:
        """Where a compressed input's decompressed copy lives."""
        return os.path.join(self.generation_path, DECOMPRESSED_INPUT)

    @property
    def earlier_answers_path(self) -> str:
        """Where the current generation keeps the answers carried over from earlier ones."""
        return self.earlier_answers_of(self.generation)

    def earlier_answers_of(self, generation: str) -> str:
        """Where a generation keeps the answers carried over from earlier ones."""
        return os.path.join(self.generation_folder(generation), EARLIER_ANSWERS)

    def mark_complete(self, rows: int, local_errors: int = 0, output_size: Optional[int] = None) -> None:
        """Record that the job's output is complete (the first step after the output is in place).

        ``local_errors`` counts rows whose error was decided without sending; a rerun decides them again.
        """
        self.manifest.update(complete=True, reuse=[],
                             finished={"generation": self.generation, "rows": rows, "local_errors": local_errors,
                                       "size": output_size})
        self._save()

    def clean(self) -> None:
        """Delete what a complete job no longer needs: earlier generations (their answers are carried over)
        and the finished generation's scratch files. The finished generation's parts stay: paid answers."""
        if not self.manifest.get("complete"):
            return
        keep = self.generation
        for generation in list(self.manifest.get("generations") or []):
            folder = self.generation_folder(generation)
            if generation == keep:
                _remove_own_files(folder, SCRATCH_FILES)
                continue
            _remove_own_files(folder, OWN_FILES)
            with contextlib.suppress(OSError):
                os.rmdir(folder)
            if not os.path.exists(folder):
                self.manifest["generations"].remove(generation)
                self._save()

    def _save(self) -> None:
        """Write the manifest atomically."""
        _write_manifest(self.path, self.manifest)


def job_output(save_filepath: str) -> str:
    """The job's identity: a local output as an absolute path, any other URI as it is."""
    if "://" not in save_filepath or save_filepath.startswith("file://"):
        return os.path.abspath(save_filepath.removeprefix("file://"))
    return save_filepath


def default_work_dir(save_filepath: str) -> str:
    """Beside a local output; under the user's cache, keyed by the URI, for a remote one."""
    if "://" not in save_filepath or save_filepath.startswith("file://"):
        return f"{save_filepath.removeprefix('file://')}.work"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(save_filepath.encode()).hexdigest()[:20]
    return os.path.join(cache, "prefect-parallel-requests", "work", key)


# Helpers


def _check_empty(path: str) -> None:
    """Refuse a folder without our manifest that holds anything (our own lock file aside)."""
    others = [name for name in os.listdir(path) if name != "job.lock" and not name.startswith(f".{MANIFEST}.")]
    if others:
        raise WorkFolderRefused(
            f"the work folder {path} already holds files ({', '.join(sorted(others)[:3])}"
            f"{', ...' if len(others) > 3 else ''}) and is not a prefect-parallel-requests work folder; "
            "choose a new or empty --work-dir. Nothing in it was changed")


def _check_ours(path: str, manifest: Dict[str, Any], save_filepath: str) -> None:
    """Refuse a manifest of an earlier version or of another job."""
    if manifest.get("tool") != TOOL or manifest.get("format") != MANIFEST_FORMAT:
        raise WorkFolderRefused(
            f"the work folder {path} was written by an earlier version of prefect-parallel-requests; finish that job "
            "with the version that started it, or choose another --work-dir (or move the folder away). "
            "Nothing in it was changed")
    if manifest.get("output") != job_output(save_filepath):
        raise WorkFolderRefused(
            f"the work folder {path} belongs to the job writing {manifest.get('output')}, not {save_filepath}; "
            "choose another --work-dir. Nothing in it was changed")


def _read_manifest(path: str) -> Optional[Dict[str, Any]]:
    """The manifest of a work folder, or None when there is none (or it is unreadable)."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _create_manifest(path: str, manifest: Dict[str, Any]) -> None:
    """Write the first manifest, unless another run wrote one first (then that one stands)."""
    temporary = _temporary_manifest(path, manifest)
    try:
        os.link(temporary, os.path.join(path, MANIFEST))
    except FileExistsError:
        pass
    finally:
        os.remove(temporary)


def _write_manifest(path: str, manifest: Dict[str, Any]) -> None:
    """Write the manifest atomically."""
    os.replace(_temporary_manifest(path, manifest), os.path.join(path, MANIFEST))


def _temporary_manifest(path: str, manifest: Dict[str, Any]) -> str:
    """A fully written, fsynced copy of ``manifest`` beside where it goes."""
    temporary = os.path.join(path, f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    return temporary


def _remove_own_files(folder: str, names: "re.Pattern[str]") -> None:
    """Delete the files of a generation folder whose names match ``names``."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if names.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
