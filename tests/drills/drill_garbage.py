"""Malformed messages for the bad-input drill, in classes, each traceable to where it is kept.

Most messages carry a nonce (``ffd`` and 12 hex digits) somewhere a kept copy
shows it as text, so the drill can check each was kept exactly once, not only
count them. Pickles and library messages that name code name a marker
directory under ``marker_dir`` (one per message): if any is ever unpickled or
run, the directory appears.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import random
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from feedfan.activity import Activity
from feedfan.priority import FanoutPriority

__all__ = ["KINDS", "NONCE_PATTERN", "Garbage", "GarbageMaker"]

NONCE_PATTERN = r"ffd[0-9a-f]{12}"
"""What a nonce looks like in a kept message's text."""

_ACTIVITY = Activity(
    actor="garbage", verb="pin", object="x", time=datetime(2026, 1, 1, tzinfo=timezone.utc)
)


class _MakesDirectory:
    """Unpickling this creates a directory: proof that code ran from a payload."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.makedirs, (str(self.path),))


@dataclass(frozen=True)
class Garbage:
    """One malformed message and how to push it."""

    kind: str
    body: bytes
    envelope: bool
    """``push_raw(envelope=...)``: wrapped as feedfan's task, or the whole broker message."""

    priority: FanoutPriority
    nonce: str | None
    """The nonce a kept copy shows, if the message carries one."""


