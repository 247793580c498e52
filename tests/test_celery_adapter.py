"""The Celery adapter beyond the conformance suite: guards, eager mode, your own app, errors."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis
from celery import Celery
from kombu.asynchronous.semaphore import LaxBoundedSemaphore
from kombu.exceptions import OperationalError

from feedfan.activity import Activity
from feedfan.backends import _celery_app, _celery_guard
from feedfan.backends.celery import CeleryDispatcher, CeleryManager, register_tasks
from feedfan.config import load_settings
from feedfan.errors import BrokerError, ConfigurationError, DispatchError
from feedfan.fanout import plan_chunks
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.storage.redis import RedisStorage
from feedfan.task import ChunkTask
from feedfan.testing import Harness, MyStreamManager, WorkerProcess, make_user, wait_for
from feedfan.testing.managers import CHUNK_DELAY_VARIABLE, follower_ids, started_chunks
from feedfan.testing.plugin import in_ci
from feedfan.testing.rabbit import RabbitControl

HIGH, LOW = FanoutPriority.HIGH, FanoutPriority.LOW
_DEFAULTS = load_settings(env={}, read_files=False)


def _pin(user: str, number: int = 0) -> Activity:
    return Activity(
        actor=user,
        verb="pin",
        object=f"pin-{number}",
        time=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )


def _namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _chunks(count: int, priority: FanoutPriority = HIGH) -> list[ChunkTask]:
    user = make_user(_namespace(), 0, 0)
    pin = _pin(user)
    return list(
        plan_chunks(
            op="add",
            feeds=("timeline",),
            entries=[(pin.id, pin.sort_key)],
            followers={priority: [f"{user}:f{i}" for i in range(count)]},
            chunk_size=1,
            fanout_id=uuid.uuid4().hex[:24],
        )
    )


class PinManager(CeleryManager):
    """The seed's manager, bound to Celery in code as Stream Framework users do."""

    feed_classes = MyStreamManager.feed_classes
    get_user_follower_ids = MyStreamManager.get_user_follower_ids


