"""The job-queue plug: the :class:`TaskDispatcher` contract and the registry.

A dispatcher hands encoded tasks to a job queue, one named queue per priority,
and says how to start a worker of that queue library. Core fanout code only
ever talks to this class; the Celery, RQ and Dramatiq adapters in
``feedfan.backends`` implement it, and so can a third party, registered under
the entry-point group ``feedfan.dispatchers``.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import shlex
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from importlib import metadata
from typing import TYPE_CHECKING, ClassVar

from feedfan.config import BUILTIN_DISPATCHERS, Settings
from feedfan.errors import (
    ConfigurationError,
    DispatchError,
    FeedfanError,
    LimitExceededError,
    MissingDependencyError,
    UnknownDispatcherError,
)
from feedfan.priority import FanoutPriority
from feedfan.storage.base import RejectedMessage
from feedfan.task import Task

if TYPE_CHECKING:
    from feedfan.runner import TaskRunner

__all__ = [
    "ENTRY_POINT_GROUP",
    "Delivery",
    "Finding",
    "TaskDispatcher",
    "WorkerCommand",
    "available_dispatchers",
    "create_dispatcher",
    "resolve_dispatcher_class",
]

logger = logging.getLogger("feedfan.dispatch")

ENTRY_POINT_GROUP = "feedfan.dispatchers"

_BUILTIN_PATHS = {
    "celery": "feedfan.backends.celery:CeleryDispatcher",
    "rq": "feedfan.backends.rq:RQDispatcher",
    "dramatiq": "feedfan.backends.dramatiq:DramatiqDispatcher",
    "local": "feedfan.local:LocalDispatcher",
    "eager": "feedfan.local:EagerDispatcher",
}
_BUILTIN_LIBRARIES = {
    "celery": ("celery", "kombu"),
    "rq": ("rq",),
    "dramatiq": ("dramatiq", "pika"),
}


@dataclass(frozen=True)
class Finding:
    """One result of ``feedfan check``: what is wrong (or fine) and how to fix it."""

    level: str
    """``"error"`` (fanout breaks or loses work), ``"warning"`` (it may), or ``"ok"``."""

    code: str
    """A stable identifier, e.g. ``"celery.pickle"``."""

    message: str
    """What was found, with the values involved."""

    fix: str = ""
    """What to change; empty for ``"ok"`` findings."""


class Delivery(str, Enum):
    """How often a chunk handed to a dispatcher is run."""

    AT_LEAST_ONCE = "at-least-once"
    """Acknowledged after the write; a chunk whose worker died is delivered again."""

    INLINE = "inline"
    """Run in the caller's process; its failure is the caller's exception."""

    IN_PROCESS = "in-process"
    """Run by threads of the producer's process; lost if that process dies."""


