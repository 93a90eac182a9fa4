"""Reusing paid answers: an edited, reordered or re-sent input pays only for rows it has not paid for.

When a job's input changed after answers were paid for, or its finished output was deleted,
this pass runs before any shard sends a row:

    1. Every earlier answer is gathered by its row identity, (digest, occurrence), from the
       earlier generations named as sources: their parts (numbered in the order of the input that
       paid for them) and the answers they had carried over themselves. Each distinct identity is
       written once into this generation's ``earlier-answers.jsonl`` (``digest TAB occurrence TAB
       output line``), so nothing paid is lost when the earlier generations are cleaned away.
    2. The new input is read once, in order. Each row's identity is looked up; an answer found
       is written into the row's part as its final record, rewritten for the row (its metadata,
       its ``custom_id``). The shards then skip those rows as done.

So a reordered input sends nothing, N identical rows reuse at most N earlier answers, an edited
input sends exactly its changed and added rows, and rows removed from the input keep their
answers for a later edit that brings them back. Answers the server never gave (timeouts,
connection errors) and errors decided without sending (no price, too large) are not carried:
those rows are tried again.

Usage:
    >>> reused = reuse_paid_answers(work, start.reuse_sources, shards, shape, request_url)
    >>> work.record_reuse_done(reused)

Pitfalls:
    - The index holds one entry per earlier answer (about 100 bytes each): a million answered
      rows take about 100 MB while the pass runs.
"""

# Standard library imports
import logging
import os
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

# Local application imports
from tasks.requests.request_formats import ParsedRequest, RequestShape, parse_line
from tasks.storage.results_storage import (
    PartWriter,
    iter_part_answers,
    read_part_state,
    reformat_answer,
)
from tasks.requests.row_identity import OccurrenceCounter, is_digest
from tasks.shards.sharding import ShardSpec, iter_shard_lines
from tasks.job.work_location import WorkLocation

logger = logging.getLogger(__name__)



def reuse_paid_answers(work: WorkLocation, sources: Sequence[Dict[str, Any]], shards: Sequence[ShardSpec],
                       shape: RequestShape, request_url: str,
                       transport_params: Optional[Dict[str, Any]] = None) -> int:
    """Carry earlier answers into the current generation, and answer every row whose identity they match.

    Args:
        work: the job's work folder (its current generation receives the answers).
        sources: earlier generations, newest first (``JobStart.reuse_sources``).
        shards: the current generation's shards.
        shape: the input's shape.
        request_url: the request URL.
        transport_params: smart-open's transport parameters.

    Returns:
        How many rows got an earlier answer (rows already done in the parts not counted again).
    """
    index = _carry_answers(work, sources)
    if not index:
        return 0
    reused = 0
    counter = OccurrenceCounter()
    with open(work.earlier_answers_path, "rb") as answers:
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
                    offset = index.get((parsed.digest, counter.next(parsed.digest)))
                    if offset is None or line_index in done:
                        continue
                    answers.seek(offset)
                    try:
                        output_line = reformat_answer(answers.readline().rstrip(b"\n"), parsed, shape)
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


def _carry_answers(work: WorkLocation, sources: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, int], int]:
    """Write every distinct earlier answer once into this generation's earlier answers; index them by identity.

    Returns:
        (digest, occurrence) to the byte offset of the answer's output line in ``earlier-answers.jsonl``.
    """
    index: Dict[Tuple[str, int], int] = {}
    target = work.earlier_answers_path
    temporary = f"{target}.{os.getpid()}.tmp"
    with open(temporary, "wb") as carried:
        for source in sources:
            generation = str(source.get("generation"))
            for key, line in _answers_of(work, generation):
                if key in index:
                    continue
                carried.write(b"%b\t%d\t" % (key[0].encode("ascii"), key[1]))
                index[key] = carried.tell()
                carried.write(line + b"\n")
        carried.flush()
        os.fsync(carried.fileno())
    os.replace(temporary, target)
    return index


def _answers_of(work: WorkLocation, generation: str) -> Iterator[Tuple[Tuple[str, int], bytes]]:
    """Every answer a generation holds: its parts' (numbered in its input's order), then those it carried."""
    counter = OccurrenceCounter()
    for part_path in work.part_paths_of(generation):
        for digest, line in iter_part_answers(part_path):
            yield (digest, counter.next(digest)), line
    carried = work.earlier_answers_of(generation)
    if not os.path.exists(carried) or carried == work.earlier_answers_path:
        return
    with open(carried, "rb") as handle:
        for raw in handle:
            fields = raw.rstrip(b"\n").split(b"\t", 2)
            if len(fields) == 3 and raw.endswith(b"\n") and fields[1].isdigit():
                digest = fields[0].decode("ascii", "replace")
                if is_digest(digest):
                    yield (digest, int(fields[1])), fields[2]
