"""feedfan's own RedisStorage write modes, one client: ``script`` against ``pipeline``.

Each chunk of followers is one ``RedisStorage.apply(WriteBatch)``, as a worker
writes it (the chunk's completion marker included), so this is the storage
cost of a chunk without any queue. The core's default ``write_mode`` is
chosen from this comparison.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import redis

from benchmarks.baselines import ACTIVITY_ID, FEED_LENGTH, SORT_KEY, feed_keys
from feedfan._progress import Progress
from feedfan.storage.base import WriteBatch
from feedfan.storage.redis import RedisStorage

__all__ = ["run_write_modes"]

_MODES = ("script", "pipeline")


def _one_pass(storage: RedisStorage, followers: int, chunk_size: int) -> float:
    prefix = storage.key_prefix
    entries = [(ACTIVITY_ID, SORT_KEY)]
    started = time.perf_counter()
    for index, start in enumerate(range(0, followers, chunk_size)):
        stop = min(start + chunk_size, followers)
        targets = [(key, FEED_LENGTH) for key in feed_keys(prefix, start, stop)]
        storage.apply(WriteBatch("add", targets, entries, chunk=("0" * 24, f"high:{index}")))
    return time.perf_counter() - started


def run_write_modes(
    redis_url: str, *, followers: int, chunk_sizes: tuple[int, ...], repeats: int, prefix: str
) -> dict[str, Any]:
    """Writes/s of each mode per chunk size, and which is faster by how much."""
    client = redis.Redis.from_url(redis_url)
    stores = {
        mode: RedisStorage(key_prefix=prefix, write_mode=mode, client=client)  # type: ignore[arg-type]
        for mode in _MODES
    }
    points = []
    try:
        with Progress("write modes", total=len(chunk_sizes) * repeats * 2) as bar:
            for chunk_size in chunk_sizes:
                rates: dict[str, list[float]] = {mode: [] for mode in _MODES}
                for repeat in range(repeats):
                    # Alternate which mode goes first, so drift on a busy machine evens out.
                    order = _MODES if repeat % 2 == 0 else tuple(reversed(_MODES))
                    for mode in order:
                        elapsed = _one_pass(stores[mode], followers, chunk_size)
                        rates[mode].append(followers / elapsed)
                        stores[mode].clear()
                        bar.advance()
                script = statistics.median(rates["script"])
                pipeline = statistics.median(rates["pipeline"])
                points.append(
                    {
                        "chunk_size": chunk_size,
                        "script_writes_per_s": round(script),
                        "pipeline_writes_per_s": round(pipeline),
                        "script_over_pipeline": round(script / pipeline, 2),
                    }
                )
    finally:
        stores["script"].clear()
        client.close()
    ratios = [p["script_over_pipeline"] for p in points]
    faster = "script" if statistics.median(ratios) >= 1 else "pipeline"
    return {
        "followers": followers,
        "points": points,
        "faster": faster,
        "median_script_over_pipeline": round(statistics.median(ratios), 2),
        "summary": (
            f"'{faster}' is faster: script/pipeline writes/s ratio from {min(ratios):.2f} "
            f"to {max(ratios):.2f} (median {statistics.median(ratios):.2f}) over chunk sizes "
            f"{chunk_sizes[0]}-{chunk_sizes[-1]}"
        ),
    }
