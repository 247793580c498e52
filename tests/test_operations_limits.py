"""Limits on chunk size, task size and `extra` size hold on every path, with clear errors."""

from __future__ import annotations

import tracemalloc
import uuid
from collections.abc import Iterable, Sequence

import pytest

from feedfan import (
    Activity,
    ConfigurationError,
    DispatchError,
    FanoutPriority,
    LimitExceededError,
    Manager,
)
from feedfan.activity import ObjectId
from feedfan.dispatch import TaskDispatcher
from feedfan.task import ChunkTask, PlanTask, Task, make_fanout_id

HIGH, LOW = FanoutPriority.HIGH, FanoutPriority.LOW


class Recording(TaskDispatcher):
    """A queue in a list: what was sent, and how big; runs nothing (like a real broker)."""

    name = "recording"

    def __init__(self, *args: object, keep: bool = True, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.keep = keep
        self.sent: list[tuple[Task, int]] = []
        self.count = 0

    def publish(self, task: Task, body: str) -> None:
        self.count += 1
        if self.keep:
            self.sent.append((task, len(body.encode())))


class ShortThenLong(Manager):
    """HIGH followers with short ids, LOW followers with ids of 200 characters."""

    def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Sequence[str]]:
        return {HIGH: ["a", "b"], LOW: [f"{'x' * 196}{i:04d}" for i in range(40)]}


class Millions(Manager):
    """A million followers, streamed."""

    def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Iterable[str]]:
        return {HIGH: (f"fan-{i}" for i in range(1_000_000))}


def _pin(user: object, number: int = 0) -> Activity:
    return Activity(actor=user, verb="pin", object=f"pin-{number}")  # type: ignore[arg-type]


def test_a_chunk_size_above_max_chunk_size_is_refused_where_it_is_set() -> None:
    class Huge(Manager):
        fanout_chunk_size = 20_000

    with pytest.raises(ConfigurationError) as raised:
        Huge(dispatcher="eager")
    message = str(raised.value)
    assert "fanout_chunk_size=20000 (from " in message and "Huge.fanout_chunk_size)" in message
    assert "is above max_chunk_size=10000 (from default)" in message
    assert "lower the chunk size or raise the limit" in message


def test_a_task_over_max_task_bytes_stops_the_fanout_there_and_says_what_was_sent() -> None:
    # Given followers whose first chunk fits in 4 KiB and whose second does not
    manager = ShortThenLong(dispatcher="eager", fanout_chunk_size=20, max_task_bytes=4096)
    activity = _pin(1)
    # When the activity is added
    with pytest.raises(LimitExceededError) as raised:
        manager.add_user_activity(1, activity)
    # Then the producer hears which task, its size, the limit and how many went before it
    error = raised.value
    assert "task feedfan-" in str(error) and "-low-0 is" in str(error)
    assert "above max_task_bytes=4,096" in str(error)
    assert "(1 task(s) were accepted before this; none after it was sent)" in str(error)
    assert error.accepted == 1
    # And the chunk before it ran, nothing after it did, and the fanout settled with one failure
    assert manager.get_feed("a").entries() == [(activity.id, activity.sort_key)]
    assert manager.get_feed(f"{'x' * 196}0000").entries() == []
    status = manager.fanout_status(make_fanout_id("add", 1, [activity.id], ("timeline",)))
    assert status is not None and (status.total, status.done, status.failed) == (2, 1, 1)


def test_follow_tasks_are_cut_to_fit_max_task_bytes() -> None:
    # Given two authors with 40 activities each and a 1 KiB task limit
    class Nobody(Manager):
        def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, list[str]]:
            return {}

    manager = Nobody(dispatcher="eager", max_task_bytes=1024)
    sizes: list[int] = []
    publish = manager.dispatcher.publish

    def measured(task: Task, body: str) -> None:
        sizes.append(len(body.encode()))
        publish(task, body)

    manager.dispatcher.publish = measured  # type: ignore[method-assign]
    for author in ("ann", "bob"):
        for number in range(40):
            manager.add_user_activity(author, _pin(author, number))
    sizes.clear()
    # When a reader follows both
    receipt = manager.follow_many_users("reader", ["ann", "bob"])
    # Then the 80 entries travel in several tasks, each within the limit, and all arrive
    assert receipt.chunks == len(sizes) > 1
    assert max(sizes) <= 1024
    assert len(manager.get_feed("reader").entries(limit=1000)) == 80
    status = manager.fanout_status(receipt)
    assert status is not None and status.complete


@pytest.mark.broker
def test_an_extra_over_the_limit_is_refused_before_anything_is_stored_or_sent(
    feedfan_redis_url: str,
) -> None:
    # Given background planning through a real queue's producer side
    settings_values = {
        "redis_url": feedfan_redis_url,
        "key_prefix": f"fflim-{uuid.uuid4().hex[:6]}:",
        "max_extra_bytes": 100,
        "planning": "background",
    }
    manager = Manager(dispatcher="eager", **settings_values)
    recording = Recording(manager.settings, runner=manager.runner)
    manager.dispatcher = recording
    try:
        activity = Activity(actor=1, verb="pin", object=1, extra={"blob": "y" * 500})
        # When an activity with a 500-byte extra is added
        with pytest.raises(LimitExceededError, match=r"above max_extra_bytes=100 \(from argument"):
            manager.add_user_activity(1, activity)
        # Then nothing was stored, written or sent: no planning task either
        assert recording.count == 0
        assert manager.storage.get_activities([activity.id]) == {}
        assert manager.get_user_feed(1).entries() == []
    finally:
        manager.storage.clear()
        manager.close()


