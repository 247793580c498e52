"""``python -m benchmarks.planning``: ``add_user_activity`` with inline against background planning.

For each backend and each follower count (1,000 to 1,000,000 by default) a
fresh producer process adds one activity, ``planning = "inline"`` (the
producer cuts every chunk and sends it) or ``"background"`` (it sends one
planning task), and reports how long ``add_user_activity`` took and its own
peak RSS (``VmHWM``: the whole process, imports included). No worker runs
then, so only the producer is measured; the queues are purged after each run.

Then, with ``feedfan worker --concurrency N`` running, one fanout to the
largest count is timed end to end (from the call to the last chunk counted
done by feedfan's progress counters) in background mode, and in inline mode
for comparison: ``add_user_activity`` must return in under 1% of the
end-to-end time, with the producer under 150 MB. The workers' peak RSS
(process trees, sampled) shows that planning a million followers in a
worker does not hold them in memory.

From the producer times it recommends ``planning`` and
``planning_threshold``: the follower count from which inline planning
keeps a producer longer than ``--budget-ms`` (default 50 ms), on the slowest
backend, rounded down to one significant digit. Nothing here asserts on
speed: the numbers are noisy on a shared machine; compare within one run.

Wire it into ``python -m benchmarks`` as a step by calling :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.backend import Backend, discover_backends, needs_amqp
from benchmarks.manager import BenchmarkManager, benchmark_user
from benchmarks.memory import PeakMemory
from benchmarks.servers import open_servers
from benchmarks.workers import REPOSITORY, WorkerPool
from feedfan.activity import Activity
from feedfan.config import Settings, load_settings
from feedfan.storage.redis import RedisStorage

__all__ = ["DEFAULT_FOLLOWERS", "main", "recommend", "render", "run"]

DEFAULT_FOLLOWERS = (1_000, 10_000, 100_000, 1_000_000)
CHUNK_SIZE = 100
"""The default ``fanout_chunk_size``: the number of tasks grows with followers / 100."""

TARGET_FRACTION = 0.01
TARGET_RSS_MB = 150.0
MB = 1024 * 1024


# The producer, in a process of its own --------------------------------------------


def _producer_main(user: str) -> int:
    """Child side: add one activity for ``user`` with the settings in ``FEEDFAN_*``; print JSON."""
    manager = BenchmarkManager(settings=load_settings())
    # A first activity with one follower connects to the broker and Redis and declares
    # the queues, as in a warm web process: the timed call measures planning and sending.
    warm = benchmark_user(f"warm{uuid.uuid4().hex[:6]}", high=1)
    manager.add_user_activity(warm, Activity(actor=warm, verb="pin", object="warm"))
    before = _rss_mb()
    activity = Activity(actor=user, verb="pin", object=f"post-{uuid.uuid4().hex[:8]}")
    started_at = time.time()
    clock = time.perf_counter()
    receipt = manager.add_user_activity(user, activity)
    seconds = time.perf_counter() - clock
    peak = _peak_rss_mb()
    manager.close()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "started_at": started_at,
                "fanout_id": receipt.fanout_id,
                "chunks": receipt.chunks,
                "in_background": receipt.planned_in_background,
                "rss_before_mb": round(before, 1),
                "rss_peak_mb": round(peak, 1),
            }
        )
    )
    return 0


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def _peak_rss_mb() -> float:
    """This process's peak RSS since it started (``VmHWM``).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries that across ``exec`` from
    the parent that spawned us, so it would report the benchmark's own size.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _produce(settings: Settings, user: str, *, timeout: float) -> dict[str, Any]:
    env = {**os.environ, **settings.to_env()}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.planning", "--producer", user],
        env=env,
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"producer failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def _reset(settings: Settings) -> None:
    """Purge the run's queues and delete its keys (no worker is running)."""
    manager = BenchmarkManager(settings=settings)
    try:
        manager.dispatcher.purge()
        manager.storage.clear()
    finally:
        manager.close()


