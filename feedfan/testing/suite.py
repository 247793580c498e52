"""The conformance suite: one set of tests every dispatcher must pass.

An adapter's test file is a few lines::

    from feedfan.testing import DispatcherConformance

    class TestRQ(DispatcherConformance):
        dispatcher = "rq"
        broker = "redis"

with ``pytest_plugins = ("feedfan.testing.plugin",)`` in a ``conftest.py``.
What a dispatcher cannot do it declares in its capability flags
(``has_queues``, ``redelivers_lost_tasks``, ``runs_in_process``); those
tests are skipped with the reason, never passed silently.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import ClassVar

import pytest

from feedfan.activity import Activity
from feedfan.errors import ConfigurationError, FeedfanError
from feedfan.fanout import FanoutReceipt, plan_chunks
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.storage.base import FanoutStatus
from feedfan.storage.redis import RedisStorage
from feedfan.testing.harness import Harness, wait_for
from feedfan.testing.managers import (
    CHUNK_DELAY_VARIABLE,
    MyStreamManager,
    follower_ids,
    make_user,
    started_chunks,
)

__all__ = ["DispatcherConformance"]

_SHAPES = ("0", "1", "k-1", "k", "k+1", "10k+3")


def _count(shape: str, k: int) -> int:
    return {"0": 0, "1": 1, "k-1": k - 1, "k": k, "k+1": k + 1, "10k+3": 10 * k + 3}[shape]


def _namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _pin(user: str, number: int = 0, *, seconds: int = 0) -> Activity:
    when = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)
    return Activity(actor=user, verb="pin", object=f"pin-{number}", time=when)


class _Pickled:
    """Unpickling this would create a directory: proof that code ran from a payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.makedirs, (str(self.marker),))


