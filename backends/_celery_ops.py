"""Looking into a running Celery deployment: for `feedfan status`, `drain` and `check`.

Two sources, each read without unpickling anything:

* the broker itself: on RabbitMQ a passive queue declaration gives the number
  of consumers of a queue; on Redis kombu keeps every message a worker holds
  (taken, not yet acknowledged) in one ``unacked`` hash, whose JSON entries
  name their routing key, so feedfan counts those of its own queues;
* Celery's remote control (``app.control.inspect()``): the workers answer,
  over the broker, which queues they consume, what they hold, their
  prefetch count, configuration and task options. A worker that is busy
  still answers (its main process does); a worker with remote control off
  (``worker_enable_remote_control = False``) cannot be seen this way, and
  what only it could tell is then unknown (``None``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery

from feedfan.config import Settings
from feedfan.dispatch import Finding
from feedfan.errors import FeedfanError

from ._celery_app import TASK_NAME
from ._celery_broker import BrokerLink
from ._celery_checks import accepts_pickle, app_findings

__all__ = ["CeleryInspector"]

_REPLY_TIMEOUT = 1.0
"""Seconds a remote-control question waits for the workers' answers."""
_CACHE_SECONDS = 1.0
"""How long one answer about consumed queues serves (status asks once per priority)."""

Replies = dict[str, Any]


