"""The two built-in dispatchers that need no server: ``eager`` and ``local``.

``eager`` runs each task inline, in the caller, after a round trip through the
real JSON codec: feedfan's ``CELERY_ALWAYS_EAGER``, for development and tests.

``local`` is the embedded default: a pool of threads in this process, fed from
two queues, that always takes a waiting HIGH task before a LOW one. Tasks live
in memory, so they are lost if the process dies; use Celery, RQ or Dramatiq
when that matters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from feedfan.config import Settings
from feedfan.dispatch import Delivery, TaskDispatcher
from feedfan.errors import ConfigurationError, FeedfanError, PayloadError
from feedfan.priority import FanoutPriority
from feedfan.storage.base import RejectedMessage
from feedfan.task import Task

if TYPE_CHECKING:
    from feedfan.runner import TaskRunner

__all__ = ["EagerDispatcher", "LocalDispatcher"]

logger = logging.getLogger("feedfan.local")


class _InProcess(TaskDispatcher):
    runs_in_process = True
    redelivers_lost_tasks = False
    rejected_location = "feedfan's rejected list in the feed storage (feedfan status)"

    def _require_runner(self) -> TaskRunner:
        if self.runner is None:
            raise ConfigurationError(
                f"the {self.name!r} dispatcher runs tasks in this process and needs a manager; "
                "build it through Manager(...) rather than on its own."
            )
        return self.runner

    def failed_messages(self, *, limit: int = 100) -> list[RejectedMessage]:
        """Messages refused or given up on, from the manager's storage."""
        if self.runner is None:
            return []
        return self.runner.manager.storage.rejected(limit=limit)

    def replay_failed(self, *, limit: int | None = None) -> int:
        """Run kept tasks that are valid again; malformed ones stay kept."""
        return self._require_runner().replay_rejected(self, limit=limit)


class EagerDispatcher(_InProcess):
    """Runs every task inline, through the JSON codec, raising its errors to the caller."""

    name = "eager"
    delivery = Delivery.INLINE
    has_queues = False

    def publish(self, task: Task, body: str) -> None:
        """Run ``body`` now, in this thread."""
        self._require_runner().handle(body)

    def push_raw(self, priority: FanoutPriority, body: bytes, *, envelope: bool = True) -> None:
        """Hand ``body`` to the runner as a worker would: refused input is kept, not raised."""
        runner = self._require_runner()
        try:
            runner.handle(body)
        except PayloadError as e:
            runner.reject(body, queue=self.queue_name(priority), reason=str(e))


class LocalDispatcher(_InProcess):
    """An in-process pool of ``local_workers`` threads serving HIGH before LOW."""

    name = "local"
    delivery = Delivery.IN_PROCESS
    supports_bulk_enqueue = True

    def __init__(self, settings: Settings, **kwargs: object) -> None:
        super().__init__(settings, **kwargs)  # type: ignore[arg-type]
        self._queues: dict[FanoutPriority, deque[bytes | str]] = {
            p: deque() for p in FanoutPriority
        }
        self._cond = threading.Condition()
        self._in_flight = 0
        self._paused = False
        self._closed = False
        self._threads: list[threading.Thread] = []

    def _ensure_started(self) -> None:
        if self._threads or self._closed:
            return
        for number in range(self.settings.local_workers):
            thread = threading.Thread(
                target=self._work, name=f"feedfan-local-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _put(self, priority: FanoutPriority, body: bytes | str) -> None:
        with self._cond:
            if self._closed:
                raise FeedfanError("the local dispatcher is closed; create a new manager.")
            self._queues[priority].append(body)
            self._ensure_started()
            self._cond.notify()

    def publish(self, task: Task, body: str) -> None:
        """Queue ``body`` for the worker threads."""
        self._require_runner()
        self._put(task.priority, body)

    def publish_many(self, items: Sequence[tuple[Task, str]]) -> None:
        """Queue a batch under one lock."""
        self._require_runner()
        with self._cond:
            if self._closed:
                raise FeedfanError("the local dispatcher is closed; create a new manager.")
            for task, body in items:
                self._queues[task.priority].append(body)
            self._ensure_started()
            self._cond.notify_all()

    def push_raw(self, priority: FanoutPriority, body: bytes, *, envelope: bool = True) -> None:
        """Queue ``body`` unchecked (tests only); there is no envelope in memory."""
        self._require_runner()
        self._put(priority, body)

    def _next(self) -> tuple[FanoutPriority, bytes | str] | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                if not self._paused:
                    for priority in FanoutPriority:
                        if self._queues[priority]:
                            self._in_flight += 1
                            return priority, self._queues[priority].popleft()
                self._cond.wait()

    def _work(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            priority, body = item
            try:
                self._run(priority, body)
            finally:
                with self._cond:
                    self._in_flight -= 1
                    self._cond.notify_all()

    def _run(self, priority: FanoutPriority, body: bytes | str) -> None:
        runner = self._require_runner()
        queue = self.queue_name(priority)
        attempts = self.settings.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                runner.handle(body)
                return
            except PayloadError as e:
                runner.reject(body, queue=queue, reason=str(e))
                return
            except Exception as e:  # a worker thread must survive any task
                if attempt == attempts:
                    logger.exception(
                        "feedfan local worker gave up on a task after %d attempts", attempts
                    )
                    runner.give_up(body, queue=queue, reason=repr(e))
                    return
                logger.warning(
                    "feedfan local task failed (attempt %d of %d): %r", attempt, attempts, e
                )
                time.sleep(min(0.05 * 2**attempt, 2.0))

    # Control, for the demo and tests ------------------------------------

    def pause(self) -> None:
        """Stop taking tasks from the queues (running ones finish)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        """Take tasks again after :meth:`pause`."""
        with self._cond:
            self._paused = False
            self._ensure_started()
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until both queues are empty and no task runs; return whether they are."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while any(self._queues.values()) or self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def queue_depth(self, priority: FanoutPriority) -> int:
        """Tasks waiting in the in-memory queue of ``priority``."""
        with self._cond:
            return len(self._queues[priority])

    def purge(self) -> None:
        """Drop every waiting task."""
        with self._cond:
            for queue in self._queues.values():
                queue.clear()
            self._cond.notify_all()

    def close(self) -> None:
        """Finish waiting tasks (up to ``chunk_time_limit`` seconds), then stop the threads."""
        if not self._closed and not self._paused:
            self.join(timeout=self.settings.chunk_time_limit)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
