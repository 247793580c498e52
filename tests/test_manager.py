"""The manager: Stream Framework's API over any dispatcher."""

from __future__ import annotations

import re
import tracemalloc
from collections.abc import Iterable, Iterator, Sequence

import pytest
import redis

from feedfan import (
    Activity,
    ActivityError,
    ConfigurationError,
    DispatchError,
    FanoutPriority,
    Feed,
    FeedfanError,
    LimitExceededError,
    Manager,
    TaskDispatcher,
    TimelineFeed,
)
from feedfan.activity import ObjectId
from feedfan.storage.redis import RedisStorage
from feedfan.task import ChunkTask, Task


class MyStreamManager(Manager):
    """The seed's example, verbatim in spirit."""

    def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Iterable[ObjectId]]:
        return {FanoutPriority.HIGH: range(1, 8), FanoutPriority.LOW: range(100, 104)}


class CountingDispatcher(TaskDispatcher):
    """Accepts tasks and keeps nothing but counts: for planner tests."""

    name = "counting"
    runs_in_process = True

    def __init__(self, *args: object, fail_after: int | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sent: list[Task] = []
        self.count = 0
        self.fail_after = fail_after
        self.keep = True

    def publish(self, task: Task, body: str) -> None:
        if self.fail_after is not None and self.count >= self.fail_after:
            raise DispatchError("the queue is down")
        self.count += 1
        if self.keep:
            self.sent.append(task)


def test_the_seed_manager_fans_out_to_both_priority_groups() -> None:
    with MyStreamManager(dispatcher="eager", fanout_chunk_size=3) as manager:
        pin = Activity(actor=1, verb="pin", object=42)
        receipt = manager.add_user_activity(1, pin)
        assert (receipt.high_chunks, receipt.low_chunks, receipt.followers) == (3, 2, 11)
        assert manager.fanout_status(receipt).complete  # type: ignore[union-attr]
        for follower in [*range(1, 8), *range(100, 104)]:
            assert manager.get_feed(follower)[:5] == [pin]
        assert manager.get_user_feed(1)[0] == pin
        assert len(manager.get_feed(8)) == 0


def test_followers_are_streamed_not_copied_into_memory() -> None:
    # Given a user with a million followers, as a generator
    class Celebrity(Manager):
        def get_user_follower_ids(
            self, user_id: ObjectId
        ) -> dict[FanoutPriority, Iterable[ObjectId]]:
            return {FanoutPriority.LOW: (f"fan-{i}" for i in range(1_000_000))}

    manager = Celebrity(dispatcher="eager", fanout_chunk_size=1000)
    counting = CountingDispatcher(manager.settings, runner=manager.runner)
    counting.keep = False
    manager.dispatcher = counting
    # When the activity is fanned out
    tracemalloc.start()
    receipt = manager.add_user_activity("star", Activity(actor="star", verb="pin", object=1))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # Then 1,000 chunks were sent and memory stayed far below a copied list
    assert counting.count == receipt.chunks == 1000
    assert peak < 25_000_000, f"peak {peak:,} bytes (a copied list of 1M ids is over 60 MB)"


def _behind_a_queue_failing_after_two_chunks() -> tuple[MyStreamManager, CountingDispatcher]:
    """An eager manager of two-follower chunks whose queue takes two chunks, then fails."""
    manager = MyStreamManager(dispatcher="eager", fanout_chunk_size=2)
    flaky = CountingDispatcher(manager.settings, runner=manager.runner, fail_after=2)
    manager.dispatcher = flaky
    return manager, flaky


def test_a_queue_failure_midway_says_how_many_chunks_were_accepted_and_a_retry_completes() -> None:
    manager, flaky = _behind_a_queue_failing_after_two_chunks()
    pin = Activity(actor=1, verb="pin", object=1)
    with pytest.raises(DispatchError) as raised:
        manager.add_user_activity(1, pin)
    assert raised.value.accepted == 2
    assert "Call the same method again with the same activity" in str(raised.value)
    # When the queue is back and the same activity is added again
    flaky.fail_after = None
    receipt = manager.add_user_activity(1, pin)
    chunk_ids = [t.task_id for t in flaky.sent if isinstance(t, ChunkTask)]
    assert receipt.chunks == 6
    assert chunk_ids[:2] == chunk_ids[2:4], "the retry reproduces the same deterministic chunk ids"


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ([1, 2], "must return {FanoutPriority.HIGH: ids, FanoutPriority.LOW: ids}, got list"),
        ({"urgent": [1]}, "returned the key 'urgent'"),
        ({FanoutPriority.HIGH: 5}, "must be an iterable of ids, got int"),
        ({FanoutPriority.HIGH: "abc"}, "must be an iterable of ids, got str"),
        (
            {FanoutPriority.HIGH: [1, 2.5]},
            "follower id of priority HIGH must be a str or int id, got 2.5",
        ),
    ],
)
def test_a_bad_follower_mapping_is_reported_clearly(result: object, message: str) -> None:
    class Broken(Manager):
        def get_user_follower_ids(self, user_id: ObjectId) -> object:  # type: ignore[override]
            return result

    with pytest.raises(ActivityError) as raised:
        Broken(dispatcher="eager").add_user_activity(1, Activity(actor=1, verb="pin", object=1))
    assert message in str(raised.value)


