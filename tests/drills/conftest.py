"""Fixtures of the fault drills, and the results table printed at the end of the session.

``FEEDFAN_DRILL_SCALE=smoke`` (default, what CI runs) or ``full`` chooses the
sizes (``drill_scale.py``); ``FEEDFAN_DRILL_SEED`` replays a session's random
choices; ``FEEDFAN_DRILL_REPORT=path.md`` also writes the table as Markdown.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from drill_backends import (
    CHUNK_TIME_LIMIT,
    REDELIVERY_TIMEOUT,
    Backend,
    Baseline,
    Drill,
    run_uninterrupted,
)
from drill_report import DrillRow, Report
from drill_scale import SCALE_VARIABLE, Scale, drill_seed, load_scale

from feedfan.testing import Harness
from feedfan.testing.managers import CHUNK_DELAY_VARIABLE

_REPORT = pytest.StashKey[Report]()
_ROWS = pytest.StashKey[list[DrillRow]]()
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every drill talks to live brokers and may run long: mark it, and give it its time."""
    scale = load_scale()
    for item in items:
        if _HERE not in item.path.parents:
            continue
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(scale.test_timeout))
        if item.path.name != "test_properties.py":
            item.add_marker(pytest.mark.broker)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def scale() -> Scale:
    """The sizes of this session's drills."""
    return load_scale()


@pytest.fixture(scope="session")
def report(request: pytest.FixtureRequest, scale: Scale) -> Report:
    """The session's results table."""
    config = request.config
    if _REPORT not in config.stash:
        config.stash[_REPORT] = Report(scale=scale.name, seed=drill_seed())
    return config.stash[_REPORT]


@pytest.fixture
def rng(report: Report, request: pytest.FixtureRequest) -> random.Random:
    """A random source of this test, derived from the session seed (replayable)."""
    return random.Random(f"{report.seed}:{request.node.nodeid}")


@pytest.fixture
def record(report: Report, request: pytest.FixtureRequest) -> Callable[..., DrillRow]:
    """Add a row to the table; its outcome is filled in when the test ends."""

    def add(backend: str, drill: str, *, faults: str = "", followers: int | str = 0) -> DrillRow:
        row = report.add(DrillRow(backend, drill, faults, followers))
        request.node.stash.setdefault(_ROWS, []).append(row)
        return row

    return add


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Mark each row of a test passed or FAILED from the test's own result."""
    test_report = yield
    rows = item.stash.get(_ROWS, [])
    if rows and (test_report.when == "call" or test_report.failed):
        for row in rows:
            if test_report.failed:
                row.outcome = "FAILED"
            elif test_report.skipped:
                row.outcome = "skipped"
            elif row.outcome == "running":
                row.outcome = "passed"
    return test_report


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """Print the table of faults injected and feed entries lost and duplicated."""
    if _REPORT not in config.stash:
        return
    table = config.stash[_REPORT]
    if not table.rows:
        return
    terminalreporter.section(
        f"feedfan drills ({SCALE_VARIABLE}={table.scale}, FEEDFAN_DRILL_SEED={table.seed})"
    )
    terminalreporter.write_line(table.text())
    target = os.environ.get("FEEDFAN_DRILL_REPORT")
    if target:
        Path(target).write_text(
            f"Scale `{table.scale}`, seed {table.seed}.\n\n{table.markdown()}\n", encoding="utf-8"
        )
        terminalreporter.write_line(f"(also written to {target})")


@pytest.fixture
def harness(
    request: pytest.FixtureRequest,
    backend: Backend,
    scale: Scale,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Harness]:
    """``backend`` with its servers: the session's Redis database and RabbitMQ vhost.

    In-process dispatchers run chunks in this process, so it gets the workers' chunk delay.
    """
    if not backend.has_workers:
        monkeypatch.setenv(CHUNK_DELAY_VARIABLE, str(scale.chunk_delay))
    redis_url = request.getfixturevalue("feedfan_redis_url")
    broker_url = request.getfixturevalue("feedfan_amqp_url") if backend.broker == "amqp" else None
    harness = Harness(
        backend.dispatcher,
        log_dir=tmp_path,
        redis_url=redis_url,
        broker_url=broker_url,
        chunk_size=scale.chunk_size,
        redelivery_timeout=REDELIVERY_TIMEOUT,
        chunk_time_limit=CHUNK_TIME_LIMIT,
    )
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture(scope="session")
def baselines() -> dict[str, Baseline]:
    """Uninterrupted runs of this session, by backend id (measured once, on first use)."""
    return {}


@pytest.fixture
def uninterrupted(
    backend: Backend, harness: Harness, scale: Scale, baselines: dict[str, Baseline]
) -> Callable[[], Baseline]:
    """The uninterrupted run of a drill-sized fanout on ``backend``, measured on first use."""

    def get() -> Baseline:
        if backend.id not in baselines:
            baselines[backend.id] = run_uninterrupted(harness, scale)
        return baselines[backend.id]

    return get


@pytest.fixture
def drill(
    *,
    backend: Backend,
    harness: Harness,
    scale: Scale,
    rng: random.Random,
    tmp_path: Path,
    record: Callable[..., DrillRow],
    uninterrupted: Callable[[], Baseline],
) -> Drill:
    """Everything a drill test needs about ``backend``, in one object."""
    return Drill(backend, harness, scale, rng, tmp_path, record, uninterrupted)
