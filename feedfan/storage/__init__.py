"""Where feeds live: Redis for real deployments, memory for the embedded default."""

from feedfan.storage.base import FanoutStatus, RejectedMessage, Storage, WriteBatch
from feedfan.storage.memory import MemoryStorage
from feedfan.storage.redis import RedisStorage

__all__ = [
    "FanoutStatus",
    "MemoryStorage",
    "RedisStorage",
    "RejectedMessage",
    "Storage",
    "WriteBatch",
]
