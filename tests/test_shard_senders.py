"""The shards' senders against a real test server: slots shared first in first out, never above the cap, none lost.

The shard reader runs here without Prefect (it is a plain class), over real sockets on 127.0.0.1,
with the in-process engine, so that the engine's slot count can be watched while requests run.
"""

# Standard library imports
import asyncio
import glob
import logging
import os
import threading
from typing import Any, List, Optional, Tuple

# Third-party imports
import aiohttp
from aiohttp import web

# Local application imports
from tasks.api.api_client import ApiClient
from tasks.limits.rate_limiter import RateLimiterPool
from tasks.reporting.metrics import RunProgress, StatusTracker
from tasks.requests.request_formats import RequestShape
from tasks.shards.request_sender import RequestSender
from tasks.shards.row_results import ResultRecorder
from tasks.shards.run_state import Budget, RunContext, RunSettings
from tasks.shards.shard_task import ShardReader
from tasks.shards.sharding import plan_shards
from tasks.storage.results_storage import PartWriter, TurnWrites, read_part_state
from tests.conftest import write_jsonl


def _chat(i: int, model: str = "gpt-4o-mini") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": f"row {i}"}], "max_tokens": 5}


async def _run_shards(url: str, source: str, shards: int, engine: RateLimiterPool, tmp_path: Any,
                      turn_writes: Any = None,
                      settings: Optional[RunSettings] = None) -> Tuple[List[StatusTracker], List[str], List[int]]:
    """Run every shard of ``source`` on one context; return the trackers, the part paths and the slots held,
    sampled every millisecond until every line was read."""
    logger = logging.getLogger("test-shard-senders")
    specs = plan_shards(source, shards)
    progress = RunProgress(os.path.getsize(source))
    held: List[int] = []
    async with aiohttp.ClientSession() as session:
        context = RunContext(settings or RunSettings(url, RequestShape.COOKBOOK), engine,
                             ApiClient(session, None, 30.0), None, progress, Budget())
        if turn_writes is not None:
            context.turn_writes = turn_writes
        trackers: List[StatusTracker] = []
        paths: List[str] = []
        readers = []
        writers = []
        for spec in specs:
            path = str(tmp_path / f"part-{spec.index}")
            writer = PartWriter(path, context.turn_writes)
            tracker = StatusTracker(shard=spec.index)
            recorder = ResultRecorder(writer, RequestShape.COOKBOOK, progress, context.errors, logger, spec)
            readers.append(ShardReader(spec, context, RequestSender(context, tracker, recorder, logger, spec.label), {}))
            trackers.append(tracker)
            paths.append(path)
            writers.append(writer)

        lines = sum(1 for _ in open(source, "rb"))

        async def watch() -> None:
            while sum(tracker.lines_read for tracker in trackers) < lines:
                held.append(engine.max_in_flight - engine.free_slots)
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait_for(asyncio.gather(*(reader.run() for reader in readers)), timeout=60)
        finally:
            watcher.cancel()
            for writer in writers:
                writer.close()
    return trackers, paths, held


async def test_one_shard_keeps_the_cap_full_and_never_goes_above_it(api_server, tmp_path) -> None:
    server = api_server(latency_seconds=0.05)
    source = write_jsonl(tmp_path / "rows.jsonl", [_chat(i) for i in range(300)])
    engine = RateLimiterPool(float("inf"), float("inf"), max_in_flight=20)
    trackers, paths, held = await _run_shards(f"{server.url}/v1/chat/completions", source, 1, engine, tmp_path)
    assert trackers[0].succeeded == 300 and server.stats()["requests"] == 300
    assert max(held) == 20  # requests overlap up to the cap...
    assert engine.free_slots == 20  # ...and every slot came back
    assert len(read_part_state(paths[0]).done) == 300


async def test_shards_and_rows_waiting_in_a_lane_share_one_slot(api_server, tmp_path) -> None:
    # One slot for four shards; every other row's model is held to 600 per minute, so its rows wait in their
    # lane (and need the slot too) while the other model's rows are served at once on the senders' slot.
    server = api_server(latency_seconds=0.002)
    rows = [_chat(i, model="gpt-4o-mini" if i % 2 else "slow-model") for i in range(80)]
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    engine = RateLimiterPool(float("inf"), float("inf"), max_in_flight=1,
                             model_limits={"slow-model": {"requests_per_minute": 600}})
    trackers, paths, held = await _run_shards(f"{server.url}/v1/chat/completions", source, 4, engine, tmp_path)
    assert sum(tracker.succeeded for tracker in trackers) == 80
    assert max(held) == 1 and engine.free_slots == 1
    assert sum(len(read_part_state(path).done) for path in paths) == 80


