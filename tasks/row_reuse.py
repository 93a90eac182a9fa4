"""Reusing paid answers: an edited, reordered or re-sent input pays only for rows it has not paid for.

When a job's input changed after answers were paid for (an earlier generation's parts, or the
finished output read back with its digests), this pass runs before any shard sends a row:

    1. Every earlier answer is indexed by its row identity, (digest, occurrence), in the order of
       the input that paid for it (``tasks.row_identity``). Answers from the finished output are
       copied into a local file of the new generation first, so a compressed or remote output is
       read once.
    2. The new input is read once, in order. Each row's identity is looked up; an answer found
       is written into the row's part as its final record, rewritten for the row (its metadata,
       its ``custom_id``). The shards then skip those rows as done.

So a reordered input sends nothing, N identical rows reuse at most N earlier answers, and an
edited input sends exactly its changed and added rows. Rows whose last result was decided here
without paying (no price, too large) are decided again.

Usage:
    >>> reused = reuse_paid_answers(work, start.reuse_sources, shards, shape, request_url, output_uri)
    >>> work.record_reuse_done(reused)

Pitfalls:
    - The index holds one entry per earlier answer (about 100 bytes each): a million answered
      rows take about 100 MB while the pass runs.
"""

# Standard library imports
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

# Local application imports
from tasks.request_formats import ParsedRequest, RequestShape, parse_line
from tasks.results_storage import (
    PartWriter,
    iter_output_answers,
    iter_part_answers,
    read_part_state,
    read_record_payload,
    reformat_answer,
)
from tasks.row_identity import OccurrenceCounter
from tasks.sharding import ShardSpec, iter_shard_lines
from tasks.work_location import WorkLocation

logger = logging.getLogger(__name__)

# The file of the new generation that holds answers copied from the finished output.
REUSED_ANSWERS = "reused-answers.jsonl"


def reuse_paid_answers(work: WorkLocation, sources: Sequence[Dict[str, Any]], shards: Sequence[ShardSpec],
                       shape: RequestShape, request_url: str, output_uri: str,
                       transport_params: Optional[Dict[str, Any]] = None) -> int:
    """Copy earlier answers into the current generation's parts for every row whose identity they match.

    Args:
        work: the job's work folder (its current generation receives the answers).
        sources: earlier answers, newest first (``JobStart.reuse_sources``).
        shards: the current generation's shards.
        shape: the input's shape.
        request_url: the request URL.
        output_uri: the job's output (a finished output is read back from it).
        transport_params: smart-open's transport parameters.

    Returns:
        How many rows got an earlier answer (rows already done in the parts not counted again).
    """
    index = _index_answers(work, sources, output_uri, transport_params)
    if not index:
        return 0
    reused = 0
    counter = OccurrenceCounter()
    for shard in shards:
        part_path = work.part_path(shard.index, shard.count)
        done = read_part_state(part_path).done
        writer: Optional[PartWriter] = None
        try:
            for line_index, _, raw in iter_shard_lines(shard, transport_params):
                if not raw.strip():
                    continue
                parsed = parse_line(raw, shape, request_url, line_index)
                if not isinstance(parsed, ParsedRequest):
                    continue
                found = index.get((parsed.digest, counter.next(parsed.digest)))
                if found is None or line_index in done:
                    continue
                line = _answer_line(found)
                try:
                    output_line = reformat_answer(line, parsed, shape)
                except ValueError:
                    continue
                if writer is None:
                    writer = PartWriter(part_path)
                writer.write_result(line_index, parsed.digest, output_line)
                reused += 1
        finally:
            if writer is not None:
                writer.close()
    logger.info("Reused %d earlier answers for rows whose requests are unchanged", reused)
    return reused


# Helpers


def _index_answers(work: WorkLocation, sources: Sequence[Dict[str, Any]], output_uri: str,
                   transport_params: Optional[Dict[str, Any]]) -> Dict[Tuple[str, int], Tuple[str, int]]:
    """Every earlier answer by (digest, occurrence): the file and byte offset of its record or line."""
    index: Dict[Tuple[str, int], Tuple[str, int]] = {}
    for source in sources:
        counter = OccurrenceCounter()
        if source.get("kind") == "output":
            for digest, path, offset in _copy_output_answers(work, source, output_uri, transport_params):
                index.setdefault((digest, counter.next(digest)), (path, offset))
        elif source.get("kind") == "parts":
            for part_path in work.part_paths_of(str(source.get("generation"))):
                for digest, offset in iter_part_answers(part_path):
                    index.setdefault((digest, counter.next(digest)), (part_path, -offset - 1))
    return index


def _copy_output_answers(work: WorkLocation, source: Dict[str, Any], output_uri: str,
                         transport_params: Optional[Dict[str, Any]]) -> List[Tuple[str, str, int]]:
    """Copy the finished output's answered lines into a local file; their digests and offsets there."""
    digests = os.path.join(work.path, str(source.get("digests")))
    if not os.path.exists(digests):
        return []
    target = os.path.join(work.generation_path, REUSED_ANSWERS)
    found: List[Tuple[str, str, int]] = []
    try:
        with open(target, "wb") as copy:
            for digest, line in iter_output_answers(output_uri, digests, transport_params):
                found.append((digest, target, copy.tell()))
                copy.write(line + b"\n")
    except Exception as error:  # an unreadable earlier output only means nothing is reused from it
        logger.warning("Could not read the earlier output %s back for reuse: %s", output_uri, error)
        return []
    return found


def _answer_line(found: Tuple[str, int]) -> bytes:
    """The output line an index entry points at (a part record's payload, or a copied line)."""
    path, offset = found
    if offset < 0:
        return read_record_payload(path, -offset - 1)
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.readline().rstrip(b"\n")
