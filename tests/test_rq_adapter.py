"""The RQ adapter beyond the conformance suite: no pickle, one pipeline, redelivery, moving to RQ."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from rq.exceptions import StopRequested
from rq.job import JobStatus
from rq.queue import Queue
from rq.worker import Worker, WorkerStatus

from feedfan.activity import Activity
from feedfan.backends._rq_jobs import FeedfanJob, JSONJobSerializer, failure_reason
from feedfan.backends.rq import FINISHED_JOB_TTL, FeedfanWorker, RQDispatcher, RQManager
from feedfan.config import Settings, load_settings
from feedfan.errors import BrokerError, ConfigurationError, DispatchError, PayloadError
from feedfan.fanout import plan_chunks
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.runner import reset_runner
from feedfan.storage.redis import RedisStorage
from feedfan.task import ChunkTask
from feedfan.testing import Harness, MyStreamManager, WorkerProcess, make_user, wait_for
from feedfan.testing.managers import CHUNK_DELAY_VARIABLE, follower_ids, started_chunks

HIGH, LOW = FanoutPriority.HIGH, FanoutPriority.LOW
SETTLE = 90.0


def _pin(user: str, number: int = 0) -> Activity:
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return Activity(actor=user, verb="pin", object=f"pin-{number}", time=when)


def _namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _chunks(count: int, *, per_priority: bool = False) -> list[ChunkTask]:
    user = make_user(_namespace(), 0, 0)
    pin = _pin(user)
    followers = {HIGH: [f"{user}:h{i}" for i in range(count)]}
    if per_priority:
        followers[LOW] = [f"{user}:l{i}" for i in range(count)]
    return list(
        plan_chunks(
            op="add",
            feeds=("timeline",),
            entries=[(pin.id, pin.sort_key)],
            followers=followers,
            chunk_size=1,
            fanout_id=uuid.uuid4().hex[:24],
        )
    )


class _Pickled:
    """Unpickling this would create a directory: proof that code ran from a payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.makedirs, (str(self.marker),))


class CountingRedis(redis.Redis):
    """A Redis client that counts round trips: single commands and pipeline executions."""

    round_trips = 0
    fail_on_pipeline: int | None = None
    pipelines = 0

    @classmethod
    def at(cls, url: str) -> CountingRedis:
        """A counting client for ``url``."""
        return cls(connection_pool=redis.ConnectionPool.from_url(url))

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.round_trips += 1
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        original = pipe.execute

        def execute(raise_on_error: bool = True) -> Any:
            self.round_trips += 1
            self.pipelines += 1
            if self.fail_on_pipeline == self.pipelines:
                raise redis.ConnectionError("connection reset by peer (simulated)")
            return original(raise_on_error)

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe


class PinManager(RQManager):
    """The seed's manager, bound to RQ in code as Stream Framework users do."""

    feed_classes = MyStreamManager.feed_classes
    get_user_follower_ids = MyStreamManager.get_user_follower_ids


@pytest.fixture
def harness(feedfan_redis_url: str, tmp_path: Path) -> Iterator[Harness]:
    """RQ with real workers on the session's Redis; everything purged and stopped after."""
    harness = Harness("rq", log_dir=tmp_path, redis_url=feedfan_redis_url)
    try:
        yield harness
    finally:
        harness.close()


def _settle(harness: Harness, manager: Manager, receipt: Any, timeout: float = SETTLE) -> Any:
    try:
        return manager.wait(receipt, timeout=timeout)
    except Exception as e:
        raise AssertionError(f"{e}\n{harness.worker_logs()}") from None


def _timeline(manager: Manager, user: str) -> list[tuple[str, int]]:
    return manager.get_feed(user, "timeline").entries(limit=100)


def _everyone_has(manager: Manager, user: str, pin: Activity) -> bool:
    return all(
        _timeline(manager, follower) == [(pin.id, pin.sort_key)]
        for priority in FanoutPriority
        for follower in follower_ids(user, priority)
    )


def _kept(dispatcher: Any, count: int) -> list[Any]:
    wait_for(
        lambda: len(dispatcher.failed_messages(limit=1000)) >= count,
        timeout=60,
        message=f"fewer than {count} failed jobs kept",
    )
    kept: list[Any] = dispatcher.failed_messages(limit=1000)
    return kept


# Configuration ---------------------------------------------------------------


def _rq(harness: Harness, **overrides: Any) -> tuple[Settings, Manager, RQDispatcher]:
    """Settings, a manager on them and its RQ dispatcher."""
    settings = harness.settings(**overrides)
    manager = harness.manager(settings)
    dispatcher = manager.dispatcher
    assert isinstance(dispatcher, RQDispatcher)
    return settings, manager, dispatcher


@dataclass
class _Abandoned:
    """A one-chunk fanout whose job a dead worker popped and left in the started registry."""

    user: str
    pin: Activity
    receipt: Any
    queue: Queue
    job_id: str
    entry: str


def _abandon_a_chunk(manager: Manager, dispatcher: RQDispatcher, **job_fields: str) -> _Abandoned:
    """Fan out to 2 HIGH followers, pop the job, write ``job_fields``, add an expired entry."""
    user = make_user(_namespace(), 2, 0)
    pin = _pin(user)
    receipt = manager.add_user_activity(user, pin)
    queue = dispatcher.rq_queue(HIGH)
    connection = dispatcher.connection
    job_id = connection.lpop(queue.key).decode()
    if job_fields:
        connection.hset(f"rq:job:{job_id}", mapping=job_fields)
    entry = f"{job_id}:deadbeef"
    connection.zadd(queue.started_job_registry.key, {entry: 1})
    return _Abandoned(user, pin, receipt, queue, job_id, entry)


def test_an_amqp_broker_is_refused_naming_the_setting_and_its_source() -> None:
    # Given a RabbitMQ broker URL set in the environment
    settings = load_settings(
        env={"FEEDFAN_BROKER_URL": "amqp://guest:secret@rabbit:5672/"}, read_files=False
    )
    # When the RQ dispatcher is built, then it refuses, naming setting, source and fix
    with pytest.raises(ConfigurationError) as caught:
        RQDispatcher(settings)
    message = str(caught.value)
    assert "broker_url='amqp://guest:***@rabbit:5672/'" in message
    assert "environment variable FEEDFAN_BROKER_URL" in message
    assert "RQ runs on Redis only" in message and "secret" not in message


