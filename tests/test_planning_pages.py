"""Background planning in pages: each planning task sends a few chunk tasks, then passes on.

A worker that plans a large fanout in one task holds its slot for seconds, and
a HIGH fanout queued behind it waits that long. Here every planning task sends
at most ``planning_page`` chunk tasks of one priority group, then the task for
the next page, which goes to the queue of the group it plans.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator, Sequence
from typing import Any, overload

import pytest

from feedfan.activity import Activity, ObjectId
from feedfan.dispatch import TaskDispatcher
from feedfan.errors import DispatchError, PayloadError, StorageError
from feedfan.fanout import FanoutReceipt
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.storage.memory import MemoryStorage
from feedfan.task import ChunkTask, PlanTask, Task, decode_task

HIGH, LOW = FanoutPriority.HIGH, FanoutPriority.LOW


class _Queue(TaskDispatcher):
    """The producer side of a queue, kept in a list; nothing runs until a test says so."""

    name = "listed"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[Task] = []
        self.batches: list[list[Task]] = []  # what each call sent, in order
        self.fail_at: int | None = None  # the task, counted from 1 over all calls, that fails

    def publish_many(self, items: Any) -> None:
        self.batches.append([])
        super().publish_many(items)

    def enqueue(self, task: Task) -> None:
        self.batches.append([])
        super().enqueue(task)

    def publish(self, task: Task, body: str) -> None:
        if self.fail_at is not None and len(self.sent) + 1 == self.fail_at:
            self.fail_at = None
            raise DispatchError("broker went away", accepted=0)
        # What a worker would read: the task as decoded from its JSON
        self.sent.append(decode_task(body))
        self.batches[-1].append(self.sent[-1])


class _Paged(Sequence[str]):
    """Followers behind a sequence class of one's own: a slice reads just that slice."""

    def __init__(self, ids: list[str], *, broken: bool = False, claimed: int = 0) -> None:
        self.ids = ids
        self.broken = broken  # the follower database is down
        self.claimed = claimed  # a COUNT that disagrees with the rows (followers left)

    def __len__(self) -> int:
        return self.claimed or len(self.ids)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if self.broken:
            raise RuntimeError("follower database is down")
        return self.ids[index]


