"""feedfan's RQ worker classes: JSON jobs only, and no chunk left behind by a killed worker.

RQ records a running job in its queue's ``StartedJobRegistry`` with an
expiry time; when a worker dies, RQ's periodic maintenance finds the expired
entry and either spends one of the job's retries or moves it to the failed
registry, and it looks only every ten minutes by default. feedfan's workers
change three things:

* a running job's entry expires ``redelivery_timeout`` seconds after its
  last heartbeat (more than ``chunk_time_limit``, which the settings enforce,
  so a chunk still running is never taken for lost);
* maintenance runs every :func:`maintenance_interval` seconds, and first puts
  every abandoned job back at the head of its queue, without spending a
  retry, up to :data:`MAX_REDELIVERIES` times (a chunk that took its worker
  down that often is failed rather than looped on);
* a work-horse killed under a forking worker is put back the same way at once.

Chunks are idempotent, so running one again is harmless. The workers also
cut RQ's bookkeeping to one Redis round trip a chunk: the script call that
finishes a job takes the next one and starts it, sending the commands RQ's
own methods write; see docs/rq.md.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
import uuid
import zlib
from typing import Any, cast

from redis import exceptions as redis_errors
from redis.backoff import ExponentialBackoff
from redis.commands.core import CoreCommands
from redis.exceptions import WatchError
from redis.retry import Retry
from rq.defaults import DEFAULT_FAILURE_TTL, RQ_KEY_PREFIX
from rq.exceptions import DeserializationError, NoSuchJobError, StopRequested
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result
from rq.suspension import is_suspended
from rq.utils import as_text, current_timestamp, now, utcformat, utcparse
from rq.worker import BaseWorker, SimpleWorker, Worker, WorkerStatus

from feedfan.config import Settings
from feedfan.errors import PayloadError
from feedfan.runner import get_runner
from feedfan.task import decode_task

from ._rq_jobs import RUN_TASK, FeedfanJob, JSONJobSerializer, failure_reason

__all__ = [
    "MAX_REDELIVERIES",
    "FeedfanForkWorker",
    "FeedfanWorker",
    "maintenance_interval",
    "redelivery_bound",
]

logger = logging.getLogger("feedfan.worker")

MAX_REDELIVERIES = 5
"""Times a job lost with its worker is delivered again before it is failed as a poison pill."""

_REDELIVERIES = "feedfan_redeliveries"
_HEARTBEAT_EVERY = 1.0
"""Seconds between a worker's default heartbeats; RQ would send three per job."""
_SUSPENSION_EVERY = 1.0
"""Seconds between checks for ``rq suspend`` while jobs keep coming; RQ checks before each."""
_INTERMEDIATE_GRACE = 60
"""RQ fails a job stuck in a queue's intermediate list after a minute."""

_RUN_AND_TAKE = """
-- Runs the finish commands, then, unless ARGV[1] is empty, takes the first waiting job and
-- starts it. KEYS are the worker's queues in the order it serves them, then a key naming
-- this call. ARGV[1] is the prefix of job keys; ARGV[2] the index in ARGV where the start
-- commands begin; ARGV[3] and ARGV[4] the stand-ins for the job id and the queue name in
-- them; ARGV[5 ..] the names of the queues in KEYS, then the finish commands and the start
-- commands, each as its argument count, then its arguments. The taken job's start commands
-- run with the stand-ins replaced, and {queue number, job id, job hash} is returned. Ids
-- whose job is gone are dropped, as RQ drops them. All of it at once, like a MULTI. A call
-- sent again after its reply was lost (a client retrying on a dropped connection) finds
-- its own key and returns what it took the first time, running nothing twice.
local queues = #KEYS - 1
local first_start = tonumber(ARGV[2])
local call = KEYS[#KEYS]
if ARGV[1] ~= '' then
  local earlier = redis.call('GET', call)
  if earlier then
    if earlier == '' then return false end
    local at = string.find(earlier, ':', 1, true)
    local id = string.sub(earlier, at + 1)
    return {tonumber(string.sub(earlier, 1, at - 1)), id, redis.call('HGETALL', ARGV[1] .. id)}
  end
end
local function run(from, to, swaps)
  local i = from
  while i < to do
    local count = tonumber(ARGV[i])
    if swaps then
      local args = {}
      for a = 1, count do
        local value = ARGV[i + a]
        for s = 1, #swaps, 2 do
          local at = string.find(value, swaps[s], 1, true)
          if at then
            local parts, from_at = {}, 1
            while at do
              parts[#parts + 1] = string.sub(value, from_at, at - 1)
              parts[#parts + 1] = swaps[s + 1]
              from_at = at + #swaps[s]
              at = string.find(value, swaps[s], from_at, true)
            end
            parts[#parts + 1] = string.sub(value, from_at)
            value = table.concat(parts)
          end
        end
        args[a] = value
      end
      redis.call(unpack(args))
    else
      redis.call(unpack(ARGV, i + 1, i + count))
    end
    i = i + count + 1
  end
end
run(5 + queues, first_start, nil)
if ARGV[1] == '' then return false end
for q = 1, queues do
  while true do
    local id = redis.call('LPOP', KEYS[q])
    if not id then break end
    local key = ARGV[1] .. id
    if redis.call('EXISTS', key) == 1 then
      run(first_start, #ARGV + 1, {ARGV[3], id, ARGV[4], ARGV[4 + q]})
      redis.call('SET', call, q .. ':' .. id, 'EX', 600)
      return {q, id, redis.call('HGETALL', key)}
    end
  end
end
redis.call('SET', call, '', 'EX', 600)
return false
"""