class _Pickled:
    """Unpickling this would create a directory: proof that code ran from a payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.makedirs, (str(self.marker),))


@pytest.fixture(autouse=True)
def _forget_registered_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """register_tasks makes an app the process default; no test leaks it to another."""
    monkeypatch.setattr(_celery_app, "_registered_app", None)


@pytest.fixture(scope="module", params=["redis", "amqp"])
def harness(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    """Celery on one broker, with workers started by ``feedfan worker``."""
    redis_url = request.getfixturevalue("feedfan_redis_url")
    broker_url = request.getfixturevalue("feedfan_amqp_url") if request.param == "amqp" else None
    harness = Harness(
        "celery",
        log_dir=tmp_path_factory.mktemp(f"celery-{request.param}"),
        redis_url=redis_url,
        broker_url=broker_url,
    )
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture(scope="module")
def shared(harness: Harness) -> Manager:
    """A manager with one worker serving both queues."""
    manager = harness.manager(harness.settings())
    harness.start_worker(manager.settings)
    return manager


def _settle(harness: Harness, manager: Manager, user: str) -> None:
    receipt = manager.add_user_activity(user, _pin(user))

    def settled() -> bool:
        if not all(worker.alive() for worker in harness.workers):
            raise AssertionError(f"a worker died\n{harness.worker_logs()}")
        status = manager.fanout_status(receipt)
        return status is not None and status.settled

    wait_for(settled, timeout=90, message=f"fanout did not settle\n{harness.worker_logs()}")
    status = manager.fanout_status(receipt)
    assert status is not None and (status.done, status.failed) == (status.total, 0)


def _publish_raw(
    manager: Manager,
    priority: FanoutPriority,
    body: bytes,
    *,
    content_type: str,
    headers: dict[str, Any] | None,
) -> None:
    """Publish one message with kombu itself, as a foreign producer would."""
    dispatcher = manager.dispatcher
    assert isinstance(dispatcher, CeleryDispatcher)
    name = dispatcher.queue_name(priority)
    url = manager.settings.effective_broker_url
    with kombu.Connection(url) as connection:
        queue = kombu.Queue(name, kombu.Exchange(name, type="direct"), routing_key=name)
        connection.Producer().publish(
            body,
            exchange="",
            routing_key=name,
            content_type=content_type,
            content_encoding="binary",
            headers=headers,
            declare=[queue],
        )


# Malformed input ------------------------------------------------------------------


@pytest.mark.broker
def test_garbage_at_the_broker_level_is_kept_and_the_worker_goes_on(
    harness: Harness, shared: Manager, tmp_path: Path
) -> None:
    # Given a worker serving both queues
    dispatcher = shared.dispatcher
    marker = tmp_path / "code-ran-from-a-payload"
    before = len(dispatcher.failed_messages(limit=10_000))
    task_headers = {"task": "feedfan.run", "id": uuid.uuid4().hex, "lang": "py"}
    # When messages Celery cannot run arrive on feedfan's queues
    dispatcher.push_raw(HIGH, b"this is not json at all", envelope=False)
    dispatcher.push_raw(LOW, b"\x80\x05not even utf-8", envelope=False)
    _publish_raw(
        shared,
        HIGH,
        pickle.dumps(_Pickled(marker)),
        content_type="application/x-python-serialize",
        headers=task_headers,
    )
    _publish_raw(
        shared,
        LOW,
        b'[["x"], {}, {}]',
        content_type="application/json",
        headers={**task_headers, "task": "evil.rm_rf"},
    )
    _publish_raw(shared, HIGH, b'{"x": 1}', content_type="application/json", headers=task_headers)
    _publish_raw(shared, LOW, b"{not json", content_type="application/json", headers=task_headers)
    _publish_raw(shared, HIGH, b'{"hello": 1}', content_type="application/json", headers={})
    sent = 7
    if harness.broker_url is None:  # JSON, but not a kombu message: only Redis can carry it
        dispatcher.push_raw(LOW, b'{"properties": 1}', envelope=False)
        sent += 1
    # Then valid work behind them completes
    _settle(harness, shared, make_user(_namespace(), 3, 3))
    # And each one is kept with its reason, nothing was unpickled, the worker lives
    wait_for(
        lambda: len(dispatcher.failed_messages(limit=10_000)) >= before + sent,
        timeout=30,
        message=f"expected {sent} kept messages\n{harness.worker_logs()}",
    )
    everything = dispatcher.failed_messages(limit=10_000)
    kept = everything[: len(everything) - before]
    reasons = " | ".join(message.reason for message in kept)
    assert len(kept) == sent
    assert "pickle" in reasons.lower() or "refusing" in reasons.lower(), reasons
    assert "'evil.rm_rf' is not registered" in reasons
    assert "not Celery's [args, kwargs, embed]" in reasons
    assert "names no task" in reasons
    assert not marker.exists(), "a pickled payload was unpickled"
    assert all(worker.alive() for worker in harness.workers)
    assert any(message.body == "this is not json at all" for message in kept)
    assert "feedfan rejected a message" in "\n".join(w.log_tail(400) for w in harness.workers)


@pytest.mark.broker
def test_a_pickled_task_is_refused_and_never_unpickled(
    harness: Harness, shared: Manager, tmp_path: Path
) -> None:
    # Given a message for feedfan's task whose body is a pickle
    marker = tmp_path / "unpickled"
    before = len(shared.dispatcher.failed_messages(limit=10_000))
    _publish_raw(
        shared,
        LOW,
        pickle.dumps(_Pickled(marker)),
        content_type="application/x-python-serialize",
        headers={"task": "feedfan.run", "id": uuid.uuid4().hex},
    )
    # When the worker meets it
    wait_for(
        lambda: len(shared.dispatcher.failed_messages(limit=10_000)) > before,
        timeout=60,
        message=f"the pickled message was not kept\n{harness.worker_logs()}",
    )
    # Then it is kept, refused for its content type, and no code ran
    kept = shared.dispatcher.failed_messages(limit=1)[0]
    assert "Refusing to deserialize" in kept.reason and "pickle" in kept.reason
    assert not marker.exists()


@pytest.mark.broker
def test_replay_sends_kept_valid_tasks_back_and_keeps_the_rest(
    harness: Harness, shared: Manager
) -> None:
    # Given a kept valid chunk (as after giving up) and a kept malformed message
    dispatcher = shared.dispatcher
    user = make_user(_namespace(), 1, 0)
    pin = _pin(user)
    shared.storage.store_activities([pin])
    chunk = next(
        plan_chunks(
            op="add",
            feeds=tuple(shared.registered_feeds),
            entries=[(pin.id, pin.sort_key)],
            followers={HIGH: follower_ids(user, HIGH)},
            chunk_size=5,
            fanout_id=uuid.uuid4().hex[:24],
        )
    )
    shared.storage.keep_rejected(shared.settings.queue_high, chunk.to_json(), "gave up: test")
    shared.storage.keep_rejected(shared.settings.queue_low, "garbage", "not JSON")
    # When kept messages are replayed
    replayed = dispatcher.replay_failed()
    # Then the valid chunk runs and the garbage stays kept
    assert replayed >= 1
    follower = next(follower_ids(user, HIGH))
    wait_for(
        lambda: shared.get_feed(follower).entries() == [(pin.id, pin.sort_key)],
        timeout=60,
        message=f"the replayed chunk did not run\n{harness.worker_logs()}",
    )
    assert any(m.body == "garbage" for m in dispatcher.failed_messages(limit=10_000))
    assert not any(m.body == chunk.to_json() for m in dispatcher.failed_messages(limit=10_000))


def _worker_of_app(harness: Harness, tmp_path: Path, module: str, source: str) -> Manager:
    """A manager of ``module:<its one class>`` written from ``source``, with a worker running it."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    name = re.search(r"^class (\w+)", textwrap.dedent(source), re.MULTILINE)
    assert name is not None
    settings = harness.settings(app=f"{module}:{name.group(1)}")
    manager = harness.manager(settings)
    harness.start_worker(settings, env={"PYTHONPATH": str(tmp_path)})
    return manager


@pytest.mark.broker
def test_a_chunk_that_keeps_failing_is_retried_then_kept(harness: Harness, tmp_path: Path) -> None:
    # Given a worker whose manager fails every write
    manager = _worker_of_app(
        harness,
        tmp_path,
        "failing_app",
        """
        from feedfan.testing.managers import ConformanceManager

        class FailingManager(ConformanceManager):
            def run_chunk(self, task):
                raise RuntimeError("disk full")
        """,
    )
    settings = manager.settings
    user = make_user(_namespace(), 2, 1)
    # When a fanout is sent
    receipt = manager.add_user_activity(user, _pin(user))
    status = manager.wait(receipt, timeout=90)
    # Then each chunk ran 1 + max_retries times, on its own queue, and was kept as failed
    assert (status.done, status.failed) == (0, 2)
    kept = manager.dispatcher.failed_messages(limit=2)
    assert {m.queue for m in kept} == {settings.queue_high, settings.queue_low}
    assert all(m.reason == "gave up: RuntimeError('disk full')" for m in kept)
    log = "\n".join(worker.log_tail(400) for worker in harness.workers)
    assert log.count("(attempt 2 of 3), retrying") >= 2


