"""The work location of a run: shard parts and the manifest that lets the same command resume.

A run keeps its in-progress state in a folder:

    <work>/work.json                    the manifest: input URI and fingerprint, request URL, work id
    <work>/input.jsonl                  the decompressed copy of a compressed input (.gz .bz2 .zst)
    <work>/shard-00003-of-00016.part    each shard's finished rows, appended as they finish

Running the same command again after a crash, ``kill -9``, an ``insufficient_quota`` stop or
Ctrl-C finds the manifest. When the input's fingerprint and the request URL match, the run
resumes: finished shards are skipped (Prefect's task cache, keyed on the work id and the
shard), and unfinished shards skip the rows their part already holds. A changed input gets a
fresh work location, so old parts never mix with new content. After a successful assembly the
parts are deleted and the manifest is marked complete. Running the same command once more
then sends nothing.

Where: beside a local output (``results.jsonl.work``). For a remote output (``s3://...``) it is a
local folder under ``~/.cache/prefect-parallel-requests/work`` keyed by the output URI, or
whatever ``--work-dir`` names. Parts are appended row by row, and that is what bounds the
requests a crash makes us send twice to those in flight. Object stores cannot append.

Usage:
    >>> work = WorkLocation.prepare("results.jsonl", None, fingerprint, "http://127.0.0.1:8000/v1/embeddings")
    >>> work.resumed, work.work_id
    >>> work.part_path(shard)
"""

# Standard library imports
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Optional

MANIFEST = "work.json"
DECOMPRESSED_INPUT = "input.jsonl"


@dataclass
class WorkLocation:
    """A run's work folder and what its manifest says.

    Attributes:
        path: the local folder.
        work_id: a random id made when the folder was created; part of the shard cache keys.
        resumed: True when an earlier, unfinished run's state was found and is continued.
        already_complete: True when an earlier run with the same input and settings finished.
    """

    path: str
    work_id: str
    resumed: bool = False
    already_complete: bool = False
    shard_count: Optional[int] = None

    @classmethod
    def prepare(cls, save_filepath: str, work_dir: Optional[str], input_fingerprint: str, request_url: str,
                source: str = "") -> "WorkLocation":
        """Find the work folder of an earlier run of the same job, or make a fresh one.

        Args:
            save_filepath: the output path or URI.
            work_dir: an explicit work folder, or None for the default.
            input_fingerprint: the input's content fingerprint.
            request_url: the request URL (a different URL is a different job).
            source: the input's path or URI (recorded in the manifest).

        Returns:
            The work location.
        """
        path = work_dir or default_work_dir(save_filepath)
        wanted = {"input": source, "input_fingerprint": input_fingerprint, "request_url": request_url,
                  "output": save_filepath}
        manifest = _read_manifest(path)
        if manifest is not None and all(manifest.get(key) == value for key, value in wanted.items()):
            return cls(path, manifest["work_id"], resumed=not manifest.get("complete", False),
                       already_complete=bool(manifest.get("complete", False)), shard_count=manifest.get("shard_count"))
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        work_id = uuid.uuid4().hex
        _write_manifest(path, dict(wanted, work_id=work_id, complete=False))
        return cls(path, work_id)

    def record_shard_count(self, count: int) -> None:
        """Remember how the input was split, so a resumed run splits it the same way."""
        manifest = _read_manifest(self.path) or {}
        manifest["shard_count"] = self.shard_count = count
        _write_manifest(self.path, manifest)

    def start_over(self) -> "WorkLocation":
        """Forget everything (used when a completed job's output has gone missing)."""
        shutil.rmtree(self.path, ignore_errors=True)
        return self

    def part_path(self, index: int, count: int) -> str:
        """The part file of shard ``index`` of ``count``."""
        return os.path.join(self.path, f"shard-{index:05d}-of-{count:05d}.part")

    @property
    def decompressed_input(self) -> str:
        """Where a compressed input's decompressed copy lives."""
        return os.path.join(self.path, DECOMPRESSED_INPUT)

    def mark_complete(self) -> None:
        """Delete the parts and record that the job finished (a rerun then sends nothing)."""
        manifest = _read_manifest(self.path) or {}
        for name in os.listdir(self.path):
            if name != MANIFEST:
                target = os.path.join(self.path, name)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        manifest["complete"] = True
        _write_manifest(self.path, manifest)


def default_work_dir(save_filepath: str) -> str:
    """Beside a local output; under the user's cache, keyed by the URI, for a remote one."""
    if "://" not in save_filepath or save_filepath.startswith("file://"):
        return f"{save_filepath.removeprefix('file://')}.work"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(save_filepath.encode()).hexdigest()[:20]
    return os.path.join(cache, "prefect-parallel-requests", "work", key)


# Helpers


def _read_manifest(path: str) -> Optional[Dict[str, Any]]:
    """The manifest of a work folder, or None when there is none (or it is unreadable)."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "work_id" in manifest else None


def _write_manifest(path: str, manifest: Dict[str, Any]) -> None:
    """Write the manifest atomically."""
    temporary = os.path.join(path, f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, os.path.join(path, MANIFEST))
