"""The Django app: ``INSTALLED_APPS += ["feedfan.contrib.django"]``."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig  # type: ignore[import-untyped, unused-ignore]

__all__ = ["FeedfanConfig"]


class FeedfanConfig(AppConfig):  # type: ignore[misc, unused-ignore]
    """Registers feedfan's system checks and follows changes of ``settings.FEEDFAN``."""

    name = "feedfan.contrib.django"
    label = "feedfan"
    verbose_name = "feedfan"
    default = True

    def ready(self) -> None:
        """Register the checks; forget the cached manager when ``settings.FEEDFAN`` changes."""
        from django.core import checks  # type: ignore[import-untyped, unused-ignore]
        from django.core.signals import setting_changed  # type: ignore[import-untyped, unused-ignore]

        from feedfan.contrib.django.checks import check_feedfan_settings

        checks.register(check_feedfan_settings, "feedfan")
        setting_changed.connect(_forget_manager, dispatch_uid="feedfan.contrib.django")


def _forget_manager(*, setting: str, **kwargs: Any) -> None:
    from feedfan.contrib.django.conf import SETTING_NAME, reset_manager

    if setting == SETTING_NAME:
        reset_manager()
