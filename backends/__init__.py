"""Adapters that plug feedfan into a job queue: ``celery``, ``rq``, ``dramatiq``.

Installed as ``feedfan.backends``. Each module imports its queue library at
import time; ``feedfan`` itself never imports them, and picks a module only
when configuration names it (``dispatcher = "rq"``).
"""
