"""RQ jobs as feedfan writes and reads them: JSON only, one function, nothing else.

A feedfan job is an RQ job whose data is the JSON array
``["feedfan.backends.rq.run_task", null, [<task body>], {}]``. RQ's default
serializer would unpickle whatever sits in Redis; :class:`JSONJobSerializer`
reads UTF-8 JSON text and refuses anything else, and :class:`FeedfanJob` runs
nothing but that one function with one string argument. What cannot be read
or may not run fails into RQ's failed job registry of its queue, where
:func:`read_failed` finds it with the reason.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import redis
from redis.client import Pipeline
from rq.defaults import RQ_KEY_PREFIX
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result
from rq.utils import as_text

from feedfan.errors import PayloadError
from feedfan.storage.base import RejectedMessage

__all__ = [
    "RUN_TASK",
    "FailedJob",
    "JOB_CLASS_PATH",
    "FeedfanJob",
    "JSONJobSerializer",
    "SERIALIZER_PATH",
    "check_feedfan_call",
    "failure_reason",
    "job_body",
    "newest_failed",
    "purge_queue",
    "read_failed",
    "results_key",
    "write_raw_job",
]

logger = logging.getLogger("feedfan.worker")

RUN_TASK = "feedfan.backends.rq.run_task"
"""The only function a feedfan queue runs, by its import path."""

SERIALIZER_PATH = "feedfan.backends.rq.JSONJobSerializer"
"""What ``rq worker --serializer`` is given."""

JOB_CLASS_PATH = "feedfan.backends.rq.FeedfanJob"
"""What ``rq worker --job-class`` is given."""

_PICKLE_PROTOCOL_BYTE = b"\x80"


def _loads(data: bytes | bytearray | memoryview | str) -> Any:
    if isinstance(data, str):
        text = data
    else:
        raw = bytes(data)
        if raw.startswith(_PICKLE_PROTOCOL_BYTE):
            raise PayloadError(
                "RQ job data is pickled (it starts with pickle's protocol byte 0x80); feedfan "
                "reads JSON jobs only and never unpickles. Send feedfan tasks through feedfan "
                "(manager.add_user_activity), not with RQ's default pickle serializer."
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PayloadError(
                f"RQ job data is not UTF-8 JSON text (is it pickled?): {e}."
            ) from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise PayloadError(f"RQ job data is not JSON: {e}.") from None
    except RecursionError:
        raise PayloadError("RQ job data is JSON nested too deeply to read.") from None


class JSONJobSerializer:
    """RQ serializer of feedfan's queues: UTF-8 JSON, and a clear refusal of anything else.

    Pass it as ``rq worker --serializer feedfan.backends.rq.JSONJobSerializer``;
    feedfan's worker classes use it whatever ``--serializer`` says.
    """

    @staticmethod
    def dumps(obj: Any) -> bytes:
        """Encode ``obj`` as compact JSON (ASCII-escaped, so any text round-trips)."""
        return json.dumps(obj, separators=(",", ":")).encode("utf-8")

    @staticmethod
    def loads(data: bytes) -> Any:
        """Decode JSON; raise :class:`~feedfan.errors.PayloadError` for pickles and garbage."""
        return _loads(data)


def check_feedfan_call(job: Job) -> str:
    """Return the task body of ``job`` if it calls feedfan's function as feedfan does.

    Raise :class:`~feedfan.errors.PayloadError` otherwise: a feedfan queue never
    imports or runs a function named by a message.
    """
    func_name = job.func_name  # reading it decodes the data with the job's serializer
    if func_name != RUN_TASK:
        raise PayloadError(
            f"RQ job {job.id} calls {func_name!r}; feedfan's queues run only {RUN_TASK}. "
            "Refused: nothing was imported or run."
        )
    args, kwargs = job.args, job.kwargs
    if job.instance is not None or kwargs or len(args) != 1 or not isinstance(args[0], str):
        raise PayloadError(
            f"RQ job {job.id} calls {RUN_TASK} with {len(args)} argument(s) and keywords "
            f"{sorted(kwargs)}; expected one task body string."
        )
    return args[0]


class FeedfanJob(Job):
    """An RQ job that runs only :data:`RUN_TASK`, and has no callbacks.

    RQ resolves a job's function and callbacks from import paths stored in
    Redis; this class refuses every path but feedfan's before anything is
    imported, so whoever can write to the queue cannot choose code to run.
    """

    @property
    def func(self) -> Any:
        """feedfan's task function, after :func:`check_feedfan_call` accepted the job."""
        check_feedfan_call(self)
        return super().func

    def _refuse_callback(self, kind: str, name: str | None) -> None:
        if name:
            raise PayloadError(
                f"RQ job {self.id} names a {kind} callback {name!r}; feedfan jobs have none. "
                "Refused: nothing was imported or run."
            )

    @property
    def success_callback(self) -> None:
        """Always ``None``; a job naming one is refused."""
        self._refuse_callback("success", self._success_callback_name)

    @property
    def failure_callback(self) -> None:
        """Always ``None``; a job naming one is refused."""
        self._refuse_callback("failure", self._failure_callback_name)

    @property
    def stopped_callback(self) -> None:
        """Always ``None``; a job naming one is refused."""
        self._refuse_callback("stopped", self._stopped_callback_name)


