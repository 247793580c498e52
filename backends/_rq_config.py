"""RQ settings module for ``rq worker --config feedfan.backends._rq_config``.

RQ reads the upper-case names of a config module. This one gives the broker
URL from feedfan's own settings (``FEEDFAN_BROKER_URL``, ``redis_url``, a
``feedfan.toml``), so a URL carrying a password never appears on a command
line, in ``ps`` or in a log.
"""

from __future__ import annotations

from feedfan.config import load_settings

__all__ = ["REDIS_URL"]

REDIS_URL = load_settings().effective_broker_url
"""The Redis URL ``rq`` connects to: feedfan's effective broker URL."""
