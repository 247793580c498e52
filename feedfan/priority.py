"""Fanout priorities: which queue a chunk goes to."""

from __future__ import annotations

from enum import Enum

__all__ = ["FanoutPriority"]


class FanoutPriority(str, Enum):
    """The two priority groups of Stream Framework.

    ``get_user_follower_ids`` returns followers grouped by priority; HIGH
    chunks go to the HIGH queue (``feedfan.high``) and LOW chunks to the LOW
    queue, so active users can be given more workers.
    """

    HIGH = "high"
    LOW = "low"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: object) -> FanoutPriority:
        """Return the priority named by ``value`` (``"high"``, ``"LOW"``, a member)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        raise ValueError(f"priority must be 'high' or 'low', got {value!r}.")
