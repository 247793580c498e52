"""The Celery app feedfan runs on: its configuration, its one task, and checks of yours.

feedfan either builds an app from its settings (:func:`build_app`) or puts its
task on yours (:func:`register_tasks`). Either way one task, ``feedfan.run``,
takes the JSON body of a fanout task and hands it to the worker's
:class:`~feedfan.runner.TaskRunner`. Nothing but JSON is ever accepted.
"""

from __future__ import annotations

import json
import logging
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.worker import state as worker_state
from celery.worker.request import Request
from kombu import entity as kombu_entity

from feedfan.config import Settings, load_settings
from feedfan.errors import ConfigurationError, PayloadError, redact_url
from feedfan.runner import TaskRunner, get_runner

__all__ = [
    "CONSUMER_PATH",
    "TASK_NAME",
    "FeedfanRequest",
    "TRANSPORT_PATH",
    "AppProblem",
    "app_broker_url",
    "app_problems",
    "broker_kind",
    "build_app",
    "default_app",
    "check_app",
    "hard_time_limit",
    "prepare_app",
    "register_tasks",
]

logger = logging.getLogger("feedfan.celery")

TASK_NAME = "feedfan.run"
"""The name of feedfan's one Celery task; it takes one argument, the task's JSON."""

CONSUMER_PATH = "feedfan.backends._celery_guard:FeedfanConsumer"
TRANSPORT_PATH = "feedfan.backends._celery_guard:GuardedRedisTransport"
_CELERY_CONSUMER = "celery.worker.consumer:Consumer"
_PICKLE_TYPES = frozenset({"pickle", "application/x-python-serialize"})
_REDIS_SCHEMES = frozenset({"redis", "rediss"})
_AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})

# Inline runs (task_always_eager) use the producer's own manager, not the
# process-wide worker runner: (runner, queue name).
_INLINE: ContextVar[tuple[TaskRunner, str] | None] = ContextVar("feedfan_inline", default=None)

_registered_app: Celery | None = None
_warned: weakref.WeakSet[Celery] = weakref.WeakSet()

# kombu's declarations, untyped as far as mypy is concerned.
_Exchange: Any = kombu_entity.Exchange
_Queue: Any = kombu_entity.Queue


