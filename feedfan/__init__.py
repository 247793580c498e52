"""feedfan: fan one activity out to every follower's feed, through the job queue you run.

The public API, in Stream Framework's terms::

    from feedfan import Activity, FanoutPriority, Manager

Which job queue runs the fanout (Celery, RQ, Dramatiq, or the in-process
``local`` default) is configuration; see :mod:`feedfan.config`.
"""

from feedfan.activity import Activity, decode_activity, encode_activity
from feedfan.config import Settings, load_settings
from feedfan.dispatch import Delivery, TaskDispatcher, WorkerCommand, available_dispatchers
from feedfan.errors import (
    ActivityError,
    BrokerError,
    ConfigurationError,
    DispatchError,
    FeedfanError,
    LimitExceededError,
    MissingDependencyError,
    PayloadError,
    StorageError,
    UnknownDispatcherError,
)
from feedfan.fanout import FanoutReceipt
from feedfan.feeds import Feed, TimelineFeed, UserFeed
from feedfan.manager import Manager
from feedfan.priority import FanoutPriority
from feedfan.storage import FanoutStatus, MemoryStorage, RedisStorage, Storage

__version__ = "0.1.0"

__all__ = [
    "Activity",
    "ActivityError",
    "BrokerError",
    "ConfigurationError",
    "Delivery",
    "DispatchError",
    "FanoutPriority",
    "FanoutReceipt",
    "FanoutStatus",
    "Feed",
    "FeedfanError",
    "LimitExceededError",
    "Manager",
    "MemoryStorage",
    "MissingDependencyError",
    "PayloadError",
    "RedisStorage",
    "Settings",
    "Storage",
    "StorageError",
    "TaskDispatcher",
    "TimelineFeed",
    "UnknownDispatcherError",
    "UserFeed",
    "WorkerCommand",
    "__version__",
    "available_dispatchers",
    "decode_activity",
    "encode_activity",
    "load_settings",
]