def measure_producer(
    backend: Backend,
    redis_url: str,
    *,
    followers: Sequence[int],
    repeats: int,
    timeout: float,
) -> list[dict[str, Any]]:
    """Producer time and peak RSS per mode and follower count, medians of ``repeats`` runs."""
    points = []
    namespace = f"plan-{uuid.uuid4().hex[:6]}"
    for count in followers:
        for mode in ("inline", "background"):
            settings = backend.settings(
                redis_url, namespace, planning=mode, fanout_chunk_size=CHUNK_SIZE
            )
            runs = []
            for _ in range(repeats):
                user = benchmark_user(f"p{uuid.uuid4().hex[:8]}", low=count)
                try:
                    runs.append(_produce(settings, user, timeout=timeout))
                finally:
                    _reset(settings)
            points.append(
                {
                    "mode": mode,
                    "followers": count,
                    "chunks": runs[0]["chunks"],
                    "seconds": statistics.median(r["seconds"] for r in runs),
                    "seconds_all": [round(r["seconds"], 5) for r in runs],
                    "rss_peak_mb": max(r["rss_peak_mb"] for r in runs),
                    "rss_before_mb": statistics.median(r["rss_before_mb"] for r in runs),
                }
            )
    return points


# End to end, with workers ----------------------------------------------------------


def _wait_complete(
    storage: RedisStorage, fanout_id: str, *, timeout: float
) -> tuple[float, float | None]:
    """Poll the progress counters; return when the fanout completed and when its planning ended."""
    deadline = time.monotonic() + timeout
    planned_at = None
    while time.monotonic() < deadline:
        status = storage.fanout_status(fanout_id)
        now = time.time()
        if status is not None and status.total is not None and planned_at is None:
            planned_at = now
        if status is not None and status.settled:
            if not status.complete:
                raise RuntimeError(f"fanout {fanout_id} settled with failures: {status}")
            return now, planned_at
        time.sleep(0.05)
    raise RuntimeError(f"fanout {fanout_id} did not complete within {timeout:g} s")


def measure_end_to_end(
    backend: Backend,
    redis_url: str,
    *,
    followers: int,
    modes: Sequence[str],
    concurrency: int,
    log_dir: Path,
    timeout: float,
) -> list[dict[str, Any]]:
    """One fanout to ``followers`` per mode, timed from the call to the last chunk done."""
    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    base = backend.settings(redis_url, namespace, fanout_chunk_size=CHUNK_SIZE)
    storage = RedisStorage(url=redis_url, key_prefix=base.key_prefix)
    results = []
    with WorkerPool(base, log_dir=log_dir, name=f"planning-{backend.label}") as pool:
        pool.start(priority="all", concurrency=concurrency)
        warm = _produce(base, benchmark_user("warmup", high=200), timeout=timeout)
        _wait_complete(storage, warm["fanout_id"], timeout=timeout)
        for mode in modes:
            settings = base.replace(planning=mode)
            user = benchmark_user(f"e{uuid.uuid4().hex[:8]}", low=followers)
            with PeakMemory(pool.pids) as memory:
                produced = _produce(settings, user, timeout=timeout)
                done_at, planned_at = _wait_complete(
                    storage, produced["fanout_id"], timeout=timeout
                )
            pool.check_alive()
            total = done_at - produced["started_at"]
            results.append(
                {
                    "mode": mode,
                    "followers": followers,
                    "concurrency": concurrency,
                    "add_user_activity_s": produced["seconds"],
                    "end_to_end_s": total,
                    "fraction": produced["seconds"] / total,
                    "planning_done_s": (
                        None if planned_at is None else planned_at - produced["started_at"]
                    ),
                    "producer_rss_peak_mb": produced["rss_peak_mb"],
                    "workers_rss_peak_mb": round(memory.workers_peak / MB, 1),
                    "meets_targets": mode != "background"
                    or (
                        produced["seconds"] < TARGET_FRACTION * total
                        and produced["rss_peak_mb"] < TARGET_RSS_MB
                    ),
                }
            )
            storage.clear()  # every fanout writes into empty feeds
    storage.close()
    return results


# Recommendation -------------------------------------------------------------------


