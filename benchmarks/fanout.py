"""Measuring one fanout: producer time, first follower, end to end, memory, correctness.

Progress is read from the manager's own counters (``fanout_status``: chunks
done out of the total) by a watcher thread that is running, its Redis
connection made, before the clock starts and ``add_user_activity`` is
called: the first chunk is seen even when it is done before the producer
returns, and neither the thread's start nor its connection is timed. When
the counters say the fanout is complete, a sample of follower feeds is read
back to check that they hold the activity.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from benchmarks.manager import benchmark_user, follower_id
from benchmarks.memory import PeakMemory
from feedfan._progress import Progress
from feedfan.activity import Activity
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.storage.base import FanoutStatus
from feedfan.storage.redis import RedisStorage
from feedfan.task import make_fanout_id

__all__ = ["FanoutResult", "measure_fanout", "warm_up"]

Check = Callable[[], None]


@dataclass
class FanoutResult:
    """What one measured fanout did, and how long each part took (seconds)."""

    followers: int
    chunk_size: int
    chunks: int = 0
    feed_writes: int = 0
    planned_in_background: bool = False
    producer_s: float | None = None
    first_follower_s: float | None = None
    end_to_end_s: float | None = None
    writes_per_s: float | None = None
    tasks_per_s: float | None = None
    failed_chunks: int = 0
    checked_feeds: int = 0
    missing_feeds: int = 0
    verified: bool = False
    memory: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Complete, every chunk done, every sampled feed holding the activity."""
        return self.error is None and self.verified

    def as_dict(self) -> dict[str, Any]:
        """The result as plain JSON data."""
        return asdict(self)


_FINE_POLL_S = 0.001
_FINE_FOR_S = 0.25
_POLL_S = 0.005


class _Watcher(threading.Thread):
    """Polls a fanout's counters from its own Redis connection until it settles."""

    def __init__(self, storage: RedisStorage, fanout_id: str) -> None:
        super().__init__(name="ffbench-watcher", daemon=True)
        self.storage = storage
        self.fanout_id = fanout_id
        self.started: float | None = None
        self.first_at: float | None = None
        self.settled_at: float | None = None
        self.status: FanoutStatus | None = None
        self.ready = threading.Event()
        self.settled = threading.Event()
        self._go = threading.Event()
        self._halt = threading.Event()
        self.error: BaseException | None = None

    def begin(self) -> float:
        """Start the clock and the polling; call once :attr:`ready` is set. Returns the start."""
        self.started = time.perf_counter()
        self._go.set()
        return self.started

    def run(self) -> None:
        try:
            self.storage.ping()  # connect now, not on the clock
            self.ready.set()
            self._go.wait()
            while not self._halt.is_set() and self.started is not None:
                status = self.storage.fanout_status(self.fanout_id)
                now = time.perf_counter()
                if status is not None:
                    self.status = status
                    if self.first_at is None and status.done + status.failed > 0:
                        self.first_at = now
                    if status.settled:
                        self.settled_at = now
                        self.settled.set()
                        return
                # Every millisecond for the first quarter second: a HIGH fanout of
                # the priority step takes 5 to 30 ms, and polling every 5 ms put
                # up to 5 ms of noise on each time. Coarser after that, so long
                # fanouts are not timed with a client busy on their Redis.
                self._halt.wait(_FINE_POLL_S if now - self.started < _FINE_FOR_S else _POLL_S)
        except BaseException as e:  # surfaced by the caller
            self.error = e
            self.ready.set()
            self.settled.set()

    def stop(self) -> None:
        self._halt.set()
        self._go.set()
        self.join(timeout=5)


def _watch_storage(manager: Manager) -> RedisStorage:
    settings = manager.settings
    return RedisStorage(url=settings.effective_redis_url, key_prefix=settings.key_prefix)


def _sample_indices(count: int, sample: int) -> list[int]:
    if count <= sample:
        return list(range(count))
    step = count / sample
    picked = {int(i * step) for i in range(sample)} | {0, count - 1}
    return sorted(picked)


