"""From the sweep to a ``fanout_chunk_size`` per backend, and the issue's targets checked.

The rule, per backend:

1. **Throughput plateau**: keep the chunk sizes whose feed writes/s is at
   least 90% of the best measured; past the plateau, bigger tasks buy nothing.
2. **Task duration against the time limit**: one task holds a worker slot
   for about ``concurrency x end-to-end / tasks`` seconds; keep sizes where
   twenty times that still fits in ``min(chunk_time_limit,
   redelivery_timeout)``, so a slow Redis or a busy worker does not make
   chunks time out or be delivered twice.
3. **Priority**: a HIGH chunk sent while the workers are busy with LOW ones
   waits for the LOW chunk its slot is running and, with a prefetch of one,
   at most the LOW chunk the worker already reserved (Celery on RabbitMQ
   runs reserved HIGH chunks first); to keep a HIGH fanout under a
   backlog within twice its idle time, keep sizes whose task duration is at
   most half the idle HIGH fanout time measured in the sweep.
4. If no plateau size passes 2 and 3, the fastest size that does (the
   throughput given up is stated).
5. **First follower**: of those, take the one whose first follower is served
   soonest; within 20% of that, the smallest chunk size, since smaller tasks
   retry cheaper and let HIGH tasks overtake LOW ones sooner.

6. **Priority, measured**: rule 3 is a model. The priority step then times a
   HIGH fanout behind a LOW backlog at the recommended size; while it takes
   more than :data:`PRIORITY_BOUND` times its idle time, the next smaller
   swept size (not below Stream Framework's 100) is measured and recommended
   instead (:func:`verify_priority`).

The reasons also give a fitted cost model: worker time per task as a fixed
part plus a part per follower, which says from which size the per-task
overhead of the queue stops mattering.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.run import STREAM_FRAMEWORK_CHUNK_SIZE

__all__ = [
    "add_ratios",
    "baseline_rates",
    "check_targets",
    "cost_model",
    "recommend",
    "shared_ratio",
    "verify_priority",
]

PLATEAU = 0.90
TIME_LIMIT_MARGIN = 20
LATENCY_TIE = 1.20
PRIORITY_SHARE = 0.5
"""Fraction of the idle HIGH fanout time one LOW chunk may hold a worker (rule 3)."""
PRIORITY_BOUND = 2.0
"""Most a HIGH fanout behind a LOW backlog may take, in multiples of its idle time (rule 6)."""


def baseline_rates(baselines: dict[str, Any]) -> dict[str, float]:
    """Writes/s of each baseline measured: ``pipeline``, ``script``, ``stream_framework``."""
    rates: dict[str, float] = {}
    raw = baselines.get("raw") or {}
    for name, key in (("pipeline", "redis_pipeline"), ("script", "redis_script")):
        value = (raw.get(key) or {}).get("writes_per_s")
        if value:
            rates[name] = float(value)
    peer = baselines.get("stream_framework") or {}
    if peer.get("status") == "ok" and peer.get("writes_per_s"):
        rates["stream_framework"] = float(peer["writes_per_s"])
    return rates


def add_ratios(sweeps: list[dict[str, Any]], baselines: dict[str, Any]) -> None:
    """Quote every sweep point's writes/s as a ratio to each baseline (``vs_<name>``)."""
    rates = baseline_rates(baselines)
    for sweep in sweeps:
        for point in sweep.get("points", []):
            wps = point.get("writes_per_s")
            for name, rate in rates.items():
                point[f"vs_{name}"] = round(wps / rate, 2) if wps else None


def _task_seconds(point: dict[str, Any], concurrency: int) -> float:
    return float(concurrency * point["end_to_end_s"] / max(point["chunks"], 1))


def cost_model(points: list[dict[str, Any]], concurrency: int) -> tuple[float, float] | None:
    """Worker time per task as ``fixed + per_follower x chunk_size`` (seconds), fitted.

    A least-squares fit of the measured slot time per task against the chunk
    size, weighted so every point counts by its relative error (small chunks
    are not drowned by big ones). ``None`` with fewer than two sizes.
    """
    data = [(float(p["chunk_size"]), _task_seconds(p, concurrency)) for p in points]
    if len({x for x, _ in data}) < 2:
        return None
    weights = [1.0 / (y * y) for _, y in data]
    sw = sum(weights)
    sx = sum(w * x for w, (x, _) in zip(weights, data, strict=True))
    sy = sum(w * y for w, (_, y) in zip(weights, data, strict=True))
    sxx = sum(w * x * x for w, (x, _) in zip(weights, data, strict=True))
    sxy = sum(w * x * y for w, (x, y) in zip(weights, data, strict=True))
    determinant = sw * sxx - sx * sx
    if determinant == 0:
        return None
    per_follower = (sw * sxy - sx * sy) / determinant
    fixed = (sy - per_follower * sx) / sw
    return max(fixed, 0.0), max(per_follower, 0.0)