class _Commands(CoreCommands):
    """Records the commands RQ's own methods queue on a pipeline, to send them as one script.

    RQ builds its bookkeeping (execution records, registries, job and worker
    hashes) on a pipeline; a MULTI of fourteen commands costs twice the round
    trip of one script call carrying the same commands.
    """

    _event_dispatcher: Any = None  # redis-py's command mixins declare it; nothing here sends

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(args)
        return self


_Held = tuple[Queue, str, list[Any], Execution, int]
"""A job a take started: its queue, id and hash, its execution and that one's heartbeat TTL."""


def maintenance_interval(settings: Settings) -> int:
    """Seconds between a feedfan worker's maintenance passes: a quarter of ``redelivery_timeout``.

    Between 1 and 60: often enough that a lost chunk waits little beyond
    ``redelivery_timeout``, rarely enough to cost nothing (a few commands
    per queue).
    """
    return max(1, min(settings.redelivery_timeout // 4, 60))


def redelivery_bound(settings: Settings) -> float:
    """Seconds within which a chunk whose worker was SIGKILLed runs again, a worker being up.

    A job's started-registry entry expires ``redelivery_timeout`` after its
    last heartbeat and the next maintenance pass, at most one interval later,
    puts it back; a job taken with the last one's finish is registered in
    the same call, so it is found the same way. A job RQ's own blocking
    wait took for a worker of one queue, whose worker was killed before
    registering it, is left in RQ's intermediate list, which RQ recovers a
    minute after a maintenance pass first sees it. One more interval covers
    the queue wait of a job put back at the head of its queue.
    """
    interval = maintenance_interval(settings)
    return float(max(settings.redelivery_timeout, _INTERMEDIATE_GRACE + interval) + 2 * interval)


def _retry_dropped_commands(connection: Any) -> None:
    """Make ``connection`` retry a command whose connection dropped, unless it already does.

    ``rq worker`` and ``rq worker-pool`` build clients on which redis-py
    retries nothing: a connection dropped in the middle of a command (a Redis
    restart or failover, ``CLIENT KILL``) raises. RQ handles that while it
    waits for a job, but not in the heartbeat after each one, where the error
    makes the worker quit. Retried as feedfan's storage retries its writes.
    """
    current = connection.get_retry()
    if current is None or current.get_retries() == 0:
        connection.set_retry(Retry(ExponentialBackoff(cap=2.0, base=0.05), 6))


def _ensure_feedfan_logging() -> None:
    # `--quiet` silences RQ's per-job lines; feedfan's own events still show at INFO.
    feedfan_logger = logging.getLogger("feedfan")
    if not feedfan_logger.handlers and feedfan_logger.level == logging.NOTSET:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        feedfan_logger.addHandler(handler)
        feedfan_logger.setLevel(logging.INFO)
        feedfan_logger.propagate = False


class _FeedfanWorkerMixin(BaseWorker):
    """The behaviour both feedfan worker classes share; see the module docstring."""

    log_result_lifespan = False

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        # Whatever `--serializer` or `--job-class` said (the CLI default is pickle),
        # feedfan's queues are read as JSON by a job class that runs one function.
        listed = queues if isinstance(queues, (list, tuple)) else [queues]
        if kwargs.get("connection") is None:
            for queue in listed:
                if isinstance(queue, Queue):
                    kwargs["connection"] = queue.connection
                    break
        kwargs["serializer"] = JSONJobSerializer
        kwargs["job_class"] = FeedfanJob
        names = [queue.name if isinstance(queue, Queue) else queue for queue in listed]
        super().__init__(names, *args, **kwargs)
        self._lost_job_id: str | None = None
        self._state_sent: str | None = None
        self._started_job_id: str | None = None
        self._suspension_checked: float | None = None
        self._redelivery_timeout: int | None = None
        _retry_dropped_commands(self.connection)
        self._held: _Held | None = None
        self._looked = False  # the last finish looked for the next job: _held is what it found
        self._started: _Held | None = None  # the held job, between its take and its run
        self._script = self.connection.register_script(_RUN_AND_TAKE)
        # Start commands are recorded for a stand-in job, whose id and queue name the take
        # replaces with the taken job's: RQ's own methods write them, as for any job.
        token = uuid.uuid4().hex
        self._stand_in = self.job_class(f"feedfan-taken-{token}", connection=self.connection)
        self._stand_in.origin = f"feedfan-queue-{token}"
        self._calls_prefix = f"{RQ_KEY_PREFIX}:feedfan:take:"
        self._last_call_key = ""

    # Settings ---------------------------------------------------------------

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        """Build the runner (fail fast on a bad app or settings), then RQ's start-up."""
        _ensure_feedfan_logging()
        settings = get_runner().settings
        self._redelivery_timeout = settings.redelivery_timeout
        self.maintenance_interval = maintenance_interval(settings)
        self.job_monitoring_interval = max(1, min(self.job_monitoring_interval, self._third()))
        super().bootstrap(*args, **kwargs)
        logger.info(
            "feedfan RQ worker %s on %s: a chunk lost with its worker runs again after "
            "%d s (maintenance every %d s, at most %d times)",
            self.name,
            ", ".join(self.queue_names()),
            settings.redelivery_timeout,
            self.maintenance_interval,
            MAX_REDELIVERIES,
        )

    def _third(self) -> int:
        return max(1, (self._redelivery_timeout or 600) // 3)

    @property
    def dequeue_timeout(self) -> int:
        """Block on the queues no longer than a maintenance interval, so maintenance runs idle."""
        return max(1, min(super().dequeue_timeout, int(self.maintenance_interval)))

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's worker heartbeat in one round trip, and at most once a second between jobs.

        RQ sends its three commands one by one, three times per job (before
        and after each wait for a job, and after each job): nine of the
        twenty-nine round trips a chunk cost. Here each is one pipeline, and
        the default-TTL heartbeat is skipped when one went out less than a
        second ago: the worker's key still has minutes to live.
        """
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        last = self.last_heartbeat
        if (
            timeout is None
            and last is not None
            and 0 <= (now() - last).total_seconds() < _HEARTBEAT_EVERY
        ):
            return
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(timeout, pipeline=pipe)
            pipe.execute()

    def subscribe(self) -> None:
        """RQ's subscription to its command channel, its thread deaf to SIGTERM and SIGINT.

        A signal sent to a process (``kill``, a worker pool stopping its
        workers, a service manager) goes to any of its threads that does not
        block it. Taken by the thread RQ starts here to listen for commands,
        Python runs the handler only once the main thread's blocking wait
        for a job returns: a warm shutdown of an idle worker then waited up
        to the dequeue timeout (60 s), about one time in four. A thread
        starts with the signal mask of the thread that starts it.
        """
        stops = {signal.SIGTERM, signal.SIGINT}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            super().subscribe()  # type: ignore[no-untyped-call]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's state change, not sent again when Redis already holds it.

        A one-process worker sets IDLE after each job and again as it starts
        waiting for the next: the second write is a round trip for nothing.
        A change queued on a pipeline counts once :meth:`_sent` says the
        pipeline ran.
        """
        if pipeline is None and state == self._state_sent:
            self._state = state
            return
        if pipeline is None and state == WorkerStatus.IDLE and self._held is not None:
            return  # the job taken with the last finish is started: the worker stays busy
        if state == WorkerStatus.SUSPENDED:
            self._give_back()  # `rq suspend` came after feedfan's own check: hold nothing
        super().set_state(state, pipeline=pipeline)
        self._state_sent = state if pipeline is None else None

    def _sent(self, state: str) -> None:
        """The pipeline holding ``set_state(state, pipeline)`` has run."""
        self._state_sent = state

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's check for ``rq suspend``, at most once a second while jobs keep coming.

        RQ reads the suspension flag (with a heartbeat) before every job: one
        round trip a chunk. A suspended feedfan worker stops taking chunks
        within a second instead, as it does when idle, and puts back the job
        it took with the last one's finish.
        """
        checked = self._suspension_checked
        if checked is not None and 0 <= time.monotonic() - checked < _SUSPENSION_EVERY:
            return
        if self._holding() and is_suspended(self.connection):
            self._give_back()
        super().check_for_suspension(burst)
        self._suspension_checked = time.monotonic()

    def run_maintenance_tasks(self) -> None:
        """RQ's maintenance, once the job taken with the last finish has run.

        That job is started already; a maintenance pass (a few round trips a
        queue) would only delay it.
        """
        if not self._holding():
            super().run_maintenance_tasks()  # type: ignore[no-untyped-call]

    def teardown(self) -> None:
        """Put back a job taken but not run, then RQ's teardown."""
        self._give_back()
        if self._last_call_key:
            with contextlib.suppress(redis_errors.RedisError):
                self.connection.delete(self._last_call_key)
        super().teardown()  # type: ignore[no-untyped-call]

    # Taking, starting and finishing a job -------------------------------------

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """The job taken with the last one's finish, or one waiting; else RQ's wait.

        RQ pops a job id, reads the job, then records it started: three round
        trips, and a worker of several queues pops with LPOP/BLPOP, so a
        worker killed right after its pop loses the job. Here one script
        call, the one that finished the previous job, pops the id of the
        first waiting job in the worker's queue order, records it started
        with the commands RQ's own methods write (execution record, started
        registry, job status, worker busy) and returns the job hash: a worker
        that dies after it leaves a started job, which maintenance delivers
        again. Only when no job waits does RQ's own blocking wait run.
        """
        held, looked = self._held, self._looked
        if held is None:  # a job taken with the last finish is started: the worker is busy
            self.set_state(WorkerStatus.IDLE)
        self.heartbeat()
        # Until here teardown gives the held job back, should the heartbeat fail.
        self._held, self._looked = None, False
        while True:
            if not looked:  # not looked for with the last finish: look now
                if self._stop_requested:  # asked while the last take was on its way
                    raise StopRequested()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                try:
                    held = self._send_and_take(_Commands())
                except (redis_errors.ConnectionError, redis_errors.TimeoutError):
                    break  # RQ's own wait below reconnects and reports
            if held is None:
                break
            taken = self._taken(held)
            if taken is not None:
                job, queue = taken
                self._started = held
                self.reorder_queues(reference_queue=queue)
                version = self.get_redis_server_version()  # type: ignore[no-untyped-call]
                job.redis_server_version = version
                self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id)
                return job, queue
            looked = False
        if self._stop_requested:  # asked during a take: RQ's wait would not look
            raise StopRequested()
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def _send(self, commands: _Commands) -> None:
        """Send ``commands`` in one script call."""
        self._call(commands, [], _Commands(), "")

    def _send_and_take(self, commands: _Commands) -> _Held | None:
        """Send ``commands``, then take the next waiting job and start it, in one script call."""
        start = _Commands()
        pipe = cast(Any, start)
        stand_in = self._stand_in
        ttl = self.get_heartbeat_ttl(stand_in)
        # RQ's methods also set the worker's own state and heartbeat time. The heartbeat
        # holds only if a job is taken. The state stays BUSY while the call is on its way:
        # a SIGTERM then marks a stop (RQ raises out of the call for an idle worker, leaving
        # a job it took unrun), and a take that found nothing restores it, and stops.
        state, last_heartbeat = self.get_state(), self.last_heartbeat
        execution = Execution.create(stand_in, ttl, pipeline=pipe, worker_name=self.name)
        self.set_state(WorkerStatus.BUSY, pipeline=pipe)
        self.heartbeat(ttl, pipeline=pipe)
        started_heartbeat, self.last_heartbeat = self.last_heartbeat, last_heartbeat
        stand_in.prepare_for_execution(self.name, pipeline=pipe)
        pipe.persist(stand_in.key)
        queues = list(self._ordered_queues)
        # Each take leaves a key naming it; the next one deletes it: its reply came back.
        call_key = f"{self._calls_prefix}{execution.id}"
        if self._last_call_key:
            cast(Any, commands).delete(self._last_call_key)
        self._last_call_key = call_key  # (should the reply be lost, the next take deletes it)
        reply = None
        try:
            reply = self._call(commands, queues, start, call_key)
        finally:
            if not reply:
                self._state = state
        if not reply:
            return None  # no job waited
        self.last_heartbeat = started_heartbeat
        self._sent(WorkerStatus.BUSY)
        number, raw_id, fields = reply
        execution.job_id = as_text(raw_id)
        execution._job = None  # not the stand-in: RQ fetches the job when asked for it
        return queues[int(number) - 1], execution.job_id, fields, execution, ttl

    def _call(
        self, commands: _Commands, queues: list[Queue], start: _Commands, call_key: str
    ) -> Any:
        stand_in = self._stand_in
        args: list[Any] = [self.job_class.redis_job_namespace_prefix if queues else "", 0]
        args += [stand_in.id, stand_in.origin, *(q.name for q in queues)]
        for command in commands.commands:
            args.append(len(command))
            args.extend(command)
        args[1] = len(args) + 1  # ARGV counts from 1
        for command in start.commands:
            args.append(len(command))
            args.extend(command)
        keys = [q.key for q in queues] + [call_key or self._calls_prefix]
        return self._script(keys=keys, args=args, client=self.connection)

    def _taken(self, held: _Held) -> tuple[Job, Queue] | None:
        """The job a take returned, or ``None`` if its hash does not load (it is refused)."""
        queue, job_id, fields, execution, _ = held
        job = self.job_class(job_id, connection=self.connection, serializer=self.serializer)
        raw = dict(zip(fields[::2], fields[1::2], strict=True))
        try:
            job.restore(raw)
        except Exception as e:  # RQ's own dequeue would let this stop the worker
            self._refuse_unreadable(queue, job_id, _unreadable_reason(raw, e), execution)
            return None
        return job, queue

    def _unstart(self, queue: Queue, job_id: str, execution: Execution, pipe: Any) -> None:
        """Add to ``pipe`` what undoes a take's start of ``job_id``: its execution, busy state."""
        job = self.job_class(job_id, connection=self.connection)
        job.origin = queue.name
        execution.delete(job, pipeline=pipe)
        self._state_sent = None  # the take said BUSY; the next state is written whatever it is

    def _refuse_unreadable(
        self, queue: Queue, job_id: str, reason: str, execution: Execution
    ) -> None:
        """Keep a job whose hash does not load in its queue's failed registry, with ``reason``."""
        logger.warning(
            "feedfan refused RQ job %s from queue %s: %s It is kept in that queue's failed job "
            "registry; the worker goes on.",
            job_id,
            queue.name,
            reason,
        )
        with self.connection.pipeline() as pipe:
            self._unstart(queue, job_id, execution, pipe)
            key = self.job_class.key_for(job_id)
            pipe.hset(
                key,
                mapping={"status": JobStatus.FAILED, "exc_info": zlib.compress(reason.encode())},
            )
            expires = current_timestamp() + DEFAULT_FAILURE_TTL
            pipe.zadd(queue.failed_job_registry.key, {job_id: expires})
            pipe.execute()

    def _holding(self) -> bool:
        return self._held is not None

    def _give_back(self) -> None:
        """Put a job taken but not run back at the head of its queue, queued as it was."""
        held, self._held, self._looked = self._held, None, False
        if held is None:
            return
        queue, job_id, _, execution, _ = held
        with self.connection.pipeline() as pipe:
            self._unstart(queue, job_id, execution, pipe)
            key = self.job_class.key_for(job_id)
            pipe.hset(
                key, mapping={"status": JobStatus.QUEUED, "started_at": "", "worker_name": ""}
            )
            pipe.lpush(queue.key, job_id)
            pipe.execute()

    def prepare_execution(self, job: Job) -> Execution:
        """RQ's two start-of-job writes at once, in one script call, before the job runs.

        A job taken by a finish or a take of feedfan's was started by that
        call; only a heartbeat TTL other than the one it was started with
        (a job with a time limit of its own) is written again. Otherwise:
        RQ records the execution (started registry, worker BUSY) in one
        transaction and marks the job STARTED in the next, so a worker killed
        between the two left a registered job still QUEUED. Here both, with
        the job taken out of its intermediate list, are one; the work-horse
        of a forking worker then has nothing left to write.
        """
        started, self._started = self._started, None
        if started is not None and started[1] == job.id:
            _, _, _, execution, ttl = started
            execution._job = job  # as RQ's own workers set it
            self.executions[execution.id] = execution
            wanted = self.get_heartbeat_ttl(job)
            if wanted != ttl:
                with self.connection.pipeline() as pipe:
                    execution.heartbeat(job.started_job_registry, wanted, pipeline=pipe)
                    self.heartbeat(wanted, pipeline=pipe)
                    pipe.execute()
            self._started_job_id = job.id
            return execution
        commands = _Commands()
        pipe = cast(Any, commands)
        ttl = self.get_heartbeat_ttl(job)
        execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
        self.executions[execution.id] = execution
        self.set_state(WorkerStatus.BUSY, pipeline=pipe)
        self.heartbeat(ttl, pipeline=pipe)
        job.prepare_for_execution(self.name, pipeline=pipe)
        pipe.persist(job.key)
        pipe.lrem(self._intermediate_key(job.origin), 1, job.id)
        self._send(commands)
        self._sent(WorkerStatus.BUSY)
        self._started_job_id = job.id
        return execution

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        """Nothing to write for a job :meth:`prepare_execution` started; otherwise RQ's."""
        if self._started_job_id == job.id:
            self._started_job_id = None
            doing = f"Processing {job.func_name} from {job.origin} since {time.time()}"
            self.procline(doing)  # type: ignore[no-untyped-call]
            return
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)

    def _intermediate_key(self, queue_name: str) -> str:
        for queue in self.queues:
            if queue.name == queue_name:
                return str(queue.intermediate_queue_key)
        return str(self.queue_class(queue_name, connection=self.connection).intermediate_queue_key)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        """Mark the end; the job heartbeat RQ sends here only matters to a callback.

        It keeps a job's ``last_heartbeat`` fresh while an ``on_success`` or
        ``on_failure`` callback runs; feedfan's chunks have none, and their
        status is written in the same transaction right after.
        """
        if job.success_callback is not None or job.failure_callback is not None:
            super().handle_execution_ended(job, queue, heartbeat_ttl)
            return
        job.ended_at = now()

    def handle_job_success(
        self, job: Job, queue: Queue, started_job_registry: Any, execution: Any
    ) -> None:
        """Record a finished feedfan chunk and take the next job in one call; others as RQ does.

        RQ's own path watches the job's dependents key and reads it (two round
        trips), then rewrites the whole job hash and adds a result entry. A
        feedfan chunk returns nothing, is never repeated, rate-limited or
        given callbacks, and nothing may depend on it, so it is marked
        finished, stamped, put in the finished registry for
        ``result_ttl`` seconds and taken out of the started one: what RQ
        leaves, without the rest. The same script call sets the worker IDLE
        and takes the next waiting job (see :meth:`dequeue_job_and_maintain_ttl`),
        unless the worker is stopping or its maintenance is due.
        """
        if not _is_plain_chunk(job):
            super().handle_job_success(job, queue, started_job_registry, execution)
            return
        ttl = job.get_result_ttl(self.default_result_ttl)
        ended = job.ended_at or now()
        commands = _Commands()
        pipe = cast(Any, commands)
        self.increment_successful_job_count(pipeline=pipe)
        if job.started_at is not None:
            self.increment_total_working_time(ended - job.started_at, pipe)
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        pipe.hset(job.key, "ended_at", utcformat(ended))
        if ttl != 0:
            job.finished_job_registry.add(job, ttl, pipe)
        job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
        self.cleanup_execution(job, pipeline=pipe, execution=execution)
        if self._is_horse:  # its parent says IDLE and takes the next job itself
            self._send(commands)
            return
        busy = self.get_state()
        self.set_state(WorkerStatus.IDLE, pipeline=pipe)
        self._state = busy  # until the call is back: a SIGTERM meanwhile marks a stop
        # The next job comes in the same call, unless the worker stops or maintenance is due.
        take = not self._stop_requested and not self.should_run_maintenance_tasks
        if take:
            self._held, self._looked = self._send_and_take(commands), True
        else:
            self._send(commands)
        if self._held is None:
            self._state = WorkerStatus.IDLE
            self._sent(WorkerStatus.IDLE)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """How long a running job's entry lives without a heartbeat: ``redelivery_timeout``."""
        timeout = self._redelivery_timeout
        if timeout is None or (job.timeout and job.timeout >= timeout):
            return int(super().get_heartbeat_ttl(job, working_time))
        return timeout

    # Failures ---------------------------------------------------------------

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """A malformed job is not retried; say so in one clear line, then RQ's handling."""
        error = exc_info[1] if len(exc_info) > 1 else None
        cause = getattr(error, "__cause__", None)
        refused: Exception | None = error if isinstance(error, PayloadError) else None
        if isinstance(error, DeserializationError):
            refused = cause if isinstance(cause, PayloadError) else error
        if refused is not None:
            job.retries_left = 0
            logger.warning(
                "feedfan refused RQ job %s from queue %s: %s It is kept in that queue's failed "
                "job registry; the worker goes on.",
                job.id,
                job.origin,
                refused,
            )
        super().handle_exception(job, *exc_info)

    def handle_work_horse_killed(self, job: Job, retpid: Any, ret_val: Any, rusage: Any) -> None:
        """Remember the job of a killed work-horse: it is delivered again, not failed."""
        self._lost_job_id = job.id
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)  # type: ignore[no-untyped-call]

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Any = None,
    ) -> None:
        """Deliver lost jobs again; record a chunk that failed for good in its fanout."""
        stopped = self._stopped_job_id == job.id
        lost = not stopped and (
            self._lost_job_id == job.id
            # Only a job stuck in the intermediate list fails while still QUEUED.
            or job.get_status(refresh=False) == JobStatus.QUEUED
        )
        self._lost_job_id = None
        if lost and self._redeliver(job, queue, execution=execution, why=exc_string):
            return
        final = stopped or not job.should_retry
        super().handle_job_failure(
            job,
            queue,
            started_job_registry=started_job_registry,
            exc_string=exc_string,
            execution=execution,
        )
        if final:
            _record_failed_chunk(job, failure_reason(exc_string))

    # Redelivery -----------------------------------------------------------

    def clean_registries(self) -> None:
        """Put abandoned jobs back first, then RQ's own maintenance."""
        for queue in self.queues:
            try:
                self._redeliver_abandoned(queue)
            except Exception:  # maintenance must never stop the worker
                logger.exception("feedfan could not check queue %s for lost jobs", queue.name)
        super().clean_registries()  # type: ignore[no-untyped-call]

    def _redeliver_abandoned(self, queue: Queue) -> None:
        registry = queue.started_job_registry
        expired = cast(
            "list[bytes]", self.connection.zrangebyscore(registry.key, 0, current_timestamp())
        )
        for raw in expired:
            entry = as_text(raw)
            job_id = entry.split(":", 1)[0]
            try:
                job = self.job_class.fetch(
                    job_id, connection=self.connection, serializer=self.serializer
                )
            except NoSuchJobError:
                continue  # RQ's cleanup drops the stale entry
            status = job.get_status(refresh=False)
            if status == JobStatus.QUEUED:
                # Registered, then its worker died before the status said STARTED (RQ
                # writes them one round trip apart). Unless it is waiting in a list, RQ's
                # own cleanup would drop the entry and the chunk with it.
                if self._still_listed(queue, job.id):
                    continue
            elif status != JobStatus.STARTED:
                continue
            why = f"its worker stopped heart-beating more than {self._redelivery_timeout} s ago"
            # The dead worker's execution record goes too: RQ would trip over it on success.
            execution = Execution.from_composite_key(entry, connection=self.connection)
            try:
                with self.connection.pipeline() as pipe:
                    # Claimed and put back (or failed) in one transaction: a worker killed
                    # midway leaves the entry for the next pass, and of two racing for it
                    # (another worker, RQ's own cleanup) the second finds the job changed.
                    pipe.watch(job.key)  # type: ignore[no-untyped-call]
                    if pipe.zscore(registry.key, entry) is None:
                        continue  # taken already
                    pipe.multi()
                    pipe.zrem(registry.key, entry)
                    count = self._queue_redelivery(job, queue, pipe, execution)
                    reason = _poison_reason(why)
                    if count is None:
                        self._queue_failure(job, queue, pipe, reason, execution)
                    pipe.execute()
            except WatchError:
                continue
            if count is None:
                logger.error("feedfan gives up on RQ job %s on %s: %s", job.id, queue.name, reason)
                _record_failed_chunk(job, reason)
            else:
                _log_redelivery(job, queue, count, why)

    def _still_listed(self, queue: Queue, job_id: str) -> bool:
        """Whether ``job_id`` waits in ``queue`` or in RQ's intermediate list for it."""
        return any(
            self.connection.lpos(key, job_id) is not None
            for key in (queue.key, queue.intermediate_queue_key)
        )

    def _redeliver(self, job: Job, queue: Queue, *, why: str, execution: Any = None) -> bool:
        """Put a lost ``job`` back at the head of ``queue``; ``False`` if it may not go back."""
        with self.connection.pipeline() as pipe:
            count = self._queue_redelivery(job, queue, pipe, execution)
            if count is None:
                return False
            pipe.execute()
        _log_redelivery(job, queue, count, why)
        return True

    def _queue_redelivery(self, job: Job, queue: Queue, pipe: Any, execution: Any) -> int | None:
        """Add to ``pipe`` what puts ``job`` back; its delivery count, or ``None`` if too many."""
        meta = job.meta if isinstance(job.meta, dict) else {}
        if "unserialized" in meta:
            return None
        count = int(meta.get(_REDELIVERIES, 0)) + 1
        if count > MAX_REDELIVERIES:
            return None
        meta[_REDELIVERIES] = count
        job.meta = meta
        job.started_at = job.ended_at = None
        # A lost chunk has waited already: it goes to the head of its queue.
        queue.enqueue_job(job, pipeline=pipe, at_front=True)
        if execution is not None:
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
        return count

    def _queue_failure(
        self, job: Job, queue: Queue, pipe: Any, reason: str, execution: Execution
    ) -> None:
        """Add to ``pipe`` what fails ``job`` into its queue's failed registry."""
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        queue.failed_job_registry.add(job, ttl=job.failure_ttl, exc_string=reason, pipeline=pipe)
        Result.create_failure(job, job.failure_ttl, exc_string=reason, pipeline=pipe)
        self.cleanup_execution(job, pipeline=pipe, execution=execution)


