"""The in-process dispatchers: priorities, retries, and refusing bad input."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from feedfan import Activity, FanoutPriority, Manager
from feedfan.activity import ObjectId
from feedfan.local import LocalDispatcher
from feedfan.task import ChunkTask


class Followed(Manager):
    def get_user_follower_ids(self, user_id: ObjectId) -> dict[FanoutPriority, Iterable[ObjectId]]:
        return {FanoutPriority.HIGH: [f"{user_id}-h"], FanoutPriority.LOW: [f"{user_id}-l"]}


class Recording(Followed):
    """Records the priority of every chunk in the order threads run them."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.order: list[str] = []
        self.lock = threading.Lock()

    def run_chunk(self, task: ChunkTask) -> int:
        with self.lock:
            self.order.append(task.priority.value)
        return super().run_chunk(task)


def test_a_local_worker_takes_every_waiting_high_chunk_before_any_low_one() -> None:
    # Given one worker thread, paused, with LOW work queued before HIGH work
    manager = Recording(dispatcher="local", local_workers=1)
    dispatcher = manager.dispatcher
    assert isinstance(dispatcher, LocalDispatcher)
    dispatcher.pause()
    receipts = [
        manager.add_user_activity(f"u{i}", Activity(actor=f"u{i}", verb="pin", object=i))
        for i in range(5)
    ]
    assert (
        dispatcher.queue_depth(FanoutPriority.HIGH),
        dispatcher.queue_depth(FanoutPriority.LOW),
    ) == (5, 5)
    # When it resumes
    dispatcher.resume()
    assert dispatcher.join(timeout=10)
    # Then all HIGH chunks ran first
    assert manager.order == ["high"] * 5 + ["low"] * 5
    assert all(manager.fanout_status(r).complete for r in receipts)  # type: ignore[union-attr]
    manager.close()


def test_a_failing_chunk_is_retried_then_given_up_and_kept() -> None:
    class Flaky(Followed):
        calls = 0

        def run_chunk(self, task: ChunkTask) -> int:
            Flaky.calls += 1
            raise RuntimeError("disk on fire")

    manager = Flaky(dispatcher="local", max_retries=2)
    receipt = manager.add_user_activity("u", Activity(actor="u", verb="pin", object=1))
    status = manager.wait(receipt, timeout=10)
    assert Flaky.calls == 2 * 3  # two chunks, three attempts each
    assert (status.done, status.failed) == (0, 2)
    kept = manager.dispatcher.failed_messages()
    assert len(kept) == 2 and all("gave up: RuntimeError('disk on fire')" in m.reason for m in kept)
    manager.close()


def test_raw_garbage_is_rejected_kept_and_the_threads_go_on() -> None:
    manager = Followed(dispatcher="local")
    manager.dispatcher.push_raw(FanoutPriority.HIGH, b"\x80garbage")
    receipt = manager.add_user_activity("u", Activity(actor="u", verb="pin", object=1))
    assert manager.wait(receipt, timeout=10).complete
    manager.dispatcher.join(timeout=10)  # type: ignore[attr-defined]
    kept = manager.dispatcher.failed_messages()
    assert [m.queue for m in kept] == ["feedfan.high"]
    assert "not UTF-8 text" in kept[0].reason
    manager.close()


def test_close_finishes_waiting_work() -> None:
    manager = Followed(dispatcher="local")
    receipts = [
        manager.add_user_activity("u", Activity(actor="u", verb="pin", object=i)) for i in range(20)
    ]
    manager.close()
    assert all(manager.fanout_status(r).complete for r in receipts)  # type: ignore[union-attr]


def test_replay_runs_a_given_up_chunk_again_and_keeps_garbage() -> None:
    # Given a chunk that failed for good, and a garbage message
    class OnceBroken(Followed):
        broken = True

        def run_chunk(self, task: ChunkTask) -> int:
            if OnceBroken.broken:
                raise RuntimeError("storage hiccup")
            return super().run_chunk(task)

    manager = OnceBroken(dispatcher="local", max_retries=0)
    receipt = manager.add_user_activity("u", Activity(actor="u", verb="pin", object=1))
    assert manager.wait(receipt, timeout=10).failed == 2
    manager.dispatcher.push_raw(FanoutPriority.LOW, b"garbage")
    manager.dispatcher.join(timeout=10)  # type: ignore[attr-defined]
    # When the cause is fixed and the failed tasks are replayed
    OnceBroken.broken = False
    assert manager.dispatcher.replay_failed() == 2
    # Then the fanout completes and only the garbage stays kept
    status = manager.wait(receipt, timeout=10)
    assert (status.done, status.failed) == (2, 0)
    manager.dispatcher.join(timeout=10)  # type: ignore[attr-defined]
    assert [m.body for m in manager.dispatcher.failed_messages()] == ["garbage"]
    manager.close()
