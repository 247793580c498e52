"""The manager benchmarks fan out with, in the producer and in every worker.

Followers are derived from the user id, so a worker process needs no shared
state: user ``"bench-7:1000:500000"`` has HIGH followers ``0 … 999`` and LOW
followers ``0 … 499999``. The ids are streamed from a :class:`range`, never
copied into a list, as a database cursor would stream them.
"""

from __future__ import annotations

from collections.abc import Iterable

from feedfan.activity import ObjectId
from feedfan.feeds import TimelineFeed, UserFeed
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority

__all__ = ["APP", "BenchmarkManager", "benchmark_user", "follower_count", "follower_id"]

APP = "benchmarks.manager:BenchmarkManager"
"""The ``app`` setting benchmark workers are started with."""


def benchmark_user(tag: str, *, high: int = 0, low: int = 0) -> str:
    """A user id with ``high`` HIGH and ``low`` LOW followers; ``tag`` keeps ids apart."""
    if ":" in tag:
        raise ValueError(f"tag must not contain ':', got {tag!r}")
    return f"{tag}:{high}:{low}"


def follower_count(user_id: ObjectId, priority: FanoutPriority) -> int:
    """How many followers of ``priority`` the benchmark user ``user_id`` has."""
    _, high, low = str(user_id).rsplit(":", 2)
    return int(high) if priority is FanoutPriority.HIGH else int(low)


def follower_id(index: int) -> int:
    """The id of a benchmark user's ``index``-th follower (of either priority)."""
    return index


class BenchmarkManager(Manager):
    """One fanout feed, the timeline; followers streamed from a range."""

    feed_classes = {"timeline": TimelineFeed}
    user_feed_class = UserFeed

    def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Iterable[ObjectId]]:
        """Followers read from the user id; see :func:`benchmark_user`."""
        return {p: range(follower_count(user_id, p)) for p in FanoutPriority}

    def get_user_follower_count(self, user_id: ObjectId) -> int:
        """The follower count, read from the user id."""
        return sum(follower_count(user_id, p) for p in FanoutPriority)