_DATE_FIELDS = ("created_at", "enqueued_at", "started_at", "ended_at", "last_heartbeat")


def _unreadable_reason(raw: dict[Any, Any], error: Exception) -> str:
    """Why a job hash does not load, naming the field and value when it is one of RQ's dates."""
    fields = {as_text(k): v for k, v in raw.items()}
    for name in _DATE_FIELDS:
        value = fields.get(name)
        if value:
            try:
                utcparse(as_text(value))
            except ValueError:
                return (
                    f"its job hash does not load: field {name} is {as_text(value)!r}, not a "
                    "date as RQ writes it (2026-01-31T12:00:00.000000Z). It was not run; fix "
                    "the field and requeue the job (rq requeue), or delete it."
                )
    return (
        f"its job hash does not load ({type(error).__name__}: {error}). It was not run; fix "
        "the job hash and requeue the job (rq requeue), or delete it."
    )


def _poison_reason(why: str) -> str:
    return f"lost with its worker {MAX_REDELIVERIES + 1} times ({why}); failed as a poison pill"


def _log_redelivery(job: Job, queue: Queue, count: int, why: str) -> None:
    logger.warning(
        "feedfan delivers RQ job %s on %s again (%d of %d): %s",
        job.id,
        queue.name,
        count,
        MAX_REDELIVERIES,
        (why or "its worker died").strip().splitlines()[0],
    )