@dataclass(frozen=True)
class WorkerCommand:
    """The command that starts a real worker, and the environment it needs."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """The command as one line a user can paste (environment not included)."""
        return shlex.join(self.argv)


class TaskDispatcher(ABC):
    """Sends fanout tasks to a job queue: one named queue per priority.

    Subclasses implement :meth:`publish` (one task) and may override
    :meth:`publish_many` with the queue library's bulk path. The capability
    flags below are read by the conformance suite, ``feedfan check`` and
    ``feedfan status``; a dispatcher declares what it cannot do rather than
    pretending to. They are class attributes an instance may override when a
    capability depends on the broker (set them in ``__init__``).

    Tasks are checked once, here, before anything is sent: a task over
    ``max_task_bytes`` raises :class:`~feedfan.errors.LimitExceededError` in
    the producer instead of failing in a worker.
    """

    name: ClassVar[str] = ""
    """The name users put in ``dispatcher = ...``."""

    delivery: Delivery = Delivery.AT_LEAST_ONCE
    """The delivery guarantee; see :class:`Delivery`."""

    runs_in_process: bool = False
    """Chunks run inside the producer's process; no worker command exists."""

    has_queues: bool = True
    """Tasks wait in named queues that can be inspected before a worker runs them."""

    supports_bulk_enqueue: bool = False
    """:meth:`publish_many` sends a batch in fewer round trips than one per task."""

    strict_priority: bool = True
    """A worker serving both queues always takes a waiting HIGH task before a LOW one."""

    redelivers_lost_tasks: bool = True
    """A task whose worker process was killed mid-run is delivered again."""

    rejected_location: str = "feedfan's rejected list in Redis (feedfan status)"
    """Where malformed or finally failed tasks are kept for a person to see."""

    publish_batch_size: ClassVar[int] = 1000
    """Most tasks :meth:`enqueue_many` hands to :meth:`publish_many` at once."""

    publish_first_batch_size: ClassVar[int] = 64
    """Most tasks in the first batch; each next one may be twice as big, up to
    :attr:`publish_batch_size`. Workers start on the first chunks while the rest
    are cut and encoded: for a fanout of 1,000 chunks the first follower is
    served in tens of milliseconds instead of after the whole batch."""

    publish_batch_bytes: ClassVar[int] = 1_048_576
    """Most encoded bytes per batch, so big chunks never pile up a follower list in memory."""

    def __init__(self, settings: Settings, *, runner: TaskRunner | None = None) -> None:
        self.settings = settings
        self.runner = runner

    def __repr__(self) -> str:
        return f"<{type(self).__name__} high={self.queue_name(FanoutPriority.HIGH)!r}>"

    # Sending -------------------------------------------------------------

    @abstractmethod
    def publish(self, task: Task, body: str) -> None:
        """Send one encoded task to the queue of its priority.

        ``body`` is ``task.to_json()``; the task is passed for its id and
        priority. Raise :class:`~feedfan.errors.DispatchError` (or its child
        :class:`~feedfan.errors.BrokerError`) when the queue does not take it.
        """

    def publish_many(self, items: Sequence[tuple[Task, str]]) -> None:
        """Send a batch of encoded tasks; by default one :meth:`publish` each.

        Adapters override this with their library's bulk path (a Redis
        pipeline, one producer, one channel). On failure raise
        :class:`~feedfan.errors.DispatchError` with ``accepted`` set to the
        number of leading items that were sent.
        """
        for sent, (task, body) in enumerate(items):
            try:
                self.publish(task, body)
            except DispatchError as e:
                raise DispatchError(str(e), accepted=sent + e.accepted) from e

    def encode(self, task: Task) -> str:
        """Encode ``task`` and check it against ``max_task_bytes``."""
        body = task.to_json()
        size = len(body.encode("utf-8"))
        if size > self.settings.max_task_bytes:
            raise LimitExceededError(
                f"task {task.task_id} is {size:,} bytes, above max_task_bytes="
                f"{self.settings.max_task_bytes:,} (from "
                f"{self.settings.sources.get('max_task_bytes', 'default')}); lower "
                "fanout_chunk_size or raise max_task_bytes."
            )
        return body

    def enqueue(self, task: Task) -> None:
        """Check, encode and send one task."""
        self.publish(task, self.encode(task))

    def enqueue_many(self, tasks: Iterable[Task]) -> int:
        """Check, encode and send ``tasks`` in batches; return how many were sent.

        ``tasks`` may be a generator; it is consumed one batch at a time, the
        first of :attr:`publish_first_batch_size` tasks, each next one twice as
        big up to :attr:`publish_batch_size` (and :attr:`publish_batch_bytes`). If
        sending fails, :class:`~feedfan.errors.DispatchError` says in
        ``accepted`` how many tasks the queue took before the failure; a task
        over ``max_task_bytes`` raises :class:`~feedfan.errors.LimitExceededError`,
        whose ``accepted`` counts the tasks sent before it (none after it is).
        """
        accepted = 0
        iterator = iter(tasks)
        limit = max(1, min(self.publish_first_batch_size, self.publish_batch_size))
        while True:
            items, over = self._next_batch(iterator, limit)
            limit = min(limit * 2, self.publish_batch_size)
            if not items and over is None:
                return accepted
            try:
                if items:
                    self.publish_many(items)
            except DispatchError as e:
                total = accepted + e.accepted
                raise type(e)(
                    f"{e} ({total} task(s) were accepted before this)", accepted=total
                ) from e
            except FeedfanError:
                raise
            except Exception as e:
                raise DispatchError(
                    f"{self.name} dispatcher failed to send tasks: {e!r} "
                    f"({accepted} task(s) were accepted before this)",
                    accepted=accepted,
                ) from e
            accepted += len(items)
            if isinstance(over, LimitExceededError):
                raise LimitExceededError(
                    f"{over} ({accepted} task(s) were accepted before this; none after it was sent)",
                    accepted=accepted,
                ) from over
            if over is not None:
                raise DispatchError(
                    f"reading the tasks to send failed: {over!r} ({accepted} task(s) were "
                    "accepted before this)",
                    accepted=accepted,
                ) from over

    def _next_batch(
        self, tasks: Iterator[Task], limit: int
    ) -> tuple[list[tuple[Task, str]], Exception | None]:
        # The tasks before one over a limit, or before the source of tasks failed (a follower
        # cursor that lost its database), are returned to be sent; the error ends the sending.
        items: list[tuple[Task, str]] = []
        size = 0
        while True:
            try:
                task = next(tasks)
            except StopIteration:
                break
            except FeedfanError:  # bad input (an invalid follower id): the caller's to fix
                raise
            except Exception as e:
                return items, e
            try:
                body = self.encode(task)
            except LimitExceededError as e:
                return items, e
            items.append((task, body))
            size += len(body)
            if len(items) >= limit or size >= self.publish_batch_bytes:
                break
        return items, None

    # Queues and workers --------------------------------------------------

    def queue_name(self, priority: FanoutPriority) -> str:
        """The name of the queue that holds tasks of ``priority``."""
        if priority is FanoutPriority.HIGH:
            return self.settings.queue_high
        return self.settings.queue_low

    def queue_names(self, priorities: Sequence[FanoutPriority]) -> list[str]:
        """Queue names of ``priorities``, HIGH first whatever the order given."""
        return [self.queue_name(p) for p in FanoutPriority if p in priorities]

    def redelivery_bound(self) -> float | None:
        """Seconds within which a killed worker's task is delivered again, if it is."""
        return None

    def worker_command(
        self, priorities: Sequence[FanoutPriority], *, concurrency: int | None = None
    ) -> WorkerCommand:
        """The command that starts this library's worker for ``priorities``, HIGH first."""
        raise ConfigurationError(
            f"the {self.name!r} dispatcher runs chunks inside your own process; it has no "
            "separate worker. Choose celery, rq or dramatiq to run `feedfan worker`."
        )

    # Inspection ------------------------------------------------------------

    def queue_depth(self, priority: FanoutPriority) -> int | None:
        """How many tasks wait in the queue of ``priority``; ``None`` if unknown."""
        return None

    def in_flight(self) -> int | None:
        """How many tasks workers hold right now (taken, not yet acknowledged); ``None`` if unknown."""
        return None

    def consumer_count(self, priority: FanoutPriority) -> int | None:
        """How many workers consume the queue of ``priority``; ``None`` if the broker cannot say."""
        return None

    def ping(self) -> None:  # noqa: B027 - nothing to reach for in-process dispatchers
        """Raise :class:`~feedfan.errors.BrokerError` if the broker cannot be reached."""

    def check(self) -> list[Finding]:
        """Findings about this queue library's configuration that silently break fanout.

        ``feedfan check`` shows them next to the generic checks; adapters add
        their library's (serializers, acknowledgement, prefetch, timeouts).
        """
        return []

    def failed_messages(self, *, limit: int = 100) -> list[RejectedMessage]:
        """Tasks rejected or given up on, as kept by the queue library, newest first."""
        return []

    def push_raw(self, priority: FanoutPriority, body: bytes, *, envelope: bool = True) -> None:
        """Put ``body`` on the queue of ``priority`` unchecked.

        With ``envelope`` (the default) ``body`` is wrapped in a well-formed
        message of the queue library for feedfan's task, so the worker's
        feedfan code receives ``body`` as the task payload and must judge it.
        Without it, ``body`` is the whole broker message (a Redis list item,
        an AMQP body), so the queue library itself meets the garbage.

        Only meant for tests and drills: it lets them show that a worker
        refuses malformed input, keeps it, and goes on. It bypasses every
        check of :meth:`enqueue`.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot push raw messages.")

    def replay_failed(self, *, limit: int | None = None) -> int:
        """Send kept failed tasks that are valid tasks back to their queues; return how many.

        Malformed messages stay where they are kept.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot replay failed tasks.")

    def purge(self) -> None:  # noqa: B027 - optional; nothing to purge by default
        """Delete every waiting task and the queues feedfan declared (tests, admin)."""

    def close(self) -> None:  # noqa: B027 - optional; nothing to release by default
        """Release connections and threads."""


