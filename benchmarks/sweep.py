"""The chunk-size sweep: one activity to N followers, for each chunk size, per backend.

One ``feedfan worker --priority all --concurrency 2`` (the command users run)
serves the run; it is started once per backend, warmed up with a tiny fanout,
and kept for every chunk size, since a worker does not care about the
producer's chunk size. Feeds are deleted between fanouts so each writes into
empty feeds. Each point is repeated ``repeats`` times; the run with the median
end-to-end time stands for the point, and every run is kept in the JSON.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.backend import Backend
from benchmarks.fanout import FanoutResult, measure_fanout, warm_up
from benchmarks.manager import BenchmarkManager
from benchmarks.run import STREAM_FRAMEWORK_CHUNK_SIZE, Run, clean_up
from benchmarks.workers import WorkerPool
from feedfan.config import Settings
from feedfan.priority import FanoutPriority

__all__ = ["run_sweep", "summarize_point"]


def summarize_point(chunk_size: int, runs: list[FanoutResult]) -> dict[str, Any]:
    """The point of one chunk size: the median run's numbers, and every run."""
    good = [r for r in runs if r.ok and r.end_to_end_s is not None]
    point: dict[str, Any] = {"chunk_size": chunk_size, "runs": [r.as_dict() for r in runs]}
    if not good:
        point["ok"] = False
        point["error"] = next((r.error for r in runs if r.error), "no run completed")
        return point
    ordered = sorted(good, key=lambda r: r.end_to_end_s or 0.0)
    median = ordered[(len(ordered) - 1) // 2]
    point.update(median.as_dict())
    point["ok"] = True
    point["runs"] = [r.as_dict() for r in runs]
    point["writes_per_s_all"] = [round(r.writes_per_s or 0.0) for r in good]
    if len(good) > 1:
        rates = [r.writes_per_s or 0.0 for r in good]
        point["writes_per_s_spread"] = round(statistics.pstdev(rates) / statistics.mean(rates), 3)
    return point


def _start_workers(backend: Backend, run: Run, settings: Settings) -> tuple[WorkerPool, float]:
    """Start the workers of ``settings`` and warm them up; return them and the warm-up time."""
    name = f"{backend.label}-sweep-c{settings.fanout_chunk_size}"
    pool = WorkerPool(settings, log_dir=run.log_dir, name=name)
    manager = BenchmarkManager(settings=settings)
    try:
        if not backend.in_process:
            pool.start(priority="all", concurrency=run.plan.concurrency)
        return pool, warm_up(manager, timeout=120, check=pool.check_alive)
    except Exception:
        pool.stop()
        raise
    finally:
        clean_up(manager, purge=False)


def _library_command(backend: Backend, settings: Settings, concurrency: int) -> str:
    """The queue library's own worker command that ``feedfan worker`` execs."""
    dispatcher = backend.dispatcher_class(settings)
    try:
        return dispatcher.worker_command(list(FanoutPriority), concurrency=concurrency).shell()
    finally:
        dispatcher.close()


def _high_idle(backend: Backend, run: Run, settings: Settings, pool: WorkerPool) -> float | None:
    """Median time of a HIGH fanout on idle queues at chunk size 100: the priority budget."""
    manager = BenchmarkManager(
        settings=settings.replace(fanout_chunk_size=STREAM_FRAMEWORK_CHUNK_SIZE)
    )
    times = []
    try:
        for repeat in range(3):
            result = measure_fanout(
                manager,
                tag=f"idlehigh{repeat}",
                high=run.plan.high_followers,
                timeout=run.plan.fanout_timeout(run.plan.high_followers),
                label=f"{backend.label} HIGH idle",
                check=pool.check_alive,
            )
            if result.ok and result.end_to_end_s is not None:
                times.append(result.end_to_end_s)
    finally:
        clean_up(manager, purge=False)
    return round(statistics.median(times), 4) if times else None


def run_sweep(backend: Backend, run: Run) -> dict[str, Any]:
    """Measure every chunk size of the plan on ``backend``; return its section of the report.

    With background planning a worker cuts the chunks, at the size the
    producer's plan task carries, so one warm worker pool serves every size.
    """
    plan = run.plan
    settings = run.settings_for(backend, "sweep")
    section: dict[str, Any] = {
        "backend": backend.describe(),
        "followers": plan.followers,
        "concurrency": plan.concurrency,
        "worker_command": (
            f"in-process: {plan.concurrency} threads"
            if backend.in_process
            else f"feedfan worker --priority all --concurrency {plan.concurrency}"
        ),
        "planning": settings.planning,
        "chunk_time_limit": settings.chunk_time_limit,
        "redelivery_timeout": settings.redelivery_timeout,
        "write_mode": settings.write_mode,
        "high_followers": plan.high_followers,
        "warm_up_s": [],
        "points": [],
    }
    pool: WorkerPool | None = None
    try:
        if not backend.in_process:
            section["library_command"] = _library_command(backend, settings, plan.concurrency)
        for chunk_size in plan.chunk_sizes:
            sized = settings.replace(fanout_chunk_size=chunk_size)
            if pool is None:
                pool, warm = _start_workers(backend, run, sized)
                section["warm_up_s"].append(round(warm, 3))
                if "high_idle_s" not in section:
                    section["high_idle_s"] = _high_idle(backend, run, settings, pool)
            runs = []
            for repeat in range(plan.repeats):
                manager = BenchmarkManager(settings=sized)
                try:
                    result = measure_fanout(
                        manager,
                        tag=f"sweep{chunk_size}r{repeat}",
                        high=plan.followers,
                        timeout=plan.fanout_timeout(plan.followers),
                        label=f"{backend.label} c={chunk_size}",
                        worker_pids=pool.pids,
                        check=pool.check_alive,
                    )
                finally:
                    clean_up(manager, purge=False)
                runs.append(result)
                if result.error:
                    break
            section["points"].append(summarize_point(chunk_size, runs))
            if any(r.error for r in runs):
                pool.check_alive()
    except Exception as e:
        section["error"] = f"{type(e).__name__}: {e}"
        if pool is not None:
            section["worker_logs"] = pool.logs()
    finally:
        if pool is not None:
            pool.stop()
        closing = BenchmarkManager(settings=settings)
        clean_up(closing)
    return section
