"""Storage: Redis (script and pipeline) and memory behave the same."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

from feedfan import Activity, MemoryStorage, RedisStorage, StorageError
from feedfan.storage.base import Storage, WriteBatch


@pytest.fixture(params=["memory", "redis-script", "redis-pipeline"])
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    if request.param == "memory":
        yield MemoryStorage()
        return
    url = request.getfixturevalue("feedfan_redis_url")
    mode = request.param.split("-")[1]
    store = RedisStorage(url=url, key_prefix=f"st-{uuid.uuid4().hex[:8]}:", write_mode=mode)  # type: ignore[arg-type]
    yield store
    store.clear()
    store.close()


def entry(second: int) -> tuple[str, int]:
    activity = Activity(
        actor=1,
        verb="pin",
        object=second,
        time=datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=second),
    )
    return activity.id, activity.sort_key


def test_an_add_writes_every_feed_and_trims_each_to_its_length(storage: Storage) -> None:
    # Given two feeds of different lengths
    long_key, short_key = storage.feed_key("timeline", 1), storage.feed_key("short", 1)
    entries = [entry(s) for s in range(5)]
    # When five entries are added in one batch
    storage.apply(WriteBatch("add", [(long_key, 10), (short_key, 2)], entries))
    # Then each feed holds the newest entries it has room for, newest first
    assert storage.read_feed(long_key, offset=0, limit=10) == list(reversed(entries))
    assert storage.read_feed(short_key, offset=0, limit=10) == [entries[4], entries[3]]


def test_applying_a_batch_twice_is_the_same_as_once(storage: Storage) -> None:
    key = storage.feed_key("timeline", "x")
    batch = WriteBatch("add", [(key, 3)], [entry(1), entry(2)], chunk=("f" * 24, "high:0"))
    storage.apply(batch)
    first = storage.read_feed(key, offset=0, limit=10)
    storage.apply(batch)
    assert storage.read_feed(key, offset=0, limit=10) == first
    status = storage.fanout_status("f" * 24)
    assert status is not None and status.done == 1


def test_a_remove_takes_entries_out_of_every_feed(storage: Storage) -> None:
    keys = [(storage.feed_key("timeline", u), 10) for u in range(3)]
    storage.apply(WriteBatch("add", keys, [entry(1), entry(2)]))
    storage.apply(WriteBatch("remove", keys, [entry(1)]))
    for key, _ in keys:
        assert storage.read_feed(key, offset=0, limit=10) == [entry(2)]
        assert storage.feed_length(key) == 1


def test_a_feed_reads_page_by_page(storage: Storage) -> None:
    key = storage.feed_key("timeline", 5)
    entries = [entry(s) for s in range(7)]
    storage.apply(WriteBatch("add", [(key, 100)], entries))
    newest_first = list(reversed(entries))
    assert storage.read_feed(key, offset=0, limit=3) == newest_first[:3]
    assert storage.read_feed(key, offset=3, limit=3) == newest_first[3:6]
    assert storage.read_feed(key, offset=6, limit=3) == newest_first[6:]
    assert storage.read_feed(key, offset=9, limit=3) == []


def test_a_large_batch_with_many_entries_is_written_in_one_call(storage: Storage) -> None:
    # More entries than a Lua unpack() can take at once must still work.
    key = storage.feed_key("timeline", "big")
    entries = [(f"{i:016d}abcdef0123", i) for i in range(12_000)]
    storage.apply(WriteBatch("add", [(key, 20_000)], entries))
    assert storage.feed_length(key) == 12_000
    storage.apply(WriteBatch("remove", [(key, 20_000)], entries))
    assert storage.feed_length(key) == 0


def test_activity_bodies_are_stored_once_and_read_back(storage: Storage) -> None:
    activity = Activity(actor="a", verb="pin", object="p", extra={"k": [1]})
    storage.store_activities([activity, activity])
    assert storage.get_activities([activity.id, "missing"]) == {activity.id: activity}


def test_fanout_progress_counts_done_and_failed_chunks(storage: Storage) -> None:
    fanout = "c" * 24
    storage.begin_fanout(fanout, {"op": "add"})
    assert storage.fanout_status(fanout).total is None  # type: ignore[union-attr]
    key = storage.feed_key("timeline", 1)
    storage.apply(WriteBatch("add", [(key, 5)], [entry(1)], chunk=(fanout, "high:0")))
    storage.mark_chunk_failed(fanout, "low:0", "boom")
    storage.end_planning(fanout, 3)
    status = storage.fanout_status(fanout)
    assert status is not None
    assert (status.total, status.done, status.failed, status.pending) == (3, 1, 1, 1)
    assert not status.complete and not status.settled
    assert status.meta["op"] == "add"
    # A failed chunk that later succeeds is counted once, as done
    storage.apply(WriteBatch("add", [(key, 5)], [entry(1)], chunk=(fanout, "low:0")))
    storage.mark_chunk_failed(fanout, "low:0", "late duplicate failure")
    status = storage.fanout_status(fanout)
    assert (status.done, status.failed) == (2, 0)  # type: ignore[union-attr]
    assert fanout in storage.recent_fanouts()


def test_a_finished_fanout_run_again_counts_afresh_but_a_retry_keeps_counting(
    storage: Storage,
) -> None:
    fanout = "d" * 24
    key = storage.feed_key("timeline", 1)
    storage.begin_fanout(fanout, {})
    storage.apply(WriteBatch("add", [(key, 5)], [entry(1)], chunk=(fanout, "high:0")))
    # A retry while unfinished keeps the chunk already done
    storage.begin_fanout(fanout, {})
    assert storage.fanout_status(fanout).done == 1  # type: ignore[union-attr]
    storage.end_planning(fanout, 1)
    assert storage.fanout_status(fanout).complete  # type: ignore[union-attr]
    # Running the finished fanout again starts from zero
    storage.begin_fanout(fanout, {})
    status = storage.fanout_status(fanout)
    assert status is not None and (status.done, status.total) == (0, None)


def test_reopening_planning_takes_back_a_total_only_while_the_fanout_is_incomplete(
    storage: Storage,
) -> None:
    fanout = "e" * 24
    key = storage.feed_key("timeline", 1)
    storage.begin_fanout(fanout, {})
    # No total yet: nothing to take back
    assert storage.reopen_planning(fanout, "plan")
    # A failed planning recorded a total: it goes, with the planning failure, not the rest
    storage.apply(WriteBatch("add", [(key, 5)], [entry(1)], chunk=(fanout, "high:0")))
    storage.mark_chunk_failed(fanout, "high:1", "not sent")
    storage.mark_chunk_failed(fanout, "plan", "broker went away")
    storage.end_planning(fanout, 3)
    assert storage.fanout_status(fanout).settled  # type: ignore[union-attr]
    assert storage.reopen_planning(fanout, "plan")
    status = storage.fanout_status(fanout)
    assert status is not None and (status.total, status.done, status.failed) == (None, 1, 1)
    # Every chunk done: the fanout stays complete, and the caller is told
    storage.end_planning(fanout, 1)
    assert not storage.reopen_planning(fanout, "plan")
    status = storage.fanout_status(fanout)
    assert status is not None and status.complete and status.total == 1
    # But a total a failed planning wrote is taken back even when the chunks it counts are
    # done: later pages may still be planning
    storage.mark_chunk_failed(fanout, "plan", "broker went away")
    storage.end_planning(fanout, 1)
    assert storage.reopen_planning(fanout, "plan")
    status = storage.fanout_status(fanout)
    assert status is not None and (status.total, status.failed) == (None, 1)  # high:1 stays


def test_rejected_messages_are_kept_newest_first_and_pop_oldest_first(storage: Storage) -> None:
    storage.keep_rejected("q.high", "first", "bad 1")
    storage.keep_rejected("q.low", "second", "bad 2")
    kept = storage.rejected()
    assert [m.reason for m in kept] == ["bad 2", "bad 1"]
    oldest = storage.pop_rejected()
    assert oldest is not None and (oldest.queue, oldest.body) == ("q.high", "first")


def test_clear_deletes_only_this_prefix(feedfan_redis_url: str) -> None:
    mine = RedisStorage(url=feedfan_redis_url, key_prefix="mine:")
    other = RedisStorage(url=feedfan_redis_url, key_prefix="other:")
    try:
        for store in (mine, other):
            store.apply(WriteBatch("add", [(store.feed_key("timeline", 1), 5)], [entry(1)]))
        assert mine.clear() == 1
        assert other.feed_length(other.feed_key("timeline", 1)) == 1
    finally:
        other.clear()


@pytest.mark.parametrize("bad", ["", "feed:\nother"])
def test_a_feed_key_the_script_cannot_carry_is_refused_by_name_writing_nothing(
    feedfan_redis_url: str, bad: str
) -> None:
    # Given the script path, which sends a chunk's feed keys as one argument, a line each
    store = RedisStorage(url=feedfan_redis_url, key_prefix=f"st-{uuid.uuid4().hex[:8]}:")
    good = store.feed_key("timeline", 1)
    try:
        # When a batch names a key that is empty or holds a newline
        with pytest.raises(ValueError, match="feed keys must be non-empty and hold no newline"):
            store.apply(WriteBatch("add", [(good, 5), (bad, 5)], [entry(1)]))
        # Then nothing was written, not even the good feed
        assert store.feed_length(good) == 0
    finally:
        store.clear()
        store.close()


def test_an_unreachable_redis_is_a_storage_error_naming_the_url_without_its_password() -> None:
    store = RedisStorage(url="redis://:s3cret@127.0.0.1:1/0", connection_options={"retry": None})
    with pytest.raises(StorageError) as raised:
        store.ping()
    assert "redis://:***@127.0.0.1:1/0" in str(raised.value)
    assert "s3cret" not in str(raised.value)
    assert "FEEDFAN_REDIS_URL" in str(raised.value)


def test_a_replayed_chunk_counts_as_pending_again(storage: Storage) -> None:
    fanout = "e" * 24
    storage.begin_fanout(fanout, {})
    storage.mark_chunk_failed(fanout, "high:0", "boom")
    storage.end_planning(fanout, 1)
    assert storage.fanout_status(fanout).settled  # type: ignore[union-attr]
    storage.clear_chunk_failure(fanout, "high:0")
    status = storage.fanout_status(fanout)
    assert status is not None and (status.failed, status.pending, status.settled) == (0, 1, False)


def test_starting_a_fanout_stores_writes_begins_and_clears_as_the_separate_calls_do(
    storage: Storage,
) -> None:
    # Given a fanout whose planning failed before, with one chunk done
    fanout = "d" * 24
    storage.begin_fanout(fanout, {"op": "add"})
    storage.apply(WriteBatch("add", [], [], chunk=(fanout, "high:0")))
    storage.mark_chunk_failed(fanout, "plan", "the follower lookup timed out")
    own = storage.feed_key("user", 7)
    pin = Activity(actor=7, verb="pin", object=1)

    # When the producer starts it again with the activity and the author's own feed write
    storage.start_fanout(
        fanout,
        {"op": "add", "user": "7"},
        activities=[pin],
        writes=[WriteBatch("add", [(own, 10)], [(pin.id, pin.sort_key)])],
        clear_failure="plan",
    )

    # Then the activity is stored, the feed written, the fanout begun again (a retry keeps
    # the chunk done), the failure gone
    assert storage.get_activities([pin.id]) == {pin.id: pin}
    assert storage.read_feed(own, offset=0, limit=10) == [(pin.id, pin.sort_key)]
    status = storage.fanout_status(fanout)
    assert status is not None
    assert (status.total, status.done, status.failed) == (None, 1, 0)
    assert (status.meta["op"], status.meta["user"]) == ("add", "7")


def test_starting_a_fanout_on_a_redis_that_lost_its_scripts_loads_them_and_completes(
    feedfan_redis_url: str,
) -> None:
    # Given a Redis storage whose scripts Redis does not hold (as after a restart; shown
    # with names Redis never saw, as SCRIPT FLUSH would empty the whole shared server)
    store = RedisStorage(url=feedfan_redis_url, key_prefix=f"st-{uuid.uuid4().hex[:8]}:")
    try:
        store.begin_fanout("c" * 24, {})
        for script in (store._apply_script, store._begin_script):
            script.sha = "0" * 40
        own = store.feed_key("user", 7)
        pin = Activity(actor=7, verb="pin", object=2)

        # When a fanout starts
        store.start_fanout(
            "b" * 24,
            {"op": "add"},
            activities=[pin],
            writes=[WriteBatch("add", [(own, 10)], [(pin.id, pin.sort_key)])],
        )

        # Then every part of it is written
        assert store.read_feed(own, offset=0, limit=10) == [(pin.id, pin.sort_key)]
        assert store.get_activities([pin.id]) == {pin.id: pin}
        assert store.fanout_status("b" * 24) is not None
    finally:
        store.clear()
        store.close()
