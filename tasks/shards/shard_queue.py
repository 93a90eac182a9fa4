"""A run's queue of shards in Redis: child runs take the next shard when they are ready for one.

In the work-pool mode, child flow runs start at different moments: a worker picks a run up within
its polling interval, and a new process takes seconds to import Prefect, more on a busy machine.
If each child owned one fixed shard, the first ones could finish before the last ones start, and
the shared limit would sit idle in between. Instead, the parent puts every shard number in a
Redis list, and each child takes one at a time (``LPOP``, atomic) until the list is empty. The
first child to start keeps sending while the others start, and each shard is run exactly once.

Usage:
    >>> queue = ShardQueue("redis://127.0.0.1:6379/0", work_id)
    >>> await queue.fill(range(16))          # the parent
    >>> index = await queue.take()           # a child; None when every shard is taken
    >>> await queue.aclose()

Pitfalls:
    - A shard taken by a child that then dies is not put back: the parent sees no counts for
      it and ends Failed ("rerun to continue"); the next run resumes the shard from its part.
"""

# Standard library imports
from typing import Iterable, Optional

# Third-party imports
import redis.asyncio as redis_asyncio

# Local application imports
from tasks.limits.redis_engine import redis_client

# How long a queue may stay in Redis (a run that outlives it fails its remaining child runs clearly).
QUEUE_SECONDS = 7 * 86400


class ShardQueue:
    """The shard numbers of one run that no child has taken yet."""

    def __init__(self, url: str, work_id: str) -> None:
        self.url = url
        self.key = f"parallel-requests:shards:{work_id}"
        self._client: Optional[redis_asyncio.Redis] = None

    async def fill(self, indices: Iterable[int]) -> None:
        """Replace the queue's content by ``indices``, in order."""
        client = self._connection()
        async with client.pipeline(transaction=True) as pipeline:
            pipeline.delete(self.key)
            pipeline.rpush(self.key, *[str(index) for index in indices])
            pipeline.expire(self.key, QUEUE_SECONDS)
            await pipeline.execute()

    async def take(self) -> Optional[int]:
        """The next shard number, or None when every shard has been taken."""
        value = await self._connection().lpop(self.key)
        return None if value is None else int(value)

    async def aclose(self) -> None:
        """Close the connection."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _connection(self) -> redis_asyncio.Redis:
        if self._client is None:
            self._client = redis_client(self.url)
        return self._client