def _is_plain_chunk(job: Job) -> bool:
    """Whether ``job`` is a feedfan chunk with none of RQ's extras (callbacks, repeats, limits)."""
    try:
        return (
            job.func_name == RUN_TASK
            and not job.repeats_left
            and job.success_callback is None
            and not job.has_rate_limit
            and job.result_ttl is not None
            and job.result_ttl >= 0
        )
    except Exception:  # anything unexpected: RQ's own path
        return False


def _record_failed_chunk(job: Job, reason: str) -> None:
    """Count a task that failed for good in its fanout's progress, planning tasks included."""
    try:
        body = job.args[0] if len(job.args) == 1 else None
        if isinstance(body, str):
            get_runner().count_failed(decode_task(body), reason)
    except (PayloadError, DeserializationError):
        pass  # a malformed job names no fanout to count it in; it was logged as refused
    except Exception:  # the job is failed in RQ either way; progress is best effort
        logger.warning("feedfan could not record the failure of RQ job %s", job.id, exc_info=True)


class FeedfanWorker(_FeedfanWorkerMixin, SimpleWorker):
    """feedfan's default RQ worker: runs each chunk in its own process, no fork per job.

    About five times the throughput of RQ's forking ``Worker`` on small chunks
    (see docs/rq.md); a chunk that crashes the interpreter takes the worker
    with it, and its chunk is delivered again to the next worker.
    """


class FeedfanForkWorker(_FeedfanWorkerMixin, Worker):
    """RQ's forking worker with feedfan's guarantees: each chunk in a fresh work-horse.

    Choose it for isolation (a leaking or crashing chunk cannot harm the
    worker); a killed work-horse's chunk is delivered again at once.
    """
