"""Worker crashes: SIGKILLs at random moments of a fanout, the way an OOM killer or a node loss hits.

One worker (``feedfan worker``, the library's real worker) serves both
queues under a supervisor that restarts it when its main process is gone.
During a fanout the drill SIGKILLs, in turn, the process running a chunk
(Celery's pool child, an RQ worker process, Dramatiq's worker process) and
the whole worker (its process group). Once the fanout settles, every
follower's feeds must hold the activity exactly once, and the time it took
is set against an uninterrupted run of the same size in the same session.
"""

from __future__ import annotations

import time

import pytest
from drill_backends import WORKER_BACKENDS, Drill, drill_settings, warm_up, worker_env
from drill_faults import Supervisor, kill_process, running_chunk_pid
from drill_feeds import check_feeds, new_fanout, timed_settle
from drill_scale import Scale

from feedfan.fanout import FanoutReceipt
from feedfan.manager import Manager
from feedfan.storage.redis import RedisStorage
from feedfan.testing.managers import started_chunks


def _kill_when(
    manager: Manager,
    receipt: FanoutReceipt,
    supervisor: Supervisor,
    *,
    done_fraction: float,
    whole: bool,
    scale: Scale,
) -> str:
    """Once ``done_fraction`` of the chunks are written, SIGKILL a chunk's process or the worker.

    Waits for the worker to be inside a chunk, so the kill always lands on
    work in progress; returns what was killed.
    """
    storage = manager.storage
    assert isinstance(storage, RedisStorage)
    deadline = time.monotonic() + scale.settle_timeout
    while time.monotonic() < deadline:
        status = manager.fanout_status(receipt)
        assert status is not None
        if status.settled:
            raise AssertionError(
                f"the fanout settled before the kill at {done_fraction:.0%}: raise "
                "followers or chunk_delay in drill_scale.py"
            )
        worker = supervisor.current()
        pid = running_chunk_pid(storage, worker, scale.chunk_delay)
        if status.done >= done_fraction * scale.chunks and pid is not None:
            if whole:
                supervisor.kill_worker()
                return f"worker {worker.pid} at {status.done}/{scale.chunks} chunks"
            kill_process(pid)
            return f"chunk process {pid} at {status.done}/{scale.chunks} chunks"
        time.sleep(0.02)
    raise AssertionError(f"no chunk ran within {scale.settle_timeout:g} s")


@pytest.mark.parametrize("backend", WORKER_BACKENDS, ids=lambda backend: backend.id)
def test_killed_workers_lose_no_follower_and_duplicate_none(drill: Drill) -> None:
    harness, scale = drill.harness, drill.scale
    chunk_kills = (scale.kills + 1) // 2
    row = drill.row(
        "crash",
        faults=f"{chunk_kills} chunk-process + {scale.kills - chunk_kills} worker SIGKILLs",
        followers=scale.followers,
    )
    baseline = drill.baseline()
    row.baseline = baseline.seconds
    settings = drill_settings(harness)
    manager = harness.manager(settings)
    storage = manager.storage
    assert isinstance(storage, RedisStorage)
    # Given a supervised worker that has run a chunk
    supervisor = Supervisor(harness, settings, env=worker_env(scale))
    fanout = new_fanout(scale.followers, label="crash")
    try:
        warm_up(manager, timeout=scale.settle_timeout)
        moments = sorted(drill.rng.uniform(0.05, 0.8) for _ in range(scale.kills))
        # When a fanout runs and its worker is SIGKILLed at random moments, in turn a chunk's
        # process and the whole worker
        started = time.monotonic()
        receipt = manager.add_user_activity(fanout.user, fanout.activity)
        for number, fraction in enumerate(moments):
            killed = _kill_when(
                manager,
                receipt,
                supervisor,
                done_fraction=fraction,
                whole=number % 2 == 1,
                scale=scale,
            )
            row.notes.append(killed)
        if receipt.planned_in_background:
            row.notes.append("planned in a worker (planning = auto)")
        row.settle = timed_settle(
            manager,
            receipt,
            started=started,
            timeout=scale.settle_timeout,
            logs=harness.worker_logs,
        )
    finally:
        supervisor.stop()
    # Then every follower's feeds hold the activity exactly once
    check = check_feeds(storage, fanout)
    row.lost, row.duplicated = check.lost, check.duplicated
    runs = len(started_chunks(storage)) - 1  # the warm-up chunk ran once
    row.notes[:] = [
        f"{supervisor.restarts} restarts by the supervisor",
        f"{runs - scale.chunks} of {scale.chunks} chunks ran again",
        *row.notes,
    ]
    assert (check.lost, check.duplicated) == (0, 0), str(check)
    status = manager.fanout_status(receipt)
    assert status is not None and status.total == baseline.chunks == scale.chunks, status