class _FailsOnce(TurnWrites):
    """A part store whose first write before a request fails, as a full disk would."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def _write_waiting(self) -> None:
        if not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")
        super()._write_waiting()


async def test_an_error_before_a_request_leaves_costs_that_row_and_gives_its_slot_back(api_server, tmp_path) -> None:
    server = api_server()
    source = write_jsonl(tmp_path / "rows.jsonl", [_chat(i) for i in range(5)])
    engine = RateLimiterPool(float("inf"), float("inf"), max_in_flight=1)
    # With one slot, a slot kept by the failed row would leave the other four waiting for ever (a timeout here).
    trackers, paths, _ = await _run_shards(f"{server.url}/v1/chat/completions", source, 1, engine, tmp_path,
                                           turn_writes=_FailsOnce())
    # Never sent, so not a final error: no record, and the next run sends it.
    assert trackers[0].succeeded == 4 and trackers[0].not_sent == 1 and trackers[0].failed_after_retries == 0
    assert len(read_part_state(paths[0]).done) == 4
    assert server.stats()["requests"] == 4
    assert engine.free_slots == 1


async def test_rows_backing_off_before_a_retry_leave_their_slots_to_other_rows(api_server, tmp_path) -> None:
    # A third of the answers are faults, and a retry waits 1-2 s: while rows back off (holding no slot), the
    # shard's other rows keep every slot busy. (Senders counted with the ones backing off left slots empty.)
    server = api_server(fault_rate=0.3, latency_seconds=0.02, seed=3)
    source = write_jsonl(tmp_path / "rows.jsonl", [_chat(i) for i in range(600)])
    engine = RateLimiterPool(float("inf"), float("inf"), max_in_flight=10)
    url = f"{server.url}/v1/chat/completions"
    settings = RunSettings(url, RequestShape.COOKBOOK, max_attempts=3, retry_base_seconds=2.0)
    trackers, paths, held = await _run_shards(url, source, 1, engine, tmp_path, settings=settings)
    assert trackers[0].rows == 600 and trackers[0].retries > 50
    assert len(read_part_state(paths[0]).done) == 600
    busy = sum(held) / len(held)  # slots held on average while lines were still being read
    assert busy > 7, busy  # (0.5 when the ones backing off were counted)


class _PartWatchingServer:
    """A chat API on its own thread that, as each request arrives, counts the answers already in the part files.

    What the client has received but not yet written would be lost to a kill at that moment, and paid again.
    """

    def __init__(self, parts_glob: str) -> None:
        self.parts_glob = parts_glob
        self.received = 0
        self.unwritten: List[int] = []  # at each arrival: requests received, less the answers on disk
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._started.wait(10)

    async def _answer(self, request: web.Request) -> web.Response:
        await request.read()
        self.received += 1
        written = 0
        for path in glob.glob(self.parts_glob):
            with open(path, "rb") as handle:
                written += handle.read().count(b"\tr\t")
        self.unwritten.append(self.received - written)
        return web.json_response({"id": "x", "object": "chat.completion", "model": "gpt-4o-mini",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        application = web.Application()
        application.router.add_post("/v1/chat/completions", self._answer)
        self._runner = web.AppRunner(application)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._started.set()
        self._loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def test_every_answer_is_on_disk_before_the_next_request_leaves(tmp_path) -> None:
    # A kill loses at most the requests in flight: when a request arrives, every answer its sender and the
    # other shards' senders had before it is already on disk. (With the part writers left out of the turn's
    # write, the answers stayed in memory until the shards ended: 400 unwritten.)
    server = _PartWatchingServer(str(tmp_path / "part-*"))
    try:
        source = write_jsonl(tmp_path / "rows.jsonl", [_chat(i) for i in range(400)])
        engine = RateLimiterPool(float("inf"), float("inf"), max_in_flight=4)
        trackers, paths, _ = await _run_shards(f"{server.url}/v1/chat/completions", source, 2, engine, tmp_path)
    finally:
        server.stop()
    assert sum(tracker.succeeded for tracker in trackers) == 400 and server.received == 400
    assert max(server.unwritten) <= 4, sorted(server.unwritten)[-10:]
