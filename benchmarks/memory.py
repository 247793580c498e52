"""Peak resident memory of the producer and of worker process trees, sampled."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable

import psutil  # type: ignore[import-untyped]

__all__ = ["PeakMemory", "tree_rss"]

MB = 1024 * 1024


def tree_rss(pids: Iterable[int]) -> int:
    """Resident bytes of the processes ``pids`` and all their children, summed."""
    total = 0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            members = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for process in members:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
    return total


class PeakMemory:
    """Samples RSS every ``interval`` seconds in a thread, keeping the peaks.

    ``worker_pids`` is called at every sample, so workers that fork children
    late (RQ's work horse) are counted. The producer is this process.
    """

    def __init__(
        self, worker_pids: Callable[[], list[int]] | None = None, *, interval: float = 0.05
    ) -> None:
        self._worker_pids = worker_pids or list
        self.interval = interval
        self._me = psutil.Process(os.getpid())
        self.producer_start = self._me.memory_info().rss
        self.producer_peak = self.producer_start
        self.workers_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ffbench-memory", daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.producer_peak = max(self.producer_peak, self._me.memory_info().rss)
        pids = self._worker_pids()
        if pids:
            self.workers_peak = max(self.workers_peak, tree_rss(pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def as_mb(self) -> dict[str, float | None]:
        """The peaks in MB; ``workers_peak_mb`` is ``None`` when no worker process ran."""
        return {
            "producer_rss_start_mb": round(self.producer_start / MB, 1),
            "producer_rss_peak_mb": round(self.producer_peak / MB, 1),
            "workers_rss_peak_mb": round(self.workers_peak / MB, 1) if self.workers_peak else None,
        }