class GarbageMaker:
    """Makes malformed messages of every class for one backend's queues."""

    def __init__(
        self,
        rng: random.Random,
        *,
        dispatcher: str,
        broker: str,
        queues: dict[FanoutPriority, str],
        marker_dir: Path,
        max_chunk_size: int,
        max_task_bytes: int,
    ) -> None:
        self.rng = rng
        self.dispatcher = dispatcher
        self.broker = broker
        self.queues = queues
        self.marker_dir = marker_dir
        self.max_chunk_size = max_chunk_size
        self.max_task_bytes = max_task_bytes
        self._kinds: dict[str, Callable[[str, FanoutPriority], bytes]] = {
            "random-bytes": self._random_bytes,
            "truncated-json": self._truncated,
            "wrong-version": self._wrong_version,
            "wrong-types": self._wrong_types,
            "huge-follower-list": self._huge,
            "unknown-names": self._unknown_names,
            "pickled-object": self._pickled,
            "json-not-an-object": self._not_an_object,
            "deep-nesting": self._deep,
            "bad-encoding": self._bad_encoding,
        }

    # The drill's interface ---------------------------------------------------

    def make(self, count: int) -> list[Garbage]:
        """``count`` messages, classes in turn, half on each queue, envelopes mixed.

        Two outsized ones per backend whatever ``count``: a follower list over
        the codec's 100,000 limit and a task over ``max_task_bytes``.
        """
        kinds = [*self._kinds, "library-message"]
        made = [
            self._oversized(FanoutPriority.HIGH),
            self._oversized(FanoutPriority.LOW, bytes_=True),
        ]
        for number in range(max(count - len(made), 0)):
            kind = kinds[number % len(kinds)]
            priority = list(FanoutPriority)[(number // len(kinds)) % 2]
            made.append(self._one(kind, priority))
        self.rng.shuffle(made)
        return made

    def _one(self, kind: str, priority: FanoutPriority) -> Garbage:
        nonce = _nonce(self.rng)
        if kind == "library-message":
            return Garbage(kind, self._library(nonce, priority), False, priority, nonce)
        body = self._kinds[kind](nonce, priority)
        envelope = self.rng.random() < 0.5
        shown = nonce if nonce.encode() in body else None
        return Garbage(kind, body, envelope, priority, shown)

    def _oversized(self, priority: FanoutPriority, *, bytes_: bool = False) -> Garbage:
        nonce = _nonce(self.rng)
        task = self._valid(nonce, priority)
        if bytes_:
            task["to"] = [nonce, "x" * (self.max_task_bytes + 1024)]
        else:
            task["to"] = [nonce, *range(100_001)]
        return Garbage("huge-follower-list", _dumps(task), True, priority, nonce)

    # Building blocks ---------------------------------------------------------

    def _valid(self, nonce: str, priority: FanoutPriority) -> dict[str, object]:
        """A valid chunk task (to one follower named by the nonce) for the classes to break."""
        return {
            "v": 1,
            "kind": "chunk",
            "op": "add",
            "feeds": ["timeline"],
            "acts": [[_ACTIVITY.id, _ACTIVITY.sort_key]],
            "to": [nonce],
            "fanout": uuid.uuid4().hex[:24],
            "prio": priority.value,
            "idx": self.rng.randrange(1000),
        }

    def _marker(self, nonce: str) -> str:
        return str(self.marker_dir / nonce)

    # The classes -----------------------------------------------------------------

    def _random_bytes(self, nonce: str, priority: FanoutPriority) -> bytes:
        return self.rng.randbytes(self.rng.choice([0, 1, 2, 7, 64, 300, 2000]))

    def _truncated(self, nonce: str, priority: FanoutPriority) -> bytes:
        text = _dumps({"n": nonce, **self._valid(nonce, priority)})
        keep = len(f'{{"n":"{nonce}"')
        return text[: self.rng.randrange(keep, len(text))]

    def _wrong_version(self, nonce: str, priority: FanoutPriority) -> bytes:
        task = self._valid(nonce, priority)
        choice = self.rng.choice([0, 2, 99, -1, "1", None, [1], "missing"])
        if choice == "missing":
            del task["v"]
        else:
            task["v"] = choice
        return _dumps(task)

    def _wrong_types(self, nonce: str, priority: FanoutPriority) -> bytes:
        task = self._valid(nonce, priority)
        field, value = self.rng.choice(
            [
                ("idx", "zero"),
                ("idx", -1),
                ("idx", 2**40),
                ("idx", 1.5),
                ("to", {"a": nonce}),
                ("to", [nonce, 1.5]),
                ("to", [nonce, [1]]),
                ("to", [nonce, True]),
                ("to", [nonce, ""]),
                ("to", nonce),
                ("to", []),
                ("acts", "x"),
                ("acts", [["not-an-id", 1]]),
                ("acts", [[_ACTIVITY.id, str(_ACTIVITY.sort_key)]]),
                ("acts", [[_ACTIVITY.id, _ACTIVITY.sort_key + 1]]),
                ("acts", [[_ACTIVITY.id, float("nan")]]),
                ("feeds", "timeline"),
                ("feeds", [1]),
                ("feeds", ["timeline", "timeline"]),
                ("prio", 1),
                ("op", 1),
                ("fanout", 123),
                ("fanout", "../../etc/passwd"),
                ("kind", None),
            ]
        )
        task[field] = value
        return _dumps(task)

    def _huge(self, nonce: str, priority: FanoutPriority) -> bytes:
        task = self._valid(nonce, priority)
        extra = self.rng.randrange(self.max_chunk_size + 1, 3 * self.max_chunk_size)
        task["to"] = [nonce, *range(extra)]
        return _dumps(task)

    def _unknown_names(self, nonce: str, priority: FanoutPriority) -> bytes:
        task = self._valid(nonce, priority)
        field, value = self.rng.choice(
            [
                ("feeds", ["not-registered"]),
                ("feeds", ["user"]),
                ("feeds", ["timeline", "nope"]),
                ("feeds", ["Time Line"]),
                ("op", "drop_table"),
                ("op", "os.system"),
                ("kind", "exec"),
                ("kind", "python"),
                ("prio", "urgent"),
                ("extra_field", "x"),
            ]
        )
        task[field] = value
        return _dumps(task)

    def _pickled(self, nonce: str, priority: FanoutPriority) -> bytes:
        protocol = self.rng.randrange(0, pickle.HIGHEST_PROTOCOL + 1)
        target: object = self.rng.choice(
            [
                _MakesDirectory(Path(self._marker(nonce))),
                {"v": 1, "kind": "chunk", "to": [nonce]},
                [_MakesDirectory(Path(self._marker(nonce))), nonce],
            ]
        )
        body = pickle.dumps(target, protocol=protocol)
        return body if nonce.encode() in body else body + nonce.encode()

    def _not_an_object(self, nonce: str, priority: FanoutPriority) -> bytes:
        return _dumps(
            self.rng.choice(
                [
                    [nonce],
                    nonce,
                    [self._valid(nonce, priority)],
                    {"task": self._valid(nonce, priority)},
                ]
            )
        )

    def _deep(self, nonce: str, priority: FanoutPriority) -> bytes:
        depth = self.rng.choice([2_000, 20_000, 100_000])
        opener, closer = self.rng.choice([("[", "]"), ('{"a":', "}")])
        closed = self.rng.random() < 0.5
        inner = opener * depth + "1" + (closer * depth if closed else "")
        return f'{{"n":"{nonce}","v":1,"x":{inner}{"}" if closed else ""}'.encode()

    def _bad_encoding(self, nonce: str, priority: FanoutPriority) -> bytes:
        text = _dumps(self._valid(nonce, priority)).decode()
        choice = self.rng.choice(["latin-1-in-utf8", "utf-16", "nul"])
        if choice == "utf-16":
            # Python's json reads UTF-16 bytes; a worker must not.
            return text.encode("utf-16") + f" {nonce}".encode()
        if choice == "nul":
            return text.replace('"add"', '"a\\u0000dd"').encode()
        return text.replace('"timeline"', '"timel\xefne"').encode("latin-1")

    # Library-level messages that name code ----------------------------------------

    def _library(self, nonce: str, priority: FanoutPriority) -> bytes:
        """A well-formed message of the queue library asking it to run something else."""
        queue = self.queues[priority]
        marker = self._marker(nonce)
        if self.dispatcher == "celery" and self.broker == "redis":
            return self._kombu_message(nonce, queue, marker)
        if self.dispatcher == "celery":
            # An AMQP body alone (no headers): protocol 1, the task named in the body.
            body: object = {"task": "os.makedirs", "id": nonce, "args": [marker], "kwargs": {}}
            if self.rng.random() < 0.5:
                return pickle.dumps(body) + nonce.encode()
            return _dumps(body)
        if self.dispatcher == "rq":
            data = self.rng.choice(
                [
                    ["os.makedirs", None, [marker], {}],
                    ["builtins.eval", None, [f"__import__('os').makedirs({marker!r})"], {}],
                    ["feedfan.backends.rq.run_task", None, [marker, nonce], {}],
                    ["feedfan.backends.rq.run_task", "os", [nonce], {}],
                ]
            )
            if self.rng.random() < 0.3:
                # RQ reads job data zlib-compressed too; unpickling this would run code.
                return zlib.compress(pickle.dumps((_MakesDirectory(Path(marker)), None, (), {})))
            return _dumps(data)
        actor = self.rng.choice(["os.makedirs", "feedfan_high", "feedfan_low"])
        args: list[object] = [marker] if actor == "os.makedirs" else [[marker]]
        return _dumps(
            {
                "queue_name": queue,
                "actor_name": actor,
                "args": args,
                "kwargs": {},
                "options": {},
                "message_id": nonce,
                "message_timestamp": 1_767_225_600_000,
            }
        )

    def _kombu_message(self, nonce: str, queue: str, marker: str) -> bytes:
        pickled = self.rng.random() < 0.5
        payload = (
            pickle.dumps(((marker,), {}, {}))
            if pickled
            else json.dumps([[marker], {}, {}]).encode()
        )
        task = self.rng.choice(["os.makedirs", "feedfan.run"] if not pickled else ["os.makedirs"])
        return _dumps(
            {
                "body": base64.b64encode(payload).decode(),
                "content-encoding": "binary" if pickled else "utf-8",
                "content-type": "application/x-python-serialize" if pickled else "application/json",
                "headers": {"lang": "py", "task": task, "id": nonce, "retries": 0},
                "properties": {
                    "delivery_mode": 2,
                    "delivery_info": {"exchange": queue, "routing_key": queue},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": str(uuid.uuid4()),
                },
            }
        )


KINDS = (
    "random-bytes",
    "truncated-json",
    "wrong-version",
    "wrong-types",
    "huge-follower-list",
    "unknown-names",
    "pickled-object",
    "json-not-an-object",
    "deep-nesting",
    "bad-encoding",
    "library-message",
)
"""Every class of malformed message, as the results name them."""


def _nonce(rng: random.Random) -> str:
    return f"ffd{rng.getrandbits(48):012x}"


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
