"""The Dramatiq adapter beyond the conformance suite: dead letters, garbage, durability, binding."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dramatiq
import dramatiq.cli
import pika
import pika.exceptions
import pytest
import redis
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.encoder import JSONEncoder, PickleEncoder
from dramatiq.message import Message
from dramatiq.middleware import Retries

from feedfan.activity import Activity
from feedfan.backends import _dramatiq_redis
from feedfan.backends._dramatiq_brokers import amqp_heartbeat, build_broker, maintenance_interval
from feedfan.backends._dramatiq_worker import FeedfanFailures
from feedfan.backends.dramatiq import (
    MAINTENANCE_FORK,
    WORKER_BROKER,
    DramatiqDispatcher,
    DramatiqManager,
    declare_actors,
)
from feedfan.cli import main
from feedfan.config import Settings, load_settings
from feedfan.errors import BrokerError, ConfigurationError, DispatchError, PayloadError
from feedfan.fanout import FanoutReceipt, plan_chunks
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.storage.redis import RedisStorage
from feedfan.task import ChunkTask
from feedfan.testing import Harness, MyStreamManager, make_user, wait_for
from feedfan.testing.managers import (
    CHUNK_DELAY_VARIABLE,
    ConformanceManager,
    follower_ids,
    started_chunks,
)

HIGH, LOW = FanoutPriority.HIGH, FanoutPriority.LOW
FAILING_APP = "tests.test_dramatiq_adapter:AlwaysFailingManager"
GOOD_APP = "feedfan.testing.managers:ConformanceManager"
SETTLE = 90.0


class AlwaysFailingManager(ConformanceManager):
    """A worker's manager whose every chunk write fails, as if its storage were down."""

    def run_chunk(self, task: ChunkTask) -> int:
        raise RuntimeError("feed storage exploded")


class MyDramatiqManager(DramatiqManager):
    """The seed's manager, bound to Dramatiq in code the Stream Framework way."""

    feed_classes = MyStreamManager.feed_classes
    get_user_follower_ids = MyStreamManager.get_user_follower_ids


def _pin(user: str, number: int = 0) -> Activity:
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return Activity(actor=user, verb="pin", object=f"pin-{number}", time=when)


def _namespace() -> str:
    return f"d{uuid.uuid4().hex[:10]}"


def _offline(**values: Any) -> Settings:
    return load_settings({"dispatcher": "dramatiq", **values}, env={}, read_files=False)


