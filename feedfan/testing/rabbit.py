"""``rabbitmqctl`` for the test session, the adapter tests and the drills.

The session plugin makes a virtual host of its own with it; tests read
RabbitMQ's view of consumers and channels with :meth:`RabbitControl.rows`;
the outage drills cut connections and stop the broker with it. Only the
session's own virtual host is ever cut.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

__all__ = ["RabbitControl", "rabbitmqctl"]


def rabbitmqctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str] | None:
    """``rabbitmqctl -q args``, never raising on its exit code; ``None`` when it is not installed."""
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        return None
    return subprocess.run(
        [tool, "-q", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class RabbitControl:
    """``rabbitmqctl`` on the virtual host of ``url``; each call is noted in :attr:`log`."""

    url: str
    log: list[str] = field(default_factory=list)

    @property
    def vhost(self) -> str:
        """The virtual host of ``url`` (``/`` when the URL names none)."""
        path = urlsplit(self.url).path
        return unquote(path[1:]) if len(path) > 1 else "/"

    @property
    def own_vhost(self) -> bool:
        """Whether the URL names a virtual host other than the shared default one."""
        return self.vhost != "/"

    @staticmethod
    def available() -> bool:
        """Whether ``rabbitmqctl`` is on ``PATH``."""
        return shutil.which("rabbitmqctl") is not None

    def _ctl(self, *args: str, timeout: float = 120) -> str:
        result = rabbitmqctl(*args, timeout=timeout)
        if result is None:
            raise AssertionError("rabbitmqctl is not on PATH; this test or drill needs it")
        self.log.append(f"rabbitmqctl {' '.join(args)} -> {result.returncode}")
        if result.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def rows(self, command: str, *columns: str) -> list[list[str]]:
        """``rabbitmqctl <command> -p <vhost> <columns>`` as rows of strings, no header."""
        out = self._ctl("--no-table-headers", command, "-p", self.vhost, *columns)
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    def node_rows(self, command: str, *columns: str) -> list[list[str]]:
        """The same for a command of the whole node (``list_channels`` has no ``-p``)."""
        out = self._ctl("--no-table-headers", command, *columns)
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    def connections(self) -> list[tuple[str, str]]:
        """Open connections of the whole node as ``(vhost, name)``."""
        out = self._ctl("list_connections", "--formatter", "json", "vhost", "name")
        return [(row["vhost"], row["name"]) for row in json.loads(out or "[]")]

    def close_connections(self, reason: str = "feedfan test") -> int:
        """Close every connection of this virtual host (not others'); return how many closed."""
        if not self.own_vhost:
            raise AssertionError(
                "refusing to close the connections of the default virtual host, which other "
                "sessions share; rabbitmqctl must make a vhost of the session's own"
            )
        out = self._ctl("close_all_connections", "--vhost", self.vhost, "--limit", "10000", reason)
        found = re.search(r"Closed (\d+) connection", out)
        return int(found.group(1)) if found else 0

    def others_connected(self) -> int:
        """Connections of other virtual hosts: other people's work on this shared broker."""
        return sum(1 for vhost, _ in self.connections() if vhost != self.vhost)

    def restart_app(self, *, down_for: float, on_down: Callable[[], None] | None = None) -> None:
        """Stop the RabbitMQ application for ``down_for`` s, run ``on_down``, start it again.

        ``start_app`` is scheduled in a detached process before ``stop_app``
        runs, so the broker comes back even if this process dies in between;
        then this waits until RabbitMQ serves again.
        """
        tool = shutil.which("rabbitmqctl")
        if tool is None:
            raise AssertionError("rabbitmqctl is not on PATH; this test or drill needs it")
        switch = subprocess.Popen(
            ["sh", "-c", f'sleep {down_for:g}; exec "$0" -q start_app', tool],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.log.append(f"scheduled start_app in {down_for:g} s (pid {switch.pid})")
        try:
            self._ctl("stop_app")
            if on_down is not None:
                on_down()
        finally:
            switch.wait(timeout=down_for + 180)
            # Again from here, in case the switch raced a slow stop_app; a no-op if it runs.
            self._ctl("start_app", timeout=180)
            self._ctl("await_startup", "--timeout", "120", timeout=180)
