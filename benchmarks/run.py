"""One benchmark run: its sizes (full, quick or smoke), servers, folders and namespaces."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.backend import Backend
from benchmarks.servers import Servers
from feedfan.config import Settings
from feedfan.manager import Manager

__all__ = [
    "DEFAULT_CHUNK_SIZES",
    "STREAM_FRAMEWORK_CHUNK_SIZE",
    "Plan",
    "Run",
    "clean_up",
    "plan_for",
]

DEFAULT_CHUNK_SIZES = (10, 50, 100, 250, 500, 1000, 2500, 5000)
STREAM_FRAMEWORK_CHUNK_SIZE = 100


@dataclass(frozen=True)
class Plan:
    """How big each step is; ``plan_for`` gives the full, quick and smoke plans."""

    mode: str
    followers: int = 100_000
    chunk_sizes: tuple[int, ...] = DEFAULT_CHUNK_SIZES
    repeats: int = 3
    concurrency: int = 2
    backlog_writes: int = 1_000_000
    backlog_fanout: int = 100_000
    high_followers: int = 1_000
    priority_repeats: int = 9
    """HIGH fanouts timed per layout, idle and loaded (the median of each counts)."""
    dispatch_counts: tuple[int, ...] = (1_000, 10_000)
    dispatch_followers: int = 100
    baseline_batch: int = 1_000
    peer: bool = True
    planning: str | None = "inline"
    """``planning`` setting of the producers; ``None`` keeps the configured one (auto).

    Inline by default, so the sweep and the priority step time chunks alone: with
    background planning the LOW backlog is fanouts still to be planned by workers."""
    timeout: float = 0.0
    """Seconds one fanout may take; 0 derives it from the follower count."""

    def fanout_timeout(self, followers: int) -> float:
        """The time one fanout of ``followers`` may take before it counts as failed."""
        return self.timeout or max(90.0, followers / 1_000)

    def as_dict(self) -> dict[str, Any]:
        """The plan for the JSON report."""
        return asdict(self)


def plan_for(mode: str, **overrides: Any) -> Plan:
    """The plan of ``mode`` (``full``, ``quick``, ``smoke``) with ``overrides`` applied."""
    if mode == "smoke":
        plan = Plan(
            mode,
            followers=2_000,
            chunk_sizes=(10, 100, 1000),
            repeats=1,
            backlog_writes=6_000,
            backlog_fanout=2_000,
            high_followers=100,
            priority_repeats=2,
            dispatch_counts=(100, 300),
            peer=False,
        )
    elif mode == "quick":
        plan = Plan(
            mode,
            followers=50_000,
            # 250 and 1000 give a size to step down to when HIGH waits too long.
            chunk_sizes=(10, 100, 250, 500, 1000, 2500),
            repeats=1,
            backlog_writes=500_000,
            backlog_fanout=50_000,
            priority_repeats=3,
            dispatch_counts=(1_000,),
        )
    elif mode == "full":
        plan = Plan(mode)
    else:
        raise ValueError(f"mode must be full, quick or smoke, got {mode!r}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(plan, **changes)


@dataclass
class Run:
    """The state every step shares: plan, servers, output folder, run id."""

    plan: Plan
    servers: Servers
    out_dir: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    @property
    def log_dir(self) -> Path:
        """Where worker logs go."""
        return self.out_dir / "logs"

    def namespace(self, backend: Backend | str, step: str) -> str:
        """A key prefix / queue name part no other run or step shares."""
        label = backend.label if isinstance(backend, Backend) else backend
        return f"{self.run_id}-{label}-{step}-{uuid.uuid4().hex[:4]}"

    def settings_for(self, backend: Backend, step: str, **overrides: Any) -> Settings:
        """Settings of ``backend`` for one step, with the plan's worker concurrency."""
        values: dict[str, Any] = {
            "worker_concurrency": self.plan.concurrency,
            "local_workers": self.plan.concurrency,
            "max_chunk_size": max(10_000, *self.plan.chunk_sizes),
        }
        if self.plan.planning is not None:
            values["planning"] = self.plan.planning
        values.update(overrides)
        return backend.settings(self.servers.redis_url, self.namespace(backend, step), **values)


def clean_up(manager: Manager, *, purge: bool = True) -> None:
    """Delete the manager's keys (and purge its queues), then close it.

    Purge only once the workers are stopped: deleting a queue a worker
    consumes from cancels that consumer on RabbitMQ.
    """
    try:
        if purge:
            manager.dispatcher.purge()
        manager.storage.clear()
    finally:
        manager.close()
