"""In-memory storage: the embedded default, with the same behaviour as Redis."""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from feedfan.activity import Activity
from feedfan.storage.base import FanoutStatus, RejectedMessage, Storage, WriteBatch

__all__ = ["MemoryStorage"]


class _Timeline:
    """A sorted set: entries ordered by (score, member), as Redis orders them."""

    __slots__ = ("order", "scores")

    def __init__(self) -> None:
        self.order: list[tuple[int, str]] = []
        self.scores: dict[str, int] = {}

    def add(self, member: str, score: int) -> None:
        old = self.scores.get(member)
        if old == score:
            return
        if old is not None:
            self.order.pop(bisect.bisect_left(self.order, (old, member)))
        bisect.insort(self.order, (score, member))
        self.scores[member] = score

    def remove(self, member: str) -> None:
        old = self.scores.pop(member, None)
        if old is not None:
            self.order.pop(bisect.bisect_left(self.order, (old, member)))

    def trim(self, max_length: int) -> None:
        excess = len(self.order) - max_length
        if excess > 0:
            for _, member in self.order[:excess]:
                del self.scores[member]
            del self.order[:excess]


class MemoryStorage(Storage):
    """Feeds in this process's memory; nothing survives the process.

    Only in-process dispatchers (``local``, ``eager``) can use it: worker
    processes of Celery, RQ or Dramatiq would each see their own empty copy.
    """

    shared = False

    def __init__(self, *, key_prefix: str = "feedfan:") -> None:
        super().__init__(key_prefix=key_prefix)
        self._lock = threading.Lock()
        self._timelines: dict[str, _Timeline] = {}
        self._bodies: dict[str, Activity] = {}
        self._fanouts: dict[str, dict[str, str]] = {}
        self._done: dict[str, set[str]] = {}
        self._failed: dict[str, dict[str, str]] = {}
        self._rejected: deque[RejectedMessage] = deque()

    def store_activities(self, activities: Iterable[Activity]) -> None:
        with self._lock:
            for activity in activities:
                self._bodies[activity.id] = activity

    def get_activities(self, activity_ids: Sequence[str]) -> dict[str, Activity]:
        with self._lock:
            return {i: self._bodies[i] for i in activity_ids if i in self._bodies}

    def apply(self, batch: WriteBatch) -> None:
        with self._lock:
            for key, max_length in batch.feeds:
                timeline = self._timelines.setdefault(key, _Timeline())
                if batch.op == "add":
                    for member, score in batch.entries:
                        timeline.add(member, score)
                    timeline.trim(max_length)
                else:
                    for member, _ in batch.entries:
                        timeline.remove(member)
                    if not timeline.scores:
                        del self._timelines[key]
            if batch.chunk is not None:
                fanout_id, chunk_key = batch.chunk
                self._done.setdefault(fanout_id, set()).add(chunk_key)
                self._failed.get(fanout_id, {}).pop(chunk_key, None)

    def read_feed(self, key: str, *, offset: int, limit: int) -> list[tuple[str, int]]:
        with self._lock:
            timeline = self._timelines.get(key)
            if timeline is None or limit <= 0:
                return []
            order = timeline.order
            end = len(order) - offset
            start = max(end - limit, 0)
            return (
                [(member, score) for score, member in reversed(order[start:end])] if end > 0 else []
            )

    def feed_length(self, key: str) -> int:
        with self._lock:
            timeline = self._timelines.get(key)
            return len(timeline.order) if timeline else 0

    def begin_fanout(self, fanout_id: str, meta: Mapping[str, str]) -> None:
        with self._lock:
            record = self._fanouts.get(fanout_id, {})
            total = record.get("total")
            if total is not None and len(self._done.get(fanout_id, ())) >= int(total):
                # The fanout finished before and runs again: count afresh.
                record = {}
                self._done.pop(fanout_id, None)
                self._failed.pop(fanout_id, None)
            record.update(meta)
            record.pop("total", None)
            record["started"] = repr(time.time())
            self._fanouts[fanout_id] = record

    def end_planning(self, fanout_id: str, total_chunks: int) -> None:
        with self._lock:
            self._fanouts.setdefault(fanout_id, {})["total"] = str(total_chunks)

    def reopen_planning(self, fanout_id: str, failed_key: str) -> bool:
        with self._lock:
            record = self._fanouts.get(fanout_id)
            if record is None or record.get("total") is None:
                return True
            failed = self._failed.get(fanout_id, {})
            if failed_key not in failed and len(self._done.get(fanout_id, ())) >= int(
                record["total"]
            ):
                return False
            record.pop("total", None)
            failed.pop(failed_key, None)
            return True

    def mark_chunk_failed(self, fanout_id: str, chunk_key: str, reason: str) -> None:
        with self._lock:
            if chunk_key not in self._done.get(fanout_id, ()):
                self._failed.setdefault(fanout_id, {})[chunk_key] = reason

    def clear_chunk_failure(self, fanout_id: str, chunk_key: str) -> None:
        with self._lock:
            self._failed.get(fanout_id, {}).pop(chunk_key, None)

    def fanout_status(self, fanout_id: str) -> FanoutStatus | None:
        with self._lock:
            record = self._fanouts.get(fanout_id)
            done = len(self._done.get(fanout_id, ()))
            failed = len(self._failed.get(fanout_id, {}))
            if record is None and not done and not failed:
                return None
            record = dict(record or {})
            total = record.pop("total", None)
            return FanoutStatus(
                fanout_id=fanout_id,
                total=int(total) if total is not None else None,
                done=done,
                failed=failed,
                meta=record,
            )

    def recent_fanouts(self, *, limit: int = 20) -> list[str]:
        with self._lock:
            ordered = sorted(
                self._fanouts, key=lambda f: float(self._fanouts[f].get("started", 0)), reverse=True
            )
            return ordered[:limit]

    def keep_rejected(self, queue: str, body: str, reason: str) -> None:
        with self._lock:
            self._rejected.append(RejectedMessage(queue, reason, body, time.time()))

    def rejected(self, *, limit: int = 100) -> list[RejectedMessage]:
        with self._lock:
            return list(reversed(self._rejected))[:limit]

    def pop_rejected(self) -> RejectedMessage | None:
        with self._lock:
            return self._rejected.popleft() if self._rejected else None

    def clear(self) -> int:
        with self._lock:
            count = len(self._timelines) + len(self._bodies) + len(self._fanouts)
            for part in (self._timelines, self._bodies, self._fanouts, self._done, self._failed):
                part.clear()
            self._rejected.clear()
            return count