@pytest.fixture(params=["redis", "amqp"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """Dramatiq on Redis, then on RabbitMQ, with the feeds in Redis."""
    redis_url = request.getfixturevalue("feedfan_redis_url")
    broker_url = request.getfixturevalue("feedfan_amqp_url") if request.param == "amqp" else None
    harness = Harness("dramatiq", log_dir=tmp_path, redis_url=redis_url, broker_url=broker_url)
    try:
        yield harness
    finally:
        harness.close()


def _dispatcher(manager: Manager) -> DramatiqDispatcher:
    dispatcher = manager.dispatcher
    assert isinstance(dispatcher, DramatiqDispatcher)
    return dispatcher


def _dead_letter_one_chunk(harness: Harness) -> tuple[Manager, FanoutReceipt, str, Activity]:
    """A fanout of one HIGH chunk whose worker fails it until it is dead-lettered."""
    settings = harness.settings(app=FAILING_APP, max_retries=1)
    manager = harness.manager(settings)
    harness.start_worker(settings)
    user = make_user(_namespace(), 2, 0)
    pin = _pin(user)
    receipt = manager.add_user_activity(user, pin)
    status = manager.wait(receipt, timeout=SETTLE)
    assert (status.total, status.done, status.failed) == (1, 0, 1), harness.worker_logs()
    # The worker counts the failure before the broker has moved the message to the
    # dead letters (on RabbitMQ, the nack follows); wait for it to arrive there.
    dispatcher = _dispatcher(manager)
    wait_for(
        lambda: len(dispatcher.failed_messages()) >= 1,
        timeout=20,
        message=f"nothing dead-lettered\n{harness.worker_logs()}",
    )
    return manager, receipt, user, pin


# Retries and dead letters --------------------------------------------------------


@pytest.mark.broker
def test_a_chunk_that_keeps_failing_is_dead_lettered_with_its_reason_and_counts_as_failed(
    harness: Harness,
) -> None:
    # Given a worker whose writes always fail, with max_retries=1
    # When a fanout of one chunk is sent (the helper waits for it to settle as failed)
    manager, _, _, pin = _dead_letter_one_chunk(harness)
    dispatcher = _dispatcher(manager)
    # Then it is listed once, in the HIGH queue's dead letters, with the reason and the task
    [kept] = dispatcher.failed_messages()
    assert kept.queue == manager.settings.queue_high
    assert "failed 2 time(s)" in kept.reason and "feed storage exploded" in kept.reason
    assert json.loads(kept.body)["acts"] == [[pin.id, pin.sort_key]]
    [letter] = dispatcher.queues.dead_letters(manager.settings.queue_high, limit=10)
    assert letter.message is not None and letter.message.options["retries"] == 2
    # And feedfan's progress counted it through runner.give_up
    assert any(r.reason.startswith("gave up:") for r in manager.storage.rejected())


@pytest.mark.broker
def test_a_dead_lettered_chunk_is_replayed_to_its_queue_and_then_written(
    harness: Harness,
) -> None:
    # Given a chunk in the dead-letter queue and its failing worker stopped
    manager, receipt, user, pin = _dead_letter_one_chunk(harness)
    harness.stop_workers()
    dispatcher = _dispatcher(manager)
    # When it is replayed
    assert dispatcher.replay_failed() == 1
    # Then it waits in its queue again, counted as pending, and no longer among the failed
    assert dispatcher.queue_depth(HIGH) == 1
    assert dispatcher.failed_messages() == []
    status = manager.fanout_status(receipt)
    assert status is not None and (status.failed, status.pending) == (0, 1)
    # And a healthy worker writes it, completing the fanout
    harness.start_worker(manager.settings.replace(app=GOOD_APP))
    status = manager.wait(receipt, timeout=SETTLE)
    assert (status.done, status.failed) == (1, 0)
    follower = next(follower_ids(user, HIGH))
    assert manager.get_feed(follower).entries() == [(pin.id, pin.sort_key)]


@pytest.mark.broker
def test_a_malformed_payload_is_dead_lettered_at_once_with_its_reason(harness: Harness) -> None:
    # Given a worker
    manager = harness.manager(harness.settings())
    worker = harness.start_worker(manager.settings)
    dispatcher = _dispatcher(manager)
    # When a well-formed Dramatiq message carries a malformed task
    dispatcher.push_raw(HIGH, b'{"v": 1, "kind": "chunk"}')
    wait_for(
        lambda: bool(dispatcher.failed_messages()),
        timeout=SETTLE,
        message=f"nothing was dead-lettered\n{harness.worker_logs()}",
    )
    # Then it is dead-lettered with the reason in its options, never retried
    [letter] = dispatcher.queues.dead_letters(manager.settings.queue_high, limit=10)
    assert letter.message is not None
    assert letter.message.options["feedfan_reason"].startswith("malformed task: chunk task lacks")
    assert letter.message.options.get("retries", 0) == 0
    # And the worker goes on
    user = make_user(_namespace(), 3, 3)
    assert manager.wait(manager.add_user_activity(user, _pin(user)), timeout=SETTLE).done == 2
    assert worker is not None and worker.alive()


@pytest.mark.broker
def test_on_redis_a_dead_letter_holds_its_reason_the_moment_it_appears(
    feedfan_redis_url: str, tmp_path: Path
) -> None:
    # Given a message of feedfan's that a Redis consumer of a worker's broker holds
    harness = Harness("dramatiq", log_dir=tmp_path, redis_url=feedfan_redis_url)
    try:
        settings = harness.settings()
        dispatcher = _dispatcher(harness.manager(settings))
        broker = build_broker(settings)
        declare_actors(broker, settings)
        [failures] = [m for m in broker.middleware if isinstance(m, FeedfanFailures)]
        dispatcher.push_raw(HIGH, b'{"v": 1, "kind": "chunk"}')
        consumer = broker.consume(settings.queue_high, prefetch=1, timeout=100)
        try:
            message = next((m for m in consumer if m is not None), None)
            assert message is not None
            # When it fails for good and Dramatiq moves it to the dead letters (the nack),
            # looked at before any hook that runs after the nack
            message.fail()
            failures.after_process_message(broker, message, exception=PayloadError("lacks x"))
            consumer.nack(message)
            [letter] = dispatcher.queues.dead_letters(settings.queue_high, limit=10)
        finally:
            consumer.close()
        # Then the dead letter already carries its reason: nobody sees one without it
        assert letter.message is not None
        assert letter.message.options.get("feedfan_reason") == "malformed task: lacks x"
        assert "feedfan_dead_lettered_at" in letter.message.options
        assert dispatcher.queue_depth(HIGH) == 0
    finally:
        harness.close()


@pytest.mark.broker
def test_garbage_at_the_broker_level_is_kept_unpickled_and_the_worker_goes_on(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a worker, and a pickle that would create a directory if it were unpickled
    manager = harness.manager(harness.settings())
    worker = harness.start_worker(manager.settings)
    dispatcher = _dispatcher(manager)
    marker = tmp_path / "unpickled"

    class Bomb:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.makedirs, (str(marker),))

    queue = manager.settings.queue_high
    stranger = Message(queue_name=queue, actor_name="nobody", args=(), kwargs={}, options={})
    garbage = {
        pickle.dumps(Bomb()): "not a Dramatiq message (UnicodeDecodeError",
        b"not json at all": "not a Dramatiq message (JSONDecodeError",
        b'{"json": "but not a message"}': "not a Dramatiq message (KeyError",
        stranger.encode(): "",
    }
    # When bytes that are not Dramatiq messages are put straight on the broker
    for body in garbage:
        dispatcher.push_raw(HIGH, body, envelope=False)
    # Then valid work behind them completes
    user = make_user(_namespace(), 4, 4)
    assert manager.wait(manager.add_user_activity(user, _pin(user)), timeout=SETTLE).failed == 0
    # And each is kept in the dead-letter queue with why, and nothing was unpickled
    wait_for(
        lambda: len(dispatcher.failed_messages()) >= len(garbage),
        timeout=30,
        message=f"kept: {dispatcher.failed_messages()}\n{harness.worker_logs()}",
    )
    reasons = [m.reason for m in dispatcher.failed_messages()]
    for fragment in filter(None, garbage.values()):
        assert any(r.startswith(fragment) for r in reasons), (fragment, reasons)
    assert any("nobody" in r or "redis_message_id" in r for r in reasons), reasons
    assert not marker.exists()
    # And the worker never crashed nor restarted its consumer
    assert worker is not None and worker.alive()
    assert "Consumer encountered" not in worker.log_path.read_text(errors="replace")


def test_another_dramatiq_encoder_is_refused_so_nothing_is_unpickled() -> None:
    # Given Dramatiq's global encoder set to its pickle encoder
    dramatiq.set_encoder(PickleEncoder())
    try:
        # Then neither a dispatcher nor a worker's actors can be set up
        with pytest.raises(
            ConfigurationError, match=r"only runs with dramatiq\.encoder\.JSONEncoder"
        ):
            DramatiqDispatcher(_offline())
        with pytest.raises(ConfigurationError, match="PickleEncoder"):
            declare_actors(build_broker(_offline()), _offline())
    finally:
        dramatiq.set_encoder(JSONEncoder())


# RabbitMQ durability ----------------------------------------------------------------


@pytest.mark.broker
def test_rabbitmq_queues_are_durable_and_messages_persistent(
    feedfan_redis_url: str, feedfan_amqp_url: str
) -> None:
    # Given a fanout sent through RabbitMQ with no worker
    settings = _offline(
        broker_url=feedfan_amqp_url, redis_url=feedfan_redis_url, queue_high=f"{_namespace()}.h"
    )
    dispatcher = DramatiqDispatcher(settings)
    chunk = next(
        plan_chunks(
            op="add",
            feeds=("timeline",),
            entries=[(_pin("u").id, _pin("u").sort_key)],
            followers={HIGH: ["a"]},
            chunk_size=5,
            fanout_id="0" * 24,
        )
    )
    connection = pika.BlockingConnection(pika.URLParameters(feedfan_amqp_url))
    try:
        dispatcher.enqueue(chunk)
        queue = settings.queue_high
        # Then the queue, its delay and dead-letter queues are durable: declaring them
        # durable with Dramatiq's arguments is accepted, declaring them transient is refused
        channel = connection.channel()
        dead_letter = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.XQ"}
        channel.queue_declare(queue, durable=True, arguments=dead_letter)
        channel.queue_declare(f"{queue}.DQ", durable=True, arguments=dead_letter)
        channel.queue_declare(
            f"{queue}.XQ", durable=True, arguments={"x-message-ttl": DEAD_MESSAGE_TTL}
        )
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="durable"):
                connection.channel().queue_declare(name, durable=False)
        # And the message is persistent and carries the task as its only argument
        method, properties, body = connection.channel().basic_get(queue, auto_ack=True)
        assert method is not None and properties.delivery_mode == 2
        assert json.loads(body)["args"] == [chunk.to_json()]
    finally:
        connection.close()
        dispatcher.purge()
        dispatcher.close()


# Moving between job queues ----------------------------------------------------------


@pytest.mark.broker
def test_the_same_manager_class_moves_between_backends_by_configuration_alone(
    feedfan_redis_url: str,
    feedfan_amqp_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Given the seed's MyStreamManager, and for each job queue only environment variables
    monkeypatch.chdir(tmp_path)
    journeys = [
        ("local", None),
        ("celery", None),
        ("rq", None),
        ("dramatiq", None),
        ("dramatiq", feedfan_amqp_url),
    ]
    for dispatcher, broker_url in journeys:
        harness = Harness(
            dispatcher, log_dir=tmp_path, redis_url=feedfan_redis_url, broker_url=broker_url
        )
        try:
            settings = harness.settings(app="feedfan.testing.managers:MyStreamManager")
            harness.start_worker(settings)
            for name in [v for v in os.environ if v.startswith("FEEDFAN_")]:
                monkeypatch.delenv(name)
            for name, value in settings.to_env().items():
                monkeypatch.setenv(name, value)
            # When the class is built with no arguments and adds an activity
            manager = MyStreamManager()
            harness.managers.append(manager)
            user = make_user(_namespace(), 2, 3)
            pin = _pin(user)
            status = manager.wait(manager.add_user_activity(user, pin), timeout=SETTLE)
            # Then that job queue ran the fanout to every follower
            assert manager.dispatcher.name == dispatcher
            assert (status.done, status.failed) == (2, 0), harness.worker_logs()
            for priority in FanoutPriority:
                for follower in follower_ids(user, priority):
                    assert manager.get_feed(follower).entries() == [(pin.id, pin.sort_key)]
        finally:
            harness.close()


@pytest.mark.broker
def test_dramatiq_manager_works_when_bound_in_code_with_your_own_broker(harness: Harness) -> None:
    # Given configuration naming another dispatcher, and a broker built by the user
    settings = harness.settings(dispatcher="local", app="feedfan.testing.managers:MyStreamManager")
    url = harness.broker_url or settings.effective_redis_url
    broker = RabbitmqBroker(url=url) if url.startswith("amqp") else RedisBroker(url=url)
    # When the user's subclass of DramatiqManager is built on it
    manager = MyDramatiqManager(settings=settings, broker=broker)
    harness.managers.append(manager)
    harness.start_worker(manager.settings)
    # Then Dramatiq runs its fanouts, through that broker
    assert manager.settings.dispatcher == "dramatiq"
    assert _dispatcher(manager).broker is broker
    user = make_user(_namespace(), 3, 1)
    status = manager.wait(manager.add_user_activity(user, _pin(user)), timeout=SETTLE)
    assert (status.done, status.failed) == (2, 0), harness.worker_logs()
    broker.close()


# The worker command ------------------------------------------------------------------


def test_the_worker_command_is_dramatiqs_own_and_feedfan_worker_prints_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given Dramatiq settings
    settings = _offline(worker_concurrency=3, chunk_time_limit=30)
    command = DramatiqDispatcher(settings).worker_command([LOW, HIGH])
    # Then it is the installed `dramatiq` with feedfan's setup, HIGH before LOW
    assert Path(command.argv[0]).name == "dramatiq" and Path(command.argv[0]).exists()
    parsed = dramatiq.cli.make_argument_parser().parse_args(command.argv[1:])
    assert parsed.broker == WORKER_BROKER
    assert parsed.queues == ["feedfan.high", "feedfan.low"]
    assert (parsed.processes, parsed.threads) == (1, 3)
    assert parsed.forks == [MAINTENANCE_FORK]
    assert parsed.worker_shutdown_timeout == 40_000
    # And `feedfan worker --print` prints the same line
    monkeypatch.chdir(tmp_path)
    for name in [v for v in os.environ if v.startswith("FEEDFAN_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("FEEDFAN_DISPATCHER", "dramatiq")
    monkeypatch.setenv("FEEDFAN_WORKER_CONCURRENCY", "3")
    monkeypatch.setenv("FEEDFAN_CHUNK_TIME_LIMIT", "30")
    assert main(["worker", "--print"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"PYTHONPATH={shlex.quote(str(tmp_path))} {command.shell()}"


def test_actors_take_retries_time_limit_and_priority_from_settings() -> None:
    # Given settings with three retries and a 30 s chunk time limit
    settings = _offline(max_retries=3, chunk_time_limit=30)
    broker = build_broker(settings)
    # When a worker declares feedfan's actors
    declare_actors(broker, settings)
    high, low = broker.get_actor("feedfan_high"), broker.get_actor("feedfan_low")
    # Then each serves its queue; HIGH runs first among fetched messages (lower number)
    assert (high.queue_name, low.queue_name) == ("feedfan.high", "feedfan.low")
    assert high.priority < low.priority
    # And retries are few and short, the time limit is the chunk time limit
    for actor in (high, low):
        assert actor.options["max_retries"] == 3
        assert actor.options["min_backoff"] == 1_000 and actor.options["max_backoff"] == 60_000
        assert actor.options["time_limit"] == 30_000
        assert actor.options["throws"] == (PayloadError,)
    # And feedfan's failure middleware sees a message after Retries has judged it
    kinds = [type(m) for m in broker.middleware]
    assert kinds.index(FeedfanFailures) < kinds.index(Retries)


def test_the_redelivery_bound_follows_the_heartbeat_settings() -> None:
    # Given a redelivery timeout of 40 s
    on_redis = DramatiqDispatcher(_offline(chunk_time_limit=10, redelivery_timeout=40))
    on_rabbitmq = DramatiqDispatcher(
        _offline(chunk_time_limit=10, redelivery_timeout=40, broker_url="amqp://h/")
    )
    chosen = DramatiqDispatcher(
        _offline(chunk_time_limit=10, redelivery_timeout=40, broker_url="amqp://h/?heartbeat=7")
    )
    # Then Redis declares the heartbeat timeout, a maintenance round and two polls
    assert on_redis.broker.heartbeat_timeout == 40_000
    assert on_redis.redelivery_bound() == 40 + maintenance_interval(on_redis.settings) + 2
    # And RabbitMQ two AMQP heartbeats: half the timeout, unless the URL names one
    assert amqp_heartbeat(on_rabbitmq.settings) == 20
    assert on_rabbitmq.redelivery_bound() == 2 * 20 + 1
    assert chosen.redelivery_bound() == 2 * 7 + 1


# Inspection -------------------------------------------------------------------------


@pytest.mark.broker
def test_status_hooks_count_what_waits_what_workers_hold_and_who_consumes(
    harness: Harness,
) -> None:
    # Given a slowed-down worker in the middle of a fanout of 8 chunks
    manager = harness.manager(harness.settings())
    dispatcher = _dispatcher(manager)
    dispatcher.ping()
    harness.start_worker(manager.settings, env={CHUNK_DELAY_VARIABLE: "1.0"})
    user = make_user(_namespace(), 20, 20)
    receipt = manager.add_user_activity(user, _pin(user))
    storage = manager.storage
    assert isinstance(storage, RedisStorage)
    wait_for(
        lambda: bool(started_chunks(storage)),
        timeout=SETTLE,
        message=f"no chunk started\n{harness.worker_logs()}",
    )
    held = dispatcher.in_flight()
    consumers = [dispatcher.consumer_count(p) for p in FanoutPriority]
    waiting = sum(dispatcher.queue_depth(p) for p in FanoutPriority)
    # Then Redis counts the messages the worker holds and RabbitMQ its consumers
    if harness.broker_url is None:
        assert held is not None and 1 <= held <= receipt.chunks
        assert consumers == [None, None]
    else:
        assert held is None
        assert consumers == [1, 1]
    assert waiting < receipt.chunks
    manager.wait(receipt, timeout=SETTLE)


def test_feedfan_check_warns_of_a_shared_redis_and_of_heartbeats_turned_off() -> None:
    # Given Dramatiq on the feed Redis, on its own Redis, and on RabbitMQ without heartbeats
    shared = DramatiqDispatcher(_offline()).check()
    apart = DramatiqDispatcher(_offline(broker_url="redis://127.0.0.1:6379/9")).check()
    deaf = DramatiqDispatcher(_offline(broker_url="amqp://h/?heartbeat=0")).check()
    # Then each says what it found
    assert [f.code for f in shared] == ["dramatiq.redelivery", "dramatiq.shared-redis"]
    assert [f.code for f in apart] == ["dramatiq.redelivery"]
    assert [(f.level, f.code) for f in deaf] == [("warning", "dramatiq.heartbeat-off")]
    assert "KEYS" in shared[1].message and "broker_url=redis://" in shared[1].fix


# Broker errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["redis://:s3cret@127.0.0.1:1/0", "amqp://guest:s3cret@127.0.0.1:1/"]
)
def test_an_unreachable_broker_is_a_broker_error_with_the_password_masked(url: str) -> None:
    # Given a broker URL where nothing listens
    dispatcher = DramatiqDispatcher(_offline(broker_url=url))
    chunk = ChunkTask("add", ("timeline",), (), ("a",), "0" * 24, HIGH, 0)
    # When a task is sent, or the broker pinged
    with pytest.raises(BrokerError, match="reach the broker"):
        dispatcher.ping()
    with pytest.raises(BrokerError) as caught:
        dispatcher.publish(chunk, "{}")
    # Then the error says where and what to check, without the password
    message = str(caught.value)
    assert "s3cret" not in message and ":***@127.0.0.1:1" in message
    assert "broker_url (FEEDFAN_BROKER_URL" in message and caught.value.accepted == 0
    dispatcher.close()


class _SmallBatches(DramatiqDispatcher):
    publish_batch_size = 3


def _break(dispatcher: DramatiqDispatcher) -> None:
    """Point the dispatcher's connections at a port where nothing listens."""
    broker: Any = dispatcher.broker
    if isinstance(broker, RedisBroker):
        broker.client.connection_pool.disconnect()
        broker.client.connection_pool = redis.ConnectionPool(host="127.0.0.1", port=1)
    else:
        broker.parameters.port = 1
        dispatcher.queues.close()


@pytest.mark.broker
def test_a_broker_lost_midway_says_how_many_tasks_were_accepted(harness: Harness) -> None:
    # Given a dispatcher sending batches of 3, and 7 chunks
    settings = harness.settings()
    dispatcher = _SmallBatches(settings)
    tasks = list(
        plan_chunks(
            op="add",
            feeds=("timeline",),
            entries=[(_pin("u").id, _pin("u").sort_key)],
            followers={HIGH: [f"f{i}" for i in range(7)]},
            chunk_size=1,
            fanout_id="1" * 24,
        )
    )

    def breaking() -> Iterator[ChunkTask]:
        for number, task in enumerate(tasks):
            if number == 3:  # the first batch is sent: the broker goes away
                _break(dispatcher)
            yield task

    # When the broker is lost after the first batch
    with pytest.raises(DispatchError) as caught:
        dispatcher.enqueue_many(breaking())
    # Then the error says 3 were accepted, and exactly 3 wait in the queue
    assert caught.value.accepted == 3
    dispatcher.close()
    fresh = DramatiqDispatcher(settings)
    try:
        assert fresh.queue_depth(HIGH) == 3
    finally:
        fresh.purge()
        fresh.close()


def _dead_letter_without_worker(dispatcher: DramatiqDispatcher, queue: str) -> None:
    """Take one message of ``queue`` as a worker would, and reject it to ``<queue>.XQ``."""
    broker: Any = dispatcher.broker
    if isinstance(broker, RedisBroker):
        [data, _] = broker.do_fetch(queue, 2)  # the second stays held, in an ack set
        broker.do_nack(queue, Message.decode(data).options["redis_message_id"])
        return
    connection = pika.BlockingConnection(broker.parameters)
    try:
        channel = connection.channel()
        method, _, _ = channel.basic_get(queue)
        channel.basic_nack(method.delivery_tag, requeue=False)
    finally:
        connection.close()


@pytest.mark.broker
def test_purge_deletes_every_queue_and_key_feedfan_made(harness: Harness) -> None:
    # Given tasks waiting in both queues, held by a consumer, and dead-lettered
    manager = harness.manager(harness.settings())
    dispatcher = _dispatcher(manager)
    user = make_user(_namespace(), 12, 12)
    manager.add_user_activity(user, _pin(user))
    names = manager.settings.queue_high, manager.settings.queue_low
    for name in names:
        _dead_letter_without_worker(dispatcher, name)
    assert len(dispatcher.failed_messages()) == 2
    # When the dispatcher purges
    dispatcher.purge()
    # Then nothing of feedfan's queues is left on the broker
    broker: Any = dispatcher.broker
    if isinstance(broker, RedisBroker):
        client: redis.Redis = broker.client
        assert [k for n in names for k in client.scan_iter(match=f"*{n}*")] == []
    else:
        connection = pika.BlockingConnection(pika.URLParameters(harness.broker_url or ""))
        try:
            for name in names:
                for suffix in ("", ".DQ", ".XQ"):
                    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
                        connection.channel().queue_declare(name + suffix, passive=True)
        finally:
            connection.close()
    assert (dispatcher.queue_depth(HIGH), dispatcher.queue_depth(LOW)) == (0, 0)
    assert dispatcher.failed_messages() == []


def _drain_until_message(consumer: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = next(consumer)
        if message is not None:
            return message
    raise AssertionError(f"no message came within {timeout} s")


def test_a_full_redis_consumer_fetches_again_as_soon_as_a_worker_acks(
    feedfan_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given feedfan's Redis consumer holding its one prefetched message for 1.5 s, with
    # Dramatiq's own idle timing (a 1 s worker timeout, not capped), and two more waiting
    monkeypatch.setattr(_dramatiq_redis, "IDLE_POLL_MS", 60_000)
    broker = build_broker(_offline(broker_url=feedfan_redis_url))
    assert isinstance(broker, _dramatiq_redis.FeedfanRedisBroker)
    queue = f"ff-{_namespace()}"
    broker.declare_queue(queue)
    for number in range(3):
        broker.enqueue(Message(queue, "feedfan_test", (number,), {}, {}))
    consumer = broker.consume(queue, prefetch=1, timeout=1000)
    try:
        held = _drain_until_message(consumer, 5.0)
        for _ in range(2):
            acked: list[float] = []

            def ack_later(message: Any = held, acked: list[float] = acked) -> None:
                time.sleep(1.5)
                acked.append(time.monotonic())
                consumer.ack(message)

            acker = threading.Thread(target=ack_later)
            acker.start()
            # When a worker thread acks it
            held = _drain_until_message(consumer, 5.0)
            fetched = time.monotonic()
            acker.join()
            # Then the next message is fetched at once, not after a backoff grown to 0.5-1 s
            assert fetched - acked[0] < 0.25
        consumer.ack(held)
    finally:
        consumer.close()
        client = broker.client
        broker.flush(queue)
        client.delete(f"{broker.namespace}:__acks__.{broker.broker_id}.{queue}")
        client.zrem(f"{broker.namespace}:__heartbeats__", broker.broker_id)
        broker.close()


def test_an_idle_redis_consumer_looks_often_at_high_less_at_low_and_never_rushes_delays() -> None:
    # Given the broker feedfan builds from settings
    settings = _offline(broker_url="redis://127.0.0.1:6379/9", queue_high="hi", queue_low="lo")
    broker = build_broker(settings)
    assert isinstance(broker, _dramatiq_redis.FeedfanRedisBroker)
    # Then HIGH is polled every 10 ms at most, LOW every 100 ms, delay queues as Dramatiq does
    assert broker.idle_poll_ms("hi") == _dramatiq_redis.URGENT_POLL_MS == 10
    assert broker.idle_poll_ms("lo") == _dramatiq_redis.IDLE_POLL_MS == 100
    assert broker.consume("lo", prefetch=4, timeout=1000).timeout == 100
    assert broker.consume("hi.DQ", prefetch=4, timeout=1000).timeout == 1000
    # And a smaller Dramatiq worker timeout still wins
    assert broker.consume("hi", prefetch=4, timeout=5).timeout == 5
