"""System checks: a bad ``settings.FEEDFAN`` fails ``manage.py check``, not the first fanout.

======================  ==========================================================
``feedfan.E001``        a setting has a value feedfan cannot use (named, with source)
``feedfan.E002``        the dispatcher cannot be found or its library is missing
``feedfan.E003``        ``app`` cannot be imported or is not a feedfan Manager
``feedfan.W001``        a real job queue with no ``app``: workers would not know
                        your feeds and followers
======================  ==========================================================
"""

from __future__ import annotations

from typing import Any

from django.core import checks  # type: ignore[import-untyped, unused-ignore]

from feedfan.config import IN_PROCESS_DISPATCHERS
from feedfan.contrib.django.conf import SOURCE_NAME, get_settings
from feedfan.contrib.django.loader import resolve
from feedfan.dispatch import resolve_dispatcher_class
from feedfan.errors import ConfigurationError
from feedfan.manager import Manager

__all__ = ["check_feedfan_settings"]

_FIX_SETTING = (
    f"Fix the value in {SOURCE_NAME} (or the source the message names); "
    "`python manage.py feedfan config -v` explains every setting."
)


def check_feedfan_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """Check ``settings.FEEDFAN`` (with files and ``FEEDFAN_*`` variables) as feedfan reads it."""
    try:
        settings = get_settings()
    except ConfigurationError as e:
        return [checks.Error(str(e), hint=_FIX_SETTING, obj=SOURCE_NAME, id="feedfan.E001")]
    problems: list[Any] = []
    try:
        resolve_dispatcher_class(settings.dispatcher)
    except ConfigurationError as e:
        problems.append(
            checks.Error(
                f"dispatcher={settings.dispatcher!r} (from "
                f"{settings.sources.get('dispatcher', 'default')}): {e}",
                hint="Use celery, rq, dramatiq, local or eager, and install its extra, e.g. "
                "pip install 'feedfan[celery]'.",
                obj=SOURCE_NAME,
                id="feedfan.E002",
            )
        )
    if settings.app is not None:
        problems.extend(_check_app(settings.app, settings.sources.get("app", "default")))
    elif settings.dispatcher not in IN_PROCESS_DISPATCHERS:
        problems.append(
            checks.Warning(
                f"dispatcher={settings.dispatcher!r} runs fanout in worker processes, but no "
                f"'app' is set, so workers would use a plain Manager without your feeds.",
                hint=f"Name your manager in {SOURCE_NAME}, e.g. "
                "'app': 'pins.feeds:MyStreamManager'.",
                obj=SOURCE_NAME,
                id="feedfan.W001",
            )
        )
    return problems


def _check_app(path: str, source: str) -> list[Any]:
    hint = f"Set 'app' in {SOURCE_NAME} to 'package.module:MyStreamManager'."
    try:
        found = resolve(path)
    except ConfigurationError as e:
        return [checks.Error(f"{e} (from {source})", hint=hint, obj=SOURCE_NAME, id="feedfan.E003")]
    if isinstance(found, Manager) or (isinstance(found, type) and issubclass(found, Manager)):
        return []
    return [
        checks.Error(
            f"app={path!r} (from {source}) is a {type(found).__name__}; expected a feedfan "
            "Manager subclass or instance.",
            hint=hint,
            obj=SOURCE_NAME,
            id="feedfan.E003",
        )
    ]
