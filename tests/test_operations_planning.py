"""Background planning on every backend: one small task from the producer, chunks from a worker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operations_support import (
    BACKEND_IDS,
    BACKENDS,
    SETTLE,
    everyone_has,
    namespace,
    nobody_has,
    open_harness,
    pin,
    settle,
    timeline,
    write_module,
)

from feedfan.activity import ObjectId
from feedfan.dispatch import TaskDispatcher
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.task import Task
from feedfan.testing import Harness, make_user, wait_for

HIGH, LOW = FanoutPriority.HIGH, FanoutPriority.LOW

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module", params=BACKENDS, ids=BACKEND_IDS)
def harness(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    yield from open_harness(request, tmp_path_factory)


def _depths(harness: Harness, manager: object) -> tuple[int | None, int | None]:
    dispatcher = manager.dispatcher  # type: ignore[attr-defined]
    return dispatcher.queue_depth(HIGH), dispatcher.queue_depth(LOW)


def test_background_planning_sends_one_high_task_and_a_worker_sends_the_chunks(
    harness: Harness,
) -> None:
    # Given planning moved to the workers, and no worker running yet
    manager = harness.manager(harness.settings(planning="background"))
    user = make_user(namespace(), 12, 7)
    activity = pin(user)
    # When the user adds an activity
    receipt = manager.add_user_activity(user, activity)
    # Then only the planning task was sent, on the HIGH queue, and the fanout is "planning"
    assert receipt.planned_in_background and receipt.chunks == 0
    wait_for(
        lambda: _depths(harness, manager) == (1, 0),
        timeout=20,
        message=f"queue depths are {_depths(harness, manager)}; expected one HIGH task",
    )
    status = manager.fanout_status(receipt)
    assert status is not None and status.total is None and not status.settled
    # And once a worker runs, it plans and every chunk is written: 3 HIGH and 2 LOW
    harness.start_worker(manager.settings)
    status = settle(harness, manager, receipt)
    assert (status.total, status.done, status.failed) == (5, 5, 0)
    assert everyone_has(manager, user, activity)
    # And a removal planned in the background reaches every follower too
    removal = manager.remove_user_activity(user, activity)
    assert removal.planned_in_background
    assert settle(harness, manager, removal).done == 5
    assert nobody_has(manager, user)


def test_auto_planning_moves_to_a_worker_from_the_threshold(harness: Harness) -> None:
    # Given planning=auto with a threshold of 10 followers
    manager = harness.manager(harness.settings(planning="auto", planning_threshold=10))
    small, large = make_user(namespace(), 3, 2), make_user(namespace(), 8, 4)
    # When a user under the threshold and one at or above it post
    inline = manager.add_user_activity(small, pin(small))
    background = manager.add_user_activity(large, pin(large))
    # Then the first is planned in the producer, the second by a worker
    assert not inline.planned_in_background and inline.chunks == 2
    assert background.planned_in_background and background.chunks == 0
    harness.start_worker(manager.settings)
    assert settle(harness, manager, inline).done == 2
    assert settle(harness, manager, background).done == 3
    assert everyone_has(manager, small, pin(small)) and everyone_has(manager, large, pin(large))


def test_a_large_fanout_is_planned_in_pages_each_on_the_queue_of_its_group(
    harness: Harness,
) -> None:
    # Given chunks of 2 followers and planning tasks of one chunk task each
    settings = harness.settings(planning="background", fanout_chunk_size=2, planning_page=1)
    manager = harness.manager(settings)
    user = make_user(namespace(), 5, 7)
    activity = pin(user)
    # When the user posts and a worker plans, one page after another
    receipt = manager.add_user_activity(user, activity)
    harness.start_worker(settings)
    status = settle(harness, manager, receipt)
    # Then every follower has the activity: 3 HIGH and 4 LOW chunks, planned by 7 tasks
    assert (status.total, status.done, status.failed) == (7, 7, 0)
    assert everyone_has(manager, user, activity)


def test_auto_plans_a_fanout_to_low_followers_only_from_the_low_queue(harness: Harness) -> None:
    # Given planning=auto from 10 followers, and a user whose 12 followers are all LOW
    manager = harness.manager(harness.settings(planning="auto", planning_threshold=10))
    user = make_user(namespace(), 0, 12)
    activity = pin(user)
    # When the user posts, with no worker running yet
    receipt = manager.add_user_activity(user, activity)
    # Then the planning task waits in the LOW queue, not ahead of active users' chunks
    assert receipt.planned_in_background
    wait_for(
        lambda: _depths(harness, manager) == (0, 1),
        timeout=20,
        message=f"queue depths are {_depths(harness, manager)}; expected one LOW task",
    )
    harness.start_worker(manager.settings)
    status = settle(harness, manager, receipt)
    assert status.done == status.total == -(-12 // manager.settings.fanout_chunk_size)
    assert everyone_has(manager, user, activity)


_WORKER_APP = """
    from feedfan.priority import FanoutPriority
    from feedfan.testing.managers import ConformanceManager

    class WorkerSideManager(ConformanceManager):
        '''Followers only the worker's app knows: 3 HIGH and 200 LOW.'''

        def get_user_follower_ids(self, user_id):
            return {
                FanoutPriority.HIGH: [f"{user_id}:w-h{i}" for i in range(3)],
                FanoutPriority.LOW: [f"{user_id}:w-l{i}" for i in range(200)],
            }
    """


def test_a_worker_plans_with_its_own_app_and_stops_before_a_chunk_over_its_limit(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a producer whose manager knows no follower of the user and asks for chunks of 100,
    # and a worker whose app (--app) gives 3 HIGH and 200 LOW followers, under a 1 KiB limit
    settings = harness.settings(planning="background", fanout_chunk_size=100)
    producer = harness.manager(settings)
    path = write_module(tmp_path, "worker_side_app", _WORKER_APP)
    worker_settings = settings.replace(app="worker_side_app:WorkerSideManager", max_task_bytes=1024)
    user = make_user(namespace(), 0, 0)
    activity = pin(user)
    # When the producer adds an activity and the worker plans it
    receipt = producer.add_user_activity(user, activity)
    assert receipt.planned_in_background
    harness.start_worker(worker_settings, env={"PYTHONPATH": str(path)})
    status = settle(harness, producer, receipt)
    # Then the followers came from the worker's app: its 3 HIGH followers have the activity
    assert all(
        timeline(producer, f"{user}:w-h{i}") == [(activity.id, activity.sort_key)] for i in range(3)
    )
    # And the first LOW chunk (about 2 KiB) was never produced: planning stopped there, and the
    # fanout settled with that as its one failure
    assert (status.total, status.done, status.failed) == (2, 1, 1)
    assert not any(timeline(producer, f"{user}:w-l{i}") for i in (0, 99, 199))
    assert producer.dispatcher.queue_depth(LOW) in (0, None)
    # And the planning task is kept, with the reason, for a person to see
    wait_for(
        lambda: any("max_task_bytes" in m.reason for m in producer.dispatcher.failed_messages()),
        timeout=SETTLE,
        message=f"planning task not kept: {producer.dispatcher.failed_messages()}\n"
        f"{harness.worker_logs()}",
    )


_BROKEN_APP = """
    from feedfan.testing.managers import ConformanceManager

    class BrokenFollowersManager(ConformanceManager):
        '''A follower database that is down for good.'''

        def get_user_follower_ids(self, user_id):
            raise RuntimeError("follower database is down")