def _plan(user: ObjectId, chunk_size: int) -> PlanTask:
    activity = _pin(user)
    fanout_id = make_fanout_id("add", user, [activity.id], ("timeline",))
    entries = ((activity.id, activity.sort_key),)
    return PlanTask("add", ("timeline",), entries, user, fanout_id, HIGH, chunk_size)


def test_a_worker_never_cuts_chunks_above_its_own_max_chunk_size() -> None:
    # Given a worker allowing 50 followers per chunk, and a producer that asked for 500
    worker = Millions(dispatcher="eager", fanout_chunk_size=50, max_chunk_size=50)
    recording = Recording(worker.settings, runner=worker.runner)
    worker.dispatcher = recording
    # When the worker plans
    worker.plan_in_worker(_plan("star", 500))
    # Then no chunk it sent holds more than 50 followers
    chunks = [task for task, _ in recording.sent if isinstance(task, ChunkTask)]
    assert len(chunks) == 1_000_000 // 50
    assert max(len(task.followers) for task in chunks) == 50


def test_a_worker_plans_a_million_followers_in_bounded_memory() -> None:
    # Given a worker whose queue keeps nothing in this process
    worker = Millions(dispatcher="eager", fanout_chunk_size=1000)
    counting = Recording(worker.settings, runner=worker.runner, keep=False)
    worker.dispatcher = counting
    # When it plans a fanout to a million followers
    tracemalloc.start()
    receipt = worker.plan_in_worker(_plan("star", 1000))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # Then it sent 1,000 chunks holding far less than the list of ids at any time
    assert counting.count == receipt.chunks == 1000
    assert peak < 25_000_000, f"peak {peak:,} bytes (the 1M ids as a list are over 60 MB)"


class SmallBatches(Recording):
    """Five tasks a batch, so a fanout of 25 chunks takes five batches."""

    publish_batch_size = 5


class CursorDies(Manager):
    """2,500 followers from a database cursor that loses its connection after 1,250."""

    def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Iterable[str]]:
        def rows() -> Iterable[str]:
            for i in range(2_500):
                if i == 1_250:
                    raise ConnectionError("server closed the connection unexpectedly")
                yield f"fan-{i}"

        return {HIGH: rows()}


def test_a_follower_source_failing_midway_says_how_many_chunks_were_accepted() -> None:
    # Given a queue taking 5 tasks a batch, and followers that fail after 12 chunks of 100
    manager = CursorDies(dispatcher="eager", planning="inline")
    dispatcher = SmallBatches(manager.settings, runner=manager.runner)
    manager.dispatcher = dispatcher
    # When an activity is added
    with pytest.raises(DispatchError) as raised:
        manager.add_user_activity(1, _pin(1))
    # Then the error names the cause and counts exactly the tasks the queue took
    error = raised.value
    assert "server closed the connection unexpectedly" in str(error)
    assert error.accepted == dispatcher.count == 12
    assert isinstance(error.__cause__, DispatchError)
    assert isinstance(error.__cause__.__cause__, ConnectionError)


def test_a_planning_task_that_fails_in_a_worker_settles_its_fanout() -> None:
    # Given a worker whose follower source fails after 12 chunks
    manager = CursorDies(dispatcher="eager", planning="inline")
    dispatcher = SmallBatches(manager.settings, runner=manager.runner)
    manager.dispatcher = dispatcher
    fanout_id = make_fanout_id("add", 1, ["a"], ("timeline",))
    plan = PlanTask("add", ("timeline",), (("a" * 26, 1),), 1, fanout_id, HIGH, 100)
    # When it runs the planning task
    with pytest.raises(DispatchError):
        manager.plan_in_worker(plan)
    # Then the fanout has the 12 chunks sent and the failed planning: it settles when they run
    status = manager.fanout_status(fanout_id)
    assert status is not None
    assert (status.total, status.done, status.failed) == (13, 0, 1)
    for task, _size in dispatcher.sent:
        assert isinstance(task, ChunkTask)
        manager.run_chunk(task)
    status = manager.fanout_status(fanout_id)
    assert status is not None and status.settled and (status.done, status.failed) == (12, 1)


def test_a_task_given_up_is_kept_before_its_failure_is_counted() -> None:
    # Given a manager whose storage notes the order of what a worker records
    manager = Manager(dispatcher="eager")
    calls: list[str] = []
    storage = manager.storage
    keep, mark = storage.keep_rejected, storage.mark_chunk_failed

    def keep_rejected(queue: str, body: str, reason: str) -> None:
        calls.append("kept")
        keep(queue, body, reason)

    def mark_chunk_failed(fanout_id: str, chunk_key: str, reason: str) -> None:
        calls.append("counted")
        mark(fanout_id, chunk_key, reason)

    storage.keep_rejected = keep_rejected  # type: ignore[method-assign]
    storage.mark_chunk_failed = mark_chunk_failed  # type: ignore[method-assign]
    [chunk] = _one_chunk(manager)
    # When a worker gives the chunk up
    manager.runner.give_up(chunk.to_json(), queue="feedfan.high", reason="disk full")
    # Then it is kept before the fanout's progress says it failed: whoever sees the
    # failure in `feedfan status` can find the task to replay
    assert calls == ["kept", "counted"]


def _one_chunk(manager: Manager) -> list[ChunkTask]:
    pin = _pin(1)
    return [
        ChunkTask(
            op="add",
            feeds=tuple(manager.registered_feeds),
            entries=((pin.id, pin.sort_key),),
            followers=("a", "b"),
            fanout_id=make_fanout_id("add", 1, [pin.id], ("timeline",)),
            priority=HIGH,
            index=0,
        )
    ]
