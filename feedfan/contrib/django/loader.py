"""Loading a Django project's manager in a worker process.

A worker (``celery worker``, ``rq worker``, ``dramatiq``) imports the manager
named by the ``app`` setting before it runs a task. A Django project's manager
lives next to its models, which cannot be imported before ``django.setup()``.
Prefix the app with this module and the worker sets Django up first::

    app = "feedfan.contrib.django.loader:pins.feeds:MyStreamManager"

The worker needs ``DJANGO_SETTINGS_MODULE`` in its environment and the project
on its ``PYTHONPATH``; ``manage.py feedfan worker`` gives it both and adds the
prefix itself, so in ``settings.FEEDFAN`` the plain ``"pins.feeds:MyStreamManager"``
is enough.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from feedfan.errors import ConfigurationError

__all__ = ["LOADER_PREFIX", "project_root", "resolve", "setup_django", "worker_app"]

LOADER_PREFIX = f"{__name__}:"
"""What :func:`worker_app` puts before an app path."""


def worker_app(path: str) -> str:
    """``path`` prefixed so that a worker sets Django up before importing it."""
    return path if path.startswith(LOADER_PREFIX) else LOADER_PREFIX + path


def setup_django() -> None:
    """Run ``django.setup()`` unless the app registry is ready already."""
    from django.apps import apps  # type: ignore[import-untyped, unused-ignore]

    if apps.ready:
        return
    from django.conf import settings  # type: ignore[import-untyped, unused-ignore]

    if not os.environ.get("DJANGO_SETTINGS_MODULE") and not settings.configured:
        raise ConfigurationError(
            "a Django project's manager is being loaded, but DJANGO_SETTINGS_MODULE is not set; "
            "start workers with `python manage.py feedfan worker`, or export "
            "DJANGO_SETTINGS_MODULE=yourproject.settings first."
        )
    import django  # type: ignore[import-untyped, unused-ignore]

    django.setup()


def resolve(path: str) -> object:
    """Import what ``path`` (``package.module:attribute``, prefixed or not) names.

    Django is set up first. Errors are :class:`~feedfan.errors.ConfigurationError`
    naming the path and what to fix.
    """
    target = path.removeprefix(LOADER_PREFIX)
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute or ":" in attribute:
        raise ConfigurationError(
            f"app={path!r} must look like 'package.module:manager', e.g. "
            "'pins.feeds:MyStreamManager'."
        )
    setup_django()
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigurationError(
            f"app={path!r}: cannot import module {module_name!r}: {e}. Is the project on the "
            "worker's PYTHONPATH (start it with `python manage.py feedfan worker`)?"
        ) from e
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(
            f"app={path!r}: module {module_name!r} has no {attribute!r}."
        ) from None


def project_root(settings_module: str) -> Path | None:
    """The directory from which ``settings_module`` is importable, if it can be found."""
    try:
        spec = importlib.util.find_spec(settings_module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).resolve()
    if spec.submodule_search_locations is not None:  # a package: origin is its __init__.py
        path = path.parent
    for _ in settings_module.split("."):
        path = path.parent
    return path


def __getattr__(name: str) -> object:
    # `feedfan.runner.load_app` splits "feedfan.contrib.django.loader:pins.feeds:X"
    # at the first colon and asks this module for "pins.feeds:X".
    if ":" not in name:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return resolve(name)
