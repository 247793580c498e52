"""RQ adapter: :class:`RQDispatcher` and :class:`RQManager`, feedfan on RQ queues in Redis.

Select it with ``dispatcher = "rq"`` (``FEEDFAN_DISPATCHER=rq``), or subclass
:class:`RQManager` the way Stream Framework's docs suggest for another queue.
Each priority has its RQ queue (``queue_high``, ``queue_low``); every chunk
of a fanout, HIGH and LOW, is sent in one Redis transaction per batch of
1,000; jobs are JSON (never pickle) and call one function, :func:`run_task`.
``feedfan worker`` starts ``rq worker`` (or ``rq worker-pool`` for more than
one process) with feedfan's worker class, which delivers a killed worker's
chunks again. See docs/rq.md.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import redis
from rq.job import Job, Retry, get_current_job
from rq.queue import Queue
from rq.version import VERSION as RQ_VERSION

from feedfan.config import Settings
from feedfan.dispatch import Finding, TaskDispatcher, WorkerCommand, resolve_dispatcher_class
from feedfan.errors import (
    BrokerError,
    ConfigurationError,
    MissingDependencyError,
    PayloadError,
    redact_url,
)
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.runner import get_runner
from feedfan.storage.base import RejectedMessage
from feedfan.task import ChunkTask, Task, decode_task

from ._rq_jobs import (
    JOB_CLASS_PATH,
    RUN_TASK,
    SERIALIZER_PATH,
    FeedfanJob,
    JSONJobSerializer,
    check_feedfan_call,
    newest_failed,
    purge_queue,
    read_failed,
    write_raw_job,
)
from ._rq_ops import rq_consumers, rq_findings, rq_in_flight
from ._rq_worker import FeedfanForkWorker, FeedfanWorker, redelivery_bound

if TYPE_CHECKING:
    from feedfan.runner import TaskRunner

__all__ = [
    "FINISHED_JOB_TTL",
    "FeedfanForkWorker",
    "FeedfanJob",
    "FeedfanWorker",
    "JSONJobSerializer",
    "RQDispatcher",
    "RQManager",
    "run_task",
]

_REDIS_SCHEMES = ("redis", "rediss", "unix")

FINISHED_JOB_TTL = 10
"""Seconds RQ keeps a finished chunk's job (its ``result_ttl``); see docs/rq.md."""

if int(RQ_VERSION.split(".")[0]) < 3:  # worker hooks and registries changed in RQ 3.0
    raise MissingDependencyError(
        f"dispatcher 'rq' needs rq 3.0 or newer, and rq {RQ_VERSION} is installed: "
        "pip install --upgrade 'rq>=3.0'"
    )


def run_task(body: str) -> int:
    """The function every feedfan RQ job calls: run one encoded task in this worker.

    A malformed body raises :class:`~feedfan.errors.PayloadError` and is not
    retried: the job goes to its queue's failed registry. Any other error is
    retried up to ``max_retries`` times by RQ.
    """
    try:
        return get_runner().handle(body)
    except PayloadError:
        job = get_current_job()
        if job is not None:
            job.retries_left = 0  # the same bytes will not decode any better next time
        raise


