"""feedfan in Django: ``settings.FEEDFAN``, fanout on commit, ``manage.py feedfan``.

Add the app and name your manager::

    INSTALLED_APPS = [..., "feedfan.contrib.django"]
    FEEDFAN = {"dispatcher": "celery", "app": "pins.feeds:MyStreamManager"}

Subclass :class:`DjangoManager` (settings from ``settings.FEEDFAN``; work done
inside ``transaction.atomic()`` waits for the commit), get the project's
manager with :func:`get_manager`, and start workers with
``python manage.py feedfan worker``. See ``docs/django.md``.
"""

from feedfan.contrib.django.conf import get_manager, get_settings, reset_manager
from feedfan.contrib.django.manager import DeferredFanoutReceipt, DjangoManager

__all__ = [
    "DeferredFanoutReceipt",
    "DjangoManager",
    "get_manager",
    "get_settings",
    "reset_manager",
]