def test_building_the_dispatcher_never_connects_and_errors_name_the_redacted_url() -> None:
    # Given a broker nobody listens on, with a password
    settings = load_settings(
        {"broker_url": "redis://:s3cret@127.0.0.1:1/0"}, env={}, read_files=False
    )
    # When the dispatcher is built, nothing happens
    dispatcher = RQDispatcher(settings)
    # Then the first use raises BrokerError saying where and what to check, password masked
    with pytest.raises(BrokerError) as caught:
        dispatcher.queue_depth(HIGH)
    message = str(caught.value)
    assert "redis://:***@127.0.0.1:1/0" in message and "s3cret" not in message
    assert "broker_url (FEEDFAN_BROKER_URL)" in message
    dispatcher.close()


def test_the_worker_command_is_a_real_rq_worker_listing_high_before_low() -> None:
    # Given settings with their own queue names
    settings = load_settings(
        {"queue_high": "ff.h", "queue_low": "ff.l", "broker_url": "redis://127.0.0.1:6379/3"},
        env={},
        read_files=False,
    )
    dispatcher = RQDispatcher(settings)
    # When one process is asked for, LOW listed first
    single = dispatcher.worker_command([LOW, HIGH], concurrency=1)
    # Then it is `rq worker` with feedfan's serializer, worker and job classes, HIGH first
    assert Path(single.argv[0]).name == "rq" and single.argv[1] == "worker"
    assert single.argv[-2:] == ["ff.h", "ff.l"]
    shell = single.shell()
    assert "--serializer feedfan.backends.rq.JSONJobSerializer" in shell
    assert "--worker-class feedfan.backends.rq.FeedfanWorker" in shell
    assert "--job-class feedfan.backends.rq.FeedfanJob" in shell
    assert "--url redis://127.0.0.1:6379/3" in shell
    # And more processes run as one `rq worker-pool`
    pool = dispatcher.worker_command([HIGH], concurrency=3)
    assert pool.argv[1] == "worker-pool" and pool.argv[-3:] == ["--num-workers", "3", "ff.h"]


def test_a_broker_password_goes_in_the_environment_not_on_the_command_line() -> None:
    settings = load_settings(
        {"broker_url": "redis://:s3cret@127.0.0.1:6379/3"}, env={}, read_files=False
    )
    command = RQDispatcher(settings).worker_command([HIGH, LOW], concurrency=1)
    assert "s3cret" not in command.shell() and command.env == {}
    assert "--config feedfan.backends._rq_config" in command.shell()
    assert "--url" not in command.argv


