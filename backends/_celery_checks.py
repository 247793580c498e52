"""What in a Celery app's configuration breaks or weakens fanout, as `feedfan check` findings.

:func:`~feedfan.backends._celery_app.app_problems` refuses what would break
feedfan when an app is handed to it; these findings cover the same ground
and more (its ``feedfan.run`` task's options after ``task_annotations``, the
visibility timeout against the hard time limit), each with its fix, for the
app a dispatcher publishes through.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery

from feedfan.config import Settings
from feedfan.dispatch import Finding

from ._celery_app import (
    CONSUMER_PATH,
    TASK_NAME,
    TRANSPORT_PATH,
    app_broker_url,
    broker_kind,
    hard_time_limit,
)

__all__ = ["accepts_pickle", "app_findings"]

_PICKLE_TYPES = frozenset({"pickle", "application/x-python-serialize"})
_CELERY_CONSUMER = "celery.worker.consumer:Consumer"


def accepts_pickle(accepted: Iterable[object] | None) -> bool:
    """Whether an ``accept_content`` list lets pickled messages be decoded."""
    return bool({str(item).lower() for item in accepted or ()} & _PICKLE_TYPES)


def app_findings(app: Celery, settings: Settings) -> list[Finding]:
    """What in ``app``'s configuration (and its ``feedfan.run`` task) breaks or weakens fanout."""
    conf = app.conf
    found: list[Finding] = []
    accepted = sorted(str(item) for item in conf.accept_content or ())
    if accepts_pickle(accepted):
        found.append(
            Finding(
                "error",
                "celery.pickle",
                f"Celery app {app.main!r} has accept_content={accepted}: a message on feedfan's "
                "queues could run code while it is decoded.",
                "set accept_content = ['json'] (and task_serializer = 'json').",
            )
        )
    found.extend(_task_option_findings(app, settings))
    multiplier = conf.worker_prefetch_multiplier
    if multiplier != 1:
        found.append(
            Finding(
                "error",
                "celery.prefetch",
                f"Celery app {app.main!r} has worker_prefetch_multiplier={multiplier}: its "
                "workers reserve several chunks each, so HIGH chunks wait behind LOW ones, and "
                "on Redis a chunk reserved longer than the visibility timeout runs twice.",
                "set worker_prefetch_multiplier = 1, or start its workers with "
                "--prefetch-multiplier 1.",
            )
        )
    kind = broker_kind(app_broker_url(app))
    found.extend(_redis_findings(app, settings) if kind == "redis" else _amqp_findings(app))
    for name in (settings.queue_high, settings.queue_low):
        if not conf.task_create_missing_queues and not any(
            getattr(q, "name", None) == name for q in conf.task_queues or ()
        ):
            found.append(
                Finding(
                    "error",
                    "celery.missing-queue",
                    f"Celery app {app.main!r} does not create missing queues and has no {name!r}.",
                    f"add kombu.Queue({name!r}) to task_queues.",
                )
            )
    if str(conf.worker_consumer) not in (_CELERY_CONSUMER, CONSUMER_PATH):
        found.append(
            Finding(
                "warning",
                "celery.consumer",
                f"worker_consumer={conf.worker_consumer!r} is your own: malformed messages on "
                "feedfan's queues are dropped by Celery instead of kept.",
                f"subclass {CONSUMER_PATH.replace(':', '.')}.",
            )
        )
    if not any(f.level == "error" for f in found):
        found.append(
            Finding(
                "ok",
                "celery.app",
                f"Celery app {app.main!r}: JSON only, chunks acknowledged after their write, "
                "one chunk reserved per process.",
            )
        )
    return found


def _task_option_findings(app: Celery, settings: Settings) -> list[Finding]:
    task = app.tasks.get(TASK_NAME)
    if task is None:
        return []
    found = []
    if not task.acks_late or not task.reject_on_worker_lost:
        found.append(
            Finding(
                "error",
                "celery.acks-early",
                f"feedfan's task in app {app.main!r} has acks_late={task.acks_late}, "
                f"reject_on_worker_lost={task.reject_on_worker_lost}: a chunk is acknowledged "
                "before its write, so a chunk whose worker dies is lost.",
                f"remove the task_annotations (or other setting) that change them for {TASK_NAME}.",
            )
        )
    if not task.time_limit:
        found.append(
            Finding(
                "warning",
                "celery.no-time-limit",
                f"feedfan's task in app {app.main!r} has no hard time limit: a stuck chunk holds "
                "its worker process for ever.",
                f"remove what clears time_limit for {TASK_NAME}; feedfan sets "
                f"{hard_time_limit(settings)} s.",
            )
        )
    return found


def _redis_findings(app: Celery, settings: Settings) -> list[Finding]:
    conf = app.conf
    options = conf.broker_transport_options or {}
    timeout = options.get("visibility_timeout", 3600)
    task = app.tasks.get(TASK_NAME)
    longest = (task.time_limit if task is not None else None) or conf.task_time_limit
    longest = longest or hard_time_limit(settings)
    found = []
    if timeout <= longest:
        found.append(
            Finding(
                "error",
                "celery.visibility-timeout",
                f"the Redis visibility_timeout of app {app.main!r} is {timeout} s, not above the "
                f"{longest} s a chunk may run: a chunk still running is given to a second worker, "
                "and with many such chunks the queue never drains.",
                f"set broker_transport_options['visibility_timeout'] to redelivery_timeout "
                f"({settings.redelivery_timeout} s).",
            )
        )
    if options.get("queue_order_strategy") != "priority":
        found.append(
            Finding(
                "warning",
                "celery.queue-order",
                "a worker serving both of feedfan's queues alternates between them instead of "
                "taking HIGH first.",
                "set broker_transport_options['queue_order_strategy'] = 'priority'.",
            )
        )
    transport = conf.broker_transport
    if transport and str(transport) != TRANSPORT_PATH:
        found.append(
            Finding(
                "warning",
                "celery.transport",
                f"broker_transport={transport!r} is your own: a Redis list item that is not a "
                "kombu message stops the worker and is lost.",
                f"subclass {TRANSPORT_PATH.replace(':', '.')}.",
            )
        )
    return found


def _amqp_findings(app: Celery) -> list[Finding]:
    if app.conf.broker_heartbeat:
        return []
    return [
        Finding(
            "warning",
            "celery.heartbeat-off",
            f"app {app.main!r} has AMQP heartbeats off: the chunks of a worker whose host "
            "vanishes wait until TCP notices, which may take hours.",
            "set broker_heartbeat (feedfan's own app uses half of redelivery_timeout).",
        )
    ]
