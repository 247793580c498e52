"""The benchmark suite in its smoke mode, end to end, on every backend that exists here.

``python -m benchmarks all --smoke`` runs as a user runs it, with real worker
processes; the test checks the outputs are there and well-formed (JSON keys,
the PNG, a recommendation per backend), never how fast anything was. The
recommendation rule itself is checked on made-up sweeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.backend import parse_backend_name
from benchmarks.baselines import peer_summary
from benchmarks.fanout import _Watcher
from benchmarks.recommend import check_targets, cost_model, recommend, verify_priority
from benchmarks.report import _recommendations_text, _targets_text
from benchmarks.run import plan_for
from feedfan.dispatch import resolve_dispatcher_class
from feedfan.storage.redis import RedisStorage
from feedfan.testing.plugin import in_ci

REPOSITORY = Path(__file__).resolve().parent.parent

BACKENDS = ["local", "celery-redis", "celery-amqp", "rq-redis", "dramatiq-redis", "dramatiq-amqp"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _smoke(argv: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEEDFAN_")}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *argv, "--out", str(out)],
        cwd=REPOSITORY,
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _require_adapter(dispatcher: str) -> None:
    try:
        resolve_dispatcher_class(dispatcher)
    except Exception as e:
        if in_ci():
            pytest.fail(f"the {dispatcher!r} adapter does not import in CI: {e}")
        pytest.skip(f"the {dispatcher!r} adapter does not import here: {e}")


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_smoke_run_writes_tables_json_a_plot_and_a_recommendation(
    backend: str, feedfan_redis_url: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Given a backend whose adapter imports, and its servers
    dispatcher, broker = parse_backend_name(backend)
    _require_adapter(dispatcher)
    argv = ["all", "--smoke", "--backend", backend, "--redis-url", feedfan_redis_url]
    if broker == "amqp":
        argv += ["--broker-url", request.getfixturevalue("feedfan_amqp_url")]
    out = tmp_path / "results"

    # When the smoke benchmarks run as a user runs them
    completed = _smoke(argv, out)

    # Then every step ran correctly and every output is there and well-formed
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    sizes = list(plan_for("smoke").chunk_sizes)
    assert {"cpu_count", "cpu_model", "ram_gb", "date"} <= results["machine"].keys()
    assert results["errors"] == []
    assert results["baselines"]["raw"]["redis_pipeline"]["writes_per_s"] > 0
    assert results["baselines"]["raw"]["redis_script"]["verified"] is True
    assert [p["chunk_size"] for p in results["baselines"]["write_modes"]["points"]] == sizes
    [sweep] = results["sweep"]
    assert [p["chunk_size"] for p in sweep["points"]] == sizes
    assert all(p["ok"] and p["verified"] and p["missing_feeds"] == 0 for p in sweep["points"])
    assert all(p["writes_per_s"] > 0 and p["vs_pipeline"] > 0 for p in sweep["points"])
    recommendation = results["recommendations"][sweep["backend"]["label"]]
    assert recommendation["chunk_size"] in sizes
    assert len(recommendation["reasons"]) >= 3
    priority = results["priority"]
    assert priority[0]["chunk_size"] == recommendation["chunk_size"]
    assert 100 in {section["chunk_size"] for section in priority}
    layouts = [layout for section in priority for layout in section["layouts"]]
    assert all(layout["loaded_over_idle"] > 0 for layout in layouts)
    # (each HIGH fanout under the same backlog: topped up to it, not piled on the last one)
    smoke = plan_for("smoke")
    top = smoke.backlog_writes + smoke.backlog_fanout
    assert all(len(layout["loaded"]) == smoke.priority_repeats >= 2 for layout in layouts)
    queued = [entry["low_writes_queued_at_send"] for lay in layouts for entry in lay["loaded"]]
    assert all(smoke.backlog_writes <= writes <= top for writes in queued), queued
    [dispatch] = results["dispatch"]
    assert [p["tasks"] for p in dispatch["points"]] == list(plan_for("smoke").dispatch_counts)
    assert {t["target"] for t in results["targets"][sweep["backend"]["label"]]}
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
    assert sweep["backend"]["label"] in (out / "report.txt").read_text()


@pytest.mark.broker
def test_a_backend_that_does_not_exist_is_reported_with_the_reason(
    feedfan_redis_url: str, tmp_path: Path
) -> None:
    # Given a backend name no adapter answers to
    argv = ["dispatch", "--smoke", "--backend", "nosuchqueue", "--redis-url", feedfan_redis_url]

    # When the benchmarks are asked for it
    completed = _smoke(argv, tmp_path / "results")

    # Then the run fails, naming the backend and why, and still writes its results
    assert completed.returncode == 1
    assert "skipped nosuchqueue: does not import: unknown dispatcher 'nosuchqueue'" in (
        completed.stdout
    )
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["skipped"][0]["name"] == "nosuchqueue"


@pytest.mark.broker
def test_the_priority_step_alone_measures_the_chunk_sizes_asked_for(
    feedfan_redis_url: str, tmp_path: Path
) -> None:
    # Given the priority step alone, with chunk sizes named (no sweep to recommend one)
    argv = ["priority", "--smoke", "--backend", "local", "--redis-url", feedfan_redis_url]
    argv += ["--chunk-sizes", "20,50"]

    # When it runs
    completed = _smoke(argv, tmp_path / "results")

    # Then it measured each size asked for, and only those
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert [section["chunk_size"] for section in results["priority"]] == [20, 50]
    assert all(lay["loaded_over_idle"] > 0 for s in results["priority"] for lay in s["layouts"])


def _point(chunk: int, wps: float, first: float, *, e2e: float = 1.0) -> dict[str, Any]:
    return {
        "chunk_size": chunk,
        "ok": True,
        "writes_per_s": wps,
        "end_to_end_s": e2e,
        "chunks": max(1, 100_000 // chunk),
        "first_follower_s": first,
        "producer_s": 0.001,
        "memory": {"producer_rss_peak_mb": 60.0},
    }


def _sweep(*points: dict[str, Any], limit: int = 120) -> dict[str, Any]:
    return {
        "points": list(points),
        "concurrency": 2,
        "followers": 100_000,
        "chunk_time_limit": limit,
        "redelivery_timeout": 600,
    }


def test_the_recommendation_is_the_plateau_size_whose_first_follower_comes_soonest() -> None:
    # Given a sweep whose throughput plateaus from 250 on
    sweep = _sweep(
        _point(10, 50_000, 0.30),
        _point(100, 150_000, 0.05),
        _point(250, 190_000, 0.02),
        _point(1000, 200_000, 0.021),
        _point(5000, 195_000, 0.09),
    )

    # When a chunk size is recommended
    recommendation = recommend(sweep)

    # Then it is the smallest plateau size among those whose first follower comes soonest
    assert recommendation["plateau"] == [250, 1000, 5000]
    assert recommendation["chunk_size"] == 250


def test_a_chunk_size_too_slow_for_the_time_limit_is_not_recommended() -> None:
    # Given a sweep where only huge chunks are fast, and one chunk takes 2 s of a 10 s limit
    sweep = _sweep(
        _point(100, 100_000, 0.05, e2e=10.0), _point(5000, 200_000, 0.01, e2e=10.0), limit=10
    )
    sweep["points"][1]["chunks"] = 10

    # When a chunk size is recommended
    recommendation = recommend(sweep)

    # Then the size that fits twenty times in the limit is chosen, and the reasons say why
    assert recommendation["chunk_size"] == 100
    assert "the fastest that does is 100, at 50% of the best" in recommendation["reasons"][2]


def test_a_chunk_that_would_hold_up_high_fanouts_is_not_recommended() -> None:
    # Given a sweep where only big chunks are fast, but they hold a worker for 100 ms,
    # and a HIGH fanout takes 30 ms on idle queues (so a chunk may hold a worker 15 ms)
    sweep = _sweep(
        _point(100, 100_000, 0.05, e2e=5.0),
        _point(1000, 150_000, 0.05, e2e=0.5),
        _point(5000, 200_000, 0.05, e2e=1.0),
    )
    sweep["high_idle_s"] = 0.030
    sweep["high_followers"] = 1000

    # When a chunk size is recommended
    recommendation = recommend(sweep)

    # Then the fastest size whose chunks take under 15 ms is chosen, and the reasons say why
    assert recommendation["chunk_size"] == 1000
    assert "too long: 5000" in " ".join(recommendation["reasons"])


def _priority_section(
    chunk: int, ratio: float | None, dedicated: float | None = None
) -> dict[str, Any]:
    shared = {"layout": "shared", "loaded_over_idle": ratio}
    if ratio is None:
        shared["error"] = "TimeoutError: fanout not complete"
    return {
        "chunk_size": chunk,
        "layouts": [shared, {"layout": "dedicated", "loaded_over_idle": dedicated}],
    }


def test_a_size_whose_high_fanouts_wait_too_long_under_load_is_stepped_down() -> None:
    # Given a recommendation of 1000, and HIGH fanouts under a LOW backlog taking
    # 2.6x their idle time at 1000, 2.2x at 500 and 1.5x at 250
    sweep = _sweep(
        _point(50, 60_000, 0.05),
        _point(100, 100_000, 0.05),
        _point(250, 150_000, 0.05, e2e=0.66),
        _point(500, 170_000, 0.05, e2e=0.55),
        _point(1000, 200_000, 0.05, e2e=0.5),
    )
    recommendation = recommend(sweep)
    assert recommendation["chunk_size"] == 1000
    ratios = {1000: 2.6, 500: 2.2, 250: 1.5}
    measured: list[int] = []

    def measure(chunk: int) -> dict[str, Any]:
        measured.append(chunk)
        return _priority_section(chunk, ratios[chunk])

    # When priority is measured
    verified, sections = verify_priority(recommendation, sweep, measure)

    # Then sizes are measured from the recommended one down until HIGH keeps its bound
    assert measured == [1000, 500, 250] == [s["chunk_size"] for s in sections]
    assert verified["chunk_size"] == 250 and verified["writes_per_s"] == 150_000
    reasons = " ".join(verified["reasons"])
    assert "2.60x its idle time at 1000, over the 2x bound; stepping down to 500" in reasons
    assert "1.50x its idle time at 250 (within the 2x bound)" in reasons
    assert recommendation["chunk_size"] == 1000  # the sweep's own recommendation is kept apart


def test_stepping_down_stops_at_stream_frameworks_size_and_on_a_failed_measurement() -> None:
    sweep = _sweep(_point(50, 60_000, 0.05), _point(100, 100_000, 0.05), _point(250, 150_000, 0.05))
    recommendation = {"chunk_size": 250, "reasons": []}
    # Over the bound everywhere: 100 is the last size tried, and the reason says so
    verified, sections = verify_priority(
        recommendation, sweep, lambda chunk: _priority_section(chunk, 3.0)
    )
    assert [s["chunk_size"] for s in sections] == [250, 100]
    assert verified["chunk_size"] == 100
    assert "no smaller size is left" in verified["reasons"][-1]
    # A measurement that failed keeps the size and says why
    verified, sections = verify_priority(
        recommendation, sweep, lambda chunk: _priority_section(chunk, None)
    )
    assert verified["chunk_size"] == 250 and len(sections) == 1
    assert "TimeoutError" in verified["reasons"][-1]


def test_the_cost_model_recovers_a_fixed_and_a_per_follower_cost() -> None:
    # Given sweep points whose slot time is exactly 4 ms + 10 us per follower
    points = []
    for chunk in (10, 100, 1000, 5000):
        chunks = 100_000 // chunk
        slot = 0.004 + 10e-6 * chunk
        points.append({"chunk_size": chunk, "chunks": chunks, "end_to_end_s": slot * chunks / 2})

    # When the cost model is fitted
    model = cost_model(points, 2)

    # Then it finds both parts
    assert model is not None
    assert model[0] == pytest.approx(0.004)
    assert model[1] == pytest.approx(10e-6)


def test_a_missed_target_says_by_how_much() -> None:
    # Given a backend at 150,000 writes/s against a 120,000 writes/s pipeline baseline
    sweep = _sweep(_point(100, 150_000, 0.05))
    baselines = {"raw": {"redis_pipeline": {"writes_per_s": 120_000}}}

    # When the targets are checked
    targets = check_targets(sweep, recommend(sweep), baselines, None)

    # Then the pipeline target is missed by a stated factor, and unmeasured ones say so
    by_name = {t["target"]: t for t in targets}
    pipeline = by_name[">= 1.5x the raw single-client pipeline at the recommended chunk size"]
    assert pipeline["met"] is False
    assert pipeline["measured"] == 1.25
    assert "1.20x short" in pipeline["note"]
    stream = by_name[">= 20x Stream Framework writes/s at the recommended chunk size"]
    assert stream["met"] is None
    assert "no Stream Framework baseline" in stream["note"]


def test_when_no_size_keeps_the_bound_with_one_worker_a_dedicated_high_worker_decides() -> None:
    # Given HIGH fanouts over the bound at every size with one worker for both queues
    # (Celery on RabbitMQ), and within it at 250 and 100 with a dedicated HIGH worker
    sweep = _sweep(_point(50, 60_000, 0.05), _point(100, 100_000, 0.05), _point(250, 150_000, 0.05))
    recommendation = {"chunk_size": 250, "reasons": []}
    dedicated = {250: 1.3, 100: 1.2}

    def measure(chunk: int) -> dict[str, Any]:
        return _priority_section(chunk, 2.5, dedicated[chunk])

    # When priority is verified
    verified, sections = verify_priority(recommendation, sweep, measure)
    # Then the largest size the dedicated layout keeps within the bound is recommended,
    # for that layout, and the reasons say to run a dedicated HIGH worker
    assert [s["chunk_size"] for s in sections] == [250, 100]
    assert verified["chunk_size"] == 250 and verified["writes_per_s"] == 150_000
    assert verified["layout"] == "dedicated"
    assert "--priority high" in verified["reasons"][-1]
    assert "1.30x" in verified["reasons"][-1]
    # And where the dedicated layout misses too, the smallest size stays, for one worker
    verified, _ = verify_priority(
        recommendation, sweep, lambda chunk: _priority_section(chunk, 2.5, 2.4)
    )
    assert verified["chunk_size"] == 100 and verified.get("layout", "shared") == "shared"


def test_a_fanout_is_timed_from_a_watcher_already_connected_and_polling_from_its_start(
    feedfan_redis_url: str,
) -> None:
    # Given a watcher of a fanout that has not started, on a storage not yet connected
    storage = RedisStorage(url=feedfan_redis_url, key_prefix=f"w-{os.getpid()}:")
    watcher = _Watcher(storage, "a" * 24)
    try:
        # When it is started and reports ready
        watcher.start()
        assert watcher.ready.wait(10)

        # Then its connection is made before the clock starts, and it polls only once begun
        assert storage.client.connection_pool._created_connections == 1
        assert watcher.started is None and watcher.status is None
        storage.begin_fanout("a" * 24, {})
        storage.end_planning("a" * 24, 0)
        started = watcher.begin()
        assert watcher.settled.wait(10) and watcher.error is None
        assert watcher.settled_at is not None and watcher.settled_at >= started
    finally:
        watcher.stop()
        storage.clear()
        storage.close()


def test_stream_framework_counts_as_the_median_of_its_runs_like_every_sweep_point() -> None:
    # Given three runs of the peer, one of them slowed by a busy machine
    runs = [
        {"feed_writes_per_s": 9_000.0, "end_to_end_s": 11.1},
        {"feed_writes_per_s": 4_000.0, "end_to_end_s": 25.0},
        {"feed_writes_per_s": 10_000.0, "end_to_end_s": 10.0},
    ]

    # When they are summed up as the baseline
    peer = peer_summary(runs, followers=100_000)

    # Then the middle run counts, and every run's rate is kept beside it
    assert peer["status"] == "ok"
    assert peer["writes_per_s"] == 9_000.0
    assert peer["end_to_end_s"] == 11.1
    assert peer["writes_per_s_all"] == [9_000, 4_000, 10_000]
    assert peer["result"] is runs[0]


def test_a_failed_stream_framework_run_fails_the_baseline_rather_than_leaving_fewer_runs() -> None:
    # Given a run whose result names no rate
    runs = [{"feed_writes_per_s": 9_000.0}, {"end_to_end_s": 3.0}]

    # When they are summed up
    peer = peer_summary(runs, followers=100_000)

    # Then the baseline is failed, saying which run
    assert peer["status"] == "failed"
    assert "run 2 of 2" in peer["error"]


def _share_target(planning: str | None) -> dict[str, Any]:
    sweep = _sweep(_point(100, 150_000, 0.05, e2e=1.0))
    sweep["points"][0]["producer_s"] = 0.1
    if planning is not None:
        sweep["planning"] = planning
    targets = check_targets(sweep, recommend(sweep), {}, None)
    (share,) = [t for t in targets if t["target"].startswith("add_user_activity")]
    return share


def test_a_sweep_planned_inline_does_not_judge_the_add_user_activity_target() -> None:
    # Given a sweep that planned inline, its producer busy a tenth of the fanout
    # When the targets are checked
    share = _share_target("inline")

    # Then the share is shown but not judged: the target is for background planning
    assert share["met"] is None
    assert share["measured"] == pytest.approx(0.1)
    assert "inline" in share["note"]
    assert "python -m benchmarks.planning" in share["note"]


def test_a_sweep_planned_in_the_background_is_judged_on_the_add_user_activity_target() -> None:
    # Given the same share from a sweep planned by the workers
    # When the targets are checked
    share = _share_target("background")

    # Then it is missed, by how much
    assert share["met"] is False
    assert "10.00x the allowed value" in share["note"]


def test_the_report_prints_a_targets_note_whole() -> None:
    # Given a target whose note is longer than a terminal line
    note = "missed: 10.51x the allowed value; " + "a reason that goes on " * 6 + "to its end"
    results = {
        "targets": {"rq-redis": [{"target": "t", "measured": 1.0, "met": False, "note": note}]}
    }

    # When the targets table is rendered
    text = _targets_text(results)

    # Then none of the note is cut off
    assert "to its end" in text


def test_a_quick_run_has_a_size_between_100_and_500_to_step_down_to() -> None:
    # Given a quick run's sweep, recommending 500
    sizes = plan_for("quick").chunk_sizes
    sweep = _sweep(*[_point(c, min(c, 500) * 300.0, 0.05, e2e=100_000 / c / 300) for c in sizes])
    recommendation = {"chunk_size": 500, "reasons": []}

    # When HIGH fanouts wait too long at 500 but not below
    verified, _ = verify_priority(
        recommendation, sweep, lambda chunk: _priority_section(chunk, 2.2 if chunk >= 500 else 1.4)
    )

    # Then the quick run steps down to 250, not straight to Stream Framework's 100
    assert verified["chunk_size"] == 250


def test_a_quick_report_says_its_targets_are_judged_on_a_full_run() -> None:
    # Given a quick run's targets
    target = {"target": "t", "measured": 1.0, "met": False, "note": "missed"}
    results = {"plan": {"mode": "quick"}, "targets": {"rq-redis": [target]}}

    # When the targets table is rendered
    text = _targets_text(results)

    # Then its title says a quick run is a first look
    assert "quick run" in text.splitlines()[0]
    assert "full run" in text.splitlines()[0]


@pytest.mark.parametrize("mode", ["smoke", "quick"])
def test_a_small_run_says_its_recommendation_is_a_first_look(mode: str) -> None:
    # Given a small run's recommendation
    results = {
        "plan": {"mode": mode, "followers": 2_000},
        "recommendations": {"rq-redis": {"chunk_size": 250, "reasons": ["fastest"]}},
    }

    # When the recommendations are rendered
    title = _recommendations_text(results).splitlines()[0]

    # Then their title says to choose the size to configure from a full run
    assert f"{mode} run" in title and "2,000 followers" in title
    assert "full run" in title


def test_a_full_runs_recommendation_has_no_caveat() -> None:
    results = {"plan": {"mode": "full"}, "recommendations": {}}
    assert _recommendations_text(results).splitlines()[0] == "Recommended fanout_chunk_size"


def test_of_two_stream_framework_runs_the_faster_counts_so_ratios_to_it_are_not_flattered() -> None:
    # Given two runs of the peer
    runs = [{"feed_writes_per_s": 5_000.0}, {"feed_writes_per_s": 6_000.0}]

    # When they are summed up as the baseline
    peer = peer_summary(runs, followers=100_000)

    # Then the faster one is the divisor of every x-Stream-Framework ratio
    assert peer["writes_per_s"] == 6_000.0