"""


def test_a_planning_task_that_fails_for_good_counts_as_the_fanouts_failure(
    harness: Harness, tmp_path: Path
) -> None:
    # Given background planning and a worker whose app cannot read followers, with no retries
    settings = harness.settings(planning="background", max_retries=0)
    producer = harness.manager(settings)
    path = write_module(tmp_path, "broken_followers_app", _BROKEN_APP)
    worker_settings = settings.replace(app="broken_followers_app:BrokenFollowersManager")
    user = make_user(namespace(), 3, 2)
    # When the producer adds an activity and the worker tries to plan it
    receipt = producer.add_user_activity(user, pin(user))
    assert receipt.planned_in_background
    harness.start_worker(worker_settings, env={"PYTHONPATH": str(path)})

    # Then the fanout's progress counts the planning as failed and settles, so `wait` returns
    def failed() -> tuple[int | None, int, bool]:
        status = producer.fanout_status(receipt)
        return (status.total, status.failed, status.settled) if status else (None, 0, False)

    wait_for(
        lambda: failed() == (1, 1, True),
        timeout=SETTLE,
        message=f"planning failure not counted: {producer.fanout_status(receipt)}\n"
        f"{harness.worker_logs()}",
    )
    # And the planning task is kept with its reason, for a person to see and replay
    wait_for(
        lambda: any(
            "follower database is down" in m.reason for m in producer.dispatcher.failed_messages()
        ),
        timeout=SETTLE,
        message=f"planning task not kept: {producer.dispatcher.failed_messages()}",
    )


class _Query:
    """Stands for a database query: iterable, with a length that would load every row."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.loaded = False

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        self.loaded = True
        return len(self.ids)


class _Queue(TaskDispatcher):
    """The producer side of a queue, kept in a list (nothing runs)."""

    name = "listed"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[Task] = []

    def publish(self, task: Task, body: str) -> None:
        self.sent.append(task)


def test_auto_planning_counts_only_followers_already_in_memory(feedfan_redis_url: str) -> None:
    query = _Query([f"q{i}" for i in range(50)])

    class Listed(Manager):
        def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Any]:
            if user_id == "query":
                return {HIGH: query}
            return {HIGH: [f"f{i}" for i in range(50)], LOW: range(10)}

    manager = Listed(
        dispatcher="eager",
        redis_url=feedfan_redis_url,
        key_prefix=f"ffauto-{uuid.uuid4().hex[:6]}:",
        planning="auto",
        planning_threshold=40,
        fanout_chunk_size=10,
    )
    manager.dispatcher = _Queue(manager.settings, runner=manager.runner)
    try:
        # Given followers held in memory, their count decides: 60 >= 40 goes to a worker
        assert manager.get_user_follower_count("lists") == 60
        assert manager.add_user_activity("lists", pin("lists")).planned_in_background
        # But a query is not loaded just to be counted: it is planned inline
        assert manager.get_user_follower_count("query") is None
        receipt = manager.add_user_activity("query", pin("query"))
        assert not receipt.planned_in_background and receipt.chunks == 5
        assert not query.loaded
    finally:
        manager.storage.clear()
        manager.close()
