"""Worker processes started the way a user starts them, and stopped by their PID.

Each worker is ``python -m feedfan worker --priority P --concurrency N`` with the
run's settings in ``FEEDFAN_*`` variables (:meth:`Settings.to_env`); it execs the
queue library's own worker (``celery worker``, ``rq worker``, ``dramatiq``) in a
process group of its own, so it and its children can be paused, resumed and
stopped together without touching any other process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from feedfan.config import Settings
from feedfan.testing.harness import WorkerProcess

__all__ = ["REPOSITORY", "WorkerPool"]

REPOSITORY = Path(__file__).resolve().parent.parent
"""The folder holding the ``benchmarks`` package; workers import the benchmark app from it."""


class WorkerPool:
    """The workers of one backend configuration; empty for in-process dispatchers."""

    def __init__(self, settings: Settings, *, log_dir: Path, name: str) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.name = name
        self.workers: list[WorkerProcess] = []

    def start(self, *, priority: str = "all", concurrency: int = 2) -> WorkerProcess:
        """Start one ``feedfan worker`` serving ``priority`` with ``concurrency``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{self.name}-{len(self.workers)}-{priority}.log"
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPOSITORY), env.get("PYTHONPATH", "")) if p
        )
        argv = [sys.executable, "-m", "feedfan", "worker", "--priority", priority]
        argv += ["--concurrency", str(concurrency)]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=REPOSITORY,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(process, log_path, priority)
        self.workers.append(worker)
        return worker

    def pids(self) -> list[int]:
        """Main PIDs of the workers still running."""
        return [w.pid for w in self.workers if w.alive()]

    def check_alive(self) -> None:
        """Raise with the log tail if a worker has exited."""
        for worker in self.workers:
            if not worker.alive():
                raise RuntimeError(
                    f"worker {worker.log_path.name} exited with code "
                    f"{worker.process.returncode}:\n{worker.log_tail(30)}"
                )

    def _signal(self, signum: int) -> None:
        for worker in self.workers:
            if worker.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, signum)

    def pause(self) -> None:
        """Freeze every worker process (SIGSTOP to its own process group)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let frozen workers run again (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def logs(self, lines: int = 30) -> str:
        """The tails of every worker's log."""
        return "\n".join(
            f"--- {w.log_path.name} (alive={w.alive()})\n{w.log_tail(lines)}" for w in self.workers
        )

    def stop(self) -> None:
        """Resume (a frozen process cannot exit) and stop every worker, then forget them."""
        self.resume()
        for worker in self.workers:
            worker.stop(timeout=20)
        self.workers.clear()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
