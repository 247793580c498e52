"""Fanout progress, `feedfan status` and `feedfan drain` on every backend, with real workers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from operations_support import (
    BACKEND_IDS,
    BACKENDS,
    SETTLE,
    namespace,
    open_harness,
    pin,
    settle,
    timeline,
    write_module,
)

from feedfan.cli import main
from feedfan.config import Settings
from feedfan.priority import FanoutPriority
from feedfan.status import drain, render_status, status_report
from feedfan.testing import Harness, make_user, wait_for
from feedfan.testing.managers import CHUNK_DELAY_VARIABLE, follower_ids

HIGH, LOW = FanoutPriority.HIGH, FanoutPriority.LOW

pytestmark = [pytest.mark.broker, pytest.mark.slow]

_POISON_APP = """
    from feedfan.testing.managers import ConformanceManager

    class PoisonManager(ConformanceManager):
        '''Fails every write of a chunk that holds a follower whose id ends in ':h5'.'''

        def run_chunk(self, task):
            if any(str(f).endswith(":h5") for f in task.followers):
                raise RuntimeError("disk full")
            return super().run_chunk(task)
    """


@pytest.fixture(scope="module", params=BACKENDS, ids=BACKEND_IDS)
def harness(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    yield from open_harness(request, tmp_path_factory)


def _poison_settings(harness: Harness, tmp_path: Path, **values: object) -> tuple[Settings, str]:
    path = write_module(tmp_path, "poison_app", _POISON_APP)
    return harness.settings(app="poison_app:PoisonManager", **values), str(path)


def test_fanout_status_counts_done_refused_and_given_up_chunks_as_they_happen(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a fanout of 3 chunks of 5 followers waiting for a worker:
    # high:0 (h0-h4), high:1 (h5, h6: its write always fails), low:0 (l0-l2)
    settings, path = _poison_settings(harness, tmp_path)
    manager = harness.manager(settings)
    user = make_user(namespace(), 7, 3)
    receipt = manager.add_user_activity(user, pin(user))
    before = manager.fanout_status(receipt)
    assert before is not None
    assert (before.total, before.done, before.failed, before.pending) == (3, 0, 0, 3)
    # When a worker that refuses chunks of more than 4 followers runs them
    worker_settings = settings.replace(fanout_chunk_size=4, max_chunk_size=4)
    harness.start_worker(worker_settings, env={"PYTHONPATH": path})
    status = settle(harness, manager, receipt)
    # Then one chunk is done, and the refused one and the given-up one count as failed
    assert (status.total, status.done, status.failed, status.pending) == (3, 1, 2, 0)
    assert status.settled and not status.complete
    assert all(timeline(manager, f) for f in follower_ids(user, LOW))
    assert not any(timeline(manager, f) for f in follower_ids(user, HIGH))

    # And each adapter keeps both, with their reasons
    # (Dramatiq's broker moves a message to its dead letters just after the worker counts it)
    def reasons() -> str:
        return " | ".join(m.reason for m in manager.dispatcher.failed_messages(limit=50))

    wait_for(
        lambda: "above max_chunk_size=4" in reasons() and "disk full" in reasons(),
        timeout=20,
        message=f"kept: {reasons()}\n{harness.worker_logs()}",
    )
    # And `feedfan status` (of the workers' app) shows the fanout as settled with 2 failed
    monkeypatch.syspath_prepend(path)
    text = render_status(status_report(settings, every_backend=False))
    assert f"{receipt.fanout_id}  add" in text and "1/3 chunks, 2 failed  settled" in text


def _use_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)


def test_status_shows_the_queues_and_drain_waits_until_they_are_empty(
    harness: Harness,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given two fanouts waiting with no worker: 4 HIGH and 2 LOW chunks, one HIGH chunk poisoned
    settings, path = _poison_settings(harness, tmp_path)
    monkeypatch.syspath_prepend(path)
    manager = harness.manager(settings)
    first, second = make_user(namespace(), 10, 5), make_user(namespace(), 10, 5)
    receipts = [manager.add_user_activity(u, pin(u)) for u in (first, second)]
    dispatcher = manager.dispatcher
    # When `feedfan status` looks
    report = status_report(settings, every_backend=False)
    # Then it shows the depth of each queue, and both fanouts in flight with their progress
    [backend] = report.backends
    assert backend.dispatcher == harness.dispatcher_class.name and backend.error is None
    assert backend.waiting == {settings.queue_high: 4, settings.queue_low: 2}
    assert backend.consumers[settings.queue_high] in (0, None)
    assert {s.fanout_id for s in report.in_flight} == {r.fanout_id for r in receipts}
    assert all((s.total, s.done) == (3, 0) for s in report.in_flight)
    text = render_status(report)
    assert f"{settings.queue_high:<28} {4:>9}" in text
    assert "fanouts in flight (2):" in text and "0/3 chunks, 0 failed  running" in text
    # And so does `feedfan status --json`
    _use_env(monkeypatch, settings)
    assert main(["status", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["backends"][0]["waiting"] == {settings.queue_high: 4, settings.queue_low: 2}
    assert sorted(f["pending"] for f in shown["in_flight"]) == [3, 3]
    # And a drain with no worker says so, and ends not empty
    notices: list[str] = []
    waiting = drain(settings, settings.dispatcher, timeout=2, notice=notices.append)
    assert not waiting.empty and waiting.waiting == 6
    if backend.consumers[settings.queue_high] == 0:
        assert any("no worker consumes" in n for n in notices), notices
    # When a slowed-down worker starts and `feedfan drain` runs
    harness.start_worker(settings, env={"PYTHONPATH": path, CHUNK_DELAY_VARIABLE: "0.1"})
    progress: list[tuple[int, int]] = []
    result = drain(
        settings, settings.dispatcher, timeout=SETTLE, progress=lambda d, t: progress.append((d, t))
    )
    # Then it returns once the queues are empty, with progress up to the total
    assert result.empty, f"{result}\n{harness.worker_logs()}"
    assert progress and progress[-1][0] == progress[-1][1]
    assert (dispatcher.queue_depth(HIGH), dispatcher.queue_depth(LOW)) == (0, 0)
    if dispatcher.in_flight() is not None:
        # Nothing was held any more, so every chunk has been written or given up on
        statuses = [manager.fanout_status(r) for r in receipts]
        assert all(s is not None and s.settled for s in statuses), statuses
    # And it reports the chunk that failed meanwhile
    statuses = [settle(harness, manager, r) for r in receipts]
    assert sorted((s.done, s.failed) for s in statuses) == [(2, 1), (2, 1)]
    assert any("disk full" in m.reason for m in result.new_failures), result.new_failures
    # And the command, run now, says the queues are empty and that nothing failed meanwhile
    _use_env(monkeypatch, settings)
    assert main(["drain", "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    assert f"the {settings.dispatcher} queues are empty" in out