def test_a_manager_without_followers_says_what_to_override() -> None:
    with pytest.raises(NotImplementedError, match="subclass Manager and return"):
        Manager(dispatcher="eager").add_user_activity(1, Activity(actor=1, verb="pin", object=1))


def test_strings_and_class_attributes_set_settings_and_record_where_from() -> None:
    class Fifty(MyStreamManager):
        fanout_chunk_size = 50
        bound_dispatcher = "eager"

    manager = Fifty()
    assert manager.settings.fanout_chunk_size == 50
    assert manager.settings.sources["fanout_chunk_size"].endswith("Fifty.fanout_chunk_size")
    assert manager.dispatcher.name == "eager"
    assert Fifty(dispatcher="local").dispatcher.name == "local"


def test_an_oversized_extra_is_refused_in_the_producer() -> None:
    manager = MyStreamManager(dispatcher="eager", max_extra_bytes=100)
    with pytest.raises(LimitExceededError, match="above max_extra_bytes=100"):
        manager.add_user_activity(
            1, Activity(actor=1, verb="pin", object=1, extra={"x": "y" * 200})
        )


def test_an_oversized_task_is_refused_in_the_producer() -> None:
    class LongIds(Manager):
        def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Sequence[str]]:
            return {FanoutPriority.HIGH: ["u" * 200] * 50}

    manager = LongIds(dispatcher="eager", fanout_chunk_size=50, max_task_bytes=4096)
    with pytest.raises(LimitExceededError, match="above max_task_bytes=4,096") as raised:
        manager.add_user_activity(1, Activity(actor=1, verb="pin", object=1))
    assert "lower fanout_chunk_size or raise max_task_bytes" in str(raised.value)


def test_feed_classes_must_have_distinct_names() -> None:
    class Twin(TimelineFeed):
        pass

    class Clash(Manager):
        feed_classes = {"a": TimelineFeed, "b": Twin}

    with pytest.raises(ConfigurationError, match="registers the feed name 'timeline' twice"):
        Clash(dispatcher="eager")


def test_a_feed_class_with_a_bad_name_fails_where_it_is_declared() -> None:
    with pytest.raises(ConfigurationError, match=r"Bad.name must match"):

        class Bad(Feed):
            name = "Has Spaces"


def test_a_real_queue_with_memory_storage_is_refused() -> None:
    manager = MyStreamManager(dispatcher="eager")
    with pytest.raises(ConfigurationError, match="cannot see in-memory storage"):

        class Remote(CountingDispatcher):
            runs_in_process = False

        MyStreamManager(dispatcher=Remote(manager.settings), storage=manager.storage)


