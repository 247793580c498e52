"""Priority under load: a HIGH fanout behind a backlog of LOW fanouts.

For each worker layout the same HIGH fanout (``high_followers`` followers) is
timed on idle queues, then behind a backlog of LOW fanouts of at least
``backlog_writes`` feed writes. To have the whole backlog queued when the HIGH
fanout is sent, the (already warm) workers are frozen while the backlog is
enqueued (SIGSTOP to their process group; ``pause()`` for in-process
dispatchers) and let go just before the HIGH fanout. How much backlog was
still waiting when the HIGH fanout was sent and when it completed is read
from the LOW fanouts' own progress counters.

Layouts: ``shared`` is the default worker command, one ``feedfan worker
--priority all --concurrency 2``; ``dedicated`` is one ``--priority high``
worker and one ``--priority low`` worker, one process each (the same two
processes).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from benchmarks.backend import Backend
from benchmarks.fanout import measure_fanout, warm_up
from benchmarks.manager import BenchmarkManager, benchmark_user
from benchmarks.run import Run, clean_up
from benchmarks.workers import WorkerPool
from feedfan._progress import Progress
from feedfan.activity import Activity
from feedfan.fanout import FanoutReceipt
from feedfan.manager import Manager

__all__ = ["layouts", "run_priority"]


def layouts(concurrency: int) -> dict[str, list[tuple[str, int]]]:
    """Worker layouts, as ``(--priority, --concurrency)`` of each ``feedfan worker``.

    Both use ``concurrency`` processes in all, so they compete on equal terms.
    """
    high = max(1, concurrency // 2)
    return {
        "shared": [("all", concurrency)],
        "dedicated": [("high", high), ("low", max(1, concurrency - high))],
    }


@contextlib.contextmanager
def _held(pool: WorkerPool, manager: Manager) -> Iterator[None]:
    pause = getattr(manager.dispatcher, "pause", None)
    if pool.workers:
        pool.pause()
    elif callable(pause):
        pause()
    try:
        yield
    finally:
        if pool.workers:
            pool.resume()
        else:
            resume = getattr(manager.dispatcher, "resume", None)
            if callable(resume):
                resume()


def _pending_writes(
    manager: Manager, receipts: list[FanoutReceipt], chunk_size: int, followers: int
) -> int:
    """LOW feed writes still waiting: pending chunks times the chunk size (an upper bound).

    A fanout still being planned by workers has no total yet: its chunks are
    counted from its ``followers``.
    """
    expected = -(-followers // chunk_size)
    pending = 0
    for receipt in receipts:
        status = manager.fanout_status(receipt)
        if status is None:
            pending += expected
        else:
            total = status.total if status.total is not None else expected
            pending += max(total - status.done - status.failed, 0)
    return pending * chunk_size * len(manager.registered_feeds)


def _enqueue_backlog(
    manager: Manager, run: Run, tag: str, receipts: list[FanoutReceipt], writes: int
) -> float:
    """Queue LOW fanouts of ``plan.backlog_fanout`` followers holding at least ``writes``."""
    plan = run.plan
    fanouts = max(1, -(-writes // plan.backlog_fanout))
    total = 0.0
    with Progress("queue LOW backlog", total=fanouts) as bar:
        for number in range(fanouts):
            user = benchmark_user(f"{tag}b{number}", low=plan.backlog_fanout)
            activity = Activity(
                actor=user, verb="post", object=f"{tag}b{number}", time=datetime.now(timezone.utc)
            )
            started = time.perf_counter()
            receipts.append(manager.add_user_activity(user, activity))
            total += time.perf_counter() - started
            bar.advance()
    return total


def _layout(backend: Backend, run: Run, name: str, chunk_size: int) -> dict[str, Any]:
    plan = run.plan
    settings = run.settings_for(backend, f"prio-{name}", fanout_chunk_size=chunk_size)
    pool = WorkerPool(settings, log_dir=run.log_dir, name=f"{backend.label}-prio-{name}")
    manager = BenchmarkManager(settings=settings)
    section: dict[str, Any] = {"layout": name, "idle": [], "loaded": []}
    timeout = plan.fanout_timeout(plan.high_followers)
    try:
        if backend.in_process:
            section["workers"] = f"in-process: {plan.concurrency} threads serving HIGH first"
        else:
            layout = layouts(plan.concurrency)[name]
            for priority, concurrency in layout:
                pool.start(priority=priority, concurrency=concurrency)
            section["workers"] = [
                f"feedfan worker --priority {p} --concurrency {c}" for p, c in layout
            ]
        warm_up(manager, timeout=120, check=pool.check_alive)
        for repeat in range(plan.priority_repeats):
            result = measure_fanout(
                manager,
                tag=f"idle{name}{repeat}",
                high=plan.high_followers,
                timeout=timeout,
                label=f"{backend.label} HIGH idle",
                check=pool.check_alive,
            )
            section["idle"].append(result.as_dict())
        receipts: list[FanoutReceipt] = []
        for repeat in range(plan.priority_repeats):
            with _held(pool, manager):
                # Every HIGH fanout waits behind the same backlog: the first is queued
                # whole, later ones only top up what the workers wrote since. Counted
                # again after each top-up: a write that ran meanwhile (a worker still
                # finishing a chunk as it was frozen) is topped up too.
                queued = _pending_writes(manager, receipts, chunk_size, plan.backlog_fanout)
                enqueue_s = 0.0
                for top_up in range(3):
                    if queued >= plan.backlog_writes:
                        break
                    tag = f"load{name}{repeat}t{top_up}"
                    missing = plan.backlog_writes - queued
                    enqueue_s += _enqueue_backlog(manager, run, tag, receipts, missing)
                    queued = _pending_writes(manager, receipts, chunk_size, plan.backlog_fanout)
            result = measure_fanout(
                manager,
                tag=f"busy{name}{repeat}",
                high=plan.high_followers,
                timeout=timeout,
                label=f"{backend.label} HIGH loaded",
                check=pool.check_alive,
            )
            entry = result.as_dict()
            entry["backlog_enqueue_s"] = round(enqueue_s, 3)
            entry["low_writes_queued_at_send"] = queued
            entry["low_writes_waiting_at_done"] = _pending_writes(
                manager, receipts, chunk_size, plan.backlog_fanout
            )
            section["loaded"].append(entry)
        _summarize(section)
    except Exception as e:
        section["error"] = f"{type(e).__name__}: {e}"
        section["worker_logs"] = pool.logs()
    finally:
        pool.stop()
        clean_up(manager)
    return section


def _median_time(results: list[dict[str, Any]]) -> float | None:
    times = [r["end_to_end_s"] for r in results if r.get("verified") and r.get("end_to_end_s")]
    return statistics.median(times) if times else None


def _summarize(section: dict[str, Any]) -> None:
    idle = _median_time(section["idle"])
    loaded = _median_time(section["loaded"])
    section["idle_s"] = idle
    section["loaded_s"] = loaded
    section["loaded_over_idle"] = round(loaded / idle, 2) if idle and loaded else None
    failures = [r["error"] for r in section["idle"] + section["loaded"] if r.get("error")]
    if failures:
        section["error"] = failures[0]


def run_priority(backend: Backend, run: Run, *, chunk_size: int) -> dict[str, Any]:
    """Both worker layouts on ``backend``; return its section of the report."""
    plan = run.plan
    names = ["shared"] if backend.in_process else list(layouts(plan.concurrency))
    return {
        "backend": backend.describe(),
        "chunk_size": chunk_size,
        "high_followers": plan.high_followers,
        "backlog_writes": plan.backlog_writes,
        "layouts": [_layout(backend, run, name, chunk_size) for name in names],
    }