def _verify(
    manager: Manager, storage: RedisStorage, counts: dict[FanoutPriority, int], activity_id: str
) -> tuple[int, int]:
    """Feeds checked and feeds missing the activity, on a sample of followers."""
    keys: list[str] = []
    for count in counts.values():
        for index in _sample_indices(count, 500):
            follower = follower_id(index)
            keys.extend(storage.feed_key(name, follower) for name in manager.registered_feeds)
    pipe = storage.client.pipeline(transaction=False)
    for key in keys:
        pipe.zscore(key, activity_id)
    scores = pipe.execute()
    return len(keys), sum(1 for score in scores if score is None)


def measure_fanout(
    manager: Manager,
    *,
    tag: str,
    high: int = 0,
    low: int = 0,
    timeout: float,
    label: str,
    worker_pids: Callable[[], list[int]] | None = None,
    check: Check | None = None,
) -> FanoutResult:
    """Fan one new activity out to ``high`` + ``low`` followers and measure it.

    ``check`` is called while waiting (it raises if a worker died);
    ``worker_pids`` names the worker processes whose memory is sampled.
    """
    counts = {FanoutPriority.HIGH: high, FanoutPriority.LOW: low}
    user = benchmark_user(tag, high=high, low=low)
    activity = Activity(actor=user, verb="post", object=tag, time=datetime.now(timezone.utc))
    feeds = tuple(manager.registered_feeds)
    fanout_id = make_fanout_id("add", user, [activity.id], feeds)
    result = FanoutResult(followers=high + low, chunk_size=manager.settings.fanout_chunk_size)
    storage = _watch_storage(manager)
    watcher = _Watcher(storage, fanout_id)
    memory = PeakMemory(worker_pids)
    try:
        with memory:
            watcher.start()
            if not watcher.ready.wait(30):
                raise RuntimeError("the fanout watcher did not connect to Redis in 30 s")
            if watcher.error is not None:
                raise watcher.error
            started = watcher.begin()
            receipt = manager.add_user_activity(user, activity)
            result.producer_s = time.perf_counter() - started
            result.planned_in_background = receipt.planned_in_background
            result.feed_writes = (high + low) * len(feeds)
            deadline = started + timeout
            expected = receipt.chunks or -(-high // result.chunk_size) - (-low // result.chunk_size)
            with Progress(label, total=expected) as bar:
                while not watcher.settled.wait(0.1):
                    if watcher.status is not None:
                        bar.update(watcher.status.done)
                    if check is not None:
                        check()
                    if time.perf_counter() > deadline:
                        raise TimeoutError(
                            f"fanout not complete after {timeout:g} s: {watcher.status}"
                        )
                bar.update(watcher.status.done if watcher.status else 0)
        if watcher.error is not None:
            raise watcher.error
        status = watcher.status
        if status is None or watcher.settled_at is None:
            raise RuntimeError("the watcher stopped before the fanout settled")
        result.end_to_end_s = watcher.settled_at - started
        if watcher.first_at is not None:
            result.first_follower_s = watcher.first_at - started
        result.failed_chunks = status.failed
        result.chunks = status.total or 0
        if result.end_to_end_s > 0:
            result.writes_per_s = result.feed_writes / result.end_to_end_s
            result.tasks_per_s = result.chunks / result.end_to_end_s
        result.checked_feeds, result.missing_feeds = _verify(manager, storage, counts, activity.id)
        result.verified = (
            status.complete
            and status.failed == 0
            and status.total == expected
            and (receipt.planned_in_background or receipt.followers == high + low)
            and result.missing_feeds == 0
        )
        if not result.verified:
            result.error = (
                f"incorrect: {status.done}/{status.total} chunks done, {status.failed} failed, "
                f"{result.missing_feeds} of {result.checked_feeds} sampled feeds missing"
            )
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        watcher.stop()
        storage.close()
        result.memory = memory.as_mb()
    return result


def warm_up(manager: Manager, *, timeout: float, check: Check | None = None) -> float:
    """Run a tiny HIGH and LOW fanout until it completes; return seconds taken.

    Workers import, connect and fork on their first tasks; measuring starts
    after that.
    """
    result = measure_fanout(
        manager,
        tag=f"warm{time.monotonic_ns()}",
        high=3,
        low=3,
        timeout=timeout,
        label="start workers",
        check=check,
    )
    if not result.ok or result.end_to_end_s is None:
        raise RuntimeError(f"warm-up fanout failed: {result.error}")
    return result.end_to_end_s
