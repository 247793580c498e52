"""`feedfan demo`: a small social network fanning out a burst of pins.

The follower graph is generated from a seed, so every process that imports
this module (the demo, and any worker started with
``--app feedfan.demo:DemoManager``) sees the same graph.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TextIO

from feedfan.activity import Activity, ObjectId
from feedfan.config import Settings
from feedfan.errors import FeedfanError
from feedfan.fanout import FanoutReceipt
from feedfan.feeds import TimelineFeed, UserFeed
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority

__all__ = ["DemoGraph", "DemoManager", "run_demo"]

DEMO_KEY_PREFIX = "feedfan-demo:"


@dataclass(frozen=True)
class DemoGraph:
    """``users`` people; each follows 5-60 others, popular ones more often.

    About a third of users are inactive; their follows of others are LOW
    priority, as in Stream Framework's pinterest example.
    """

    users: int = 3000
    seed: int = 7

    @cached_property
    def _edges(self) -> tuple[dict[int, list[int]], frozenset[int]]:
        rng = random.Random(self.seed)
        people = list(range(1, self.users + 1))
        weights = [1.0 / rank for rank in people]  # Zipf: user 1 is the most followed
        followers: dict[int, set[int]] = {}
        for person in people:
            for target in rng.choices(people, weights, k=rng.randint(5, 60)):
                if target != person:
                    followers.setdefault(target, set()).add(person)
        inactive = frozenset(p for p in people if rng.random() < 0.33)
        return {t: sorted(f) for t, f in followers.items()}, inactive

    def followers(self, user_id: int) -> tuple[list[int], list[int]]:
        """The (active, inactive) followers of ``user_id``."""
        edges, inactive = self._edges
        everyone = edges.get(user_id, [])
        return [f for f in everyone if f not in inactive], [f for f in everyone if f in inactive]

    def follower_count(self, user_id: int) -> int:
        """How many people follow ``user_id``."""
        return len(self._edges[0].get(user_id, []))


class DemoManager(Manager):
    """The seed's ``MyStreamManager``, over the generated graph."""

    feed_classes = {"timeline": TimelineFeed}
    user_feed_class = UserFeed
    graph = DemoGraph(users=int(os.environ.get("FEEDFAN_DEMO_USERS", "3000")))

    def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Iterable[ObjectId]]:
        """Active followers are HIGH priority, inactive ones LOW."""
        active, inactive = self.graph.followers(int(user_id))
        return {FanoutPriority.HIGH: active, FanoutPriority.LOW: inactive}


def _table(headers: list[str], rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        first, *rest = zip(cells, widths, strict=True)
        return "  ".join([first[0].ljust(first[1]), *(c.rjust(w) for c, w in rest)]) + "\n"

    out.write(line(headers) + "  ".join("-" * w for w in widths) + "\n")
    for row in rows:
        out.write(line(row))


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env(), "FEEDFAN_APP": "feedfan.demo:DemoManager"}
    argv = [sys.executable, "-m", "feedfan", "worker", "--priority", "all"]
    return subprocess.Popen(argv, env=env)


def run_demo(
    settings: Settings,
    *,
    activities: int = 300,
    seed: int = 11,
    start_worker: bool = False,
    timeout: float = 300.0,
    out: TextIO = sys.stdout,
) -> int:
    """Fan out ``activities`` pins by random (mostly popular) users; print feeds and timings."""
    from feedfan._progress import Progress

    manager = DemoManager(settings=settings)
    graph = manager.graph
    worker = None
    try:
        if manager.storage.shared:
            manager.storage.clear()
        dispatcher = manager.dispatcher
        out.write(
            f"feedfan demo: {graph.users:,} users, {activities:,} pins; dispatcher "
            f"{dispatcher.name!r} ({dispatcher.delivery.value}), storage "
            f"{settings.effective_storage!r}, fanout_chunk_size {settings.fanout_chunk_size}\n"
        )
        if not dispatcher.runs_in_process:
            if start_worker:
                worker = _start_worker(settings)
            else:
                out.write(
                    "start a worker in another terminal with the same settings:\n"
                    "  feedfan worker --app feedfan.demo:DemoManager --priority all\n"
                )
        rng = random.Random(seed)
        people = list(range(1, graph.users + 1))
        weights = [1.0 / rank**0.5 for rank in people]
        start = time.perf_counter()
        receipts: list[FanoutReceipt] = []
        with Progress("enqueue fanouts", total=activities) as bar:
            for number in range(activities):
                author = rng.choices(people, weights)[0]
                pin = Activity(
                    actor=author,
                    verb="pin",
                    object=f"pin:{number}",
                    extra={"board": f"board-{author % 17}"},
                )
                receipts.append(manager.add_user_activity(author, pin))
                bar.advance()
        enqueued = time.perf_counter() - start
        total_chunks = sum(r.chunks for r in receipts)
        with Progress("write feeds (chunks)", total=total_chunks) as bar:
            deadline = time.monotonic() + timeout
            while True:
                statuses = [manager.fanout_status(r) for r in receipts]
                done = sum(s.done + s.failed for s in statuses if s is not None)
                bar.update(done)
                if done >= total_chunks:
                    break
                if time.monotonic() > deadline:
                    raise FeedfanError(
                        f"the fanout did not finish within {timeout:g} s; are workers running?"
                    )
                time.sleep(0.02)
        settled = time.perf_counter() - start
        failed = sum(s.failed for s in statuses if s is not None)
        followers = sum(r.followers for r in receipts)
        writes = followers * len(manager.registered_feeds)

        star = max(people, key=graph.follower_count)
        reader = graph.followers(star)[0][0] if graph.followers(star)[0] else 1
        out.write(
            f"\nnewest in the timeline of user {reader} (follows the most-followed user, {star}):\n"
        )
        for activity in manager.get_feed(reader)[:5]:
            out.write(
                f"  user {activity.actor:<5} {activity.verb} {activity.object:<9} "
                f"at {activity.time:%H:%M:%S.%f}\n"
            )
        out.write("\n")
        _table(
            ["measure", "value"],
            [
                ["pins fanned out", f"{activities:,}"],
                ["followers reached", f"{followers:,}"],
                [
                    "chunk tasks (HIGH / LOW)",
                    f"{sum(r.high_chunks for r in receipts):,} / "
                    f"{sum(r.low_chunks for r in receipts):,}",
                ],
                ["failed chunks", f"{failed:,}"],
                ["time in add_user_activity", f"{enqueued:.3f} s"],
                ["time until every feed is written", f"{settled:.3f} s"],
                ["feed writes per second", f"{writes / settled:,.0f}" if settled else "-"],
            ],
            out,
        )
        return 0 if failed == 0 else 1
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        manager.close()