def failure_reason(exc_string: str | None) -> str:
    """One line saying why a job failed, from RQ's stored traceback text.

    The last exception line of the traceback; when it was raised from another
    exception (RQ wraps serializer errors in ``DeserializationError``), the
    original's line is added, since that is the one that explains.
    """
    if not exc_string or not exc_string.strip():
        return "failed (RQ recorded no reason)"
    lines = [line.rstrip() for line in exc_string.strip().splitlines()]
    headlines = [
        line
        for line in lines
        if line
        and not line[0].isspace()
        and not line.startswith("Traceback (most recent call last)")
        and not line.startswith("The above exception was the direct cause")
        and not line.startswith("During handling of the above exception")
    ]
    if not headlines:
        return lines[-1].strip()
    last = headlines[-1]
    if len(headlines) > 1 and headlines[-2] != last:
        return f"{last} (caused by {headlines[-2]})"
    return last


def job_body(data: bytes | None) -> str:
    """The task body a stored job carries, or its raw data as text if it is not a feedfan job."""
    if not data:
        return ""
    try:
        raw = zlib.decompress(data)
    except zlib.error:
        raw = data
    try:
        decoded = _loads(raw)
    except PayloadError:
        decoded = None
    if (
        isinstance(decoded, list)
        and len(decoded) == 4
        and isinstance(decoded[2], list)
        and len(decoded[2]) == 1
        and isinstance(decoded[2][0], str)
    ):
        body: str = decoded[2][0]
        return body.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class FailedJob:
    """A job in a failed job registry: its id, queue and the time it entered."""

    job_id: str
    queue: Queue
    score: float


def results_key(job_id: str) -> str:
    """The Redis stream where RQ keeps a job's results and failures."""
    return str(Result.get_key(job_id))  # type: ignore[no-untyped-call]


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def _exc_string(result: list[Any], job_hash: dict[bytes, bytes]) -> str:
    # RQ 3 keeps the traceback in the job's result stream; older releases on the job hash.
    if result:
        payload = result[0][1]
        encoded = payload.get(b"exc_string")
        if encoded:
            try:
                return zlib.decompress(base64.b64decode(encoded)).decode("utf-8", "replace")
            except (ValueError, zlib.error):
                return _text(encoded)
    stored = job_hash.get(b"exc_info")
    if stored:
        try:
            return zlib.decompress(stored).decode("utf-8", "replace")
        except zlib.error:
            return _text(stored)
    return ""


