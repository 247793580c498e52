"""Redis storage: timelines as sorted sets, bodies stored once, progress counters.

Keys, all under the configured prefix (``feedfan:`` by default):

``feed:<name>:<user>``
    sorted set, member = activity id, score = sort key
``act:<activity id>``
    the activity's JSON body, written once
``fanout:<id>`` / ``fanout:<id>:done`` / ``fanout:<id>:failed``
    a fanout's description, the set of finished chunk keys, failed chunks
``fanouts``
    sorted set of recent fanout ids by start time
``rejected``
    list of messages workers refused, newest first

A chunk is written in one round trip, either by one server-side script
(``write_mode = "script"``, the default: 1.5 to 4.6 times the writes/s of a
pipeline, median 4.0, over chunks of 10 to 5,000 feeds in one benchmark run,
2026-11-24; see ``benchmarks/``) or by one pipeline (``"pipeline"``, for Redis
deployments that forbid scripts). Both record the chunk as done in the same
round trip, so progress never runs ahead of the feeds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from feedfan.activity import Activity, decode_activity, encode_activity
from feedfan.errors import ConfigurationError, StorageError, redact_url
from feedfan.storage.base import FanoutStatus, RejectedMessage, Storage, WriteBatch

__all__ = ["RedisStorage", "WriteMode"]

WriteMode = Literal["script", "pipeline"]

# KEYS: done set, failed hash.
# ARGV: op, chunk marker ('' for none), ttl, entry count n, n (score, member)
# pairs for an add or n members for a remove, then for an add the max lengths
# as runs: a run count g, then g (key count, max length) pairs covering the
# feed keys in order; last, the feed keys joined by newlines (no key feedfan
# builds holds one). Runs, and one argument for all keys, because packing
# arguments is much of a write's client-side cost: one argument per key was
# a third of a worker's time on chunks of thousands of followers. (Feed keys
# of one chunk hash to many slots, so this never ran on Redis Cluster.)
# Members are sent to ZADD/ZREM in slices so unpack() stays far below Lua's
# C-stack limit whatever the entry count.
_APPLY_SCRIPT = """
local op, marker, ttl, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local slice = 500
local first = 5
local feeds = {}
for key in string.gmatch(ARGV[#ARGV], '[^\\n]+') do feeds[#feeds + 1] = key end
if op == 'add' then
  local args = {}
  for j = 0, n - 1 do
    args[#args + 1] = ARGV[first + 2 * j]
    args[#args + 1] = ARGV[first + 2 * j + 1]
  end
  local runs = first + 2 * n
  local k = 1
  for g = 0, tonumber(ARGV[runs]) - 1 do
    local count = tonumber(ARGV[runs + 1 + 2 * g])
    local stop = -(tonumber(ARGV[runs + 2 + 2 * g]) + 1)
    for _ = 1, count do
      local i = 0
      while i < 2 * n do
        redis.call('ZADD', feeds[k], unpack(args, i + 1, math.min(i + 2 * slice, 2 * n)))
        i = i + 2 * slice
      end
      redis.call('ZREMRANGEBYRANK', feeds[k], 0, stop)
      k = k + 1
    end
  end
else
  for k = 1, #feeds do
    local i = 0
    while i < n do
      local args = {}
      local last = math.min(i + slice, n) - 1
      for j = i, last do args[#args + 1] = ARGV[first + j] end
      redis.call('ZREM', feeds[k], unpack(args))
      i = last + 1
    end
  end
end
if marker ~= '' then
  redis.call('SADD', KEYS[1], marker)
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('HDEL', KEYS[2], marker)
end
return #feeds
"""

# KEYS: fanout hash, done set, failed hash, recent-fanouts zset.
# ARGV: fanout id, now, ttl, then field/value pairs of the description.
# A fanout id that already finished is being run again (the same activity
# added after a removal, a second follow): its counters start over. One that
# has not finished is a retry, and keeps counting where it was.
_BEGIN_SCRIPT = """
local total = redis.call('HGET', KEYS[1], 'total')
if total and redis.call('SCARD', KEYS[2]) >= tonumber(total) then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HDEL', KEYS[1], 'total')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], 0, tonumber(ARGV[2]) - tonumber(ARGV[3]))
return 1
"""

# KEYS: fanout hash, done set, failed hash. ARGV: the failed-hash field of a planning
# failure. Takes back a recorded total, in one step, unless every chunk is done and
# no planning failed (then returns 0): a total written by a failed planning is never
# final, even if the chunks sent before it are all done.
_REOPEN_SCRIPT = """
local total = redis.call('HGET', KEYS[1], 'total')
if not total then return 1 end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0
    and redis.call('SCARD', KEYS[2]) >= tonumber(total) then
  return 0
end
redis.call('HDEL', KEYS[1], 'total')
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

_DEFAULT_STATUS_TTL = 7 * 24 * 3600
_DEFAULT_REJECTED_CAP = 100_000


class RedisStorage(Storage):
    """Feeds in Redis, shared by the producer and every worker process."""

    shared = True

    def __init__(
        self,
        *,
        url: str = "redis://127.0.0.1:6379/0",
        key_prefix: str = "feedfan:",
        write_mode: WriteMode = "script",
        status_ttl: int = _DEFAULT_STATUS_TTL,
        rejected_cap: int = _DEFAULT_REJECTED_CAP,
        client: redis.Redis | None = None,
        connection_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(key_prefix=key_prefix)
        if write_mode not in ("script", "pipeline"):
            raise ConfigurationError(
                f"write_mode must be 'script' or 'pipeline', got {write_mode!r}."
            )
        self.url = url
        self.write_mode: WriteMode = write_mode
        self.status_ttl = status_ttl
        self.rejected_cap = rejected_cap
        if client is None:
            options: dict[str, Any] = {
                "socket_connect_timeout": 5,
                "socket_timeout": 30,
                "health_check_interval": 30,
                "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), 6),
                "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
            }
            options.update(connection_options or {})
            try:
                client = redis.Redis.from_url(url, **options)
            except ValueError as e:
                raise ConfigurationError(
                    f"redis_url {redact_url(url)!r} is not a Redis URL ({e}); expected "
                    "redis://[:password@]host:port/db, rediss://… or unix://…"
                ) from e
        self.client = client
        self._apply_script = client.register_script(_APPLY_SCRIPT)
        self._begin_script = client.register_script(_BEGIN_SCRIPT)
        self._reopen_script = client.register_script(_REOPEN_SCRIPT)

    def __repr__(self) -> str:
        return f"<RedisStorage {redact_url(self.url)} prefix={self.key_prefix!r}>"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except redis.ConnectionError as e:
            raise StorageError(
                f"cannot reach Redis at {redact_url(self.url)}: {e}. Check that the server "
                "is running and that redis_url (FEEDFAN_REDIS_URL) points at it."
            ) from e
        except redis.TimeoutError as e:
            raise StorageError(f"Redis at {redact_url(self.url)} timed out: {e}.") from e
        except redis.RedisError as e:
            raise StorageError(f"Redis at {redact_url(self.url)} refused a command: {e}.") from e

    def _key(self, *parts: str) -> str:
        return self.key_prefix + ":".join(parts)

    # Activity bodies ---------------------------------------------------

    def store_activities(self, activities: Iterable[Activity]) -> None:
        mapping = self._activity_bodies(activities)
        if mapping:
            with self._errors():
                self.client.mset(mapping)

    def _activity_bodies(self, activities: Iterable[Activity]) -> dict[str, str]:
        return {self._key("act", a.id): encode_activity(a) for a in activities}

    def get_activities(self, activity_ids: Sequence[str]) -> dict[str, Activity]:
        if not activity_ids:
            return {}
        with self._errors():
            bodies = self.client.mget([self._key("act", i) for i in activity_ids])
        return {
            i: decode_activity(b)
            for i, b in zip(activity_ids, bodies, strict=True)
            if b is not None
        }

    # Feeds ---------------------------------------------------------------

    def apply(self, batch: WriteBatch) -> None:
        with self._errors():
            if self.write_mode == "script":
                self._apply_with_script(batch)
            else:
                self._apply_with_pipeline(batch)

    def _chunk_keys(self, batch: WriteBatch) -> tuple[str, str, str]:
        if batch.chunk is None:
            return "", "", ""
        fanout_id, chunk_key = batch.chunk
        return (
            self._key("fanout", fanout_id, "done"),
            self._key("fanout", fanout_id, "failed"),
            chunk_key,
        )

    def _apply_with_script(self, batch: WriteBatch) -> None:
        keys, args = self._apply_call(batch)
        self._apply_script(keys=keys, args=args)

    def _apply_call(self, batch: WriteBatch) -> tuple[list[str], list[str | int]]:
        """The keys and arguments of the apply script for ``batch``."""
        done_key, failed_key, marker = self._chunk_keys(batch)
        keys = [done_key or self._key("none"), failed_key or self._key("none")]
        feeds = _joined_keys([key for key, _ in batch.feeds])
        args: list[str | int] = [batch.op, marker, self.status_ttl, len(batch.entries)]
        if batch.op == "add":
            for member, score in batch.entries:
                args.extend((score, member))
            runs = _runs(max_length for _, max_length in batch.feeds)
            args.append(len(runs))
            for count, max_length in runs:
                args.extend((count, max_length))
        else:
            args.extend(member for member, _ in batch.entries)
        args.append(feeds)
        return keys, args

    def _apply_with_pipeline(self, batch: WriteBatch) -> None:
        pipe = self.client.pipeline(transaction=False)
        self._queue_writes(pipe, batch)
        pipe.execute()

    def _queue_writes(self, pipe: Any, batch: WriteBatch) -> None:
        """Queue ``batch`` as plain commands on ``pipe`` (the pipeline write mode)."""
        if batch.op == "add":
            mapping = dict(batch.entries)
            for key, max_length in batch.feeds:
                if mapping:
                    pipe.zadd(key, mapping)
                pipe.zremrangebyrank(key, 0, -(max_length + 1))
        else:
            members = [member for member, _ in batch.entries]
            for key, _ in batch.feeds:
                if members:
                    pipe.zrem(key, *members)
        done_key, failed_key, marker = self._chunk_keys(batch)
        if marker:
            pipe.sadd(done_key, marker)
            pipe.expire(done_key, self.status_ttl)
            pipe.hdel(failed_key, marker)

    def read_feed(self, key: str, *, offset: int, limit: int) -> list[tuple[str, int]]:
        if limit <= 0:
            return []
        with self._errors():
            rows: list[tuple[bytes, float]] = self.client.zrevrange(  # type: ignore[assignment]
                key, offset, offset + limit - 1, withscores=True
            )
        return [(_text(member), int(score)) for member, score in rows]

    def feed_length(self, key: str) -> int:
        with self._errors():
            return int(self.client.zcard(key))

    # Fanout progress -------------------------------------------------------

    def begin_fanout(self, fanout_id: str, meta: Mapping[str, str]) -> None:
        keys, args = self._begin_call(fanout_id, meta)
        with self._errors():
            self._begin_script(keys=keys, args=args)

    def _begin_call(
        self, fanout_id: str, meta: Mapping[str, str]
    ) -> tuple[list[str], list[str | float]]:
        now = time.time()
        keys = [
            self._key("fanout", fanout_id),
            self._key("fanout", fanout_id, "done"),
            self._key("fanout", fanout_id, "failed"),
            self._key("fanouts"),
        ]
        args: list[str | float] = [fanout_id, now, self.status_ttl]
        for field_name, value in {**meta, "started": repr(now)}.items():
            args.extend((field_name, value))
        return keys, args

    def start_fanout(
        self,
        fanout_id: str,
        meta: Mapping[str, str],
        *,
        activities: Iterable[Activity] = (),
        writes: Iterable[WriteBatch] = (),
        clear_failure: str | None = None,
    ) -> None:
        """The producer's writes before it sends a fanout's tasks, in one round trip."""
        bodies = self._activity_bodies(activities)
        calls: list[tuple[Any, list[str], list[Any]]] = []
        plain: list[WriteBatch] = []
        for batch in writes:
            if self.write_mode == "script":
                calls.append((self._apply_script, *self._apply_call(batch)))
            else:
                plain.append(batch)
        calls.append((self._begin_script, *self._begin_call(fanout_id, meta)))
        failed_key = self._key("fanout", fanout_id, "failed")
        with self._errors():
            for attempt in range(2):
                pipe = self.client.pipeline(transaction=False)
                if bodies:
                    pipe.mset(bodies)
                for batch in plain:
                    self._queue_writes(pipe, batch)
                # EVALSHA, not redis-py's Script in a pipeline, which asks SCRIPT EXISTS
                # in a round trip of its own every time.
                for script, keys, args in calls:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                if clear_failure is not None:
                    pipe.hdel(failed_key, clear_failure)
                replies = pipe.execute(raise_on_error=False)
                errors = [r for r in replies if isinstance(r, Exception)]
                if attempt == 0 and any(isinstance(e, NoScriptError) for e in errors):
                    # A flushed or restarted Redis: load the scripts and run it all again,
                    # every part being idempotent.
                    for script in {script for script, _, _ in calls}:
                        script.sha = self.client.script_load(script.script)
                    continue
                if errors:
                    raise errors[0]
                return

    def end_planning(self, fanout_id: str, total_chunks: int) -> None:
        key = self._key("fanout", fanout_id)
        with self._errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(key, "total", total_chunks)
            pipe.expire(key, self.status_ttl)
            pipe.execute()

    def reopen_planning(self, fanout_id: str, failed_key: str) -> bool:
        keys = [
            self._key("fanout", fanout_id),
            self._key("fanout", fanout_id, "done"),
            self._key("fanout", fanout_id, "failed"),
        ]
        with self._errors():
            return bool(self._reopen_script(keys=keys, args=[failed_key]))

    def mark_chunk_failed(self, fanout_id: str, chunk_key: str, reason: str) -> None:
        done_key = self._key("fanout", fanout_id, "done")
        failed_key = self._key("fanout", fanout_id, "failed")
        with self._errors():
            if self.client.sismember(done_key, chunk_key):
                return
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(failed_key, chunk_key, reason[:2000])
            pipe.expire(failed_key, self.status_ttl)
            pipe.execute()

    def clear_chunk_failure(self, fanout_id: str, chunk_key: str) -> None:
        with self._errors():
            self.client.hdel(self._key("fanout", fanout_id, "failed"), chunk_key)

    def fanout_status(self, fanout_id: str) -> FanoutStatus | None:
        with self._errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(self._key("fanout", fanout_id))
            pipe.scard(self._key("fanout", fanout_id, "done"))
            pipe.hlen(self._key("fanout", fanout_id, "failed"))
            raw, done, failed = pipe.execute()
        if not raw and not done and not failed:
            return None
        meta = {k.decode(): v.decode() for k, v in raw.items()}
        total = meta.pop("total", None)
        return FanoutStatus(
            fanout_id=fanout_id,
            total=int(total) if total is not None else None,
            done=int(done),
            failed=int(failed),
            meta=meta,
        )

    def recent_fanouts(self, *, limit: int = 20) -> list[str]:
        with self._errors():
            ids: list[bytes] = self.client.zrevrange(self._key("fanouts"), 0, limit - 1)  # type: ignore[assignment]
        return [_text(i) for i in ids]

    # Rejected messages -----------------------------------------------------

    def keep_rejected(self, queue: str, body: str, reason: str) -> None:
        record = json.dumps({"queue": queue, "reason": reason, "body": body, "at": time.time()})
        with self._errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.lpush(self._key("rejected"), record)
            pipe.ltrim(self._key("rejected"), 0, self.rejected_cap - 1)
            pipe.execute()

    def rejected(self, *, limit: int = 100) -> list[RejectedMessage]:
        with self._errors():
            rows: list[bytes] = self.client.lrange(self._key("rejected"), 0, limit - 1)  # type: ignore[assignment]
        return [self._rejected_from(row) for row in rows]

    def pop_rejected(self) -> RejectedMessage | None:
        with self._errors():
            row: bytes | None = self.client.rpop(self._key("rejected"))  # type: ignore[assignment]
        return self._rejected_from(row) if row is not None else None

    @staticmethod
    def _rejected_from(row: bytes | str) -> RejectedMessage:
        data = json.loads(row)
        return RejectedMessage(data["queue"], data["reason"], data["body"], float(data["at"]))

    # Housekeeping ----------------------------------------------------------

    def clear(self) -> int:
        if not self.key_prefix:
            raise ConfigurationError(
                "refusing to clear a Redis storage with an empty key_prefix: that would "
                "delete every key in the database."
            )
        count = 0
        with self._errors():
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=_glob_escape(self.key_prefix) + "*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    count += int(self.client.unlink(*batch))
                    batch.clear()
            if batch:
                count += int(self.client.unlink(*batch))
        return count

    def ping(self) -> None:
        with self._errors():
            self.client.ping()

    def close(self) -> None:
        self.client.close()


def _joined_keys(keys: list[str]) -> str:
    """``keys`` as one script argument, one per line; each must be non-empty, without newline."""
    joined = "\n".join(keys)
    if (
        joined.count("\n") != max(len(keys) - 1, 0)
        or "\n\n" in joined
        or (keys and not (keys[0] and keys[-1]))
    ):
        bad = [key for key in keys if not key or "\n" in key][:3]
        raise ValueError(
            f"feed keys must be non-empty and hold no newline, got {bad!r}; feedfan's own "
            "keys never do: build feed keys with Storage.feed_key."
        )
    return joined


def _runs(values: Iterable[int]) -> list[tuple[int, int]]:
    """Run-length encode ``values`` as ``(count, value)`` pairs."""
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and runs[-1][1] == value:
            runs[-1] = (runs[-1][0] + 1, value)
        else:
            runs.append((1, value))
    return runs


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