def _pick(
    points: list[dict[str, Any]],
    plateau: list[dict[str, Any]],
    fits: Any,
    reasons: list[str],
) -> list[dict[str, Any]]:
    """The candidates: plateau sizes that fit every bound, else the fastest size that does."""
    candidates = [p for p in plateau if fits(p)]
    if candidates:
        return candidates
    eligible = [p for p in points if fits(p)]
    if eligible:
        fastest = max(eligible, key=lambda p: p["writes_per_s"])
        best = max(p["writes_per_s"] for p in points)
        reasons.append(
            f"no plateau size fits the bounds below; the fastest that does is "
            f"{fastest['chunk_size']}, at {fastest['writes_per_s'] / best:.0%} of the best"
        )
        return [fastest]
    smallest = min(points, key=lambda p: p["chunk_size"])
    reasons.append("no chunk size fits the bounds below; taking the smallest measured")
    return [smallest]


def recommend(sweep: dict[str, Any]) -> dict[str, Any]:
    """The recommended chunk size of one backend's sweep, with the reasons."""
    points = [p for p in sweep.get("points", []) if p.get("ok") and p.get("writes_per_s")]
    if not points:
        return {
            "chunk_size": None,
            "reasons": ["no chunk size completed correctly; see the errors in the sweep"],
        }
    concurrency = int(sweep.get("concurrency", 2))
    limit = min(sweep["chunk_time_limit"], sweep["redelivery_timeout"])
    idle = sweep.get("high_idle_s")
    budget = idle * PRIORITY_SHARE if idle is not None else None
    best = max(points, key=lambda p: p["writes_per_s"])
    plateau = [p for p in points if p["writes_per_s"] >= PLATEAU * best["writes_per_s"]]
    reasons = [
        f"throughput: best {best['writes_per_s']:,.0f} writes/s at chunk size "
        f"{best['chunk_size']}; within {PLATEAU:.0%} of it: "
        + ", ".join(str(p["chunk_size"]) for p in plateau)
    ]
    model = cost_model(points, concurrency)
    if model is not None and model[1] > 0:
        fixed, per_follower = model
        reasons.append(
            f"cost: a task holds a worker for about {fixed * 1000:.1f} ms + "
            f"{per_follower * 1e6:.1f} us per follower (fitted), so the per-task part is "
            f"under 10% from about {9 * fixed / per_follower:,.0f} followers per chunk"
        )

    def fits(point: dict[str, Any]) -> bool:
        seconds = _task_seconds(point, concurrency)
        within_limit = seconds * TIME_LIMIT_MARGIN <= limit
        return within_limit and (budget is None or seconds <= budget)

    candidates = _pick(points, plateau, fits, reasons)
    with_latency = [p for p in candidates if p.get("first_follower_s") is not None]
    if with_latency:
        soonest = min(p["first_follower_s"] for p in with_latency)
        close = [p for p in with_latency if p["first_follower_s"] <= soonest * LATENCY_TIE + 0.005]
        choice = min(close, key=lambda p: p["chunk_size"])
    else:
        choice = min(candidates, key=lambda p: p["chunk_size"])
    task_s = _task_seconds(choice, concurrency)
    reasons.append(
        f"time limit: a chunk of {choice['chunk_size']} holds a worker for about "
        f"{task_s * 1000:.1f} ms, {limit / task_s:,.0f}x under min(chunk_time_limit="
        f"{sweep['chunk_time_limit']} s, redelivery_timeout={sweep['redelivery_timeout']} s)"
    )
    if budget is not None and idle is not None:
        too_long = [str(p["chunk_size"]) for p in points if _task_seconds(p, concurrency) > budget]
        reasons.append(
            f"priority: a HIGH chunk sent behind LOW work waits for the LOW chunk its slot runs "
            f"and at most one reserved; a HIGH fanout of {sweep.get('high_followers', 0):,} followers "
            f"takes {idle * 1000:.0f} ms on idle queues, so a chunk should hold a worker at most "
            f"{budget * 1000:.0f} ms" + (f" (too long: {', '.join(too_long)})" if too_long else "")
        )
    latencies = ", ".join(
        f"{p['chunk_size']}: {p['first_follower_s'] * 1000:.0f} ms"
        for p in points
        if p.get("first_follower_s") is not None
    )
    reasons.append(f"first follower served after (by chunk size) {latencies}")
    return {
        "chunk_size": choice["chunk_size"],
        "writes_per_s": choice["writes_per_s"],
        "end_to_end_s": choice["end_to_end_s"],
        "first_follower_s": choice.get("first_follower_s"),
        "task_seconds": round(task_s, 4),
        "plateau": [p["chunk_size"] for p in plateau],
        "cost_model": (
            {"fixed_ms": round(model[0] * 1000, 2), "per_follower_us": round(model[1] * 1e6, 2)}
            if model
            else None
        ),
        "reasons": reasons,
    }