def _import_path(path: str) -> object:
    module_name, _, attribute = path.partition(":")
    if not attribute:
        module_name, _, attribute = path.rpartition(".")
    module = importlib.import_module(module_name)
    return getattr(module, attribute)


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_dispatchers() -> list[str]:
    """Names usable as ``dispatcher``: built-ins, then registered entry points."""
    return [*BUILTIN_DISPATCHERS, *sorted(set(_entry_points()) - set(BUILTIN_DISPATCHERS))]


def resolve_dispatcher_class(name: str) -> type[TaskDispatcher]:
    """Find the dispatcher class called ``name``.

    Built-ins first, then the entry-point group ``feedfan.dispatchers``, then
    ``name`` as a dotted path (``package.module:Class``).
    """
    if name in _BUILTIN_PATHS:
        try:
            found = _import_path(_BUILTIN_PATHS[name])
        except ImportError as e:
            missing = (e.name or "").split(".")[0]
            if missing in _BUILTIN_LIBRARIES.get(name, ()):
                raise MissingDependencyError(
                    f"dispatcher {name!r} needs the {missing!r} package, which is not "
                    f"installed: pip install 'feedfan[{name}]'"
                ) from e
            raise
    else:
        entry = _entry_points().get(name)
        if entry is not None:
            try:
                found = entry.load()
            except ImportError as e:
                raise UnknownDispatcherError(
                    f"could not load dispatcher {name!r} from entry point {entry.value!r}: {e}"
                ) from e
        elif "." in name or ":" in name:
            try:
                found = _import_path(name)
            except (ImportError, AttributeError, ValueError) as e:
                raise UnknownDispatcherError(f"could not import dispatcher {name!r}: {e}") from e
        else:
            known = available_dispatchers()
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownDispatcherError(
                f"unknown dispatcher {name!r}; known: {', '.join(known)}, "
                f"or a dotted path such as 'mypackage.queues:MyDispatcher'.{hint}"
            )
    if not (isinstance(found, type) and issubclass(found, TaskDispatcher)):
        raise UnknownDispatcherError(
            f"dispatcher {name!r} resolved to {found!r}, which is not a TaskDispatcher subclass."
        )
    return found


def create_dispatcher(settings: Settings, *, runner: TaskRunner | None = None) -> TaskDispatcher:
    """Build the dispatcher named by ``settings.dispatcher``."""
    cls = resolve_dispatcher_class(settings.dispatcher)
    return cls(settings, runner=runner)
