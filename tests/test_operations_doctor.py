"""`feedfan check` against real brokers: each thing that silently breaks fanout is flagged with a fix."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from operations_support import BACKEND_IDS, BACKENDS, namespace, open_harness, pin, write_module

from feedfan.cli import main
from feedfan.config import Settings, load_settings
from feedfan.dispatch import Finding
from feedfan.doctor import run_checks
from feedfan.testing import Harness, make_user, wait_for

pytestmark = [pytest.mark.broker]


def _by_code(findings: list[Finding]) -> dict[str, Finding]:
    return {f.code: f for f in findings}


def _errors(findings: list[Finding]) -> list[str]:
    return [f"{f.code}: {f.message}" for f in findings if f.level == "error"]


def _namespaced(**values: Any) -> Settings:
    """Settings from ``values`` alone, with a key prefix and queue names of their own."""
    name = f"ffdoc-{uuid.uuid4().hex[:8]}"
    own = {"key_prefix": f"{name}:", "queue_high": f"{name}.high", "queue_low": f"{name}.low"}
    return load_settings({**own, **values}, env={}, read_files=False)


def _use_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    for name in [v for v in os.environ if v.startswith("FEEDFAN_")]:
        monkeypatch.delenv(name)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)


@contextlib.contextmanager
def _process(
    argv: list[str], *, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A process of our own, in its own group, stopped (by its id) on the way out."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


# Every backend --------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS, ids=BACKEND_IDS)
def harness(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    yield from open_harness(request, tmp_path_factory)


@pytest.mark.slow
def test_a_queue_with_no_consumer_is_an_error_until_a_worker_serves_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given feedfan's queues on a live broker, and no worker
    settings = harness.settings()
    user = make_user(namespace(), 1, 1)
    harness.manager(settings).add_user_activity(user, pin(user))
    # When the doctor looks
    found = _by_code(run_checks(settings))
    # Then no consumer is an error naming the queue and the command to run (where the
    # broker can count consumers; Dramatiq's Redis broker cannot, and says so)
    assert found["broker.reachable"].level == "ok"
    if "queue.consumers-unknown" in found:
        assert harness.dispatcher == "dramatiq" and harness.broker_url is None
    else:
        assert found["queue.no-consumer"].level == "error"
        assert "feedfan worker --priority" in found["queue.no-consumer"].fix
        _use_env(monkeypatch, settings)
        assert main(["check"]) == 1
        assert "ERROR    queue.no-consumer" in capsys.readouterr().out
    # When `feedfan worker` serves both queues
    harness.start_worker(settings)
    wait_for(
        lambda: not _errors(run_checks(settings)),
        timeout=90,
        message=f"errors remain: {_errors(run_checks(settings))}\n{harness.worker_logs()}",
    )
    # Then the deployment passes: nothing is an error
    found = _by_code(run_checks(settings))
    assert "queue.no-consumer" not in found
    if harness.dispatcher == "rq":
        assert found["rq.workers"].level == "ok"
    if harness.dispatcher == "celery":
        assert found["celery.worker-prefetch"].level == "ok"


@pytest.mark.parametrize(
    ("dispatcher", "url"),
    [
        ("celery", "redis://:secret@127.0.0.1:1/0"),
        ("celery", "amqp://guest:secret@127.0.0.1:1//"),
        ("rq", "redis://:secret@127.0.0.1:1/0"),
        ("dramatiq", "redis://:secret@127.0.0.1:1/0"),
        ("dramatiq", "amqp://guest:secret@127.0.0.1:1/"),
    ],
    ids=BACKEND_IDS,
)
def test_an_unreachable_broker_is_an_error_with_its_password_masked(
    dispatcher: str,
    url: str,
    feedfan_redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a reachable feed Redis and a broker nobody listens for
    settings = load_settings(
        {
            "dispatcher": dispatcher,
            "broker_url": url,
            "redis_url": feedfan_redis_url,
            "key_prefix": f"ffdoc-{uuid.uuid4().hex[:6]}:",
        },
        env={},
        read_files=False,
    )
    # When the doctor runs, as a command
    _use_env(monkeypatch, settings)
    started = time.monotonic()
    code = main(["check"])
    out = capsys.readouterr().out
    # Then it says the broker cannot be reached and how to fix it, at once, without the password
    assert code == 1
    assert "ERROR    broker.unreachable" in out
    assert "fix: start the broker or fix broker_url (FEEDFAN_BROKER_URL)." in out
    assert "secret" not in out
    assert time.monotonic() - started < 60


# Celery: the user's own app ------------------------------------------------------------

_PICKLE_APP = """
    from celery import Celery
    from feedfan.backends.celery import CeleryManager
    from feedfan.config import load_settings
    from feedfan.testing.managers import ConformanceManager

    app = Celery("pickly", broker=load_settings().effective_broker_url, set_as_current=False)
    app.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])

    class PickleManager(CeleryManager):
        celery_app = app
        feed_classes = ConformanceManager.feed_classes
    """

_GREEDY_APP = """
    from celery import Celery
    from feedfan.backends.celery import CeleryManager
    from feedfan.config import load_settings
    from feedfan.testing.managers import ConformanceManager

    settings = load_settings()
    app = Celery("greedy", broker=settings.effective_broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=4,
        task_annotations={"feedfan.run": {"acks_late": False}},
        broker_transport_options={"visibility_timeout": 5, "queue_order_strategy": "priority"},
    )

    class GreedyManager(CeleryManager):
        celery_app = app
        feed_classes = ConformanceManager.feed_classes
    """

_GREEDY_WORKER = """
    from feedfan.backends.celery import register_tasks
    from {module} import app

    register_tasks(app)
    """


@pytest.fixture(params=["redis", "amqp"])
def celery_settings(
    request: pytest.FixtureRequest, feedfan_redis_url: str, tmp_path: Path
) -> Settings:
    broker = (
        feedfan_redis_url
        if request.param == "redis"
        else request.getfixturevalue("feedfan_amqp_url")
    )
    return _namespaced(
        dispatcher="celery",
        broker_url=broker,
        redis_url=feedfan_redis_url,
        chunk_time_limit=4,
        redelivery_timeout=8,
    )


def test_a_celery_app_that_accepts_pickle_is_refused_and_the_doctor_says_why(
    celery_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the user's manager publishes through their Celery app, which accepts pickle
    module = f"pickle_app_{uuid.uuid4().hex[:8]}"
    path = write_module(tmp_path, module, _PICKLE_APP)
    monkeypatch.syspath_prepend(str(path))
    settings = celery_settings.replace(app=f"{module}:PickleManager")
    _use_env(monkeypatch, settings)
    # When the doctor looks
    found = _by_code(run_checks(settings))
    # Then the app is an error: it accepts pickle, and the fix is JSON only
    finding = found["app.unusable"]
    assert finding.level == "error"
    assert "accepts pickle" in finding.message and "accept_content=['json']" in finding.message


def test_a_greedy_celery_app_and_its_live_workers_are_flagged(
    celery_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the user's Celery app prefetches 4, turns late acks off for feedfan's task and
    # (on Redis) has a visibility timeout of 5 s for chunks that may run 5 s
    module = f"greedy_app_{uuid.uuid4().hex[:8]}"  # each broker imports its own copy
    path = write_module(tmp_path, module, _GREEDY_APP)
    write_module(tmp_path, f"{module}_worker", _GREEDY_WORKER.format(module=module))
    monkeypatch.syspath_prepend(str(path))
    settings = celery_settings.replace(app=f"{module}:GreedyManager")
    _use_env(monkeypatch, settings)
    # When the doctor looks before any worker runs
    found = _by_code(run_checks(settings))
    # Then each is an error with its fix
    assert found["celery.prefetch"].level == "error"
    assert "worker_prefetch_multiplier = 1" in found["celery.prefetch"].fix
    assert found["celery.acks-early"].level == "error"
    assert "acks_late=False" in found["celery.acks-early"].message
    if settings.effective_broker_url.startswith("redis"):
        assert found["celery.visibility-timeout"].level == "error"
        assert "redelivery_timeout (8 s)" in found["celery.visibility-timeout"].fix
    # And when the user starts a worker of that app the way Celery's docs do
    argv = [sys.executable, "-m", "celery", "-A", f"{module}_worker:app", "worker"]
    argv += ["-Q", f"{settings.queue_high},{settings.queue_low}", "--concurrency", "1"]
    argv += ["-n", f"greedy-{uuid.uuid4().hex[:6]}@%h", "--without-mingle", "--without-gossip"]
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(path)}
    with _process(argv, env=env, log=tmp_path / "greedy-worker.log"):
        wait_for(
            lambda: "celery.worker-prefetch" in _by_code(run_checks(settings)),
            timeout=90,
            message=f"the worker never answered:\n{(tmp_path / 'greedy-worker.log').read_text()}",
        )
        live = _by_code(run_checks(settings))
    # Then the doctor also sees what the running worker does
    assert live["celery.worker-prefetch"].level == "error"
    assert "prefetch 4 for 1 process(es)" in live["celery.worker-prefetch"].message
    assert live["celery.worker-acks-early"].level == "error"
    assert live["queue.consumed"].level == "ok"


# RQ: a worker started without feedfan's class -------------------------------------------


def test_a_plain_rq_worker_on_feedfans_queues_is_an_error(
    feedfan_redis_url: str, tmp_path: Path
) -> None:
    # Given someone started RQ's default worker (pickle serializer) on feedfan's queues
    settings = _namespaced(dispatcher="rq", redis_url=feedfan_redis_url)
    rq = str(Path(sys.executable).with_name("rq"))
    argv = [rq, "worker", "--url", feedfan_redis_url, settings.queue_high, settings.queue_low]
    with _process(argv, env=dict(os.environ), log=tmp_path / "rq.log"):
        wait_for(
            lambda: "rq.pickle-worker" in _by_code(run_checks(settings)),
            timeout=60,
            message=f"not flagged: {run_checks(settings)}\n{(tmp_path / 'rq.log').read_text()}",
        )
        found = _by_code(run_checks(settings))
    # Then the doctor says it unpickles what it reads, and how to start feedfan's worker instead
    finding = found["rq.pickle-worker"]
    assert finding.level == "error"
    assert "rq.Worker" in finding.message and "unpickles" in finding.message
    assert "--worker-class feedfan.backends.rq.FeedfanWorker" in finding.fix


# Redis: shared, evicting ------------------------------------------------------------------


def test_a_feed_redis_shared_with_other_data_under_the_default_prefix_is_an_error(
    feedfan_redis_url: str,
) -> None:
    client = redis.Redis.from_url(feedfan_redis_url)
    other = f"session:{uuid.uuid4().hex}"
    client.set(other, "x")
    try:
        settings = load_settings({"redis_url": feedfan_redis_url}, env={}, read_files=False)
        finding = _by_code(run_checks(settings))["storage.shared"]
        assert finding.level == "error" and "'feedfan:', the default" in finding.message
        assert "distinctive key_prefix" in finding.fix
    finally:
        client.delete(other)
        client.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def evicting_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis server of this test's own that evicts any key when full."""
    port = _free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]
    argv += ["--dir", str(tmp_path)]
    with _process(argv, env=dict(os.environ), log=tmp_path / "redis.log"):
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)

        def up() -> bool:
            with contextlib.suppress(redis.RedisError):
                return bool(client.ping())
            return False

        wait_for(up, timeout=20, message="the test's redis-server did not start")
        client.close()
        yield url