def test_removing_by_activity_id_works_like_removing_the_activity() -> None:
    manager = MyStreamManager(dispatcher="eager")
    pin = Activity(actor=1, verb="pin", object=1)
    manager.add_user_activity(1, pin)
    manager.remove_user_activity(1, pin.id)
    assert len(manager.get_feed(3)) == 0 and len(manager.get_user_feed(1)) == 0
    with pytest.raises(ActivityError, match="is not a feedfan activity id"):
        manager.remove_user_activity(1, "nope")


def test_feeds_read_like_stream_framework_feeds() -> None:
    manager = MyStreamManager(dispatcher="eager")
    pins = [Activity(actor=1, verb="pin", object=i) for i in range(30)]
    for pin in pins:
        manager.add_user_activity(1, pin)
    feed = manager.get_feed(2)
    assert feed[0] == pins[-1]
    assert feed[:3] == list(reversed(pins))[:3]
    assert [len(page) for page in feed.pages(per_page=12)] == [12, 12, 6]
    assert feed.count() == len(feed) == 30
    with pytest.raises(IndexError):
        feed[30]


def test_wait_gives_up_with_a_hint_about_workers() -> None:
    manager = MyStreamManager(dispatcher="local")
    manager.dispatcher.pause()  # type: ignore[attr-defined]
    receipt = manager.add_user_activity(1, Activity(actor=1, verb="pin", object=1))
    with pytest.raises(FeedfanError, match=r"Are workers running for 'feedfan\.high'"):
        manager.wait(receipt, timeout=0.2)
    manager.dispatcher.resume()  # type: ignore[attr-defined]
    assert manager.wait(receipt).complete


def iterate(ids: Iterator[int]) -> Iterator[int]:
    yield from ids


def test_adding_an_activity_takes_two_redis_round_trips_around_its_tasks(
    feedfan_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a manager on Redis whose chunk tasks go to a queue that keeps them
    manager = MyStreamManager(
        dispatcher="eager",
        redis_url=feedfan_redis_url,
        key_prefix=f"rt-{id(monkeypatch):x}:",
        fanout_chunk_size=3,
    )
    counting = CountingDispatcher(manager.settings, runner=manager.runner)
    manager.dispatcher = counting
    assert isinstance(manager.storage, RedisStorage)
    manager.storage.ping()
    sent: list[bytes] = []
    send = redis.connection.AbstractConnection.send_packed_command

    def counted(self: object, command: object, *args: object, **kwargs: object) -> None:
        sent.append(bytes(command[0] if isinstance(command, list) else command)[:40])
        send(self, command, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    try:
        # When an activity is added
        receipt = manager.add_user_activity(1, Activity(actor=1, verb="pin", object=42))

        # Then Redis saw two round trips: one before the tasks were sent (the activity, the
        # author's feed, the fanout's start) and one after (the count of chunks)
        assert counting.count == receipt.chunks == 5
        assert len(sent) == 2, sent
        status = manager.fanout_status(receipt)
        assert status is not None and status.total == 5
    finally:
        monkeypatch.undo()
        manager.storage.clear()
        manager.close()


def test_a_fanout_the_queue_refused_settles_as_failed_until_it_is_added_again() -> None:
    # Given a queue that takes two chunks and then fails
    manager, flaky = _behind_a_queue_failing_after_two_chunks()
    pin = Activity(actor=1, verb="pin", object=1)
    with pytest.raises(DispatchError) as raised:
        manager.add_user_activity(1, pin)
    found = re.search(r"fanout (\S+) of", str(raised.value))
    assert found is not None

    # Then, once the two chunks the queue took have run, its status is settled and
    # failed, not in flight until status_ttl
    for task in flaky.sent:
        manager.runner.run(task)
    status = manager.fanout_status(found.group(1))
    assert status is not None and status.settled and not status.complete
    assert status.failed == 1 and status.total == 3

    # And when the queue is back and the activity is added again, it completes
    flaky.fail_after = None
    receipt = manager.add_user_activity(1, pin)
    for task in flaky.sent:
        manager.runner.run(task)
    final = manager.fanout_status(receipt)
    assert final is not None and final.complete and final.failed == 0
