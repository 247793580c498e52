"""Fanouts the drills send, and the check that every follower's feeds hold the activity once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from feedfan.activity import Activity
from feedfan.errors import FeedfanError
from feedfan.fanout import FanoutReceipt
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.storage.base import FanoutStatus
from feedfan.storage.redis import RedisStorage
from feedfan.testing.managers import ConformanceManager, follower_ids, make_user

__all__ = [
    "FEEDS",
    "FeedCheck",
    "Fanout",
    "check_feeds",
    "new_fanout",
    "settle",
    "timed_settle",
]

FEEDS = tuple(ConformanceManager.feed_classes[key].name for key in ConformanceManager.feed_classes)
"""The fanout feeds a conformance worker writes (``timeline`` and the three-entry ``short``)."""

_PIPELINE_FOLLOWERS = 2_000


@dataclass(frozen=True)
class Fanout:
    """A user with ``high`` + ``low`` followers and the activity the drill fans out for them."""

    user: str
    activity: Activity
    high: int
    low: int

    @property
    def followers(self) -> int:
        """How many followers the fanout reaches."""
        return self.high + self.low

    def follower_ids(self) -> Iterator[str]:
        """Every follower, HIGH first."""
        for priority in FanoutPriority:
            yield from follower_ids(self.user, priority)


def new_fanout(followers: int, *, label: str = "f") -> Fanout:
    """A fanout to ``followers`` followers of a fresh user: a quarter HIGH, the rest LOW."""
    high = followers // 4
    low = followers - high
    user = make_user(f"{label}{uuid.uuid4().hex[:10]}", high, low)
    when = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=high + 7)
    activity = Activity(actor=user, verb="pin", object=f"pin-{label}", time=when)
    return Fanout(user, activity, high, low)


def settle(
    manager: Manager,
    receipt: FanoutReceipt | str,
    *,
    timeout: float,
    logs: Callable[[], str] | None = None,
) -> FanoutStatus:
    """Wait until the fanout settles; fail if any chunk failed for good.

    ``logs`` gives the workers' log tails for the failure message.
    """
    try:
        status = manager.wait(receipt, timeout=timeout, interval=0.1)
    except FeedfanError as e:
        raise AssertionError(f"{e}\n{logs() if logs else ''}") from None
    if status.failed:
        raise AssertionError(
            f"{status.failed} chunk(s) failed for good: {status}\n{logs() if logs else ''}"
        )
    return status


def timed_settle(
    manager: Manager,
    receipt: FanoutReceipt,
    *,
    started: float,
    timeout: float,
    logs: Callable[[], str] | None = None,
) -> float:
    """Seconds from ``started`` (a ``time.monotonic()``) until the fanout settled."""
    settle(manager, receipt, timeout=timeout, logs=logs)
    return time.monotonic() - started


@dataclass(frozen=True)
class FeedCheck:
    """What the feeds of a fanout's followers hold."""

    checked: int
    """Feed entries looked at: followers x fanout feeds."""

    lost: int
    """Feeds without the activity (or with it under a wrong score)."""

    duplicated: int
    """Feeds holding more entries than the one activity they should."""

    examples: tuple[str, ...] = ()

    def __str__(self) -> str:
        shown = ", ".join(self.examples[:5])
        return (
            f"{self.checked:,} feeds checked: {self.lost:,} lost, {self.duplicated:,} "
            f"duplicated{f' (e.g. {shown})' if shown else ''}"
        )


def check_feeds(storage: RedisStorage, fanout: Fanout) -> FeedCheck:
    """Check every follower feed with pipelined ``ZSCORE`` and ``ZCARD``.

    Each follower's fanout feeds must hold exactly one entry: the activity,
    under its own sort key.
    """
    activity_id, score = fanout.activity.id, fanout.activity.sort_key
    checked = lost = duplicated = 0
    examples: list[str] = []
    batch: list[str] = []

    def flush() -> None:
        nonlocal checked, lost, duplicated
        pipe = storage.client.pipeline(transaction=False)
        keys = [storage.feed_key(feed, follower) for follower in batch for feed in FEEDS]
        for key in keys:
            pipe.zscore(key, activity_id)
            pipe.zcard(key)
        replies = pipe.execute()
        for number, key in enumerate(keys):
            found, size = replies[2 * number], int(replies[2 * number + 1])
            checked += 1
            if found is None or int(found) != score:
                lost += 1
                examples.append(f"{key} lacks it")
            elif size > 1:
                duplicated += 1
                examples.append(f"{key} holds {size} entries")
        batch.clear()

    for follower in fanout.follower_ids():
        batch.append(follower)
        if len(batch) >= _PIPELINE_FOLLOWERS:
            flush()
    if batch:
        flush()
    return FeedCheck(checked, lost, duplicated, tuple(examples[:20]))