def _layout(section: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The part of a priority section run with worker layout ``name``, if it was run."""
    layouts = (section or {}).get("layouts", [])
    return next((layout for layout in layouts if layout.get("layout") == name), None)


def _shared_layout(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """The default worker layout's part of a priority section, if it was run."""
    return _layout(section, "shared")


def _ratio(section: dict[str, Any], name: str) -> float | None:
    value = (_layout(section, name) or {}).get("loaded_over_idle")
    return float(value) if value is not None else None


def shared_ratio(section: dict[str, Any]) -> float | None:
    """Loaded over idle time of the default worker layout in one priority section."""
    return _ratio(section, "shared")


def dedicated_ratio(section: dict[str, Any]) -> float | None:
    """Loaded over idle time of the dedicated-HIGH-worker layout in one priority section."""
    return _ratio(section, "dedicated")


def _smaller_size(sweep: dict[str, Any], chunk_size: int) -> dict[str, Any] | None:
    points = [
        p
        for p in sweep.get("points", [])
        if p.get("ok")
        and p.get("writes_per_s")
        and STREAM_FRAMEWORK_CHUNK_SIZE <= p["chunk_size"] < chunk_size
    ]
    return max(points, key=lambda p: p["chunk_size"]) if points else None


def verify_priority(
    recommendation: dict[str, Any],
    sweep: dict[str, Any],
    measure: Callable[[int], dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Rule 6: measure priority at the recommended size, stepping down while it is too slow.

    ``measure(chunk_size)`` runs the priority step and returns its section.
    Returns the recommendation (moved to a smaller size if need be, with the
    reason) and every section measured, in order.
    """
    size = recommendation.get("chunk_size")
    if size is None:
        return recommendation, []
    sections: list[dict[str, Any]] = []
    concurrency = int(sweep.get("concurrency", 2))
    current = dict(recommendation)
    reasons = list(recommendation.get("reasons", []))
    while True:
        section = measure(size)
        sections.append(section)
        ratio = shared_ratio(section)
        if ratio is None:
            reasons.append(f"priority not measured at {size}: {_section_error(section)}")
            break
        smaller = _smaller_size(sweep, size)
        if ratio <= PRIORITY_BOUND or smaller is None:
            verdict = "within" if ratio <= PRIORITY_BOUND else "over, and no smaller size is left"
            reasons.append(
                f"priority, measured: behind a LOW backlog a HIGH fanout took {ratio:.2f}x its "
                f"idle time at {size} ({verdict} the {PRIORITY_BOUND:g}x bound)"
            )
            break
        reasons.append(
            f"priority, measured: behind a LOW backlog a HIGH fanout took {ratio:.2f}x its idle "
            f"time at {size}, over the {PRIORITY_BOUND:g}x bound; stepping down to "
            f"{smaller['chunk_size']}"
        )
        size = smaller["chunk_size"]
        _move_to(current, smaller, concurrency)
    _prefer_dedicated(current, reasons, sweep, sections, concurrency)
    current["reasons"] = reasons
    return current, sections


def _move_to(current: dict[str, Any], point: dict[str, Any], concurrency: int) -> None:
    """Make ``current`` recommend the sweep ``point``'s chunk size, with its figures."""
    current.update(
        chunk_size=point["chunk_size"],
        writes_per_s=point["writes_per_s"],
        end_to_end_s=point["end_to_end_s"],
        first_follower_s=point.get("first_follower_s"),
        task_seconds=round(_task_seconds(point, concurrency), 4),
    )


def _prefer_dedicated(
    current: dict[str, Any],
    reasons: list[str],
    sweep: dict[str, Any],
    sections: list[dict[str, Any]],
    concurrency: int,
) -> None:
    """Where one worker for both queues misses the bound at every size, judge a dedicated one.

    Stepping down cannot help a broker that hands a worker of both queues
    LOW tasks ahead of waiting HIGH ones (Celery on RabbitMQ): the largest
    size measured whose HIGH fanouts keep the bound with a dedicated HIGH
    worker is recommended for that layout instead, and the reason says so.
    """
    ratios = [shared_ratio(s) for s in sections]
    if not ratios or any(r is None or r <= PRIORITY_BOUND for r in ratios):
        return
    points = {p["chunk_size"]: p for p in sweep.get("points", []) if p.get("ok")}
    for section in sections:  # largest first, as measured
        ratio = dedicated_ratio(section)
        point = points.get(section["chunk_size"])
        if ratio is not None and ratio <= PRIORITY_BOUND and point is not None:
            _move_to(current, point, concurrency)
            current["layout"] = "dedicated"
            reasons.append(
                f"priority, measured: no size tried keeps HIGH fanouts within the "
                f"{PRIORITY_BOUND:g}x bound with one worker serving both queues; with a "
                f"dedicated HIGH worker (`feedfan worker --priority high` beside "
                f"`--priority low`) {section['chunk_size']} did ({ratio:.2f}x): recommended "
                "with that layout"
            )
            return


def _section_error(section: dict[str, Any]) -> str:
    """The first error of a priority section, or a placeholder."""
    for layout in section.get("layouts", []):
        if layout.get("error"):
            return str(layout["error"])
    return "no shared layout measured"


def _target(
    name: str,
    measured: float | None,
    required: float,
    *,
    higher: bool,
    note: str = "",
    judged: bool = True,
) -> dict[str, Any]:
    """One target, met or missed (by how much); ``met`` is ``None`` if unmeasured or not judged."""
    if measured is None or not judged:
        shown = None if measured is None else round(measured, 4)
        return {"target": name, "measured": shown, "required": required, "met": None, "note": note}
    met = measured >= required if higher else measured <= required
    if met:
        gap = ""
    elif higher:
        gap = f"missed: {measured / required:.0%} of the target ({required / measured:.2f}x short)"
    else:
        gap = f"missed: {measured / required:.2f}x the allowed value"
    return {
        "target": name,
        "measured": round(measured, 4),
        "required": required,
        "met": met,
        "note": "; ".join(x for x in (gap, note) if x),
    }


def check_targets(
    sweep: dict[str, Any],
    recommendation: dict[str, Any],
    baselines: dict[str, Any],
    priority: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """The issue's targets for one backend, each met, missed (by how much) or not measured."""
    rates = baseline_rates(baselines)
    points = {p["chunk_size"]: p for p in sweep.get("points", []) if p.get("ok")}
    chosen = points.get(recommendation.get("chunk_size"))
    wps = chosen["writes_per_s"] if chosen else None
    sf = rates.get("stream_framework")
    no_sf = "" if sf else "no Stream Framework baseline in this run"
    at_sf_default = points.get(STREAM_FRAMEWORK_CHUNK_SIZE)
    followers = sweep.get("followers")
    targets = [
        _target(
            ">= 20x Stream Framework writes/s at the recommended chunk size",
            wps / sf if wps and sf else None,
            20.0,
            higher=True,
            note=no_sf,
        ),
        _target(
            ">= 1.5x the raw single-client pipeline at the recommended chunk size",
            wps / rates["pipeline"] if wps and "pipeline" in rates else None,
            1.5,
            higher=True,
        ),
        _target(
            ">= 8x Stream Framework writes/s at chunk size 100",
            at_sf_default["writes_per_s"] / sf if at_sf_default and sf else None,
            8.0,
            higher=True,
            note=no_sf or ("" if at_sf_default else "chunk size 100 not in the sweep"),
        ),
    ]
    if chosen and chosen.get("producer_s") is not None:
        share = chosen["producer_s"] / chosen["end_to_end_s"]
        inline = sweep.get("planning") == "inline"
        if inline:
            # The sweep plans inline to time chunks alone; the target is for the default
            # (auto: background from planning_threshold on), which a full run does not use.
            note = (
                f"not judged: this sweep planned inline ({share:.1%} at {followers:,} "
                "followers); the target is for background planning at 1,000,000 followers: "
                "python -m benchmarks.planning"
            )
        else:
            note = f"{sweep.get('planning') or 'configured'} planning, {followers:,} followers"
        targets.append(
            _target(
                "add_user_activity < 1% of end-to-end time",
                share,
                0.01,
                higher=False,
                note=note,
                judged=not inline,
            )
        )
    peaks = [p["memory"].get("producer_rss_peak_mb") for p in points.values() if p.get("memory")]
    peaks = [p for p in peaks if p is not None]
    targets.append(
        _target(
            "producer peak RSS < 150 MB",
            max(peaks) if peaks else None,
            150.0,
            higher=False,
            note=f"the benchmark process itself, at {followers:,} followers",
        )
    )
    shared = _shared_layout(priority)
    targets.append(
        _target(
            "HIGH fanout under a LOW backlog <= 2x its idle time (default worker command)",
            shared_ratio(priority) if priority else None,
            PRIORITY_BOUND,
            higher=False,
            note="" if shared else "priority step not run",
        )
    )
    return targets
