"""Baselines measured in the same run: this Redis's raw limits and Stream Framework.

The raw limits are one client writing the same N follower feeds feedfan's
fanout writes (ZADD of one activity, then a trim to the feed's length), in
batches of ``batch`` feeds per round trip: with a pipeline, and with one
server-side Lua script per batch. Stream Framework 1.4.0 is run by
``benchmarks/peers/stream_framework.py`` (``run_baseline``) when that module
is there; if it is missing or fails, the reason is recorded and the run goes on.
"""

from __future__ import annotations

import importlib
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import redis

from feedfan._progress import Progress

__all__ = ["ACTIVITY_ID", "SORT_KEY", "feed_keys", "run_peer", "run_raw_limits"]

SORT_KEY = 1_764_000_000_000_000
ACTIVITY_ID = f"{SORT_KEY:016d}0123456789"
"""An activity id shaped like feedfan's (sort key, then a digest)."""

FEED_LENGTH = 1000
"""TimelineFeed.max_length: the trim every write does."""

_RAW_SCRIPT = """
local member, score, keep = ARGV[1], ARGV[2], -(tonumber(ARGV[3]) + 1)
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], score, member)
  redis.call('ZREMRANGEBYRANK', KEYS[i], 0, keep)
end
return #KEYS
"""


def feed_keys(prefix: str, start: int, stop: int) -> list[str]:
    """The feed keys of followers ``start … stop-1``, named as feedfan names them."""
    return [f"{prefix}feed:timeline:{i}" for i in range(start, stop)]


def _batches(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _delete(client: redis.Redis, prefix: str, total: int) -> None:
    for start, stop in _batches(total, 5_000):
        client.unlink(*feed_keys(prefix, start, stop))


def _pipeline_pass(client: redis.Redis, prefix: str, followers: int, batch: int) -> None:
    for start, stop in _batches(followers, batch):
        pipe = client.pipeline(transaction=False)
        for key in feed_keys(prefix, start, stop):
            pipe.zadd(key, {ACTIVITY_ID: SORT_KEY})
            pipe.zremrangebyrank(key, 0, -(FEED_LENGTH + 1))
        pipe.execute()


def _script_pass(client: redis.Redis, prefix: str, followers: int, batch: int) -> None:
    script = client.register_script(_RAW_SCRIPT)
    for start, stop in _batches(followers, batch):
        script(keys=feed_keys(prefix, start, stop), args=[ACTIVITY_ID, SORT_KEY, FEED_LENGTH])


def _check(client: redis.Redis, prefix: str, followers: int) -> bool:
    pipe = client.pipeline(transaction=False)
    probes = sorted({0, followers // 2, followers - 1})
    for i in probes:
        pipe.zscore(f"{prefix}feed:timeline:{i}", ACTIVITY_ID)
    return all(score is not None for score in pipe.execute())


def _measure(
    write: Callable[[redis.Redis, str, int, int], None],
    client: redis.Redis,
    *,
    prefix: str,
    followers: int,
    batch: int,
    repeats: int,
    bar: Progress,
) -> dict[str, Any]:
    rates = []
    correct = True
    for _ in range(repeats):
        started = time.perf_counter()
        write(client, prefix, followers, batch)
        elapsed = time.perf_counter() - started
        correct = correct and _check(client, prefix, followers)
        _delete(client, prefix, followers)
        rates.append(followers / elapsed)
        bar.advance()
    return {
        "writes_per_s": round(statistics.median(rates)),
        "writes_per_s_all": [round(r) for r in rates],
        "feeds_per_round_trip": batch,
        "verified": correct,
    }


def run_raw_limits(
    redis_url: str, *, followers: int, batch: int, repeats: int, prefix: str
) -> dict[str, Any]:
    """One client writing ``followers`` feeds: pipelined, and by a server-side script."""
    client = redis.Redis.from_url(redis_url)
    try:
        with Progress("redis raw limits", total=2 * repeats) as bar:
            pipeline = _measure(
                _pipeline_pass,
                client,
                prefix=prefix,
                followers=followers,
                batch=batch,
                repeats=repeats,
                bar=bar,
            )
            script = _measure(
                _script_pass,
                client,
                prefix=prefix,
                followers=followers,
                batch=batch,
                repeats=repeats,
                bar=bar,
            )
        info = client.info("server")
        return {
            "followers": followers,
            "redis_version": info.get("redis_version"),
            "redis_pipeline": pipeline,
            "redis_script": script,
        }
    finally:
        _delete(client, prefix, followers)
        client.close()


def _rate_from(result: dict[str, Any]) -> float | None:
    for key in ("writes_per_s", "writes_per_second", "feed_writes_per_s", "writes_s"):
        if isinstance(result.get(key), (int, float)):
            return float(result[key])
    for key, value in result.items():
        if (
            "writes" in key
            and ("per_s" in key or key.endswith("_s"))
            and isinstance(value, (int, float))
        ):
            return float(value)
    return None


def _seconds_from(result: dict[str, Any]) -> float | None:
    for key in ("end_to_end_s", "end_to_end_seconds", "seconds", "elapsed_s"):
        if isinstance(result.get(key), (int, float)):
            return float(result[key])
    return None


def peer_summary(runs: list[dict[str, Any]], *, followers: int) -> dict[str, Any]:
    """The Stream Framework baseline from its runs: the median one counts, as for a sweep point.

    With an even count the faster of the middle two counts: it divides
    every x-Stream-Framework ratio, which a slow run would flatter. A run
    that names no rate fails the whole baseline: fewer runs than asked for
    would not be a median.
    """
    rates = []
    for number, result in enumerate(runs, 1):
        rate = _rate_from(result)
        if not rate:
            return {
                "status": "failed",
                "error": f"run {number} of {len(runs)}: run_baseline's result names no writes/s",
                "runs": runs,
            }
        rates.append(rate)
    middle = sorted(range(len(runs)), key=rates.__getitem__)[len(runs) // 2]
    return {
        "status": "ok",
        "error": None,
        "followers": followers,
        "writes_per_s": rates[middle],
        "writes_per_s_all": [round(rate) for rate in rates],
        "end_to_end_s": _seconds_from(runs[middle]),
        "result": runs[middle],
    }


def run_peer(
    *, followers: int, redis_url: str, broker_url: str, workers: int, repeats: int = 1
) -> dict[str, Any]:
    """Stream Framework 1.4.0 fanning out to ``followers`` with a real Celery worker, ``repeats`` times."""
    name = "benchmarks.peers.stream_framework"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name in ("benchmarks.peers", name):
            return {"status": "absent", "reason": "benchmarks/peers/stream_framework.py is absent"}
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    except Exception as e:
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    runs: list[dict[str, Any]] = []
    with Progress("Stream Framework 1.4.0", total=repeats) as bar:
        for number in range(1, repeats + 1):
            started = time.perf_counter()
            try:
                result = module.run_baseline(
                    followers=followers, redis_url=redis_url, broker_url=broker_url, workers=workers
                )
            except Exception as e:
                return {
                    "status": "failed",
                    "error": f"run {number} of {repeats}: {type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(limit=8)[-4000:],
                    "seconds": round(time.perf_counter() - started, 1),
                    "runs": runs,
                }
            if not isinstance(result, dict):
                return {
                    "status": "failed",
                    "error": f"run {number} of {repeats}: run_baseline returned "
                    f"{type(result).__name__}",
                    "runs": runs,
                }
            runs.append(result)
            bar.advance()
    return peer_summary(runs, followers=followers)
