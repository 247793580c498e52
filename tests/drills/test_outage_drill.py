"""Broker and storage outages mid-fanout: dropped connections, a broker gone for seconds, a restart.

The producer first, with no worker running yet (so what reached the queues
can be counted): half-way through sending a fanout its broker connections
are dropped (every client of this test's Redis database, ``CLIENT KILL``, or
every connection of this test's RabbitMQ vhost); then, for a second fanout,
its broker becomes unreachable for several seconds (a TCP proxy of the test's
own cuts it off). Each time ``add_user_activity`` must either enqueue every
chunk or raise a ``DispatchError`` whose ``accepted`` claims no more than
arrived, and the same call again must complete the fanout.

Then the workers: connections are dropped while they idle, and again at
random moments while they run a fanout of the drill's size; in full mode the
RabbitMQ application is also restarted once, while another fanout is sent.
Workers must reconnect by themselves (every process the same, none restarted
by the test or by a pool), and every follower's feeds must hold each activity
exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from random import Random

import pytest
import redis
from drill_backends import (
    IN_PROCESS_BACKENDS,
    WORKER_BACKENDS,
    Backend,
    Drill,
    drill_settings,
    warm_up,
    worker_env,
)
from drill_faults import ProgressInjector, RabbitControl, drop_redis_clients, process_tree
from drill_feeds import check_feeds, new_fanout, settle, timed_settle
from drill_producer import (
    fanout_id,
    gives_advice,
    producer_trial,
    send_once,
    send_until_accepted,
    waiting,
)
from drill_proxy import TcpProxy
from drill_scale import Scale

from feedfan.errors import redact_url
from feedfan.storage.redis import RedisStorage
from feedfan.testing import Harness

_UNREACHABLE = 4.0
"""Seconds the producer's broker is unreachable: longer than its client libraries retry."""

_IDLE_DROPS = 2
"""Connection drops while the workers wait for work, before the timed fanout."""

_RABBITMQ_DOWN = 8.0
"""Seconds the full drill keeps the RabbitMQ application stopped."""


def _rabbit(backend: Backend, harness: Harness) -> RabbitControl | None:
    """``rabbitmqctl`` on the harness's vhost, for a backend on RabbitMQ."""
    if backend.broker != "amqp":
        return None
    assert harness.broker_url is not None
    return RabbitControl(harness.broker_url)


def _fault_kinds(backend: Backend, scale: Scale, rng: Random) -> list[str]:
    kinds = ["redis"] * scale.outage_faults
    if backend.broker == "amqp":
        kinds = ["redis" if n % 2 else "rabbitmq" for n in range(scale.outage_faults)]
    rng.shuffle(kinds)
    return kinds