class CeleryInspector:
    """What the broker and the workers of ``app`` say about feedfan's queues."""

    def __init__(self, app: Celery, link: BrokerLink, settings: Settings) -> None:
        self.app = app
        self.link = link
        self.settings = settings
        self._queues_answer: tuple[float, Replies | None] | None = None

    @property
    def remote_control(self) -> bool:
        """Whether the app's workers answer remote-control questions."""
        return bool(self.app.conf.worker_enable_remote_control)

    # Broker ------------------------------------------------------------------

    def ping(self) -> None:
        """Connect to the broker (and on Redis send PING); raise ``BrokerError`` if it fails."""

        def reach(channel: Any, connection: Any) -> None:
            if self.link.kind == "redis":
                channel.client.ping()

        self.link.run("could not be reached", reach)

    def _unacked(self, names: Sequence[str]) -> int:
        wanted = set(names)

        def count(channel: Any, connection: Any) -> int:
            key = str(getattr(channel, "global_keyprefix", "") or "") + channel.unacked_key
            held = 0
            for _, raw in channel.client.hscan_iter(key, count=1000):
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(entry, list) and len(entry) == 3 and entry[2] in wanted:
                    held += 1
            return held

        return self.link.run("could not be asked which messages workers hold", count)

    def _consumers_declared(self, name: str) -> int:
        queue = self.link.queue(name)

        def count(channel: Any, connection: Any) -> int:
            try:
                return int(queue(channel).queue_declare(passive=True).consumer_count)
            except connection.channel_errors:  # no such queue: nobody consumes it
                return 0

        return self.link.run("could not be asked for a queue's consumers", count)

    # Remote control ------------------------------------------------------------

    def ask(self, command: str, *args: Any, **kwargs: Any) -> Replies | None:
        """Every worker's answer to ``command``, by node name; ``None`` if they cannot be asked."""
        if not self.remote_control:
            return None
        inspect = self.app.control.inspect(timeout=_REPLY_TIMEOUT)
        method: Callable[..., Any] = getattr(inspect, command)
        try:
            return dict(method(*args, **kwargs) or {})
        except FeedfanError:
            raise
        except Exception as e:
            raise self.link.error(e, f"could not carry the question {command!r} to workers") from e

    def consumed_queues(self) -> Replies | None:
        """``{node: [queue names]}`` of every worker that answers, briefly cached."""
        now = time.monotonic()
        if self._queues_answer is None or now - self._queues_answer[0] > _CACHE_SECONDS:
            replies = self.ask("active_queues")
            answer = (
                None
                if replies is None
                else {
                    node: [str(q.get("name")) for q in queues or () if isinstance(q, dict)]
                    for node, queues in replies.items()
                }
            )
            self._queues_answer = (time.monotonic(), answer)
        return self._queues_answer[1]

    def feedfan_nodes(self, names: Sequence[str]) -> list[str]:
        """Worker nodes that consume at least one of ``names``."""
        consumed = self.consumed_queues() or {}
        return sorted(node for node, queues in consumed.items() if set(queues) & set(names))

    # The dispatcher's hooks ------------------------------------------------------

    def consumer_count(self, name: str) -> int | None:
        """RabbitMQ: the queue's consumers; Redis: workers that say they consume it."""
        if self.link.kind == "amqp":
            return self._consumers_declared(name)
        consumed = self.consumed_queues()
        if consumed is None:
            return None
        return sum(name in queues for queues in consumed.values())

    def in_flight(self, names: Sequence[str]) -> int | None:
        """Messages of ``names`` taken by workers and not yet acknowledged.

        Redis: kombu's ``unacked`` hash, which also holds the messages of a
        worker that died, until they are restored. RabbitMQ: what the live
        workers say they run, have reserved or hold for a retry's countdown
        (a dead worker's messages are back in the queue already).
        """
        if self.link.kind == "redis":
            return self._unacked(names)
        wanted = set(names)
        held = 0
        for command in ("active", "reserved", "scheduled"):
            replies = self.ask(command, **({"safe": True} if command == "active" else {}))
            if replies is None:
                return None
            for entries in replies.values():
                for entry in entries or ():
                    info = entry.get("request", entry) if isinstance(entry, dict) else {}
                    delivery = info.get("delivery_info") or {}
                    if info.get("name") == TASK_NAME and delivery.get("routing_key") in wanted:
                        held += 1
        return held

    def findings(self, names: Sequence[str]) -> list[Finding]:
        """Configuration findings about the app, then what its live workers say."""
        found = app_findings(self.app, self.settings)
        live = self._worker_findings(names)
        if any(f.code == "celery.worker-prefetch" and f.level == "ok" for f in live):
            # The running workers were started with --prefetch-multiplier 1.
            found = [_soften(f) if f.code == "celery.prefetch" else f for f in found]
        return found + live

    def _worker_findings(self, names: Sequence[str]) -> list[Finding]:
        if not self.remote_control:
            return [
                Finding(
                    "warning",
                    "celery.remote-control-off",
                    "worker_enable_remote_control is off, so feedfan cannot see the running "
                    "workers' prefetch, serializers or acknowledgement, nor (on Redis) whether "
                    "anyone consumes its queues.",
                    "turn remote control on (the default) to let `feedfan check` and "
                    "`feedfan status` see the workers.",
                )
            ]
        nodes = self.feedfan_nodes(names)
        if not nodes:
            return []
        return [
            *self._prefetch_findings(nodes),
            *self._conf_findings(nodes),
            *self._task_findings(nodes),
        ]

    def _prefetch_findings(self, nodes: list[str]) -> list[Finding]:
        stats = self.ask("stats") or {}
        greedy = []
        for node in nodes:
            info = stats.get(node) or {}
            prefetch = info.get("prefetch_count")
            slots = (info.get("pool") or {}).get("max-concurrency")
            if isinstance(prefetch, int) and isinstance(slots, int) and prefetch > max(slots, 1):
                greedy.append(f"{node} (prefetch {prefetch} for {slots} process(es))")
        if greedy:
            return [
                Finding(
                    "error",
                    "celery.worker-prefetch",
                    f"worker(s) {', '.join(greedy)} reserve more chunks than they run: HIGH "
                    "chunks wait behind reserved LOW ones, and on Redis a chunk reserved longer "
                    "than the visibility timeout is delivered to a second worker.",
                    "restart them with --prefetch-multiplier 1 (or set "
                    "worker_prefetch_multiplier = 1); `feedfan worker` does this.",
                )
            ]
        return [
            Finding(
                "ok",
                "celery.worker-prefetch",
                f"{len(nodes)} worker(s) on feedfan's queues reserve one chunk per process.",
            )
        ]

    def _conf_findings(self, nodes: list[str]) -> list[Finding]:
        conf = self.ask("conf", with_defaults=True) or {}
        pickling = [
            node for node in nodes if accepts_pickle((conf.get(node) or {}).get("accept_content"))
        ]
        if not pickling:
            return []
        return [
            Finding(
                "error",
                "celery.worker-pickle",
                f"worker(s) {', '.join(pickling)} consume feedfan's queues and accept pickle "
                "content: a message put on those queues could run code as it is decoded.",
                "set accept_content = ['json'] in the app those workers run and restart them.",
            )
        ]

    def _task_findings(self, nodes: list[str]) -> list[Finding]:
        registered = self.ask("registered", "acks_late", "reject_on_worker_lost")
        early, missing = [], []
        for node in nodes:
            lines = [str(line) for line in (registered or {}).get(node) or ()]
            mine = [line for line in lines if line.split(" ", 1)[0] == TASK_NAME]
            if not mine:
                missing.append(node)
            elif "acks_late=True" not in mine[0] or "reject_on_worker_lost=True" not in mine[0]:
                early.append(f"{node} ({mine[0]})")
        found = []
        if missing:
            found.append(
                Finding(
                    "error",
                    "celery.worker-task-missing",
                    f"worker(s) {', '.join(missing)} consume feedfan's queues without feedfan's "
                    f"task {TASK_NAME!r}: they refuse its chunks.",
                    "call feedfan.backends.celery.register_tasks(app) in the module `celery -A` "
                    "imports, or run `feedfan worker`.",
                )
            )
        if early:
            found.append(
                Finding(
                    "error",
                    "celery.worker-acks-early",
                    f"worker(s) {', '.join(early)} acknowledge a chunk before writing it: a chunk "
                    "whose worker dies is lost.",
                    "remove what turns acks_late or reject_on_worker_lost off for "
                    f"{TASK_NAME} (task_annotations) and restart the workers.",
                )
            )
        return found


def _soften(finding: Finding) -> Finding:
    return Finding(
        "warning",
        finding.code,
        finding.message + " The running workers reserve one chunk per process, so they were "
        "started with --prefetch-multiplier 1; a worker started without it would not be.",
        finding.fix,
    )
