"""How big the drills are: ``FEEDFAN_DRILL_SCALE=smoke`` (the default, what CI runs) or ``full``.

Every size a drill uses is here, so ``docs/drills.md`` and the results table
can say exactly what was run.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

__all__ = ["SCALE_VARIABLE", "SEED_VARIABLE", "Scale", "drill_seed", "load_scale"]

SCALE_VARIABLE = "FEEDFAN_DRILL_SCALE"
"""``smoke`` (default) or ``full``."""

SEED_VARIABLE = "FEEDFAN_DRILL_SEED"
"""Seed of every random choice of a session (kill moments, garbage); printed in the report."""


@dataclass(frozen=True)
class Scale:
    """The sizes of one drill session."""

    name: str
    """``"smoke"`` or ``"full"``."""

    followers: int
    """Followers of a crash or outage fanout (a quarter HIGH, the rest LOW)."""

    chunk_size: int
    """``fanout_chunk_size`` of the drills."""

    chunk_delay: float
    """Seconds a worker sleeps inside each chunk before writing it, so a fanout lasts long
    enough to be hit at random moments; the uninterrupted run sleeps the same."""

    kills: int
    """SIGKILLs per crash drill, alternating the process running a chunk and the whole worker."""

    outage_faults: int
    """Connection drops while workers run an outage fanout (one more hits the producer)."""

    producer_followers: int
    """Followers of each fanout a producer sends into an outage."""

    malformed: int
    """Malformed messages pushed per backend, half on each of its two queues."""

    valid_fanouts: int
    """Valid fanouts sent between the malformed messages of a backend."""

    restart_rabbitmq: bool
    """Whether the outage drill may restart the RabbitMQ application (full mode only)."""

    settle_timeout: float
    """Seconds a drill's fanout may take to settle, faults included."""

    test_timeout: int
    """pytest-timeout seconds of one drill test."""

    @property
    def chunks(self) -> int:
        """Chunks of a crash or outage fanout."""
        return self.chunks_of(self.followers)

    def chunks_of(self, followers: int) -> int:
        """Chunks of a drill fanout to ``followers`` (a quarter HIGH, the rest LOW)."""
        high = followers // 4
        low = followers - high
        return -(-high // self.chunk_size) + -(-low // self.chunk_size)


_SCALES = {
    "smoke": Scale(
        name="smoke",
        followers=4_000,
        chunk_size=40,
        chunk_delay=0.05,
        kills=5,
        outage_faults=2,
        producer_followers=1_000,
        malformed=240,
        valid_fanouts=3,
        restart_rabbitmq=False,
        settle_timeout=120.0,
        test_timeout=300,
    ),
    "full": Scale(
        name="full",
        followers=100_000,
        chunk_size=100,
        chunk_delay=0.05,
        kills=5,
        outage_faults=4,
        producer_followers=10_000,
        malformed=20_000,
        valid_fanouts=10,
        restart_rabbitmq=True,
        settle_timeout=900.0,
        test_timeout=3_600,
    ),
}


def load_scale(environ: dict[str, str] | None = None) -> Scale:
    """The scale named by ``FEEDFAN_DRILL_SCALE``; an unknown name is an error, not a default."""
    env = os.environ if environ is None else environ
    name = (env.get(SCALE_VARIABLE) or "smoke").strip().lower()
    if name not in _SCALES:
        raise ValueError(f"{SCALE_VARIABLE}={name!r} must be one of: {', '.join(_SCALES)}.")
    return _SCALES[name]


def drill_seed(environ: dict[str, str] | None = None) -> int:
    """The session's seed: ``FEEDFAN_DRILL_SEED`` or a fresh random one."""
    env = os.environ if environ is None else environ
    text = env.get(SEED_VARIABLE, "").strip()
    return int(text) if text else random.SystemRandom().randrange(1, 2**31)
