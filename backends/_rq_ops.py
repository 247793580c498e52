"""Looking into a running RQ deployment: for `feedfan status`, `drain` and `check`.

Everything is read raw from Redis, never through RQ calls that clean up as
they count (``StartedJobRegistry.count`` would move an abandoned chunk to the
failed registry, spending a retry feedfan's worker would not have spent):

* held by workers: the entries of each queue's started registry (a dead
  worker's entry stays until a maintenance pass gives the chunk back) plus
  the queue's intermediate list (popped, not yet registered);
* consumers: the workers registered for a queue (``rq:workers:<queue>``)
  whose key still exists. A SIGKILLed worker is counted until its key expires
  (RQ's ``worker_ttl`` plus 60 s); one stopped warmly is gone at once;
* the worker class and serializer of live workers: RQ does not record them,
  so they are read from the command line (and ``RQ_*`` environment) of
  workers running on this host. Workers on other hosts are listed as not
  visible.
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import redis
from rq.queue import Queue
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from feedfan.dispatch import Finding

from ._rq_jobs import SERIALIZER_PATH
from ._rq_worker import FeedfanForkWorker, FeedfanWorker

__all__ = ["LiveWorker", "live_workers", "rq_findings", "rq_in_flight", "rq_consumers"]

_FEEDFAN_CLASSES = frozenset(
    {
        "feedfan.backends.rq.FeedfanWorker",
        "feedfan.backends.rq.FeedfanForkWorker",
        "feedfan.backends._rq_worker.FeedfanWorker",
        "feedfan.backends._rq_worker.FeedfanForkWorker",
    }
)
_JSON_SERIALIZERS = frozenset(
    {
        SERIALIZER_PATH,
        "feedfan.backends._rq_jobs.JSONJobSerializer",
        "json",
        "rq.serializers.JSONSerializer",
    }
)
_FEEDFAN_JOB_CLASSES = frozenset(
    {"feedfan.backends.rq.FeedfanJob", "feedfan.backends._rq_jobs.FeedfanJob"}
)
_DEFAULT_WORKER_CLASS = "rq.Worker"
_DEFAULT_SERIALIZER = "rq.serializers.DefaultSerializer (pickle)"
_DEFAULT_JOB_CLASS = "rq.job.Job"


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def rq_in_flight(connection: redis.Redis, queues: Sequence[Queue]) -> int:
    """Chunks workers hold: started-registry entries plus intermediate lists, of ``queues``."""
    with connection.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.zcard(queue.started_job_registry.key)
            pipe.llen(queue.intermediate_queue_key)
        return sum(int(count) for count in pipe.execute())


def _worker_keys(connection: redis.Redis, queue_name: str) -> list[str]:
    members = cast("set[bytes]", connection.smembers(WORKERS_BY_QUEUE_KEY % queue_name))
    keys = sorted(_text(member) for member in members)
    if not keys:
        return []
    with connection.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.exists(key)
            pipe.hexists(key, "death")
        replies = pipe.execute()
    return [
        key for index, key in enumerate(keys) if replies[2 * index] and not replies[2 * index + 1]
    ]


def rq_consumers(connection: redis.Redis, queue_name: str) -> int:
    """Workers registered for ``queue_name`` whose key exists and that did not register a death."""
    return len(_worker_keys(connection, queue_name))


@dataclass(frozen=True)
class LiveWorker:
    """A registered worker of a feedfan queue, with what could be seen of how it was started."""

    key: str
    pid: int | None
    hostname: str
    argv: tuple[str, ...] | None
    """Its command line when it runs on this host and is readable; ``None`` otherwise."""

    environ: dict[str, str]

    def option(self, long: str, short: str, variable: str | None, default: str) -> str:
        """The value the ``rq`` command line gave ``long``/``short`` (or its variable, or default)."""
        argv = self.argv or ()
        for index, arg in enumerate(argv):
            if arg in (long, short) and index + 1 < len(argv):
                return argv[index + 1]
            if arg.startswith(long + "="):
                return arg.split("=", 1)[1]
        if variable and variable in self.environ:
            return self.environ[variable]
        return default

    @property
    def is_rq_command(self) -> bool:
        """Whether its command line is the ``rq worker`` (or ``worker-pool``) command."""
        argv = self.argv or ()
        return any(Path(a).name == "rq" for a in argv[:3]) and any(
            a in ("worker", "worker-pool") for a in argv[:4]
        )

    @property
    def described(self) -> str:
        """``name (pid N on host)`` for messages."""
        name = self.key.rsplit(":", 1)[-1]
        return f"{name} (pid {self.pid} on {self.hostname})"


def _proc(pid: int, name: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return None


def live_workers(connection: redis.Redis, queue_names: Sequence[str]) -> list[LiveWorker]:
    """Registered workers of ``queue_names``, with the command line of those on this host."""
    keys = sorted({key for name in queue_names for key in _worker_keys(connection, name)})
    here = socket.gethostname()
    found = []
    for key in keys:
        fields = cast("dict[bytes, bytes]", connection.hgetall(key))
        pid_text = _text(fields.get(b"pid"))
        pid = int(pid_text) if pid_text.isdigit() else None
        hostname = _text(fields.get(b"hostname"))
        argv = environ = None
        if pid is not None and hostname == here:
            raw_argv, raw_env = _proc(pid, "cmdline"), _proc(pid, "environ")
            if raw_argv:
                argv = tuple(_text(part) for part in raw_argv.split(b"\0") if part)
            if raw_env:
                pairs = (_text(part).partition("=") for part in raw_env.split(b"\0") if part)
                environ = {name: value for name, _, value in pairs if name.startswith("RQ_")}
        found.append(LiveWorker(key, pid, hostname, argv, environ or {}))
    return found


def _is_feedfan_class(path: str) -> bool:
    if path in _FEEDFAN_CLASSES:
        return True
    module_name, _, attribute = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(found, type) and issubclass(found, (FeedfanWorker, FeedfanForkWorker))


def _worker_finding(worker: LiveWorker) -> Finding | None:
    worker_class = worker.option("--worker-class", "-w", "RQ_WORKER_CLASS", _DEFAULT_WORKER_CLASS)
    if _is_feedfan_class(worker_class):
        return None
    serializer = worker.option("--serializer", "-S", None, _DEFAULT_SERIALIZER)
    job_class = worker.option("--job-class", "-j", "RQ_JOB_CLASS", _DEFAULT_JOB_CLASS)
    fix = (
        "stop it and start feedfan's worker instead: `feedfan worker` (or `rq worker "
        "--worker-class feedfan.backends.rq.FeedfanWorker --serializer "
        f"{SERIALIZER_PATH} --job-class feedfan.backends.rq.FeedfanJob ...`)."
    )
    if serializer not in _JSON_SERIALIZERS:
        return Finding(
            "error",
            "rq.pickle-worker",
            f"RQ worker {worker.described} serves feedfan's queues with worker class "
            f"{worker_class} and serializer {serializer}: it unpickles what it reads, so a "
            "message put on feedfan's queues could run code, and it fails every feedfan chunk.",
            fix,
        )
    if job_class not in _FEEDFAN_JOB_CLASSES:
        return Finding(
            "error",
            "rq.foreign-worker",
            f"RQ worker {worker.described} serves feedfan's queues with worker class "
            f"{worker_class} and job class {job_class}: it imports and runs whatever function "
            "a job names.",
            fix,
        )
    return Finding(
        "warning",
        "rq.foreign-worker",
        f"RQ worker {worker.described} serves feedfan's queues with worker class "
        f"{worker_class}: the chunks of a worker that dies are failed after RQ's 10-minute "
        "maintenance instead of delivered again.",
        fix,
    )


def rq_findings(connection: redis.Redis, queue_names: Sequence[str]) -> list[Finding]:
    """What ``feedfan check`` says about the live RQ workers of feedfan's queues."""
    workers = live_workers(connection, queue_names)
    findings: list[Finding] = []
    seen = hidden = 0
    for worker in workers:
        if worker.argv is None:
            hidden += 1
            continue
        if not worker.is_rq_command:
            hidden += 1
            continue
        seen += 1
        finding = _worker_finding(worker)
        if finding is not None:
            findings.append(finding)
    if seen and not findings:
        findings.append(
            Finding(
                "ok",
                "rq.workers",
                f"{seen} RQ worker(s) on this host serve feedfan's queues with feedfan's worker "
                "class (JSON jobs, lost chunks delivered again).",
            )
        )
    if hidden:
        findings.append(
            Finding(
                "ok",
                "rq.workers-not-visible",
                f"{hidden} RQ worker(s) of feedfan's queues run elsewhere or were not started "
                "with `rq worker`; their worker class cannot be seen from here.",
            )
        )
    return findings