class DispatcherConformance:
    """Mixin of conformance tests; subclass it and set ``dispatcher`` and ``broker``."""

    dispatcher: ClassVar[str] = ""
    """The dispatcher under test, as written in configuration."""

    broker: ClassVar[str] = "none"
    """``"redis"``, ``"amqp"``, or ``"none"`` (in-process dispatchers, in-memory feeds)."""

    chunk_size: ClassVar[int] = 5
    """``k``: the fanout_chunk_size of the suite's fanouts."""

    settle_timeout: ClassVar[float] = 90.0
    """Seconds a fanout may take to settle, worker start-up included."""

    kill_slack: ClassVar[float] = 45.0
    """Seconds allowed beyond the declared redelivery bound after a SIGKILL."""

    # Fixtures ------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def harness(
        cls, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Harness]:
        """The dispatcher under test with its servers; adapters may override it."""
        if not cls.dispatcher:
            raise NotImplementedError("set `dispatcher` on the conformance test class")
        redis_url = broker_url = None
        if cls.broker in ("redis", "amqp"):
            redis_url = request.getfixturevalue("feedfan_redis_url")
        if cls.broker == "amqp":
            broker_url = request.getfixturevalue("feedfan_amqp_url")
        harness = Harness(
            cls.dispatcher,
            log_dir=tmp_path_factory.mktemp(f"workers-{cls.dispatcher}"),
            redis_url=redis_url,
            broker_url=broker_url,
            chunk_size=cls.chunk_size,
        )
        try:
            yield harness
        finally:
            harness.close()

    @pytest.fixture(scope="class")
    @classmethod
    def shared(cls, harness: Harness) -> Manager:
        """A manager with one worker serving both queues, shared by a class's simple tests."""
        manager = harness.manager(harness.settings())
        harness.start_worker(manager.settings, priority="all")
        return manager

    # Helpers ---------------------------------------------------------------

    def _settle(
        self,
        harness: Harness,
        manager: Manager,
        receipt: FanoutReceipt,
        timeout: float | None = None,
    ) -> FanoutStatus:
        try:
            return manager.wait(receipt, timeout=timeout or self.settle_timeout)
        except FeedfanError as e:
            raise AssertionError(f"{e}\n{harness.worker_logs()}") from None

    @staticmethod
    def _timeline(manager: Manager, user: str, feed: str = "timeline") -> list[tuple[str, int]]:
        return manager.get_feed(user, feed).entries(limit=100)

    def _require(self, harness: Harness, flag: str, reason: str) -> None:
        if not getattr(harness.probe, flag):
            pytest.skip(f"{harness.dispatcher} declares {flag}=False: {reason}")

    def _require_workers(self, harness: Harness) -> None:
        if harness.in_process:
            pytest.skip(
                f"{harness.dispatcher} runs chunks inside the producer's process; "
                "it has no worker process"
            )

    # Fanout ------------------------------------------------------------------

    @pytest.mark.parametrize("shape", _SHAPES)
    def test_every_follower_of_both_priorities_gets_the_activity_exactly_once(
        self, harness: Harness, shared: Manager, shape: str
    ) -> None:
        # Given a user with n HIGH and n LOW followers, for chunk size k
        k = self.chunk_size
        n = _count(shape, k)
        user = make_user(_namespace(), n, n)
        pin = _pin(user)
        # When the user adds an activity
        receipt = shared.add_user_activity(user, pin)
        status = self._settle(harness, shared, receipt)
        # Then every follower's feeds hold it once, in ceil(n/k) chunks per priority
        assert receipt.high_chunks == receipt.low_chunks == math.ceil(n / k)
        assert (status.total, status.done, status.failed) == (receipt.chunks, receipt.chunks, 0)
        assert receipt.followers == 2 * n
        expected = [(pin.id, pin.sort_key)]
        for priority in FanoutPriority:
            for follower in follower_ids(user, priority):
                assert self._timeline(shared, follower) == expected, follower
                assert self._timeline(shared, follower, "short") == expected, follower
        assert shared.get_user_feed(user).entries() == expected
        namespace = user.rsplit(":", 2)[0]
        assert self._timeline(shared, f"{namespace}:h{n}") == []

    def test_chunks_wait_in_the_queue_of_their_priority(self, harness: Harness) -> None:
        self._require(
            harness, "has_queues", "it runs each chunk inline, so nothing ever waits in a queue"
        )
        k = self.chunk_size
        manager = harness.manager(harness.settings())
        dispatcher = manager.dispatcher
        user = make_user(_namespace(), 2 * k + 1, k)
        with harness.held(manager):
            # Given no worker serves the queues, when a fanout is sent
            receipt = manager.add_user_activity(user, _pin(user))
            # Then 3 HIGH chunks wait in the HIGH queue and 1 LOW chunk in the LOW one
            assert (receipt.high_chunks, receipt.low_chunks) == (3, 1)
            wait_for(
                lambda: (
                    (
                        dispatcher.queue_depth(FanoutPriority.HIGH),
                        dispatcher.queue_depth(FanoutPriority.LOW),
                    )
                    == (3, 1)
                ),
                timeout=10,
                message=f"queue depths are {dispatcher.queue_depth(FanoutPriority.HIGH)}, "
                f"{dispatcher.queue_depth(FanoutPriority.LOW)}; expected 3 HIGH and 1 LOW",
            )
            assert self._timeline(manager, next(follower_ids(user, FanoutPriority.HIGH))) == []

    def test_a_worker_for_high_only_leaves_low_untouched(self, harness: Harness) -> None:
        self._require_workers(harness)
        k = self.chunk_size
        manager = harness.manager(harness.settings())
        user = make_user(_namespace(), 2 * k, k + 1)
        pin = _pin(user)
        # Given a worker serving only HIGH
        harness.start_worker(manager.settings, priority="high")
        # When a fanout of 2 HIGH and 2 LOW chunks is sent
        receipt = manager.add_user_activity(user, pin)
        wait_for(
            lambda: (s := manager.fanout_status(receipt)) is not None and s.done >= 2,
            timeout=self.settle_timeout,
            message=f"HIGH chunks not written\n{harness.worker_logs()}",
        )
        time.sleep(1.0)
        # Then HIGH followers have it, LOW followers do not, and LOW chunks still wait
        status = manager.fanout_status(receipt)
        assert status is not None and status.done == 2
        assert all(self._timeline(manager, f) for f in follower_ids(user, FanoutPriority.HIGH))
        assert not any(self._timeline(manager, f) for f in follower_ids(user, FanoutPriority.LOW))
        depth = manager.dispatcher.queue_depth(FanoutPriority.LOW)
        assert depth in (None, 2)
        # And a LOW worker finishes the job
        harness.start_worker(manager.settings, priority="low")
        assert self._settle(harness, manager, receipt).done == 4
        assert all(self._timeline(manager, f) for f in follower_ids(user, FanoutPriority.LOW))

    def test_the_worker_command_lists_high_before_low(self, harness: Harness) -> None:
        manager = harness.manager(harness.settings())
        dispatcher = manager.dispatcher
        if dispatcher.runs_in_process:
            with pytest.raises(ConfigurationError, match="no separate worker"):
                dispatcher.worker_command(list(FanoutPriority))
            return
        both = dispatcher.worker_command([FanoutPriority.LOW, FanoutPriority.HIGH]).shell()
        high, low = manager.settings.queue_high, manager.settings.queue_low
        assert high in both and low in both and both.index(high) < both.index(low)
        only_low = dispatcher.worker_command([FanoutPriority.LOW]).shell()
        assert low in only_low and high not in only_low

    # Other operations ----------------------------------------------------------

    def test_removal_reaches_every_follower(self, harness: Harness, shared: Manager) -> None:
        k = self.chunk_size
        user = make_user(_namespace(), k + 2, 2)
        pin, other = _pin(user, 1), _pin(user, 2, seconds=5)
        for activity in (pin, other):
            self._settle(harness, shared, shared.add_user_activity(user, activity))
        # When one activity is removed
        self._settle(harness, shared, shared.remove_user_activity(user, pin))
        # Then only the other remains, in the author's feed and every follower's
        expected = [(other.id, other.sort_key)]
        assert shared.get_user_feed(user).entries() == expected
        for priority in FanoutPriority:
            for follower in follower_ids(user, priority):
                assert self._timeline(shared, follower) == expected

    def test_follow_copies_activities_and_unfollow_removes_them(
        self, harness: Harness, shared: Manager
    ) -> None:
        namespace = _namespace()
        author, reader = make_user(namespace, 0, 0), f"{namespace}:reader"
        pins = [_pin(author, i, seconds=i) for i in range(4)]
        for pin in pins:
            self._settle(harness, shared, shared.add_user_activity(author, pin))
        # When the reader follows the author
        self._settle(harness, shared, shared.follow_user(reader, author))
        # Then the reader's feeds hold the author's activities, newest first, trimmed
        newest_first = [(p.id, p.sort_key) for p in reversed(pins)]
        assert self._timeline(shared, reader) == newest_first
        assert self._timeline(shared, reader, "short") == newest_first[:3]
        # And after unfollowing they are gone
        self._settle(harness, shared, shared.unfollow_user(reader, author))
        assert self._timeline(shared, reader) == []

    def test_follow_many_users_merges_their_activities(
        self, harness: Harness, shared: Manager
    ) -> None:
        namespace = _namespace()
        first, second, reader = (make_user(f"{namespace}{i}", 0, 0) for i in range(3))
        pins = [_pin(first, 0, seconds=1), _pin(second, 1, seconds=2), _pin(first, 2, seconds=3)]
        for pin in pins:
            self._settle(harness, shared, shared.add_user_activity(str(pin.actor), pin))
        self._settle(harness, shared, shared.follow_many_users(reader, [first, second]))
        assert self._timeline(shared, reader) == [(p.id, p.sort_key) for p in reversed(pins)]

    def test_feeds_are_trimmed_to_their_max_length(self, harness: Harness, shared: Manager) -> None:
        user = make_user(_namespace(), 1, 1)
        pins = [_pin(user, i, seconds=i) for i in range(5)]
        for pin in pins:
            self._settle(harness, shared, shared.add_user_activity(user, pin))
        for priority in FanoutPriority:
            follower = next(follower_ids(user, priority))
            assert self._timeline(shared, follower, "short") == [
                (p.id, p.sort_key) for p in reversed(pins[2:])
            ]
            assert len(self._timeline(shared, follower)) == 5

    def test_a_chunk_delivered_twice_changes_nothing(
        self, harness: Harness, shared: Manager
    ) -> None:
        k = self.chunk_size
        user = make_user(_namespace(), k * 2, k)
        pin = _pin(user)
        receipt = shared.add_user_activity(user, pin)
        first = self._settle(harness, shared, receipt)
        everyone = [f for p in FanoutPriority for f in follower_ids(user, p)]
        before = {
            f: (self._timeline(shared, f), self._timeline(shared, f, "short")) for f in everyone
        }
        # When every chunk is delivered again (progress reset so we see them run)
        self._forget_progress(shared, receipt.fanout_id)
        chunks = plan_chunks(
            op="add",
            feeds=tuple(shared.registered_feeds),
            entries=[(pin.id, pin.sort_key)],
            followers=shared.get_user_follower_ids(user),
            chunk_size=shared.settings.fanout_chunk_size,
            fanout_id=receipt.fanout_id,
        )
        assert shared.dispatcher.enqueue_many(chunks) == receipt.chunks
        shared.storage.end_planning(receipt.fanout_id, receipt.chunks)
        second = self._settle(harness, shared, receipt)
        # Then the feeds are exactly as after the first delivery
        after = {
            f: (self._timeline(shared, f), self._timeline(shared, f, "short")) for f in everyone
        }
        assert after == before
        assert (second.done, second.failed) == (first.done, 0)

    @staticmethod
    def _forget_progress(manager: Manager, fanout_id: str) -> None:
        storage = manager.storage
        if isinstance(storage, RedisStorage):
            storage.client.delete(f"{storage.key_prefix}fanout:{fanout_id}:done")
        else:
            storage._done.pop(fanout_id, None)  # type: ignore[attr-defined]

    # Bad input -------------------------------------------------------------------

    def test_a_malformed_task_is_kept_and_the_worker_goes_on(
        self, harness: Harness, shared: Manager, tmp_path: Path
    ) -> None:
        dispatcher = shared.dispatcher
        k = self.chunk_size
        marker = tmp_path / "code-ran-from-a-payload"
        good = make_user(_namespace(), 1, 1)
        valid_chunk = next(
            plan_chunks(
                op="add",
                feeds=("timeline",),
                entries=[(_pin(good).id, _pin(good).sort_key)],
                followers={FanoutPriority.HIGH: ["x"]},
                chunk_size=k,
                fanout_id="0" * 24,
            )
        ).to_json()
        bodies = [
            b"this is not json",
            b'{"v": 1, "kind": "chunk", "op": "add"',
            valid_chunk.replace('"v":1', '"v":99').encode(),
            valid_chunk.replace('"idx":0', '"idx":"zero"').encode(),
            valid_chunk.replace('"timeline"', '"not-registered"').encode(),
            valid_chunk.replace('"op":"add"', '"op":"drop_table"').encode(),
            pickle.dumps(_Pickled(marker)),
        ]
        before = len(dispatcher.failed_messages(limit=10_000))
        # When malformed tasks are put straight on both queues
        for number, body in enumerate(bodies):
            dispatcher.push_raw(list(FanoutPriority)[number % 2], body)
        # Then valid work behind them completes
        user = make_user(_namespace(), k + 1, k + 1)
        status = self._settle(harness, shared, shared.add_user_activity(user, _pin(user)))
        assert status.failed == 0
        # And each malformed one is kept, with its reason, and ran no code
        wait_for(
            lambda: len(dispatcher.failed_messages(limit=10_000)) >= before + len(bodies),
            timeout=30,
            message=f"expected {len(bodies)} more kept messages, have "
            f"{len(dispatcher.failed_messages(limit=10_000)) - before}\n{harness.worker_logs()}",
        )
        kept = dispatcher.failed_messages(limit=10_000)[: len(bodies)]
        assert all(message.reason for message in kept)
        assert not marker.exists(), "a pickled payload was unpickled"
        assert all(worker.alive() for worker in harness.workers if worker.priority == "all")

    # Crashes ---------------------------------------------------------------------

    def _kill_drill(self, harness: Harness, *, whole_worker: bool) -> None:
        self._require_workers(harness)
        self._require(
            harness, "redelivers_lost_tasks", "it does not redeliver a killed worker's tasks"
        )
        k = self.chunk_size
        manager = harness.manager(harness.settings())
        storage = manager.storage
        assert isinstance(storage, RedisStorage)
        worker = harness.start_worker(manager.settings, env={CHUNK_DELAY_VARIABLE: "0.7"})
        assert worker is not None
        user = make_user(_namespace(), k * 6, k * 4)
        receipt = manager.add_user_activity(user, _pin(user))
        # Given a worker in the middle of a chunk
        wait_for(
            lambda: bool(started_chunks(storage)),
            timeout=self.settle_timeout,
            message=f"no chunk started\n{harness.worker_logs()}",
        )
        killed_at = time.monotonic()
        # When it is killed with SIGKILL
        if whole_worker:
            worker.kill()
        else:
            pid = int(started_chunks(storage)[-1]["pid"])  # type: ignore[call-overload]
            os.kill(pid, signal.SIGKILL)
            # A library whose main process gives up when a child dies needs a moment to exit;
            # one that replaces the child keeps running. Tell the two apart by waiting.
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not worker.alive(), timeout=5, message="worker still alive")
        if not worker.alive():
            harness.start_worker(manager.settings)
        # Then the fanout settles within the declared bound, every follower once
        bound = manager.dispatcher.redelivery_bound()
        assert bound is not None, "a dispatcher that redelivers must declare its bound"
        status = self._settle(harness, manager, receipt, timeout=bound + self.kill_slack)
        assert (status.done, status.failed) == (receipt.chunks, 0)
        assert time.monotonic() - killed_at <= bound + self.kill_slack
        expected = [(receipt.activity_ids[0], int(receipt.activity_ids[0][:16]))]
        for priority in FanoutPriority:
            for follower in follower_ids(user, priority):
                assert self._timeline(manager, follower) == expected, follower

    def test_a_killed_worker_loses_no_follower_and_duplicates_none(self, harness: Harness) -> None:
        self._kill_drill(harness, whole_worker=True)

    def test_a_killed_task_process_loses_no_follower_and_duplicates_none(
        self, harness: Harness
    ) -> None:
        self._kill_drill(harness, whole_worker=False)

    # Configuration -------------------------------------------------------------

    def test_the_same_manager_class_runs_by_configuration_alone(
        self, harness: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        settings = harness.settings()
        harness.start_worker(settings)
        # Given only environment variables name the queue (no config file)
        monkeypatch.chdir(tmp_path)
        for name in [v for v in os.environ if v.startswith("FEEDFAN_")]:
            monkeypatch.delenv(name)
        for name, value in settings.to_env().items():
            monkeypatch.setenv(name, value)
        # When the user's manager is built with no arguments
        manager = MyStreamManager()
        harness.managers.append(manager)
        assert manager.dispatcher.name == harness.dispatcher_class.name
        user = make_user(_namespace(), 3, 2)
        pin = _pin(user)
        status = self._settle(harness, manager, manager.add_user_activity(user, pin))
        # Then the fanout runs on the configured queue
        assert status.done == status.total == 2
        assert self._timeline(manager, next(follower_ids(user, FanoutPriority.LOW))) == [
            (pin.id, pin.sort_key)
        ]