def test_a_redis_that_evicts_keys_is_an_error_for_feeds_and_for_the_broker(
    evicting_redis: str, feedfan_redis_url: str
) -> None:
    # Given feeds in a Redis that evicts any key when full
    feeds = load_settings(
        {"dispatcher": "eager", "redis_url": evicting_redis}, env={}, read_files=False
    )
    finding = _by_code(run_checks(feeds))["storage.eviction"]
    assert finding.level == "error" and "allkeys-lru" in finding.message
    assert "noeviction" in finding.fix
    # And, separately, an RQ broker that does
    broker = load_settings(
        {
            "dispatcher": "rq",
            "broker_url": evicting_redis,
            "redis_url": feedfan_redis_url,
            "key_prefix": f"ffdoc-{uuid.uuid4().hex[:6]}:",
        },
        env={},
        read_files=False,
    )
    found = _by_code(run_checks(broker))
    assert found["broker.eviction"].level == "error"
    assert "queued chunks" in found["broker.eviction"].message


_BOUND_APP = """
    from feedfan.backends.rq import RQManager

    class BoundToRQ(RQManager):
        '''Binds the queue in code, as Stream Framework's docs suggest; no dispatcher setting.'''
"""


def test_the_doctor_checks_the_queue_an_app_binds_in_code(
    feedfan_redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an app whose manager subclasses RQManager, and no dispatcher configured
    monkeypatch.syspath_prepend(str(write_module(tmp_path, "bound_app", _BOUND_APP)))
    settings = _namespaced(app="bound_app:BoundToRQ", redis_url=feedfan_redis_url)
    assert settings.dispatcher == "local"
    # When the doctor looks
    found = _by_code(run_checks(settings))
    # Then it checks RQ, the queue workers would use: the broker, and that nobody consumes
    assert "dispatcher.local" not in found
    assert found["broker.reachable"].level == "ok"
    assert found["queue.no-consumer"].level == "error"
    assert "feedfan worker --priority" in found["queue.no-consumer"].fix
