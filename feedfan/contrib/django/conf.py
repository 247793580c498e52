"""feedfan's configuration in a Django project: ``settings.FEEDFAN`` and the manager it names.

``settings.FEEDFAN`` is a dict of feedfan settings (any name ``feedfan config``
lists). It is one more source of :func:`feedfan.config.load_settings`, above
``feedfan.toml`` / ``[tool.feedfan]`` and below ``FEEDFAN_*`` environment
variables, so its values are checked like every other source's and an error
names the key: ``fanout_chunk_size=0 (from settings.FEEDFAN['fanout_chunk_size'])
must be an integer from 1 to 100,000.``
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from django.conf import settings as django_settings  # type: ignore[import-untyped, unused-ignore]

from feedfan.config import Settings, load_settings
from feedfan.contrib.django.loader import resolve
from feedfan.errors import ConfigurationError
from feedfan.manager import Manager
from feedfan.runner import load_app

__all__ = [
    "SETTING_NAME",
    "SOURCE_NAME",
    "django_layers",
    "get_manager",
    "get_settings",
    "reset_manager",
]

SETTING_NAME = "FEEDFAN"
"""The Django setting that holds feedfan's settings."""

SOURCE_NAME = "settings.FEEDFAN"
"""How errors and ``feedfan config`` name that source."""


def django_layers() -> tuple[tuple[str, Mapping[str, Any]], ...]:
    """``settings.FEEDFAN`` as a settings layer for :func:`~feedfan.config.load_settings`.

    Empty when the setting is absent; a :class:`~feedfan.errors.ConfigurationError`
    when it is not a dict.
    """
    value = getattr(django_settings, SETTING_NAME, None)
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{SOURCE_NAME} is a {type(value).__name__}; it must be a dict of feedfan settings, "
            "e.g. FEEDFAN = {'dispatcher': 'celery', 'redis_url': 'redis://127.0.0.1:6379/0'}."
        )
    return ((SOURCE_NAME, dict(value)),)


def get_settings(**overrides: Any) -> Settings:
    """The effective settings of this Django project, every value's source recorded.

    Defaults < ``feedfan.toml`` / ``[tool.feedfan]`` < ``settings.FEEDFAN`` <
    ``FEEDFAN_*`` environment variables < ``overrides``.
    """
    return load_settings(overrides, extra_layers=django_layers())


_manager: Manager | None = None
_owned = False
_lock = threading.Lock()


def get_manager() -> Manager:
    """The project's manager: the one ``settings.FEEDFAN['app']`` names, built once.

    Workers load the same ``app``, so the web process and the workers agree on
    feeds and followers. A class is instantiated with :func:`get_settings`; an
    instance is used as it is. Changing ``settings.FEEDFAN`` (``override_settings``
    in tests) forgets the manager, closing it if it was built here.
    """
    global _manager, _owned
    with _lock:
        if _manager is None:
            settings = get_settings()
            if settings.app is None:
                raise ConfigurationError(
                    f"{SOURCE_NAME} has no 'app'; name your manager there, e.g. "
                    "FEEDFAN = {'app': 'pins.feeds:MyStreamManager', ...}."
                )
            found = resolve(settings.app)
            if isinstance(found, Manager):
                _manager, _owned = found, False
            else:
                _manager, _owned = load_app(settings.app, settings), True
        return _manager


def reset_manager() -> None:
    """Forget the manager :func:`get_manager` built, closing it (tests, settings changes)."""
    global _manager, _owned
    with _lock:
        manager, owned = _manager, _owned
        _manager, _owned = None, False
    if manager is not None and owned:
        manager.close()
