"""Dispatch overhead: enqueue time of chunk tasks, bulk path against one call per task.

No worker runs: the tasks are enqueued (encode, size check, send) to queues
of their own, counted there when the dispatcher can say, and purged. ``bulk`` is
``dispatcher.enqueue_many(tasks)``, the adapter's ``publish_many`` path;
``single`` is ``dispatcher.enqueue(task)`` once per task. Each task holds
``dispatch_followers`` follower ids, like a real chunk. The median of
``repeats`` timings is kept; the two paths alternate so drift on a busy
machine hits both.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks.backend import Backend
from benchmarks.baselines import ACTIVITY_ID, SORT_KEY
from benchmarks.manager import BenchmarkManager
from benchmarks.run import Run, clean_up
from feedfan._progress import Progress
from feedfan.dispatch import TaskDispatcher
from feedfan.priority import FanoutPriority
from feedfan.task import ChunkTask, make_fanout_id

__all__ = ["make_tasks", "run_dispatch"]


def make_tasks(count: int, followers: int, tag: str) -> list[ChunkTask]:
    """``count`` chunk tasks of one fanout, ``followers`` ids each."""
    fanout_id = make_fanout_id("add", tag, [ACTIVITY_ID], ["timeline"])
    return [
        ChunkTask(
            op="add",
            feeds=("timeline",),
            entries=((ACTIVITY_ID, SORT_KEY),),
            followers=tuple(range(index * followers, (index + 1) * followers)),
            fanout_id=fanout_id,
            priority=FanoutPriority.HIGH,
            index=index,
        )
        for index in range(count)
    ]


Path = Callable[[TaskDispatcher, list[ChunkTask]], float]


def _bulk(dispatcher: TaskDispatcher, tasks: list[ChunkTask]) -> float:
    started = time.perf_counter()
    dispatcher.enqueue_many(tasks)
    return time.perf_counter() - started


def _single(dispatcher: TaskDispatcher, tasks: list[ChunkTask]) -> float:
    started = time.perf_counter()
    for task in tasks:
        dispatcher.enqueue(task)
    return time.perf_counter() - started


def _depth(dispatcher: TaskDispatcher, count: int) -> int | None:
    """Tasks in the HIGH queue, waiting up to 3 s for ``count`` (brokers may count late)."""
    deadline = time.monotonic() + 3.0
    while True:
        depth = dispatcher.queue_depth(FanoutPriority.HIGH)
        if depth is None or depth >= count or time.monotonic() > deadline:
            return depth
        time.sleep(0.05)


def _timed(
    backend: Backend, run: Run, path: Path, tasks: list[ChunkTask]
) -> tuple[float, int | None]:
    """Time ``path`` over ``tasks[1:]`` on fresh queues; return seconds and the depth seen.

    Every timing gets queues of its own, so nothing is purged and reused: the
    first task is sent untimed, to connect and declare the queues.
    """
    manager = BenchmarkManager(settings=run.settings_for(backend, "dispatch"))
    try:
        dispatcher = manager.dispatcher
        pause = getattr(dispatcher, "pause", None)
        if backend.in_process and callable(pause):
            pause()  # in-process threads would run the tasks; measure only the enqueueing
        dispatcher.enqueue(tasks[0])
        seconds = path(dispatcher, tasks[1:])
        return seconds, _depth(dispatcher, len(tasks))
    finally:
        clean_up(manager)


def run_dispatch(backend: Backend, run: Run) -> dict[str, Any]:
    """Enqueue timings of each task count of the plan on ``backend``."""
    plan = run.plan
    section: dict[str, Any] = {
        "backend": backend.describe(),
        "followers_per_task": plan.dispatch_followers,
        "points": [],
    }
    paths: dict[str, Path] = {"bulk": _bulk, "single": _single}
    try:
        steps = len(plan.dispatch_counts) * plan.repeats * len(paths)
        with Progress(f"{backend.label} dispatch", total=steps) as bar:
            for count in plan.dispatch_counts:
                tasks = make_tasks(count + 1, plan.dispatch_followers, f"d{run.run_id}{count}")
                timings: dict[str, list[float]] = {name: [] for name in paths}
                depths: list[int | None] = []
                for repeat in range(plan.repeats):
                    order = list(paths) if repeat % 2 == 0 else list(reversed(paths))
                    for name in order:
                        seconds, depth = _timed(backend, run, paths[name], tasks)
                        timings[name].append(seconds)
                        depths.append(depth)
                        bar.advance()
                bulk = statistics.median(timings["bulk"])
                single = statistics.median(timings["single"])
                section["points"].append(
                    {
                        "tasks": count,
                        "bulk_s": round(bulk, 4),
                        "single_s": round(single, 4),
                        "bulk_us_per_task": round(bulk / count * 1e6, 1),
                        "single_us_per_task": round(single / count * 1e6, 1),
                        "bulk_speedup": round(single / bulk, 2) if bulk else None,
                        "bulk_s_all": [round(t, 4) for t in timings["bulk"]],
                        "single_s_all": [round(t, 4) for t in timings["single"]],
                        "queue_depths_seen": depths,
                    }
                )
                wrong = [d for d in depths if d is not None and d != count + 1]
                if wrong:
                    section["error"] = (
                        f"after enqueueing {count + 1} tasks the queue held {wrong[0]} "
                        f"(depths seen: {depths})"
                    )
    except Exception as e:
        section["error"] = f"{type(e).__name__}: {e}"
    return section