class _Stream:
    """Followers from a database cursor: iterable once per call, not a sequence."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)


class _Followers(Manager):
    groups: dict[FanoutPriority, Any] = {}

    def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Any]:
        return self.groups

    def get_user_follower_count(self, user_id: ObjectId) -> int | None:
        return 10**6


def _manager(groups: dict[FanoutPriority, Any], **settings: Any) -> tuple[Manager, _Queue]:
    manager = _Followers(dispatcher="eager", storage=MemoryStorage(), **settings)
    manager.groups = groups
    queue = _Queue(manager.settings, runner=manager.runner)
    manager.dispatcher = queue
    return manager, queue


def _posted(
    high: Any, activity: Activity | None = None, **settings: Any
) -> tuple[Manager, _Queue, FanoutReceipt, PlanTask]:
    """A background fanout to ``high`` HIGH followers, posted: its first planning task."""
    manager, queue = _manager({HIGH: high}, planning="background", **settings)
    receipt = manager.add_user_activity("author", activity or _pin())
    first = queue.sent[0]
    assert isinstance(first, PlanTask)
    return manager, queue, receipt, first


def _work(
    manager: Manager, queue: _Queue, ran: tuple[PlanTask, ...] = ()
) -> tuple[list[PlanTask], list[ChunkTask]]:
    """Run the planning tasks sent, oldest first, but those in ``ran``, until none is left.

    Tasks are told apart by identity: a page sent twice is two messages.
    """
    plans = list(ran)
    while True:
        seen = {id(plan) for plan in plans}
        waiting = [t for t in queue.sent if isinstance(t, PlanTask) and id(t) not in seen]
        if not waiting:
            return plans, [t for t in queue.sent if isinstance(t, ChunkTask)]
        plans.append(waiting[0])
        manager.plan_in_worker(waiting[0])


def _pin() -> Activity:
    return Activity(actor="author", verb="pin", object="p1")


def test_a_large_fanout_is_planned_a_page_at_a_time_each_page_on_its_groups_queue() -> None:
    # Given 45 HIGH and 30 LOW followers in sequences, chunks of 10, pages of 2 chunk tasks
    high = [f"h{i}" for i in range(45)]
    low = [f"l{i}" for i in range(30)]
    manager, queue = _manager(
        {HIGH: _Paged(high), LOW: _Paged(low)},
        planning="background",
        fanout_chunk_size=10,
        planning_page=2,
    )
    # When the author posts, only the first planning task is sent, for HIGH
    receipt = manager.add_user_activity("author", _pin())
    assert receipt.planned_in_background
    assert [(t.priority, t.start) for t in queue.sent] == [(HIGH, 0)]
    # And as the planning tasks run, the total is unknown until the last one
    first = queue.sent[0]
    assert isinstance(first, PlanTask)
    manager.plan_in_worker(first)
    status = manager.fanout_status(receipt)
    assert status is not None and status.total is None
    plans, chunks = _work(manager, queue, ran=(first,))
    # Then each planning task sent at most 2 chunk tasks in one batch, behind the next page
    assert [(p.priority, p.start, p.before) for p in plans] == [
        (HIGH, 0, 0),
        (HIGH, 2, 0),
        (HIGH, 4, 0),
        (LOW, 0, 5),
        (LOW, 2, 5),
    ]
    shapes = [[type(t).__name__[0] + t.priority.value[0] for t in b] for b in queue.batches]
    assert shapes == [
        ["Ph"],  # the producer's one task
        ["Ph", "Ch", "Ch"],
        ["Ph", "Ch", "Ch"],
        ["Pl", "Ch"],  # the last HIGH page passes on to the LOW group
        ["Pl", "Cl", "Cl"],
        ["Cl"],  # the last page sends no planning task
    ]
    # And every follower is in exactly one chunk, numbered 0.. in each group
    assert [c.index for c in chunks if c.priority is HIGH] == [0, 1, 2, 3, 4]
    assert [c.index for c in chunks if c.priority is LOW] == [0, 1, 2]
    assert [f for c in chunks if c.priority is HIGH for f in c.followers] == high
    assert [f for c in chunks if c.priority is LOW for f in c.followers] == low
    # And the last page recorded the fanout's total
    status = manager.fanout_status(receipt)
    assert status is not None and status.total == 8


@pytest.mark.parametrize("kind", [_Stream, list, tuple, collections.deque])
def test_a_stream_or_a_list_is_cut_to_its_end_by_one_task(kind: Any) -> None:
    # Given HIGH followers from a cursor (not resumable) or a list (built whole for each
    # call, so reading it again per page would cost the whole list each time)
    manager, queue = _manager(
        {HIGH: kind([f"h{i}" for i in range(45)]), LOW: _Paged([f"l{i}" for i in range(30)])},
        planning="background",
        fanout_chunk_size=10,
        planning_page=2,
    )
    receipt = manager.add_user_activity("author", _pin())
    plans, chunks = _work(manager, queue)
    # Then one task cut the whole HIGH group; the LOW sequence is paged as usual
    assert [(p.priority, p.start) for p in plans] == [(HIGH, 0), (LOW, 0), (LOW, 2)]
    assert [c.index for c in chunks if c.priority is HIGH] == [0, 1, 2, 3, 4]
    assert len(chunks) == 8
    status = manager.fanout_status(receipt)
    assert status is not None and status.total == 8


def test_auto_sends_the_first_planning_task_to_low_when_no_follower_is_high() -> None:
    # Given an account over the threshold whose followers are all LOW, held in memory
    manager, queue = _manager(
        {HIGH: [], LOW: range(50)}, planning="auto", planning_threshold=10, fanout_chunk_size=10
    )
    manager.add_user_activity("author", _pin())
    # Then nothing of its fanout waits in the HIGH queue
    assert [(t.priority, t.start) for t in queue.sent] == [(LOW, 0)]
    _, chunks = _work(manager, queue)
    assert {c.priority for c in chunks} == {LOW} and len(chunks) == 5


def _run_chunks(manager: Manager, queue: _Queue) -> None:
    for chunk in queue.sent:
        if isinstance(chunk, ChunkTask):
            manager.runner.run(chunk)


def test_a_page_the_queue_refuses_settles_the_fanout_and_its_retry_reopens_it() -> None:
    # Given pages of 2 chunk tasks of 10 followers, 60 followers, the first page planned
    manager, queue, receipt, first = _posted(
        _Paged([f"h{i}" for i in range(60)]), fanout_chunk_size=10, planning_page=2
    )
    manager.plan_in_worker(first)
    second = queue.batches[-1][0]
    assert isinstance(second, PlanTask) and second.start == 2
    # When the queue takes nothing of the second page's batch
    queue.fail_at = len(queue.sent) + 1
    with pytest.raises(DispatchError):
        manager.plan_in_worker(second)
    _run_chunks(manager, queue)
    # Then the fanout settles: the 2 chunks sent, and its planning counted as failed
    status = manager.fanout_status(receipt)
    assert status is not None
    assert (status.total, status.done, status.failed, status.settled) == (3, 2, 1, True)
    # And when the page is tried again, the fanout is open until its last page
    manager.plan_in_worker(second)
    status = manager.fanout_status(receipt)
    assert status is not None and (status.total, status.failed) == (None, 0)
    _work(manager, queue, ran=(first, second))
    _run_chunks(manager, queue)
    status = manager.fanout_status(receipt)
    assert status is not None and (status.total, status.done, status.failed) == (6, 6, 0)


def test_chunks_the_queue_refuses_after_the_next_page_count_failed_until_added_again() -> None:
    # Given pages of 3 chunk tasks of 10 followers, 60 followers
    activity = _pin()
    manager, queue, receipt, first = _posted(
        _Paged([f"h{i}" for i in range(60)]), activity, fanout_chunk_size=10, planning_page=3
    )
    # When the queue takes the next page and the first chunk of a page, then fails
    queue.fail_at = len(queue.sent) + 3
    manager.plan_in_worker(first)
    assert [type(t).__name__ for t in queue.batches[-1]] == ["PlanTask", "ChunkTask"]
    # Then planning goes on from the next page, and the 2 chunks not sent count failed,
    # with the way to send them
    _work(manager, queue, ran=(first,))
    _run_chunks(manager, queue)
    status = manager.fanout_status(receipt)
    assert status is not None
    assert (status.total, status.done, status.failed, status.settled) == (6, 4, 2, True)
    reasons = manager.storage._failed[receipt.fanout_id]  # type: ignore[attr-defined]
    assert sorted(reasons) == ["high:1", "high:2"]
    assert all("Add the activity again" in reason for reason in reasons.values())
    # And adding the activity again sends them: every chunk done, nothing failed
    ran = tuple(t for t in queue.sent if isinstance(t, PlanTask))
    manager.add_user_activity("author", activity)
    _work(manager, queue, ran=ran)
    _run_chunks(manager, queue)
    status = manager.fanout_status(receipt)
    assert status is not None and (status.total, status.done, status.failed) == (6, 6, 0)


def test_an_error_reading_a_page_of_followers_settles_the_fanout_with_its_planning_failed() -> None:
    followers = _Paged([f"h{i}" for i in range(60)])
    manager, queue, receipt, first = _posted(followers, fanout_chunk_size=10, planning_page=2)
    manager.plan_in_worker(first)
    second = queue.batches[-1][0]
    assert isinstance(second, PlanTask)
    # When the follower database fails as the second page is read
    followers.broken = True
    with pytest.raises(RuntimeError, match="follower database is down"):
        manager.plan_in_worker(second)
    _run_chunks(manager, queue)
    # Then the fanout settles: 2 chunks done and its planning failed, not "planning" forever
    status = manager.fanout_status(receipt)
    assert status is not None
    assert (status.total, status.done, status.failed, status.settled) == (3, 2, 1, True)


def test_later_pages_keep_the_chunk_size_of_a_groups_first_page() -> None:
    # Given a producer asking for chunks of 20, a first worker capping them at 10, and a
    # worker configured for chunks of 5 planning the pages after
    ids = [f"h{i}" for i in range(70)]
    first_worker, queue = _manager(
        {HIGH: _Paged(ids)},
        planning="background",
        fanout_chunk_size=10,
        max_chunk_size=10,
        planning_page=2,
    )
    pin = _pin()
    plan = PlanTask("add", ("timeline",), ((pin.id, pin.sort_key),), "author", "0" * 24, HIGH, 20)
    first_worker.plan_in_worker(plan)
    second_worker, _ = _manager(
        {HIGH: _Paged(ids)}, fanout_chunk_size=5, max_chunk_size=10, planning_page=2
    )
    second_worker.dispatcher = queue
    _work(second_worker, queue, ran=(plan,))
    # Then every follower is in exactly one chunk, in chunks of 10
    chunks = [t for t in queue.sent if isinstance(t, ChunkTask)]
    assert [f for c in chunks for f in c.followers] == ids
    assert {len(c.followers) for c in chunks} == {10}


def test_a_page_delivered_again_after_the_fanout_completed_sends_nothing() -> None:
    manager, queue = _manager(
        {HIGH: _Paged([f"h{i}" for i in range(30)])},
        planning="background",
        fanout_chunk_size=10,
        planning_page=1,
    )
    receipt = manager.add_user_activity("author", _pin())
    plans, chunks = _work(manager, queue)
    for chunk in chunks:
        manager.runner.run(chunk)
    status = manager.fanout_status(receipt)
    assert status is not None and status.complete and status.total == 3
    sent = len(queue.sent)
    # When a broker delivers the second page again
    again = manager.plan_in_worker(plans[1])
    # Then nothing is sent and the fanout stays complete
    assert again.chunks == 0 and len(queue.sent) == sent
    status = manager.fanout_status(receipt)
    assert status is not None and status.complete and status.total == 3


def test_planning_tasks_round_trip_and_older_whole_plans_still_run() -> None:
    page = PlanTask("add", ("timeline",), (), 7, "0" * 24, LOW, 100, start=3, before=12)
    body = json.loads(page.to_json())
    assert (body["from"], body["base"]) == (3, 12)
    assert page.task_id == f"feedfan-{'0' * 24}-plan-low-3"
    # A planning task from feedfan before pages (no "from", no "base") plans every group
    del body["from"], body["base"]
    body["acts"] = [["1700000000000000abcdef0123", 1700000000000000]]
    old = decode_task(json.dumps(body))
    assert isinstance(old, PlanTask) and not old.paged
    assert old.task_id == f"feedfan-{'0' * 24}-plan"
    manager, queue = _manager(
        {HIGH: [f"h{i}" for i in range(25)], LOW: _Stream([f"l{i}" for i in range(15)])},
        fanout_chunk_size=10,
        planning_page=1,
    )
    manager.plan_in_worker(old)
    assert [(type(t).__name__, t.priority) for t in queue.sent] == [
        ("ChunkTask", HIGH),
        ("ChunkTask", LOW),
    ]


@pytest.mark.parametrize(
    ("field", "value"), [("from", -1), ("base", "3"), ("from", True), ("base", 2**31)]
)
def test_a_planning_page_with_a_bad_position_is_refused_naming_the_field(
    field: str, value: object
) -> None:
    page = PlanTask("add", ("timeline",), (), 7, "0" * 24, LOW, 100, start=3, before=12)
    body = json.loads(page.to_json())
    body["acts"] = [["1700000000000000abcdef0123", 1700000000000000]]
    body[field] = value
    with pytest.raises(PayloadError, match=f"plan task field '{field}' .* must be an int"):
        decode_task(json.dumps(body))
    # And a page missing one of the two is refused, not taken for an older whole plan
    del body[field]
    with pytest.raises(PayloadError, match=f"lacks \\['{field}'\\]"):
        decode_task(json.dumps(body))


def test_a_chunk_over_the_task_limit_stops_planning_at_it_and_no_next_page_is_sent() -> None:
    # Given a page of 3 chunks whose second holds ids too long for a 2 KiB task
    ids = [f"h{i}" for i in range(10)] + [f"h{i}-{'x' * 200}" for i in range(10)]
    manager, queue, receipt, first = _posted(
        _Paged(ids + [f"h{i}" for i in range(20, 40)]),
        fanout_chunk_size=10,
        planning_page=3,
        max_task_bytes=2048,
    )
    # When a worker plans the page, the worker is told to keep the task and not retry it
    with pytest.raises(PayloadError, match="max_task_bytes"):
        manager.plan_in_worker(first)
    # Then only the chunk before it went, without a next page, and the fanout settles
    assert [(type(t).__name__, getattr(t, "index", None)) for t in queue.batches[-1]] == [
        ("ChunkTask", 0)
    ]
    _run_chunks(manager, queue)
    status = manager.fanout_status(receipt)
    assert status is not None
    assert (status.total, status.done, status.failed, status.settled) == (2, 1, 1, True)


@pytest.mark.parametrize("paged", [True, False], ids=["sequence", "stream"])
def test_a_follower_id_that_is_not_one_stops_planning_there_and_settles_the_fanout(
    paged: bool,
) -> None:
    # Given 45 HIGH followers, the 25th of them not an id, and LOW followers after them
    ids: list[Any] = [f"h{i}" for i in range(45)]
    ids[24] = {"not": "an id"}
    manager, queue = _manager(
        {HIGH: _Paged(ids) if paged else _Stream(ids), LOW: _Paged(["l0", "l1"])},
        planning="background",
        fanout_chunk_size=10,
        planning_page=5,
    )
    receipt = manager.add_user_activity("author", _pin())
    first = queue.sent[0]
    assert isinstance(first, PlanTask)
    # When a worker plans, it is told to keep the task and not retry it
    with pytest.raises(PayloadError, match="follower id of priority HIGH"):
        manager.plan_in_worker(first)
    # Then the 2 chunks before the bad one went, no next page, and the fanout settles
    assert [type(t).__name__ for t in queue.sent[1:]] == ["ChunkTask", "ChunkTask"]
    _run_chunks(manager, queue)
    status = manager.fanout_status(receipt)
    assert status is not None
    assert (status.total, status.done, status.failed, status.settled) == (3, 2, 1, True)


def test_a_page_delivered_twice_whose_second_run_fails_does_not_end_the_live_chain() -> None:
    # Given pages of one chunk of 10 followers, and a page the broker delivers twice
    manager, queue, receipt, first = _posted(
        _Paged([f"h{i}" for i in range(40)]), fanout_chunk_size=10, planning_page=1
    )
    manager.plan_in_worker(first)
    second = queue.batches[-1][0]
    assert isinstance(second, PlanTask)
    manager.plan_in_worker(second)
    third = queue.batches[-1][0]
    assert isinstance(third, PlanTask)
    # When the second delivery of the second page finds the broker down, recording a total
    # of 2 (the chunk before it and its failed planning), and the chunks sent so far run
    queue.fail_at = len(queue.sent) + 1
    with pytest.raises(DispatchError):
        manager.plan_in_worker(second)
    _run_chunks(manager, queue)
    # Then the live chain's next page still plans, and the fanout completes with all 4 chunks
    _work(manager, queue, ran=(first, second, second))
    _run_chunks(manager, queue)
    status = manager.fanout_status(receipt)
    assert status is not None and (status.total, status.done, status.failed) == (4, 4, 0)


def test_a_page_shorter_than_its_group_claims_ends_the_group_there() -> None:
    # Given a COUNT saying 60 followers while 25 rows remain
    manager, queue, receipt, _ = _posted(
        _Paged([f"h{i}" for i in range(25)], claimed=60), fanout_chunk_size=10, planning_page=2
    )
    _, chunks = _work(manager, queue)
    # Then every follower read is written once, and planning ends with the short page
    assert [f for c in chunks for f in c.followers] == [f"h{i}" for i in range(25)]
    status = manager.fanout_status(receipt)
    assert status is not None and status.total == 3


def test_chunks_not_sent_that_cannot_be_counted_still_end_the_task() -> None:
    # Given a page whose chunks the queue refuses after taking the next page, and a storage
    # that fails to count them
    manager, queue, _, first = _posted(
        _Paged([f"h{i}" for i in range(60)]), fanout_chunk_size=10, planning_page=3
    )
    queue.fail_at = len(queue.sent) + 2

    def unreachable(*args: Any) -> None:
        raise StorageError("Redis went away")

    manager.storage.mark_chunk_failed = unreachable  # type: ignore[method-assign]
    # When a worker plans the page, the task ends without an error to retry it (a retry
    # would send the next page a second time)
    manager.plan_in_worker(first)
    assert [type(t).__name__ for t in queue.batches[-1]] == ["PlanTask"]


def test_a_page_continuing_chunks_above_this_workers_cap_is_refused_naming_the_setting() -> None:
    manager, queue = _manager(
        {HIGH: _Paged([f"h{i}" for i in range(60)])}, fanout_chunk_size=5, max_chunk_size=5
    )
    pin = _pin()
    page = PlanTask(
        "add", ("timeline",), ((pin.id, pin.sort_key),), "author", "0" * 24, HIGH, 20, start=2
    )
    with pytest.raises(PayloadError, match="above this worker's max_chunk_size=5"):
        manager.plan_in_worker(page)
    assert queue.sent == []


class _Queried(Manager):
    """Followers read by a query each call, counted; the default get_user_follower_count."""

    def __init__(self, lookup: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lookup = lookup
        self.queries = 0

    def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Any]:
        self.queries += 1
        result: dict[FanoutPriority, Any] = self.lookup()
        return result


@pytest.mark.parametrize(
    ("lookup", "background", "chunks"),
    [
        # in memory, under the threshold: planned inline
        (lambda: {HIGH: [1, 2, 3], LOW: [4, 5, 6, 7]}, False, 2),
        # in memory, over it: one planning task
        (lambda: {HIGH: [], LOW: list(range(50))}, True, 0),
        # a cursor, read once: not counted, planned inline
        (lambda: {HIGH: (f for f in "ab"), LOW: (f for f in "c" * 30)}, False, 4),
    ],
    ids=["in-memory-inline", "in-memory-background", "cursor-inline"],
)
def test_auto_reads_the_followers_once_in_the_producer(
    lookup: Any, background: bool, chunks: int
) -> None:
    # Given a manager on auto whose follower lookup is a query, counted by the default count
    manager = _Queried(
        lookup,
        dispatcher="eager",
        storage=MemoryStorage(),
        planning="auto",
        planning_threshold=10,
        fanout_chunk_size=10,
    )
    queue = _Queue(manager.settings, runner=manager.runner)
    manager.dispatcher = queue
    # When an activity is added
    receipt = manager.add_user_activity("author", _pin())
    # Then the producer ran the query once, whether it planned inline or sent a planning
    # task, and every follower is in a chunk
    assert manager.queries == 1
    assert receipt.planned_in_background is background
    assert len([t for t in queue.sent if isinstance(t, ChunkTask)]) == chunks == receipt.chunks