def _round_down(value: float) -> int:
    if value < 1:
        return 0
    digits = 10 ** math.floor(math.log10(value))
    return int(value // digits * digits)


def recommend(producer: dict[str, list[dict[str, Any]]], *, budget_ms: float) -> dict[str, Any]:
    """``planning`` and ``planning_threshold`` from the producer times of every backend.

    Per backend, inline time is fitted as a line over the follower counts
    (it is linear: one chunk task per 100 followers); the crossing is where
    it reaches ``budget_ms``. The threshold is the smallest crossing, rounded
    down, so no backend keeps a producer much past the budget.
    """
    crossings: dict[str, int | None] = {}
    for label, points in producer.items():
        inline = sorted((p["followers"], p["seconds"]) for p in points if p["mode"] == "inline")
        if len(inline) < 2:
            crossings[label] = None
            continue
        slope, intercept = statistics.linear_regression(
            [float(x) for x, _ in inline], [y for _, y in inline]
        )
        crossings[label] = (
            None if slope <= 0 else max(0, int((budget_ms / 1000 - intercept) / slope))
        )
    known = [c for c in crossings.values() if c is not None]
    threshold = _round_down(min(known)) if known else None
    return {
        "budget_ms": budget_ms,
        "crossing_followers": crossings,
        "planning": "auto" if threshold else "inline",
        "planning_threshold": threshold,
    }


# The run ----------------------------------------------------------------------------


def run(
    *,
    backends: Sequence[str] | None = None,
    followers: Sequence[int] = DEFAULT_FOLLOWERS,
    end_to_end: int | None = 1_000_000,
    end_to_end_modes: Sequence[str] = ("background", "inline"),
    repeats: int = 3,
    concurrency: int = 2,
    budget_ms: float = 50.0,
    redis_url: str | None = None,
    broker_urls: Sequence[str] = (),
    out: Path | None = None,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Measure every backend; return (and with ``out``, write) the results as a dict."""
    run_id = uuid.uuid4().hex[:6]
    servers = open_servers(
        redis_url=redis_url,
        broker_urls=list(broker_urls),
        run_id=run_id,
        want_amqp=needs_amqp(list(backends) if backends else None),
    )
    out = out or Path("results") / f"planning-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "load_average_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "followers": list(followers),
        "repeats": repeats,
        "chunk_size": CHUNK_SIZE,
        "servers": servers.describe(),
        "producer": {},
        "end_to_end": {},
        "skipped": [],
        "errors": {},
    }
    try:
        found, skipped = discover_backends(list(backends) if backends else None, servers)
        results["skipped"] = [{"name": s.name, "reason": s.reason} for s in skipped]
        for backend in found:
            if backend.in_process:
                continue  # planning never leaves the producer without a queue
            label = backend.label
            try:
                results["producer"][label] = measure_producer(
                    backend,
                    servers.redis_url,
                    followers=followers,
                    repeats=repeats,
                    timeout=timeout,
                )
                if end_to_end:
                    results["end_to_end"][label] = measure_end_to_end(
                        backend,
                        servers.redis_url,
                        followers=end_to_end,
                        modes=end_to_end_modes,
                        concurrency=concurrency,
                        log_dir=out / "logs",
                        timeout=timeout,
                    )
            except Exception as e:  # one backend failing must not lose the others' numbers
                results["errors"][label] = repr(e)
            (out / "planning.json").write_text(json.dumps(results, indent=2))
        results["recommendation"] = recommend(results["producer"], budget_ms=budget_ms)
        results["load_average_end"] = os.getloadavg()
    finally:
        servers.close()
    (out / "planning.json").write_text(json.dumps(results, indent=2))
    (out / "planning.txt").write_text(render(results))
    return results


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def render(results: dict[str, Any]) -> str:
    """The tables: producer time and memory, end to end, and the recommendation."""
    lines = [
        f"planning benchmark, {results['started']}, {results['cpus']} CPUs, load "
        f"{results['load_average_start'][0]:.1f}, chunk size {results['chunk_size']}, "
        f"median of {results['repeats']} fresh producer processes",
        "",
        f"{'backend':<15} {'followers':>10} {'chunks':>7} {'inline ms':>10} "
        f"{'backgr. ms':>10} {'inline MB':>10} {'backgr. MB':>10}",
    ]
    for label, points in results["producer"].items():
        by = {(p["mode"], p["followers"]): p for p in points}
        for count in results["followers"]:
            inline, background = by.get(("inline", count)), by.get(("background", count))
            if inline is None or background is None:
                continue
            lines.append(
                f"{label:<15} {count:>10,} {inline['chunks']:>7,} {_ms(inline['seconds']):>10} "
                f"{_ms(background['seconds']):>10} {inline['rss_peak_mb']:>10.1f} "
                f"{background['rss_peak_mb']:>10.1f}"
            )
    lines += [
        "",
        f"{'backend':<15} {'mode':<11} {'followers':>10} {'add ms':>9} {'e2e s':>7} "
        f"{'add/e2e':>8} {'planned s':>9} {'prod MB':>8} {'workers MB':>10} target",
    ]
    for label, rows in results["end_to_end"].items():
        for row in rows:
            planned = row["planning_done_s"]
            lines.append(
                f"{label:<15} {row['mode']:<11} {row['followers']:>10,} "
                f"{_ms(row['add_user_activity_s']):>9} {row['end_to_end_s']:>7.1f} "
                f"{row['fraction']:>8.3%} {'-' if planned is None else f'{planned:.1f}':>9} "
                f"{row['producer_rss_peak_mb']:>8.1f} {row['workers_rss_peak_mb']:>10.1f} "
                f"{('met' if row['meets_targets'] else 'MISSED') if row['mode'] == 'background' else ''}"
            )
    advice = results.get("recommendation")
    if advice:
        lines += [
            "",
            f"inline planning reaches {advice['budget_ms']:g} ms at: "
            + ", ".join(
                f"{k} {'?' if v is None else f'{v:,}'} followers"
                for k, v in advice["crossing_followers"].items()
            ),
            f"recommended: planning = {advice['planning']!r}, planning_threshold = "
            f"{advice['planning_threshold']}",
        ]
    for label, error in results["errors"].items():
        lines.append(f"ERROR {label}: {error}")
    for skipped in results["skipped"]:
        lines.append(f"skipped {skipped['name']}: {skipped['reason']}")
    return "\n".join(lines)


def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.planning``; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.planning", description=__doc__)
    parser.add_argument("--producer", metavar="USER", help=argparse.SUPPRESS)
    parser.add_argument("--backend", action="append", help="e.g. celery-redis; repeatable")
    parser.add_argument(
        "--followers", type=_counts, default=DEFAULT_FOLLOWERS, help="e.g. 1000,10000,100000"
    )
    parser.add_argument(
        "--end-to-end", type=int, default=1_000_000, help="followers of the timed fanout (0: none)"
    )
    parser.add_argument(
        "--background-only", action="store_true", help="time only background end to end"
    )
    parser.add_argument("--repeats", type=int, default=3, help="producer runs per point")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
    parser.add_argument("--budget-ms", type=float, default=50.0, help="inline time allowed")
    parser.add_argument("--redis-url", help="Redis for feeds (default: claim an empty database)")
    parser.add_argument("--broker-url", action="append", default=[], help="redis:// or amqp://")
    parser.add_argument("--quick", action="store_true", help="1,000 to 100,000; 100,000 timed")
    parser.add_argument("--out", type=Path, help="where planning.json and planning.txt go")
    args = parser.parse_args(argv)
    if args.producer:
        return _producer_main(args.producer)
    followers, end_to_end = args.followers, args.end_to_end
    if args.quick:
        followers, end_to_end = (1_000, 10_000, 100_000), 100_000
    results = run(
        backends=args.backend,
        followers=followers,
        end_to_end=end_to_end or None,
        end_to_end_modes=("background",) if args.background_only else ("background", "inline"),
        repeats=args.repeats,
        concurrency=args.concurrency,
        budget_ms=args.budget_ms,
        redis_url=args.redis_url,
        broker_urls=args.broker_url,
        out=args.out,
    )
    print(render(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
