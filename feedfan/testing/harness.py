"""Drives one dispatcher for the conformance suite: settings, managers, workers.

Real workers are started the way a user starts them, ``feedfan worker
--priority …`` (which execs ``celery worker``, ``rq worker`` or ``dramatiq``),
each in its own process group, logging to a file whose tail is shown when a
test fails; they are terminated and awaited on teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from feedfan.config import IN_PROCESS_DISPATCHERS, Settings, load_settings
from feedfan.dispatch import TaskDispatcher, resolve_dispatcher_class
from feedfan.local import LocalDispatcher
from feedfan.manager import Manager
from feedfan.testing.managers import ConformanceManager

__all__ = ["Harness", "WorkerProcess", "wait_for"]

APP = "feedfan.testing.managers:ConformanceManager"


def wait_for(
    condition: Callable[[], bool], *, timeout: float, message: str, interval: float = 0.05
) -> None:
    """Poll ``condition`` until it holds; fail with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:g} s: {message}")
        time.sleep(interval)


@dataclass
class WorkerProcess:
    """A worker started with ``feedfan worker`` in a process group of its own."""

    process: subprocess.Popen[bytes]
    log_path: Path
    priority: str

    @property
    def pid(self) -> int:
        """The worker's main process id (``feedfan worker`` execs the real worker)."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the main process still runs."""
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole worker: its main process and every child."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        """Ask the worker to shut down warmly; kill it if it does not within ``timeout``."""
        if self.alive():
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        if self.alive():
            self.kill()
        else:
            with contextlib.suppress(ProcessLookupError):  # children a dead main left behind
                os.killpg(self.process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 60) -> str:
        """The last lines the worker wrote."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Harness:
    """One dispatcher under test, with the servers it needs.

    ``redis_url`` holds the feeds (``None``: in-memory storage, in-process
    dispatchers only); ``broker_url`` is the queue's broker (``None``: the
    feed Redis). ``settings()`` gives every caller its own key prefix and queue
    names, so a test never sees another's tasks.
    """

    dispatcher: str
    log_dir: Path
    redis_url: str | None = None
    broker_url: str | None = None
    chunk_size: int = 5
    redelivery_timeout: int = 8
    chunk_time_limit: int = 4
    workers: list[WorkerProcess] = field(default_factory=list)
    managers: list[Manager] = field(default_factory=list)

    @property
    def dispatcher_class(self) -> type[TaskDispatcher]:
        """The class the ``dispatcher`` name resolves to."""
        return resolve_dispatcher_class(self.dispatcher)

    @cached_property
    def probe(self) -> TaskDispatcher:
        """A dispatcher on this harness's settings, for reading its capability flags."""
        return self.dispatcher_class(self.settings())

    @property
    def in_process(self) -> bool:
        """Whether chunks run inside the test process (``local``, ``eager``)."""
        return self.dispatcher in IN_PROCESS_DISPATCHERS or self.dispatcher_class.runs_in_process

    def settings(self, **overrides: object) -> Settings:
        """Settings of a namespace of its own: key prefix and queue names."""
        namespace = f"fft-{uuid.uuid4().hex[:8]}"
        values: dict[str, object] = {
            "dispatcher": self.dispatcher,
            "key_prefix": f"{namespace}:",
            "queue_high": f"{namespace}.high",
            "queue_low": f"{namespace}.low",
            "fanout_chunk_size": self.chunk_size,
            "app": APP,
            "redelivery_timeout": self.redelivery_timeout,
            "chunk_time_limit": self.chunk_time_limit,
            "max_retries": 2,
        }
        if self.redis_url is not None:
            values["redis_url"] = self.redis_url
            values["storage"] = "redis"
        if self.broker_url is not None:
            values["broker_url"] = self.broker_url
        values.update(overrides)
        return load_settings(values, env={}, read_files=False)

    def manager(self, settings: Settings, cls: type[Manager] = ConformanceManager) -> Manager:
        """A manager on ``settings``, closed (and its queues purged) on teardown."""
        manager = cls(settings=settings)
        self.managers.append(manager)
        return manager

    def start_worker(
        self, settings: Settings, *, priority: str = "all", env: dict[str, str] | None = None
    ) -> WorkerProcess | None:
        """Start ``feedfan worker --priority <priority>``; ``None`` for in-process dispatchers."""
        if self.in_process:
            return None
        log_path = self.log_dir / f"worker-{len(self.workers)}-{priority}.log"
        environment = {**os.environ, **settings.to_env(), **(env or {})}
        environment.setdefault("PYTHONUNBUFFERED", "1")
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "feedfan", "worker", "--priority", priority],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(process, log_path, priority)
        self.workers.append(worker)
        return worker

    @contextmanager
    def held(self, manager: Manager) -> Iterator[None]:
        """No worker takes tasks of ``manager``'s queues inside the block."""
        dispatcher = manager.dispatcher
        if isinstance(dispatcher, LocalDispatcher):
            dispatcher.pause()
            try:
                yield
            finally:
                dispatcher.purge()
                dispatcher.resume()
            return
        # A real dispatcher's fresh queues have no worker until one is started.
        try:
            yield
        finally:
            dispatcher.purge()

    def worker_logs(self) -> str:
        """The tails of every worker's log, for a failing test's report."""
        return "\n".join(
            f"--- {w.log_path.name} (alive={w.alive()})\n{w.log_tail()}" for w in self.workers
        )

    def stop_workers(self) -> None:
        """Stop every worker this harness started."""
        for worker in self.workers:
            worker.stop()

    def close(self) -> None:
        """Stop workers, purge queues, clear storage, close managers."""
        self.stop_workers()
        if "probe" in self.__dict__:
            self.probe.close()
        for manager in self.managers:
            try:
                manager.dispatcher.purge()
                manager.storage.clear()
            finally:
                manager.close()
        self.managers.clear()