def test_the_rq_config_module_gives_rq_the_broker_url_from_feedfans_settings() -> None:
    # Given the broker URL only in feedfan's environment variable
    env = {**os.environ, "FEEDFAN_BROKER_URL": "redis://:s3cret@127.0.0.1:6379/3"}
    # When rq reads the config module the worker command names
    code = (
        "from rq.cli.helpers import read_config_file;"
        "print(read_config_file('feedfan.backends._rq_config'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    # Then it finds exactly that URL
    assert result.stdout.strip() == "{'REDIS_URL': 'redis://:s3cret@127.0.0.1:6379/3'}"


def test_feedfan_worker_print_shows_the_plain_rq_worker_command(tmp_path: Path) -> None:
    # Given only environment variables choosing RQ
    env = {
        **os.environ,
        "FEEDFAN_DISPATCHER": "rq",
        "FEEDFAN_BROKER_URL": "redis://127.0.0.1:6379/3",
        "FEEDFAN_QUEUE_HIGH": "pins.high",
        "FEEDFAN_QUEUE_LOW": "pins.low",
    }
    # When `feedfan worker --print` runs
    result = subprocess.run(
        [sys.executable, "-m", "feedfan", "worker", "--print", "--concurrency", "1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # Then it prints the `rq worker` line a user can paste
    line = result.stdout.strip()
    assert " worker --url redis://127.0.0.1:6379/3 " in line
    assert line.endswith(" pins.high pins.low")


# The JSON serializer -----------------------------------------------------------


def test_the_serializer_refuses_pickles_without_loading_them(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    with pytest.raises(PayloadError, match="pickled"):
        JSONJobSerializer.loads(pickle.dumps(_Pickled(marker)))
    with pytest.raises(PayloadError, match="not JSON"):
        JSONJobSerializer.loads(b"cos\nsystem\n(S'true'\ntR.")
    assert not marker.exists()
    assert JSONJobSerializer.loads(JSONJobSerializer.dumps(["a", None, ["\udc80"], {}])) == [
        "a",
        None,
        ["\udc80"],
        {},
    ]


def test_the_failure_reason_is_the_exception_line_with_its_cause() -> None:
    traceback = (
        'Traceback (most recent call last):\n  File "x", line 1\n'
        "feedfan.errors.PayloadError: RQ job data is pickled\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        'Traceback (most recent call last):\n  File "y", line 2\n'
        "rq.exceptions.DeserializationError\n"
    )
    assert failure_reason(traceback) == (
        "rq.exceptions.DeserializationError "
        "(caused by feedfan.errors.PayloadError: RQ job data is pickled)"
    )
    assert failure_reason("Work-horse terminated unexpectedly; waitpid returned 9") == (
        "Work-horse terminated unexpectedly; waitpid returned 9"
    )
    assert failure_reason("") == "failed (RQ recorded no reason)"


# Bulk enqueue ------------------------------------------------------------------


def test_a_fanouts_chunks_go_one_pipeline_per_batch(harness: Harness) -> None:
    # Given a dispatcher on a client that counts round trips, warmed up once
    settings = harness.settings()
    client = CountingRedis.at(settings.effective_broker_url)
    dispatcher = RQDispatcher(settings, connection=client)
    harness.managers.append(Manager(settings=settings, dispatcher=dispatcher))
    dispatcher.enqueue_many(_chunks(1))
    client.round_trips = 0
    # When 500 HIGH and 500 LOW chunks are sent
    sent = dispatcher.enqueue_many(_chunks(500, per_priority=True))
    # Then they took one round trip per batch (64, 128, 256, 512, 40) and wait in their queues
    assert sent == 1000
    assert client.round_trips == 5
    assert (dispatcher.queue_depth(HIGH), dispatcher.queue_depth(LOW)) == (501, 500)


def test_a_failed_pipeline_reports_the_chunks_accepted_before_it(harness: Harness) -> None:
    # Given a client whose second pipeline fails, as if the connection dropped
    settings = harness.settings()
    client = CountingRedis.at(settings.effective_broker_url)
    client.fail_on_pipeline = 2
    dispatcher = RQDispatcher(settings, connection=client)
    harness.managers.append(Manager(settings=settings, dispatcher=dispatcher))
    # When 1,500 chunks are sent in batches of 64, 128, ...
    with pytest.raises(BrokerError) as caught:
        dispatcher.enqueue_many(_chunks(1500))
    # Then the error counts the first batch, which is all that reached the queue
    assert isinstance(caught.value, DispatchError)
    assert caught.value.accepted == 64
    assert "64 task(s) were accepted" in str(caught.value)
    client.fail_on_pipeline = None
    assert dispatcher.queue_depth(HIGH) == 64


def test_job_ids_are_the_task_ids_and_finished_jobs_are_kept_briefly(harness: Harness) -> None:
    settings, manager, dispatcher = _rq(harness)
    chunks = _chunks(2)
    with harness.held(manager):
        dispatcher.enqueue_many(chunks)
        ids = [
            i.decode() for i in dispatcher.connection.lrange(dispatcher.rq_queue(HIGH).key, 0, -1)
        ]
        assert ids == [c.task_id for c in chunks]
        stored = dispatcher.connection.hgetall(f"rq:job:{chunks[0].task_id}")
        assert int(stored[b"result_ttl"]) == FINISHED_JOB_TTL and stored[b"timeout"] == b"4"
        assert int(stored[b"failure_ttl"]) == settings.status_ttl
        assert stored[b"retries_left"] == b"2"


def test_a_finished_chunk_is_kept_briefly_and_sent_again_it_does_not_expire(
    harness: Harness,
) -> None:
    # Given a chunk that ran: RQ keeps its job for FINISHED_JOB_TTL seconds, then drops it
    settings, _, dispatcher = _rq(harness)
    worker = harness.start_worker(settings)
    assert worker is not None
    chunk = _chunks(1)[0]
    key = f"rq:job:{chunk.task_id}"
    dispatcher.enqueue_many([chunk])
    wait_for(
        lambda: dispatcher.connection.hget(key, "status") == b"finished",
        timeout=SETTLE,
        message=f"the chunk did not finish\n{harness.worker_logs()}",
    )
    assert 0 < dispatcher.connection.ttl(key) <= FINISHED_JOB_TTL
    # And RQ sees it as it sees any finished job: status, end time, registries, worker stats
    queue = dispatcher.rq_queue(HIGH)
    job = FeedfanJob.fetch(
        chunk.task_id, connection=dispatcher.connection, serializer=JSONJobSerializer
    )
    assert job.get_status() == JobStatus.FINISHED and job.ended_at is not None
    assert job.ended_at >= job.started_at
    assert queue.finished_job_registry.get_job_ids() == [chunk.task_id]
    assert queue.started_job_registry.get_job_ids() == []
    workers = Worker.all(queue=queue)
    assert sum(w.successful_job_count for w in workers) == 1
    assert sum(w.total_working_time for w in workers) > 0
    worker.stop()
    # When the same task is sent again (a replay) with no worker to run it
    dispatcher.enqueue_many([chunk])
    # Then its job waits without the old expiry: it cannot vanish from its queue
    assert dispatcher.connection.ttl(key) == -1
    assert dispatcher.connection.hget(key, "status") == b"queued"


@contextlib.contextmanager
def _runs_chunks(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inside the block, this process runs chunks as a worker of ``settings`` does."""
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    reset_runner()
    try:
        yield
    finally:
        reset_runner()


def _execution_keys(connection: Any, job_ids: list[str]) -> list[bytes]:
    """RQ's execution records and execution registries of ``job_ids`` still in Redis."""
    found: list[bytes] = []
    for job_id in job_ids:
        found += connection.keys(f"rq:execution:{job_id}:*")
        found += connection.keys(f"rq:executions:{job_id}")
    return found


def _drain_counting(settings: Settings, dispatcher: RQDispatcher, count: int) -> int:
    """Queue ``count`` HIGH and ``count`` LOW chunks; the worker round trips to run them all."""
    dispatcher.enqueue_many(_chunks(count, per_priority=True))
    client = CountingRedis.at(settings.effective_broker_url)
    queues = [dispatcher.rq_queue(HIGH), dispatcher.rq_queue(LOW)]
    worker = FeedfanWorker(queues, connection=client)
    worker.work(burst=True)
    assert (dispatcher.queue_depth(HIGH), dispatcher.queue_depth(LOW)) == (0, 0)
    return client.round_trips


def test_a_worker_of_both_queues_spends_one_round_trip_a_chunk(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a feedfan worker of both queues, in this process, on a client that counts
    settings, _, dispatcher = _rq(harness)
    # When it drains 10 chunks a queue, then 50 a queue
    with _runs_chunks(settings, monkeypatch):
        few = _drain_counting(settings, dispatcher, 10)
        many = _drain_counting(settings, dispatcher, 50)
    # Then each chunk cost it one round trip: its finish, which takes and starts the next
    # (the chunk's own write is the runner's), and a heartbeat or suspension check now and then
    assert many - few <= 80 + 4, (few, many)
    # And RQ sees them as finished, none left running or stuck between queue and worker,
    # and no execution record is left behind
    for priority in FanoutPriority:
        queue = dispatcher.rq_queue(priority)
        assert queue.started_job_registry.get_job_ids() == []
        assert len(queue.finished_job_registry.get_job_ids()) == 60
        assert dispatcher.connection.llen(queue.intermediate_queue_key) == 0
        finished = queue.finished_job_registry.get_job_ids()
        assert _execution_keys(dispatcher.connection, finished) == []


def test_a_chunk_taken_with_a_finish_is_started_as_rq_starts_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two chunks waiting, and a worker (in this process) that has run the first
    settings, _, dispatcher = _rq(harness)
    first, second = _chunks(2)
    dispatcher.enqueue_many([first, second])
    connection = dispatcher.connection
    # (the second asks for a time limit above redelivery_timeout, as RQ lets a job do)
    connection.hset(f"rq:job:{second.task_id}", "timeout", settings.redelivery_timeout * 4)
    queue = dispatcher.rq_queue(HIGH)
    worker = FeedfanWorker([queue], connection=connection)
    registry = queue.started_job_registry
    with _runs_chunks(settings, monkeypatch):
        worker.bootstrap()
        try:
            taken = worker.dequeue_job_and_maintain_ttl(None)
            assert taken is not None and taken[0].id == first.task_id
            worker.execute_job(*taken)
            # When the first one's finish has taken the second
            job, _ = worker.dequeue_job_and_maintain_ttl(None) or (None, None)
            assert job is not None and job.id == second.task_id
            # Then that call started it already: status, started registry, worker busy
            registered = registry.get_job_ids()
            status = connection.hget(job.key, "status")
            state = connection.hget(worker.key, "state")
            assert (registered, status, state) == ([second.task_id], b"started", b"busy")
            # And when the worker prepares to run it
            execution = worker.prepare_execution(job)
            # Then it is recorded as RQ records a started job: status, worker, execution
            # record, started registry entry (living as long as RQ gives a job with that
            # time limit, not feedfan's default), worker index, the worker busy
            fields = connection.hgetall(job.key)
            assert fields[b"status"] == b"started"
            assert fields[b"worker_name"] == worker.name.encode()
            assert job.get_status(refresh=False) == JobStatus.STARTED and job.started_at
            assert registry.get_job_ids() == [second.task_id]
            entry = f"{second.task_id}:{execution.id}"
            expires = connection.zscore(registry.key, entry)
            ttl = worker.get_heartbeat_ttl(job)
            assert ttl != settings.redelivery_timeout
            assert expires is not None and abs(expires - (time.time() + ttl)) < 5, (expires, ttl)
            assert connection.hget(execution.key, "job_id") == second.task_id.encode()
            assert connection.sismember(execution.worker_executions_key, entry)
            assert connection.hget(worker.key, "state") == b"busy"
            current = worker.get_current_job()
            assert current is not None and current.id == second.task_id
            # And once run, nothing of it is left running
            worker.perform_job(job, queue, execution)
        finally:
            worker.teardown()
    assert registry.get_job_ids() == []
    assert queue.finished_job_registry.get_job_ids() == [first.task_id, second.task_id]
    assert _execution_keys(connection, [first.task_id, second.task_id]) == []


class ReplyLosingRedis(redis.Redis):
    """A client whose connection drops once, right after Redis ran the second take.

    The second take comes with the first chunk's finish, so what is lost is the
    reply of a call that finished one chunk and took the next.
    """

    lost = 0
    takes = 0

    def _send_command_parse_response(
        self, conn: Any, command_name: str, *args: Any, **options: Any
    ) -> Any:
        reply = super()._send_command_parse_response(conn, command_name, *args, **options)  # type: ignore[no-untyped-call]
        if command_name == "EVALSHA" and isinstance(reply, list):
            self.takes += 1
            if self.takes == 2 and not self.lost:
                self.lost += 1
                raise redis.ConnectionError("connection reset by peer (simulated, reply lost)")
        return reply


def test_a_take_whose_reply_was_lost_and_sent_again_runs_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given four chunks waiting, and a worker whose client loses the reply of a call that
    # finished one chunk and took the next, then sends it again as redis-py does
    settings, _, dispatcher = _rq(harness)
    chunks = _chunks(4)
    dispatcher.enqueue_many(chunks)
    queue = dispatcher.rq_queue(HIGH)
    calls_before = set(dispatcher.connection.keys("rq:feedfan:take:*"))
    client = ReplyLosingRedis(
        connection_pool=redis.ConnectionPool.from_url(settings.effective_broker_url)
    )
    worker = FeedfanWorker([dispatcher.rq_queue(HIGH)], connection=client)
    # When it drains the queue
    with _runs_chunks(settings, monkeypatch):
        worker.work(burst=True)
    # Then a reply was lost, yet every chunk ran once and finished: none was taken twice,
    # none was left started with nobody to run it, and the finish was counted once each
    assert client.lost == 1
    assert sorted(queue.finished_job_registry.get_job_ids()) == sorted(c.task_id for c in chunks)
    assert queue.started_job_registry.get_job_ids() == []
    assert dispatcher.queue_depth(HIGH) == 0
    assert _execution_keys(dispatcher.connection, [c.task_id for c in chunks]) == []
    assert dispatcher.connection.hget(worker.key, "successful_job_count") == b"4"
    # And the worker left none of the keys naming its calls behind
    assert set(dispatcher.connection.keys("rq:feedfan:take:*")) <= calls_before


def test_a_sigterm_during_a_take_that_finds_nothing_stops_the_idle_worker(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a feedfan worker of an empty queue, and a SIGTERM that arrives while its take
    # (the script call looking for a job) is on its way
    settings, _, dispatcher = _rq(harness)
    worker = FeedfanWorker([dispatcher.rq_queue(HIGH)], connection=dispatcher.connection)
    script = worker._script

    def signalled(*args: Any, **kwargs: Any) -> Any:
        worker.request_stop(signal.SIGTERM, None)
        return script(*args, **kwargs)

    monkeypatch.setattr(worker, "_script", signalled)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with _runs_chunks(settings, monkeypatch):
        worker.bootstrap()
        try:
            # When it looks for a job, ready to wait five seconds for one
            started = time.monotonic()
            # Then it stops at once, as RQ stops an idle worker, instead of waiting
            with pytest.raises(StopRequested):
                worker.dequeue_job_and_maintain_ttl(5, max_idle_time=5)
            assert time.monotonic() - started < 2
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            worker.teardown()


def _threads_not_blocking(pid: int, signals: set[int]) -> dict[int, list[int]]:
    """Threads of ``pid`` other than its main one, each with the ``signals`` it does not block."""
    found: dict[int, list[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        if tid == pid:
            continue
        status = (task / "status").read_text()
        blocked = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
        found[tid] = sorted(sig for sig in signals if not blocked & (1 << (sig - 1)))
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads threads from Linux's /proc")
def test_a_stop_signal_reaches_the_main_thread_of_an_idle_worker_at_once(
    harness: Harness,
) -> None:
    # Given feedfan's RQ workers, idle in RQ's wait for a job after running a fanout
    settings, manager, _ = _rq(harness)
    worker = harness.start_worker(settings)
    assert worker is not None
    user = make_user(_namespace(), 3, 20)
    _settle(harness, manager, manager.add_user_activity(user, _pin(user)))
    children: list[int] = []

    def listening() -> bool:
        children[:] = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(worker.pid)], capture_output=True, text=True, check=False
            ).stdout.split()
        ]
        return bool(children) and all(
            len(list(Path(f"/proc/{c}/task").iterdir())) > 1 for c in children
        )

    wait_for(listening, timeout=30, message=f"no worker thread\n{harness.worker_logs()}")
    time.sleep(1)

    # Then no thread but the main one takes SIGTERM or SIGINT: one that did would hold
    # the signal until the main thread's blocking wait for a job ended (60 s)
    stops = {signal.SIGTERM, signal.SIGINT}
    for child in children:
        open_to = _threads_not_blocking(child, stops)
        assert open_to and all(signals == [] for signals in open_to.values()), (child, open_to)

    # And when the workers are told to stop, as a service manager stops them, they stop soon
    started = time.monotonic()
    os.killpg(worker.pid, signal.SIGTERM)
    worker.process.wait(timeout=30)
    assert time.monotonic() - started < 10, harness.worker_logs()


def test_a_chunk_held_when_rq_suspends_the_worker_goes_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker that ran one chunk, whose finish took and started the next
    settings, _, dispatcher = _rq(harness)
    first, second = _chunks(2)
    dispatcher.enqueue_many([first, second])
    queue = dispatcher.rq_queue(HIGH)
    worker = FeedfanWorker([queue], connection=dispatcher.connection)
    with _runs_chunks(settings, monkeypatch):
        worker.bootstrap()
        try:
            taken = worker.dequeue_job_and_maintain_ttl(None)
            assert taken is not None
            worker.execute_job(*taken)
            assert queue.started_job_registry.get_job_ids() == [second.task_id]
            # When RQ marks it suspended (`rq suspend` seen by RQ's own check)
            worker.set_state(WorkerStatus.SUSPENDED)
            # Then the held chunk is back at the head of its queue, not started
            assert dispatcher.connection.lrange(queue.key, 0, -1) == [second.task_id.encode()]
            assert queue.started_job_registry.get_job_ids() == []
            assert dispatcher.connection.hget(f"rq:job:{second.task_id}", "status") == b"queued"
        finally:
            worker.teardown()


def test_a_chunk_taken_with_the_last_finish_goes_back_when_the_worker_quits(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given three chunks waiting, and a worker (in this process) told to run one job
    settings, _, dispatcher = _rq(harness)
    chunks = _chunks(3)
    dispatcher.enqueue_many(chunks)
    queue = dispatcher.rq_queue(HIGH)
    worker = FeedfanWorker([queue], connection=dispatcher.connection)
    # When it runs it: the finish takes the next chunk, then the worker quits
    with _runs_chunks(settings, monkeypatch):
        worker.work(burst=True, max_jobs=1)
    # Then that chunk is back at the head of its queue, not left in the intermediate
    # list (where only RQ's recovery, a minute later, would find it)
    waiting = [i.decode() for i in dispatcher.connection.lrange(queue.key, 0, -1)]
    assert waiting == [c.task_id for c in chunks[1:]]
    assert dispatcher.connection.llen(queue.intermediate_queue_key) == 0
    assert queue.finished_job_registry.get_job_ids() == [chunks[0].task_id]
    # And it is queued again as RQ would show it: not started, no execution left behind
    assert queue.started_job_registry.get_job_ids() == []
    fields = dispatcher.connection.hgetall(f"rq:job:{chunks[1].task_id}")
    assert fields[b"status"] == b"queued" and not fields.get(b"started_at")
    assert _execution_keys(dispatcher.connection, [c.task_id for c in chunks]) == []
    # And a worker started later runs both
    with _runs_chunks(settings, monkeypatch):
        FeedfanWorker([queue], connection=dispatcher.connection).work(burst=True)
    assert len(queue.finished_job_registry.get_job_ids()) == 3


def test_a_job_whose_hash_does_not_load_is_kept_failed_and_the_worker_goes_on(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job whose hash RQ cannot read (a broken date) ahead of a good chunk
    settings, _, dispatcher = _rq(harness)
    broken, good = _chunks(2)
    dispatcher.enqueue_many([broken, good])
    connection = dispatcher.connection
    connection.hset(f"rq:job:{broken.task_id}", "created_at", "yesterday")
    queue = dispatcher.rq_queue(HIGH)
    worker = FeedfanWorker([queue], connection=connection)
    # When a worker drains the queue
    with _runs_chunks(settings, monkeypatch):
        worker.work(burst=True)
    # Then the good chunk ran, and the broken job is kept with a reason naming the field
    assert queue.finished_job_registry.get_job_ids() == [good.task_id]
    kept = dispatcher.failed_messages()
    assert len(kept) == 1 and "created_at" in kept[0].reason and "yesterday" in kept[0].reason
    assert connection.llen(queue.intermediate_queue_key) == 0
    # And it is not left looking started: no started entry, no execution record
    assert queue.started_job_registry.get_job_ids() == []
    assert _execution_keys(connection, [broken.task_id, good.task_id]) == []


def test_rq_suspend_stops_a_busy_worker_within_a_second_holding_nothing(
    harness: Harness,
) -> None:
    # Given a worker running a fanout of 40 slow one-follower chunks
    settings, manager, dispatcher = _rq(harness, fanout_chunk_size=1)
    storage = manager.storage
    assert isinstance(storage, RedisStorage)
    harness.start_worker(settings, env={CHUNK_DELAY_VARIABLE: "0.1"})
    user = make_user(_namespace(), 40, 0)
    pin = _pin(user)
    receipt = manager.add_user_activity(user, pin)
    wait_for(lambda: bool(started_chunks(storage)), timeout=SETTLE, message="no chunk started")
    rq = [os.path.join(os.path.dirname(sys.executable), "rq")]
    url = ["--url", settings.effective_broker_url]
    queue = dispatcher.rq_queue(HIGH)
    # When RQ's workers are suspended
    subprocess.run([*rq, "suspend", *url], check=True, capture_output=True)
    try:
        # Then within a second and a chunk it takes no more, and the chunk it had taken
        # with the last one's finish is back in the queue, not held in the intermediate list
        time.sleep(2.0)
        waiting = dispatcher.queue_depth(HIGH)
        time.sleep(1.0)
        assert dispatcher.queue_depth(HIGH) == waiting > 0
        assert dispatcher.connection.llen(queue.intermediate_queue_key) == 0
        assert queue.started_job_registry.get_job_ids() == []
    finally:
        subprocess.run([*rq, "resume", *url], check=True, capture_output=True)
    # And resumed, it finishes the fanout
    status = _settle(harness, manager, receipt)
    assert (status.done, status.failed) == (40, 0) and _everyone_has(manager, user, pin)


def test_purge_deletes_the_queues_and_their_jobs(harness: Harness) -> None:
    # Given chunks waiting on both queues
    settings, _, dispatcher = _rq(harness)
    chunks = _chunks(2, per_priority=True)
    dispatcher.enqueue_many(chunks)
    connection = dispatcher.connection
    job_key = f"rq:job:{chunks[0].task_id}"
    assert connection.exists(job_key)
    # When the dispatcher purges
    dispatcher.purge()
    # Then no queue, job or registry of these queues is left
    assert (dispatcher.queue_depth(HIGH), dispatcher.queue_depth(LOW)) == (0, 0)
    assert not connection.exists(job_key)
    assert not list(connection.scan_iter(match=f"*{settings.queue_high}*"))


# Bad input -------------------------------------------------------------------------


def test_a_pickled_job_is_refused_kept_and_the_worker_goes_on(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a worker, and a raw RQ job whose data is a pickle that would make a directory
    manager = harness.manager(harness.settings())
    dispatcher = manager.dispatcher
    worker = harness.start_worker(manager.settings)
    assert worker is not None
    marker = tmp_path / "code-ran-from-a-pickle"
    dispatcher.push_raw(HIGH, pickle.dumps(_Pickled(marker)), envelope=False)
    # When a valid fanout follows it on the same queue
    user = make_user(_namespace(), 3, 2)
    pin = _pin(user)
    status = _settle(harness, manager, manager.add_user_activity(user, pin))
    # Then the valid work is done, nothing was unpickled, and the pickle is kept with why
    assert (status.done, status.failed) == (2, 0) and _everyone_has(manager, user, pin)
    kept = _kept(dispatcher, 1)
    assert not marker.exists(), "a pickled payload was unpickled"
    assert kept[0].queue == manager.settings.queue_high
    assert "pickled" in kept[0].reason and "never unpickles" in kept[0].reason
    assert worker.alive()
    log = worker.log_path.read_text()
    assert "feedfan refused RQ job raw-" in log
    assert "could not record the failure" not in log


def test_a_malformed_payload_is_kept_with_its_reason_and_the_worker_goes_on(
    harness: Harness,
) -> None:
    manager = harness.manager(harness.settings())
    dispatcher = manager.dispatcher
    worker = harness.start_worker(manager.settings)
    assert worker is not None
    # Given a well-formed RQ job for feedfan whose task body is not JSON
    dispatcher.push_raw(LOW, b"this is not json")
    user = make_user(_namespace(), 1, 4)
    pin = _pin(user)
    status = _settle(harness, manager, manager.add_user_activity(user, pin))
    # Then it is kept once (not retried) with the decoder's reason, and work went on
    assert (status.done, status.failed) == (2, 0) and _everyone_has(manager, user, pin)
    kept = _kept(dispatcher, 1)
    assert len(kept) == 1
    assert kept[0].body == "this is not json" and kept[0].queue == manager.settings.queue_low
    assert kept[0].reason.startswith("feedfan.errors.PayloadError: task is not JSON")
    assert worker.alive()
    # And it belongs to no fanout, so there is no progress to count it in, and no second error
    assert "could not record the failure" not in worker.log_path.read_text()


def test_a_job_naming_another_function_is_refused_and_runs_nothing(
    harness: Harness, tmp_path: Path
) -> None:
    # Given a JSON job (no pickle) that would call os.makedirs if a worker obeyed it
    manager = harness.manager(harness.settings())
    dispatcher = manager.dispatcher
    marker = tmp_path / "code-ran-from-a-json-job"
    data = json.dumps(["os.makedirs", None, [str(marker)], {}]).encode()
    dispatcher.push_raw(HIGH, data, envelope=False)
    # When a worker takes it
    harness.start_worker(manager.settings)
    kept = _kept(dispatcher, 1)
    # Then nothing ran and the reason names the function
    assert not marker.exists()
    assert "calls 'os.makedirs'" in kept[0].reason
    assert "feedfan's queues run only feedfan.backends.rq.run_task" in kept[0].reason


# Failures, replay, redelivery ---------------------------------------------------------


def test_a_chunk_that_fails_for_good_is_counted_then_replayed(harness: Harness) -> None:
    # Given chunks that outlive the time limit, with no retries, and a malformed job
    settings = harness.settings(chunk_time_limit=1, max_retries=0)
    manager = harness.manager(settings)
    dispatcher = manager.dispatcher
    slow = harness.start_worker(settings, env={CHUNK_DELAY_VARIABLE: "3"})
    assert slow is not None
    dispatcher.push_raw(HIGH, b"{}")
    user = make_user(_namespace(), 2, 0)
    pin = _pin(user)
    receipt = manager.add_user_activity(user, pin)
    # When they time out, then the fanout settles with one failed chunk, kept in RQ
    status = _settle(harness, manager, receipt)
    assert (status.done, status.failed) == (0, 1)
    kept = _kept(dispatcher, 2)
    assert any("JobTimeoutException" in m.reason for m in kept)
    slow.stop()
    # And once a normal worker runs, replay sends back only the valid chunk
    harness.start_worker(settings)
    assert dispatcher.replay_failed() == 1
    wait_for(
        lambda: (s := manager.fanout_status(receipt)) is not None and (s.done, s.failed) == (1, 0),
        timeout=SETTLE,
        message=f"the replayed chunk did not run\n{harness.worker_logs()}",
    )
    assert _everyone_has(manager, user, pin)
    assert [m.body for m in dispatcher.failed_messages()] == ["{}"]


def test_a_chunk_lost_with_its_worker_runs_again_without_spending_a_retry(
    harness: Harness,
) -> None:
    # Given no retries at all, and a worker in the middle of a slow chunk
    settings = harness.settings(max_retries=0)
    manager = harness.manager(settings)
    storage = manager.storage
    assert isinstance(storage, RedisStorage)
    worker = harness.start_worker(settings, env={CHUNK_DELAY_VARIABLE: "0.7"})
    assert worker is not None
    user = make_user(_namespace(), 5, 0)
    pin = _pin(user)
    receipt = manager.add_user_activity(user, pin)
    wait_for(lambda: bool(started_chunks(storage)), timeout=SETTLE, message="no chunk started")
    # When the whole worker is SIGKILLed and another one starts
    worker.kill()
    replacement = harness.start_worker(settings)
    assert replacement is not None
    # Then the chunk runs again (RQ alone would fail it: it has no retry left)
    bound = manager.dispatcher.redelivery_bound()
    assert bound is not None
    status = _settle(harness, manager, receipt, timeout=bound + 45)
    assert (status.done, status.failed) == (1, 0) and _everyone_has(manager, user, pin)
    assert "again (1 of 5)" in replacement.log_path.read_text()
    assert manager.dispatcher.failed_messages() == []


def test_a_chunk_registered_by_a_worker_killed_before_it_began_runs_again(
    harness: Harness,
) -> None:
    # Given a chunk a dead worker had popped and registered as running (RQ writes the
    # started registry one round trip before the job's status), so it is still QUEUED
    settings, manager, dispatcher = _rq(harness)
    lost = _abandon_a_chunk(manager, dispatcher)
    assert dispatcher.connection.hget(f"rq:job:{lost.job_id}", "status") == b"queued"
    # When a worker's maintenance finds its expired entry
    worker = harness.start_worker(settings)
    assert worker is not None
    # Then the chunk runs (RQ's own cleanup would drop the entry and the chunk with it)
    status = _settle(harness, manager, lost.receipt, timeout=30)
    assert (status.done, status.failed) == (1, 0) and _everyone_has(manager, lost.user, lost.pin)
    assert "again (1 of 5)" in worker.log_path.read_text()


def test_a_redelivery_cut_short_leaves_the_chunk_for_the_next_pass(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a chunk recorded as started by a dead worker, its entry expired
    _, manager, dispatcher = _rq(harness)
    lost = _abandon_a_chunk(manager, dispatcher, status="started")
    queue, job_id, entry = lost.queue, lost.job_id, lost.entry
    connection = dispatcher.connection
    worker = FeedfanWorker([queue], connection=connection)
    # When the maintenance pass that delivers it again dies halfway (here: raises
    # while putting it back on its queue)
    original = Queue.enqueue_job

    def dying(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("maintenance worker killed")

    monkeypatch.setattr(Queue, "enqueue_job", dying)
    with pytest.raises(RuntimeError):
        worker._redeliver_abandoned(queue)
    # Then the chunk is still recorded as abandoned, not in limbo
    assert connection.zscore(queue.started_job_registry.key, entry) is not None
    assert connection.lrange(queue.key, 0, -1) == []
    # And the next pass delivers it
    monkeypatch.setattr(Queue, "enqueue_job", original)
    worker._redeliver_abandoned(queue)
    assert connection.zscore(queue.started_job_registry.key, entry) is None
    assert connection.lrange(queue.key, 0, -1) == [job_id.encode()]


def test_a_chunk_lost_six_times_is_failed_as_a_poison_pill(harness: Harness) -> None:
    # Given a chunk recorded as started by a dead worker, already delivered again 5 times
    settings, manager, dispatcher = _rq(harness)
    meta = JSONJobSerializer.dumps({"feedfan_redeliveries": 5}).decode()
    lost = _abandon_a_chunk(manager, dispatcher, status="started", meta=meta)
    # When a worker's maintenance finds it
    harness.start_worker(settings)
    # Then it is failed with the reason, and its fanout counts it as failed
    status = _settle(harness, manager, lost.receipt)
    assert (status.done, status.failed) == (0, 1)
    kept = _kept(dispatcher, 1)
    assert "lost with its worker 6 times" in kept[0].reason


def _start_rq(
    harness: Harness, settings: Settings, worker_class: str, env: dict[str, str]
) -> WorkerProcess:
    # The plain `rq worker` line, with the worker class swapped: what a user would paste.
    command = RQDispatcher(settings).worker_command(list(FanoutPriority), concurrency=1)
    argv = list(command.argv)
    argv[argv.index("--worker-class") + 1] = worker_class
    log_path = harness.log_dir / f"rq-{worker_class.rsplit('.', 1)[-1]}.log"
    environment = {**os.environ, **settings.to_env(), **command.env, **env}
    environment["PYTHONPATH"] = os.getcwd()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    worker = WorkerProcess(process, log_path, "all")
    harness.workers.append(worker)
    return worker


def test_a_forking_workers_killed_horse_is_delivered_again_at_once(harness: Harness) -> None:
    # Given feedfan's forking worker, with redelivery of dead workers' jobs far away
    settings = harness.settings(redelivery_timeout=600, chunk_time_limit=30)
    manager = harness.manager(settings)
    storage = manager.storage
    assert isinstance(storage, RedisStorage)
    worker = _start_rq(
        harness, settings, "feedfan.backends.rq.FeedfanForkWorker", {CHUNK_DELAY_VARIABLE: "0.7"}
    )
    user = make_user(_namespace(), 5, 0)
    pin = _pin(user)
    receipt = manager.add_user_activity(user, pin)
    wait_for(lambda: bool(started_chunks(storage)), timeout=SETTLE, message="no chunk started")
    # When the work-horse running a chunk is SIGKILLed
    horse = int(started_chunks(storage)[0]["pid"])  # type: ignore[call-overload]
    assert horse != worker.pid
    os.kill(horse, signal.SIGKILL)
    # Then the same worker runs it again right away, not after redelivery_timeout
    status = _settle(harness, manager, receipt, timeout=60)
    assert (status.done, status.failed) == (1, 0) and _everyone_has(manager, user, pin)
    assert worker.alive()
    assert "again (1 of 5)" in worker.log_path.read_text()


def test_background_planning_runs_in_an_rq_worker(harness: Harness) -> None:
    # Given planning moved to the workers
    manager = harness.manager(harness.settings(planning="background"))
    harness.start_worker(manager.settings)
    user = make_user(_namespace(), 12, 7)
    pin = _pin(user)
    # When a fanout is sent, only its planning task is enqueued
    receipt = manager.add_user_activity(user, pin)
    assert receipt.planned_in_background and receipt.chunks == 0
    # Then a worker plans it, enqueues its chunks through RQ and they all run
    status = _settle(harness, manager, receipt)
    assert (status.total, status.done, status.failed) == (5, 5, 0)
    assert _everyone_has(manager, user, pin)


# Moving to RQ ---------------------------------------------------------------------


def _run_by_environment(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> tuple[Manager, str, Activity]:
    for name in [v for v in os.environ if v.startswith("FEEDFAN_")]:
        monkeypatch.delenv(name)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    manager = MyStreamManager()
    harness.managers.append(manager)
    user = make_user(_namespace(), 2, 2)
    pin = _pin(user)
    _settle(harness, manager, manager.add_user_activity(user, pin))
    return manager, user, pin


def test_the_same_manager_moves_from_celery_to_rq_by_one_variable(
    feedfan_redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("feedfan.backends.celery", reason="the Celery adapter is not installed")
    monkeypatch.chdir(tmp_path)
    celery = Harness("celery", log_dir=tmp_path / "celery", redis_url=feedfan_redis_url)
    rq = Harness("rq", log_dir=tmp_path / "rq", redis_url=feedfan_redis_url)
    (tmp_path / "celery").mkdir()
    (tmp_path / "rq").mkdir()
    try:
        # Given MyStreamManager run on Celery, configured by environment alone
        on_celery = celery.settings()
        celery.start_worker(on_celery)
        manager, user, pin = _run_by_environment(celery, monkeypatch, on_celery)
        assert manager.dispatcher.name == "celery" and _everyone_has(manager, user, pin)
        # When only FEEDFAN_DISPATCHER changes (same Redis as broker and storage)
        on_rq = on_celery.with_values({"dispatcher": "rq"}, source="test")
        assert {k: v for k, v in on_rq.to_env().items() if on_celery.to_env().get(k) != v} == {
            "FEEDFAN_DISPATCHER": "rq"
        }
        rq.start_worker(on_rq)
        moved, other, second = _run_by_environment(rq, monkeypatch, on_rq)
        # Then the same class fans out through RQ
        assert moved.dispatcher.name == "rq" and type(moved) is type(manager)
        assert _everyone_has(moved, other, second)
    finally:
        rq.close()
        celery.close()


def test_an_rq_manager_bound_in_code_runs_on_rq_with_its_own_connection(
    harness: Harness,
) -> None:
    # Given settings that name no dispatcher (the default would be `local`)
    settings = harness.settings(dispatcher="local")
    client = redis.Redis.from_url(settings.effective_redis_url)
    # When the Stream Framework style subclass is built with an existing connection
    manager = PinManager(settings=settings, connection=client)
    harness.managers.append(manager)
    # Then RQ runs the fanout on that connection
    assert isinstance(manager.dispatcher, RQDispatcher)
    assert manager.dispatcher.connection is client
    assert manager.settings.sources["dispatcher"] == "PinManager.bound_dispatcher"
    harness.start_worker(manager.settings)
    user = make_user(_namespace(), 3, 3)
    pin = _pin(user)
    status = _settle(harness, manager, manager.add_user_activity(user, pin))
    assert (status.done, status.failed) == (2, 0) and _everyone_has(manager, user, pin)


def test_an_unreachable_redis_is_named_in_one_clean_sentence() -> None:
    # Given RQ on a port where no Redis listens
    settings = load_settings(
        overrides={"dispatcher": "rq", "broker_url": "redis://127.0.0.1:1/0"}, env={}
    )
    dispatcher = RQDispatcher(settings)

    # When it is asked to reach the broker
    with pytest.raises(BrokerError) as raised:
        dispatcher.ping()

    # Then the message names the URL and the setting, without redis-py's period doubled
    message = str(raised.value)
    assert "redis://127.0.0.1:1/0" in message and "broker_url" in message
    assert ".." not in message


@pytest.mark.broker
def test_a_fanout_the_broker_refuses_says_why_and_what_to_do_in_clean_sentences(
    feedfan_redis_url: str,
) -> None:
    # Given feeds on a reachable Redis and an RQ broker where no Redis listens
    settings = load_settings(
        overrides={
            "dispatcher": "rq",
            "redis_url": feedfan_redis_url,
            "broker_url": "redis://127.0.0.1:1/0",
            "key_prefix": f"fft-{uuid.uuid4().hex[:8]}:",
        },
        env={},
    )
    manager = PinManager(settings=settings)
    try:
        # When an activity is added
        with pytest.raises(DispatchError) as raised:
            user = make_user(f"fft-{uuid.uuid4().hex[:8]}", 2, 1)
            manager.add_user_activity(user, Activity(actor=user, verb="pin", object=1))
    finally:
        manager.storage.clear()
        manager.close()

    # Then the error says what failed and how to complete it, with no doubled period
    message = str(raised.value)
    assert "Call the same method again" in message
    assert ".." not in message
