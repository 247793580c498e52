"""Bad input: malformed messages pushed raw onto both feedfan queues of every backend.

Random bytes, truncated JSON, wrong versions and types, huge follower lists,
unknown feeds and operations, pickles that would create a directory when
loaded, deeply nested JSON, wrong encodings, and messages of the queue
library itself that name other code. Valid fanouts go between them. Every
malformed message must be refused with a reason and kept exactly once, no
code may run, no worker process may die or be replaced, and the valid work
must complete.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest
from drill_backends import (
    IN_PROCESS_BACKENDS,
    MAX_CHUNK_SIZE,
    WORKER_BACKENDS,
    Drill,
    drill_settings,
    warm_up,
)
from drill_faults import process_tree
from drill_feeds import check_feeds, new_fanout, settle
from drill_garbage import NONCE_PATTERN, Garbage, GarbageMaker

from feedfan.dispatch import TaskDispatcher
from feedfan.priority import FanoutPriority
from feedfan.storage.redis import RedisStorage


def _groups(items: list[Garbage], count: int) -> list[list[Garbage]]:
    size = -(-len(items) // count)
    return [items[start : start + size] for start in range(0, len(items), size)]


def _kept(dispatcher: TaskDispatcher, pushed: int) -> int:
    return len(dispatcher.failed_messages(limit=2 * pushed + 100))


@pytest.mark.parametrize(
    "backend", [*WORKER_BACKENDS, *IN_PROCESS_BACKENDS], ids=lambda backend: backend.id
)
def test_malformed_messages_are_kept_with_their_reason_and_valid_work_completes(
    drill: Drill,
) -> None:
    backend, harness, scale, rng = drill.backend, drill.harness, drill.scale, drill.rng
    settings = drill_settings(harness)
    manager = harness.manager(settings)
    dispatcher = manager.dispatcher
    storage = manager.storage
    assert isinstance(storage, RedisStorage)
    marker_dir = drill.tmp_path / "markers"
    garbage = GarbageMaker(
        rng,
        dispatcher=backend.dispatcher,
        broker=backend.broker,
        queues={p: dispatcher.queue_name(p) for p in FanoutPriority},
        marker_dir=marker_dir,
        max_chunk_size=MAX_CHUNK_SIZE,
        max_task_bytes=settings.max_task_bytes,
    ).make(scale.malformed)
    kinds = Counter(item.kind for item in garbage)
    row = drill.row(
        "malformed",
        faults=f"{len(garbage):,} malformed messages, {len(kinds)} classes",
        followers=f"{len(garbage):,} msgs",
    )
    # Given a worker that has run a chunk, and its processes as they are
    worker = harness.start_worker(settings)
    warm_up(manager, timeout=scale.settle_timeout)
    tree = process_tree(worker.pid) if worker is not None else None
    assert _kept(dispatcher, len(garbage)) == 0

    # When the malformed messages are pushed raw on both queues, valid fanouts between them
    fanouts = []
    started = time.monotonic()
    for number, group in enumerate(_groups(garbage, scale.valid_fanouts + 1)):
        for item in group:
            dispatcher.push_raw(item.priority, item.body, envelope=item.envelope)
        if number < scale.valid_fanouts:
            fanout = new_fanout(rng.randrange(1, 3 * scale.chunk_size), label="ok")
            fanouts.append((fanout, manager.add_user_activity(fanout.user, fanout.activity)))

    # Then the valid work completes, every follower once
    lost = duplicated = 0
    for fanout, receipt in fanouts:
        settle(manager, receipt, timeout=scale.settle_timeout, logs=harness.worker_logs)
        check = check_feeds(storage, fanout)
        lost, duplicated = lost + check.lost, duplicated + check.duplicated
    row.lost, row.duplicated = lost, duplicated
    assert (lost, duplicated) == (0, 0)

    # And every malformed message is kept, with a reason, exactly once
    deadline = time.monotonic() + scale.settle_timeout
    while (count := _kept(dispatcher, len(garbage))) < len(garbage):
        assert time.monotonic() < deadline, (
            f"{count} of {len(garbage)} malformed messages kept after {scale.settle_timeout:g} s"
            f"\n{harness.worker_logs()}"
        )
        time.sleep(1.0)
    row.settle = time.monotonic() - started
    time.sleep(1.0)  # anything kept twice would show up now
    kept = dispatcher.failed_messages(limit=2 * len(garbage) + 100)
    row.notes.append(f"kept {len(kept):,} of {len(garbage):,}")
    assert len(kept) == len(garbage), f"{len(kept)} kept for {len(garbage)} pushed"
    assert all(message.reason.strip() for message in kept)
    seen = Counter(n for message in kept for n in set(re.findall(NONCE_PATTERN, message.body)))
    traced = [item for item in garbage if item.nonce is not None]
    missing = [item for item in traced if seen[item.nonce] == 0]
    twice = [item for item in traced if seen[item.nonce] > 1]
    row.notes.append(f"{len(traced) - len(missing) - len(twice):,} traced each once")
    assert not missing, f"not kept: {Counter(item.kind for item in missing)}: " + "\n".join(
        f"{m.reason} {m.body[:300]!r}" for m in kept if not re.search(NONCE_PATTERN, m.body)
    )
    assert not twice, f"kept more than once: {Counter(item.kind for item in twice)}"

    # And no payload ran code, and no worker process died or was replaced
    assert not marker_dir.exists(), f"code ran from a payload: {sorted(marker_dir.iterdir())}"
    if tree is not None:
        assert tree.alive_and_unchanged() == [], harness.worker_logs()
        row.notes.append(f"{len(tree.processes)} worker processes unchanged")