@pytest.mark.broker
def test_a_chunk_killed_at_the_hard_time_limit_is_kept_and_counted_failed(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a worker whose chunks ignore the soft time limit, as code stuck in C would
    manager = _worker_of_app(
        harness,
        tmp_path,
        "stuck_app",
        """
        import time
        from feedfan.testing.managers import ConformanceManager

        class StuckManager(ConformanceManager):
            def run_chunk(self, task):
                end = time.monotonic() + 60
                while time.monotonic() < end:
                    try:
                        time.sleep(0.05)
                    except BaseException:  # SoftTimeLimitExceeded too
                        pass
                return 0
        """,
    )
    settings = manager.settings
    user = make_user(_namespace(), 1, 0)
    # When a fanout is sent and Celery kills its chunk at the hard time limit
    receipt = manager.add_user_activity(user, _pin(user))
    status = manager.wait(receipt, timeout=60)
    # Then the chunk is counted failed and kept with the reason, not acknowledged away
    assert (status.done, status.failed) == (0, 1), harness.worker_logs()
    kept = manager.dispatcher.failed_messages(limit=5)
    assert len(kept) == 1 and kept[0].queue == settings.queue_high
    limit = _celery_app.hard_time_limit(settings)
    assert f"killed at the hard time limit ({limit} s)" in kept[0].reason
    # And it is not delivered again behind Celery's back (it would be killed and kept twice)
    time.sleep(limit + 2)
    assert len(manager.dispatcher.failed_messages(limit=5)) == 1
    assert manager.dispatcher.queue_depth(HIGH) == 0
    assert all(worker.alive() for worker in harness.workers)


@pytest.mark.broker
def test_sending_after_a_purge_declares_the_queues_again(harness: Harness) -> None:
    # Given a dispatcher that sent tasks, then deleted its queues
    dispatcher = harness.manager(harness.settings()).dispatcher
    dispatcher.enqueue_many(_chunks(3))
    dispatcher.purge()
    # When it sends again
    dispatcher.enqueue_many(_chunks(2))
    # Then the queues exist again and hold the new tasks
    wait_for(
        lambda: dispatcher.queue_depth(HIGH) == 2,
        timeout=20,
        message=f"queue depth is {dispatcher.queue_depth(HIGH)}, expected 2",
    )


@pytest.mark.broker
def test_background_planning_sends_the_chunks_from_inside_a_worker(harness: Harness) -> None:
    # Given planning moved to the workers
    settings = harness.settings(planning="background")
    manager = harness.manager(settings)
    harness.start_worker(settings)
    user = make_user(_namespace(), 7, 6)
    pin = _pin(user)
    # When an activity is added, only the planning task is sent
    receipt = manager.add_user_activity(user, pin)
    assert receipt.planned_in_background and receipt.chunks == 0
    # Then a worker plans, publishes the chunks through Celery, and they all run
    status = manager.wait(receipt, timeout=90)
    assert (status.total, status.done, status.failed) == (4, 4, 0)
    for priority in FanoutPriority:
        for follower in follower_ids(user, priority):
            assert manager.get_feed(follower).entries() == [(pin.id, pin.sort_key)]


# Priorities and redelivery --------------------------------------------------------


@pytest.mark.broker
def test_a_worker_serving_both_queues_on_redis_takes_every_high_chunk_first(
    harness: Harness,
) -> None:
    if harness.broker_url is not None:
        dispatcher = harness.manager(harness.settings()).dispatcher
        assert dispatcher.strict_priority is False  # declared, and documented
        return
    # Given LOW chunks queued before HIGH ones, and no worker yet
    manager = harness.manager(harness.settings(worker_concurrency=1))
    storage = manager.storage
    assert isinstance(storage, RedisStorage)
    assert manager.dispatcher.enqueue_many(_chunks(4, LOW) + _chunks(4, HIGH)) == 8
    # When one single-process worker serving both queues starts
    harness.start_worker(manager.settings, env={CHUNK_DELAY_VARIABLE: "0.05"})
    wait_for(
        lambda: len(started_chunks(storage)) == 8,
        timeout=60,
        message=f"chunks did not all run\n{harness.worker_logs()}",
    )
    # Then all HIGH chunks started before any LOW one
    order = [str(row["chunk"]).split(":")[0] for row in started_chunks(storage)]
    assert order == ["high"] * 4 + ["low"] * 4


@pytest.fixture
def rabbit(
    feedfan_redis_url: str, feedfan_amqp_url: str, tmp_path: Path
) -> Iterator[tuple[Harness, RabbitControl]]:
    """Celery on RabbitMQ, with workers started by the test, and rabbitmqctl on its vhost."""
    if not RabbitControl.available():
        message = "rabbitmqctl is not on PATH: the test reads RabbitMQ's consumers with it"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    harness = Harness(
        "celery", log_dir=tmp_path, redis_url=feedfan_redis_url, broker_url=feedfan_amqp_url
    )
    try:
        yield harness, RabbitControl(feedfan_amqp_url)
    finally:
        harness.close()


def _consumers(control: RabbitControl, queues: Iterable[str]) -> dict[str, tuple[str, int]]:
    """``queue: (channel, prefetch limit)`` of each consumer of ``queues``, as RabbitMQ lists it."""
    wanted = set(queues)
    rows = control.rows("list_consumers", "queue_name", "channel_pid", "prefetch_count")
    return {row[0]: (row[1], int(row[2])) for row in rows if row[0] in wanted}


def _limits(control: RabbitControl, queues: Iterable[str]) -> dict[str, int]:
    """``queue: prefetch limit`` of each consumer of ``queues``."""
    return {queue: limit for queue, (_, limit) in _consumers(control, queues).items()}


@pytest.mark.broker
def test_a_worker_serving_both_queues_on_rabbitmq_has_a_prefetch_limit_for_each_queue(
    rabbit: tuple[Harness, RabbitControl],
) -> None:
    # Given a worker serving both queues on RabbitMQ, two processes
    harness, control = rabbit
    settings = harness.settings(worker_concurrency=2)
    harness.start_worker(settings)
    queues = (settings.queue_high, settings.queue_low)

    # When it has subscribed to both
    wait_for(
        lambda: len(_consumers(control, queues)) == 2,
        timeout=60,
        message=f"the worker did not consume both queues\n{harness.worker_logs()}",
    )

    # Then each queue's consumer has a limit of its own, whatever the other holds (no limit
    # shared by the channel, with which LOW chunks could keep HIGH ones waiting): a chunk
    # per process on LOW, two on HIGH, so the next HIGH chunks wait in the worker, ready
    found = _consumers(control, queues)
    assert {queue: prefetch for queue, (_, prefetch) in found.items()} == {
        settings.queue_high: 4,
        settings.queue_low: 2,
    }
    channels = {channel for channel, _ in found.values()}
    shared = {
        row[0]: int(row[1])
        for row in control.node_rows("list_channels", "pid", "global_prefetch_count")
        if row[0] in channels
    }
    assert shared == dict.fromkeys(channels, 0)


@pytest.mark.broker
def test_a_worker_of_the_high_queue_alone_keeps_a_limit_of_one_chunk_per_process(
    rabbit: tuple[Harness, RabbitControl],
) -> None:
    # Given a worker of the HIGH queue only, on RabbitMQ, two processes
    harness, control = rabbit
    settings = harness.settings(worker_concurrency=2)
    harness.start_worker(settings, priority="high")
    queues = (settings.queue_high,)

    # When it has subscribed
    wait_for(
        lambda: len(_limits(control, queues)) == 1,
        timeout=60,
        message=f"the worker did not consume its queue\n{harness.worker_logs()}",
    )

    # Then it may hold one chunk per process: with no LOW chunk to run first, more HIGH
    # chunks held here could only wait while another worker idles
    assert _limits(control, queues) == {settings.queue_high: 2}


@pytest.mark.broker
def test_after_a_connection_loss_with_chunks_running_the_worker_gets_its_full_limit_back(
    rabbit: tuple[Harness, RabbitControl],
) -> None:
    # Given a worker of both queues on RabbitMQ running two slow chunks, more waiting
    harness, control = rabbit
    if not control.own_vhost:
        message = "rabbitmqctl made no vhost of this session's own, and / is not ours to cut"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    settings = harness.settings(worker_concurrency=2)
    manager = harness.manager(settings)
    storage = manager.storage
    assert isinstance(storage, RedisStorage)
    harness.start_worker(settings, env={CHUNK_DELAY_VARIABLE: "3"})
    queues = (settings.queue_high, settings.queue_low)
    wait_for(lambda: len(_limits(control, queues)) == 2, timeout=60, message=harness.worker_logs())
    assert manager.dispatcher.enqueue_many(_chunks(6, LOW)) == 6
    wait_for(
        lambda: len(started_chunks(storage)) >= 2,
        timeout=30,
        message=f"the chunks did not start\n{harness.worker_logs()}",
    )

    # When the broker drops the worker's connection while they run
    assert control.close_connections() >= 1
    wait_for(
        lambda: (
            "Connection to broker lost" in harness.worker_logs()
            and len(_limits(control, queues)) == 2
        ),
        timeout=60,
        message=f"the worker did not consume again\n{harness.worker_logs()}",
    )

    # Then each queue's consumer gets its full limit again: Celery's lowered limit for
    # the chunks that were running is not left behind on the new consumers
    assert _limits(control, queues) == {settings.queue_high: 4, settings.queue_low: 2}


class _Waiting:
    """A request as the pool semaphore holds it: only its delivery info matters here."""

    def __init__(self, name: str, routing_key: str | None) -> None:
        self.name = name
        self.delivery_info = {"routing_key": routing_key} if routing_key else None


def _busy_semaphore(processes: int) -> tuple[LaxBoundedSemaphore, list[str]]:
    """Celery's pool semaphore made HIGH first, every process busy; and the list of what ran."""
    semaphore = LaxBoundedSemaphore(processes)
    assert _celery_guard.high_first(semaphore, "ff.high")
    ran: list[str] = []
    for number in range(processes):
        semaphore.acquire(ran.append, f"running{number}")
    return semaphore, ran


def _arrive(semaphore: LaxBoundedSemaphore, ran: list[str], name: str, key: str | None) -> None:
    semaphore.acquire(lambda request: ran.append(request.name), _Waiting(name, key))


def test_the_pool_semaphore_runs_waiting_high_requests_first_each_in_arrival_order() -> None:
    # Given Celery's pool semaphore of two processes, made HIGH first, both processes busy
    semaphore, ran = _busy_semaphore(2)

    # When requests arrive from both queues (and one without delivery info) while they run
    arrivals = [("low1", "ff.low"), ("high1", "ff.high"), ("odd", None), ("high2", "ff.high")]
    arrivals += [("low2", "ff.low"), ("high3", "ff.high")]
    for name, routing_key in arrivals:
        _arrive(semaphore, ran, name, routing_key)
    for _ in arrivals:
        semaphore.release()

    # Then HIGH ones run first, each group in the order it arrived
    assert ran == ["running0", "running1", "high1", "high2", "high3", "low1", "odd", "low2"]
    # and installing it twice changes nothing; a semaphore of another kind is left alone
    assert _celery_guard.high_first(semaphore, "ff.high")
    assert isinstance(semaphore._add_waiter, _celery_guard._HighFirst)
    assert not _celery_guard.high_first(object(), "ff.high")


def test_a_waiting_low_request_goes_behind_at_most_twice_the_process_count_of_high_ones() -> None:
    # Given a one-process pool, HIGH first, with a LOW request waiting
    semaphore, ran = _busy_semaphore(1)
    _arrive(semaphore, ran, "low", "ff.low")

    # When HIGH requests keep arriving, one more each time a request finishes
    for number in range(6):
        _arrive(semaphore, ran, f"high{number}", "ff.high")
        semaphore.release()

    # Then the LOW request runs after two of them, not after the flow of HIGH ones ends
    assert ran[:4] == ["running0", "high0", "high1", "low"]
    assert ran[4:] == ["high2", "high3", "high4"]


@pytest.mark.broker
def test_a_worker_of_both_queues_on_rabbitmq_runs_a_waiting_high_chunk_before_a_waiting_low_one(
    rabbit: tuple[Harness, RabbitControl],
) -> None:
    # Given a one-process worker of both queues on RabbitMQ, running a slow HIGH chunk
    harness, _ = rabbit
    settings = harness.settings(worker_concurrency=1)
    manager = harness.manager(settings)
    storage = manager.storage
    assert isinstance(storage, RedisStorage)
    harness.start_worker(settings, env={CHUNK_DELAY_VARIABLE: "2"})
    first, later = _chunks(2, HIGH)
    (low,) = _chunks(1, LOW)
    assert manager.dispatcher.enqueue_many([first]) == 1
    wait_for(
        lambda: len(started_chunks(storage)) == 1,
        timeout=30,
        message=f"the first chunk did not start\n{harness.worker_logs()}",
    )

    # When a LOW chunk reaches the worker, then a HIGH one, while that chunk runs
    assert manager.dispatcher.enqueue_many([low]) == 1
    wait_for(
        lambda: f"{low.task_id}] received" in harness.worker_logs(),
        timeout=30,
        message=f"the LOW chunk did not reach the worker\n{harness.worker_logs()}",
    )
    assert manager.dispatcher.enqueue_many([later]) == 1

    # Then the HIGH chunk runs next, though the LOW one waited longer
    wait_for(
        lambda: len(started_chunks(storage)) == 3,
        timeout=30,
        message=f"the chunks did not all start\n{harness.worker_logs()}",
    )
    order = [row["chunk"] for row in started_chunks(storage)]
    assert order == [first.chunk_key, later.chunk_key, low.chunk_key]


class _Killed(Exception):
    """The consuming process dies here."""


@pytest.mark.broker
@pytest.mark.parametrize(
    ("prefix", "layout"),
    [("", "kombu"), ("ff-prefix:", "kombu"), ("", "compact, properties first")],
    ids=["kombu-json", "global-keyprefix", "other-json"],
)
def test_a_worker_killed_as_redis_hands_it_a_message_leaves_the_message_restorable(
    feedfan_redis_url: str, prefix: str, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"feedfan.t{uuid.uuid4().hex[:10]}"
    options: dict[str, Any] = {
        "global_keyprefix": prefix,
        "unacked_key": f"{name}.unacked",
        "unacked_index_key": f"{name}.unacked_index",
    }
    queue = kombu.Queue(name, kombu.Exchange(name, type="direct"), routing_key=name)
    raw = redis.Redis.from_url(feedfan_redis_url)

    def connect(**extra: Any) -> kombu.Connection:
        return kombu.Connection(
            feedfan_redis_url,
            transport=_celery_app.TRANSPORT_PATH,
            transport_options={**options, **extra},
        )

    def received(connection: kombu.Connection) -> list[Any]:
        bodies: list[Any] = []

        def keep(body: Any, message: Any) -> None:
            bodies.append(body)
            message.ack()

        with (
            connection.Consumer(queue, callbacks=[keep], accept=["json"]),
            contextlib.suppress(TimeoutError),
        ):
            connection.drain_events(timeout=2)
        return bodies

    try:
        with connect() as connection:
            connection.Producer().publish(
                {"chunk": 1}, exchange=queue.exchange, routing_key=name, declare=[queue]
            )
        if layout != "kombu":  # as another producer's JSON library might write it
            item = raw.rpop(prefix + name)
            assert item is not None
            message = json.loads(item)
            message = {"properties": message.pop("properties"), **message}
            raw.lpush(prefix + name, json.dumps(message, separators=(",", ":")))

        # Given a consumer that dies once Redis has answered its pop, before it reads the answer
        def dies(channel: Any, **_: Any) -> None:
            channel.client.connection.disconnect()
            raise _Killed

        with monkeypatch.context() as patch:
            patch.setattr(_celery_guard.GuardedRedisChannel, "_brpop_read", dies)
            with connect() as connection, pytest.raises(_Killed):
                received(connection)
        # Then the message left the queue but is recorded as unacknowledged
        assert raw.llen(prefix + name) == 0
        assert raw.hlen(prefix + options["unacked_key"]) == 1
        assert raw.zcard(prefix + options["unacked_index_key"]) == 1
        # And once its visibility timeout passes it is restored and delivered again
        with connect(visibility_timeout=0) as connection:
            connection.default_channel.qos.restore_visible(num=10, interval=1)
            assert received(connection) == [{"chunk": 1}]
        assert raw.hlen(prefix + options["unacked_key"]) == 0
    finally:
        raw.delete(*(raw.keys(f"{prefix}*{name}*") or [name]))
        raw.close()


@pytest.mark.broker
def test_items_a_take_pops_that_kombu_cannot_read_are_kept_and_leave_no_record(
    feedfan_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"feedfan.t{uuid.uuid4().hex[:10]}"
    options = {"unacked_key": f"{name}.unacked", "unacked_index_key": f"{name}.unacked_index"}
    queue = kombu.Queue(name, kombu.Exchange(name, type="direct"), routing_key=name)
    raw = redis.Redis.from_url(feedfan_redis_url)
    kept: list[tuple[str, bytes | str, str]] = []

    def keep(queue: str, body: bytes | str, reason: str, *, feedfan_only: bool) -> bool:
        kept.append((queue, body, reason))
        return True

    monkeypatch.setattr(_celery_guard, "keep_garbage", keep)
    connection = kombu.Connection(
        feedfan_redis_url, transport=_celery_app.TRANSPORT_PATH, transport_options=options
    )
    try:
        # Given, queued before any consumer: no JSON, a message with a bad body, a good one
        connection.Producer().publish(
            {"chunk": 1}, exchange=queue.exchange, routing_key=name, declare=[queue]
        )
        good = raw.rpop(name)
        assert good is not None
        message = json.loads(good)
        message["body"] = "abc"
        message["properties"]["delivery_tag"] = uuid.uuid4().hex
        bad_body = json.dumps(message).encode()
        raw.lpush(name, b"not json", bad_body, good)
        bodies: list[Any] = []

        def take(body: Any, message: Any) -> None:
            bodies.append(body)
            message.ack()

        # When a consumer takes them
        with connection.Consumer(queue, callbacks=[take], accept=["json"]):
            for _ in range(3):
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=1)
        # Then the good one is delivered, the other two kept with their reason
        assert bodies == [{"chunk": 1}]
        assert [(q, body) for q, body, _ in kept] == [(name, b"not json"), (name, bad_body)]
        assert "not JSON" in kept[0][2] and "base64" in kept[1][2]
        # And no unacknowledged record is left to bring any of them back
        assert raw.llen(name) == 0
        assert raw.hlen(options["unacked_key"]) == 0
        assert raw.zcard(options["unacked_index_key"]) == 0
    finally:
        connection.release()
        raw.delete(*(raw.keys(f"*{name}*") or [name]))
        raw.close()


@pytest.mark.broker
def test_the_redelivery_bound_follows_the_broker(harness: Harness) -> None:
    # Given the suite's settings: redelivery_timeout=8
    dispatcher = harness.manager(harness.settings()).dispatcher
    # Then Redis redelivers after the visibility timeout plus one 2 s sweep,
    # and RabbitMQ within two 10 s heartbeats of losing a worker's connection
    expected = 8 + 2 if harness.broker_url is None else 2 * 10
    assert dispatcher.redelivery_bound() == expected


# Bulk publishing ------------------------------------------------------------------


@pytest.mark.broker
def test_a_bulk_publish_uses_one_connection_and_one_producer(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = harness.manager(harness.settings())
    connects: list[int] = []
    publishes: list[tuple[int, int]] = []
    establish = kombu.Connection._establish_connection
    publish = kombu.Producer.publish

    def counting_establish(self: kombu.Connection) -> Any:
        connects.append(id(self))
        return establish(self)

    def counting_publish(self: kombu.Producer, *args: Any, **kwargs: Any) -> Any:
        publishes.append((id(self), id(self.connection)))
        return publish(self, *args, **kwargs)

    monkeypatch.setattr(kombu.Connection, "_establish_connection", counting_establish)
    monkeypatch.setattr(kombu.Producer, "publish", counting_publish)
    # When 1,000 chunk tasks are sent
    accepted = manager.dispatcher.enqueue_many(_chunks(1000))
    # Then one connection and one producer carried all of them, and all are queued
    assert accepted == 1000
    assert len(publishes) == 1000
    assert len(set(publishes)) == 1
    assert len(connects) == 1
    wait_for(
        lambda: manager.dispatcher.queue_depth(HIGH) == 1000,
        timeout=20,
        message=f"queue depth is {manager.dispatcher.queue_depth(HIGH)}, expected 1000",
    )


@pytest.mark.broker
def test_a_failure_midway_reports_how_many_tasks_were_accepted(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a broker connection that breaks at the 700th task of 1,000, and stays broken
    manager = harness.manager(harness.settings())
    dispatcher = manager.dispatcher
    assert isinstance(dispatcher, CeleryDispatcher)
    send_task = dispatcher.app.send_task
    calls = 0

    def breaking_send_task(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls >= 700:  # for good: a batch that fails untouched is sent once more
            raise OperationalError("connection reset by peer")
        return send_task(*args, **kwargs)

    monkeypatch.setattr(dispatcher.app, "send_task", breaking_send_task)
    # When the batch is sent
    with pytest.raises(DispatchError) as raised:
        dispatcher.enqueue_many(_chunks(1000))
    # Then `accepted` is exactly what the queue holds: the first three batches
    # (64 + 128 + 256 tasks), none of the fourth (512), whose first Redis pipeline
    # or AMQP transaction of 500 had not been committed when the 700th task broke
    accepted = raised.value.accepted
    assert isinstance(raised.value, BrokerError)
    assert accepted == 448
    monkeypatch.undo()
    wait_for(
        lambda: dispatcher.queue_depth(HIGH) == accepted,
        timeout=20,
        message=f"queue depth is {dispatcher.queue_depth(HIGH)}, expected {accepted}",
    )


# Configuration -----------------------------------------------------------------------


@pytest.mark.broker
def test_celery_manager_bound_in_code_sends_to_celery(harness: Harness) -> None:
    # Given a manager bound to Celery in code, and settings that name another queue
    settings = harness.settings().with_values({"dispatcher": "local"}, source="a config file")
    manager = PinManager(settings=settings)
    harness.managers.append(manager)
    # Then its dispatcher is Celery's, and chunks wait in the Celery queues
    assert isinstance(manager.dispatcher, CeleryDispatcher)
    assert manager.settings.sources["dispatcher"].endswith("PinManager.bound_dispatcher")
    user = make_user(_namespace(), 6, 1)
    receipt = manager.add_user_activity(user, _pin(user))
    assert (receipt.high_chunks, receipt.low_chunks) == (2, 1)
    wait_for(
        lambda: (
            (manager.dispatcher.queue_depth(HIGH), manager.dispatcher.queue_depth(LOW)) == (2, 1)
        ),
        timeout=20,
        message="chunks are not in the Celery queues",
    )


@pytest.mark.broker
def test_a_users_manager_moves_from_local_to_celery_by_configuration_alone(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [v for v in os.environ if v.startswith("FEEDFAN_")]:
        monkeypatch.delenv(name)
    # Given the user's manager with no configuration: the embedded default
    with MyStreamManager() as local:
        assert local.dispatcher.name == "local"
        user = make_user(_namespace(), 2, 2)
        status = local.wait(local.add_user_activity(user, _pin(user)), timeout=30)
        assert status.done == 2
    # When only environment variables change, and a worker runs
    settings = harness.settings()
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    harness.start_worker(settings)
    manager = MyStreamManager()
    harness.managers.append(manager)
    # Then the same class fans out through Celery
    assert isinstance(manager.dispatcher, CeleryDispatcher)
    _settle(harness, manager, make_user(_namespace(), 3, 2))


@pytest.mark.broker
def test_the_users_own_celery_app_runs_feedfans_task_beside_its_own(
    harness: Harness, tmp_path: Path
) -> None:
    # Given the user's own Celery app module, which registers feedfan's task
    settings = harness.settings()
    (tmp_path / "userproj.py").write_text(
        textwrap.dedent(
            """
            import os
            from celery import Celery
            from feedfan.backends.celery import register_tasks

            app = Celery("userproj")
            app.conf.update(
                broker_url=os.environ["USERPROJ_BROKER_URL"],
                task_serializer="json",
                accept_content=["json"],
                broker_transport_options={"visibility_timeout": 60},
            )

            @app.task(name="userproj.hello")
            def hello():
                return "hello"

            register_tasks(app)
            """
        )
    )
    app = Celery("userproj-producer", set_as_current=False)
    app.conf.update(
        broker_url=settings.effective_broker_url,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": 60},
    )
    # When the user starts their own worker with the documented command
    env = {
        **os.environ,
        **settings.to_env(),
        "USERPROJ_BROKER_URL": settings.effective_broker_url,
        "PYTHONPATH": str(tmp_path),
    }
    queues = f"{settings.queue_high},{settings.queue_low}"
    log = tmp_path / "userproj-worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "userproj:app", "worker", "-Q", queues),
                *("--prefetch-multiplier", "1", "-c", "1", "--without-mingle", "--without-gossip"),
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = WorkerProcess(process, log, "all")
    harness.workers.append(worker)
    manager = PinManager(settings=settings, celery_app=app)
    harness.managers.append(manager)
    assert manager.dispatcher.app is app
    # Then fanouts run on it, and garbage on feedfan's queues is kept, not dropped
    _settle(harness, manager, make_user(_namespace(), 4, 3))
    before = len(manager.dispatcher.failed_messages(limit=10_000))
    _publish_raw(
        manager,
        HIGH,
        b"[[], {}, {}]",
        content_type="application/json",
        headers={"task": "nobody.knows", "id": uuid.uuid4().hex},
    )
    wait_for(
        lambda: len(manager.dispatcher.failed_messages(limit=10_000)) > before,
        timeout=60,
        message=f"the unknown task was not kept\n{worker.log_tail()}",
    )
    assert worker.alive()


def test_an_app_that_accepts_pickle_is_refused() -> None:
    # Given a Celery app that accepts pickle
    app = Celery("unsafe", set_as_current=False)
    app.conf.update(broker_url="redis://127.0.0.1:1/0", accept_content=["json", "pickle"])
    # When it is given to feedfan, then feedfan refuses it and says what to set
    with pytest.raises(ConfigurationError, match=r"accepts pickle.*accept_content=\['json'\]"):
        register_tasks(app, settings=_DEFAULTS)


def test_an_app_whose_visibility_timeout_is_below_the_chunk_time_limit_is_refused() -> None:
    app = Celery("short", set_as_current=False)
    app.conf.update(
        broker_url="redis://127.0.0.1:1/0",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": 60},
    )
    with pytest.raises(ConfigurationError, match=r"visibility_timeout'\]=60 is not above"):
        register_tasks(app, settings=_DEFAULTS)


def test_an_app_with_prefetch_above_one_is_accepted_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Celery("hoarder", set_as_current=False)
    app.conf.update(
        broker_url="amqp://guest:guest@127.0.0.1:1//",
        accept_content=["json"],
        worker_prefetch_multiplier=4,
    )
    with caplog.at_level(logging.WARNING, logger="feedfan.celery"):
        register_tasks(app, settings=_DEFAULTS)
    assert "worker_prefetch_multiplier=4" in caplog.text
    assert app.conf.worker_consumer == _celery_app.CONSUMER_PATH
    assert _celery_app.default_app() is app


def test_a_redis_app_that_round_robins_its_queues_is_not_strict_about_priorities(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given the user's app on Redis with kombu's default queue order
    app = Celery("roundrobin", set_as_current=False)
    app.conf.update(
        broker_url="redis://127.0.0.1:1/0",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": 600},
    )
    settings = _DEFAULTS.replace(dispatcher="celery")
    # Then feedfan says so, and does not claim strict priorities
    with caplog.at_level(logging.WARNING, logger="feedfan.celery"):
        assert CeleryDispatcher(settings, app=app).strict_priority is False
    assert "queue_order_strategy" in caplog.text
    # Unless the app lists its queues in priority order
    app.conf.broker_transport_options = {
        "visibility_timeout": 600,
        "queue_order_strategy": "priority",
    }
    assert CeleryDispatcher(settings, app=app).strict_priority is True


@pytest.mark.broker
@pytest.mark.parametrize("style", ["task_always_eager", "CELERY_ALWAYS_EAGER"])
def test_always_eager_in_the_users_config_runs_chunks_inline(
    feedfan_redis_url: str, style: str
) -> None:
    # Given the user's Celery config asks for eager tasks, and no broker is reachable
    class Config:
        pass

    setattr(Config, style, True)
    setattr(Config, "accept_content" if style.islower() else "CELERY_ACCEPT_CONTENT", ["json"])
    app = Celery("devmode", set_as_current=False)
    app.config_from_object(Config)
    app.conf.broker_url = "redis://127.0.0.1:1/0"
    namespace = _namespace()
    manager = PinManager(
        celery_app=app,
        redis_url=feedfan_redis_url,
        key_prefix=f"{namespace}:",
        queue_high=f"{namespace}.high",
        queue_low=f"{namespace}.low",
    )
    try:
        assert manager.dispatcher.runs_in_process and manager.dispatcher.redelivery_bound() is None
        # When an activity is added
        user = make_user(namespace, 3, 2)
        pin = _pin(user)
        receipt = manager.add_user_activity(user, pin)
        # Then every chunk already ran, inline
        assert receipt.chunks == 2
        for priority in FanoutPriority:
            for follower in follower_ids(user, priority):
                assert manager.get_feed(follower).entries() == [(pin.id, pin.sort_key)]
        # And a malformed body is judged by the JSON codec and kept
        manager.dispatcher.push_raw(LOW, b'{"v": 99}')
        assert "version 99" in manager.dispatcher.failed_messages(limit=1)[0].reason
    finally:
        manager.storage.clear()
        manager.close()


# Errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@127.0.0.1:1/0", "redis://:***@127.0.0.1:1/0"),
        ("amqp://guest:s3cret@127.0.0.1:1//", "amqp://guest:***@127.0.0.1:1//"),
        # RabbitMQ itself refuses the password
        ("amqp://guest:s3cret@127.0.0.1:5672//", "amqp://guest:***@127.0.0.1:5672//"),
    ],
)
@pytest.mark.broker
def test_an_unreachable_or_refusing_broker_raises_a_broker_error_naming_the_masked_url(
    url: str, shown: str, feedfan_redis_url: str
) -> None:
    # Given a broker that cannot be reached, or refuses the password
    namespace = _namespace()
    manager = MyStreamManager(
        dispatcher="celery",
        broker_url=url,
        redis_url=feedfan_redis_url,
        key_prefix=f"{namespace}:",
    )
    user = make_user(namespace, 2, 0)
    try:
        # When a fanout is sent
        with pytest.raises(BrokerError) as raised:
            manager.add_user_activity(user, _pin(user))
    finally:
        manager.storage.clear()
        manager.close()
    # Then the error names the URL with its password masked, and what to check
    message = str(raised.value)
    assert shown in message and "s3cret" not in message
    assert "Check that the" in message and "broker_url" in message
    assert raised.value.accepted == 0


def test_feedfan_worker_print_shows_the_celery_command() -> None:
    # When a user asks for the worker command
    result = subprocess.run(
        [
            *(sys.executable, "-m", "feedfan", "worker", "--print", "--dispatcher", "celery"),
            *(
                "--broker-url",
                "redis://127.0.0.1:6379/0",
                "--priority",
                "all",
                "--concurrency",
                "3",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("FEEDFAN_")},
    )
    # Then it is the real celery worker, HIGH queue first, one task prefetched per process
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "celery -A feedfan.backends.celery:app worker -Q feedfan.high,feedfan.low" in line
    assert "--prefetch-multiplier 1" in line and "--concurrency 3" in line
    assert "-n feedfan-high-low-" in line


@pytest.mark.broker
def test_a_redis_broker_that_retries_on_timeout_still_takes_every_task(
    feedfan_redis_url: str, tmp_path: Path
) -> None:
    # Given Celery on Redis with retry_on_timeout, which turns kombu's batch publishing off
    harness = Harness("celery", log_dir=tmp_path, redis_url=feedfan_redis_url)
    try:
        manager = harness.manager(harness.settings())
        dispatcher = manager.dispatcher
        assert isinstance(dispatcher, CeleryDispatcher)
        dispatcher.app.conf.broker_transport_options = {"retry_on_timeout": True}
        # When 1,200 chunk tasks are sent
        accepted = dispatcher.enqueue_many(_chunks(1200))
        # Then every one is taken and queued
        assert accepted == 1200
        wait_for(
            lambda: dispatcher.queue_depth(HIGH) == 1200,
            timeout=20,
            message=f"queue depth is {dispatcher.queue_depth(HIGH)}, expected 1200",
        )
    finally:
        harness.close()


@pytest.mark.broker
def test_feedfan_worker_whose_app_does_not_import_exits_naming_it(
    harness: Harness, tmp_path: Path
) -> None:
    # Given settings whose app names a module that is not there (a worker started from
    # the wrong folder): its chunks would fail, one by one, with nothing kept
    settings = harness.settings(app="feedfan_no_such_module_here:PinManager")
    env = {**os.environ, **settings.to_env()}

    # When `feedfan worker` starts
    run = subprocess.run(
        [sys.executable, "-m", "feedfan", "worker", "--priority", "all"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Then it exits at once with an error, before consuming, naming the app
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "feedfan_no_such_module_here" in output
    assert "ready" not in output.lower().split("feedfan_no_such_module_here")[0]