def broker_kind(url: str) -> str:
    """``"redis"`` or ``"amqp"`` for a broker URL; a :class:`ConfigurationError` otherwise."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in _REDIS_SCHEMES:
        return "redis"
    if scheme in _AMQP_SCHEMES:
        return "amqp"
    raise ConfigurationError(
        f"broker_url={redact_url(url)!r} has scheme {scheme!r}, which the celery dispatcher "
        "does not use; give a redis://, rediss://, amqp:// or amqps:// URL."
    )


def app_broker_url(app: Celery) -> str:
    """The URL ``app`` publishes to (Celery's default when it names none)."""
    conf = app.conf
    return str(conf.broker_write_url or conf.broker_url or "amqp://guest@localhost//")


def hard_time_limit(settings: Settings) -> int:
    """Seconds after which Celery kills a chunk that ignored its soft limit.

    A little above ``chunk_time_limit`` (the soft limit, which feedfan turns
    into a retry) and below ``redelivery_timeout``, so a stuck chunk is never
    redelivered to a second worker while the first still runs it.
    """
    soft = settings.chunk_time_limit
    grace = max(1, soft // 10)
    return max(soft + 1, min(soft + grace, settings.redelivery_timeout - 1))


def restore_interval(settings: Settings) -> int:
    """Seconds between the Redis transport's sweeps for messages of dead workers."""
    return max(1, min(10, settings.redelivery_timeout // 4))


def amqp_heartbeat(settings: Settings) -> int:
    """The AMQP heartbeat of feedfan's workers: half ``redelivery_timeout``, 10 to 60 s."""
    return max(10, min(60, settings.redelivery_timeout // 2))


def app_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration of the app feedfan builds from ``settings``."""
    url = settings.effective_broker_url
    kind = broker_kind(url)
    config: dict[str, Any] = {
        "broker_url": url,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_soft_time_limit": settings.chunk_time_limit,
        "task_time_limit": hard_time_limit(settings),
        # The same shape Celery gives a queue named on `celery worker -Q`, so a
        # worker of your own app declares them identically.
        "task_queues": [
            _Queue(name, _Exchange(name, type="direct"), routing_key=name)
            for name in (settings.queue_high, settings.queue_low)
        ],
        "task_default_queue": settings.queue_low,
        "worker_consumer": CONSUMER_PATH,
        "worker_send_task_events": False,
    }
    if kind == "redis":
        config["broker_transport"] = TRANSPORT_PATH
        config["broker_transport_options"] = {
            # A chunk held by a dead worker comes back after this many seconds.
            "visibility_timeout": settings.redelivery_timeout,
            # BRPOP the queues in the order the worker lists them: HIGH first.
            "queue_order_strategy": "priority",
            "unacked_restore_interval": restore_interval(settings),
            "unacked_restore_throttle": 1,
        }
    else:
        config["broker_heartbeat"] = amqp_heartbeat(settings)
    return config


def build_app(settings: Settings) -> Celery:
    """A Celery app for ``settings``, with feedfan's task and queues; connects to nothing."""
    app = Celery("feedfan", set_as_current=False)
    app.conf.update(app_config(settings))
    _register(app, settings)
    return app


def default_app() -> Celery | None:
    """The app given to :func:`register_tasks` in this process, if any."""
    return _registered_app


# The task ----------------------------------------------------------------


def _queue_of(delivery_info: dict[str, Any] | None) -> str:
    info = delivery_info or {}
    return str(info.get("routing_key") or info.get("queue") or "?")


def _backoff(retries: int, settings: Settings) -> int:
    # Kept well under the visibility timeout: a retried chunk waits in a
    # worker, unacknowledged, until its countdown ends.
    return int(min(2**retries, max(1, settings.redelivery_timeout // 4), 60))


def _run(task: Task, *args: Any, **kwargs: Any) -> int:
    """Run one fanout task: decode, check, write; reject and keep what does not fit."""
    inline = _INLINE.get()
    if inline is not None:
        runner, queue = inline
    else:
        runner, queue = get_runner(), _queue_of(task.request.delivery_info)
    if len(args) != 1 or kwargs or not isinstance(args[0], str):
        runner.reject(
            json.dumps([list(args), kwargs], default=repr),
            queue=queue,
            reason=f"{TASK_NAME} takes one argument, the task's JSON text; got "
            f"{len(args)} positional and {len(kwargs)} keyword argument(s).",
        )
        return 0
    body = args[0]
    try:
        return int(runner.handle(body))
    except PayloadError as e:
        runner.reject(body, queue=queue, reason=str(e))
        return 0
    except Exception as e:  # every other failure is retried, then kept
        settings = runner.settings
        retries = int(task.request.retries or 0)
        if retries >= settings.max_retries:
            logger.error(
                "feedfan task %s failed %d time(s); giving up: %r", task.request.id, retries + 1, e
            )
            runner.give_up(body, queue=queue, reason=repr(e))
            return 0
        logger.warning(
            "feedfan task %s failed (attempt %d of %d), retrying: %r",
            task.request.id,
            retries + 1,
            settings.max_retries + 1,
            e,
        )
        try:
            task.retry(
                exc=e, countdown=_backoff(retries, settings), max_retries=settings.max_retries
            )
        except Reject as failed:  # Celery could not send the retry
            runner.give_up(body, queue=queue, reason=f"{e!r}; retry not sent: {failed.reason!r}")
            return 0
        raise AssertionError("Task.retry returned instead of raising") from None


class FeedfanRequest(Request):  # type: ignore[misc]
    """Celery's request of a feedfan task; a chunk killed at the hard time limit is kept.

    Celery kills a task that outlives ``time_limit`` (feedfan's chunk ignored
    the soft limit, as code stuck in C does), logs it, and acknowledges the
    message: the chunk would be gone, written to no feed, and its fanout
    would never settle. feedfan keeps its body, with the reason, and counts
    it failed, as for a chunk that failed every retry. It is not sent again
    by itself: one that hung once would likely hang again (replay it with
    ``feedfan replay`` once fixed).
    """

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if soft or worker_state.should_terminate:
            return  # a soft limit is the task's to handle; a cold shutdown is not a failure
        args = self.args
        if len(args) != 1 or not isinstance(args[0], str):
            return  # not a task feedfan sent: _run keeps such messages when it runs them
        reason = (
            f"killed at the hard time limit ({timeout:g} s): the chunk did not stop at its "
            "soft limit (chunk_time_limit). Look for a call that blocks without a timeout, "
            "then replay it."
        )
        try:
            get_runner().give_up(args[0], queue=_queue_of(self.delivery_info), reason=reason)
        except Exception:  # the worker must go on; the error log above names the task
            logger.exception("feedfan could not keep task %s killed at its time limit", self.id)


def _register(app: Celery, settings: Settings) -> Task:
    options: dict[str, Any] = {
        "name": TASK_NAME,
        "bind": True,
        # Without shared=False Celery would add the task to every app made later.
        "shared": False,
        "acks_late": True,
        "reject_on_worker_lost": True,
        "ignore_result": True,
        "serializer": "json",
        "typing": False,
        "soft_time_limit": settings.chunk_time_limit,
        "time_limit": hard_time_limit(settings),
        "max_retries": settings.max_retries,
        "Request": FeedfanRequest,
        # Read by the worker's consumer, which runs this queue's waiting chunks first.
        "high_queue": settings.queue_high,
    }
    task: Task = app.task(**options)(_run)
    return task


# Your own app ------------------------------------------------------------


@dataclass(frozen=True)
class AppProblem:
    """One thing wrong with a Celery app for feedfan; ``fatal`` ones are refused."""

    text: str
    fatal: bool = False

    def __str__(self) -> str:
        return self.text


def app_problems(app: Celery, settings: Settings) -> list[AppProblem]:
    """What in ``app``'s configuration breaks (fatal) or weakens feedfan's guarantees."""
    conf = app.conf
    problems: list[AppProblem] = []
    accepted = {str(item).lower() for item in conf.accept_content or ()}
    if accepted & _PICKLE_TYPES:
        problems.append(
            AppProblem(
                f"accept_content={sorted(accepted)} accepts pickle, so a message on feedfan's "
                "queues could run code while it is decoded; set accept_content=['json'].",
                fatal=True,
            )
        )
    if broker_kind(app_broker_url(app)) == "redis":
        options = conf.broker_transport_options or {}
        timeout = options.get("visibility_timeout", 3600)
        if timeout <= settings.chunk_time_limit:
            problems.append(
                AppProblem(
                    f"broker_transport_options['visibility_timeout']={timeout} is not above "
                    f"chunk_time_limit={settings.chunk_time_limit}: a chunk still running would "
                    "be given to a second worker. Set it to feedfan's redelivery_timeout "
                    f"({settings.redelivery_timeout}).",
                    fatal=True,
                )
            )
        transport = conf.broker_transport
        if transport and str(transport) != TRANSPORT_PATH:
            problems.append(
                AppProblem(
                    f"broker_transport={transport!r} is your own, so a Redis list item that is not "
                    "a kombu message stops your worker and is lost; subclass "
                    f"{TRANSPORT_PATH.replace(':', '.')} to keep it."
                )
            )
        if options.get("queue_order_strategy") != "priority":
            problems.append(
                AppProblem(
                    "broker_transport_options['queue_order_strategy'] is not 'priority', so a "
                    "worker serving both of feedfan's queues alternates between them instead of "
                    "taking HIGH first; set it to 'priority' (it follows the -Q order)."
                )
            )
    for name in (settings.queue_high, settings.queue_low):
        if not conf.task_create_missing_queues and not any(
            getattr(q, "name", None) == name for q in conf.task_queues or ()
        ):
            problems.append(
                AppProblem(
                    f"task_create_missing_queues is off and task_queues has no queue {name!r}; "
                    f"add kombu.Queue({name!r}) to task_queues.",
                    fatal=True,
                )
            )
    if conf.worker_prefetch_multiplier != 1:
        problems.append(
            AppProblem(
                f"worker_prefetch_multiplier={conf.worker_prefetch_multiplier}: a worker may hold "
                "LOW chunks while HIGH ones wait; start feedfan's workers with "
                "--prefetch-multiplier 1."
            )
        )
    if str(conf.worker_consumer) not in (_CELERY_CONSUMER, CONSUMER_PATH):
        problems.append(
            AppProblem(
                f"worker_consumer={conf.worker_consumer!r} is your own, so feedfan cannot keep "
                "undecodable messages found on its queues; Celery will drop them. Subclass "
                f"{CONSUMER_PATH.replace(':', '.')} to keep them."
            )
        )
    return problems


def check_app(app: Celery, settings: Settings) -> None:
    """Log the weak points of ``app`` (once per app) and raise on fatal ones."""
    problems = app_problems(app, settings)
    if app not in _warned:
        _warned.add(app)
        for problem in problems:
            if not problem.fatal:
                logger.warning("feedfan and Celery app %r: %s", app.main, problem)
    fatal = [problem for problem in problems if problem.fatal]
    if fatal:
        raise ConfigurationError(
            f"Celery app {app.main!r} cannot run feedfan's tasks: "
            + " ".join(problem.text for problem in fatal)
        )


def prepare_app(app: Celery, settings: Settings) -> Task:
    """Install feedfan's task on ``app``, and its guard unless you chose your own consumer.

    The guard (``worker_consumer``, and on Redis ``broker_transport``) keeps
    malformed messages found on feedfan's queues instead of dropping them.
    """
    if str(app.conf.worker_consumer) == _CELERY_CONSUMER:
        app.conf.worker_consumer = CONSUMER_PATH
    if broker_kind(app_broker_url(app)) == "redis" and not app.conf.broker_transport:
        app.conf.broker_transport = TRANSPORT_PATH
    return _register(app, settings)


def register_tasks(app: Celery, *, settings: Settings | None = None) -> Task:
    """Put feedfan's task on your Celery app and make it the app feedfan publishes through.

    Call it once the app is configured (after ``config_from_object``), in the
    module ``celery -A`` imports, so producers and workers both have it.
    It checks the app (:func:`app_problems`), raising
    :class:`~feedfan.errors.ConfigurationError` on what would break feedfan
    and logging what weakens it, then installs the task and guard
    (:func:`prepare_app`). Dispatchers built from configuration in this
    process then publish through ``app``. Returns the task.
    """
    global _registered_app
    settings = settings or load_settings()
    check_app(app, settings)
    task = prepare_app(app, settings)
    _registered_app = app
    return task


def inline_runner(runner: TaskRunner, queue: str) -> Any:
    """Mark the current context as running tasks inline for ``runner`` (eager mode)."""
    return _INLINE.set((runner, queue))


def end_inline(token: Any) -> None:
    """Undo :func:`inline_runner`."""
    _INLINE.reset(token)
