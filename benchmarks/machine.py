"""The label every result carries: which machine, when, and how busy it was."""

from __future__ import annotations

import os
import platform
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

__all__ = ["describe_machine", "machine_line"]


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("model name", "Hardware", "cpu model"):
            return value.strip()
    return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": platform.python_version()}
    for package in ("feedfan", "redis", "celery", "kombu", "rq", "dramatiq", "pika"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def describe_machine() -> dict[str, Any]:
    """CPU count and model, RAM, OS, load average, date and package versions."""
    memory = psutil.virtual_memory()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count() or 0,
        "cpu_model": _cpu_model(),
        "ram_gb": round(memory.total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "load_average_at_start": [round(x, 2) for x in load],
        "executable": sys.executable,
        "versions": _versions(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """One line naming the machine and date, for titles and captions."""
    return (
        f"{machine['cpu_count']} x {machine['cpu_model']}, {machine['ram_gb']:g} GB RAM, "
        f"{machine['date'][:10]}"
    )