def _failed_at(job_hash: dict[bytes, bytes], score: float) -> float:
    ended = _text(job_hash.get(b"ended_at"))
    if ended:
        try:
            return datetime.fromisoformat(ended.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    ttl = _text(job_hash.get(b"failure_ttl"))
    return score - int(ttl) if ttl.lstrip("-").isdigit() and int(ttl) > 0 else score


def newest_failed(
    connection: redis.Redis, queues: Sequence[Queue], limit: int | None
) -> list[FailedJob]:
    """Failed jobs of ``queues``, newest first (RQ scores them by failure time plus TTL)."""
    found: list[FailedJob] = []
    end = -1 if limit is None else limit - 1
    for queue in queues:
        rows = cast(
            "list[tuple[bytes, float]]",
            connection.zrevrange(queue.failed_job_registry.key, 0, end, withscores=True),
        )
        found.extend(FailedJob(_text(job_id), queue, float(score)) for job_id, score in rows)
    found.sort(key=lambda failed: failed.score, reverse=True)
    return found if limit is None else found[:limit]


def read_failed(connection: redis.Redis, failed: Sequence[FailedJob]) -> list[RejectedMessage]:
    """Body, reason and time of each failed job, read raw in one round trip (never unpickled)."""
    if not failed:
        return []
    with connection.pipeline(transaction=False) as pipe:
        for item in failed:
            pipe.hgetall(Job.key_for(item.job_id))
            pipe.xrevrange(results_key(item.job_id), "+", "-", count=1)
        replies = pipe.execute()
    messages = []
    for index, item in enumerate(failed):
        job_hash, result = replies[2 * index], replies[2 * index + 1]
        if not job_hash:
            continue  # expired between the two reads
        messages.append(
            RejectedMessage(
                queue=item.queue.name,
                reason=failure_reason(_exc_string(result, job_hash)),
                body=job_body(job_hash.get(b"data")),
                at=_failed_at(job_hash, item.score),
            )
        )
    return messages


def write_raw_job(pipe: Pipeline, queue: Queue, job_id: str, data: bytes, timeout: int) -> None:
    """Queue a job hash whose data is ``data`` as is, the way another program could (tests)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    pipe.hset(
        Job.key_for(job_id),
        mapping={
            "data": data,
            "origin": queue.name,
            "status": JobStatus.QUEUED.value,
            "created_at": stamp,
            "enqueued_at": stamp,
            "description": "raw message pushed by feedfan (test)",
            "timeout": timeout,
        },
    )
    pipe.sadd(Queue.redis_queues_keys, queue.key)
    pipe.rpush(queue.key, job_id)


_REGISTRIES = (
    "started_job_registry",
    "failed_job_registry",
    "finished_job_registry",
    "deferred_job_registry",
    "scheduled_job_registry",
    "canceled_job_registry",
    "ready_job_registry",
)


def purge_queue(connection: redis.Redis, queue: Queue) -> None:
    """Delete ``queue``, its intermediate list, its registries and every job they name."""
    registries = [getattr(queue, name).key for name in _REGISTRIES if hasattr(type(queue), name)]
    lists = [queue.key, queue.intermediate_queue_key]
    ids: set[str] = set()
    for key in lists:
        ids.update(as_text(i) for i in cast("list[bytes]", connection.lrange(key, 0, -1)))
    for key in registries:
        members = cast("list[bytes]", connection.zrange(key, 0, -1))
        # Started-registry members are "<job id>:<execution id>"; job ids have no colon.
        ids.update(as_text(i).split(":", 1)[0] for i in members)
    doomed = [
        *lists,
        *registries,
        queue.registry_cleaning_key,
        f"{RQ_KEY_PREFIX}:workers:{queue.name}",
    ]
    for job_id in ids:
        doomed += [Job.key_for(job_id), Job.dependents_key_for(job_id)]
        doomed += [results_key(job_id), f"{RQ_KEY_PREFIX}:executions:{job_id}"]
    with connection.pipeline(transaction=False) as pipe:
        for start in range(0, len(doomed), 1000):
            pipe.delete(*doomed[start : start + 1000])
        pipe.srem(Queue.redis_queues_keys, queue.key)
        pipe.execute()
