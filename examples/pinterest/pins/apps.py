"""The pins app."""

from django.apps import AppConfig


class PinsConfig(AppConfig):
    """Pins, follows and feeds."""

    name = "pins"
    default_auto_field = "django.db.models.BigAutoField"
