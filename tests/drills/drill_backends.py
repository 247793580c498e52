"""The backends the drills run against, and the uninterrupted run each drill is compared with."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from drill_feeds import check_feeds, new_fanout, settle, timed_settle
from drill_report import DrillRow
from drill_scale import Scale

from feedfan.config import Settings
from feedfan.manager import Manager
from feedfan.storage.redis import RedisStorage
from feedfan.testing import Harness
from feedfan.testing.managers import CHUNK_DELAY_VARIABLE

__all__ = [
    "IN_PROCESS_BACKENDS",
    "REDELIVERY_TIMEOUT",
    "WORKER_BACKENDS",
    "Backend",
    "Baseline",
    "Drill",
    "drill_settings",
    "run_uninterrupted",
    "warm_up",
    "worker_env",
]

REDELIVERY_TIMEOUT = 8
"""``redelivery_timeout`` of the drills (the conformance suite's): a lost chunk returns in seconds."""

CHUNK_TIME_LIMIT = 4
"""``chunk_time_limit`` of the drills; a delayed chunk takes a fraction of it."""

MAX_CHUNK_SIZE = 1_000
"""``max_chunk_size`` of the drills, so a "huge follower list" is refused at 1,001 ids."""


@dataclass(frozen=True)
class Backend:
    """A dispatcher on a broker, as the drills' table names it."""

    id: str
    dispatcher: str
    broker: str
    """``"redis"`` or ``"amqp"``; the feeds are always in Redis."""

    @property
    def has_workers(self) -> bool:
        """Whether chunks run in worker processes (not ``local`` / ``eager``)."""
        return self.dispatcher not in ("local", "eager")


WORKER_BACKENDS = [
    Backend("celery-redis", "celery", "redis"),
    Backend("celery-amqp", "celery", "amqp"),
    Backend("rq", "rq", "redis"),
    Backend("dramatiq-redis", "dramatiq", "redis"),
    Backend("dramatiq-amqp", "dramatiq", "amqp"),
]
"""Every queue library on every broker it supports, with real worker processes."""

IN_PROCESS_BACKENDS = [
    Backend("local", "local", "redis"),
    Backend("eager", "eager", "redis"),
]
"""The in-process dispatchers, with their feeds in Redis."""


def drill_settings(harness: Harness, **overrides: object) -> Settings:
    """Settings of a namespace of its own (queues, key prefix) with the drills' limits."""
    return harness.settings(max_chunk_size=MAX_CHUNK_SIZE, **overrides)


def worker_env(scale: Scale) -> dict[str, str]:
    """The environment of a drill worker: each chunk sleeps ``chunk_delay`` before its write."""
    return {CHUNK_DELAY_VARIABLE: str(scale.chunk_delay)}


def warm_up(manager: Manager, *, timeout: float) -> None:
    """Send a one-follower fanout and wait for it: the worker is up and has run a chunk."""
    fanout = new_fanout(1, label="warm")
    settle(manager, manager.add_user_activity(fanout.user, fanout.activity), timeout=timeout)


@dataclass(frozen=True)
class Baseline:
    """The uninterrupted run of a drill-sized fanout on one backend."""

    seconds: float
    chunks: int


def run_uninterrupted(harness: Harness, scale: Scale) -> Baseline:
    """Fan out to ``scale.followers`` with one warm worker and no fault; time it and check it."""
    manager = harness.manager(drill_settings(harness))
    worker = harness.start_worker(manager.settings, env=worker_env(scale))
    try:
        warm_up(manager, timeout=scale.settle_timeout)
        fanout = new_fanout(scale.followers, label="base")
        started = time.monotonic()
        receipt = manager.add_user_activity(fanout.user, fanout.activity)
        seconds = timed_settle(
            manager,
            receipt,
            started=started,
            timeout=scale.settle_timeout,
            logs=harness.worker_logs,
        )
        status = manager.fanout_status(receipt)
        assert status is not None and status.total is not None
        storage = manager.storage
        assert isinstance(storage, RedisStorage)
        check = check_feeds(storage, fanout)
        assert (check.lost, check.duplicated) == (0, 0), f"uninterrupted run: {check}"
        return Baseline(seconds, status.total)
    finally:
        if worker is not None:
            worker.stop()


@dataclass
class Drill:
    """What a drill test works with: the backend, its harness, the sizes, and the report."""

    backend: Backend
    harness: Harness
    scale: Scale
    rng: random.Random
    """Random choices of this test, derived from the session's seed."""

    tmp_path: Path
    add_row: Callable[..., DrillRow]
    baseline: Callable[[], Baseline]
    """The uninterrupted run of a drill-sized fanout on this backend (measured once a session)."""

    def row(self, drill: str, *, faults: str = "", followers: int | str = 0) -> DrillRow:
        """A row of the results table for this backend; the test fills it in as it goes."""
        return self.add_row(self.backend.id, drill, faults=faults, followers=followers)