@pytest.mark.parametrize(
    "backend", [*WORKER_BACKENDS, *IN_PROCESS_BACKENDS], ids=lambda backend: backend.id
)
def test_outages_lose_nothing_and_workers_reconnect_by_themselves(drill: Drill) -> None:
    backend, harness, scale, rng = drill.backend, drill.harness, drill.scale, drill.rng
    redis_url = harness.redis_url
    assert redis_url is not None
    rabbit = _rabbit(backend, harness)
    row = drill.row("outage", followers=scale.followers)
    baseline = drill.baseline()
    row.baseline = baseline.seconds
    settings = drill_settings(harness)
    observer = harness.manager(settings)
    trials = [new_fanout(scale.producer_followers, label="drop")]

    def drop_connections() -> str:
        if rabbit is not None:
            return f"closed {rabbit.close_connections('feedfan outage drill')} AMQP connections"
        return f"dropped {drop_redis_clients(redis_url)} Redis clients"

    # Given no worker runs, when the producer's connections drop half-way through a fanout
    # Then it enqueued it all, or said how much; and the same call again completes it
    row.notes.append(producer_trial(settings, observer, trials[0], fault=drop_connections))
    if backend.has_workers:
        # And so when its broker is unreachable for seconds from half-way through a fanout
        broker = settings.effective_broker_url
        proxy = TcpProxy(broker)
        try:
            trials.append(new_fanout(scale.producer_followers, label="gone"))
            row.notes.append(
                producer_trial(
                    settings.replace(broker_url=proxy.url(broker)),
                    observer,
                    trials[1],
                    fault=lambda: (
                        f"broker unreachable for {_UNREACHABLE:g} s "
                        f"({proxy.outage(_UNREACHABLE)} connection(s) cut)"
                    ),
                    after=proxy.wait_until_up,
                    unreachable=redact_url(proxy.url(broker)),
                )
            )
        finally:
            proxy.close()

    # Given workers that drained those fanouts
    worker = harness.start_worker(settings, env=worker_env(scale))
    manager = harness.manager(settings)
    for fanout in trials:
        settle(
            manager,
            fanout_id(manager, fanout),
            timeout=scale.settle_timeout,
            logs=harness.worker_logs,
        )
    warm_up(manager, timeout=scale.settle_timeout)
    tree = process_tree(worker.pid) if worker is not None else None
    # When connections drop while the workers idle
    for _ in range(_IDLE_DROPS):
        row.notes.append(f"idle: {drop_connections()}")
        time.sleep(0.5)

    # When a fanout runs while connections drop at random moments (and, in full mode,
    # RabbitMQ restarts while another fanout is sent)
    kinds = _fault_kinds(backend, scale, rng)
    moments = sorted(rng.uniform(0.1, 0.6) for _ in kinds)
    faults: list[tuple[float, Callable[[], str]]] = [
        (
            moment,
            (lambda: f"dropped {drop_redis_clients(redis_url)} Redis clients")
            if kind == "redis"
            else drop_connections,
        )
        for moment, kind in zip(moments, kinds, strict=True)
    ]
    during = new_fanout(max(scale.producer_followers, 1), label="down")
    sender = harness.manager(settings)
    sent_during: list[str] = []
    if rabbit is not None and scale.restart_rabbitmq:

        def restart() -> str:
            others = rabbit.others_connected()
            if others:
                return (
                    f"RabbitMQ restart skipped: {others} connection(s) of other vhosts are open "
                    f"on this shared broker; {drop_connections()} instead"
                )

            def send_while_down() -> None:
                accepted, error = send_once(sender, during)
                if error is None:
                    sent_during.append("accepted")
                    return
                # A fanout planned by a worker (planning = auto) only sends its planning
                # task, and that error comes without the manager's advice to call again.
                advice = "" if gives_advice(error) else ", without the advice to call again"
                sent_during.append(f"{type(error).__name__}, accepted={accepted}{advice}")

            rabbit.restart_app(down_for=_RABBITMQ_DOWN, on_down=send_while_down)
            return (
                f"restarted the RabbitMQ application ({_RABBITMQ_DOWN:g} s down; a fanout sent "
                f"meanwhile: {sent_during[0]})"
            )

        faults.append((rng.uniform(0.1, 0.6), restart))
        faults.sort(key=lambda fault: fault[0])
    main = new_fanout(scale.followers, label="run")
    injector = ProgressInjector(
        manager, fanout_id(manager, main), scale.chunks, faults, scale.settle_timeout
    )
    injector.start()
    started = time.monotonic()
    receipt = manager.add_user_activity(main.user, main.activity)
    if receipt.planned_in_background:
        row.notes.append("planned in a worker (planning = auto)")
    row.settle = timed_settle(
        manager, receipt, started=started, timeout=scale.settle_timeout, logs=harness.worker_logs
    )
    injected = injector.join()
    # (a slow fault, such as rabbitmqctl under load, may let the fanout outrun the last ones)
    assert injected, f"the fanout settled before any fault; it outran {injector.outrun}"
    if injector.outrun:
        row.notes.append(f"settled before the faults planned at {', '.join(injector.outrun)}")
    row.faults = f"{len(trials)} producer + {_IDLE_DROPS} idle + {len(injected)} mid-run outages"
    row.notes += injected
    fanouts = [*trials, main]
    if sent_during:
        send_until_accepted(sender, during)
        settle(
            sender,
            fanout_id(sender, during),
            timeout=scale.settle_timeout,
            logs=harness.worker_logs,
        )
        fanouts.append(during)

    # Then every follower of every fanout has each activity exactly once
    storage = manager.storage
    assert isinstance(storage, RedisStorage)
    checks = [check_feeds(storage, fanout) for fanout in fanouts]
    row.lost = sum(check.lost for check in checks)
    row.duplicated = sum(check.duplicated for check in checks)
    assert (row.lost, row.duplicated) == (0, 0), [str(check) for check in checks]
    # And the producers' connections recover: asking for queue depths just works
    for each in (observer, manager, sender):
        waiting(each)
    # And the workers reconnected by themselves: every process the same, none restarted
    # (a pool replacing a process that gave up, as ``rq worker-pool`` does, hides a crash
    # that would stop ``rq worker`` for good)
    if tree is not None and worker is not None:
        assert worker.alive(), harness.worker_logs()
        problems = tree.changed()
        if backend.dispatcher == "celery":
            # Celery terminates the pool processes running tasks when its broker
            # connection drops (worker_cancel_long_running_tasks_on_connection_loss)
            # and starts new ones: by design, so only its main process must survive.
            row.notes.append(f"{len(problems)} Celery pool process(es) replaced by design")
            problems = {pid: p for pid, p in problems.items() if pid == worker.pid}
        assert not problems, f"{list(problems.values())}\n{harness.worker_logs()}"
        row.notes.append("every worker process reconnected by itself")


def test_an_rq_worker_survives_its_connection_dropping_mid_command(
    feedfan_redis_url: str,
) -> None:
    rq_backend = pytest.importorskip("feedfan.backends.rq")
    proxy = TcpProxy(feedfan_redis_url)
    # Given a worker whose client is built the way ``rq worker-pool`` builds it
    pool = redis.ConnectionPool.from_url(proxy.url(feedfan_redis_url))
    connection = redis.Redis(connection_pool=pool)
    worker = rq_backend.FeedfanWorker([f"drill-{time.time_ns()}"], connection=connection)
    try:
        worker.heartbeat()
        # When its connection drops in the middle of the heartbeat RQ's loop sends after
        # each job (the one Redis call of that loop with no handler: an error there makes
        # the worker quit, "found an unhandled exception, quitting")
        proxy.cut_next_request()
        # Then the heartbeat goes through on a new connection
        worker.heartbeat()
        assert connection.ttl(worker.key) > 0
    finally:
        connection.delete(worker.key)
        pool.disconnect()
        proxy.close()
