"""Faults the drills inject: SIGKILLs, dropped Redis clients, closed or restarted RabbitMQ.

Everything here touches only what this test session owns: processes it
started, clients of its own Redis database, connections of its own RabbitMQ
virtual host. Restarting the RabbitMQ application is the one exception, so it
only happens in full mode and only when no other virtual host has a
connection open (the machine is shared; another session's tests would fail).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psutil
import redis

from feedfan.config import Settings
from feedfan.manager import Manager
from feedfan.storage.redis import RedisStorage
from feedfan.testing import Harness, WorkerProcess
from feedfan.testing.managers import started_chunks
from feedfan.testing.rabbit import RabbitControl

__all__ = [
    "ProcessTree",
    "ProgressInjector",
    "RabbitControl",
    "Supervisor",
    "drop_redis_clients",
    "process_tree",
]


# Processes -------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessTree:
    """A worker's processes as ``{pid: start time}``: a restarted one gets a new start time."""

    processes: dict[int, float]

    def changed(self) -> dict[int, str]:
        """Processes of the snapshot that died or were replaced since, by pid, saying how."""
        problems = {}
        for pid, started in self.processes.items():
            try:
                now = psutil.Process(pid).create_time()
            except psutil.NoSuchProcess:
                problems[pid] = f"process {pid} is gone"
                continue
            if now != started:
                problems[pid] = f"pid {pid} now belongs to a process started at {now}"
        return problems

    def alive_and_unchanged(self) -> list[str]:
        """Problems: processes of the snapshot that died or were replaced since."""
        return list(self.changed().values())


def process_tree(pid: int) -> ProcessTree:
    """The process ``pid`` and all its descendants, with their start times."""
    root = psutil.Process(pid)
    found = {root.pid: root.create_time()}
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            found[child.pid] = child.create_time()
    return ProcessTree(found)


def _descendants(pid: int) -> set[int]:
    try:
        root = psutil.Process(pid)
        return {root.pid, *(child.pid for child in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


class Supervisor:
    """Keeps one ``feedfan worker`` running, as systemd or Kubernetes would.

    A thread polls the worker; when its main process has exited, it kills
    what is left of its process group and starts a new worker with the same
    settings and environment. ``restarts`` counts how often.
    """

    def __init__(
        self,
        harness: Harness,
        settings: Settings,
        *,
        env: dict[str, str],
        priority: str = "all",
        poll: float = 0.1,
    ) -> None:
        self.harness = harness
        self.settings = settings
        self.env = env
        self.priority = priority
        self.poll = poll
        self.restarts = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.worker = self._start()
        self._thread = threading.Thread(target=self._watch, name="drill-supervisor", daemon=True)
        self._thread.start()

    def _start(self) -> WorkerProcess:
        worker = self.harness.start_worker(self.settings, priority=self.priority, env=self.env)
        if worker is None:
            raise AssertionError(f"{self.harness.dispatcher} starts no worker process")
        return worker

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            with self._lock:
                if self.worker.alive():
                    continue
                self.worker.stop()  # the dead main's leftover children go with its group
                self.worker = self._start()
                self.restarts += 1

    def current(self) -> WorkerProcess:
        """The worker running now."""
        with self._lock:
            return self.worker

    def kill_worker(self) -> int:
        """SIGKILL the whole worker (its process group); the supervisor starts another."""
        with self._lock:
            worker = self.worker
            worker.kill()
            return int(worker.pid)

    def stop(self) -> None:
        """Stop supervising (the harness stops the worker itself)."""
        self._stop.set()
        self._thread.join(timeout=10)


def running_chunk_pid(storage: RedisStorage, worker: WorkerProcess, delay: float) -> int | None:
    """The pid of a process of ``worker`` inside a chunk right now, if one is.

    A slowed-down conformance worker notes each chunk it begins (pid, time)
    and then sleeps ``delay`` seconds before writing it; a process that began
    one less than ``delay`` ago is still inside it.
    """
    mine = _descendants(worker.pid)
    now = time.time()
    for record in reversed(started_chunks(storage)[-50:]):
        pid, at = int(str(record["pid"])), float(str(record["at"]))
        if now - at > delay * 0.8:
            break
        if pid in mine:
            return pid
    return None


def kill_process(pid: int) -> None:
    """SIGKILL one process."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class ProgressInjector:
    """Injects faults from a thread, each once a fanout has written a fraction of its chunks."""

    manager: Manager
    fanout_id: str
    chunks: int
    faults: list[tuple[float, Callable[[], str]]]
    timeout: float
    done: list[str] = field(default_factory=list)
    outrun: list[str] = field(default_factory=list)
    """Moments the fanout had already settled by (a slow fault before it took long)."""

    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="drill-injector", daemon=True)

    def start(self) -> None:
        """Start injecting."""
        self._thread.start()

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout
            for number, (fraction, fault) in enumerate(self.faults):
                while True:
                    status = self.manager.fanout_status(self.fanout_id)
                    if status is not None and status.settled:
                        self.outrun = [f"{later:.0%}" for later, _ in self.faults[number:]]
                        return
                    if status is not None and status.done >= fraction * self.chunks:
                        break
                    if time.monotonic() > deadline:
                        raise AssertionError(f"no progress to {fraction:.0%} in {self.timeout:g} s")
                    time.sleep(0.02)
                self.done.append(f"{fault()} at {status.done}/{self.chunks}")
        except BaseException as e:
            self.error = e

    def join(self) -> list[str]:
        """Wait for the thread; raise what it raised; return what it injected."""
        self._thread.join(timeout=self.timeout)
        if self.error is not None:
            raise self.error
        assert not self._thread.is_alive(), "the fault injector is still running"
        return self.done


# Redis -----------------------------------------------------------------------


def drop_redis_clients(url: str) -> int:
    """Close every client connection of ``url``'s database (``CLIENT KILL ID``); return how many.

    ``CLIENT LIST`` shows each connection's selected database; only those on
    this test's database are closed, never another's, and not our own.
    """
    database = int(urlsplit(url).path.lstrip("/") or 0)
    admin = redis.Redis.from_url(url)
    try:
        own = admin.client_id()
        doomed = [
            int(client["id"])
            for client in admin.client_list()
            if int(client.get("db", -1)) == database and int(client["id"]) != own
        ]
        killed = 0
        for client_id in doomed:
            killed += int(admin.client_kill_filter(_id=str(client_id)))
        return killed
    finally:
        admin.close()