class RQDispatcher(TaskDispatcher):
    """Sends feedfan tasks to RQ queues in Redis and starts ``rq worker`` for them.

    ``connection`` is a ready ``redis.Redis`` client for the broker; without
    one, a client for ``settings.effective_broker_url`` is made on first use
    (building the dispatcher never connects).
    """

    name = "rq"
    supports_bulk_enqueue = True
    strict_priority = True
    redelivers_lost_tasks = True
    rejected_location = "RQ's failed job registry of each queue (rq info; FailedJobRegistry)"

    worker_class: ClassVar[str] = "feedfan.backends.rq.FeedfanWorker"
    """The worker class ``feedfan worker`` runs; ``...FeedfanForkWorker`` forks per chunk."""

    def __init__(
        self,
        settings: Settings,
        *,
        runner: TaskRunner | None = None,
        connection: redis.Redis | None = None,
    ) -> None:
        super().__init__(settings, runner=runner)
        self.url = settings.effective_broker_url
        scheme = self.url.split("://", 1)[0].lower()
        if scheme not in _REDIS_SCHEMES:
            setting = "broker_url" if settings.broker_url else "redis_url"
            raise ConfigurationError(
                f"{setting}={redact_url(self.url)!r} (from "
                f"{settings.sources.get(setting, 'default')}) is not a Redis URL, and RQ runs on "
                "Redis only. Set broker_url (FEEDFAN_BROKER_URL) to redis://, rediss:// or "
                "unix://, or unset it to use redis_url; for RabbitMQ choose celery or dramatiq."
            )
        self._connection = connection
        self._owns_connection = connection is None
        self._queues: dict[FanoutPriority, Queue] = {}

    # Connection and queues ------------------------------------------------

    @property
    def connection(self) -> redis.Redis:
        """The broker's Redis client, made on first use."""
        if self._connection is None:
            try:
                self._connection = redis.Redis.from_url(
                    self.url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30
                )
            except ValueError as e:
                raise ConfigurationError(
                    f"broker URL {redact_url(self.url)!r} is not a Redis URL ({e}); expected "
                    "redis://[:password@]host:port/db, rediss://… or unix://…"
                ) from e
        return self._connection

    def rq_queue(self, priority: FanoutPriority) -> Queue:
        """The RQ queue of ``priority``, reading and writing JSON jobs."""
        queue = self._queues.get(priority)
        if queue is None:
            queue = Queue(
                self.queue_name(priority),
                connection=self.connection,
                serializer=JSONJobSerializer,
                job_class=FeedfanJob,
                default_timeout=self.settings.chunk_time_limit,
            )
            self._queues[priority] = queue
        return queue

    def _all_queues(self) -> list[Queue]:
        return [self.rq_queue(p) for p in FanoutPriority]

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as e:
            what = (
                "cannot reach"
                if isinstance(e, (redis.ConnectionError, redis.TimeoutError))
                else "was refused by"
            )
            cause = str(e).rstrip(".")
            raise BrokerError(
                f"rq dispatcher {what} Redis at {redact_url(self.url)} while {doing}: {cause}. "
                "Check that the server runs and that broker_url (FEEDFAN_BROKER_URL), or "
                "redis_url when broker_url is unset, points at it."
            ) from e

    # Sending ---------------------------------------------------------------

    def _job_options(self, task: Task) -> dict[str, Any]:
        retries = self.settings.max_retries
        kind = task.chunk_key if isinstance(task, ChunkTask) else "plan"
        return {
            "job_id": task.task_id,
            "description": f"feedfan {kind} of fanout {task.fanout_id}",
            "timeout": self.settings.chunk_time_limit,
            "result_ttl": FINISHED_JOB_TTL,
            # A failed chunk is kept as long as the fanout progress that counts it.
            "failure_ttl": self.settings.status_ttl,
            "retry": Retry(max=retries) if retries else None,
        }

    def publish(self, task: Task, body: str) -> None:
        """Send one task; see :meth:`publish_many`."""
        self.publish_many([(task, body)])

    def publish_many(self, items: Sequence[tuple[Task, str]]) -> None:
        """Send a batch, HIGH and LOW, in one Redis transaction (one round trip).

        The transaction is all or nothing, so on failure ``accepted`` is 0 for
        this batch; earlier batches are counted by :meth:`enqueue_many`.
        """
        by_queue: dict[FanoutPriority, list[Any]] = {}
        for task, body in items:
            data = Queue.prepare_data(RUN_TASK, args=[body], **self._job_options(task))
            by_queue.setdefault(task.priority, []).append(data)
        sending = self._errors(f"sending {len(items)} task(s)")
        with sending, self.connection.pipeline(transaction=True) as pipe:
            for priority, datas in by_queue.items():
                self.rq_queue(priority).enqueue_many(datas, pipeline=pipe)
            # A task sent again keeps its job id: drop the expiry its finished
            # (or failed) job had, or the waiting job could vanish from its queue.
            for task, _ in items:
                pipe.persist(Job.key_for(task.task_id))
            pipe.execute()

    # Workers -----------------------------------------------------------------

    def redelivery_bound(self) -> float:
        """Seconds within which a killed worker's chunk runs again; see docs/rq.md."""
        return redelivery_bound(self.settings)

    def worker_command(
        self, priorities: Sequence[FanoutPriority], *, concurrency: int | None = None
    ) -> WorkerCommand:
        """``rq worker`` (one process) or ``rq worker-pool -n N``, HIGH queue before LOW.

        RQ serves a worker's queues strictly in the order given. A URL with a
        password is not put on the command line: ``--config`` points ``rq`` at a
        module that reads it from feedfan's settings, as the worker itself does.
        """
        processes = concurrency or self.settings.worker_concurrency
        if processes < 1:
            raise ConfigurationError(f"worker concurrency must be at least 1, got {processes}.")
        beside = os.path.join(os.path.dirname(sys.executable), "rq")
        program = beside if os.access(beside, os.X_OK) else shutil.which("rq") or "rq"
        argv = [program, "worker" if processes == 1 else "worker-pool"]
        if redact_url(self.url) != self.url:
            argv += ["--config", "feedfan.backends._rq_config"]  # reads feedfan's settings
        else:
            argv += ["--url", self.url]
        argv += [
            "--serializer",
            SERIALIZER_PATH,
            "--worker-class",
            self.worker_class,
            "--job-class",
            JOB_CLASS_PATH,
            "--quiet",
        ]
        if processes > 1:
            argv += ["--num-workers", str(processes)]
        return WorkerCommand(argv=[*argv, *self.queue_names(priorities)])

    # Inspection --------------------------------------------------------------

    def queue_depth(self, priority: FanoutPriority) -> int:
        """Jobs waiting in the RQ queue of ``priority``."""
        with self._errors("reading a queue length"):
            return int(self.connection.llen(self.rq_queue(priority).key))

    def in_flight(self) -> int:
        """Chunks workers hold: started-registry entries and intermediate lists, read raw."""
        with self._errors("counting the jobs workers hold"):
            return rq_in_flight(self.connection, self._all_queues())

    def consumer_count(self, priority: FanoutPriority) -> int:
        """Workers registered for the priority's queue (a killed one until its key expires)."""
        with self._errors("counting the workers of a queue"):
            return rq_consumers(self.connection, self.queue_name(priority))

    def ping(self) -> None:
        """Raise :class:`~feedfan.errors.BrokerError` if Redis cannot be reached."""
        with self._errors("pinging"):
            self.connection.ping()

    def check(self) -> list[Finding]:
        """The worker class and serializer of live workers of feedfan's queues, where visible."""
        with self._errors("looking at the workers"):
            return rq_findings(self.connection, self.queue_names(list(FanoutPriority)))

    def failed_messages(self, *, limit: int = 100) -> list[RejectedMessage]:
        """Jobs in the failed registries of both queues, newest first, with the reason."""
        with self._errors("reading the failed job registries"):
            failed = newest_failed(self.connection, self._all_queues(), limit)
            return read_failed(self.connection, failed)

    def replay_failed(self, *, limit: int | None = None) -> int:
        """Requeue failed jobs that carry a valid feedfan task; malformed ones stay."""
        replayed = 0
        with self._errors("replaying failed jobs"):
            for item in newest_failed(self.connection, self._all_queues(), None):
                if limit is not None and replayed >= limit:
                    break
                job = self._replayable(item.job_id)
                if job is None:
                    continue
                job.retries_left = self.settings.max_retries or None
                job.meta.pop("feedfan_redeliveries", None)
                try:
                    item.queue.failed_job_registry.requeue(job, at_front=False)
                except Exception:  # requeued or expired by someone else meanwhile
                    continue
                replayed += 1
        return replayed

    def _replayable(self, job_id: str) -> Job | None:
        try:
            job = FeedfanJob.fetch(job_id, connection=self.connection, serializer=JSONJobSerializer)
            body = check_feedfan_call(job)
            if self.runner is not None:
                self.runner.decode(body)
            else:
                decode_task(body, max_bytes=self.settings.max_task_bytes)
        except redis.RedisError:
            raise
        except Exception:  # not a feedfan task: it stays for a person to look at
            return None
        return job

    # Tests and drills -----------------------------------------------------------

    def push_raw(self, priority: FanoutPriority, body: bytes, *, envelope: bool = True) -> None:
        """Put ``body`` on the queue unchecked (tests only).

        With ``envelope``: a well-formed JSON job calling :func:`run_task` with
        ``body`` as its argument (undecodable bytes kept as escapes). Without:
        a raw job hash whose data is ``body`` itself, as another program
        writing to the queue would leave it.
        """
        queue = self.rq_queue(priority)
        job_id = f"raw-{time.time_ns()}-{os.getpid()}"
        with self._errors("pushing a raw job"), self.connection.pipeline() as pipe:
            if envelope:
                text = bytes(body).decode("utf-8", "surrogateescape")
                data = Queue.prepare_data(
                    RUN_TASK,
                    args=[text],
                    job_id=job_id,
                    timeout=self.settings.chunk_time_limit,
                    result_ttl=0,
                )
                queue.enqueue_many([data], pipeline=pipe)
            else:
                write_raw_job(pipe, queue, job_id, bytes(body), self.settings.chunk_time_limit)
            pipe.execute()

    def purge(self) -> None:
        """Delete both queues, their registries and their jobs (tests, admin)."""
        with self._errors("purging the queues"):
            for queue in self._all_queues():
                purge_queue(self.connection, queue)

    def close(self) -> None:
        """Close the Redis client if this dispatcher made it."""
        if self._owns_connection and self._connection is not None:
            self._connection.close()
            self._connection = None
        self._queues.clear()


class RQManager(Manager):
    """A :class:`~feedfan.manager.Manager` bound to RQ in code, Stream Framework style.

    ``connection`` optionally hands it an existing ``redis.Redis`` client for
    the broker (the feed storage keeps its own, from ``redis_url``)::

        class MyStreamManager(RQManager):
            feed_classes = {"timeline": TimelineFeed}
    """

    bound_dispatcher = "rq"

    def __init__(self, *, connection: redis.Redis | None = None, **kwargs: Any) -> None:
        self._rq_connection = connection
        super().__init__(**kwargs)

    def make_dispatcher(self, settings: Settings) -> TaskDispatcher:
        """An :class:`RQDispatcher` (or subclass) on the given connection, if any."""
        cls = resolve_dispatcher_class(settings.dispatcher)
        if issubclass(cls, RQDispatcher):
            return cls(settings, runner=self.runner, connection=self._rq_connection)
        if self._rq_connection is not None:
            raise ConfigurationError(
                f"{type(self).__qualname__} got a Redis connection for RQ, but dispatcher="
                f"{settings.dispatcher!r} (from {settings.sources.get('dispatcher', 'default')}) "
                "is not RQ; drop the connection or the dispatcher override."
            )
        return super().make_dispatcher(settings)
