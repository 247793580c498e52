"""Running tasks in a worker: decode, check, write; reject what does not fit.

Every backend's worker function is a thin wrapper around :class:`TaskRunner`.
The runner finds the user's manager through the app the worker was started
with (``feedfan worker --app package.module:manager``, or the ``app``
setting), never through a name taken from a payload, and writes only to the
feeds that manager registered.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import TYPE_CHECKING

from feedfan.config import Settings, load_settings
from feedfan.errors import ConfigurationError, FeedfanError, PayloadError
from feedfan.fanout import PLAN_CHUNK, check_registered
from feedfan.task import ChunkTask, PlanTask, Task, decode_task

if TYPE_CHECKING:
    from feedfan.dispatch import TaskDispatcher
    from feedfan.manager import Manager

__all__ = ["TaskRunner", "get_runner", "load_app", "reset_runner"]

logger = logging.getLogger("feedfan.worker")


def load_app(path: str | None, settings: Settings) -> Manager:
    """Import the manager named ``package.module:attribute`` (an instance or a class).

    With no path, a plain :class:`~feedfan.manager.Manager` with the default
    feeds is used.
    """
    from feedfan.manager import Manager

    if path is None:
        return Manager(settings=settings)
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"app={path!r} (from {settings.sources.get('app', 'default')}) must look like "
            "'package.module:manager'."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigurationError(
            f"app={path!r}: cannot import module {module_name!r}: {e}. Is the worker started "
            "from your project directory, or is the package installed?"
        ) from e
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(
            f"app={path!r}: module {module_name!r} has no {attribute!r}."
        ) from None
    if isinstance(found, type) and issubclass(found, Manager):
        return found(settings=settings)
    if isinstance(found, Manager):
        return found
    raise ConfigurationError(
        f"app={path!r} is a {type(found).__name__}; expected a feedfan Manager subclass "
        "or instance."
    )


class TaskRunner:
    """Runs encoded tasks against one manager's feeds and storage."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    @property
    def settings(self) -> Settings:
        """The settings of the manager this runner writes for."""
        return self.manager.settings

    def decode(self, body: str | bytes) -> Task:
        """Decode and check ``body``; raise :class:`PayloadError` saying why not.

        A well-formed task this worker refuses (a feed its manager did not
        register, more followers than ``max_chunk_size``) is counted as failed
        in its fanout, so the fanout's progress settles.
        """
        task = decode_task(body, max_bytes=self.settings.max_task_bytes)
        try:
            check_registered(task.feeds, self.manager.registered_feeds)
            if isinstance(task, ChunkTask) and len(task.followers) > self.settings.max_chunk_size:
                raise PayloadError(
                    f"task has {len(task.followers):,} followers, above max_chunk_size="
                    f"{self.settings.max_chunk_size:,}."
                )
        except PayloadError as e:
            self.count_failed(task, f"refused: {e}")
            raise
        return task

    def count_failed(self, task: Task, reason: str) -> None:
        """Count ``task`` as failed in its fanout's progress (a planning task as ``plan``)."""
        chunk = task.chunk_key if isinstance(task, ChunkTask) else PLAN_CHUNK
        try:
            self.manager.storage.mark_chunk_failed(task.fanout_id, chunk, reason)
        except FeedfanError:  # the task is kept either way; progress is best effort
            logger.exception("feedfan could not count task %s as failed", task.task_id)

    def run(self, task: Task) -> int:
        """Run a checked task; return the feed writes it made (0 for planning)."""
        if isinstance(task, PlanTask):
            self.manager.plan_in_worker(task)
            return 0
        return self.manager.run_chunk(task)

    def handle(self, body: str | bytes) -> int:
        """Decode, check and run ``body``; a :class:`PayloadError` means reject it."""
        return self.run(self.decode(body))

    def reject(self, body: str | bytes, *, queue: str, reason: str) -> None:
        """Log why ``body`` was refused and keep it in feedfan's rejected list."""
        text = (
            body.decode("utf-8", "backslashreplace")
            if isinstance(body, (bytes, bytearray))
            else str(body)
        )
        logger.warning("feedfan rejected a message from queue %s: %s", queue, reason)
        self.manager.storage.keep_rejected(queue, text, reason)

    def give_up(self, body: str | bytes, *, queue: str, reason: str) -> None:
        """Record a task that failed for good: its chunk as failed, its body as kept."""
        try:
            task = decode_task(body, max_bytes=self.settings.max_task_bytes)
        except PayloadError:
            task = None
        # Kept first: once the progress says failed, the task can be seen and replayed.
        self.reject(body, queue=queue, reason=f"gave up: {reason}")
        if task is not None:
            self.count_failed(task, reason)

    def replay_rejected(self, dispatcher: TaskDispatcher, *, limit: int | None = None) -> int:
        """Send kept messages that are valid tasks back through ``dispatcher``; return how many.

        Messages are taken oldest first; those that still do not decode stay kept,
        with their reason. At most ``limit`` messages are looked at (default: all
        kept when the call starts).
        """
        storage = self.manager.storage
        budget = len(storage.rejected(limit=10**9)) if limit is None else limit
        replayed = 0
        for _ in range(budget):
            message = storage.pop_rejected()
            if message is None:
                break
            try:
                task = self.decode(message.body)
            except PayloadError:
                storage.keep_rejected(message.queue, message.body, message.reason)
                continue
            if isinstance(task, ChunkTask):
                storage.clear_chunk_failure(task.fanout_id, task.chunk_key)
            try:
                dispatcher.enqueue(task)
            except Exception:
                storage.keep_rejected(message.queue, message.body, message.reason)
                raise
            replayed += 1
        return replayed


_runner: TaskRunner | None = None
_runner_lock = threading.Lock()


def get_runner() -> TaskRunner:
    """The runner of this worker process, built once from its settings and app."""
    global _runner
    with _runner_lock:
        if _runner is None:
            settings = load_settings()
            _runner = TaskRunner(load_app(settings.app, settings))
        return _runner


def reset_runner() -> None:
    """Forget the process's runner (after a fork, or in tests)."""
    global _runner
    with _runner_lock:
        _runner = None
