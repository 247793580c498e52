"""Managers the conformance suite runs in producers and in real workers.

Followers are derived from the user id, so a worker process needs no shared
state to plan: user ``"t7:3:2"`` has HIGH followers ``t7:h0 … t7:h2`` and LOW
followers ``t7:l0, t7:l1``. Each test uses its own ``t<n>`` namespace.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

from feedfan.activity import ObjectId
from feedfan.feeds import Feed, TimelineFeed, UserFeed
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.storage.redis import RedisStorage
from feedfan.task import ChunkTask

__all__ = [
    "CHUNK_DELAY_VARIABLE",
    "ConformanceManager",
    "MyStreamManager",
    "get_follower_ids",
    "ShortFeed",
    "follower_ids",
    "make_user",
    "started_chunks",
]

CHUNK_DELAY_VARIABLE = "FEEDFAN_TEST_CHUNK_DELAY"
"""Seconds a conformance worker sleeps before each chunk's write (kill drills)."""


class ShortFeed(Feed):
    """A feed kept to three entries, to test trimming."""

    name = "short"
    max_length = 3


def make_user(namespace: str, high: int, low: int) -> str:
    """A user id whose followers are ``high`` HIGH and ``low`` LOW ids in ``namespace``."""
    return f"{namespace}:{high}:{low}"


def follower_ids(user_id: ObjectId, priority: FanoutPriority) -> Iterator[str]:
    """The followers of a conformance user of one priority, generated lazily."""
    return iter(_Followers(user_id, priority))


class _Followers(Sequence[str]):
    """The followers of a conformance user of one priority, as a sequence built on demand.

    A sequence, as a list of ids would be, so background planning pages through it.
    """

    def __init__(self, user_id: ObjectId, priority: FanoutPriority) -> None:
        namespace, high, low = str(user_id).rsplit(":", 2)
        self._prefix = f"{namespace}:{'h' if priority is FanoutPriority.HIGH else 'l'}"
        self._count = int(high) if priority is FanoutPriority.HIGH else int(low)

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [f"{self._prefix}{i}" for i in range(self._count)[index]]
        return f"{self._prefix}{range(self._count)[index]}"

    def __iter__(self) -> Iterator[str]:
        return (f"{self._prefix}{i}" for i in range(self._count))


def _started_key(storage: RedisStorage) -> str:
    return f"{storage.key_prefix}conformance:started"


def started_chunks(storage: RedisStorage) -> list[dict[str, object]]:
    """Chunks a slowed-down worker has begun, oldest first: ``{"pid", "chunk", "at"}``."""
    rows = storage.client.lrange(_started_key(storage), 0, -1)
    return [json.loads(row) for row in rows]


class ConformanceManager(Manager):
    """The manager of the conformance suite: two fanout feeds, one of them short."""

    feed_classes = {"timeline": TimelineFeed, "short": ShortFeed}
    user_feed_class = UserFeed

    def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Iterable[ObjectId]]:
        """Followers derived from the user id; see :func:`make_user`."""
        return {p: _Followers(user_id, p) for p in FanoutPriority}

    def get_user_follower_count(self, user_id: ObjectId) -> int:
        """The follower count, read from the user id."""
        _, high, low = str(user_id).rsplit(":", 2)
        return int(high) + int(low)

    def run_chunk(self, task: ChunkTask) -> int:
        """Write the chunk; when slowed down for a kill drill, first note who runs it."""
        delay = float(os.environ.get(CHUNK_DELAY_VARIABLE) or 0)
        if delay and isinstance(self.storage, RedisStorage):
            record = {"pid": os.getpid(), "chunk": task.chunk_key, "at": time.time()}
            self.storage.client.rpush(_started_key(self.storage), json.dumps(record))
            time.sleep(delay)
        return super().run_chunk(task)


def get_follower_ids(user_id: ObjectId, *, active: bool) -> Iterator[str]:
    """The seed's helper: a user's active (or inactive) followers."""
    return follower_ids(user_id, FanoutPriority.HIGH if active else FanoutPriority.LOW)


class MyStreamManager(Manager):
    """The seed's ``MyStreamManager``, as a user writes it: no queue named in code."""

    feed_classes = {"timeline": TimelineFeed, "short": ShortFeed}

    def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Iterable[ObjectId]]:
        """Active followers first, as in Stream Framework's docs."""
        return {
            FanoutPriority.HIGH: get_follower_ids(user_id, active=True),
            FanoutPriority.LOW: get_follower_ids(user_id, active=False),
        }
